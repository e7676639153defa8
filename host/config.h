#pragma once
// The pieces of a checkpoint's config.json that do not depend on the architecture: typed field
// access whose errors name the file and the key, the decoder language model's config (sizes,
// RoPE, and the traits that tell the decoder families apart), the generic ViT config, MLX
// quantization and the token ids of generation_config.json. Each architecture (models/arch/)
// reads the rest.
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace vkvlm {

// Reads a JSON file; errors name the file.
nlohmann::json read_json_file(const std::string& path);

// Typed, range-checked access to one JSON object; every error names `where` and the key.
class ConfigFields {
 public:
  ConfigFields(const nlohmann::json& j, std::string where);

  const nlohmann::json& raw() const { return j_; }
  const std::string& where() const { return where_; }
  bool has(const char* k) const;
  int64_t integer(const char* k) const;  // required
  int64_t integer(const char* k, int64_t dflt) const;
  // Required / defaulted, and within [lo, hi].
  int64_t integer_in(const char* k, int64_t lo, int64_t hi) const;
  int64_t integer_in(const char* k, int64_t dflt, int64_t lo, int64_t hi) const;
  double number(const char* k, double dflt) const;
  double number_in(const char* k, double dflt, double lo, double hi) const;
  std::string string(const char* k, const std::string& dflt) const;
  bool boolean(const char* k, bool dflt) const;
  std::vector<double> numbers(const char* k) const;
  std::vector<int64_t> integers(const char* k) const;
  // A nested object (required), as fields of its own.
  ConfigFields object(const char* k) const;
  bool has_object(const char* k) const;

 private:
  const nlohmann::json& j_;
  std::string where_;
};

struct RopeConfig {
  double theta = 10000.0;
  int rot_dim = 0;  // rotated dimensions per head (head_dim unless partial rotary)
  // "default", "linear", "llama3", "longrope" (Phi-3's su)
  std::string type = "default";
  double factor = 1.0;  // linear / llama3
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3
  int64_t original_max_position = 0;  // llama3, longrope
  std::vector<double> short_factor, long_factor;  // longrope
  double attention_factor = 1.0;  // longrope: cos/sin scale
  // M-RoPE (Qwen2-VL): frequencies per position component (temporal, height, width), summing to
  // rot_dim / 2; empty: one position per token.
  std::vector<int> sections;

  // Per-dimension frequency divisors for a sequence of `seq_len` tokens (empty: none) and the
  // cos/sin scale; the long LongRoPE table applies past original_max_position.
  std::vector<double> factors_for(int64_t seq_len) const;
  bool uses_long_factors(int64_t seq_len) const;
  int positions_per_token() const { return sections.empty() ? 1 : int(sections.size()); }
};

// The decoder's activation in its gated MLP: down(act(gate) * up).
enum class MlpActivation { Silu, GeluTanh };

// One decoder layer's traits, built once from the config (by the family's defaults, or by an
// architecture whose layers differ); the forward pass branches on a layer's traits, never on a
// family's name.
struct LayerTraits {
  int window = 0;  // sliding attention window in tokens (0: the whole context)
  MlpActivation activation = MlpActivation::Silu;
};

// A pre-norm decoder (Llama, Mistral, Phi-3, Qwen2, Gemma): sizes, and the traits that tell
// the families apart, read from the config rather than from the family's name.
struct TextConfig {
  std::string family;  // llama, mistral, phi3, qwen2, gemma
  int64_t vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_layers = 0;
  int num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t max_position = 4096;
  double rms_eps = 1e-6;
  bool attention_bias = false;   // q/k/v biases (Qwen2)
  bool tie_embeddings = false;   // the output head is the embedding
  bool norm_plus_one = false;    // RMSNorm multiplies by (1 + w) (Gemma)
  double embed_scale = 1.0;      // input embeddings are multiplied by it (Gemma: sqrt(hidden))
  RopeConfig rope;
  std::vector<LayerTraits> layers;  // [num_layers]

  // The smallest sliding window of any layer (0: no layer has one).
  int smallest_window() const;
};

// What a decoder family's config class assumes where config.json is silent, and which keys it
// reads: each family's are in models/arch/text_families.cpp, next to the architectures.
struct TextDefaults {
  std::string family;
  int head_dim = 0;                      // 0: hidden_size / num_attention_heads
  std::string activation_key = "hidden_act", activation = "silu";
  bool norm_plus_one = false;            // RMSNorm multiplies by (1 + w)
  bool embed_scale_sqrt_hidden = false;  // input embeddings multiplied by sqrt(hidden_size)
  bool attention_bias = false;
  bool tie_embeddings = false;
  bool sliding_window = true;            // the family reads sliding_window at all
  bool use_sliding_window = true;        // use_sliding_window's default when sliding_window is set
};

// A language model's config: `j` is config.json itself for plain causal LMs, or its
// text_config, read with its family's defaults; every layer gets the same traits.
TextConfig parse_text_config(const nlohmann::json& j, const std::string& where, const TextDefaults& family);

// A ViT as CLIP and SigLIP configs describe it (vision_config).
struct VisionConfig {
  std::string model_type;
  int64_t hidden_size = 1024, intermediate_size = 4096;
  int num_layers = 24, num_heads = 16, num_channels = 3;
  int image_size = 336, patch_size = 14;
  double layer_norm_eps = 1e-5;
  std::string hidden_act = "quick_gelu";
};
// Reads vision_config; `defaults` supplies what a key leaves out (CLIP ViT-L/14-336 for
// LLaVA, the SigLIP So400m/14 sizes for PaliGemma).
VisionConfig parse_vision_config(const nlohmann::json& j, const std::string& where, const VisionConfig& defaults);

struct QuantSpec {
  int bits = 0, group_size = 0;  // 0 bits: not quantized
};
// MLX's `quantization` block: the default and per-module overrides (false: not quantized).
struct Quantization {
  QuantSpec spec;
  std::map<std::string, QuantSpec> overrides;
};
// From config.json's `quantization` (or `quantization_config` in MLX form); none: bits 0.
Quantization parse_quantization(const nlohmann::json& config, const std::string& where);

// eos_token_id from config.json (top level and text_config) and generation_config.json
// (which wins, as in transformers).
std::vector<int64_t> eos_token_ids(const nlohmann::json& config, const nlohmann::json* generation, const std::string& where);

}  // namespace vkvlm
