#pragma once
// A generation in progress on a session (models/model.cpp and models/batch.cpp only): the
// sampler, the text stream and the result, the KV row the next token takes. Session::generate
// runs one to its end; a DecodeBatch advances several together.
#include <chrono>
#include <memory>
#include <set>

#include "host/text_stream.h"
#include "models/model.h"

namespace vkvlm {

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
