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

// The bundled demo model (models/shapes-llava): $VKVLM_MODEL, next to the executable's build
// tree, installed under share/vkvlm, or in the source tree. Throws when none is found.
std::string default_model_dir();

// Hash of a byte string (FNV-1a, 64-bit), for image identity in KV reuse.
uint64_t hash_bytes(const void* data, size_t n, uint64_t seed = 1469598103934665603ull);

}  // namespace vkvlm
