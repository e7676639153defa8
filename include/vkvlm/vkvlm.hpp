#pragma once
// vkvlm's C++ API: run vision-language models on any Vulkan device, on a device vkvlm creates or
// on the application's own. Self-contained: it includes none of the library's internal headers.
//
//   auto engine = vkvlm::Engine::load("path/to/llava-1.5-7b-hf");
//   vkvlm::Chat chat(*engine, 4096);
//   auto result = chat.generate(R"([{"role": "user", "content":
//       [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}])",
//       {vkvlm::read_file("photo.jpg")}, {},
//       [](const vkvlm::Step& step) { std::cout << step.text << std::flush; return true; });
//
// Errors are thrown as std::runtime_error whose message says what is wrong and where.
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <vulkan/vulkan.h>

namespace vkvlm {

// The application's Vulkan objects, for running on its device: vkvlm creates and destroys none
// of them. enabled_features: the chain the device was created with (VkPhysicalDeviceFeatures2
// with Vulkan 1.1/1.2/1.3 feature structs in pNext), since Vulkan cannot be asked for it later
// (null: vkvlm uses no optional feature).
struct VulkanDevice {
  VkInstance instance = VK_NULL_HANDLE;
  VkPhysicalDevice physical_device = VK_NULL_HANDLE;
  VkDevice device = VK_NULL_HANDLE;
  uint32_t queue_family = 0, queue_index = 0;
  const VkPhysicalDeviceFeatures2* enabled_features = nullptr;
  std::vector<std::string> enabled_extensions;
  // The application's lock on the queue, when it submits to it too: vkvlm takes it around each
  // of its submits and queue waits (both or neither).
  std::function<void()> lock_queue, unlock_queue;
};

struct EngineOptions {
  std::string quantize;   // "", "q4" or "q8": quantize float language-model weights while loading
  bool progress = false;  // a progress bar on stderr while loading (when it is a terminal)
  // Speculative decoding: a smaller model with the same vocabulary that drafts tokens for this
  // one to verify ("": none). Greedy answers are identical with and without it.
  std::string draft_model;
};

// A conversation's KV cache: f16 (bits 16), or MLX affine quantization (bits 4 or 8) in groups of
// group_size (32, 64, 128) along each head, the first quantized_start rows kept in f16.
struct KvCacheOptions {
  int bits = 16;
  int group_size = 64;
  int64_t quantized_start = 0;
};

struct GenerateOptions {
  int max_tokens = 256;
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f, min_p = 0.0f, repeat_penalty = 1.0f;
  int top_k = 0;
  std::optional<uint64_t> seed;   // none: a random seed
  std::vector<std::string> stop;  // stop strings (not included in the text)
  bool ignore_eos = false;
  bool logprobs = false;          // each step's log-probability
  int top_logprobs = 0;           // alternatives per step (<= 20)
  std::string template_vars;      // a JSON object of extra chat-template variables, e.g. {"add_vision_id": true}
  int num_draft_tokens = 3;       // tokens the draft model proposes per round (1..16)
  int lookup_ngram = 0;           // without a draft model: draft by prompt lookup on n-grams (0: off)
};

// One generated token.
struct Step {
  int32_t token = -1;
  std::string text;  // text that became final with this token (may be empty)
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top_logprobs;
};

struct Result {
  std::string text;
  std::string finish_reason;  // "stop", "length" or "cancelled"
  std::vector<int32_t> prompt_tokens, tokens;
  int64_t cached_tokens = 0;  // prompt tokens whose KV cache came from the previous turn
  int64_t draft_tokens = 0, accepted_tokens = 0;  // speculative decoding's proposals, and those kept
  double image_seconds = 0, prefill_seconds = 0, decode_seconds = 0;
  std::vector<Step> steps;
};

// Called for each generated token; return false to stop ("cancelled").
using OnStep = std::function<bool(const Step&)>;

// A device and a model loaded on it: a Hugging Face or mlx-community checkpoint folder, or a
// repo id (ORG/NAME[@REVISION]) already in the local Hugging Face cache.
class Engine {
 public:
  static std::unique_ptr<Engine> load(const std::string& model_dir, const EngineOptions& options = {});
  static std::unique_ptr<Engine> load_on_device(const std::string& model_dir, const VulkanDevice& device,
                                                const EngineOptions& options = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // The model's description (architecture, sizes, image tokens, memory for a context).
  std::string info(int64_t context_tokens) const;
  std::string device_name() const;
  // Loads (or replaces) the draft model EngineOptions::draft_model names, on this device; Chats
  // created afterwards draft with it.
  void load_draft(const std::string& draft_model_dir, const EngineOptions& options = {});

  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A conversation with its own KV cache on the engine's device: a follow-up turn reuses what the
// previous one computed.
class Chat {
 public:
  // rotating: a cache of context_tokens rows that generation goes on past, keeping the first 4
  // tokens and the most recent ones (mlx-lm's --max-kv-size); identical until it fills.
  // kv: how the cache stores K and V (quantized: mlx-lm's --kv-bits).
  Chat(Engine& engine, int64_t context_tokens, bool rotating = false, const KvCacheOptions& kv = {});
  ~Chat();
  Chat(const Chat&) = delete;
  Chat& operator=(const Chat&) = delete;

  // messages_json: a JSON array of {"role", "content"} messages; content is a string or a list
  // of {"type": "text", "text"}, {"type": "image"} and {"type": "image_url", "image_url":
  // {"url": "data:..."}} parts. images: encoded files (PNG, JPEG, WebP, ...) for the image parts
  // and the placeholders written in the text (e.g. Phi-3-Vision's <|image_1|>), in order.
  Result generate(const std::string& messages_json, const std::vector<std::vector<uint8_t>>& images,
                  const GenerateOptions& options = {}, const OnStep& on_step = {});
  // Forgets the cached conversation.
  void reset();

  // Prompt caches on disk: computes the conversation's KV cache (as a prefix of its
  // continuations: no generation prompt) and writes it to `path`; returns its tokens.
  int64_t save_prompt_cache(const std::string& messages_json, const std::vector<std::vector<uint8_t>>& images,
                            const std::string& path, const std::string& template_vars = {});
  // Starts this chat from a prompt cache's conversation: a generate whose conversation extends
  // it computes only what follows (Result::cached_tokens says how much came from the file).
  // Throws for a cache of another model or KV format, a context too small, or a damaged file.
  int64_t load_prompt_cache(const std::string& path);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A file's bytes (for images); throws when it cannot be read.
std::vector<uint8_t> read_file(const std::string& path);
// Raw pixels as an image generate takes: 8-bit RGB, row-major, width * height * 3 bytes, wrapped
// as a binary PPM (a header and the bytes as they are; nothing is compressed or converted).
// Throws std::invalid_argument for sizes that do not match.
std::vector<uint8_t> rgb_image(const uint8_t* pixels, int width, int height);

}  // namespace vkvlm
