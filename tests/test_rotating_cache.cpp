// A rotating KV cache (--max-kv-size, mlx-lm's RotatingKVCache): identical to the plain cache
// while the conversation fits; past it, each token is computed from the first 4 tokens and the
// most recent ones. The reference for those steps is Hugging Face transformers in float64 with
// the attention mask such a cache amounts to (tools/reference/rotating_cache_reference.py made
// tests/data/rotating_cache/qwen2vl-bf16.json from this test's token sequence).
#include <gtest/gtest.h>

#include <fstream>
#include <map>

#include "tests/expect_error.h"
#include "tests/fixture_models.h"

namespace vkvlm::test {
namespace {

TEST(RotatingCache, MatchesThePlainCacheThenTheReferenceOfASinkAndTheRecentTokens) {
  const std::string name = "qwen2vl-bf16";
  Model& model = fixture_model(name);
  std::ifstream in(test_data_dir() + "/rotating_cache/" + name + ".json");
  const auto ref = nlohmann::json::parse(in);
  const int64_t N = ref["max_kv_size"];
  const std::vector<int32_t> ids = ref["ids"];
  const Prompt prompt = model.build_prompt(fixture_case(name, "text_only")["messages"], {});
  ASSERT_TRUE(std::equal(prompt.ids.begin(), prompt.ids.end(), ids.begin()));
  const int tokens = int(ids.size() - prompt.ids.size());
  GenerationParams params;
  params.max_tokens = tokens;
  params.ignore_eos = true;
  params.top_logits = 5;
  Session plain(model, prompt.size() + tokens + 1), rotating(model, N, /*rotating=*/true);
  const GenerationResult want = plain.generate(prompt, params);
  const GenerationResult got = rotating.generate(prompt, params);
  ASSERT_EQ(got.tokens.size(), size_t(tokens)) << "generation goes on past the cache";
  EXPECT_EQ(got.finish_reason, "length");

  // Step s's logits follow token s - 1, fed at conversation index prompt.size() + s - 1; until
  // that index reaches N, every row is where the plain cache has it: nothing differs.
  const int64_t fits = N - prompt.size();
  ASSERT_LT(fits + 4, tokens) << "the reference must go well past the cache";
  for (int64_t s = 0; s <= fits; ++s) {
    EXPECT_EQ(got.tokens[size_t(s)], want.tokens[size_t(s)]) << "step " << s;
    EXPECT_EQ(got.steps[size_t(s)].top_logits, want.steps[size_t(s)].top_logits) << "step " << s;
  }
  // Every step against the reference: its five largest logits within 2e-2 of the largest, and
  // the reference's choice wherever it is clear.
  bool differs_from_plain = false;
  for (int s = 0; s < tokens; ++s) {
    const auto& top = ref["top5"][prompt.ids.size() + size_t(s) - 1];
    const double largest = std::abs(top[0][1].get<double>());
    std::map<int32_t, double> r;
    for (const auto& pair : top) r[pair[0].get<int32_t>()] = pair[1].get<double>();
    for (const auto& [id, value] : got.steps[size_t(s)].top_logits) {
      if (!r.count(id)) continue;  // a near-tie at the fifth place
      EXPECT_NEAR(value, r[id], 2e-2 * largest) << "step " << s << " id " << id;
    }
    if (top[0][1].get<double>() - top[1][1].get<double>() > 1e-2 * largest) {
      EXPECT_EQ(got.tokens[size_t(s)], top[0][0].get<int32_t>()) << "step " << s;
    }
    EXPECT_EQ(got.tokens[size_t(s)], ids[prompt.ids.size() + size_t(s)]) << "step " << s;
    differs_from_plain |= got.tokens[size_t(s)] != want.tokens[size_t(s)];
  }
  EXPECT_TRUE(differs_from_plain) << "past the cache, the rotating cache must see less than the plain one";

  // The next turn recomputes (the rows no longer follow the conversation) and answers the same.
  const GenerationResult again = rotating.generate(prompt, params);
  EXPECT_EQ(again.cached_tokens, 0);
  EXPECT_EQ(again.tokens, got.tokens);
}

TEST(RotatingCacheErrors, SizesThatCannotWork) {
  Model& model = fixture_model("llava15-f16");
  expect_error([&] { Session s(model, 5, true); }, {"rotating", "5"});
  const Prompt prompt = model.build_prompt(fixture_case("llava15-f16", "text_only")["messages"], {});
  Session small(model, prompt.size(), true);
  expect_error([&] { small.generate(prompt, {}); }, {"rotating KV cache", "--max-kv-size"});
}

}  // namespace
}  // namespace vkvlm::test
