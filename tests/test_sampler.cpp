// The sampler against an independent implementation of Hugging Face's warpers (temperature,
// top-k, top-p, min-p) over the full distribution: empirical frequencies over many draws must
// match, whether the 64 candidates suffice or the full row is needed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>

#include "host/sampler.h"

namespace vkvlm::test {
namespace {

// HF's processing order on the full row: logits / T, then top-k, top-p, min-p.
std::vector<double> reference_distribution(const std::vector<float>& logits, const SamplingParams& p) {
  const size_t n = logits.size();
  std::vector<double> s(n);
  for (size_t i = 0; i < n; ++i) s[i] = double(logits[i]) / p.temperature;
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return s[a] > s[b]; });
  std::vector<bool> keep(n, true);
  if (p.top_k > 0)
    for (size_t r = size_t(p.top_k); r < n; ++r) keep[order[r]] = false;
  auto softmax = [&] {
    double m = -INFINITY;
    for (size_t i = 0; i < n; ++i)
      if (keep[i]) m = std::max(m, s[i]);
    std::vector<double> pr(n, 0.0);
    double z = 0;
    for (size_t i = 0; i < n; ++i)
      if (keep[i]) z += pr[i] = std::exp(s[i] - m);
    for (auto& x : pr) x /= z;
    return pr;
  };
  if (p.top_p < 1.0f) {
    auto pr = softmax();
    double cum = 0;
    bool done = false;
    for (size_t r = 0; r < n; ++r) {
      size_t i = order[r];
      if (!keep[i]) continue;
      if (done) {
        keep[i] = false;
        continue;
      }
      cum += pr[i];
      if (cum >= p.top_p) done = true;
    }
  }
  if (p.min_p > 0.0f) {
    auto pr = softmax();
    const double thr = p.min_p * *std::max_element(pr.begin(), pr.end());
    for (size_t i = 0; i < n; ++i)
      if (keep[i] && pr[i] < thr) keep[i] = false;
  }
  return softmax();
}

Candidates candidates_of(const std::vector<float>& logits, float temperature, size_t k = 64) {
  std::vector<int32_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return logits[size_t(a)] > logits[size_t(b)]; });
  Candidates c;
  double m = -INFINITY, z = 0;
  for (float v : logits) m = std::max(m, double(v) / temperature);
  for (float v : logits) z += std::exp(double(v) / temperature - m);
  c.log_norm = m + std::log(z);
  for (size_t i = 0; i < std::min(k, ids.size()); ++i) {
    c.ids.push_back(ids[i]);
    c.values.push_back(logits[size_t(ids[i])]);
  }
  return c;
}

struct SampleCase {
  const char* name;
  float temperature;
  int top_k;
  float top_p, min_p;
  float spread;  // logit scale: small spreads make flat distributions whose nucleus passes 64 tokens
  bool needs_full_row;  // whether the 64 candidates cannot decide (then the full row is read)
};

class SamplerDistribution : public testing::TestWithParam<SampleCase> {};

TEST_P(SamplerDistribution, MatchesReferenceWarpers) {
  const auto& sc = GetParam();
  std::mt19937 rng(7);
  std::normal_distribution<float> d(0.0f, sc.spread);
  std::vector<float> logits(512);
  for (auto& v : logits) v = d(rng);
  SamplingParams p;
  p.temperature = sc.temperature;
  p.top_k = sc.top_k;
  p.top_p = sc.top_p;
  p.min_p = sc.min_p;
  p.seed = 1234;
  p.has_seed = true;
  const auto want = reference_distribution(logits, p);
  Sampler s(p);
  const Candidates c = candidates_of(logits, p.temperature);
  int full_rows = 0;
  const int draws = 40000;
  std::vector<int> count(logits.size(), 0);
  for (int i = 0; i < draws; ++i) {
    int32_t t = s.sample(c, [&] {
      ++full_rows;
      return logits;
    });
    ASSERT_GE(t, 0);
    ++count[size_t(t)];
  }
  double max_dev = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (want[i] == 0.0) EXPECT_EQ(count[i], 0) << "token " << i << " is outside the kept set";
    // Standard deviations of the frequency, plus an absolute floor.
    const double sd = std::sqrt(want[i] * (1 - want[i]) / draws);
    max_dev = std::max(max_dev, std::fabs(double(count[i]) / draws - want[i]) / (sd + 1e-4));
  }
  EXPECT_LT(max_dev, 5.5) << "frequencies stray from the reference distribution";
  if (sc.needs_full_row) EXPECT_GT(full_rows, 0);
  else if (sc.top_k > 0 || sc.top_p < 1.0f || sc.min_p > 0.0f) EXPECT_EQ(full_rows, 0) << "the candidates should have sufficed";
}

INSTANTIATE_TEST_SUITE_P(Sampling, SamplerDistribution,
                         testing::Values(SampleCase{"temperature", 1.0f, 0, 1.0f, 0.0f, 3.0f, false},
                                         SampleCase{"hot_flat_temperature", 1.5f, 0, 1.0f, 0.0f, 0.5f, true},
                                         SampleCase{"top_k", 0.8f, 10, 1.0f, 0.0f, 2.0f, false},
                                         SampleCase{"top_p", 1.0f, 0, 0.9f, 0.0f, 3.0f, false},
                                         SampleCase{"flat_top_p_beyond_candidates", 1.0f, 0, 0.95f, 0.0f, 0.3f, true},
                                         SampleCase{"top_k_then_top_p", 0.7f, 40, 0.8f, 0.0f, 1.0f, false},
                                         SampleCase{"min_p", 1.0f, 0, 1.0f, 0.1f, 2.0f, false},
                                         SampleCase{"flat_min_p_beyond_candidates", 1.0f, 0, 1.0f, 0.3f, 0.2f, true},
                                         SampleCase{"all_together", 0.9f, 50, 0.95f, 0.05f, 1.5f, false}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(Sampler, GreedyTakesTheFirstCandidate) {
  SamplingParams p;  // temperature 0
  Sampler s(p);
  Candidates c{{5.0f, 5.0f, 1.0f}, {7, 9, 3}, 0};
  EXPECT_EQ(s.sample(c, [] { return std::vector<float>(); }), 7);
}

TEST(Sampler, SeedsReproduce) {
  std::vector<float> logits(300);
  std::mt19937 rng(3);
  for (auto& v : logits) v = std::normal_distribution<float>(0, 1)(rng);
  auto run = [&](uint64_t seed) {
    SamplingParams p;
    p.temperature = 1.0f;
    p.seed = seed;
    p.has_seed = true;
    Sampler s(p);
    auto c = candidates_of(logits, 1.0f);
    std::vector<int32_t> out;
    for (int i = 0; i < 50; ++i) out.push_back(s.sample(c, [&] { return logits; }));
    return out;
  };
  EXPECT_EQ(run(42), run(42));
  EXPECT_NE(run(42), run(43));
}

TEST(Sampler, InvalidParametersAreNamed) {
  auto bad = [](SamplingParams p, const char* name) {
    try {
      p.validate();
      ADD_FAILURE() << name << " should be rejected";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
  };
  SamplingParams p;
  p.temperature = -1;
  bad(p, "temperature");
  p = {};
  p.top_p = 0;
  bad(p, "top_p");
  p = {};
  p.min_p = 2;
  bad(p, "min_p");
  p = {};
  p.repeat_penalty = 0;
  bad(p, "repeat_penalty");
  p = {};
  p.top_k = -3;
  bad(p, "top_k");
}

}  // namespace
}  // namespace vkvlm::test
