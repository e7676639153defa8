#pragma once
// What a session's files share and nothing else includes (models/session.cpp, generation.cpp,
// speculative.cpp, batch.cpp): the recorded graphs, and a generation in progress (the sampler,
// the text stream and the result, the KV row the next token takes). Session::generate runs one
// to its end; a DecodeBatch advances several together.
#include <chrono>
#include <memory>
#include <set>

#include "host/text_stream.h"
#include "gpu/recorder.h"
#include "models/session.h"

namespace vkvlm {

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The recordings replayed during generation: the sampling tail alone (after a prefill), and a
// whole decode step (embed the token, one forward pass, the sampling tail), with the buffers
// the host reads back.
struct Session::DecodeGraphs {
  std::unique_ptr<gpu::Recorder> tail, step;
  gpu::Tensor raw_vals, raw_ids, raw_lse;     // top raw logits (for logprobs / top_logits) and log Z
  gpu::Tensor cand_vals, cand_ids, cand_lse;  // sampling candidates and log Z at the temperature
  gpu::Tensor penalty_ids;                    // i32 [vocab], -1 where unused
  gpu::Tensor work;                           // penalized logits (or logits_ itself)
  int raw_k = 0, cand_k = 1;
  bool penalty = false, want_lse = false;
  float repeat_penalty = 1, temperature = 1;
  std::set<int32_t> seen;                // ids already in penalty_ids
};

struct Session::VerifyGraph {
  std::unique_ptr<gpu::Recorder> rec;
  gpu::Tensor ids;        // i32 [rows], host-visible: the token and the drafts
  gpu::Tensor kv_row;     // i32 [1], host-visible: the KV row of the first
  gpu::Tensor positions;  // i32 [rows, components], host-visible
  gpu::Tensor logits;     // f32 [rows, vocab], read back
  int64_t rows = 0;
};

struct Session::Drafting {
  Prompt prompt;
  std::unique_ptr<DecodeGraphs> graphs;
  std::vector<int32_t> fed;          // tokens fed after the prompt
  size_t logits_after = SIZE_MAX;    // logits_ follow this many of `fed` (SIZE_MAX: none)
};

struct Session::Run {
  Session& s;
  const Prompt& prompt;
  GenerationParams params;
  StepCallback on_step;
  GenerationResult res;
  Prepared prep;
  std::unique_ptr<DecodeGraphs> graphs;
  uint64_t graphs_version = 0;  // counts re-recordings (a batch re-records its step after one)
  Sampler sampler;
  TextStream stream;
  std::set<int32_t> eos;
  int64_t position_offset = 0;  // a generated token's position minus its row
  int64_t row = 0;              // the KV row the next fed token takes
  std::chrono::steady_clock::time_point t_decode;
  double first_token_seconds = 0;
  bool going = false;           // a token was emitted and generation goes on (it is to be fed)

  Run(Session& session, const Prompt& p, const GenerationParams& gp, const StepCallback& cb);
  ~Run();

  // One generated token to the result, the stream and the caller; false once generation ends.
  bool emit(StepOutput out);
  // The token the last step chose, made ready for a decode step (true), or fed already (false):
  // crossing Phi-3's long RoPE factors recomputes the conversation with it and re-records the
  // graphs.
  bool stage(int32_t token);
  // After the decode step that fed `token`.
  void fed(int32_t token);
  // stage, the session's own decode step, fed.
  void feed_one(int32_t token);
  // Samples the token the last step's logits give, and emits it.
  void next();
  // The result, once generation ended.
  GenerationResult finish();
};

}  // namespace vkvlm
