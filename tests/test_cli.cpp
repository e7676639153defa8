// The vkvlm command line as a user runs it: outputs checked against the reference fixtures and
// the demo model's answers, and every wrong input answered with one clear line and a non-zero
// exit code.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <thread>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <algorithm>
#include <sstream>

#include <nlohmann/json.hpp>

#include "host/image.h"
#include "vkvlm/vkvlm.h"
#include "host/safetensors.h"
#include "tests/fake_hub.h"
#include "tests/test_paths.h"
#include "tests/scratch_dir.h"

namespace vkvlm::test {
namespace {
namespace fs = std::filesystem;

struct CliRun {
  int rc = -1;
  std::string out, err;
};

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::string tmp(const std::string& name) {
  static std::string dir = [] {
    auto d = scratch_dir() / "cli";
    fs::create_directories(d);
    return d.string();
  }();
  return dir + "/" + name;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// env: "NAME=value " assignments put before the command.
CliRun vkvlm(const std::vector<std::string>& args, const std::string& stdin_data = "", const std::string& env = "") {
  std::string cmd = env + quote(VKVLM_CLI);
  for (auto& a : args) {
    cmd += ' ';
    cmd += quote(a);
  }
  std::ofstream(tmp("stdin"), std::ios::binary) << stdin_data;
  cmd += " < " + quote(tmp("stdin")) + " > " + quote(tmp("stdout")) + " 2> " + quote(tmp("stderr"));
  int status = std::system(cmd.c_str());
  CliRun r;
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = slurp(tmp("stdout"));
  r.err = slurp(tmp("stderr"));
  return r;
}

const std::string k_demo = VKVLM_SOURCE_DIR "/models/shapes-llava";

TEST(Cli, VersionHelpAndUnknownCommands) {
  // A command's --help shows that command's options, not the others'.
  const CliRun serve = vkvlm({"serve", "--help"});
  EXPECT_EQ(serve.rc, 0);
  EXPECT_NE(serve.out.find("--max-request-memory"), std::string::npos) << serve.out;
  EXPECT_NE(serve.out.find("--cors-origin"), std::string::npos) << serve.out;
  EXPECT_EQ(serve.out.find("--top-logits"), std::string::npos) << serve.out;
  EXPECT_EQ(serve.out.find("tokenize"), std::string::npos) << serve.out;
  const CliRun gen = vkvlm({"generate", "--help"});
  EXPECT_NE(gen.out.find("--max-kv-size"), std::string::npos) << gen.out;
  EXPECT_EQ(gen.out.find("--max-request-memory"), std::string::npos) << gen.out;

  const CliRun v = vkvlm({"--version"});
  EXPECT_EQ(v.rc, 0);
  EXPECT_EQ(v.out, std::string("vkvlm ") + VKVLM_VERSION_STRING + "\n");
  const CliRun u = vkvlm({"summon"});
  EXPECT_EQ(u.rc, 2);
  for (const char* cmd : {"generate", "chat", "serve", "cache-prompt", "render-template", "tokenize", "info", "download",
                          "models", "devices"})
    EXPECT_NE(u.err.find(cmd), std::string::npos) << cmd << " missing from: " << u.err;
}

TEST(Cli, GenerateOnTheBundledDemoModelByDefault) {
  CliRun r = vkvlm({"generate", "--image", k_demo + "/examples/shapes_0.png", "--prompt", "Where is the orange square?"});
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(r.out, "It is on the right.\n");
}

TEST(Cli, GenerateJsonMatchesTheReference) {
  const std::string model = fixtures_dir() + "/llava15-f16";
  CliRun r = vkvlm({"generate", "--model", model, "--prompt", "Write a haiku about GPUs. Ünïcødé: 你好 🤗", "--max-tokens", "12",
                 "--ignore-eos", "--json", "--top-logits", "5"});
  ASSERT_EQ(r.rc, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  auto exp = TensorStore::open_file(model + "/expected.safetensors");
  auto ids = exp.get("text_only.input_ids").to_f32();
  EXPECT_EQ(j["prompt_tokens"].get<std::vector<int>>(), std::vector<int>(ids.begin(), ids.end()));
  auto greedy = exp.get("text_only.greedy_ids").to_f32();
  auto top10 = exp.get("text_only.top10_logits").to_f32();
  auto top10_ids = exp.get("text_only.top10_ids").to_f32();
  ASSERT_EQ(j["tokens"].size(), 12u);
  for (size_t s = 0; s < 12; ++s) {
    if (top10[s * 10] - top10[s * 10 + 1] < 0.05f) break;
    EXPECT_EQ(j["tokens"][s].get<int>(), int(greedy[s])) << "step " << s;
  }
  EXPECT_EQ(j["finish_reason"], "length");
  EXPECT_TRUE(j["text"].is_string());
  EXPECT_GT(j["timings"]["prefill_tokens_per_second"].get<double>(), 0);
  EXPECT_GT(j["timings"]["decode_tokens_per_second"].get<double>(), 0);
  ASSERT_EQ(j["top_logits"].size(), 12u);
  // Step 0: the best raw logits, best first, as the reference computed them.
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(j["top_logits"][0][i][0].get<int>(), int(top10_ids[size_t(i)]));
    EXPECT_NEAR(j["top_logits"][0][i][1].get<double>(), top10[size_t(i)], 2e-2 * std::fabs(top10[0]));
  }
}

// generate --batch: prompts decoded together (3 at a time, so some join while others decode)
// answer exactly as each does alone with generate --json (tokens, text, finish and raw logits),
// in the file's order; a prompt that samples keeps its seed's answer.
TEST(Cli, BatchAnswersEachPromptAsItsOwnRunDoes) {
  const std::string ex = k_demo + "/examples/";
  struct Line {
    std::string json;
    std::vector<std::string> alone;  // the same prompt's generate arguments
  };
  const std::vector<Line> lines = {
      {R"({"id": "a", "prompt": "How many shapes are there?", "images": [")" + ex + R"(shapes_0.png"]})",
       {"--prompt", "How many shapes are there?", "--image", ex + "shapes_0.png"}},
      {R"({"prompt": "What color is the square?", "images": [")" + ex + R"(shapes_0.png"], "max_tokens": 3})",
       {"--prompt", "What color is the square?", "--image", ex + "shapes_0.png", "--max-tokens", "3"}},
      {R"({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
          "images": [")" + ex + R"(shapes_1.png"]})",
       {"--messages", tmp("batch-messages.json"), "--image", ex + "shapes_1.png"}},
      {R"({"prompt": "Hello there", "max_tokens": 10, "temperature": 0.8, "seed": 3})",
       {"--prompt", "Hello there", "--max-tokens", "10", "--temp", "0.8", "--seed", "3"}},
      {R"({"prompt": "What is in the picture?", "images": [")" + ex + R"(shapes_2.png"], "stop": "circle"})",
       {"--prompt", "What is in the picture?", "--image", ex + "shapes_2.png", "--stop", "circle"}},
  };
  std::ofstream(tmp("batch-messages.json"))
      << R"([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}])";
  {
    std::ofstream f(tmp("batch.jsonl"));
    for (const auto& l : lines) {
      std::string one = l.json;
      std::replace(one.begin(), one.end(), '\n', ' ');
      f << one << "\n\n";  // blank lines are skipped
    }
  }
  CliRun r = vkvlm({"generate", "--batch", tmp("batch.jsonl"), "--parallel", "3", "--top-logits", "2"});
  ASSERT_EQ(r.rc, 0) << r.err;
  std::istringstream out(r.out);
  std::string got;
  for (size_t i = 0; i < lines.size(); ++i) {
    SCOPED_TRACE(lines[i].json);
    ASSERT_TRUE(std::getline(out, got));
    const auto j = nlohmann::json::parse(got);
    std::vector<std::string> args = {"generate", "--json", "--top-logits", "2"};
    args.insert(args.end(), lines[i].alone.begin(), lines[i].alone.end());
    CliRun one = vkvlm(args);
    ASSERT_EQ(one.rc, 0) << one.err;
    const auto want = nlohmann::json::parse(one.out);
    EXPECT_EQ(j["index"], i);
    for (const char* key : {"prompt_tokens", "tokens", "text", "finish_reason", "top_logits"}) EXPECT_EQ(j[key], want[key]) << key;
  }
  EXPECT_FALSE(std::getline(out, got));
  EXPECT_EQ(nlohmann::json::parse(r.out.substr(0, r.out.find('\n')))["id"], "a");

