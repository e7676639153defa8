// Speculative decoding on every fixture model: with a draft model (the quantized twin, a vision
// model of another architecture, or a small random text-only model with the same tokenizer that
// this test writes) and with prompt lookup, greedy tokens are identical to generating without a
// draft, and so are the raw logits of every step (the verification pass computes each row as a
// decode step does). Sampling keeps the model's distribution (the acceptance rule itself is
// tested in test_sampler.cpp; here, end to end against plain sampling).
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>

#include <nlohmann/json.hpp>

#include "base/numeric.h"
#include "tests/expect_error.h"
#include "tests/fixture_models.h"
#include "tests/scratch_dir.h"

namespace vkvlm::test {
namespace {
namespace fs = std::filesystem;

// A random Llama-shaped text model (2 layers, hidden 32) with `model`'s tokenizer and chat
// template, written once per process: a draft that shares the vocabulary but little else.
std::string random_text_draft(const std::string& model) {
  static std::map<std::string, std::string> written;
  auto& dir = written[model];
  if (!dir.empty()) return dir;
  dir = (scratch_dir() / ("draft-" + model)).string();
  fs::create_directories(dir);
  const std::string src = model_dir(model);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "chat_template.json", "special_tokens_map.json"})
    if (fs::exists(src + "/" + f)) fs::copy_file(src + "/" + f, dir + "/" + f, fs::copy_options::overwrite_existing);
  const int64_t V = fixture_model(model).config().text.vocab_size, E = 32, I = 64, Hd = 16;
  nlohmann::json cfg = {{"model_type", "llama"}, {"architectures", {"LlamaForCausalLM"}}, {"vocab_size", V},
                        {"hidden_size", E}, {"intermediate_size", I}, {"num_hidden_layers", 2},
                        {"num_attention_heads", 2}, {"num_key_value_heads", 1}, {"rms_norm_eps", 1e-5},
                        {"rope_theta", 10000.0}, {"max_position_embeddings", 4096}, {"tie_word_embeddings", false}};
  std::ofstream(dir + "/config.json") << cfg.dump();
  std::mt19937 rng(17);
  std::normal_distribution<float> nd(0.0f, 0.5f);
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  auto tensor = [&](const std::string& name, std::vector<int64_t> shape, bool ones = false) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    std::vector<uint16_t> h(static_cast<size_t>(n));
    for (auto& x : h) x = f32_to_f16(ones ? 1.0f : nd(rng));
    header[name] = {{"dtype", "F16"}, {"shape", shape}, {"data_offsets", {data.size(), data.size() + h.size() * 2}}};
    data.append(reinterpret_cast<const char*>(h.data()), h.size() * 2);
  };
  tensor("model.embed_tokens.weight", {V, E});
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    tensor(p + "input_layernorm.weight", {E}, true);
    tensor(p + "post_attention_layernorm.weight", {E}, true);
    tensor(p + "self_attn.q_proj.weight", {2 * Hd, E});
    tensor(p + "self_attn.k_proj.weight", {Hd, E});
    tensor(p + "self_attn.v_proj.weight", {Hd, E});
    tensor(p + "self_attn.o_proj.weight", {E, 2 * Hd});
    tensor(p + "mlp.gate_proj.weight", {I, E});
    tensor(p + "mlp.up_proj.weight", {I, E});
    tensor(p + "mlp.down_proj.weight", {E, I});
  }
  tensor("model.norm.weight", {E}, true);
  tensor("lm_head.weight", {V, E});
  const std::string h = header.dump();
  const uint64_t n = h.size();
  std::ofstream out(dir + "/model.safetensors", std::ios::binary);
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << h << data;
  return dir;
}

Model& draft_model(const std::string& dir) {
  gpu::Context& c = ctx();
  static std::map<std::string, std::unique_ptr<Model>> models;
  auto& m = models[dir];
  if (!m) m = std::make_unique<Model>(c, dir);
  return *m;
}

struct Pairing {
  std::string model, case_name, twin;  // twin: a fixture model to draft with ("" for none)
  bool text_draft = true;              // also a random text-only draft (needs a chat template)
};
void PrintTo(const Pairing& p, std::ostream* os) { *os << p.model; }

class SpeculativeGreedy : public testing::TestWithParam<Pairing> {};

