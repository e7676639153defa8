// Continuous batching (models/batch.h): eight generations of one model decoding together, with
// different prompt lengths, images, sequences joining and leaving between steps, give exactly
// what each gives on its own (tokens, text and the raw logits of every step), and their greedy
// tokens are the HF reference's (the fixtures' greedy_ids, up to the reference's own near-ties).
#include <gtest/gtest.h>

#include <memory>

#include "models/batch.h"
#include "tests/fixture_models.h"

namespace vkvlm::test {
namespace {

struct BatchCase {
  std::string model;
  KvFormat kv;
  bool rotating = false;
};
void PrintTo(const BatchCase& c, std::ostream* os) { *os << c.model << " " << c.kv.describe() << (c.rotating ? " rotating" : ""); }

class BatchedDecoding : public testing::TestWithParam<BatchCase> {};

TEST_P(BatchedDecoding, IsIdenticalToDecodingEachAlone) {
  const BatchCase& bc = GetParam();
  Model& model = fixture_model(bc.model);
  std::ifstream in(model_dir(bc.model) + "/cases.json");
  const auto cases = nlohmann::ordered_json::parse(in)["cases"];
  // Eight conversations from the model's cases (with images and without), with answers of
  // different lengths so that sequences leave the batch at different steps.
  struct Conversation {
    std::string case_name;
    Prompt prompt;
    GenerationParams params;
  };
  std::vector<Conversation> convs;
  for (size_t i = 0; convs.size() < 8; ++i) {
    const auto& c = cases[i % cases.size()];
    Conversation cv;
    cv.case_name = c["name"].get<std::string>();
    cv.prompt = model.build_prompt(case_messages(c), case_images(c), case_template_vars(c));
    cv.params.max_tokens = i < cases.size() ? 12 : int(3 + i);  // each case once at the reference's 12 steps
    cv.params.ignore_eos = true;
    cv.params.top_logits = 3;
    cv.params.logprobs = true;
    convs.push_back(std::move(cv));
  }
  int64_t longest = 0;
  for (const auto& cv : convs) longest = std::max(longest, cv.prompt.size());
  // A rotating cache small enough to wrap while decoding; otherwise room for every answer.
  const int64_t context = bc.rotating ? longest + 6 : longest + 16;

  std::vector<GenerationResult> alone;
  for (const auto& cv : convs) {
    Session s(model, context, bc.rotating, bc.kv);
    alone.push_back(s.generate(cv.prompt, cv.params));
  }

  std::vector<std::unique_ptr<Session>> sessions;
  for (size_t i = 0; i < convs.size(); ++i) sessions.push_back(std::make_unique<Session>(model, context, bc.rotating, bc.kv));
  DecodeBatch batch(model);
  std::vector<GenerationResult> together(convs.size());
  std::vector<int> streamed(convs.size(), 0);
  auto collect = [&] {
    for (auto& f : batch.take_finished()) together[f.tag] = std::move(f.result);
  };
  auto add = [&](size_t i) {
    batch.add(*sessions[i], convs[i].prompt, convs[i].params, i, [&streamed, i](const StepOutput&) {
      ++streamed[i];
      return true;
    });
  };
  // Half join at once; the rest join one by one while the others decode.
  for (size_t i = 0; i < 4; ++i) add(i);
  for (size_t i = 4; i < convs.size(); ++i) {
    batch.step();
    batch.step();
    add(i);
    EXPECT_LE(batch.size(), i + 1);
  }
  size_t guard = 0;
  while (batch.size() > 0 && guard++ < 64) batch.step();
  collect();
  EXPECT_EQ(batch.size(), 0u);

  const Expected exp(bc.model);
  for (size_t i = 0; i < convs.size(); ++i) {
    SCOPED_TRACE(convs[i].case_name + " #" + std::to_string(i));
    const GenerationResult &a = alone[i], &t = together[i];
    ASSERT_EQ(a.tokens.size(), size_t(convs[i].params.max_tokens));
    EXPECT_EQ(t.tokens, a.tokens);
    EXPECT_EQ(t.text, a.text);
    EXPECT_EQ(t.finish_reason, a.finish_reason);
    EXPECT_EQ(streamed[i], int(t.tokens.size()));
    ASSERT_EQ(t.steps.size(), a.steps.size());
    for (size_t s = 0; s < t.steps.size(); ++s) {
      EXPECT_EQ(t.steps[s].top_logits, a.steps[s].top_logits) << "step " << s << ": raw logits differ";
      EXPECT_EQ(t.steps[s].logprob, a.steps[s].logprob) << "step " << s;
    }
    // The reference's greedy answer (f16 caches that do not wrap: the fixtures' setting).
    if (bc.kv.quantized() || bc.rotating || convs[i].params.max_tokens != 12) continue;
    const std::string p = convs[i].case_name + ".";
    const auto greedy = exp.i32(p + "greedy_ids");
    const auto top10 = exp.f32(p + "top10_logits");
    for (size_t s = 0; s < greedy.size() && s < t.tokens.size(); ++s) {
      if (top10[s * 10] - top10[s * 10 + 1] < 0.05f) break;  // the reference itself nearly tied here
      EXPECT_EQ(t.tokens[s], greedy[s]) << "greedy step " << s;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, BatchedDecoding,
                         testing::Values(BatchCase{"qwen2vl-bf16", {}, false}, BatchCase{"paligemma-bf16", {}, false},
                                         BatchCase{"qwen2vl-mlx4", KvFormat{8, 32, 0}, true}),
                         [](const auto& info) {
                           return test_name(info.param.model + (info.param.kv.quantized() ? "_q8" : "") +
                                            (info.param.rotating ? "_rotating" : ""));
                         });

// A sequence whose client goes away leaves at once; the others go on unchanged.
TEST(BatchedDecodingCancel, OneLeavesTheOthersContinue) {
  Model& model = fixture_model("qwen2vl-bf16");
  const auto c = fixture_case("qwen2vl-bf16", "text_only");
  const Prompt prompt = model.build_prompt(case_messages(c), case_images(c));
  GenerationParams gp;
  gp.max_tokens = 8;
  gp.ignore_eos = true;
  Session solo(model, prompt.size() + 16);
  const auto expected = solo.generate(prompt, gp);
  Session a(model, prompt.size() + 16), b(model, prompt.size() + 16);
  DecodeBatch batch(model);
  int seen = 0;
  batch.add(a, prompt, gp, 0, [&](const StepOutput&) { return ++seen < 3; });
  batch.add(b, prompt, gp, 1);
  while (batch.size() > 0) batch.step();
  auto done = batch.take_finished();
  ASSERT_EQ(done.size(), 2u);
  for (auto& f : done) {
    if (f.tag == 0) {
      EXPECT_EQ(f.result.finish_reason, "cancelled");
      EXPECT_EQ(f.result.tokens.size(), 3u);
    } else {
      EXPECT_EQ(f.result.tokens, expected.tokens);
      EXPECT_EQ(f.result.finish_reason, "length");
    }
  }
  // The same session twice in a batch, or a session of another model, is refused.
  batch.add(a, prompt, gp, 2);
  EXPECT_ANY_THROW(batch.add(a, prompt, gp, 3));
  Session other(fixture_model("paligemma-bf16"), 64);
  EXPECT_ANY_THROW(batch.add(other, prompt, gp, 4));
}

}  // namespace
}  // namespace vkvlm::test
