#pragma once
// Continuous batching: generations on several sessions of one model advance together, one token
// each per step, in a single forward pass that reads every weight once for all of them (the GEMV
// kernels take up to 8 rows of x per weight read). Each sequence keeps its own KV cache, RoPE
// table, sampler, stop strings and logprobs; sequences join (prefilled on their own) and leave
// between steps. Every row is computed exactly as a one-row decode step of its session is, so a
// greedy answer is the one Session::generate gives.
#include <cstdint>
#include <memory>
#include <vector>

#include "models/session.h"

namespace vkvlm {

class DecodeBatch {
 public:
  explicit DecodeBatch(Model& model);
  ~DecodeBatch();
  DecodeBatch(const DecodeBatch&) = delete;
  DecodeBatch& operator=(const DecodeBatch&) = delete;

  // Starts generating `prompt` on `session` (of this model, not already in the batch): prepares
  // it (images, prefill, reusing the session's cached rows) and emits the first token through
  // `on_step`. `tag` names the generation in take_finished(). `prompt` must outlive it.
  // Speculative decoding is not batched (params.lookup_ngram must be 0: drafting runs alone).
  void add(Session& session, const Prompt& prompt, const GenerationParams& params, uint64_t tag,
           const StepCallback& on_step = {}, const CancelCheck& cancelled = {});
  // One token for every sequence still going; returns how many the batched pass advanced.
  size_t step();
  // Sequences still going. After step() throws (a device error), none: those generations ended.
  size_t size() const { return running_.size(); }
  bool holds(const Session& session) const;

  struct Finished {
    uint64_t tag = 0;
    GenerationResult result;
  };
  // Generations that ended (stop, length, cancelled) since the last call.
  std::vector<Finished> take_finished();

 private:
  struct Sequence;
  void record();
  size_t advance();

  Model& model_;
  std::vector<std::unique_ptr<Sequence>> running_;
  std::vector<Finished> finished_;
  std::unique_ptr<gpu::Recorder> step_;               // the batched step for `recorded_`
  std::vector<std::pair<uint64_t, uint64_t>> recorded_;  // the sequences (serials) and graph versions it serves
  uint64_t serials_ = 0;
};

}  // namespace vkvlm
