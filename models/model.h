#pragma once
// A loaded model (weights, tokenizer, chat template, architecture and vision path) and sessions
// that generate with it: prompt building, prefill, a recorded-once decode step replayed per
// token, sampling, stop handling and streaming. Nothing here knows one architecture from
// another: it asks the Architecture (models/arch/).
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gpu/context.h"
#include "host/image.h"
#include "host/chat_template.h"
#include "host/safetensors.h"
#include "host/sampler.h"
#include "host/tokenizer.h"
#include "models/arch/architecture.h"
#include "models/decoder.h"
#include "models/model_config.h"
#include "models/prompt.h"

namespace vkvlm {

struct GenerationParams {
  int max_tokens = 256;
  SamplingParams sampling;
  std::vector<std::string> stop;  // stop strings (not included in the output)
  bool logprobs = false;          // log-probability of each chosen token
  int top_logprobs = 0;           // alternatives per step, with their log-probabilities (<= 20)
  int top_logits = 0;             // raw [id, logit] pairs per step, best first (<= 64)
  bool ignore_eos = false;
  // Speculative decoding: tokens a draft (a draft model, or prompt lookup) proposes per step,
  // all verified by the model in one forward pass.
  int num_draft_tokens = 3;
  int lookup_ngram = 0;  // prompt lookup: drafts follow the last earlier match of the context's last N tokens

  // The one place generation parameters from outside (CLI, server, C API) are range-checked.
  void validate() const;
};

struct StepOutput {
  int32_t token = -1;
  std::string text;  // text that became final with this step (may be empty)
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top_logprobs;
  std::vector<std::pair<int32_t, float>> top_logits;
};

struct GenerationResult {
  std::vector<int32_t> prompt_tokens;  // as fed to the model (image rows as Prompt::ids has them)
  std::vector<int32_t> tokens;         // generated ids
  std::string text;
  std::string finish_reason;           // "stop", "length", or "cancelled"
  int64_t cached_tokens = 0;           // prompt tokens whose KV came from the previous turn
  int64_t prefill_tokens = 0;          // prompt tokens computed
  int64_t draft_tokens = 0;            // tokens a draft proposed (speculative decoding)
  int64_t accepted_tokens = 0;         // of those, the ones the model accepted
  double prefill_seconds = 0, decode_seconds = 0, image_seconds = 0;
  std::vector<StepOutput> steps;

  // Computed prompt tokens per second, and generated tokens per second after the first (0 where
  // there was none).
  double prefill_tokens_per_second() const { return prefill_seconds > 0 ? double(prefill_tokens) / prefill_seconds : 0; }
  double decode_tokens_per_second() const {
    return decode_seconds > 0 && tokens.size() > 1 ? double(tokens.size() - 1) / decode_seconds : 0;
  }
};

// Called after each generated token; returning false stops generation ("cancelled").
using StepCallback = std::function<bool(const StepOutput&)>;
// Asked before the images and between prefill chunks; true stops before the first token (a
// server's client that went away while its prompt was being read).
using CancelCheck = std::function<bool()>;

// Where a conversation's images go, in order: an image part that a caller supplies the image
// for, an image_url part (its URL), or a placeholder written in text (e.g. <|image_1|>).
struct ImageSlot {
  enum class Kind { Part, Url, Placeholder } kind = Kind::Part;
  std::string url;
};

// The images a conversation asks for, in order: image parts, and the placeholders the
// architecture recognizes in its text.
std::vector<ImageSlot> image_slots(const ModelConfig& config, const Messages& messages);

class Model {
 public:
  Model(gpu::Context& ctx, const std::string& dir, LoadOptions options = {});
  ~Model();