  // Lines that cannot run are named before anything runs.
  std::ofstream(tmp("batch-bad.jsonl")) << R"({"prompt": "x"})" << "\n" << R"({"prompt": "x", "temprature": 1})" << "\n";
  CliRun bad = vkvlm({"generate", "--batch", tmp("batch-bad.jsonl")});
  EXPECT_EQ(bad.rc, 1);
  EXPECT_NE(bad.err.find("line 2"), std::string::npos) << bad.err;
  EXPECT_NE(bad.err.find("temprature"), std::string::npos) << bad.err;
  EXPECT_EQ(bad.out, "");
}

// --prompt with --image builds the image tags Phi-3-Vision's template expects.
// Speculative decoding from the command line: a model drafting for itself is accepted whole,
// prompt lookup drafts from the question it quotes, and both answer as plain decoding does.
TEST(Cli, DraftsChangeNothingButTheCounts) {
  const std::vector<std::string> base = {"generate", "--image", k_demo + "/examples/shapes_0.png", "--prompt",
                                         "What color is the square?", "--json"};
  CliRun plain = vkvlm(base);
  ASSERT_EQ(plain.rc, 0) << plain.err;
  const auto want = nlohmann::json::parse(plain.out);
  EXPECT_EQ(want["text"], "The square is orange.");
  EXPECT_FALSE(want.contains("draft_tokens"));
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = base;
    args.insert(args.end(), extra.begin(), extra.end());
    CliRun r = vkvlm(args);
    EXPECT_EQ(r.rc, 0) << r.err;
    return r.rc == 0 ? nlohmann::json::parse(r.out) : nlohmann::json::object();
  };
  const auto self = with({"--draft-model", k_demo, "--num-draft-tokens", "4"});
  EXPECT_EQ(self["tokens"], want["tokens"]);
  EXPECT_GT(self["draft_tokens"].get<int>(), 0);
  EXPECT_EQ(self["accepted_tokens"], self["draft_tokens"]) << "a model drafting for itself is always right";
  const auto lookup = with({"--lookup-ngram", "1"});
  EXPECT_EQ(lookup["tokens"], want["tokens"]);
  EXPECT_GT(lookup["draft_tokens"].get<int>(), 0) << "'square' occurs in the question";
  EXPECT_LE(lookup["accepted_tokens"].get<int>(), lookup["draft_tokens"].get<int>());
}

// --max-kv-size: a rotating cache lets the answer run past it (a plain context of that size
// stops there), and begins as the plain cache does.
TEST(Cli, RotatingCacheAnswersPastItsSize) {
  const std::vector<std::string> base = {"generate", "--prompt", "What color is the square?", "--max-tokens", "30",
                                         "--ignore-eos", "--json"};
  auto run = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = base;
    args.insert(args.end(), extra.begin(), extra.end());
    CliRun r = vkvlm(args);
    EXPECT_EQ(r.rc, 0) << r.err;
    return r.rc == 0 ? nlohmann::json::parse(r.out) : nlohmann::json::object();
  };
  const auto plain = run({"--ctx", "24"});
  const auto rotating = run({"--max-kv-size", "24"});
  const size_t prompt = rotating["prompt_tokens"].size();
  ASSERT_LT(prompt, 20u);
  EXPECT_EQ(plain["tokens"].size(), 24 - prompt) << "a plain context stops at its size";
  EXPECT_EQ(rotating["tokens"].size(), 30u);
  EXPECT_EQ(rotating["finish_reason"], "length");
  for (size_t i = 0; i < plain["tokens"].size(); ++i) EXPECT_EQ(rotating["tokens"][i], plain["tokens"][i]) << i;
}

// --kv-bits: the demo model answers as with the f16 cache (its margins are wide), from a cache
// of about half (8 bits) and a quarter (4 bits) of the bytes, which --json and info report.
TEST(Cli, QuantizedKvCacheAnswersFromFewerBytes) {
  const std::string img = k_demo + "/examples/shapes_1.png";
  auto run = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = {"generate", "--prompt", "Describe this image.", "--image", img, "--json", "--ctx", "256"};
    args.insert(args.end(), extra.begin(), extra.end());
    CliRun r = vkvlm(args);
    EXPECT_EQ(r.rc, 0) << r.err;
    return r.rc == 0 ? nlohmann::json::parse(r.out) : nlohmann::json::object();
  };
  const auto plain = run({});
  const auto q8 = run({"--kv-bits", "8"}), q4 = run({"--kv-bits", "4", "--kv-group-size", "32"});
  EXPECT_EQ(plain["text"], "An orange circle at the top left and a black circle at the bottom.");
  EXPECT_EQ(q8["text"], plain["text"]);
  EXPECT_EQ(q4["text"], plain["text"]);
  // 4 layers x K and V x 256 rows x 128 values: 2 bytes each; 8 bits + an f16 scale and bias
  // per 64; 4 bits + the same per 32.
  const int64_t values = 4 * 2 * 256 * 128;
  EXPECT_EQ(plain["kv_cache"]["format"], "f16");
  EXPECT_EQ(plain["kv_cache"]["bytes"].get<int64_t>(), values * 2);
  EXPECT_EQ(q8["kv_cache"]["format"], "q8 group 64");
  EXPECT_EQ(q8["kv_cache"]["bytes"].get<int64_t>(), values + values / 64 * 4);
  EXPECT_EQ(q4["kv_cache"]["format"], "q4 group 32");
  EXPECT_EQ(q4["kv_cache"]["bytes"].get<int64_t>(), values / 2 + values / 32 * 4);
  CliRun info = vkvlm({"info", "--ctx", "256", "--kv-bits", "4", "--kv-group-size", "32"});
  ASSERT_EQ(info.rc, 0) << info.err;
  for (const char* w : {"KV cache: ", "(q4 group 32; 640 bytes per token)", "KV cache per setting", "f16 ", "q8 group 64 ",
                        "q4 group 32 "})
    EXPECT_NE(info.out.find(w), std::string::npos) << w << " in\n" << info.out;
}

