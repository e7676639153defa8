#pragma once
// A loaded model (weights, tokenizer, chat template, image processor) and sessions that generate
// with it: prompt building, prefill, a recorded-once decode step replayed per token, sampling,
// stop handling and streaming.
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gpu/context.h"
#include "gpu/recorder.h"
#include "host/config.h"
#include "host/image.h"
#include "host/jinja.h"
#include "host/safetensors.h"
#include "host/sampler.h"
#include "host/tokenizer.h"
#include "models/llm.h"
#include "models/vision.h"

namespace vkvlm {

using Messages = nlohmann::ordered_json;

struct GenerationParams {
  int max_tokens = 256;
  SamplingParams sampling;
  std::vector<std::string> stop;  // stop strings (not included in the output)
  bool logprobs = false;          // log-probability of each chosen token
  int top_logprobs = 0;           // alternatives per step, with their log-probabilities (<= 20)
  int top_logits = 0;             // raw [id, logit] pairs per step, best first (<= 64)
  bool ignore_eos = false;

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
  std::vector<int32_t> prompt_tokens;  // as fed to the model (image positions as the model's image token)
  std::vector<int32_t> tokens;         // generated ids
  std::string text;
  std::string finish_reason;           // "stop", "length", or "cancelled"
  int64_t cached_tokens = 0;           // prompt tokens whose KV came from the previous turn
  int64_t prefill_tokens = 0;          // prompt tokens computed
  double prefill_seconds = 0, decode_seconds = 0, image_seconds = 0;
  std::vector<StepOutput> steps;
};

// Called after each generated token; returning false stops generation ("cancelled").
using StepCallback = std::function<bool(const StepOutput&)>;

// An image's place in the prompt: `length` positions from `position` take its features.
struct ImageSpan {
  int64_t position = 0, length = 0;
  size_t image = 0;  // index into Prompt::images
};

struct Prompt {
  std::vector<int32_t> ids;   // what the model sees at text positions; image positions hold image_token
  std::vector<uint64_t> keys; // per position: identity for KV reuse (token id, or image hash and offset)
  std::vector<ImageSpan> spans;
  std::vector<ProcessedImage> images;
  std::string text;           // the rendered chat prompt
};

class Model {
 public:
  Model(gpu::Context& ctx, const std::string& dir, LoadOptions options = {});
  ~Model();

  gpu::Context& context() { return ctx_; }
  const ModelConfig& config() const { return cfg_; }
  const Tokenizer& tokenizer() const { return *tok_; }
  const LanguageModel& lm() const { return *lm_; }
  const VisionModel* vision() const { return vision_.get(); }
  const std::string& dir() const { return cfg_.dir; }
  const std::vector<int32_t>& eos_ids() const { return eos_; }

  // The chat template applied to messages (content: a string or a list of parts {"type":
  // "text"|"image", ...}), as transformers' apply_chat_template renders it.
  std::string render_chat(const Messages& messages, bool add_generation_prompt = true) const;
  // The prompt for messages and the images their image parts stand for, in order. Throws when
  // the counts of images and image parts differ, naming both.
  Prompt build_prompt(const Messages& messages, const std::vector<Image>& images) const;
  // A prompt from raw text (no chat template), with the tokenizer's special tokens.
  Prompt build_raw_prompt(const std::string& text) const;

  // One line per fact: architecture, sizes, quantization, memory.
  std::string info(int64_t context_tokens) const;
  uint64_t weight_bytes() const;

 private:
  gpu::Context& ctx_;
  ModelConfig cfg_;
  std::unique_ptr<TensorStore> store_;
  std::unique_ptr<Tokenizer> tok_;
  std::unique_ptr<jinja::Template> template_;
  std::map<std::string, jinja::Value> template_tokens_;  // bos_token, eos_token, ...
  std::unique_ptr<LanguageModel> lm_;
  std::unique_ptr<VisionModel> vision_;
  std::vector<int32_t> eos_;
  bool add_special_tokens_ = true;  // processors (VLMs) add BOS; plain chat LMs render it in the template
};

class Session {
 public:
  // A conversation with a KV cache of `context_tokens` positions.
  Session(Model& model, int64_t context_tokens);
  ~Session();

  int64_t context_tokens() const { return capacity_; }
  // Generates a continuation of prompt. KV entries shared with the previous call's prompt and
  // output are reused. Throws (before touching the cache) when the prompt does not fit.
  GenerationResult generate(const Prompt& prompt, const GenerationParams& params, const StepCallback& on_step = {});
  // Logits [vocab] at the last prompt position (fills the cache like generate does).
  std::vector<float> prompt_logits(const Prompt& prompt);
  // Forgets the cached conversation.
  void reset();

  // Positions currently in the KV cache.
  const std::vector<uint64_t>& cached_keys() const { return cached_keys_; }

 private:
  struct Graphs;
  struct Prepared {
    std::vector<gpu::Tensor> features;  // per image; computed for images the prefill needed
    int64_t reused = 0, computed = 0;
    double image_seconds = 0, prefill_seconds = 0;
  };
  // Checks the prompt, reuses the cached prefix, encodes images and prefills the rest, leaving
  // the logits of the last prompt position in logits_.
  Prepared prepare(const Prompt& prompt);
  void ensure_rope(bool long_factors);
  // Fills the cache for prompt positions [from, to) (chunked) and leaves logits of position to-1.
  void prefill(const Prompt& prompt, const std::vector<gpu::Tensor>& image_features, int64_t from, int64_t to);

  Model& model_;
  gpu::Context& ctx_;
  int64_t capacity_ = 0;
  KvCache cache_;
  std::vector<uint64_t> cached_keys_;
  bool rope_long_ = false;
  gpu::Tensor rope_table_;  // f32 [capacity, rot/2, 2] for the current factors
  gpu::Tensor step_;        // i32 [1], host-visible: position of the first token of a forward
  gpu::Tensor token_;       // i32 [1], host-visible: the token a decode step embeds
  gpu::Tensor logits_;      // f32 [1, vocab]
};

// The bundled demo model (models/shapes-llava): $VKVLM_MODEL, next to the executable's build
// tree, installed under share/vkvlm, or in the source tree. Throws when none is found.
std::string default_model_dir();

// Hash of a byte string (FNV-1a, 64-bit), for image identity in KV reuse.
uint64_t hash_bytes(const void* data, size_t n, uint64_t seed = 1469598103934665603ull);

}  // namespace vkvlm
