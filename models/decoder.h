#pragma once
// The decoder-only language model (Llama, Mistral, Phi-3, Qwen2, Gemma families) as a sequence
// of GPU ops, reading top to bottom like llama2.c's forward pass. What tells the families apart
// is data: the traits in TextConfig (RMSNorm (1 + w), embedding scale, q/k/v biases, tied head,
// M-RoPE sections) and each layer's own (its attention window, its MLP's activation).
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "gpu/context.h"
#include "gpu/ops.h"
#include "host/config.h"
#include "models/model_config.h"
#include "models/weights.h"

namespace vkvlm {

// How a KV cache stores K and V (--kv-bits, --kv-group-size, --quantized-kv-start): f16, or
// MLX affine quantization in groups along each head (mlx-lm's QuantizedKVCache), with the rows
// below quantized_start kept in f16.
struct KvFormat {
  int bits = 16;  // 16: f16; 8 or 4: quantized
  int group_size = 64;
  int64_t quantized_start = 0;

  bool quantized() const { return bits != 16; }
  // "f16", "q8 group 64", "q4 group 32 after 256 f16 rows": what `vkvlm info` and errors print.
  std::string describe() const;
  // The prompt-cache file's kv_dtype: "f16", "q8g64", "q4g32s256".
  std::string tag() const;
  // Throws, naming the flag, unless the model's heads can be stored this way.
  void check(const TextConfig& cfg) const;
  // Of a cache of `rows` rows, how many are f16 (the rest are quantized).
  int64_t f16_rows(int64_t rows) const { return quantized() ? std::min(rows, quantized_start) : rows; }
  // Device bytes of `rows` rows of one session's cache (all layers, K and V).
  uint64_t bytes(const TextConfig& cfg, int64_t rows) const;
};

// The KV cache of one session on the GPU: per layer K and V of [rows, kv_heads * head_dim], as
// one f16 segment or f16 rows then quantized rows (gpu::KvRows). Rows are storage slots; a
// token's RoPE position is separate data.
struct KvCache {
  int64_t rows = 0;
  KvFormat format;
  std::vector<gpu::KvRows> k, v;  // per layer

  static KvCache create(gpu::Context& ctx, const TextConfig& cfg, int64_t rows, const KvFormat& format = {});
  uint64_t bytes() const;
};

struct DecoderLayer {
  gpu::Tensor attn_norm, ffn_norm;  // f32 [E]
  Projection qkv;                   // [T, E] -> [T, (H + 2 KV) * D]: q, then k, then v
  Projection o;                     // [T, H * D] -> [T, E]
  Projection gate_up;               // [T, E] -> [T, 2 I]: gate, then up
  Projection down;                  // [T, I] -> [T, E]
};

// Where a forward pass's rows go: their KV rows and RoPE positions, and the attention layout.
struct ForwardRows {
  gpu::Tensor kv_row;          // I32: element kv_row_index is the KV row of the pass's first row
  int kv_row_index = 0;
  gpu::Tensor positions;       // I32 [rows, positions per token]: the RoPE positions
  int64_t positions_row = 0;   // the row of `positions` the pass's first row reads
  // Rows that also see a span whole (PaliGemma's prefix, Gemma 3's image blocks): I32
  // [rows, 2] of [begin, end) KV rows, the pass's row i at spans_row + i; invalid: none.
  gpu::Tensor spans;
  int64_t spans_row = 0;
  // Compute each row exactly as a one-row decode step does (the GEMV and the per-row attention
  // kernels whatever the row count), so that speculative verification reproduces decoding.
  bool as_decode_steps = false;
  // A rotating KV cache's decode step: the token attends to every row written so far, element
  // kv_row_index + 1 of kv_row counting them (rows hold tokens out of order once it wrapped).
  bool rotating = false;
};

class LanguageModel {
 public:
  // Finds the language model's tensors under any of the naming schemes (transformers 4 and 5,
  // mlx-community, plain causal LMs, Phi-3's fused projections) and loads them.
  LanguageModel(gpu::Context& ctx, const TextConfig& cfg, WeightLoader& loader);

  const TextConfig& config() const { return cfg_; }
  const gpu::Weight& embedding() const { return embed_; }
  uint64_t weight_bytes() const;
  std::string format_summary() const;  // e.g. "q4 group 64"

  // out [n, E] = embedding rows of ids[offset .. offset + n) (before the family's embedding
  // scale, which forward applies, so image features written over rows are scaled alike).
  void embed(gpu::Recorder& rec, const gpu::Tensor& ids, int64_t offset, int64_t n, const gpu::Mat& out) const;

  // One forward pass over x [T, E] (input embeddings, updated in place as the residual stream);
  // K/V are written to the cache at the rows `rows` gives. When logits is given, its rows
  // receive the logits [R, vocab] of the last R rows of x.
  void forward(gpu::Recorder& rec, const KvCache& cache, const gpu::Mat& x, const ForwardRows& rows,
               const gpu::Tensor& rope_table, const gpu::Mat* logits) const;

  // One decode step of several sequences together (continuous batching): row b of x [B, E] is
  // sequence b's token, which goes to its own cache at the row its ForwardRows say and attends to
  // that cache alone; logits [B, vocab]. The weights are read once for all rows, and each row is
  // computed exactly as a one-row decode step of its sequence is (the GEMV and per-row
  // attention kernels), so batching changes no result.
  struct Sequence {
    const KvCache* cache = nullptr;
    ForwardRows rows;                      // one row
    const gpu::Tensor* rope_table = nullptr;
  };
  void forward_batch(gpu::Recorder& rec, const std::vector<Sequence>& sequences, const gpu::Mat& x,
                     const gpu::Mat& logits) const;

 private:
  // Rows [first, first + count) of a forward pass: one sequence's cache and positions.
  struct SequenceRows {
    const KvCache* cache;
    const ForwardRows* rows;
    const gpu::Tensor* rope_table;
    int64_t first, count;
  };
  void run_layers(gpu::Recorder& rec, const std::vector<SequenceRows>& parts, const gpu::Mat& x, bool as_decode_steps,
                  const gpu::Mat* logits) const;

  gpu::Context& ctx_;
  TextConfig cfg_;
  gpu::Weight embed_;
  std::vector<DecoderLayer> layers_;
  gpu::Tensor final_norm_;
  gpu::Weight lm_head_;
};

}  // namespace vkvlm