  gpu::Context& context() { return ctx_; }
  const ModelConfig& config() const { return cfg_; }
  const Architecture& architecture() const { return *cfg_.arch; }
  const Tokenizer& tokenizer() const { return *tok_; }
  const LanguageModel& lm() const { return *lm_; }
  const VisionPath* vision() const { return vision_.get(); }
  const std::string& dir() const { return cfg_.dir; }
  const std::vector<int32_t>& eos_ids() const { return eos_; }
  bool has_chat_template() const { return template_.available(); }

  // The chat template applied to messages (content: a string or a list of parts {"type":
  // "text"|"image", ...}), as transformers' apply_chat_template renders it; `template_vars`
  // (a JSON object) adds variables, as apply_chat_template's keyword arguments do.
  std::string render_chat(const Messages& messages, bool add_generation_prompt = true,
                          const nlohmann::json& template_vars = nullptr) const;
  std::vector<ImageSlot> image_slots(const Messages& messages) const { return vkvlm::image_slots(cfg_, messages); }
  // The prompt for messages and the images their slots stand for, in order. When the text has
  // as many placeholders as there are image parts (Phi-3-Vision's documented prompt sent with
  // image_url parts), the parts' images fill the placeholders. Throws when the counts differ,
  // naming both, or when the conversation does not suit the architecture.
  // Without `add_generation_prompt`, the conversation as a prefix of its continuations (what a
  // prompt cache holds).
  Prompt build_prompt(const Messages& messages, const std::vector<Image>& images,
                      const nlohmann::json& template_vars = nullptr, bool add_generation_prompt = true) const;
  // The conversation as this model sees it when it drafts for another: with its images when it
  // has a vision tower, its text alone otherwise.
  Prompt build_draft_prompt(const Messages& messages, const std::vector<Image>& images,
                            const nlohmann::json& template_vars = nullptr) const;
  // What a prompt cache of the conversation holds: the rows it shares with every continuation,
  // i.e. rendered without a generation prompt, less the tokens that rendering it with one would
  // tokenize differently (LLaVA's template ends a user turn with a space that joins the next word).
  Prompt build_cacheable_prompt(const Messages& messages, const std::vector<Image>& images,
                                const nlohmann::json& template_vars = nullptr) const;
  // A prompt from raw text (no chat template), with the tokenizer's special tokens.
  Prompt build_raw_prompt(const std::string& text) const;

  // One line per fact: architecture, sizes, processor, image tokens, quantization, memory.
  std::string info(int64_t context_tokens, const KvFormat& kv_format = {}) const;
  uint64_t weight_bytes() const;
  // Identity of what this model computes, for prompt caches: config.json, every tensor's name,
  // dtype, shape and samples of its bytes, the tokenizer and the load-time quantization.
  const std::string& fingerprint() const { return fingerprint_; }

 private:
  gpu::Context& ctx_;
  ModelConfig cfg_;
  std::shared_ptr<const TensorStore> store_;
  std::unique_ptr<Tokenizer> tok_;
  ChatTemplate template_;
  std::unique_ptr<LanguageModel> lm_;
  std::unique_ptr<VisionPath> vision_;
  std::vector<int32_t> eos_;
  std::string fingerprint_;
};

class Session;
class DecodeBatch;

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
  friend class DecodeBatch;
  struct DecodeGraphs;
  struct VerifyGraph;
  struct Drafting;
  struct Run;
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
  // A generation up to its first token: the prompt prepared, the graphs recorded and (unless
  // `first_token` is false: speculative decoding emits it itself) the first token emitted.
  std::unique_ptr<Run> start(const Prompt& prompt, const GenerationParams& params, const StepCallback& on_step,
                             const CancelCheck& cancelled, bool first_token);
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

// The bundled demo model (models/shapes-llava): $VKVLM_MODEL, next to the executable's build
// tree, installed under share/vkvlm, or in the source tree. Throws when none is found.
std::string default_model_dir();

// Hash of a byte string (FNV-1a, 64-bit), for image identity in KV reuse.
uint64_t hash_bytes(const void* data, size_t n, uint64_t seed = 1469598103934665603ull);

}  // namespace vkvlm
