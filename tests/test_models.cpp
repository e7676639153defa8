// Every fixture model and conversation against the Hugging Face reference (tests/data/fixtures):
// prompt token ids exactly, the image processor's pixels, image features, the logits at the last
// prompt position, and the greedy tokens up to the first step where the reference itself is a
// near-tie. Also the bundled demo model's 20 reference answers.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <memory>

#include <nlohmann/json.hpp>

#include "host/image_processing.h"
#include "base/numeric.h"
#include "host/safetensors.h"
#include "models/session.h"
#include "tests/fixture_models.h"
#include "tests/kernel_harness.h"
#include "tests/test_paths.h"

namespace vkvlm::test {
namespace {

constexpr double kFeatureNmse = 1e-4;
constexpr double kLogitTolerance = 2e-2;  // relative to the reference's largest logit


struct Case {
  std::string model, name;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.model << " " << c.name; }

std::vector<Case> all_cases() {
  std::vector<Case> out;
  for (const char* m : {"llava15-f16", "llava15-mlx4", "llavanext-bf16-legacy", "phi3v-bf16", "phi3v-long-bf16", "qwen2vl-bf16",
                        "qwen2vl-mlx4", "paligemma-bf16", "paligemma-mlx8", "qwen2vl-mlx4-2024", "paligemma-mlx8-2024"}) {
    std::ifstream in(model_dir(m) + "/cases.json");
    auto j = nlohmann::json::parse(in);
    for (auto& c : j["cases"]) out.push_back({m, c["name"].get<std::string>()});
  }
  return out;
}

// Per crop and channel: mean and mean |x| of a processor's crops (CHW).
std::vector<double> crop_stats(const ProcessedImage& px) {
  std::vector<double> out;
  const size_t plane = size_t(px.size) * size_t(px.size);
  for (int64_t crop = 0; crop < px.rows; ++crop)
    for (int ch = 0; ch < 3; ++ch) {
      double mean = 0, mean_abs = 0;
      const float* p = px.pixels.data() + (size_t(crop) * 3 + size_t(ch)) * plane;
      for (size_t i = 0; i < plane; ++i) {
        mean += p[i];
        mean_abs += std::fabs(p[i]);
      }
      out.push_back(mean / double(plane));
      out.push_back(mean_abs / double(plane));
    }
  return out;
}

class FixtureModel : public testing::TestWithParam<Case> {};

TEST_P(FixtureModel, MatchesReference) {
  const Case& tc = GetParam();
  Model& model = fixture_model(tc.model);
  Expected exp(tc.model);
  std::ifstream in(model_dir(tc.model) + "/cases.json");
  auto cases = nlohmann::ordered_json::parse(in);
  nlohmann::ordered_json c;
  for (auto& x : cases["cases"])
    if (x["name"] == tc.name) c = x;
  ASSERT_FALSE(c.is_null());
  std::vector<Image> images;
  for (auto& f : c["images"]) images.push_back(load_image_file(fixtures_dir() + "/images/" + f.get<std::string>()));
  const std::string p = tc.name + ".";
  const bool phi3v = tc.model.rfind("phi3v", 0) == 0, qwen2vl = tc.model.rfind("qwen2vl", 0) == 0;

  // 1. The prompt, token for token (image rows expanded as the processor does), and for M-RoPE
  // every token's (t, h, w) position.
  const nlohmann::json vars = case_template_vars(c);
  Prompt prompt = model.build_prompt(case_messages(c), images, vars);
  EXPECT_EQ(prompt.text, c["prompt_text"].get<std::string>());
  ASSERT_EQ(prompt.ids, exp.i32(p + "input_ids"));
  const int64_t N = prompt.size();
  if (qwen2vl) {
    auto pos = exp.i32(p + "position_ids");  // [3, N]
    ASSERT_EQ(prompt.position_components, 3);
    for (int64_t t = 0; t < N; ++t)
      for (int k = 0; k < 3; ++k)
        ASSERT_EQ(prompt.positions[size_t(t * 3 + k)], pos[size_t(k * N + t)]) << "token " << t << " component " << k;
    EXPECT_EQ(prompt.next_position - N, c["rope_delta"].get<int64_t>());
    auto thw = images.empty() ? std::vector<int32_t>() : exp.i32(p + "image_grid_thw");
    for (size_t k = 0; k < images.size(); ++k) {
      const auto& px = prompt.images[k].pixels;
      EXPECT_EQ((std::vector<int32_t>{1, px.grid_rows, px.grid_cols}),
                std::vector<int32_t>(thw.begin() + long(k * 3), thw.begin() + long(k * 3 + 3)));
      EXPECT_EQ(prompt.images[k].tokens, c["image_tokens"][k].get<int64_t>());
    }
  } else {
    for (int64_t t = 0; t < N; ++t)
      ASSERT_EQ(prompt.positions[size_t(t)], t + (prompt.bidirectional.empty() ? 0 : 1)) << "token " << t;
  }
  if (tc.model.rfind("paligemma-", 0) == 0)  // the whole prompt is the prefix
    EXPECT_EQ(prompt.bidirectional, (std::vector<BidirectionalSpan>{{0, N}}));
  else
    EXPECT_TRUE(prompt.bidirectional.empty());

  // 2. The image processor: statistics of every crop (or patch row), and the pixels where the
  // reference keeps them. JPEGs decode exactly as PIL decodes them (libjpeg). The reference's
  // resampler rounds a few pixels one 8-bit level differently from PIL's (two at most after
  // LLaVA-NeXT's upscaling), so pixels may differ by two levels, and at most 1% by more than one.
  const ProcessorConfig pc;
  size_t stats_row = 0;  // Qwen2-VL: the cases' images' patch rows, one after another
  for (size_t k = 0; k < images.size(); ++k) {
    const auto& px = prompt.images[k].pixels;
    const double tol = 2e-2;
    if (qwen2vl) {
      auto want = exp.f32(p + "pixel_stats");  // [rows, 2]
      ASSERT_EQ(px.patch_values, 1176);
      for (int64_t r = 0; r < px.rows; ++r, ++stats_row) {
        double mean = 0, mean_abs = 0;
        for (int64_t i = 0; i < px.patch_values; ++i) {
          mean += px.pixels[size_t(r * px.patch_values + i)];
          mean_abs += std::fabs(px.pixels[size_t(r * px.patch_values + i)]);
        }
        ASSERT_NEAR(mean / double(px.patch_values), want[stats_row * 2], tol) << "image " << k << " patch " << r;
        ASSERT_NEAR(mean_abs / double(px.patch_values), want[stats_row * 2 + 1], tol) << "image " << k << " patch " << r;
      }
      continue;
    }
    std::vector<float> want;
    int64_t want_crops;
    if (phi3v) {
      want = exp.f32(p + "pixel_stats." + std::to_string(k));
      want_crops = exp.shape(p + "pixel_stats." + std::to_string(k))[0];
    } else {
      auto all = exp.f32(p + "pixel_stats");
      const auto shape = exp.shape(p + "pixel_stats");
      want_crops = shape.size() == 4 ? shape[1] : 1;
      const size_t per = size_t(want_crops) * 6;
      want.assign(all.begin() + long(k * per), all.begin() + long((k + 1) * per));
    }
    ASSERT_LE(px.rows, want_crops) << "image " << k;
    auto got = crop_stats(px);
    got.resize(size_t(want_crops) * 6, 0.0);  // crops past the image's are the reference's zero padding
    for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], tol) << "image " << k << " crop " << i / 6 << " stat " << i % 6;
  }
  if (exp.has(p + "pixel_values") || exp.has(p + "pixel_values_global_first_last.0")) {
    const auto& px = prompt.images[0].pixels;
    auto want = exp.f32(phi3v ? p + "pixel_values_global_first_last.0" : p + "pixel_values");
    // phi3v keeps the global view and the first HD crop (then the last, padding, crop); Qwen2-VL
    // all its images' patch rows.
    size_t n = phi3v ? size_t(2) * 3 * 336 * 336 : want.size();
    std::vector<float> got;
    for (auto& im : prompt.images) got.insert(got.end(), im.pixels.pixels.begin(), im.pixels.pixels.end());
    ASSERT_GE(got.size(), n);
    const bool siglip = tc.model.rfind("paligemma-", 0) == 0;
    size_t beyond_one = 0;
    for (size_t i = 0; i < n; ++i) {
      // Channel of element i: CHW crops, or (channel, t, y, x) patch rows.
      const size_t ch = qwen2vl ? (i % 1176) / (2 * 14 * 14) : (i / (size_t(px.size) * px.size)) % 3;
      const double level = siglip ? 2.0 / 255.0 : 1.0 / 255.0 / pc.std[ch];
      const double levels = std::fabs(got[i] - want[i]) / level;
      ASSERT_LE(levels, 2.2) << "pixel value " << i;
      beyond_one += levels > 1.2;
    }
    EXPECT_LE(double(beyond_one), 0.01 * double(n)) << "pixels more than one level off";
  }

