// Tokenizer throughput: encodes English text on one core and reports MB/s.
//   vkvlm-bench-tokenizer [TOKENIZER_JSON ...] [--mb N]
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "host/tokenizer.h"

namespace {
// Plain English prose; shuffled into sentences so no two are alike and caches cannot help.
const char* k_words =
    "the quick brown fox jumps over a lazy dog while researchers measure how fast graphics processors "
    "decode language models on every vendor's hardware and compare their results with reference "
    "implementations written in python which run much slower but remain the ground truth for "
    "correctness tests that check logits tokens images and prompts against each other in a long "
    "sequence of careful steps because a single wrong bit in a tokenizer can change every later "
    "prediction of the model and nobody wants answers that look plausible yet differ from what the "
    "original authors trained when they published weights for the community to use freely";

std::string english(size_t bytes) {
  std::vector<std::string> words;
  std::istringstream in(k_words);
  for (std::string w; in >> w;) words.push_back(w);
  std::mt19937 rng(42);
  std::string out;
  out.reserve(bytes + 64);
  while (out.size() < bytes) {
    int n = 8 + int(rng() % 12);
    for (int i = 0; i < n; ++i) {
      std::string w = words[rng() % words.size()];
      if (i == 0) w[0] = char(std::toupper(w[0]));
      out += w;
      out += i + 1 < n ? " " : ". ";
    }
    if (rng() % 5 == 0) out += "\n";
  }
  return out;
}
}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> files;
  double mb = 4;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--mb") == 0 && i + 1 < argc) mb = std::atof(argv[++i]);
    else files.push_back(argv[i]);
  }
  if (files.empty()) {
    std::fprintf(stderr, "usage: vkvlm-bench-tokenizer TOKENIZER_JSON... [--mb N]\n");
    return 2;
  }
  const std::string text = english(size_t(mb * 1e6));
  for (auto& f : files) {
    try {
      auto tok = vkvlm::Tokenizer::from_file(f);
      tok.encode(text.substr(0, 10000), false);  // warm up
      auto t0 = std::chrono::steady_clock::now();
      auto ids = tok.encode(text, false);
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("%-60s %8.2f MB/s  (%zu bytes -> %zu tokens in %.3f s)\n", f.c_str(), double(text.size()) / s / 1e6,
                  text.size(), ids.size(), s);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "vkvlm-bench-tokenizer: %s\n", e.what());
      return 1;
    }
  }
  return 0;
}
