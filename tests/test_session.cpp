// Generation behaviour on the demo model: KV reuse across turns, stop strings, limits,
// cancellation, logprobs and raw logits against the full logits row, repetition penalty,
// seeded sampling, on-the-fly quantization, and errors for prompts that do not fit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "models/session.h"
#include "tests/kernel_harness.h"
#include "tests/test_paths.h"

namespace vkvlm::test {
namespace {

const std::string k_demo = VKVLM_SOURCE_DIR "/models/shapes-llava";

Model& demo() {
  static Model m(ctx(), k_demo);
  return m;
}

Image shapes(int i) { return load_image_file(k_demo + "/examples/shapes_" + std::to_string(i) + ".png"); }

Messages user(const std::string& text, bool with_image) {
  Messages content = Messages::array();
  if (with_image) content.push_back({{"type", "image"}});
  content.push_back({{"type", "text"}, {"text", text}});
  return Messages::array({{{"role", "user"}, {"content", content}}});
}

TEST(Session, FollowUpTurnReusesTheCacheAndMatchesAFreshSession) {
  Model& m = demo();
  Session chat(m, 1024);
  Messages history = user("Describe this image.", true);
  std::vector<Image> images = {shapes(1)};
  auto first = chat.generate(m.build_prompt(history, images), {});
  EXPECT_EQ(first.text, "An orange circle at the top left and a black circle at the bottom.");
  history.push_back({{"role", "assistant"}, {"content", Messages::array({{{"type", "text"}, {"text", first.text}}})}});
  history.push_back({{"role", "user"}, {"content", "How many shapes are there?"}});
  Prompt second = m.build_prompt(history, images);
  auto again = chat.generate(second, {});
  // The image and the first exchange come from the cache.
  EXPECT_GT(again.cached_tokens, int64_t(first.prompt_tokens.size()));
  Session fresh(m, 1024);
  auto reference = fresh.generate(second, {});
  EXPECT_EQ(reference.cached_tokens, 0);
  EXPECT_EQ(again.tokens, reference.tokens);
  EXPECT_EQ(again.text, reference.text);
}

TEST(Session, StopStringsMaxTokensAndCancellation) {
  Model& m = demo();
  Session s(m, 512);
  Prompt p = m.build_prompt(user("Describe this image.", true), {shapes(1)});
  GenerationParams stop;
  stop.stop = {" circle at the bottom"};
  std::string streamed;
  auto r = s.generate(p, stop, [&](const StepOutput& o) {
    streamed += o.text;
    return true;
  });
  EXPECT_EQ(r.text, "An orange circle at the top left and a black");
  EXPECT_EQ(streamed, r.text);  // held-back text never leaks a stop string
  EXPECT_EQ(r.finish_reason, "stop");

  GenerationParams limit;
  limit.max_tokens = 3;
  r = s.generate(p, limit);
  EXPECT_EQ(r.tokens.size(), 3u);
  EXPECT_EQ(r.finish_reason, "length");

  int calls = 0;
  r = s.generate(p, {}, [&](const StepOutput&) { return ++calls < 2; });
  EXPECT_EQ(r.finish_reason, "cancelled");
  EXPECT_EQ(r.tokens.size(), 2u);
}

TEST(Session, LogprobsAndTopLogitsComeFromTheRawLogits) {
  Model& m = demo();
  Prompt p = m.build_prompt(user("What color is the square?", true), {shapes(0)});
  Session a(m, 512);
  auto logits = a.prompt_logits(p);
  double mx = *std::max_element(logits.begin(), logits.end()), z = 0;
  for (float v : logits) z += std::exp(double(v) - mx);
  const double lse = mx + std::log(z);
  std::vector<int32_t> order(logits.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int32_t(i);
  std::stable_sort(order.begin(), order.end(), [&](int32_t x, int32_t y) { return logits[size_t(x)] > logits[size_t(y)]; });

  GenerationParams gp;
  gp.max_tokens = 2;
  gp.logprobs = true;
  gp.top_logprobs = 5;
  gp.top_logits = 8;
  Session b(m, 512);
  auto r = b.generate(p, gp);
  ASSERT_EQ(r.steps.size(), 2u);
  const auto& s0 = r.steps[0];
  EXPECT_EQ(s0.token, order[0]);
  EXPECT_NEAR(s0.logprob, logits[size_t(order[0])] - lse, 1e-4);
  ASSERT_EQ(s0.top_logits.size(), 8u);
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(s0.top_logits[size_t(i)].first, order[size_t(i)]);
    EXPECT_NEAR(s0.top_logits[size_t(i)].second, logits[size_t(order[size_t(i)])], 1e-5);
  }
  ASSERT_EQ(s0.top_logprobs.size(), 5u);
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(s0.top_logprobs[size_t(i)].second, logits[size_t(order[size_t(i)])] - lse, 1e-4);
}

TEST(Session, RepetitionPenaltyFollowsTheReferenceRule) {
  Model& m = demo();
  Prompt p = m.build_prompt(user("How many shapes are there?", true), {shapes(2)});
  Session a(m, 512);
  auto logits = a.prompt_logits(p);
  // HF's rule, once for each distinct token id in the prompt, then greedy.
  const float pen = 1.8f;
  std::vector<bool> seen(logits.size(), false);
  for (int32_t id : p.ids) {
    if (seen[size_t(id)]) continue;
    seen[size_t(id)] = true;
    float& v = logits[size_t(id)];
    v = v < 0 ? v * pen : v / pen;
  }
  const int32_t want = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
  GenerationParams gp;
  gp.max_tokens = 1;
  gp.sampling.repeat_penalty = pen;
  Session b(m, 512);
  EXPECT_EQ(b.generate(p, gp).tokens[0], want);
}

TEST(Session, SeededSamplingReproduces) {
  Model& m = demo();
  Prompt p = m.build_prompt(user("Describe this image.", true), {shapes(3)});
  GenerationParams gp;
  gp.max_tokens = 20;
  gp.sampling.temperature = 1.3f;
  gp.sampling.top_p = 0.95f;
  gp.sampling.seed = 99;
  gp.sampling.has_seed = true;
  Session a(m, 512), b(m, 512);
  auto x = a.generate(p, gp), y = b.generate(p, gp);
  EXPECT_EQ(x.tokens, y.tokens);
  EXPECT_EQ(x.text, y.text);
}

TEST(Session, PromptsThatDoNotFitAreRefused) {
  Model& m = demo();
  Prompt p = m.build_prompt(user("Describe this image.", true), {shapes(0)});
  Session tiny(m, 64);
  try {
    tiny.generate(p, {});
    FAIL();
  } catch (const std::exception& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(std::to_string(p.ids.size()) + " tokens"), std::string::npos) << msg;
    EXPECT_NE(msg.find("context of 64"), std::string::npos) << msg;
  }
}

TEST(Session, ImagesAndImagePartsMustAgree) {
  Model& m = demo();
  auto expect = [&](const Messages& msgs, std::vector<Image> imgs, const char* word) {
    try {
      m.build_prompt(msgs, imgs);
      ADD_FAILURE() << "should fail";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
    }
  };
  expect(user("two?", true), {shapes(0), shapes(1)}, "2 image(s) were given");
  expect(user("none?", true), {}, "0 image(s) were given");
  expect(user("text only", false), {shapes(0)}, "1 image(s) were given");
  // Phi-3-Vision: tags for images that were not given, and tags not numbered 1..n.
  Model phi(ctx(), fixtures_dir() + "/phi3v-long-bf16");
  auto phi_expect = [&](const char* text, std::vector<Image> imgs, const char* word) {
    try {
      phi.build_prompt(Messages::array({{{"role", "user"}, {"content", text}}}), imgs);
      ADD_FAILURE() << "should fail";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
    }
  };
  phi_expect("<|image_1|>\n<|image_2|>\nCompare.", {shapes(0)}, "2 image placeholder(s) in its text, but 1 image(s)");
  phi_expect("<|image_1|>\n<|image_3|>\nCompare.", {shapes(0), shapes(1)}, "<|image_1|> ... in order");
}

TEST(Session, QuantizeOnLoadKeepsTheModelClose) {
  Model& base = demo();
  Prompt p = base.build_prompt(user("Describe this image.", true), {shapes(1)});
  Session s0(base, 512);
  auto ref = s0.prompt_logits(p);
  std::vector<double> refd(ref.begin(), ref.end());
  for (const char* q : {"q8", "q4"}) {
    Model quant(ctx(), k_demo, LoadOptions{q, false});
    Session s(quant, 512);
    auto got = s.prompt_logits(p);
    // q8 barely moves the logits; q4 (group 64) a little more.
    EXPECT_LE(nmse(got, refd), std::string(q) == "q8" ? 1e-4 : 2e-2) << q;
    auto r = s.generate(p, {});
    if (std::string(q) == "q8") {
      EXPECT_EQ(r.text, "An orange circle at the top left and a black circle at the bottom.");
    }
  }
}

}  // namespace
}  // namespace vkvlm::test

