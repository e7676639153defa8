#include "models/batch.h"

#include "gpu/error.h"
#include "gpu/recorder.h"
#include "models/session_run.h"

namespace vkvlm {

using gpu::Mat;

struct DecodeBatch::Sequence {
  uint64_t serial = 0;  // unique in this batch (the recorded step names its sequences by it)
  uint64_t tag = 0;
  Session* session = nullptr;
  std::unique_ptr<Session::Run> run;
};

DecodeBatch::DecodeBatch(Model& model) : model_(model) {}
DecodeBatch::~DecodeBatch() = default;

bool DecodeBatch::holds(const Session& session) const {
  for (const auto& s : running_)
    if (s->session == &session) return true;
  return false;
}

void DecodeBatch::add(Session& session, const Prompt& prompt, const GenerationParams& params, uint64_t tag,
                      const StepCallback& on_step, const CancelCheck& cancelled) {
  if (&session.model() != &model_) fail("internal: a batch decodes sessions of one model");
  if (holds(session)) fail("internal: a session is in the batch already");
  if (params.lookup_ngram > 0) fail("internal: speculative decoding is not batched");
  auto seq = std::make_unique<Sequence>();
  seq->serial = ++serials_;
  seq->tag = tag;
  seq->session = &session;
  seq->run = session.start(prompt, params, on_step, cancelled, /*first_token=*/true);
  if (seq->run->going) running_.push_back(std::move(seq));
  else finished_.push_back({tag, seq->run->finish()});
}

void DecodeBatch::record() {
  const auto& lm = model_.lm();
  const int64_t B = int64_t(running_.size()), E = lm.config().hidden_size, V = lm.config().vocab_size;
  step_ = std::make_unique<gpu::Recorder>(model_.context());
  gpu::Recorder& rec = *step_;
  Mat x = Mat::of(rec.scratch(gpu::DType::F32, {B, E}, "batch embeddings"));  // [B, E]
  Mat logits = Mat::of(rec.scratch(gpu::DType::F32, {B, V}, "batch logits"));  // [B, V]
  std::vector<LanguageModel::Sequence> seqs;
  recorded_.clear();
  for (int64_t b = 0; b < B; ++b) {
    const Session::DecodeInputs in = running_[size_t(b)]->session->decode_inputs();
    // Each sequence's token, KV row and positions are its session's own (staged by its run).
    lm.embed(rec, in.token, 0, 1, x.row_range(b, 1));
    LanguageModel::Sequence q;
    q.cache = in.cache;
    q.rows.kv_row = in.kv_row;
    q.rows.positions = in.positions;
    q.rows.rotating = in.rotating;
    q.rope_table = in.rope_table;
    seqs.push_back(q);
    recorded_.push_back({running_[size_t(b)]->serial, running_[size_t(b)]->run->graphs_version});
  }
  lm.forward_batch(rec, seqs, x, logits);
  for (int64_t b = 0; b < B; ++b) {
    Session& s = *running_[size_t(b)]->session;
    rec.copy(logits.t, uint64_t(b) * uint64_t(V) * 4, s.decode_inputs().logits, 0, uint64_t(V) * 4);
    s.record_sampling_tail(rec, *running_[size_t(b)]->run);
  }
}

size_t DecodeBatch::step() {
  if (running_.empty()) return 0;
  try {
    return advance();
  } catch (...) {
    // A failed step leaves the sequences' caches part-written: they end here (each session
    // recomputes what it did not record as cached).
    running_.clear();
    step_.reset();
    recorded_.clear();
    throw;
  }
}

size_t DecodeBatch::advance() {
  // Stage every sequence's last token; one crossing Phi-3's long RoPE factors is fed on its own
  // (the conversation recomputed) and sits this step out.
  std::vector<std::unique_ptr<Sequence>> solo;
  std::vector<std::unique_ptr<Sequence>> stepping;
  for (auto& s : running_) (s->run->stage(s->run->res.tokens.back()) ? stepping : solo).push_back(std::move(s));
  running_ = std::move(stepping);
  const size_t advanced = running_.size();
  if (!running_.empty()) {
    bool same = recorded_.size() == running_.size() && step_;
    for (size_t b = 0; same && b < running_.size(); ++b)
      same = recorded_[b].first == running_[b]->serial && recorded_[b].second == running_[b]->run->graphs_version;
    if (!same) record();
    step_->replay();
    for (auto& s : running_) s->run->fed(s->run->res.tokens.back());
  }
  for (auto& s : solo) running_.push_back(std::move(s));
  std::vector<std::unique_ptr<Sequence>> going;
  for (auto& s : running_) {
    s->run->next();
    if (s->run->going) going.push_back(std::move(s));
    else finished_.push_back({s->tag, s->run->finish()});
  }
  running_ = std::move(going);
  return advanced;
}

std::vector<DecodeBatch::Finished> DecodeBatch::take_finished() {
  std::vector<Finished> out;
  out.swap(finished_);
  return out;
}

}  // namespace vkvlm
