// A generation on a session: the decode step and sampling tail it records and replays, feeding
// tokens, and a run from its prompt to its last token.
#include <algorithm>
#include <chrono>
#include <set>

#include "gpu/error.h"
#include "gpu/recorder.h"
#include "host/text_stream.h"
#include "models/session.h"
#include "models/session_run.h"

namespace vkvlm {

using gpu::Mat;
using gpu::Tensor;

namespace {
constexpr int k_candidates = 64;  // top candidates read back per sampled step
}  // namespace

std::unique_ptr<Session::DecodeGraphs> Session::record_graphs(const Prompt& prompt, const GenerationParams& params) {
  const int64_t V = model_.config().text.vocab_size;
  auto gp = std::make_unique<DecodeGraphs>();
  DecodeGraphs& g = *gp;
  const auto& sp = params.sampling;
  g.raw_k = std::max({params.top_logprobs, params.top_logits, params.logprobs ? 1 : 0});
  g.cand_k = sp.greedy() ? 1 : k_candidates;
  g.penalty = sp.repeat_penalty != 1.0f;
  g.want_lse = !sp.greedy();
  g.repeat_penalty = sp.repeat_penalty;
  g.temperature = sp.temperature;
  auto host = [&](gpu::DType dt, int64_t n, const char* name) { return ctx_.host_tensor(dt, {1, n}, name, gpu::MemoryKind::Readback); };
  if (g.raw_k) {
    g.raw_vals = host(gpu::DType::F32, g.raw_k, "raw top values");
    g.raw_ids = host(gpu::DType::U32, g.raw_k, "raw top ids");
    g.raw_lse = host(gpu::DType::F32, 1, "raw log z");
  }
  g.cand_vals = host(gpu::DType::F32, g.cand_k, "candidate values");
  g.cand_ids = host(gpu::DType::U32, g.cand_k, "candidate ids");
  g.cand_lse = host(gpu::DType::F32, 1, "candidate log z");
  if (g.penalty) {
    // Every id seen so far: the whole cached sequence (the prompt and anything generated).
    std::vector<int32_t> list(size_t(V), -1);
    size_t n = 0;
    for (int32_t id : prompt.ids)
      if (id >= 0 && id < V && g.seen.insert(id).second) list[n++] = id;
    for (size_t r = prompt.ids.size(); r < cached_keys_.size(); ++r) {
      const int32_t id = int32_t(cached_keys_[r]);  // generated rows hold text keys
      if (id >= 0 && id < V && g.seen.insert(id).second) list[n++] = id;
    }
    g.penalty_ids = ctx_.host_tensor(gpu::DType::I32, {V}, "penalty ids", gpu::MemoryKind::Upload);
    ctx_.upload(g.penalty_ids, list.data(), list.size() * 4);
    g.work = ctx_.tensor(gpu::DType::F32, {1, V}, "penalized logits");
  } else {
    g.work = logits_;
  }
  g.tail = std::make_unique<gpu::Recorder>(ctx_);
  record_tail(*g.tail, g);
  g.tail->submit();  // evaluates the prefill's logits
  g.step = std::make_unique<gpu::Recorder>(ctx_);
  const auto& lm = model_.lm();
  Mat x = Mat::of(g.step->scratch(gpu::DType::F32, {1, lm.config().hidden_size}, "token embedding"));
  lm.embed(*g.step, token_, 0, 1, x);
  ForwardRows rows;
  rows.kv_row = kv_row_;
  rows.positions = positions_;
  rows.rotating = rotating_;
  Mat logits = Mat::of(logits_);
  lm.forward(*g.step, cache_, x, rows, rope_table_, &logits);
  record_tail(*g.step, g);
  return gp;
}

void Session::record_tail(gpu::Recorder& rec, DecodeGraphs& g) {
  const int64_t V = model_.config().text.vocab_size;
  if (g.raw_k) {
    gpu::topk(rec, Mat::of(logits_), g.raw_k, g.raw_vals, g.raw_ids);
    gpu::logsumexp(rec, Mat::of(logits_), 1.0f, g.raw_lse);
  }
  if (g.penalty) {
    rec.copy(logits_, 0, g.work, 0, logits_.bytes());
    gpu::repeat_penalty(rec, Mat::of(g.work), g.penalty_ids, V, g.repeat_penalty);
  }
  gpu::topk(rec, Mat::of(g.work), g.cand_k, g.cand_vals, g.cand_ids);
  if (g.want_lse) gpu::logsumexp(rec, Mat::of(g.work), 1.0f / g.temperature, g.cand_lse);
}

StepOutput Session::sample_step(DecodeGraphs& g, Sampler& sampler, const GenerationParams& params) {
  Candidates c;
  c.values = ctx_.read<float>(g.cand_vals);
  auto ids = ctx_.read<uint32_t>(g.cand_ids);
  c.ids.assign(ids.begin(), ids.end());
  for (auto& id : c.ids)
    if (uint32_t(id) == 0xFFFFFFFFu) id = -1;
  if (g.want_lse) c.log_norm = ctx_.read<float>(g.cand_lse)[0];
  StepOutput out;
  out.token = sampler.sample(c, [&] { return ctx_.read<float>(g.work); });
  if (g.raw_k) {
    auto rv = ctx_.read<float>(g.raw_vals);
    auto ri = ctx_.read<uint32_t>(g.raw_ids);
    const float lse = ctx_.read<float>(g.raw_lse)[0];
    float raw = NAN;
    for (int i = 0; i < g.raw_k; ++i)
      if (int32_t(ri[size_t(i)]) == out.token) raw = rv[size_t(i)];
    if (std::isnan(raw)) ctx_.download(logits_, &raw, 4, uint64_t(out.token) * 4);
    out.logprob = raw - lse;
    for (int i = 0; i < params.top_logprobs; ++i) out.top_logprobs.push_back({int32_t(ri[size_t(i)]), rv[size_t(i)] - lse});
    for (int i = 0; i < params.top_logits; ++i) out.top_logits.push_back({int32_t(ri[size_t(i)]), rv[size_t(i)]});
  }
  return out;
}

void Session::note_seen(DecodeGraphs& g, int32_t token) {
  if (g.penalty && g.seen.insert(token).second) {
    const int64_t slot = int64_t(g.seen.size()) - 1;
    ctx_.upload(g.penalty_ids, &token, 4, uint64_t(slot) * 4);
  }
}

void Session::feed(DecodeGraphs& g, int32_t token, int64_t row, int64_t position) {
  stage_feed(g, token, row, position);
  g.step->replay();
  after_feed(token, row);
}

void Session::stage_feed(DecodeGraphs& g, int32_t token, int64_t row, int64_t position) {
  note_seen(g, token);
  if (position > int64_t(INT32_MAX)) fail("RoPE position ", position, " does not fit 32 bits");
  // The row this token takes, and how many rows the step sees (all written so far).
  const int32_t r[2] = {int32_t(physical_row(row)), int32_t(std::min(row + 1, capacity_))};
  std::vector<int32_t> pos(size_t(model_.config().text.rope.positions_per_token()), int32_t(position));
  ctx_.upload(token_, &token, 4);
  ctx_.upload(kv_row_, r, 8);
  ctx_.upload(positions_, pos.data(), pos.size() * 4);
}

void Session::after_feed(int32_t token, int64_t row) {
  if (row >= capacity_) {  // a rotating cache wrapped: its rows no longer follow the conversation
    wrapped_ = true;
    cached_keys_.clear();
  }
  if (!wrapped_) cached_keys_.push_back(text_key(token));
}

Session::Run::Run(Session& session, const Prompt& p, const GenerationParams& gp, const StepCallback& cb)
    : s(session), prompt(p), params(gp), on_step(cb), sampler(gp.sampling), stream(session.model_.tokenizer(), gp.stop),
      eos(session.model_.eos_ids().begin(), session.model_.eos_ids().end()) {}

Session::Run::~Run() = default;

bool Session::Run::emit(StepOutput out) {
  if (res.tokens.empty()) first_token_seconds = seconds_since(t_decode);
  const int32_t token = out.token;
  res.tokens.push_back(token);
  const bool is_eos = eos.count(token) && !params.ignore_eos;
  const bool last = int64_t(res.tokens.size()) >= params.max_tokens || (!s.rotating_ && row + 1 >= s.capacity_);
  TextStream::Piece piece = stream.push(is_eos ? std::nullopt : std::optional<int32_t>(token), is_eos || last);
  out.text = piece.text;
  const bool keep_going = on_step ? on_step(out) : true;
  if (params.logprobs || params.top_logprobs || params.top_logits) res.steps.push_back(out);
  else res.steps.push_back({out.token, out.text, 0, {}, {}});
  if (is_eos || piece.stop) {
    res.finish_reason = "stop";
    return false;
  }
  if (!keep_going) {
    res.finish_reason = "cancelled";
    return false;
  }
  return !last;
}

bool Session::Run::stage(int32_t token) {
  const auto& rope = s.model_.config().text.rope;
  if (rope.uses_long_factors(row + 1) != s.rope_long_ && row + 1 >= s.capacity_) {
    // A rotating cache past its rows cannot be recomputed: new tokens take the long factors
    // (as mlx-lm does), the kept rows stay as they were computed.
    s.ensure_rope(true, s.rope_positions_);
  } else if (rope.uses_long_factors(row + 1) != s.rope_long_) {
    s.switch_to_long_factors(prompt, res.tokens, prep.features);
    graphs = s.record_graphs(prompt, params);
    ++graphs_version;
    row = prompt.size() + int64_t(res.tokens.size());
    return false;
  }
  s.stage_feed(*graphs, token, row, row + position_offset);
  return true;
}

void Session::Run::fed(int32_t token) {
  s.after_feed(token, row);
  ++row;
}

void Session::Run::feed_one(int32_t token) {
  if (!stage(token)) return;
  graphs->step->replay();
  fed(token);
}

void Session::Run::next() { going = emit(s.sample_step(*graphs, sampler, params)); }

GenerationResult Session::Run::finish() {
  res.text = stream.text();
  res.decode_seconds = seconds_since(t_decode) - first_token_seconds;
  return std::move(res);
}

std::unique_ptr<Session::Run> Session::start(const Prompt& prompt, const GenerationParams& params,
                                             const StepCallback& on_step, const CancelCheck& cancelled, bool first_token) {
  params.validate();
  auto run = std::make_unique<Run>(*this, prompt, params, on_step);
  GenerationResult& res = run->res;
  res.prompt_tokens = prompt.ids;
  run->prep = prepare(prompt, cancelled);
  res.cached_tokens = run->prep.reused;
  res.prefill_tokens = run->prep.computed;
  res.image_seconds = run->prep.image_seconds;
  res.prefill_seconds = run->prep.prefill_seconds;
  run->t_decode = std::chrono::steady_clock::now();
  if (run->prep.cancelled) {
    res.finish_reason = "cancelled";
    return run;
  }
  // A rotating cache's positions go on past its rows: the RoPE table covers the whole answer.
  if (rotating_) ensure_rope(rope_long_, prompt.next_position + int64_t(params.max_tokens) + 1);
  run->graphs = record_graphs(prompt, params);
  run->position_offset = prompt.next_position - prompt.size();
  run->row = prompt.size();
  run->t_decode = std::chrono::steady_clock::now();
  res.finish_reason = "length";
  if (first_token && params.max_tokens > 0) run->next();
  return run;
}

Session::DecodeInputs Session::decode_inputs() const {
  return {token_, kv_row_, positions_, &cache_, &rope_table_, rotating_, logits_};
}

void Session::record_sampling_tail(gpu::Recorder& rec, Run& run) { record_tail(rec, *run.graphs); }

GenerationResult Session::generate(const Prompt& prompt, const GenerationParams& params, const StepCallback& on_step,
                                   const CancelCheck& cancelled, const Speculation& speculation) {
  const bool speculative = speculation.draft || params.lookup_ngram > 0;
  if (speculation.draft && !speculation.draft_prompt) fail("internal: a draft session needs the draft's prompt");
  if (speculation.draft == this) fail("internal: a session cannot draft for itself");
  auto run = start(prompt, params, on_step, cancelled, !speculative);
  if (run->res.finish_reason == "cancelled") return run->finish();
  if (!speculative) {
    while (run->going) {
      run->feed_one(run->res.tokens.back());
      run->next();
    }
  } else if (params.max_tokens > 0) {
    speculate(*run, speculation);
  }
  return run->finish();
}

}  // namespace vkvlm
