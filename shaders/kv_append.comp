#version 450
// Appends T rows of K or V (f32, [T, kv_dim] with a row stride) to an f16 cache
// [rows, kv_dim] at rows first .. first + T - 1 (first read from the row buffer, so a recorded
// decode step can be replayed). Cache rows are storage slots, not RoPE positions.
// Each invocation writes one 32-bit word (two halves), so kv_dim must be even.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(local_size_x_id = 0) in;

layout(push_constant) uniform Params {
  uint T, kv_dim;
  uint src_off, src_stride;
  uint row_off;
  uint cache_row_begin, cache_row_end;  // cache rows this binding holds
  uint cache_off;                       // in words, for cache_row_begin
} p;

layout(binding = 0) readonly buffer SrcBuf { float src[]; };
layout(binding = 1) readonly buffer RowBuf { int first_row[]; };
layout(binding = 2) writeonly buffer CacheBuf { uint cache[]; };

void main() {
  const uint j = gl_GlobalInvocationID.x;  // word within the row
  const uint t = gl_GlobalInvocationID.y;
  if (j >= p.kv_dim / 2 || t >= p.T) return;
  const uint row = uint(first_row[p.row_off]) + t;
  if (row < p.cache_row_begin || row >= p.cache_row_end) return;
  const uint s = p.src_off + t * p.src_stride + 2 * j;
  cache[p.cache_off + (row - p.cache_row_begin) * (p.kv_dim / 2) + j] = packHalf2x16(vec2(src[s], src[s + 1]));
}
