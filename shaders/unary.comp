#version 450
// y = f(x) * alpha on a [rows, cols] view (strided rows); may run in place.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "activations.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint OP = 0;  // 0: identity, 1: silu, 2: gelu (erf), 3: gelu (tanh), 4: quick_gelu

#define PUSH_UNARY
#include "push_constants.h"

layout(binding = 0) readonly buffer XBuf { float xs[]; };
layout(binding = 1) writeonly buffer YBuf { float ys[]; };

void main() {
  const uint c = gl_GlobalInvocationID.x, r = gl_GlobalInvocationID.y;
  if (c >= p.cols || r >= p.rows) return;
  float v = xs[p.x_off + r * p.x_stride + c];
  if (OP == 1) v = silu(v);
  else if (OP == 2) v = gelu_erf(v);
  else if (OP == 3) v = gelu_tanh(v);
  else if (OP == 4) v = quick_gelu(v);
  ys[p.y_off + r * p.y_stride + c] = v * p.alpha;
}
