// A session's KV state: the cache, the rows it holds and the spans they were computed with, the
// RoPE table, and filling it from a prompt (reusing what it already holds).
#include "models/session.h"

#include <algorithm>
#include <chrono>

#include "gpu/error.h"
#include "gpu/recorder.h"
#include "models/session_run.h"

namespace vkvlm {

using gpu::Mat;
using gpu::Tensor;

namespace {
constexpr int64_t k_prefill_chunk = 512;  // rows per prefill forward pass (a bidirectional span takes one pass)
}  // namespace

Session::Session(Model& model, int64_t context_tokens, bool rotating, const KvFormat& kv)
    : model_(model), ctx_(model.context()), rotating_(rotating) {
  const auto& t = model.config().text;
  if (context_tokens < 2 || context_tokens > (int64_t(1) << 30))
    fail("the context must hold between 2 and 2^30 tokens, not ", context_tokens);
  if (rotating && context_tokens <= kRotatingKeep + 1)
    fail("a rotating KV cache needs more than ", kRotatingKeep + 1, " rows, not ", context_tokens);
  if (rotating && t.smallest_window() > 0 && context_tokens > t.smallest_window())
    fail("a rotating KV cache of ", context_tokens, " rows is larger than the model's sliding window of ",
         t.smallest_window(), " tokens; use at most that");
  // Like the reference, positions past max_position_embeddings are allowed (RoPE extends to
  // them); the CLI warns when a context goes beyond what the model was trained for.
  capacity_ = context_tokens;
  cache_ = KvCache::create(ctx_, t, capacity_, kv);
  kv_row_ = ctx_.host_tensor(gpu::DType::I32, {2}, "kv row", gpu::MemoryKind::Upload);
  positions_ = ctx_.host_tensor(gpu::DType::I32, {1, t.rope.positions_per_token()}, "positions", gpu::MemoryKind::Upload);
  token_ = ctx_.host_tensor(gpu::DType::I32, {1}, "token", gpu::MemoryKind::Upload);
  logits_ = ctx_.tensor(gpu::DType::F32, {1, t.vocab_size}, "logits");
  ensure_rope(false, capacity_ + 1);
}

Session::~Session() = default;

void Session::reset() {
  wrapped_ = false;
  cached_keys_.clear();
  cached_spans_.clear();
  drafting_.reset();
}

void Session::ensure_rope(bool long_factors, int64_t positions) {
  if (rope_table_.valid() && long_factors == rope_long_ && positions <= rope_positions_) return;
  const auto& r = model_.config().text.rope;
  const int64_t rows = std::max(positions, rope_positions_);
  if (rows > (int64_t(1) << 31) - 1) fail("RoPE positions beyond 2^31 are not supported");
  const int64_t seq = long_factors ? r.original_max_position + 1 : 1;
  auto table = gpu::rope_table(rows, r.rot_dim, r.theta, r.factors_for(seq), r.attention_factor);
  if (!rope_table_.valid() || rows > rope_positions_)
    rope_table_ = ctx_.tensor(gpu::DType::F32, {rows, r.rot_dim / 2, 2}, "rope table");
  ctx_.upload(rope_table_, table.data(), table.size() * 4);
  rope_long_ = long_factors;
  rope_positions_ = rows;
}

int64_t Session::prefill(const Prompt& prompt, const std::vector<Tensor>& features, int64_t from, int64_t to,
                         const CancelCheck& cancelled) {
  const auto& lm = model_.lm();
  const int64_t E = lm.config().hidden_size, V = lm.config().vocab_size;
  const int comps = prompt.position_components;
  for (int64_t c0 = from; c0 < to;) {
    if (cancelled && c0 > from && cancelled()) return c0;
    int64_t n = std::min(k_prefill_chunk, to - c0);
    // A bidirectional span's rows see each other: a pass holds a span whole.
    n = std::min(end_outside_spans(prompt.bidirectional, c0 + n), to) - c0;
    gpu::Recorder rec(ctx_);
    std::vector<int32_t> ids(prompt.ids.begin() + c0, prompt.ids.begin() + c0 + n);
    for (auto& id : ids)
      if (id < 0 || id >= V) id = 0;  // image rows: overwritten below
    Tensor idt = rec.scratch(gpu::DType::I32, {n}, "prompt ids");
    ctx_.upload(idt, ids.data(), ids.size() * 4);
    Mat x = Mat::of(rec.scratch(gpu::DType::F32, {n, E}, "embeddings"));  // [n, E]
    lm.embed(rec, idt, 0, n, x);
    for (auto& s : prompt.spans) {
      const int64_t a = std::max(s.position, c0), b = std::min(s.position + s.length, c0 + n);
      if (a >= b) continue;
      rec.copy(features[s.image], uint64_t(a - s.position) * E * 4, x.t, uint64_t(a - c0) * E * 4, uint64_t(b - a) * E * 4);
    }
    ForwardRows rows;
    rows.kv_row = rec.scratch(gpu::DType::I32, {1}, "first kv row");
    const int32_t first = int32_t(c0);
    ctx_.upload(rows.kv_row, &first, 4);
    rows.positions = rec.scratch(gpu::DType::I32, {n, comps}, "positions");
    ctx_.upload(rows.positions, prompt.positions.data() + c0 * comps, size_t(n * comps) * 4);
    if (!prompt.bidirectional.empty()) {
      const std::vector<int32_t> pairs = span_rows(prompt.bidirectional, c0, c0 + n);
      rows.spans = rec.scratch(gpu::DType::I32, {n, 2}, "attention spans");
      ctx_.upload(rows.spans, pairs.data(), pairs.size() * 4);
    }
    Mat logits = Mat::of(logits_);
    lm.forward(rec, cache_, x, rows, rope_table_, c0 + n == to ? &logits : nullptr);
    rec.submit();
    c0 += n;
  }
  return to;
}

int64_t Session::reusable_rows(const Prompt& prompt, bool long_factors) const {
  if (long_factors != rope_long_) return 0;  // cached keys were rotated with the other factors
  // A bidirectional span's rows depend on the whole span: they are reusable only when the cached
  // rows were computed with the same span, whole.
  return rows_valid_under(cached_spans_, prompt.bidirectional, int64_t(shared_prefix(cached_keys_, prompt.keys)));
}

Session::Prepared Session::prepare(const Prompt& prompt, const CancelCheck& cancelled) {
  const int64_t N = prompt.size();
  if (N == 0) fail("the prompt is empty");
  if (N >= capacity_)
    fail("the prompt is ", N, " tokens long, which does not fit the ", rotating_ ? "rotating KV cache" : "context", " of ",
         capacity_, " tokens (raise ", rotating_ ? "--max-kv-size" : "the context size, e.g. --ctx", ")");
  const int comps = model_.config().text.rope.positions_per_token();
  if (prompt.keys.size() != prompt.ids.size() || prompt.position_components != comps ||
      prompt.positions.size() != prompt.ids.size() * size_t(comps) || !valid_spans(prompt.bidirectional, N))
    fail("internal: the prompt's rows, keys and positions disagree");
  // The RoPE table must cover every prompt position and every position decoding can reach.
  int64_t largest = prompt.next_position + (capacity_ - N);
  for (int32_t p : prompt.positions) {
    if (p < 0) fail("internal: negative RoPE position ", p);
    largest = std::max<int64_t>(largest, p);
  }
  const bool need_long = model_.config().text.rope.uses_long_factors(N);
  Prepared p;
  // Reuse the longest cached prefix (at least the last prompt row is recomputed for logits).
  p.reused = std::min(reusable_rows(prompt, need_long), N - 1);
  p.computed = N - p.reused;
  ensure_rope(need_long, largest + 1);

  cached_keys_.resize(size_t(p.reused));
  auto t_img = std::chrono::steady_clock::now();
  p.features.resize(prompt.images.size());
  for (auto& s : prompt.spans) {
    if (cancelled && cancelled()) {
      p.cancelled = true;
      return p;
    }
    if (s.position + s.length > p.reused && !p.features[s.image].valid())
      p.features[s.image] = model_.vision()->encode(prompt.images[s.image]);
  }
  p.image_seconds = seconds_since(t_img);

  auto t0 = std::chrono::steady_clock::now();
  const int64_t reached = prefill(prompt, p.features, p.reused, N, cancelled);
  // Rows are kept as far as prefill got (its passes never cut a span), with the spans they hold.
  cached_keys_.assign(prompt.keys.begin(), prompt.keys.begin() + reached);
  wrapped_ = false;  // the rows follow the conversation again
  cached_spans_ = spans_within(prompt.bidirectional, reached);
  p.cancelled = reached < N;
  p.prefill_seconds = seconds_since(t0);
  return p;
}

std::vector<float> Session::prompt_logits(const Prompt& prompt) {
  prepare(prompt);
  return ctx_.read<float>(logits_);
}

void Session::switch_to_long_factors(const Prompt& prompt, const std::vector<int32_t>& generated,
                                     std::vector<Tensor>& features) {
  Prompt all = prompt;
  for (int32_t t : generated) {
    all.ids.push_back(t);
    all.keys.push_back(text_key(t));
    for (int c = 0; c < all.position_components; ++c) all.positions.push_back(int32_t(all.next_position));
    ++all.next_position;
  }
  for (size_t k = 0; k < features.size(); ++k)
    if (!features[k].valid()) features[k] = model_.vision()->encode(prompt.images[k]);
  ensure_rope(true, rope_positions_);
  prefill(all, features, 0, all.size());
  cached_keys_ = all.keys;
  cached_spans_ = all.bidirectional;
}

}  // namespace vkvlm
