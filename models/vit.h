#pragma once
// The vision transformer the vision-language models share, as a sequence of GPU ops. What tells
// CLIP, SigLIP and Qwen2-VL's tower apart is data: the traits (class token, pre/post LayerNorm,
// MLP activation, learned or 2-D rotary positions, conv bias, pixels or patch rows as input)
// and the names of its tensors.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "gpu/context.h"
#include "gpu/ops.h"
#include "host/config.h"
#include "models/weights.h"

namespace vkvlm {

struct VitTraits {
  bool class_token = false;        // CLIP: a learned class embedding before the patches
  bool pre_norm = false;           // CLIP: LayerNorm on the embeddings (pre_layrnorm)
  bool post_norm = false;          // SigLIP: LayerNorm on the output (post_layernorm)
  gpu::UnaryOp act = gpu::UnaryOp::QuickGelu;
  bool rotary_2d = false;          // Qwen2-VL: 2-D rotary (row, column) in every block; else learned positions
  bool conv_bias = false;          // SigLIP's patch convolution has a bias
  bool patch_rows = false;         // the input is flattened patches (Qwen2-VL); else CHW crops
};

struct VitShape {
  int64_t width = 0, intermediate = 0;  // E, MLP width
  int heads = 0, layers = 0;            // layers to run (LLaVA stops before the last)
  int channels = 3, patch = 14;
  int image_size = 0;                   // crops: side in pixels
  int temporal_patch = 1;               // patch rows: frames per patch (Qwen2-VL: 2)
  double eps = 1e-5;
  double rope_theta = 10000.0;          // 2-D rotary
};

// The shape of a CLIP or SigLIP tower from its vision_config, running `layers` of its blocks.
VitShape vit_shape(const VisionConfig& v, int layers);

// Where the tower's tensors live (module names, without ".weight"/".bias").
struct VitNames {
  std::string patch_embed;                        // the patch convolution
  std::string class_embedding;                    // a tensor name ("" without a class token)
  std::string position_embedding;                 // "" with 2-D rotary
  std::string pre_norm, post_norm;                // "" when the traits have none
  std::function<std::string(int)> layer;          // prefix of block l, ending in "."
  std::string norm1, norm2, q, k, v, qkv, out, fc1, fc2;  // within a block; qkv "" when separate
};

class VisionTransformer {
 public:
  VisionTransformer(gpu::Context& ctx, const VitShape& shape, const VitTraits& traits, const VitNames& names,
                    WeightLoader& loader);

  const VitShape& shape() const { return shape_; }
  // Tokens per crop (patches, plus the class token).
  int64_t tokens_per_crop() const;
  uint64_t weight_bytes() const { return bytes_; }

  // Crops [B, C, S, S] -> hidden states [B * tokens_per_crop, E]; every crop attends to itself
  // only (block-diagonal attention over the batch). `drop_first` leaves out each crop's first
  // token (LLaVA's "default" feature selection): [B * (tokens_per_crop - 1), E].
  gpu::Mat run_crops(gpu::Recorder& rec, const gpu::Tensor& pixels, int64_t B, bool drop_first = false) const;
  // Patch rows [n, C * T * P * P] of one image with their (row, column) in patches, I32 [n, 2]
  // -> hidden states [n, E].
  gpu::Mat run_patches(gpu::Recorder& rec, const gpu::Tensor& patches, int64_t n, const gpu::Tensor& row_col,
                       int max_row_col) const;

 private:
  struct Block {
    gpu::Tensor ln1_w, ln1_b, ln2_w, ln2_b;  // f32 [E]
    Projection qkv;                          // [rows, E] -> [rows, 3E]: q, k, v
    Projection out;                          // [rows, E] -> [rows, E]
    Projection fc1;                          // [rows, E] -> [rows, I]
    Projection fc2;                          // [rows, I] -> [rows, E]
  };
  // The blocks and the post norm over x [rows, E], attention block-diagonal in runs of `block`.
  void blocks(gpu::Recorder& rec, const gpu::Mat& x, int64_t block, const gpu::Tensor* row_col, const gpu::Tensor* rope_table) const;

  gpu::Context& ctx_;
  VitShape shape_;
  VitTraits traits_;
  gpu::Tensor patch_w_;      // f32 [E, C * T * P * P] (crops: the kernel's [E, C * P * P])
  gpu::Weight patch_w_mat_;  // the same as a matmul weight (patch rows)
  gpu::Tensor conv_bias_;    // f32 [E]
  gpu::Tensor class_emb_;    // f32 [E]
  gpu::Tensor pos_emb_;      // f32 [tokens, E]
  gpu::Tensor pre_w_, pre_b_, post_w_, post_b_;
  std::vector<Block> blocks_;
  gpu::Tensor zero_row_;     // I32 [1] = 0: the tower's rows start at row 0
  uint64_t bytes_ = 0;
};

// A vision config's hidden_act as the kernel's activation (quick_gelu, gelu, the tanh GELUs).
gpu::UnaryOp vit_activation(const std::string& act, const std::string& where);

// The names Hugging Face's CLIP and SigLIP towers use under `prefix` (e.g.
// "vision_tower.vision_model."): embeddings.*, pre_layrnorm, encoder.layers.N.*, post_layernorm.
VitNames hf_vit_names(const std::string& prefix);
// Finds the first prefix under which `probe` (e.g. "embeddings.patch_embedding.weight") exists.
std::string find_prefix(const TensorStore& store, const std::vector<std::string>& prefixes, const std::string& probe,
                        const std::string& what);

// The patch convolution's weight as [E, C * rest] in channel-first order (c, then t, y, x),
// from Hugging Face's [E, C, (T,) P, P] or MLX's channels-last [E, (T,) P, P, C] layout.
std::vector<float> conv_weight_channels_first(const StTensor& t, const std::string& name, int64_t E, int C,
                                              const std::vector<int64_t>& kernel);

}  // namespace vkvlm
