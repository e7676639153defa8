#pragma once
// Sampling on the host from the top candidates the GPU returns (values, ids and the
// log-sum-exp of the whole row), falling back to the full logits row when the candidates cannot
// decide exactly (a nucleus wider than the candidate list, say).
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace vkvlm {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  int top_k = 0;             // 0: off
  float top_p = 1.0f;        // 1: off
  float min_p = 0.0f;        // 0: off
  float repeat_penalty = 1.0f;
  uint64_t seed = 0;
  bool has_seed = false;

  bool greedy() const { return temperature <= 0.0f; }
  // Throws on values out of range, naming the parameter.
  void validate() const;
};

// The candidates of one step: `values`/`ids` sorted descending (after any repetition penalty),
// and log(sum(exp(logit / temperature))) over the whole vocabulary.
struct Candidates {
  std::vector<float> values;
  std::vector<int32_t> ids;
  double log_norm = 0;  // at the sampling temperature
};

class Sampler {
 public:
  explicit Sampler(SamplingParams p);
  const SamplingParams& params() const { return p_; }

  // The sampled token; `full_row` is called (once) when the candidates are not enough.
  int32_t sample(const Candidates& c, const std::function<std::vector<float>()>& full_row);

  // The distribution sample() draws from for a full logits row, as probabilities over the
  // vocabulary (temperature, then top-k, top-p and min-p; greedy: all on the first largest).
  std::vector<double> distribution(const std::vector<float>& row) const;
  // A draw from (unnormalized) probabilities, and a uniform number in [0, 1).
  int32_t draw(const std::vector<double>& probs);
  double uniform();

 private:
  int64_t kept(const std::vector<double>& sorted_probs, bool complete, bool& bounded) const;
  int32_t sample_from(std::vector<std::pair<float, int32_t>> sorted_logits, double log_norm, bool complete);
  SamplingParams p_;
  std::mt19937_64 rng_;
};

// Speculative sampling: drafts[i], proposed from the draft distribution q[i], checked against
// the target's p[i] (p holds one row more: the distribution after the last draft). Returns the
// accepted drafts and one more token: drawn from the residual max(0, p - q) where a draft was
// rejected, or from p's last row when all were accepted. The tokens are distributed exactly as
// drawing from the target one at a time. Greedy rows (one-hot) make it the longest agreeing
// prefix and the target's own choice after it.
std::vector<int32_t> speculative_accept(const std::vector<std::vector<double>>& p, const std::vector<std::vector<double>>& q,
                                        const std::vector<int32_t>& drafts, Sampler& sampler);

}  // namespace vkvlm
