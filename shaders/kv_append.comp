#version 450
// Appends T rows of K or V (f32, [T, kv_dim] with a row stride) to a cache segment at rows
// first .. first + T - 1 (first read from the row buffer, so a recorded decode step can be
// replayed). Cache rows are storage slots, not RoPE positions.
// f16 (default): each invocation writes one 32-bit word (two halves), so kv_dim must be even.
// KV_Q4 / KV_Q8: MLX affine quantization; each invocation quantizes one group of group_size
// values into its packed words and one word of (scale, bias) halves.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(local_size_x_id = 0) in;

#define PUSH_KV_APPEND
#include "push_constants.h"

layout(binding = 0) readonly buffer SrcBuf { float src[]; };
layout(binding = 1) readonly buffer RowBuf { int first_row[]; };
layout(binding = 2) writeonly buffer CacheBuf { uint cache[]; };

#if defined(KV_Q4) || defined(KV_Q8)
#if defined(KV_Q4)
const uint BITS = 4u;
#else
const uint BITS = 8u;
#endif
const uint PER_WORD = 32u / BITS;
layout(binding = 3) writeonly buffer ParamBuf { uint params[]; };

void main() {
  const uint g = gl_GlobalInvocationID.x;  // group within the row
  const uint t = gl_GlobalInvocationID.y;
  const uint groups = p.kv_dim / p.group_size;
  if (g >= groups || t >= p.T) return;
  const uint row = uint(first_row[p.row_off]) + t;
  if (row < p.cache_row_begin || row >= p.cache_row_end) return;
  const uint s0 = p.src_off + t * p.src_stride + g * p.group_size;
  float lo = src[s0], hi = lo;
  for (uint i = 1; i < p.group_size; ++i) {
    lo = min(lo, src[s0 + i]);
    hi = max(hi, src[s0 + i]);
  }
  // As MLX's affine_quantize: the endpoint of larger magnitude becomes the bias, exactly, and
  // the scale (negative when that endpoint is the maximum) spans the range in n_bins steps.
  const float n_bins = float((1u << BITS) - 1u);
  const bool low_edge = abs(lo) > abs(hi);
  float scale = max((hi - lo) / n_bins, 1e-7);
  if (!low_edge) scale = -scale;
  const float edge = low_edge ? lo : hi;
  const float q0 = roundEven(edge / scale);
  float bias = 0.0;
  if (q0 != 0.0) {
    scale = edge / q0;
    bias = edge;
  }
  // Stored as f16, but the codes come from the unrounded scale and bias, as mx.quantize computes
  // them (checked against MLX 0.32: with the stored ones, 2% of the 8-bit codes of f16 data differ).
  const uint packed = packHalf2x16(vec2(scale, bias));
  const uint r = row - p.cache_row_begin;
  params[p.param_off + r * groups + g] = packed;
  const uint words = p.group_size / PER_WORD;
  const uint w0 = p.cache_off + r * (p.kv_dim / PER_WORD) + g * words;
  for (uint w = 0; w < words; ++w) {
    uint word = 0u;
    for (uint i = 0; i < PER_WORD; ++i) {
      const float q = clamp(roundEven((src[s0 + w * PER_WORD + i] - bias) / scale), 0.0, n_bins);
      word |= uint(q) << (BITS * i);
    }
    cache[w0 + w] = word;
  }
}
#else
void main() {
  const uint j = gl_GlobalInvocationID.x;  // word within the row
  const uint t = gl_GlobalInvocationID.y;
  if (j >= p.kv_dim / 2 || t >= p.T) return;
  const uint row = uint(first_row[p.row_off]) + t;
  if (row < p.cache_row_begin || row >= p.cache_row_end) return;
  const uint s = p.src_off + t * p.src_stride + 2 * j;
  cache[p.cache_off + (row - p.cache_row_begin) * (p.kv_dim / 2) + j] = packHalf2x16(vec2(src[s], src[s + 1]));
}
#endif
