#version 450
// y = a (op) b on [rows, cols] views; a row stride of 0 broadcasts a row. May run in place.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "activations.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint OP = 0;  // 0: a + b, 1: a * b, 2: silu(a) * b, 3: gelu_tanh(a) * b, 4: gelu_erf(a) * b

#define PUSH_BINARY
#include "push_constants.h"

layout(binding = 0) readonly buffer ABuf { float as_[]; };
layout(binding = 1) readonly buffer BBuf { float bs[]; };
layout(binding = 2) writeonly buffer YBuf { float ys[]; };

void main() {
  const uint c = gl_GlobalInvocationID.x, r = gl_GlobalInvocationID.y;
  if (c >= p.cols || r >= p.rows) return;
  const float a = as_[p.a_off + r * p.a_stride + c];
  const float b = bs[p.b_off + r * p.b_stride + c];
  float v;
  if (OP == 0) v = a + b;
  else if (OP == 1) v = a * b;
  else if (OP == 2) v = silu(a) * b;
  else if (OP == 3) v = gelu_tanh(a) * b;
  else v = gelu_erf(a) * b;
  ys[p.y_off + r * p.y_stride + c] = v;
}
