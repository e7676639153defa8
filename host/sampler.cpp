#include "host/sampler.h"

#include <algorithm>
#include <cmath>

#include "base/error.h"

namespace vkvlm {

void SamplingParams::validate() const {
  if (!(temperature >= 0.0f) || !std::isfinite(temperature)) fail("temperature must be a number >= 0, not ", temperature);
  if (top_k < 0) fail("top_k must be >= 0, not ", top_k);
  if (!(top_p > 0.0f && top_p <= 1.0f)) fail("top_p must be in (0, 1], not ", top_p);
  if (!(min_p >= 0.0f && min_p <= 1.0f)) fail("min_p must be in [0, 1], not ", min_p);
  if (!(repeat_penalty > 0.0f) || !std::isfinite(repeat_penalty)) fail("repeat_penalty must be > 0, not ", repeat_penalty);
}

Sampler::Sampler(SamplingParams p) : p_(p), rng_(p.has_seed ? p.seed : std::random_device{}()) {}

// Applies top-k, top-p and min-p (in Hugging Face's order) to logits sorted descending, then
// samples. The list is the head of the sorted vocabulary (the whole of it when `complete`);
// probabilities are exact because log_norm covers the whole row. Returns -1 when the kept set
// might reach past the list, so the caller retries with the full row.
int32_t Sampler::sample_from(std::vector<std::pair<float, int32_t>> s, double log_norm, bool complete) {
  const double inv_t = 1.0 / p_.temperature;
  std::vector<double> prob(s.size());
  for (size_t i = 0; i < s.size(); ++i) prob[i] = std::exp(double(s[i].first) * inv_t - log_norm);
  size_t keep = s.size();
  bool bounded = complete;  // the kept set is known to end inside the list
  if (p_.top_k > 0) {
    if (size_t(p_.top_k) <= s.size()) {
      keep = size_t(p_.top_k);
      bounded = true;
    } else if (!complete) {
      return -1;
    }
  }
  if (p_.top_p < 1.0f) {
    // Over the tokens kept so far, renormalized: the smallest prefix reaching top_p.
    double mass = 1.0;
    if (bounded) {
      mass = 0;
      for (size_t i = 0; i < keep; ++i) mass += prob[i];
    }
    double cum = 0;
    size_t n = 0;
    bool reached = false;
    while (n < keep) {
      cum += prob[n++] / mass;
      if (cum >= double(p_.top_p)) {
        reached = true;
        break;
      }
    }
    if (!reached && !bounded) return -1;
    keep = std::max<size_t>(1, n);
    bounded = true;
  }
  if (p_.min_p > 0.0f) {
    const double threshold = double(p_.min_p) * prob[0];
    size_t n = 0;
    while (n < keep && prob[n] >= threshold) ++n;
    if (n == keep && !bounded) return -1;
    keep = std::max<size_t>(1, n);
    bounded = true;
  }
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += prob[i];
  // Unbounded (plain temperature sampling): draw over the whole vocabulary's mass.
  const double u = std::uniform_real_distribution<double>(0.0, bounded ? total : 1.0)(rng_);
  double cum = 0;
  for (size_t i = 0; i < keep; ++i) {
    cum += prob[i];
    if (u < cum) return s[i].second;
  }
  return bounded ? s[keep - 1].second : -1;
}

int32_t Sampler::sample(const Candidates& c, const std::function<std::vector<float>()>& full_row) {
  if (c.ids.empty()) fail("internal: no sampling candidates");
  if (p_.greedy()) return c.ids[0];
  std::vector<std::pair<float, int32_t>> s;
  for (size_t i = 0; i < c.ids.size(); ++i)
    if (c.ids[i] >= 0 && std::isfinite(c.values[i])) s.push_back({c.values[i], c.ids[i]});
  if (!s.empty()) {
    // The draw is replayed on the full row if the candidates cannot settle it, so save the
    // generator state to keep seeded runs reproducible either way.
    auto saved = rng_;
    int32_t t = sample_from(s, c.log_norm, false);
    if (t >= 0) return t;
    rng_ = saved;
  }
  std::vector<float> row = full_row();
  s.clear();
  s.reserve(row.size());
  for (size_t i = 0; i < row.size(); ++i)
    if (std::isfinite(row[i])) s.push_back({row[i], int32_t(i)});
  std::stable_sort(s.begin(), s.end(), [](auto& a, auto& b) { return a.first > b.first; });
  double m = s.empty() ? 0 : double(s[0].first) / p_.temperature, acc = 0;
  for (auto& [v, id] : s) acc += std::exp(double(v) / p_.temperature - m);
  return sample_from(std::move(s), m + std::log(acc), true);
}

}  // namespace vkvlm
