// Speculative decoding: a draft model's session drafting for another (or prompt lookup), one
// verification pass over the token and its drafts, and accepting them as the model's sampler would.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include "gpu/error.h"
#include "gpu/recorder.h"
#include "models/session.h"
#include "models/session_run.h"

namespace vkvlm {

using gpu::Mat;
using gpu::Tensor;

namespace {

// Prompt lookup: the tokens that followed the last earlier occurrence of the context's final n
// tokens (up to `max`), or none. Image rows (negative here) match nothing.
std::vector<int32_t> lookup_drafts(const std::vector<int32_t>& context, int n, int max) {
  const size_t N = context.size();
  if (n <= 0 || N <= size_t(n)) return {};
  const int32_t* tail = context.data() + N - size_t(n);
  for (size_t start = N - size_t(n); start-- > 0;) {
    bool match = true;
    for (int k = 0; k < n && match; ++k) match = context[start + size_t(k)] == tail[k] && tail[k] >= 0;
    if (!match) continue;
    std::vector<int32_t> out;
    for (size_t i = start + size_t(n); i < N && out.size() < size_t(max); ++i) {
      if (context[i] < 0) break;
      out.push_back(context[i]);
    }
    if (!out.empty()) return out;  // else an image follows this match: look further back
  }
  return {};
}

// log(sum(exp(row))) in double.
double log_sum_exp(const float* row, int64_t n) {
  double m = -INFINITY;
  for (int64_t i = 0; i < n; ++i)
    if (!std::isnan(row[i])) m = std::max(m, double(row[i]));
  double z = 0;
  for (int64_t i = 0; i < n; ++i)
    if (!std::isnan(row[i])) z += std::exp(double(row[i]) - m);
  return m + std::log(z);
}

}  // namespace

void check_draft_model(const Model& target, const Model& draft) {
  const auto& a = target.tokenizer();
  const auto& b = draft.tokenizer();
  const int64_t va = target.config().text.vocab_size, vb = draft.config().text.vocab_size;
  auto names = [&] { return " (model " + target.dir() + ", draft " + draft.dir() + ")"; };
  if (a.vocab_size() != b.vocab_size())
    fail("the draft model's tokenizer has ", b.vocab_size(), " tokens and the model's ", a.vocab_size(),
         ": a draft must share the model's vocabulary", names());
  if (vb < a.vocab_size() || va < a.vocab_size())
    fail("the draft model's vocabulary (", vb, ") does not cover the model's tokenizer (", a.vocab_size(), " tokens)", names());
  for (const auto& t : a.added_tokens())
    if (t.special && b.token_to_id(t.content) != t.id)
      fail("the special token ", t.content, " is ", t.id, " in the model but ", b.token_to_id(t.content),
           " in the draft: a draft must share the model's vocabulary", names());
  for (const auto& t : b.added_tokens())
    if (t.special && a.token_to_id(t.content) != t.id)
      fail("the draft's special token ", t.content, " is ", t.id, " there but ", a.token_to_id(t.content),
           " in the model: a draft must share the model's vocabulary", names());
}

std::unique_ptr<Session::VerifyGraph> Session::record_verify(int64_t rows) {
  const auto& lm = model_.lm();
  const int64_t V = lm.config().vocab_size, E = lm.config().hidden_size;
  const int comps = lm.config().rope.positions_per_token();
  auto v = std::make_unique<VerifyGraph>();
  v->rows = rows;
  v->ids = ctx_.host_tensor(gpu::DType::I32, {rows}, "verify ids", gpu::MemoryKind::Upload);
  v->kv_row = ctx_.host_tensor(gpu::DType::I32, {1}, "verify kv row", gpu::MemoryKind::Upload);
  v->positions = ctx_.host_tensor(gpu::DType::I32, {rows, comps}, "verify positions", gpu::MemoryKind::Upload);
  v->logits = ctx_.host_tensor(gpu::DType::F32, {rows, V}, "verify logits", gpu::MemoryKind::Readback);
  v->rec = std::make_unique<gpu::Recorder>(ctx_);
  Mat x = Mat::of(v->rec->scratch(gpu::DType::F32, {rows, E}, "verify embeddings"));  // [rows, E]
  lm.embed(*v->rec, v->ids, 0, rows, x);
  ForwardRows fr;
  fr.kv_row = v->kv_row;
  fr.positions = v->positions;
  fr.as_decode_steps = true;
  Mat logits = Mat::of(v->logits);
  lm.forward(*v->rec, cache_, x, fr, rope_table_, &logits);
  return v;
}

void Session::draft_begin(const Prompt& prompt) {
  prepare(prompt);
  drafting_ = std::make_unique<Drafting>();
  drafting_->prompt = prompt;
  drafting_->graphs = record_graphs(prompt, GenerationParams{});
  drafting_->logits_after = 0;
}

bool Session::draft_can_feed(size_t tokens) const {
  return drafting_ && drafting_->prompt.size() + int64_t(tokens) < capacity_;
}

std::vector<float> Session::draft_logits(const std::vector<int32_t>& tokens) {
  if (tokens.empty()) fail("internal: a draft needs a token to continue from");
  Drafting& d = *drafting_;
  const size_t common = shared_prefix(d.fed, tokens);
  if (!(common == tokens.size() && d.logits_after == tokens.size())) {
    // Roll back to what is shared (at least one token is fed, for its logits) and feed the rest.
    const size_t keep = std::min(common, tokens.size() - 1);
    d.fed.resize(keep);
    cached_keys_.resize(size_t(d.prompt.size()) + keep);
    const int64_t offset = d.prompt.next_position - d.prompt.size();
    for (size_t i = keep; i < tokens.size(); ++i) {
      const int64_t row = d.prompt.size() + int64_t(i);
      feed(*d.graphs, tokens[i], row, row + offset);
      d.fed.push_back(tokens[i]);
    }
    d.logits_after = tokens.size();
  }
  return ctx_.read<float>(logits_);
}

void Session::speculate(Run& run, const Speculation& speculation) {
  const Prompt& prompt = run.prompt;
  const GenerationParams& params = run.params;
  const auto& rope = model_.config().text.rope;
  const int64_t N = prompt.size();
  const int64_t V = model_.config().text.vocab_size;
  GenerationResult& res = run.res;
  int64_t& row = run.row;
  auto& graphs = run.graphs;
  Sampler& sampler = run.sampler;
  auto emit = [&](StepOutput out) { return run.emit(std::move(out)); };
  auto feed_one = [&](int32_t token) { run.feed_one(token); };
  const int64_t position_offset = run.position_offset;
  const int D = params.num_draft_tokens;
  // Verification passes by row count (the drafts and the token before them), recorded when
  // first needed: a round with fewer drafts computes fewer rows.
  std::vector<std::unique_ptr<VerifyGraph>> verifies(size_t(D + 2));
  SamplingParams draft_sampling = params.sampling;
  draft_sampling.seed = params.sampling.seed + 1;
  Sampler draft_sampler(draft_sampling);
  if (speculation.draft) speculation.draft->draft_begin(*speculation.draft_prompt);
  // The context prompt lookup searches: the prompt's text tokens, then what is generated.
  std::vector<int32_t> context;
  if (params.lookup_ngram > 0)
    for (int64_t r = 0; r < N; ++r) context.push_back(prompt.keys[size_t(r)] == text_key(prompt.ids[size_t(r)]) ? prompt.ids[size_t(r)] : -1);
  const double penalty = params.sampling.repeat_penalty;
  bool going = emit(sample_step(*graphs, sampler, params));  // the first token, from the prefill's logits
  while (going) {
    const int32_t x = res.tokens.back();  // chosen, not yet fed
    // Drafts, when the verification pass fits the context and the RoPE factors stay.
    std::vector<int32_t> drafts;
    std::vector<std::vector<double>> q;
    const bool room = row + D + 1 < capacity_ && rope.uses_long_factors(row + D + 1) == rope_long_ &&
                      int64_t(res.tokens.size()) < params.max_tokens;
    if (room && speculation.draft && speculation.draft->draft_can_feed(res.tokens.size() + size_t(D))) {
      std::vector<int32_t> seq = res.tokens;
      for (int i = 0; i < D; ++i) {
        q.push_back(draft_sampler.distribution(speculation.draft->draft_logits(seq)));
        drafts.push_back(draft_sampler.draw(q.back()));
        seq.push_back(drafts.back());
      }
    } else if (room && params.lookup_ngram > 0) {
      context.push_back(x);
      drafts = lookup_drafts(context, params.lookup_ngram, D);
      context.pop_back();
      for (int32_t d : drafts) {
        q.emplace_back(size_t(V), 0.0);
        if (d >= 0 && d < V) q.back()[size_t(d)] = 1.0;
      }
    }
    if (drafts.empty()) {  // one plain step
      feed_one(x);
      if (params.lookup_ngram > 0) context.push_back(x);
      going = emit(sample_step(*graphs, sampler, params));
      continue;
    }
    // Verify x and the drafts in one pass: row i's logits follow x, d_1 .. d_i.
    const int R = int(drafts.size()) + 1;
    auto& verify = verifies[size_t(R)];
    if (!verify) verify = record_verify(R);
    std::vector<int32_t> ids(size_t(R), 0);
    ids[0] = x;
    for (size_t i = 0; i < drafts.size(); ++i) ids[i + 1] = drafts[i] >= 0 && drafts[i] < V ? drafts[i] : 0;
    const int comps = prompt.position_components;
    std::vector<int32_t> pos(size_t(R * comps));
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < comps; ++c) pos[size_t(i * comps + c)] = int32_t(row + i + position_offset);
    const int32_t first_row = int32_t(row);
    ctx_.upload(verify->ids, ids.data(), ids.size() * 4);
    ctx_.upload(verify->kv_row, &first_row, 4);
    ctx_.upload(verify->positions, pos.data(), pos.size() * 4);
    verify->rec->replay();
    const std::vector<float> logits = ctx_.read<float>(verify->logits);  // [R, V]
    // The model's distribution after each prefix, the repetition penalty counting the drafts
    // before it (as if they had been fed one at a time).
    std::vector<std::vector<double>> p;
    std::set<int32_t> seen = graphs->seen;
    for (size_t i = 0; i <= drafts.size(); ++i) {
      seen.insert(ids[i]);
      std::vector<float> r(logits.begin() + int64_t(i) * V, logits.begin() + int64_t(i + 1) * V);
      if (penalty != 1.0)
        for (int32_t id : seen)
          if (id >= 0 && id < V) r[size_t(id)] = r[size_t(id)] < 0 ? r[size_t(id)] * float(penalty) : r[size_t(id)] / float(penalty);
      p.push_back(sampler.distribution(r));
    }
    const std::vector<int32_t> chosen = speculative_accept(p, q, drafts, sampler);
    const size_t accepted = chosen.size() - 1;
    res.draft_tokens += int64_t(drafts.size());
    res.accepted_tokens += int64_t(accepted);
    // x's row is now in the cache; so is each accepted draft's, once the one after it is emitted.
    auto commit = [&](int32_t token) {
      cached_keys_.push_back(text_key(token));
      note_seen(*graphs, token);
      if (params.lookup_ngram > 0) context.push_back(token);
      ++row;
    };
    commit(x);
    for (size_t i = 0; i < chosen.size() && going; ++i) {
      StepOutput out;
      out.token = chosen[i];
      if (params.logprobs || params.top_logprobs || params.top_logits) {
        const float* raw = logits.data() + int64_t(i) * V;
        const double lse = log_sum_exp(raw, V);
        out.logprob = float(double(raw[out.token]) - lse);
        const int k = std::max(params.top_logprobs, params.top_logits);
        std::vector<int32_t> order(static_cast<size_t>(V));
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
          return raw[a] > raw[b] || (raw[a] == raw[b] && a < b);
        });
        for (int j = 0; j < params.top_logprobs; ++j)
          out.top_logprobs.push_back({order[size_t(j)], float(double(raw[order[size_t(j)]]) - lse)});
        for (int j = 0; j < params.top_logits; ++j) out.top_logits.push_back({order[size_t(j)], raw[order[size_t(j)]]});
      }
      going = emit(out);
      if (going && i < accepted) commit(chosen[i]);
    }
  }
}

}  // namespace vkvlm