  // 3. Image features (projector output), one row per image token.
  if (!images.empty()) {
    std::vector<float> got;
    for (size_t k = 0; k < images.size(); ++k) {
      auto f = ctx().read<float>(model.vision()->encode(prompt.images[k]));
      if (phi3v) {
        auto want = exp.f32(p + "image_features." + std::to_string(k));
        std::vector<double> wd(want.begin(), want.end());
        EXPECT_LE(nmse(f, wd), kFeatureNmse) << "image " << k;
      } else {
        got.insert(got.end(), f.begin(), f.end());
      }
    }
    if (!phi3v) {
      auto want = exp.f32(p + "image_features");
      std::vector<double> wd(want.begin(), want.end());
      EXPECT_LE(nmse(got, wd), kFeatureNmse);
    }
  }

  // 4. Logits at the last prompt position: the reference's top-5 tokens, relative to its largest.
  Session session(model, N + 32);
  auto logits = session.prompt_logits(prompt);
  auto ref = exp.f32(p + "logits_last");
  ASSERT_EQ(logits.size(), ref.size());
  double largest = 0;
  for (float v : ref) largest = std::max(largest, double(std::fabs(v)));
  std::vector<size_t> order(ref.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::partial_sort(order.begin(), order.begin() + 5, order.end(), [&](size_t a, size_t b) { return ref[a] > ref[b]; });
  for (int i = 0; i < 5; ++i)
    EXPECT_NEAR(logits[order[size_t(i)]], ref[order[size_t(i)]], kLogitTolerance * largest) << "token " << order[size_t(i)];

  // 5. Greedy decoding (reusing the prompt's cache) up to the reference's first near-tie.
  GenerationParams gp;
  gp.max_tokens = 12;
  gp.ignore_eos = true;
  auto r = session.generate(prompt, gp);
  EXPECT_EQ(r.cached_tokens, N - 1);
  auto greedy = exp.i32(p + "greedy_ids");
  auto top10 = exp.f32(p + "top10_logits");
  ASSERT_EQ(r.tokens.size(), greedy.size());
  for (size_t s = 0; s < greedy.size(); ++s) {
    if (top10[s * 10] - top10[s * 10 + 1] < kReferenceNearTie) break;  // the reference itself nearly tied here
    ASSERT_EQ(r.tokens[s], greedy[s]) << "greedy step " << s;
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, FixtureModel, testing::ValuesIn(all_cases()), [](const auto& info) {
  return test_name(info.param.model + "_" + info.param.name);
});

// The bundled demo model answers its 20 example questions exactly as the reference did.
TEST(DemoModel, ReproducesAllReferenceAnswers) {
  const std::string dir = VKVLM_SOURCE_DIR "/models/shapes-llava";
  Model model(ctx(), dir);
  Session session(model, 512);
  std::ifstream in(dir + "/examples/expected.json");
  auto j = nlohmann::json::parse(in);
  ASSERT_EQ(j["examples"].size(), 20u);
  int matched = 0;
  for (auto& e : j["examples"]) {
    Image img = load_image_file(dir + "/examples/" + e["image"].get<std::string>());
    Messages m = Messages::array({{{"role", "user"},
                                   {"content", Messages::array({{{"type", "image"}},
                                                                {{"type", "text"}, {"text", e["question"].get<std::string>()}}})}}});
    auto r = session.generate(model.build_prompt(m, {img}), GenerationParams{64});
    EXPECT_EQ(r.text, e["greedy_fp16_reference"].get<std::string>()) << e["question"];
    EXPECT_EQ(r.finish_reason, "stop");
    matched += r.text == e["greedy_fp16_reference"].get<std::string>();
  }
  EXPECT_EQ(matched, 20);
}

}  // namespace
}  // namespace vkvlm::test
