#pragma once
// A conversation on a model (Session): its KV cache and the rows it holds (session.cpp), the
// generations it runs (generation.cpp) and speculative decoding (speculative.cpp). DecodeBatch
// (batch.h) advances several sessions' generations together.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "models/model.h"

namespace vkvlm {

class Session;

// Speculative decoding with a draft model: a session of the draft (its own KV cache, kept across
// turns like the model's) and the conversation as the draft sees it (a text-only draft of a
// vision model sees its text). The draft must share the model's vocabulary.
struct Speculation {
  Session* draft = nullptr;
  const Prompt* draft_prompt = nullptr;
};

// Throws unless `draft` can draft for `target`: the same vocabulary size and the same ids for
// the special tokens, naming both models.
void check_draft_model(const Model& target, const Model& draft);

class Session {
 public:
  // A conversation with a KV cache of `context_tokens` rows. Rotating (mlx-lm's
  // RotatingKVCache, --max-kv-size): once the rows are full, generation goes on, each new token
  // taking the row of the oldest one after the first `kRotatingKeep`; until then nothing differs.
  // The prompt must fit; a conversation that wrapped is recomputed on the next turn.
  // `kv`: how the cache stores K and V (f16, or quantized: --kv-bits).
  Session(Model& model, int64_t context_tokens, bool rotating = false, const KvFormat& kv = {});
  static constexpr int64_t kRotatingKeep = 4;
  ~Session();

  int64_t context_tokens() const { return capacity_; }
  const KvFormat& kv_format() const { return cache_.format; }
  uint64_t kv_bytes() const { return cache_.bytes(); }
  // Generates a continuation of prompt. KV rows shared with the previous call's prompt and
  // output are reused. Throws (before touching the cache) when the prompt does not fit.
  // With a draft (or params.lookup_ngram), speculative decoding: greedy tokens are identical to
  // generating without it, sampled ones are distributed identically.
  GenerationResult generate(const Prompt& prompt, const GenerationParams& params, const StepCallback& on_step = {},
                            const CancelCheck& cancelled = {}, const Speculation& speculation = {});
  // Logits [vocab] at the last prompt position (fills the cache like generate does).
  std::vector<float> prompt_logits(const Prompt& prompt);
  // Forgets the cached conversation.
  void reset();

  // Rows currently in the KV cache.
  const std::vector<uint64_t>& cached_keys() const { return cached_keys_; }
  const Model& model() const { return model_; }

  // A generation advanced one step at a time from outside (DecodeBatch); its interface is in
  // models/session_run.h. start: the prompt prepared (images, prefill, reusing cached rows) and,
  // with `first_token`, the first token emitted.
  struct Run;
  std::unique_ptr<Run> start(const Prompt& prompt, const GenerationParams& params, const StepCallback& on_step,
                             const CancelCheck& cancelled, bool first_token);
  // What one decode step of this session reads and writes, for a step recorded outside it: the
  // token to embed, its KV row and RoPE position(s) (a run stages them before each step), the
  // cache and RoPE table, and the logits the run's sampling tail reads.
  struct DecodeInputs {
    gpu::Tensor token;      // i32 [1]
    gpu::Tensor kv_row;     // i32 [2]: the token's row, and (rotating) how many rows are written
    gpu::Tensor positions;  // i32 [1, components]
    const KvCache* cache = nullptr;
    const gpu::Tensor* rope_table = nullptr;
    bool rotating = false;
    gpu::Tensor logits;     // f32 [1, vocab]
  };
  DecodeInputs decode_inputs() const;
  // Records the run's sampling tail (over decode_inputs().logits) into rec.
  void record_sampling_tail(gpu::Recorder& rec, Run& run);

  // Prompt caches on disk (models/prompt_cache.cpp). save: computes the prompt's KV cache and
  // writes it to one safetensors file with its token ids, row keys (the images' fingerprints
  // among them), positions and the model's identity. load: makes the file's rows this session's
  // cached conversation, which a prompt extending it continues without recomputing them; throws,
  // naming the file and what differs, for another model, KV format or a context too small, and
  // for a truncated or corrupted file. Returns the rows.
  // `notes` go into the metadata as they are (the CLI keeps the conversation there).
  int64_t save_prompt_cache(const Prompt& prompt, const std::string& path,
                            const std::map<std::string, std::string>& notes = {});
  struct LoadedPromptCache {
    int64_t rows = 0;
    std::map<std::string, std::string> metadata;
  };
  LoadedPromptCache load_prompt_cache(const std::string& path);

