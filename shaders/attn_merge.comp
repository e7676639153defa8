#version 450
// Combines attention partials computed over disjoint key ranges:
//   out = sum_p exp(m_p - M) acc_p / sum_p exp(m_p - M) l_p,  M = max_p m_p.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(local_size_x_id = 0) in;

#define PUSH_ATTN_MERGE
#include "push_constants.h"

layout(binding = 0) readonly buffer PartBuf { float parts[]; };
layout(binding = 1) writeonly buffer OBuf { float os[]; };

void main() {
  const uint th = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
  if (th >= p.T * p.H) return;
  const uint t = th / p.H, h = th % p.H;
  const uint base = th * p.n_parts * (p.D + 2);
  float M = NEG_INF;
  for (uint i = 0; i < p.n_parts; ++i) M = max(M, parts[base + i * (p.D + 2) + p.D]);
  float den = 0.0;
  for (uint i = 0; i < p.n_parts; ++i) {
    const float m = parts[base + i * (p.D + 2) + p.D];
    if (m != NEG_INF) den += exp(m - M) * parts[base + i * (p.D + 2) + p.D + 1];
  }
  for (uint d = gl_LocalInvocationID.x; d < p.D; d += gl_WorkGroupSize.x) {
    float num = 0.0;
    for (uint i = 0; i < p.n_parts; ++i) {
      const float m = parts[base + i * (p.D + 2) + p.D];
      if (m != NEG_INF) num += exp(m - M) * parts[base + i * (p.D + 2) + d];
    }
    os[p.o_off + t * p.o_stride + h * p.D + d] = den > 0.0 ? num / den : 0.0;
  }
}