TEST_P(SpeculativeGreedy, IsIdenticalToPlainDecoding) {
  const Pairing& pr = GetParam();
  Model& model = fixture_model(pr.model);
  const auto c = fixture_case(pr.model, pr.case_name);
  ASSERT_FALSE(c.is_null());
  const std::vector<Image> images = case_images(c);
  const Messages messages = case_messages(c);
  const Prompt prompt = model.build_prompt(messages, images);
  GenerationParams params;
  params.max_tokens = 12;
  params.ignore_eos = true;
  params.top_logits = 3;
  params.logprobs = true;
  const int64_t context = prompt.size() + 64;
  Session plain_session(model, context);
  const GenerationResult plain = plain_session.generate(prompt, params);
  ASSERT_EQ(plain.tokens.size(), 12u);

  auto expect_same = [&](const GenerationResult& r, const std::string& what) {
    SCOPED_TRACE(what);
    EXPECT_EQ(r.tokens, plain.tokens);
    EXPECT_EQ(r.text, plain.text);
    ASSERT_EQ(r.steps.size(), plain.steps.size());
    for (size_t i = 0; i < r.steps.size(); ++i) {
      EXPECT_EQ(r.steps[i].top_logits, plain.steps[i].top_logits) << "step " << i << ": raw logits differ";
      EXPECT_NEAR(r.steps[i].logprob, plain.steps[i].logprob, 1e-4) << "step " << i;
    }
    EXPECT_GT(r.draft_tokens, 0);
    EXPECT_LE(r.accepted_tokens, r.draft_tokens);
  };
  // Prompt lookup on unigrams. It drafts as soon as the token just chosen occurred before, in
  // the prompt's text or in what was generated (and a next token remains to verify).
  {
    GenerationParams lp = params;
    lp.lookup_ngram = 1;
    lp.num_draft_tokens = 4;
    Session s(model, context);
    const GenerationResult r = s.generate(prompt, lp);
    std::set<int32_t> seen;
    for (int64_t row = 0; row < prompt.size(); ++row) {
      bool image = false;
      for (const auto& span : prompt.spans) image |= row >= span.position && row < span.position + span.length;
      if (!image) seen.insert(prompt.ids[size_t(row)]);
    }
    bool repeats = false;
    for (size_t i = 0; i + 1 < plain.tokens.size(); ++i) {
      repeats |= seen.count(plain.tokens[i]) > 0;
      seen.insert(plain.tokens[i]);
    }
    SCOPED_TRACE("lookup");
    EXPECT_EQ(r.tokens, plain.tokens);
    EXPECT_EQ(r.draft_tokens > 0, repeats);
    ASSERT_EQ(r.steps.size(), plain.steps.size());
    for (size_t i = 0; i < r.steps.size(); ++i)
      EXPECT_EQ(r.steps[i].top_logits, plain.steps[i].top_logits) << "step " << i << ": raw logits differ";
  }
  // The twin drafts 3 tokens a round, the small text-only model 7.
  std::vector<std::pair<std::string, int>> drafts;
  if (!pr.twin.empty()) drafts.push_back({model_dir(pr.twin), 3});
  if (pr.text_draft) drafts.push_back({random_text_draft(pr.model), 7});
  for (const auto& [dir, d] : drafts) {
    Model& draft = draft_model(dir);
    check_draft_model(model, draft);
    const Prompt draft_prompt = draft.build_draft_prompt(messages, images);
    GenerationParams dp = params;
    dp.num_draft_tokens = d;
    Session s(model, context), ds(draft, context);
    expect_same(s.generate(prompt, dp, {}, {}, {&ds, &draft_prompt}), dir + " drafting " + std::to_string(d));
  }
  // A second turn in the same sessions reuses both caches and stays exact.
  if (model.has_chat_template() && !drafts.empty()) {
    Model& draft = draft_model(drafts.back().first);
    const Prompt draft_prompt = draft.build_draft_prompt(messages, images);
    Messages more = messages;
    more.push_back({{"role", "assistant"}, {"content", plain.text}});
    more.push_back({{"role", "user"}, {"content", "And then?"}});
    const Prompt p2 = model.build_prompt(more, images), dp2 = draft.build_draft_prompt(more, images);
    Session fresh(model, p2.size() + 64);
    const GenerationResult want = fresh.generate(p2, params);
    GenerationParams dp = params;
    dp.num_draft_tokens = drafts.back().second;
    Session s2(model, p2.size() + 64), ds2(draft, p2.size() + 64);
    (void)s2.generate(prompt, dp, {}, {}, {&ds2, &draft_prompt});
    const GenerationResult again = s2.generate(p2, dp, {}, {}, {&ds2, &dp2});
    EXPECT_GT(again.cached_tokens, 0);
    EXPECT_EQ(again.tokens, want.tokens) << "second turn";
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, SpeculativeGreedy,
                         // LLaVA-NeXT's and Phi-3-Vision's image prompts are thousands of
                         // rows: their text cases keep the suite short (the others draft
                         // with the images).
                         testing::Values(Pairing{"llava15-f16", "describe", "llava15-mlx4"},
                                         Pairing{"llavanext-bf16-legacy", "text_only", "llava15-mlx4"},
                                         Pairing{"phi3v-bf16", "text_only", "phi3v-long-bf16"},
                                         Pairing{"qwen2vl-bf16", "describe", "qwen2vl-mlx4"},
                                         Pairing{"qwen2vl-mlx4", "two_turns", "qwen2vl-bf16"},
                                         // PaliGemma has no chat template: no text-only draft.
                                         Pairing{"paligemma-bf16", "describe", "paligemma-mlx8", false},
                                         Pairing{"paligemma-mlx8", "describe", "", false}),
                         [](const auto& info) {
                           std::string n = info.param.model;
                           for (char& ch : n)
                             if (ch == '-') ch = '_';
                           return n;
                         });

TEST(Speculative, DraftsMustShareTheVocabulary) {
  Model& llava = fixture_model("llava15-f16");
  Model& qwen = fixture_model("qwen2vl-bf16");
  expect_error([&] { check_draft_model(llava, qwen); }, {"draft", "vocabulary", "llava15-f16", "qwen2vl-bf16"});
  GenerationParams p;
  p.num_draft_tokens = 0;
  expect_error([&] { p.validate(); }, {"num_draft_tokens"});
  p.num_draft_tokens = 3;
  p.lookup_ngram = 17;
  expect_error([&] { p.validate(); }, {"lookup_ngram"});
}

// Sampled tokens keep the model's distribution: the first two generated tokens of a random text
// model (top-k 4, so that 16 pairs hold all the mass), drafted by another random model, against
// plain sampling. The two empirical distributions of the pair must agree.
TEST(Speculative, SamplingKeepsTheModelsDistribution) {
  const std::string target_dir = random_text_draft("qwen2vl-bf16");
  Model& target = draft_model(target_dir);
  Model& draft = fixture_model("qwen2vl-mlx4");
  const Messages messages = Messages::array({{{"role", "user"}, {"content", "Count: one two three"}}});
  const Prompt prompt = target.build_prompt(messages, {});
  check_draft_model(target, draft);
  const Prompt draft_prompt = draft.build_draft_prompt(messages, {});
  GenerationParams params;
  params.max_tokens = 2;
  params.ignore_eos = true;
  params.sampling.temperature = 1.0f;
  params.sampling.top_k = 4;
  params.sampling.has_seed = true;
  params.num_draft_tokens = 2;
  const int runs = 300;
  std::map<std::pair<int32_t, int32_t>, int> plain_counts, spec_counts;
  Session s(target, prompt.size() + 16), ds(draft, draft_prompt.size() + 16);
  int64_t drafted = 0;
  for (int i = 0; i < runs; ++i) {
    params.sampling.seed = uint64_t(1000 + i);
    auto a = s.generate(prompt, params);
    ++plain_counts[{a.tokens[0], a.tokens[1]}];
    params.sampling.seed = uint64_t(5000 + i);
    auto b = s.generate(prompt, params, {}, {}, {&ds, &draft_prompt});
    ++spec_counts[{b.tokens[0], b.tokens[1]}];
    drafted += b.draft_tokens;
  }
  EXPECT_GT(drafted, 0);
  // Two-sample chi-square over the pairs seen (at most 16 cells): a wrong rule shifts mass by
  // far more than this allows.
  std::set<std::pair<int32_t, int32_t>> cells;
  for (auto& [k, v] : plain_counts) cells.insert(k);
  for (auto& [k, v] : spec_counts) cells.insert(k);
  EXPECT_LE(cells.size(), 16u);
  double chi2 = 0;
  for (auto& k : cells) {
    const double a = plain_counts[k], b = spec_counts[k];
    if (a + b > 0) chi2 += (a - b) * (a - b) / (a + b);
  }
  // 15 degrees of freedom: the 0.9999 quantile is about 44.
  EXPECT_LT(chi2, 44.0) << "speculative sampling drifts from plain sampling";
}

}  // namespace
}  // namespace vkvlm::test
