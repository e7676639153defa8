#version 450
// y[row] = log(sum_c exp(x[row, c] * inv_temp)), computed stably around the row maximum.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(local_size_x_id = 0) in;
#include "reduce.glsl"

#define PUSH_LOGSUMEXP
#include "push_constants.h"

layout(binding = 0) readonly buffer XBuf { float xs[]; };
layout(binding = 1) writeonly buffer YBuf { float ys[]; };

void main() {
  const uint row = gl_WorkGroupID.x;
  const uint tid = gl_LocalInvocationID.x;
  const uint xb = p.x_off + row * p.x_stride;
  float m = NEG_INF;
  for (uint c = tid; c < p.cols; c += gl_WorkGroupSize.x) m = max(m, xs[xb + c] * p.inv_temp);
  m = wg_max(m);
  float s = 0.0;
  for (uint c = tid; c < p.cols; c += gl_WorkGroupSize.x) s += exp(xs[xb + c] * p.inv_temp - m);
  s = wg_sum(s);
  if (tid == 0) ys[p.y_off + row] = m + log(s);
}
