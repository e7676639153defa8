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

// How many of the sorted probabilities top-k, top-p and min-p keep (in Hugging Face's order),
// and whether that set is known to end inside the list. The list is the head of the sorted
// vocabulary (all of it when `complete`); returns -1 when the kept set might reach past it.
int64_t Sampler::kept(const std::vector<double>& prob, bool complete, bool& bounded) const {
  size_t keep = prob.size();
  bounded = complete;
  if (p_.top_k > 0) {
    if (size_t(p_.top_k) <= prob.size()) {
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
  return int64_t(keep);
}

// Samples from logits sorted descending; probabilities are exact because log_norm covers the
// whole row. Returns -1 when the list cannot settle the draw, so the caller retries with the
// full row.
int32_t Sampler::sample_from(std::vector<std::pair<float, int32_t>> s, double log_norm, bool complete) {
  const double inv_t = 1.0 / p_.temperature;
  std::vector<double> prob(s.size());
  for (size_t i = 0; i < s.size(); ++i) prob[i] = std::exp(double(s[i].first) * inv_t - log_norm);
  bool bounded = false;
  const int64_t k = kept(prob, complete, bounded);
  if (k < 0) return -1;
  const size_t keep = size_t(k);
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

std::vector<double> Sampler::distribution(const std::vector<float>& row) const {
  std::vector<double> out(row.size(), 0.0);
  if (p_.greedy()) {
    // The first largest (ties to the smaller id, NaN never), as the GPU's top-k picks.
    int64_t best = -1;
    for (size_t i = 0; i < row.size(); ++i)
      if (!std::isnan(row[i]) && (best < 0 || row[i] > row[size_t(best)])) best = int64_t(i);
    if (best < 0) fail("the logits row holds no number");
    out[size_t(best)] = 1.0;
    return out;
  }
  std::vector<std::pair<float, int32_t>> s;
  s.reserve(row.size());
  for (size_t i = 0; i < row.size(); ++i)
    if (std::isfinite(row[i])) s.push_back({row[i], int32_t(i)});
  if (s.empty()) fail("the logits row holds no finite number");
  std::stable_sort(s.begin(), s.end(), [](auto& a, auto& b) { return a.first > b.first; });
  const double inv_t = 1.0 / p_.temperature, m = double(s[0].first) * inv_t;
  std::vector<double> prob(s.size());
  double total = 0;
  for (size_t i = 0; i < s.size(); ++i) total += prob[i] = std::exp(double(s[i].first) * inv_t - m);
  for (auto& x : prob) x /= total;
  bool bounded = false;
  const size_t keep = size_t(kept(prob, true, bounded));
  double mass = 0;
  for (size_t i = 0; i < keep; ++i) mass += prob[i];
  for (size_t i = 0; i < keep; ++i) out[size_t(s[i].second)] = prob[i] / mass;
  return out;
}

int32_t Sampler::draw(const std::vector<double>& probs) {
  double total = 0;
  for (double x : probs) total += x;
  if (!(total > 0)) fail("internal: drawing from an empty distribution");
  const double u = std::uniform_real_distribution<double>(0.0, total)(rng_);
  double cum = 0;
  int32_t last = -1;
  for (size_t i = 0; i < probs.size(); ++i) {
    if (probs[i] <= 0) continue;
    cum += probs[i];
    last = int32_t(i);
    if (u < cum) return last;
  }
  return last;
}

double Sampler::uniform() { return std::uniform_real_distribution<double>(0.0, 1.0)(rng_); }

std::vector<int32_t> speculative_accept(const std::vector<std::vector<double>>& p, const std::vector<std::vector<double>>& q,
                                        const std::vector<int32_t>& drafts, Sampler& sampler) {
  if (p.size() != drafts.size() + 1 || q.size() != drafts.size())
    fail("internal: speculative sampling needs one target row more than drafts, and a draft row per draft");
  std::vector<int32_t> out;
  for (size_t i = 0; i < drafts.size(); ++i) {
    const auto d = size_t(drafts[i]);
    if (d >= p[i].size() || d >= q[i].size()) fail("internal: draft token ", drafts[i], " is outside the vocabulary");
    const double pd = p[i][d], qd = q[i][d];
    // Accept with probability min(1, p/q); a draft the draft itself could not have drawn
    // (q = 0) is never accepted.
    if (qd > 0 && (pd >= qd || sampler.uniform() < pd / qd)) {
      out.push_back(drafts[i]);
      continue;
    }
    // Rejected: the replacement comes from the residual max(0, p - q), renormalized.
    std::vector<double> residual(p[i].size());
    double mass = 0;
    for (size_t v = 0; v < residual.size(); ++v) mass += residual[v] = std::max(0.0, p[i][v] - (v < q[i].size() ? q[i][v] : 0.0));
    out.push_back(mass > 0 ? sampler.draw(residual) : sampler.draw(p[i]));
    return out;
  }
  out.push_back(sampler.draw(p.back()));
  return out;
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
