#version 450
// Appends T rows of K or V (f32, [T, kv_dim] with a row stride) to an f16 cache
// [positions, kv_dim] at positions n_past .. n_past + T - 1 (n_past from the step buffer).
// Each invocation writes one 32-bit word (two halves), so kv_dim must be even.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(local_size_x_id = 0) in;

layout(push_constant) uniform Params {
  uint T, kv_dim;
  uint src_off, src_stride;
  uint step_off;
  uint cache_pos_begin, cache_pos_end;  // positions this cache binding holds
  uint cache_off;                       // in words, for cache_pos_begin
} p;

layout(binding = 0) readonly buffer SrcBuf { float src[]; };
layout(binding = 1) readonly buffer StepBuf { int step[]; };
layout(binding = 2) writeonly buffer CacheBuf { uint cache[]; };

void main() {
  const uint j = gl_GlobalInvocationID.x;  // word within the row
  const uint t = gl_GlobalInvocationID.y;
  if (j >= p.kv_dim / 2 || t >= p.T) return;
  const uint pos = uint(step[p.step_off]) + t;
  if (pos < p.cache_pos_begin || pos >= p.cache_pos_end) return;
  const uint s = p.src_off + t * p.src_stride + 2 * j;
  cache[p.cache_off + (pos - p.cache_pos_begin) * (p.kv_dim / 2) + j] = packHalf2x16(vec2(src[s], src[s + 1]));
}
