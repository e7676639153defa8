#pragma once
// Model configuration read from a checkpoint folder's config.json (and generation_config.json),
// in the layouts transformers 4 and 5 and mlx-community write.
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace vkvlm {

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

  // Per-dimension frequency divisors for a sequence of `seq_len` tokens (empty: none) and the
  // cos/sin scale; the long LongRoPE table applies past original_max_position.
  std::vector<double> factors_for(int64_t seq_len) const;
  bool uses_long_factors(int64_t seq_len) const;
};

struct TextConfig {
  std::string model_type;  // llama, mistral, phi3, qwen2
  int64_t vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_layers = 0;
  int num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t max_position = 4096;
  double rms_eps = 1e-6;
  std::string hidden_act = "silu";
  bool attention_bias = false;  // q/k/v biases (Qwen2)
  bool tie_embeddings = false;
  int sliding_window = 0;
  RopeConfig rope;
};

struct VisionConfig {
  std::string model_type = "clip_vision_model";
  int64_t hidden_size = 1024, intermediate_size = 4096;
  int num_layers = 24, num_heads = 16, num_channels = 3;
  int image_size = 336, patch_size = 14;
  double layer_norm_eps = 1e-5;
  std::string hidden_act = "quick_gelu";
};

struct QuantSpec {
  int bits = 0, group_size = 0;  // 0 bits: not quantized
};

struct ModelConfig {
  std::string dir;
  std::string model_type;     // llava, llava_next, phi3_v, or a plain causal LM type
  std::string architecture;   // architectures[0]
  TextConfig text;
  std::optional<VisionConfig> vision;
  // LLaVA / LLaVA-NeXT
  int64_t image_token_index = -1;
  int vision_feature_layer = -2;
  std::string vision_feature_select_strategy = "default";
  std::string projector_hidden_act = "gelu";
  bool projector_bias = true;
  int64_t image_seq_length = 576;
  std::vector<std::pair<int, int>> image_grid_pinpoints;  // (height, width)
  // Phi-3-Vision
  int64_t phi3v_image_dim_out = 1024;
  int phi3v_num_img_tokens = 144;
  std::string phi3v_hd_transform_order = "sub_glb";
  // MLX quantization: default spec plus per-module overrides.
  QuantSpec quantization;
  std::map<std::string, QuantSpec> quantization_overrides;
  // generation_config.json
  std::vector<int64_t> eos_token_ids;
  int64_t bos_token_id = -1, pad_token_id = -1;
  nlohmann::json generation;  // the raw file (or empty)
  nlohmann::json raw;         // config.json

  bool is_vlm() const { return vision.has_value(); }
};

// Reads config.json (+ generation_config.json) of a checkpoint folder; every missing or wrong
// field is an error that names the file and the field.
ModelConfig load_model_config(const std::string& dir);

}  // namespace vkvlm