 private:
  struct DecodeGraphs;
  struct VerifyGraph;
  struct Drafting;
  struct Prepared {
    std::vector<gpu::Tensor> features;  // per image; computed for images the prefill needed
    int64_t reused = 0, computed = 0;
    double image_seconds = 0, prefill_seconds = 0;
    bool cancelled = false;  // stopped before the whole prompt was in the cache
  };
  // Checks the prompt, reuses the cached prefix, encodes images and prefills the rest, leaving
  // the logits of the last prompt row in logits_.
  Prepared prepare(const Prompt& prompt, const CancelCheck& cancelled = {});
  // How many cached rows the prompt can keep.
  int64_t reusable_rows(const Prompt& prompt, bool long_factors) const;
  // The speculative loop of a run (speculative.cpp): drafts, one verification pass, acceptance.
  void speculate(Run& run, const Speculation& speculation);
  // The RoPE table for the current factors, covering positions [0, positions).
  void ensure_rope(bool long_factors, int64_t positions);
  // Fills the cache for prompt rows [from, to) and leaves the logits of row to - 1; returns the
  // row it reached (before `to` only when `cancelled` said so between chunks).
  int64_t prefill(const Prompt& prompt, const std::vector<gpu::Tensor>& image_features, int64_t from, int64_t to,
                  const CancelCheck& cancelled = {});
  // Records the sampling tail and the decode step (replayed for every token).
  std::unique_ptr<DecodeGraphs> record_graphs(const Prompt& prompt, const GenerationParams& params);
  // The sampling tail over logits_: top candidates, log Z, the repetition penalty.
  void record_tail(gpu::Recorder& rec, DecodeGraphs& g);
  // This step's sampled token and what the caller asked to see of it.
  StepOutput sample_step(DecodeGraphs& g, Sampler& sampler, const GenerationParams& params);
  // One replay of the decode step: the token at KV row `row`, RoPE position `position`. In
  // parts: what the step reads (uploaded before a replay, this session's or a batch's), and
  // the cache's bookkeeping after it.
  void feed(DecodeGraphs& g, int32_t token, int64_t row, int64_t position);
  void stage_feed(DecodeGraphs& g, int32_t token, int64_t row, int64_t position);
  void after_feed(int32_t token, int64_t row);
  // Adds a token to the repetition penalty's list (feed does it for the tokens it feeds).
  void note_seen(DecodeGraphs& g, int32_t token);
  // The verification pass of speculative decoding: `rows` tokens at consecutive KV rows and
  // positions from one forward, their logits [rows, vocab] read back.
  std::unique_ptr<VerifyGraph> record_verify(int64_t rows);
  // As a draft: starts drafting after `prompt` (prefilled, reusing the cache), and the logits
  // after feeding `tokens` past it (rolled back to what they share with what was fed before).
  void draft_begin(const Prompt& prompt);
  std::vector<float> draft_logits(const std::vector<int32_t>& tokens);
  bool draft_can_feed(size_t tokens) const;
  // Phi-3's LongRoPE: once a conversation grows past the original context, the reference
  // recomputes it with the long factors; so does this, once.
  void switch_to_long_factors(const Prompt& prompt, const std::vector<int32_t>& generated,
                              std::vector<gpu::Tensor>& features);

  Model& model_;
  gpu::Context& ctx_;
  int64_t capacity_ = 0;
  bool rotating_ = false;
  bool wrapped_ = false;           // rotating: rows were overwritten (no reuse by key)
  // The KV row of a conversation's i-th token (i itself unless the cache rotates).
  int64_t physical_row(int64_t i) const {
    return !rotating_ || i < capacity_ ? i : kRotatingKeep + (i - kRotatingKeep) % (capacity_ - kRotatingKeep);
  }
  std::unique_ptr<Drafting> drafting_;  // while this session drafts for another
  KvCache cache_;
  std::vector<uint64_t> cached_keys_;
  std::vector<BidirectionalSpan> cached_spans_;  // the bidirectional spans the cached rows were computed with
  bool rope_long_ = false;
  int64_t rope_positions_ = 0;     // positions rope_table_ covers
  gpu::Tensor rope_table_;         // f32 [rope_positions_, rot/2, 2] for the current factors
  gpu::Tensor kv_row_;             // i32 [2], host-visible: the KV row of a decode step's token,
                                   // and (rotating) the rows written
  gpu::Tensor positions_;          // i32 [1, components], host-visible: its RoPE position(s)
  gpu::Tensor token_;              // i32 [1], host-visible: the token a decode step embeds
  gpu::Tensor logits_;             // f32 [1, vocab]
};

}  // namespace vkvlm
