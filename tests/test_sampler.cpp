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
    if (want[i] == 0.0) {
      EXPECT_EQ(count[i], 0) << "token " << i << " is outside the kept set";
    }
    // Standard deviations of the frequency, plus an absolute floor.
    const double sd = std::sqrt(want[i] * (1 - want[i]) / draws);
    max_dev = std::max(max_dev, std::fabs(double(count[i]) / draws - want[i]) / (sd + 1e-4));
  }
  EXPECT_LT(max_dev, 5.5) << "frequencies stray from the reference distribution";
  if (sc.needs_full_row) {
    EXPECT_GT(full_rows, 0);
  } else if (sc.top_k > 0 || sc.top_p < 1.0f || sc.min_p > 0.0f) {
    EXPECT_EQ(full_rows, 0) << "the candidates should have sufficed";
  }
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

namespace vkvlm::test {
namespace {

// The distribution the sampler draws from, as a whole row: the reference warpers' exactly.
TEST(Sampler, DistributionIsTheReferenceWarpers) {
  std::mt19937 rng(11);
  std::normal_distribution<float> d(0.0f, 2.0f);
  std::vector<float> logits(300);
  for (auto& v : logits) v = d(rng);
  for (auto [t, k, top_p, min_p] : {std::tuple{1.0f, 0, 1.0f, 0.0f}, {0.7f, 20, 1.0f, 0.0f}, {1.2f, 0, 0.9f, 0.0f},
                                    {1.0f, 0, 1.0f, 0.1f}, {0.9f, 50, 0.95f, 0.05f}}) {
    SamplingParams p;
    p.temperature = t;
    p.top_k = k;
    p.top_p = top_p;
    p.min_p = min_p;
    const auto want = reference_distribution(logits, p);
    const auto got = Sampler(p).distribution(logits);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-9) << "token " << i;
  }
  // Greedy: all the mass on the first largest logit.
  std::vector<float> tie = {1.0f, 3.0f, 2.0f, 3.0f};
  EXPECT_EQ(Sampler(SamplingParams{}).distribution(tie), (std::vector<double>{0, 1, 0, 0}));
}

// Frequencies of `draws` tokens against a distribution, in standard deviations (worst token).
double worst_deviation(const std::vector<int>& count, int draws, const std::vector<double>& want) {
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double sd = std::sqrt(want[i] * (1 - want[i]) / draws);
    worst = std::max(worst, std::fabs(double(count[i]) / draws - want[i]) / (sd + 1e-4));
  }
  return worst;
}

// Speculative sampling must give each position's token the target's distribution, whatever the
// draft proposes. Drawing the replacement from p instead of the residual max(0, p - q) fails
// this: in the first case p = (.5, .5, 0, ...) and the draft always proposes token 0, which
// would then come out 75% of the time instead of 50%.
TEST(SpeculativeSampling, TokensAreDistributedAsTheTarget) {
  const size_t V = 8;
  std::mt19937 gen(5);
  auto random_row = [&](double zero_share) {
    std::vector<double> r(V);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    double total = 0;
    for (auto& x : r) total += x = u(gen) < zero_share ? 0.0 : u(gen);
    for (auto& x : r) x /= total;
    return r;
  };
  struct Case {
    std::vector<std::vector<double>> p, q;
  };
  std::vector<double> half(V, 0.0), first(V, 0.0);
  half[0] = half[1] = 0.5;
  first[0] = 1.0;
  std::vector<Case> cases = {{{half, half}, {first}},
                             {{random_row(0.0), random_row(0.3), random_row(0.0)}, {random_row(0.0), random_row(0.5)}},
                             {{random_row(0.5), random_row(0.0), random_row(0.2), random_row(0.0)},
                              {random_row(0.0), random_row(0.0), random_row(0.6)}}};
  SamplingParams sp;
  sp.temperature = 1.0f;
  sp.seed = 99;
  sp.has_seed = true;
  Sampler sampler(sp);
  const int trials = 60000;
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    SCOPED_TRACE("case " + std::to_string(ci));
    const auto& c = cases[ci];
    std::vector<std::vector<int>> count(c.p.size(), std::vector<int>(V, 0));
    std::vector<int> reached(c.p.size(), 0);
    for (int t = 0; t < trials; ++t) {
      std::vector<int32_t> drafts;
      for (auto& q : c.q) drafts.push_back(sampler.draw(q));
      const auto out = speculative_accept(c.p, c.q, drafts, sampler);
      ASSERT_GE(out.size(), 1u);
      ASSERT_LE(out.size(), c.p.size());
      for (size_t i = 0; i < out.size(); ++i) {
        ++count[i][size_t(out[i])];
        ++reached[i];
        if (i + 1 < out.size()) {
          EXPECT_EQ(out[i], drafts[i]) << "only accepted drafts come before the last token";
        }
      }
    }
    for (size_t i = 0; i < c.p.size(); ++i) {
      if (reached[i] > 2000) {
        EXPECT_LT(worst_deviation(count[i], reached[i], c.p[i]), 5.5) << "position " << i;
      }
    }
  }
}

// Greedy rows: the longest prefix of drafts the target agrees with, then the target's choice.
TEST(SpeculativeSampling, GreedyIsTheLongestAgreeingPrefix) {
  auto one_hot = [](size_t i) {
    std::vector<double> r(5, 0.0);
    r[i] = 1.0;
    return r;
  };
  Sampler s(SamplingParams{});
  const std::vector<std::vector<double>> p = {one_hot(2), one_hot(4), one_hot(1), one_hot(3)};
  const std::vector<std::vector<double>> q = {one_hot(2), one_hot(4), one_hot(0)};
  EXPECT_EQ(speculative_accept(p, q, {2, 4, 0}, s), (std::vector<int32_t>{2, 4, 1}));
  EXPECT_EQ(speculative_accept(p, q, {3, 4, 0}, s), (std::vector<int32_t>{2}));
  const std::vector<std::vector<double>> q_all = {one_hot(2), one_hot(4), one_hot(1)};
  EXPECT_EQ(speculative_accept(p, q_all, {2, 4, 1}, s), (std::vector<int32_t>{2, 4, 1, 3}));
}

}  // namespace
}  // namespace vkvlm::test
