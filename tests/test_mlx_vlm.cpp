// vkvlm beside the seed: mlx-vlm's own greedy tokens on the mlx-community-layout fixtures
// (tests/data/mlx_vlm/greedy.json, made by tools/reference/mlx_vlm_greedy.py with mlx-vlm on
// MLX's CPU backend), twice: as mlx-vlm runs the checkpoint (in its bf16/f16), and with the
// model's float tensors in float32 (the same weights).
// - As shipped, mlx-vlm rounds its activations to bf16, so where its tokens leave the
//   transformers reference (float64 on the dequantized weights: the fixture's greedy_ids) the
//   reference wins; before that step, and before the reference's own near-tie, vkvlm must give
//   exactly mlx-vlm's tokens. Every case prints where mlx-vlm left the reference and its margin.
// - In float32, mlx-vlm's tokens are vkvlm's at every step before the reference's own near-tie.
#include <gtest/gtest.h>

#include <fstream>
#include <iostream>

#include <nlohmann/json.hpp>

#include "models/session.h"
#include "tests/fixture_models.h"
#include "tests/kernel_harness.h"
#include "tests/test_paths.h"

namespace vkvlm::test {
namespace {

nlohmann::json seed_runs() {
  std::ifstream in(test_data_dir() + "/mlx_vlm/greedy.json");
  return nlohmann::json::parse(in);
}

std::vector<std::string> seed_models() {
  std::vector<std::string> out;
  const nlohmann::json runs = seed_runs();
  for (auto& m : runs["models"]) out.push_back(m["model"]);
  return out;
}

class SeedTokens : public testing::TestWithParam<std::string> {};

TEST_P(SeedTokens, VkvlmGivesMlxVlmsTokensWhereMlxVlmFollowsTheReference) {
  const std::string name = GetParam();
  nlohmann::json run;
  const nlohmann::json runs = seed_runs();
  for (auto& m : runs["models"])
    if (m["model"] == name) run = m;
  Model& model = fixture_model(name);
  Expected exp(name);
  size_t compared = 0;
  for (auto& seed : run["cases"]) {
    const std::string cname = seed["name"];
    SCOPED_TRACE(name + " " + cname);
    if (seed.contains("error")) {  // mlx-vlm itself could not run this case (the README says why)
      std::cout << name << " " << cname << ": mlx-vlm failed: " << seed["error"].get<std::string>() << "\n";
      continue;
    }
    auto c = fixture_case(name, cname);
    ASSERT_FALSE(c.is_null());
    Prompt prompt = model.build_prompt(case_messages(c), case_images(c), case_template_vars(c));
    EXPECT_EQ(prompt.size(), seed["prompt_tokens"].get<int64_t>()) << "mlx-vlm saw a prompt of another length";

    Session session(model, prompt.size() + 32);
    GenerationParams gp;
    gp.max_tokens = 12;
    gp.ignore_eos = true;
    auto r = session.generate(prompt, gp);
    auto reference = exp.i32(cname + ".greedy_ids");
    auto top10 = exp.f32(cname + ".top10_logits");
    auto tokens = seed["tokens"].get<std::vector<int32_t>>();
    auto margins = seed["top2_margins"].get<std::vector<double>>();

    // Where mlx-vlm leaves the reference, and where the reference itself nearly ties.
    size_t leaves = 0, tie = 0;
    while (leaves < tokens.size() && leaves < reference.size() && tokens[leaves] == reference[leaves]) ++leaves;
    while (tie < reference.size() && top10[tie * 10] - top10[tie * 10 + 1] >= kReferenceNearTie) ++tie;
    const size_t upto = std::min({leaves, tie, r.tokens.size()});
    for (size_t s = 0; s < upto; ++s) ASSERT_EQ(r.tokens[s], tokens[s]) << "step " << s;
    compared += upto;
    const auto tokens_f32 = seed["tokens_f32"].get<std::vector<int32_t>>();
    const size_t upto_f32 = std::min({tie, tokens_f32.size(), r.tokens.size()});
    for (size_t s = 0; s < upto_f32; ++s) ASSERT_EQ(r.tokens[s], tokens_f32[s]) << "step " << s << " (float32)";
    EXPECT_GT(upto_f32, 0u) << "no step before the reference's first near-tie";
    std::cout << name << " " << cname << ": vkvlm = mlx-vlm for " << upto << " steps (float32: " << upto_f32
              << "); ";
    if (leaves < tokens.size() && leaves < reference.size())
      std::cout << "mlx-vlm leaves the reference at step " << leaves << " (its top-2 margin " << margins[leaves]
                << ", the reference's " << top10[leaves * 10] - top10[leaves * 10 + 1] << ")\n";
    else
      std::cout << "mlx-vlm follows the reference for all " << tokens.size() << "\n";
  }
  std::cout << name << ": " << compared << " steps compared\n";
  EXPECT_GT(compared, 0u) << "no step where mlx-vlm follows the reference";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, SeedTokens, testing::ValuesIn(seed_models()),
                         [](const auto& info) { return test_name(info.param); });

}  // namespace
}  // namespace vkvlm::test