// A model named by repo id that the cache lacks is downloaded from HF_ENDPOINT (here a local
// fake hub serving the demo model) into HF_HUB_CACHE, then answers; `vkvlm download` fetches
// without running; HF_HUB_OFFLINE=1 keeps off the network; hub errors are one clear line.
TEST(Cli, ModelsAreDownloadedFromTheHub) {
  FakeHub hub;
  hub.add("vkvlm/shapes-llava", k_demo, "5a9e5a9e5a9e5a9e5a9e5a9e5a9e5a9e5a9e5a9e");
  const std::string cache = tmp("download-hub");
  fs::remove_all(cache);
  const std::string env = "HF_ENDPOINT=" + hub.endpoint() + " HF_HUB_CACHE=" + cache + " HF_HUB_OFFLINE= HF_TOKEN= ";
  const std::string img = k_demo + "/examples/shapes_1.png";
  const std::vector<std::string> ask = {"generate", "--model", "vkvlm/shapes-llava", "--prompt", "Describe this image.",
                                        "--image", img};
  CliRun off = vkvlm(ask, "", env + "HF_HUB_OFFLINE=1 ");
  EXPECT_EQ(off.rc, 1);
  EXPECT_NE(off.err.find("HF_HUB_OFFLINE"), std::string::npos) << off.err;
  EXPECT_EQ(hub.requests(), 0);
  CliRun r = vkvlm(ask, "", env);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(r.out, "An orange circle at the top left and a black circle at the bottom.\n");
  EXPECT_NE(r.err.find("downloading vkvlm/shapes-llava from " + hub.endpoint()), std::string::npos) << r.err;
  const std::string snapshot = cache + "/models--vkvlm--shapes-llava/snapshots/5a9e5a9e5a9e5a9e5a9e5a9e5a9e5a9e5a9e5a9e";
  EXPECT_TRUE(fs::is_symlink(snapshot + "/model.safetensors"));
  EXPECT_FALSE(fs::exists(snapshot + "/examples")) << "only what vkvlm reads";
  CliRun d = vkvlm({"download", "vkvlm/shapes-llava"}, "", env);
  ASSERT_EQ(d.rc, 0) << d.err;
  EXPECT_EQ(d.out, snapshot + "\n");
  EXPECT_NE(d.err.find("0 file(s) downloaded"), std::string::npos) << d.err;
  CliRun missing = vkvlm({"download", "vkvlm/no-such-model"}, "", env);
  EXPECT_EQ(missing.rc, 1);
  EXPECT_EQ(std::count(missing.err.begin(), missing.err.end(), '\n'), 1) << missing.err;
  EXPECT_NE(missing.err.find("no repository vkvlm/no-such-model"), std::string::npos) << missing.err;
  CliRun usage = vkvlm({"download"}, "", env);
  EXPECT_EQ(usage.rc, 2);
  EXPECT_NE(usage.err.find("ORG/NAME"), std::string::npos) << usage.err;
}

