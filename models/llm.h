#pragma once
// The decoder-only language model (Llama, Mistral, Phi-3, Qwen2 families) as a sequence of GPU
// ops, reading top to bottom like llama2.c's forward pass.
#include <cstdint>
#include <string>
#include <vector>

#include "gpu/context.h"
#include "gpu/ops.h"
#include "host/config.h"
#include "models/weights.h"

namespace vkvlm {

// The KV cache of one session, f16 on the GPU: per layer K and V of [capacity, kv_heads * head_dim].
struct KvCache {
  int64_t capacity = 0;
  std::vector<gpu::Tensor> k, v;

  static KvCache create(gpu::Context& ctx, const TextConfig& cfg, int64_t capacity);
  uint64_t bytes() const;
};

struct LmLayer {
  gpu::Tensor attn_norm, ffn_norm;  // f32 [E]
  Projection qkv;                   // [T, E] -> [T, (H + 2 KV) * D]: q, then k, then v
  Projection o;                     // [T, H * D] -> [T, E]
  Projection gate_up;               // [T, E] -> [T, 2 I]: gate, then up
  Projection down;                  // [T, I] -> [T, E]
};

class LanguageModel {
 public:
  // Finds the language model's tensors under any of the naming schemes (transformers 4 and 5,
  // mlx-community, plain causal LMs, Phi-3's fused projections) and loads them.
  LanguageModel(gpu::Context& ctx, const ModelConfig& cfg, WeightLoader& loader);

  const TextConfig& config() const { return cfg_; }
  const gpu::Weight& embedding() const { return embed_; }
  uint64_t weight_bytes() const;
  std::string format_summary() const;  // e.g. "q4 g64 (language model), f16 (rest)"

  // out [n, E] = embedding rows of ids[offset .. offset + n).
  void embed(gpu::Recorder& rec, const gpu::Tensor& ids, int64_t offset, int64_t n, const gpu::Mat& out) const;

  // One forward pass over x [T, E] (token embeddings, updated in place as the residual stream):
  // row t is at position step[step_index] + t; K/V are appended to the cache. When logits is
  // given, its rows receive the logits [R, vocab] of the last R rows of x.
  void forward(gpu::Recorder& rec, const KvCache& cache, const gpu::Mat& x, const gpu::Tensor& step, int step_index,
               const gpu::Tensor& rope_table, const gpu::Mat* logits) const;

 private:
  gpu::Context& ctx_;
  TextConfig cfg_;
  gpu::Weight embed_;
  std::vector<LmLayer> layers_;
  gpu::Tensor final_norm_;
  gpu::Weight lm_head_;
};

}  // namespace vkvlm
