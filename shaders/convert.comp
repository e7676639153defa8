#version 450
// Converts a [rows, cols] view between f32, f16 and bf16. f16 outputs are written a 32-bit word
// (two values) per invocation, so their offset, stride and cols are even.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(local_size_x_id = 0) in;

#define PUSH_CONVERT
#include "push_constants.h"

#ifdef SRC_F32
layout(binding = 0) readonly buffer XBuf { float xs[]; };
float load(uint i) { return xs[i]; }
#else
layout(binding = 0) readonly buffer XBuf { uint xs[]; };
float load(uint i) {
  uint h = half_of_word(xs[i >> 1], i);
#ifdef SRC_F16
  return f16_bits_to_float(h);
#else
  return bf16_bits_to_float(h);
#endif
}
#endif

#ifdef DST_F16
layout(binding = 1) writeonly buffer YBuf { uint ys[]; };
#else
layout(binding = 1) writeonly buffer YBuf { float ys[]; };
#endif

void main() {
  const uint r = gl_GlobalInvocationID.y;
#ifdef DST_F16
  const uint c = gl_GlobalInvocationID.x * 2;
  if (c >= p.cols || r >= p.rows) return;
  const uint xi = p.x_off + r * p.x_stride + c;
  ys[(p.y_off + r * p.y_stride + c) / 2] = packHalf2x16(vec2(load(xi), load(xi + 1)));
#else
  const uint c = gl_GlobalInvocationID.x;
  if (c >= p.cols || r >= p.rows) return;
  ys[p.y_off + r * p.y_stride + c] = load(p.x_off + r * p.x_stride + c);
#endif
}