// vkvlm models: every known repo id with an architecture vkvlm runs, checked against the fixture
// of the same layout (its config's model_type, and MLX quantization where the entry says MLX),
// and whether the cache holds it.
TEST(Cli, KnownModelsMatchTheFixturesOfTheirLayout) {
  const std::string cache = tmp("models-cache");
  fs::remove_all(cache);
  CliRun r = vkvlm({"models", "--json"}, "", "HF_HUB_CACHE=" + cache + " ");
  ASSERT_EQ(r.rc, 0) << r.err;
  const auto list = nlohmann::json::parse(r.out);
  ASSERT_GE(list.size(), 8u);
  std::set<std::string> architectures;
  for (const auto& m : list) {
    SCOPED_TRACE(m.dump());
    const std::string repo = m["repo"];
    EXPECT_EQ(std::count(repo.begin(), repo.end(), '/'), 1);
    EXPECT_FALSE(m["prompt"].get<std::string>().empty());
    EXPECT_TRUE(m["cached"].is_null());
    architectures.insert(m["architecture"].get<std::string>());
    const std::string fixture = m["tested_with"];
    ASSERT_EQ(fixture.rfind("tests/data/fixtures/", 0), 0u);
    const auto config = nlohmann::json::parse(slurp(fixtures_dir() + "/" + fixture.substr(20) + "/config.json"));
    EXPECT_EQ(config["model_type"], m["architecture"]);
    const std::string weights = m["weights"];
    if (weights.rfind("MLX ", 0) == 0) {
      ASSERT_TRUE(config.contains("quantization"));
      EXPECT_EQ(weights, "MLX " + std::to_string(config["quantization"]["bits"].get<int>()) + "-bit, group " +
                             std::to_string(config["quantization"]["group_size"].get<int>()));
    } else {
      EXPECT_FALSE(config.contains("quantization"));
    }
  }
  EXPECT_EQ(architectures, (std::set<std::string>{"llava", "llava_next", "phi3_v", "qwen2_vl", "paligemma"}));
  CliRun text = vkvlm({"models"}, "", "HF_HUB_CACHE=" + cache + " ");
  ASSERT_EQ(text.rc, 0) << text.err;
  EXPECT_NE(text.out.find("mlx-community/Qwen2-VL-2B-Instruct-4bit"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("caption en"), std::string::npos) << text.out;
}

// A model named by its Hugging Face repo id, from a Hugging Face cache (HF_HUB_CACHE) whose
// snapshot links into blobs/ as huggingface_hub lays it out.
TEST(Cli, RepoIdsComeFromTheHuggingFaceCache) {
  const fs::path root = tmp("hub");
  const fs::path repo = root / "models--vkvlm--shapes-llava";
  const std::string commit = "c0ffee0000000000000000000000000000000001";
  fs::create_directories(repo / "blobs");
  fs::create_directories(repo / "refs");
  fs::create_directories(repo / "snapshots" / commit);
  for (const auto& e : fs::directory_iterator(k_demo)) {
    if (!e.is_regular_file()) continue;
    const std::string blob = "blob-" + e.path().filename().string();
    fs::copy_file(e.path(), repo / "blobs" / blob, fs::copy_options::overwrite_existing);
    fs::create_symlink("../../blobs/" + blob, repo / "snapshots" / commit / e.path().filename());
  }
  std::ofstream(repo / "refs" / "main") << commit;
  const std::string env = "HF_HUB_CACHE=" + root.string() + " ";
  CliRun r = vkvlm({"generate", "--model", "vkvlm/shapes-llava", "--image", k_demo + "/examples/shapes_0.png", "--prompt",
                    "Where is the orange square?"}, "", env);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(r.out, "It is on the right.\n");
  CliRun missing = vkvlm({"generate", "--model", "vkvlm/absent-model", "--prompt", "x"}, "", env + "HF_HUB_OFFLINE=1 ");
  EXPECT_EQ(missing.rc, 1);
  EXPECT_NE(missing.err.find("models--vkvlm--absent-model"), std::string::npos) << missing.err;
}

TEST(Cli, PromptWithImageOnPhi3VisionMatchesTheReferencePrompt) {
  const std::string model = fixtures_dir() + "/phi3v-long-bf16";
  CliRun r = vkvlm({"generate", "--model", model, "--image", fixtures_dir() + "/images/astronaut.png", "--prompt",
                    "What is shown in this image?", "--max-tokens", "1", "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  auto ids = TensorStore::open_file(model + "/expected.safetensors").get("describe.input_ids").to_f32();
  EXPECT_EQ(j["prompt_tokens"].get<std::vector<int>>(), std::vector<int>(ids.begin(), ids.end()));
}

// Every case of the Qwen2-VL and PaliGemma fixtures, run as a user runs it: the prompt ids, the
// first step's best logits and the greedy tokens (up to the reference's own near-ties) of
// `vkvlm generate --json` match the reference. PaliGemma's task prefix is --prompt; Qwen2-VL's
// cases give their messages (and template variables) as files.
class CliFixture : public testing::TestWithParam<std::pair<std::string, std::string>> {};

TEST_P(CliFixture, GenerateJsonMatchesTheReference) {
  const auto& [name, case_name] = GetParam();
  const std::string model = fixtures_dir() + "/" + name;
  auto cases = nlohmann::json::parse(slurp(model + "/cases.json"));
  nlohmann::json c;
  for (auto& x : cases["cases"])
    if (x["name"] == case_name) c = x;
  std::vector<std::string> args = {"generate", "--model", model, "--max-tokens", "12", "--ignore-eos", "--json", "--top-logits", "5"};
  for (auto& f : c["images"]) {
    args.push_back("--image");
    args.push_back(fixtures_dir() + "/images/" + f.get<std::string>());
  }
  if (c.contains("prefix")) {
    args.push_back("--prompt");
    args.push_back(c["prefix"].get<std::string>());
  } else {
    std::ofstream(tmp(case_name + ".json")) << c["messages"].dump();
    args.push_back("--messages");
    args.push_back(tmp(case_name + ".json"));
  }
  if (c.contains("template_kwargs")) {
    args.push_back("--chat-template-kwargs");
    args.push_back(c["template_kwargs"].dump());
  }
  CliRun r = vkvlm(args);
  ASSERT_EQ(r.rc, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  auto exp = TensorStore::open_file(model + "/expected.safetensors");
  auto as_ints = [&](const std::string& t) {
    auto v = exp.get(case_name + "." + t).to_f32();
    return std::vector<int>(v.begin(), v.end());
  };
  EXPECT_EQ(j["prompt_tokens"].get<std::vector<int>>(), as_ints("input_ids"));
  auto top10 = exp.get(case_name + ".top10_logits").to_f32();
  auto top10_ids = as_ints("top10_ids");
  for (int i = 0; i < 5; ++i) {
    if (i > 0 && top10[size_t(i - 1)] - top10[size_t(i)] < 0.05f) break;  // order among near-ties may differ
    EXPECT_EQ(j["top_logits"][0][i][0].get<int>(), top10_ids[size_t(i)]) << "rank " << i;
    EXPECT_NEAR(j["top_logits"][0][i][1].get<double>(), top10[size_t(i)], 2e-2 * std::fabs(top10[0])) << "rank " << i;
  }
  auto greedy = as_ints("greedy_ids");
  ASSERT_EQ(j["tokens"].size(), 12u);
  for (size_t s = 0; s < 12; ++s) {
    if (top10[s * 10] - top10[s * 10 + 1] < 0.05f) break;
    EXPECT_EQ(j["tokens"][s].get<int>(), greedy[s]) << "step " << s;
  }
}

std::vector<std::pair<std::string, std::string>> cli_fixture_cases() {
  std::vector<std::pair<std::string, std::string>> out;
  for (const char* m : {"qwen2vl-bf16", "qwen2vl-mlx4", "paligemma-bf16", "paligemma-mlx8"}) {
    const auto cases = nlohmann::json::parse(slurp(fixtures_dir() + "/" + m + "/cases.json"));
    for (auto& c : cases["cases"]) out.push_back({m, c["name"].get<std::string>()});
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CliFixture, testing::ValuesIn(cli_fixture_cases()), [](const auto& info) {
  return test_name(info.param.first + "_" + info.param.second);
});

// The image placeholders a model card writes in text take the --image files: Phi-3-Vision's
// documented "<|image_1|>\nWhat is shown in this image?" as a plain string gives the prompt the
// fixture's own messages give (and its reference ids).
TEST(Cli, DocumentedPlaceholderFormsTakeTheImages) {
  const std::string phi = fixtures_dir() + "/phi3v-long-bf16";
  auto cases = nlohmann::json::parse(slurp(phi + "/cases.json"));
  nlohmann::json describe;
  for (auto& x : cases["cases"])
    if (x["name"] == "describe") describe = x;
  ASSERT_TRUE(describe["messages"][0]["content"].is_string());  // the fixture itself uses the string form
  std::ofstream(tmp("phi.json")) << describe["messages"].dump();
  CliRun r = vkvlm({"generate", "--model", phi, "--messages", tmp("phi.json"), "--image",
                    fixtures_dir() + "/images/" + describe["images"][0].get<std::string>(), "--max-tokens", "1", "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  auto ids = TensorStore::open_file(phi + "/expected.safetensors").get("describe.input_ids").to_f32();
  EXPECT_EQ(nlohmann::json::parse(r.out)["prompt_tokens"].get<std::vector<int>>(), std::vector<int>(ids.begin(), ids.end()));
  // LLaVA's "<image>" in text, and an image part that carries the image of a placeholder: the
  // demo model answers as with an image part.
  const std::string img = k_demo + "/examples/shapes_1.png";
  std::ofstream(tmp("llava.json")) << R"([{"role": "user", "content": "<image>\nDescribe this image."}])";
  CliRun a = vkvlm({"generate", "--messages", tmp("llava.json"), "--image", img});
  ASSERT_EQ(a.rc, 0) << a.err;
  EXPECT_EQ(a.out, "An orange circle at the top left and a black circle at the bottom.\n");
  std::ofstream(tmp("carry.json"))
      << R"([{"role": "user", "content": [{"type": "text", "text": "<image>\nDescribe this image."}, {"type": "image"}]}])";
  CliRun b = vkvlm({"generate", "--messages", tmp("carry.json"), "--image", img});
  ASSERT_EQ(b.rc, 0) << b.err;
  EXPECT_EQ(b.out, a.out);
  // Too few images for the placeholders: one line naming both counts.
  CliRun c = vkvlm({"generate", "--messages", tmp("phi.json"), "--model", phi});
  EXPECT_EQ(c.rc, 1);
  EXPECT_NE(c.err.find("--image gave 0 image(s), but the conversation has 0 {\"type\": \"image\"} part(s) and 1 image placeholder(s)"),
            std::string::npos)
      << c.err;
}

TEST(Cli, MessagesFileWithImagePartsAndDataUrls) {
  const std::string img = k_demo + "/examples/shapes_1.png";
  std::ifstream in(img, std::ios::binary);
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), {});
  const std::string url = "data:image/png;base64," + base64_encode(bytes);
  nlohmann::json by_part = nlohmann::json::array(
      {{{"role", "user"}, {"content", {{{"type", "image"}}, {{"type", "text"}, {"text", "Describe this image."}}}}}});
  std::ofstream(tmp("part.json")) << by_part.dump();
  CliRun a = vkvlm({"generate", "--messages", tmp("part.json"), "--image", img});
  ASSERT_EQ(a.rc, 0) << a.err;
  EXPECT_EQ(a.out, "An orange circle at the top left and a black circle at the bottom.\n");
  nlohmann::json by_url = nlohmann::json::array(
      {{{"role", "user"},
        {"content", {{{"type", "image_url"}, {"image_url", {{"url", url}}}}, {{"type", "text"}, {"text", "Describe this image."}}}}}});
  std::ofstream(tmp("url.json")) << by_url.dump();
  CliRun b = vkvlm({"generate", "--messages", tmp("url.json")});
  ASSERT_EQ(b.rc, 0) << b.err;
  EXPECT_EQ(b.out, a.out);
}

TEST(Cli, ChatKeepsTheConversation) {
  const std::string img = k_demo + "/examples/shapes_1.png";
  CliRun r = vkvlm({"chat"}, "/image " + img + "\nDescribe this image.\nHow many shapes are there?\n/exit\n");
  ASSERT_EQ(r.rc, 0) << r.err;
  // The second answer is the one for the whole conversation, as generate gives it.
  nlohmann::json conv = nlohmann::json::array(
      {{{"role", "user"}, {"content", {{{"type", "image"}}, {{"type", "text"}, {"text", "Describe this image."}}}}},
       {{"role", "assistant"},
        {"content", {{{"type", "text"}, {"text", "An orange circle at the top left and a black circle at the bottom."}}}}},
       {{"role", "user"}, {"content", {{{"type", "text"}, {"text", "How many shapes are there?"}}}}}});
  std::ofstream(tmp("conv.json")) << conv.dump();
  CliRun g = vkvlm({"generate", "--messages", tmp("conv.json"), "--image", img});
  ASSERT_EQ(g.rc, 0) << g.err;
  EXPECT_EQ(r.out, "An orange circle at the top left and a black circle at the bottom.\n" + g.out);
}

// The chat commands: /help lists them, an unknown one is not sent to the model, // sends one
// /, /clear starts again, /save writes a prompt cache that a later chat continues.
TEST(Cli, ChatCommands) {
  const std::string img = k_demo + "/examples/shapes_1.png";
  fs::remove(tmp("chat.cache"));
  CliRun r = vkvlm({"chat"}, "/help\n/bogus now\n/save\n/image " + img + "\nDescribe this image.\n/save " + tmp("chat.cache") +
                                 "\n/clear\n//help\n/exit\n");
  ASSERT_EQ(r.rc, 0) << r.err;
  for (const char* cmd : {"/image PATH", "/save FILE", "/clear", "/help", "/exit"})
    EXPECT_NE(r.err.find(cmd), std::string::npos) << cmd << " missing from the help: " << r.err;
  EXPECT_NE(r.err.find("unknown command /bogus"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("/save takes the file"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("(saved "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("(conversation cleared)"), std::string::npos) << r.err;
  // Two answers: the image's description, then one to "/help" sent as a message.
  EXPECT_EQ(r.out.rfind("An orange circle at the top left and a black circle at the bottom.\n", 0), 0u) << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 2) << r.out;
  // The saved conversation continues in another process.
  CliRun c = vkvlm({"chat", "--prompt-cache", tmp("chat.cache"), "--image", img}, "How many shapes are there?\n/exit\n");
  ASSERT_EQ(c.rc, 0) << c.err;
  EXPECT_NE(c.err.find("continuing the cached conversation"), std::string::npos) << c.err;
  EXPECT_NE(c.err.find("2 message(s)"), std::string::npos) << c.err;
  EXPECT_FALSE(c.out.empty());
}

// A prompt cache written by one process and continued by others: generate answers as without
// it (same tokens, logits within 1e-3) and computes only the rows after the cache; chat resumes
// the cached conversation; a cache of another model is refused.
TEST(Cli, PromptCacheAcrossProcesses) {
  const std::string model = fixtures_dir() + "/llava15-f16";
  const std::string img = fixtures_dir() + "/images/astronaut.png";
  nlohmann::json conv = nlohmann::json::array(
      {{{"role", "user"}, {"content", {{{"type", "image"}}, {{"type", "text"}, {"text", "What is shown in this image?"}}}}}});
  std::ofstream(tmp("cached.json")) << conv.dump();
  CliRun c = vkvlm({"cache-prompt", "--model", model, "--messages", tmp("cached.json"), "--image", img, "--out", tmp("llava.cache")});
  ASSERT_EQ(c.rc, 0) << c.err;
  long long rows = 0;
  ASSERT_EQ(std::sscanf(c.out.c_str(), "cached %lld prompt tokens", &rows), 1) << c.out;
  EXPECT_NE(c.out.find("1 image(s)"), std::string::npos) << c.out;
  const std::vector<std::string> run = {"generate", "--model", model, "--messages", tmp("cached.json"), "--image", img,
                                        "--max-tokens", "8", "--ignore-eos", "--json", "--top-logits", "5"};
  CliRun plain = vkvlm(run);
  ASSERT_EQ(plain.rc, 0) << plain.err;
  std::vector<std::string> with_cache = run;
  with_cache.insert(with_cache.end(), {"--prompt-cache", tmp("llava.cache")});
  CliRun cached = vkvlm(with_cache);
  ASSERT_EQ(cached.rc, 0) << cached.err;
  EXPECT_TRUE(cached.err.empty()) << cached.err;
  const auto want = nlohmann::json::parse(plain.out), got = nlohmann::json::parse(cached.out);
  EXPECT_EQ(got["tokens"], want["tokens"]);
  EXPECT_EQ(got["timings"]["cached_prompt_tokens"].get<long long>(), rows);
  EXPECT_EQ(got["timings"]["computed_prompt_tokens"].get<long long>(), (long long)want["prompt_tokens"].size() - rows);
  EXPECT_EQ(want["timings"]["cached_prompt_tokens"].get<long long>(), 0);
  for (size_t i = 0; i < want["top_logits"].size(); ++i)
    for (size_t k = 0; k < want["top_logits"][i].size(); ++k) {
      EXPECT_EQ(got["top_logits"][i][k][0], want["top_logits"][i][k][0]);
      EXPECT_NEAR(got["top_logits"][i][k][1].get<double>(), want["top_logits"][i][k][1].get<double>(), 1e-3);
    }
  // A conversation that leaves the cached one is computed from where they part, and says so.
  CliRun other = vkvlm({"generate", "--model", model, "--prompt", "Hello", "--max-tokens", "2", "--prompt-cache", tmp("llava.cache")});
  EXPECT_EQ(other.rc, 0) << other.err;
  EXPECT_NE(other.err.find("shares only"), std::string::npos) << other.err;
  // Another model's cache, and a broken file: one clear line each.
  CliRun foreign = vkvlm({"generate", "--prompt", "x", "--prompt-cache", tmp("llava.cache")});
  EXPECT_EQ(foreign.rc, 1);
  EXPECT_NE(foreign.err.find("another model"), std::string::npos) << foreign.err;
  std::ofstream(tmp("broken.cache")) << "not a cache";
  CliRun broken = vkvlm({"generate", "--prompt", "x", "--prompt-cache", tmp("broken.cache")});
  EXPECT_EQ(broken.rc, 1);
  EXPECT_NE(broken.err.find("broken.cache"), std::string::npos) << broken.err;
  EXPECT_EQ(vkvlm({"cache-prompt", "--prompt", "x"}).rc, 2) << "--out is required";
  // What is wrong is said as it is: a missing cache is a prompt cache (not a weights file), a
  // folder given to --out is a folder, and a cache too long for a rotating cache names its flag.
  CliRun missing = vkvlm({"generate", "--prompt", "x", "--prompt-cache", tmp("nope.cache")});
  EXPECT_EQ(missing.rc, 1);
  EXPECT_NE(missing.err.find("prompt cache"), std::string::npos) << missing.err;
  EXPECT_EQ(missing.err.find("weights"), std::string::npos) << missing.err;
  fs::create_directories(tmp("cache-folder"));
  CliRun folder = vkvlm({"cache-prompt", "--prompt", "x", "--out", tmp("cache-folder")});
  EXPECT_EQ(folder.rc, 1);
  EXPECT_NE(folder.err.find("is a folder"), std::string::npos) << folder.err;
  EXPECT_EQ(folder.err.find("Success"), std::string::npos) << folder.err;
  CliRun small = vkvlm({"generate", "--model", model, "--prompt", "Hi", "--max-tokens", "2", "--max-kv-size", "12",
                        "--prompt-cache", tmp("llava.cache")});
  EXPECT_EQ(small.rc, 1);
  EXPECT_NE(small.err.find("cannot continue it (raise --max-kv-size)"), std::string::npos) << small.err;
  EXPECT_EQ(small.err.find("--ctx"), std::string::npos) << small.err;

  // chat resumes the cached conversation (a described image), its image from --image.
  const std::string shapes = k_demo + "/examples/shapes_1.png";
  nlohmann::json described = nlohmann::json::array(
      {{{"role", "user"}, {"content", {{{"type", "image"}}, {{"type", "text"}, {"text", "Describe this image."}}}}},
       {{"role", "assistant"},
        {"content", {{{"type", "text"}, {"text", "An orange circle at the top left and a black circle at the bottom."}}}}}});
  std::ofstream(tmp("described.json")) << described.dump();
  ASSERT_EQ(vkvlm({"cache-prompt", "--messages", tmp("described.json"), "--image", shapes, "--out", tmp("demo.cache")}).rc, 0);
  CliRun chat = vkvlm({"chat", "--prompt-cache", tmp("demo.cache"), "--image", shapes, "--verbose"},
                      "How many shapes are there?\n/exit\n");
  ASSERT_EQ(chat.rc, 0) << chat.err;
  described.push_back({{"role", "user"}, {"content", "How many shapes are there?"}});
  std::ofstream(tmp("asked.json")) << described.dump();
  CliRun g = vkvlm({"generate", "--messages", tmp("asked.json"), "--image", shapes});
  ASSERT_EQ(g.rc, 0) << g.err;
  EXPECT_EQ(chat.out, g.out);
  EXPECT_NE(chat.err.find("continuing the cached conversation"), std::string::npos) << chat.err;
  EXPECT_EQ(chat.err.find("(0 from the cache)"), std::string::npos) << chat.err;
  CliRun no_image = vkvlm({"chat", "--prompt-cache", tmp("demo.cache")}, "/exit\n");
  EXPECT_EQ(no_image.rc, 1);
  EXPECT_NE(no_image.err.find("--image"), std::string::npos) << no_image.err;
}

// A `vkvlm chat` process driven through pipes, with signals, as a terminal user drives it.
class ChatProcess {
 public:
  explicit ChatProcess(const std::vector<std::string>& args) {
    int in[2], out[2], err[2];
    EXPECT_EQ(::pipe(in), 0);
    EXPECT_EQ(::pipe(out), 0);
    EXPECT_EQ(::pipe(err), 0);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(in[0], 0);
      ::dup2(out[1], 1);
      ::dup2(err[1], 2);
      for (int fd : {in[0], in[1], out[0], out[1], err[0], err[1]}) ::close(fd);
      std::vector<char*> argv{const_cast<char*>(VKVLM_CLI)};
      for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      ::execv(VKVLM_CLI, argv.data());
      ::_exit(127);
    }
    ::close(in[0]);
    ::close(out[1]);
    ::close(err[1]);
    in_ = in[1];
    out_ = out[0];
    err_ = err[0];
  }
  ~ChatProcess() {
    if (pid_ > 0 && !exited_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    for (int fd : {in_, out_, err_}) ::close(fd);
  }
  void type(const std::string& s) { EXPECT_EQ(::write(in_, s.data(), s.size()), ssize_t(s.size())); }
  void interrupt() { ::kill(pid_, SIGINT); }
  // Reads until `done` holds (or the time runs out); false on timeout.
  bool read_until(const std::function<bool()>& done, int seconds = 180) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
    while (!done()) {
      if (std::chrono::steady_clock::now() > until) return false;
      pollfd fds[2] = {{out_, POLLIN, 0}, {err_, POLLIN, 0}};
      if (::poll(fds, 2, 100) <= 0) continue;
      char buf[4096];
      for (int i = 0; i < 2; ++i)
        if (fds[i].revents & (POLLIN | POLLHUP)) {
          ssize_t n = ::read(fds[i].fd, buf, sizeof(buf));
          if (n > 0) (i ? err : out).append(buf, size_t(n));
          else if (n == 0 && (fds[0].revents & POLLHUP) && (fds[1].revents & POLLHUP)) return done();
        }
    }
    return true;
  }
  // The exit code, or -1 when it has not exited within `seconds`.
  int wait_exit(int seconds = 30) {
    for (int i = 0; i < seconds * 10; ++i) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        exited_ = true;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      read_until([] { return true; }, 0);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return -1;
  }
  std::string out, err;

 private:
  pid_t pid_ = -1;
  int in_ = -1, out_ = -1, err_ = -1;
  bool exited_ = false;
};

size_t count_of(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

// Ctrl-C during a reply stops that reply, not the process; the conversation goes on with the
// stopped reply in it (the next prompt holds both turns and reuses the cached rows); a second
// Ctrl-C at the prompt exits.
TEST(Cli, ChatCtrlCStopsTheReplyAndKeepsTheConversation) {
  ChatProcess chat({"chat", "--image", k_demo + "/examples/shapes_1.png", "--max-tokens", "1000", "--ignore-eos", "--verbose"});
  chat.type("Describe this image.\n");
  ASSERT_TRUE(chat.read_until([&] { return chat.out.size() >= 12; })) << chat.err;
  chat.interrupt();
  ASSERT_TRUE(chat.read_until([&] { return count_of(chat.err, "generated ") == 1; })) << chat.err;
  EXPECT_EQ(count_of(chat.err, "(reply stopped)"), 1u) << chat.err;
  const size_t first_reply_end = chat.out.size();
  chat.type("How many shapes are there?\n");
  ASSERT_TRUE(chat.read_until([&] { return chat.out.size() >= first_reply_end + 12; })) << chat.err;
  chat.interrupt();
  ASSERT_TRUE(chat.read_until([&] { return count_of(chat.err, "generated ") == 2; })) << chat.err;
  EXPECT_EQ(count_of(chat.err, "(reply stopped)"), 2u) << chat.err;

  // "prompt P tokens (C from the cache), generated G tokens, finish: cancelled", per turn.
  std::vector<long> prompt, cached, generated;
  std::istringstream lines(chat.err);
  for (std::string l; std::getline(lines, l);) {
    long p = 0, c = 0, g = 0;
    if (std::sscanf(l.c_str(), "prompt %ld tokens (%ld from the cache), generated %ld tokens", &p, &c, &g) == 3) {
      prompt.push_back(p);
      cached.push_back(c);
      generated.push_back(g);
      EXPECT_NE(l.find("finish: cancelled"), std::string::npos) << l;
    }
  }
  ASSERT_EQ(prompt.size(), 2u) << chat.err;
  EXPECT_LT(generated[0], 1000);  // stopped, not run to --max-tokens
  EXPECT_GT(prompt[1], prompt[0] + generated[0]);  // the second prompt holds the first turn and its stopped reply
  EXPECT_GE(cached[1], prompt[0]);                  // whose rows came from the cache

  chat.interrupt();
  ASSERT_TRUE(chat.read_until([&] { return chat.err.find("Ctrl-C again") != std::string::npos; })) << chat.err;
  chat.interrupt();
  EXPECT_EQ(chat.wait_exit(), 0) << chat.err;
}

TEST(Cli, TokenizeReadsStdinByteForByte) {
  const std::string dir = fixtures_dir() + "/tokenizers/";
  std::ifstream g(dir + "sp-bpe.golden.json");
  auto golden = nlohmann::json::parse(g);
  for (auto& c : golden["cases"]) {
    const std::string text = c["text"];
    if (text != "  leading and trailing  " && text != "\n" && text != "hello\nworld") continue;
    CliRun with = vkvlm({"tokenize", "--tokenizer", dir + "sp-bpe.tokenizer.json", "--json"}, text);
    ASSERT_EQ(with.rc, 0) << with.err;
    EXPECT_EQ(nlohmann::json::parse(with.out), c["ids_with_special"]);
    CliRun without = vkvlm({"tokenize", "--tokenizer", dir + "sp-bpe.tokenizer.json", "--json", "--no-special"}, text);
    EXPECT_EQ(nlohmann::json::parse(without.out), c["ids"]);
  }
  CliRun human = vkvlm({"tokenize", "--model", k_demo, "--text", "A red circle."});
  ASSERT_EQ(human.rc, 0) << human.err;
  EXPECT_NE(human.out.find("\t"), std::string::npos);
}

TEST(Cli, InfoAndDevices) {
  CliRun info = vkvlm({"info", "--model", fixtures_dir() + "/llava15-mlx4"});
  ASSERT_EQ(info.rc, 0) << info.err;
  for (const char* w : {"llava", "q4 group 64", "KV cache", "vision tower", "memory needed"})
    EXPECT_NE(info.out.find(w), std::string::npos) << w << " in\n" << info.out;
  // The architecture, its processor and how many image tokens an image takes.
  CliRun qwen = vkvlm({"info", "--model", fixtures_dir() + "/qwen2vl-mlx4"});
  ASSERT_EQ(qwen.rc, 0) << qwen.err;
  for (const char* w : {"architecture: qwen2_vl", "M-RoPE sections 4 6 6", "Qwen2VLImageProcessor", "64 to 256 image tokens per image",
                        "2-D rotary", "q4 group 64"})
    EXPECT_NE(qwen.out.find(w), std::string::npos) << w << " in\n" << qwen.out;
  CliRun pali = vkvlm({"info", "--model", fixtures_dir() + "/paligemma-bf16"});
  ASSERT_EQ(pali.rc, 0) << pali.err;
  for (const char* w : {"architecture: paligemma", "prefix-LM", "gemma", "layers 0-1: global attention, GeGLU MLP",
                        "SiglipImageProcessor", "256 image tokens per image"})
    EXPECT_NE(pali.out.find(w), std::string::npos) << w << " in\n" << pali.out;
  CliRun dev = vkvlm({"devices"});
  ASSERT_EQ(dev.rc, 0) << dev.err;
  EXPECT_NE(dev.out.find("fp16="), std::string::npos);
  EXPECT_NE(dev.out.find("max_binding="), std::string::npos);
}

// `vkvlm render-template` prints what Jinja2 set up as transformers sets it up renders, byte for
// byte: every case of tests/data/jinja_golden.json (tools/jinja_golden.py) through --template
// and --context, and the model folders' own templates, rendered by transformers'
// apply_chat_template, through --model and --messages.
TEST(Cli, RenderTemplateMatchesJinja2ByteForByte) {
  std::ifstream in(test_data_dir() + "/jinja_golden.json");
  ASSERT_TRUE(in);
  const auto golden = nlohmann::ordered_json::parse(in);
  ASSERT_GT(golden["cases"].size(), 150u);
  ASSERT_GE(golden["model_cases"].size(), 24u);
  auto check = [](const nlohmann::ordered_json& c, const CliRun& r) {
    if (c.contains("error")) {
      EXPECT_EQ(r.rc, 1) << "Jinja2 raised " << c["error"];
      EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
      EXPECT_TRUE(r.out.empty()) << r.out;
    } else {
      ASSERT_EQ(r.rc, 0) << r.err;
      EXPECT_EQ(r.out, c["expected"].get<std::string>());
    }
  };
  for (auto& c : golden["cases"]) {
    SCOPED_TRACE(c["name"].get<std::string>());
    std::string tmpl = tmp("template.jinja");
    if (c.contains("template_file")) tmpl = test_data_dir() + "/chat_templates/" + c["template_file"].get<std::string>();
    else std::ofstream(tmpl, std::ios::binary) << c["template"].get<std::string>();
    std::ofstream(tmp("context.json"), std::ios::binary) << c["variables"].dump();
    check(c, vkvlm({"render-template", "--template", tmpl, "--context", tmp("context.json")}));
  }
  for (auto& c : golden["model_cases"]) {
    SCOPED_TRACE(c["name"].get<std::string>());
    std::ofstream(tmp("messages.json"), std::ios::binary) << c["messages"].dump();
    std::vector<std::string> args = {"render-template", "--model", test_data_dir() + "/" + c["model"].get<std::string>(),
                                     "--messages", tmp("messages.json")};
    if (!c["tools"].is_null()) {
      std::ofstream(tmp("tools.json"), std::ios::binary) << c["tools"].dump();
      args.insert(args.end(), {"--tools", tmp("tools.json")});
    }
    if (!c["add_generation_prompt"].get<bool>()) args.push_back("--no-generation-prompt");
    check(c, vkvlm(args));
  }
}

struct BadRun {
  std::vector<std::string> args;
  int rc;
  std::vector<const char*> words;
};

TEST(Cli, WrongInputsGetOneClearLine) {
  std::ofstream(tmp("notimage.png")) << "plain text";
  std::ofstream(tmp("bad.json")) << "[{\"role\": \"user\", \"content\": ";
  std::ofstream(tmp("remote.json")) << R"([{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://example.com/a.png"}},{"type":"text","text":"hi"}]}])";
  std::ofstream(tmp("noimage.json")) << R"([{"role":"user","content":[{"type":"text","text":"hi"}]}])";
  std::ofstream(tmp("norole.jsonl")) << R"({"prompt": "hi"})" << "\n" << R"({"messages": [{"content": "hi"}]})" << "\n";
  // JSON nesting 100,000 levels deep (a batch line's "id", a messages file, template kwargs):
  // refused as it is read, before anything could walk it recursively.
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  std::ofstream(tmp("deep.jsonl")) << R"({"prompt": "hi"})" << "\n" << R"({"prompt": "hi", "id": )" << deep << "}\n";
  std::ofstream(tmp("deep.json")) << R"([{"role":"user","content":)" << deep << "}]";
  std::ofstream(tmp("turns.json")) << R"([{"role":"user","content":"caption en"},{"role":"assistant","content":"a cat"},
                                          {"role":"user","content":"caption es"}])";
  std::ofstream(tmp("model.gguf")) << "GGUF";
  const std::string pali = fixtures_dir() + "/paligemma-bf16";
  const std::string img = k_demo + "/examples/shapes_0.png";
  std::vector<BadRun> cases = {
      {{"generate", "--model", "/nonexistent/model", "--prompt", "x"}, 1, {"/nonexistent/model", "does not exist"}},
      {{"generate", "--model", tmp("model.gguf"), "--prompt", "x"}, 1, {"model.gguf", "GGUF file", "config.json", "ORG/NAME"}},
      {{"generate", "--model", "Qwen2-VL-2B-Instruct", "--prompt", "x"}, 1, {"did you mean the repository Qwen/Qwen2-VL-2B-Instruct"}},
      {{"generate", "--model", tmp(""), "--prompt", "x"}, 1, {"config.json"}},
      {{"generate", "--prompt", "x", "--temp", "hot"}, 2, {"--temp", "hot"}},
      {{"generate", "--prompt", "x", "--max-tokens", "-4"}, 2, {"--max-tokens"}},
      {{"generate", "--prompt", "x", "--top-p", "1.5"}, 2, {"--top-p"}},
      {{"generate", "--prompt", "x", "--bogus"}, 2, {"unknown option --bogus"}},
      {{"generate", "--prompt", "x", "--messages", tmp("bad.json")}, 2, {"exactly one of --prompt"}},
      {{"generate"}, 2, {"exactly one of --prompt"}},
      {{"generate", "--prompt", "x", "--image", tmp("missing.png")}, 1, {"missing.png", "does not exist"}},
      {{"generate", "--prompt", "x", "--image", tmp("notimage.png")}, 1, {"notimage.png", "not a supported image"}},
      {{"generate", "--messages", tmp("bad.json")}, 1, {"bad.json", "not valid JSON"}},
      {{"generate", "--messages", tmp("remote.json")}, 1, {"https://example.com/a.png", "fetches nothing"}},
      {{"generate", "--messages", tmp("noimage.json"), "--image", img}, 1, {"--image", "1", "0"}},
      {{"generate", "--prompt", "x", "--quantize", "q3"}, 2, {"--quantize", "q3"}},
      {{"generate", "--prompt", "x", "--chat-template-kwargs", "{nope"}, 2, {"--chat-template-kwargs", "not valid JSON"}},
      {{"generate", "--prompt", "x", "--chat-template-kwargs", "[1]"}, 2, {"--chat-template-kwargs", "JSON object"}},
      // PaliGemma has no chat template: one user turn, at most one image.
      {{"generate", "--model", pali, "--messages", tmp("turns.json")}, 1, {"PaliGemma", "one user turn", "3 message(s)"}},
      {{"generate", "--model", pali, "--prompt", "caption en", "--image", img, "--image", img}, 1, {"PaliGemma", "at most one image"}},
      {{"generate", "--prompt", "Describe every shape and every colour in great detail.", "--ctx", "8"}, 1, {"context of 8"}},
      {{"tokenize"}, 2, {"--model", "--tokenizer"}},
      {{"render-template", "--template", tmp("bad.json")}, 2, {"--template FILE --context FILE"}},
      {{"render-template", "--model", pali, "--messages", tmp("noimage.json")}, 1, {"paligemma-bf16", "has no chat template"}},
      {{"render-template", "--messages", tmp("noimage.json"), "--tools", tmp("bad.json")}, 1, {"tools file", "not valid JSON"}},
      {{"render-template", "--messages", tmp("noimage.json"), "--tools", tmp("noimage.json"), "--context", tmp("x")}, 2, {"either"}},
      {{"render-template", "--template", tmp("notimage.png"), "--context", tmp("noimage.json")}, 1, {"context file", "JSON object"}},
      {{"render-template", "--template", tmp("missing.j2"), "--context", tmp("noimage.json")}, 1, {"missing.j2"}},
      {{"generate", "--prompt", "x", "--image", "/dev/zero"}, 1, {"/dev/zero", "not a regular file"}},
      {{"tokenize", "--tokenizer", tmp("missing.json")}, 1, {"missing.json"}},
      {{"frobnicate"}, 2, {"unknown command 'frobnicate'"}},
      {{"generate", "--batch", tmp("bad.json")}, 1, {"bad.json", "line 1", "not valid JSON"}},
      {{"generate", "--batch", tmp("noimage.json")}, 1, {"noimage.json", "line 1", "JSON object"}},
      {{"generate", "--batch", tmp("deep.jsonl")}, 1, {"deep.jsonl", "line 2", "nest deeper than 256"}},
      {{"generate", "--messages", tmp("deep.json")}, 1, {"deep.json", "nest deeper than 256"}},
      {{"generate", "--prompt", "x", "--chat-template-kwargs", "{\"x\": " + deep.substr(99000, 2000) + "}"}, 2,
       {"--chat-template-kwargs", "nest deeper than 256"}},
      {{"generate", "--batch", tmp("missing.jsonl")}, 1, {"missing.jsonl"}},
      {{"generate", "--batch", tmp("norole.jsonl")}, 1, {"norole.jsonl", "line 2", "message 0", "\"role\" string"}},
      {{"generate", "--batch", tmp("noimage.json"), "--prompt", "x"}, 2, {"--batch", "--prompt"}},
      {{"generate", "--prompt", "x", "--parallel", "2"}, 2, {"--parallel", "--batch"}},
      {{"serve", "--config", tmp("bad.json"), "--port", "1"}, 1, {"server config", "bad.json", "not valid JSON"}},
      {{"generate", "--prompt", "x", "--draft-model", k_demo, "--lookup-ngram", "2"}, 2, {"--draft-model", "--lookup-ngram"}},
      {{"generate", "--prompt", "x", "--num-draft-tokens", "0"}, 2, {"--num-draft-tokens"}},
      {{"generate", "--prompt", "x", "--ctx", "64", "--max-kv-size", "32"}, 2, {"--ctx", "--max-kv-size"}},
      {{"generate", "--prompt", "Describe every shape and every colour in great detail.", "--max-kv-size", "8"}, 1,
       {"rotating KV cache of 8", "--max-kv-size"}},
      {{"generate", "--prompt", "x", "--lookup-ngram", "17"}, 2, {"--lookup-ngram"}},
      {{"generate", "--prompt", "x", "--kv-bits", "5"}, 2, {"--kv-bits", "4 or 8"}},
      {{"generate", "--prompt", "x", "--kv-group-size", "32"}, 2, {"--kv-group-size", "--kv-bits"}},
      {{"generate", "--prompt", "x", "--kv-bits", "8", "--kv-group-size", "48"}, 2, {"--kv-group-size", "32, 64 or 128"}},
      {{"info", "--model", pali, "--kv-bits", "8", "--kv-group-size", "64"}, 1, {"--kv-group-size 64", "head_dim 32"}},
      {{"generate", "--prompt", "x", "--draft-model", fixtures_dir() + "/qwen2vl-bf16"}, 1, {"draft", "vocabulary", "qwen2vl-bf16"}},
  };
  for (auto& c : cases) {
    std::string joined;
    for (auto& a : c.args) joined += a + " ";
    SCOPED_TRACE(joined);
    CliRun r = vkvlm(c.args);
    EXPECT_EQ(r.rc, c.rc) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line: " << r.err;
    for (auto* w : c.words) EXPECT_NE(r.err.find(w), std::string::npos) << "'" << w << "' missing from: " << r.err;
    EXPECT_TRUE(r.out.empty()) << r.out;
  }
}

}  // namespace
}  // namespace vkvlm::test
