// Every kernel's push constants, declared once for both sides: GLSL includes this file after
// defining the block it takes (PUSH_UNARY, ...), which becomes its `p`; C++ (gpu/ops.cpp)
// includes it whole and fills the same structs, field for field. Scalars only (uint, int,
// float: four bytes each, no padding in either language), so the layouts cannot drift.
#ifdef __cplusplus
#pragma once
#include <cstdint>
namespace vkvlm::gpu::push {
using uint = uint32_t;
#define PUSH_BLOCK(Name) struct Name
#define PUSH_END ;
#define PUSH_ALL
#else
#define PUSH_BLOCK(Name) layout(push_constant) uniform Name
#define PUSH_END p;
#endif

// Matrix products (gemm, gemm_coopmat, gemv, matmul_lanes): y [M, N] (+)= x [M, K] W^T (+ bias).
#if defined(PUSH_ALL) || defined(PUSH_MATMUL)
PUSH_BLOCK(Matmul) {
  uint M, N, K;
  uint x_off, x_stride;  // in elements of x
  uint w_off, w_stride;  // in elements (f32 / halves) or U32 words (quantized)
  uint s_off, s_stride;  // quantized scales and biases, in halves
  uint bias_off;
  uint y_off, y_stride;
  uint flags;            // 1: bias, 2: accumulate into y, 4: vector loads of W, 8: vec4 loads of x (gemv)
  uint group_size;
} PUSH_END
#endif

// LayerNorm and RMSNorm over rows.
#if defined(PUSH_ALL) || defined(PUSH_NORM)
PUSH_BLOCK(Norm) {
  uint rows, cols;
  uint x_off, x_stride;
  uint y_off, y_stride;
  uint w_off, b_off;
  float eps;
  uint flags;  // 1: weight is (1 + w)
} PUSH_END
#endif

// Rotary position embedding in place, from a cos/sin table, by each token's position(s).
#if defined(PUSH_ALL) || defined(PUSH_ROPE)
PUSH_BLOCK(Rope) {
  uint T, heads, head_dim, rot_dim;
  uint x_off, x_stride;
  uint pos_off;                         // index of row 0's first position in the positions buffer
  uint sections;                        // positions per token (1..4)
  uint bound0, bound1, bound2;          // frequency bounds of sections 0..2 (the last ends at rot/2)
  uint mode;
  int table_pos_begin, table_pos_end;   // positions this table binding holds
  uint table_off;                       // in vec2 units, for table_pos_begin
} PUSH_END
#endif

// Rows appended to a KV cache (f16, or quantized as mx.quantize does).
#if defined(PUSH_ALL) || defined(PUSH_KV_APPEND)
PUSH_BLOCK(KvAppend) {
  uint T, kv_dim;
  uint src_off, src_stride;
  uint row_off;
  uint cache_row_begin, cache_row_end;  // cache rows this binding holds
  uint cache_off;                       // in words, for cache_row_begin
  uint param_off;                       // quantized: in words, for cache_row_begin
  uint group_size;
} PUSH_END
#endif

// Attention (attn_rows, attn_tiled): see attn_common.glsl for the meaning of each field.
#if defined(PUSH_ALL) || defined(PUSH_ATTENTION)
PUSH_BLOCK(Attention) {
  uint T, H, HKV;
  uint q_off, q_stride;
  uint k_off, k_stride;
  uint v_off, v_stride;
  uint o_off, o_stride;
  uint row_off;
  uint key_begin, key_end;
  uint flags;  // 1: causal, 2: write partial (acc, max, sum) instead of the output, 4: rotating
               // cache (keys are a set: rows below first_row[row_off + 1] are all visible; no mask),
               // 8: the span buffer is bound
  uint window;  // sliding window: key j is visible from row i when i - j < window (0: off)
  float scale;
  uint part_index, n_parts;
  uint q_t0, T_total;
  uint split_size;  // keys per workgroup (attn_rows)
  uint span_off;    // the span buffer's pair for the pass's query i is at span_off + 2 i
  uint kp_off, kp_stride, vp_off, vp_stride, group_size;  // quantized K/V: the (scale, bias) words
} PUSH_END
#endif

// The partial results of attention split over keys, merged.
#if defined(PUSH_ALL) || defined(PUSH_ATTN_MERGE)
PUSH_BLOCK(AttnMerge) {
  uint T, H, D, n_parts;
  uint o_off, o_stride;
} PUSH_END
#endif

// y = op(x) * alpha, element-wise.
#if defined(PUSH_ALL) || defined(PUSH_UNARY)
PUSH_BLOCK(Unary) {
  uint rows, cols;
  uint x_off, x_stride;
  uint y_off, y_stride;
  float alpha;
} PUSH_END
#endif

// y = op(a, b), element-wise (a row stride of 0 repeats one row).
#if defined(PUSH_ALL) || defined(PUSH_BINARY)
PUSH_BLOCK(Binary) {
  uint rows, cols;
  uint a_off, a_stride;
  uint b_off, b_stride;
  uint y_off, y_stride;
} PUSH_END
#endif

// y = x in another float type.
#if defined(PUSH_ALL) || defined(PUSH_CONVERT)
PUSH_BLOCK(Convert) {
  uint rows, cols;
  uint x_off, x_stride;
  uint y_off, y_stride;
} PUSH_END
#endif

// Rows of a (possibly quantized) table gathered by id.
#if defined(PUSH_ALL) || defined(PUSH_GET_ROWS)
PUSH_BLOCK(GetRows) {
  uint n_ids, cols;
  uint ids_off;
  uint w_off, w_stride;
  uint s_off, s_stride;
  uint group_size;
  uint y_off, y_stride;
  uint row_begin, row_end;
} PUSH_END
#endif

// Image patches through the patch convolution, with position embeddings.
#if defined(PUSH_ALL) || defined(PUSH_PATCH_EMBED)
PUSH_BLOCK(PatchEmbed) {
  uint B, C, H, W, P, E;
  uint grid_w, n_patches;
  uint y_off, y_stride;
  uint flags;  // 1: class token, 2: conv bias
} PUSH_END
#endif

// The k largest entries of each row.
#if defined(PUSH_ALL) || defined(PUSH_TOPK)
PUSH_BLOCK(Topk) {
  uint rows, cols;
  uint x_off, x_stride;
  uint ids_off, ids_stride;
  uint has_ids;
  uint k;
  uint out_off, out_stride;  // per row: n_segments * k results
} PUSH_END
#endif

// log(sum(exp(x * inv_temp))) of each row.
#if defined(PUSH_ALL) || defined(PUSH_LOGSUMEXP)
PUSH_BLOCK(Logsumexp) {
  uint rows, cols;
  uint x_off, x_stride;
  uint y_off;
  float inv_temp;
} PUSH_END
#endif

// The repetition penalty applied to the logits of the ids seen.
#if defined(PUSH_ALL) || defined(PUSH_REPEAT_PENALTY)
PUSH_BLOCK(RepeatPenalty) {
  uint n_ids, ids_off;
  uint x_off;
  float penalty;
} PUSH_END
#endif

#ifdef __cplusplus
// Vulkan guarantees 128 bytes of push constants.
static_assert(sizeof(Matmul) <= 128 && sizeof(Norm) <= 128 && sizeof(Rope) <= 128 && sizeof(KvAppend) <= 128 &&
              sizeof(Attention) <= 128 && sizeof(AttnMerge) <= 128 && sizeof(Unary) <= 128 && sizeof(Binary) <= 128 &&
              sizeof(Convert) <= 128 && sizeof(GetRows) <= 128 && sizeof(PatchEmbed) <= 128 && sizeof(Topk) <= 128 &&
              sizeof(Logsumexp) <= 128 && sizeof(RepeatPenalty) <= 128);
}  // namespace vkvlm::gpu::push
#undef PUSH_BLOCK
#undef PUSH_END
#undef PUSH_ALL
#endif