namespace vkvlm::test {
namespace {

// Phi-3's LongRoPE: once a conversation grows past original_max_position_embeddings (256 in this
// fixture) the reference switches the whole sequence to the long factors. A generation that
// crosses the threshold must therefore match fresh computations of each longer sequence.
TEST(Session, LongRopeSwitchMatchesAFreshComputation) {
  Model m(ctx(), fixtures_dir() + "/phi3v-long-bf16");
  std::string text;
  for (int i = 0; i < 40; ++i) text += "The quick brown fox. ";
  Messages msgs = Messages::array({{{"role", "user"}, {"content", text}}});
  Prompt p = m.build_prompt(msgs, {});
  const int64_t orig = m.config().text.rope.original_max_position;
  ASSERT_LT(int64_t(p.ids.size()), orig);
  const int steps = int(orig - int64_t(p.ids.size())) + 4;  // cross the threshold by a few tokens
  GenerationParams gp;
  gp.max_tokens = steps;
  gp.ignore_eos = true;
  Session s(m, 512);
  auto r = s.generate(p, gp);
  ASSERT_EQ(int(r.tokens.size()), steps);
  // Steps whose input is longer than the threshold: a fresh session on prompt + earlier tokens.
  for (int step = steps - 4; step < steps; ++step) {
    Prompt longer = p;
    for (int t = 0; t < step; ++t) {
      longer.ids.push_back(r.tokens[size_t(t)]);
      longer.keys.push_back(text_key(r.tokens[size_t(t)]));
      longer.positions.push_back(int32_t(longer.next_position++));
    }
    ASSERT_TRUE(m.config().text.rope.uses_long_factors(int64_t(longer.ids.size())) ||
                int64_t(longer.ids.size()) == orig);
    Session fresh(m, 512);
    auto logits = fresh.prompt_logits(longer);
    const int32_t best = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
    std::vector<float> sorted = logits;
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
    if (sorted[0] - sorted[1] < 0.05f) continue;  // a near-tie may flip either way
    EXPECT_EQ(r.tokens[size_t(step)], best) << "step " << step << " at length " << longer.ids.size();
  }
}

}  // namespace
}  // namespace vkvlm::test
