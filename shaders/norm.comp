#version 450
// RMSNorm: y = x / sqrt(mean(x^2) + eps) * w   (w, or 1 + w for the Gemma form)
// LayerNorm: y = (x - mean) / sqrt(var + eps) * w + b
// One workgroup per row; statistics in f32 from two passes over the row.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(local_size_x_id = 0) in;
#include "reduce.glsl"

#define PUSH_NORM
#include "push_constants.h"

layout(binding = 0) readonly buffer XBuf { float xs[]; };
layout(binding = 1) readonly buffer WBuf { float w[]; };
#ifdef LAYER
layout(binding = 2) readonly buffer BBuf { float b[]; };
#endif
layout(binding = 3) writeonly buffer YBuf { float ys[]; };

void main() {
  const uint row = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
  if (row >= p.rows) return;
  const uint tid = gl_LocalInvocationID.x;
  const uint xb = p.x_off + row * p.x_stride;
  const uint yb = p.y_off + row * p.y_stride;
#ifdef RMS
  float ss = 0.0;
  for (uint c = tid; c < p.cols; c += gl_WorkGroupSize.x) {
    float v = xs[xb + c];
    ss += v * v;
  }
  const float inv = inversesqrt(wg_sum(ss) / float(p.cols) + p.eps);
  const float one = (p.flags & 1u) != 0u ? 1.0 : 0.0;
  for (uint c = tid; c < p.cols; c += gl_WorkGroupSize.x) ys[yb + c] = xs[xb + c] * inv * (one + w[p.w_off + c]);
#else
  float s = 0.0;
  for (uint c = tid; c < p.cols; c += gl_WorkGroupSize.x) s += xs[xb + c];
  const float mean = wg_sum(s) / float(p.cols);
  float ss = 0.0;
  for (uint c = tid; c < p.cols; c += gl_WorkGroupSize.x) {
    float d = xs[xb + c] - mean;
    ss += d * d;
  }
  const float inv = inversesqrt(wg_sum(ss) / float(p.cols) + p.eps);
  for (uint c = tid; c < p.cols; c += gl_WorkGroupSize.x)
    ys[yb + c] = (xs[xb + c] - mean) * inv * w[p.w_off + c] + b[p.b_off + c];
#endif
}
