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

 private:
  int32_t sample_from(std::vector<std::pair<float, int32_t>> sorted_logits, double log_norm, bool complete);
  SamplingParams p_;
  std::mt19937_64 rng_;
};

}  // namespace vkvlm
