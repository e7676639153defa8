// Generation with and without speculative decoding on one conversation: decode tokens/s plain,
// with a draft model and with prompt lookup, the drafts' acceptance, whether the tokens agree
// (greedy speculative decoding must change nothing); and for each KV cache type (f16, and
// quantized with 8 and 4 bits in groups of 64 and 32 where they divide the heads) its bytes per
// token, decode tokens/s and whether the greedy tokens are the f16 cache's.
//   vkvlm-bench-generate --model DIR [--draft-model DIR] [--lookup-ngram N] [--num-draft-tokens N]
//                        [--image PATH] [--prompt TEXT] [--max-tokens N] [--reps N] [--json]
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "gpu/device.h"
#include "models/session.h"

namespace vkvlm {
namespace {

struct Args {
  std::string model, draft, prompt = "Describe this image in detail.";
  std::vector<std::string> images;
  int lookup = 2, draft_tokens = 3, max_tokens = 64, reps = 3;
  bool json = false;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) fail(k, " needs a value");
      return argv[++i];
    };
    if (k == "--model") a.model = value();
    else if (k == "--draft-model") a.draft = value();
    else if (k == "--image") a.images.push_back(value());
    else if (k == "--prompt") a.prompt = value();
    else if (k == "--lookup-ngram") a.lookup = std::stoi(value());
    else if (k == "--num-draft-tokens") a.draft_tokens = std::stoi(value());
    else if (k == "--max-tokens") a.max_tokens = std::stoi(value());
    else if (k == "--reps") a.reps = std::max(1, std::stoi(value()));
    else if (k == "--json") a.json = true;
    else fail("unknown option ", k);
  }
  if (a.model.empty()) fail("--model DIR is required");
  return a;
}

struct Measured {
  std::string mode;
  double decode_tps = 0;  // best of the repetitions
  int64_t drafted = 0, accepted = 0;
  bool same_tokens = true;
};

int run(int argc, char** argv) {
  const Args a = parse(argc, argv);
  auto ctx = std::make_unique<gpu::Context>(gpu::Device::create());
  Model model(*ctx, a.model);
  std::unique_ptr<Model> draft;
  if (!a.draft.empty()) {
    draft = std::make_unique<Model>(*ctx, a.draft);
    check_draft_model(model, *draft);
  }
  std::vector<Image> images;
  Messages content = Messages::array();
  for (const auto& p : a.images) {
    images.push_back(load_image_file(p));
    content.push_back({{"type", "image"}});
  }
  content.push_back({{"type", "text"}, {"text", a.prompt}});
  const Messages messages = Messages::array({{{"role", "user"}, {"content", content}}});
  const Prompt prompt = model.build_prompt(messages, images);
  const int64_t context = prompt.size() + a.max_tokens + 32;
  GenerationParams params;
  params.max_tokens = a.max_tokens;
  params.ignore_eos = true;
  params.num_draft_tokens = a.draft_tokens;

  std::vector<int32_t> reference;
  auto measure = [&](const std::string& mode, const GenerationParams& p, Model* drafter, const KvFormat& kv = {}) {
    Measured m{mode};
    Prompt draft_prompt;
    if (drafter) draft_prompt = drafter->build_draft_prompt(messages, images);
    for (int r = 0; r < a.reps; ++r) {
      // Fresh sessions: every repetition prefills, so the decode figure is a cold conversation's.
      Session s(model, context, false, kv);
      std::unique_ptr<Session> ds;
      if (drafter) ds = std::make_unique<Session>(*drafter, context);
      const GenerationResult g = s.generate(prompt, p, {}, {}, {ds.get(), drafter ? &draft_prompt : nullptr});
      m.decode_tps = std::max(m.decode_tps, g.decode_tokens_per_second());
      m.drafted = g.draft_tokens;
      m.accepted = g.accepted_tokens;
      if (reference.empty()) reference = g.tokens;
      m.same_tokens = m.same_tokens && g.tokens == reference;
    }
    return m;
  };
  std::vector<Measured> rows;
  rows.push_back(measure("plain", params, nullptr));
  if (draft) rows.push_back(measure("draft " + a.draft, params, draft.get()));
  if (a.lookup > 0) {
    GenerationParams p = params;
    p.lookup_ngram = a.lookup;
    rows.push_back(measure("lookup " + std::to_string(a.lookup), p, nullptr));
  }
  const auto& t = model.config().text;
  // KV cache types: bytes per token (K and V, every layer) and a plain decode with each.
  std::vector<std::pair<std::string, uint64_t>> kv_types = {{"f16", KvFormat{}.bytes(t, 1)}};
  for (int bits : {8, 4})
    for (int group : {64, 32}) {
      KvFormat kv;
      kv.bits = bits;
      kv.group_size = group;
      if (t.head_dim % group) continue;
      kv_types.push_back({kv.describe(), kv.bytes(t, 1)});
      rows.push_back(measure("kv " + kv.describe(), params, nullptr, kv));
    }

  const std::string device = ctx->profile().summary_line();
  if (a.json) {
    nlohmann::ordered_json j;
    j["device"] = device;
    j["model"] = a.model;
    j["prompt_tokens"] = prompt.size();
    j["max_tokens"] = a.max_tokens;
    for (const auto& [name, bytes] : kv_types) j["kv_bytes_per_token"][name] = bytes;
    for (const auto& m : rows)
      j["results"].push_back({{"mode", m.mode}, {"decode_tokens_per_second", m.decode_tps}, {"draft_tokens", m.drafted},
                              {"accepted_tokens", m.accepted}, {"same_tokens_as_plain", m.same_tokens}});
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("device: %s\nmodel: %s, prompt %lld tokens, %d generated, best of %d\n", device.c_str(), a.model.c_str(),
              (long long)prompt.size(), a.max_tokens, a.reps);
  std::printf("KV cache bytes per token (K and V, %lld layers):", (long long)t.num_layers);
  for (const auto& [name, bytes] : kv_types) std::printf(" %s %llu;", name.c_str(), (unsigned long long)bytes);
  std::printf("\n");
  std::printf("%-48s %12s %8s %8s %10s %6s\n", "mode", "decode tok/s", "drafted", "accepted", "acceptance", "same");
  for (const auto& m : rows)
    std::printf("%-48s %12.1f %8lld %8lld %9.0f%% %6s\n", m.mode.c_str(), m.decode_tps, (long long)m.drafted,
                (long long)m.accepted, m.drafted ? 100.0 * double(m.accepted) / double(m.drafted) : 0.0,
                m.same_tokens ? "yes" : "NO");
  return 0;
}

}  // namespace
}  // namespace vkvlm

int main(int argc, char** argv) {
  try {
    return vkvlm::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vkvlm-bench-generate: error: %s\n", e.what());
    return 1;
  }
}
