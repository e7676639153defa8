#version 450
// The k largest values of each row segment, in descending order with their ids (ties to the
// smaller id; NaN counts as -inf). Rows longer than one segment take a second pass over the
// per-segment winners (with ids) until one segment remains.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint SEG = 1024;

#define PUSH_TOPK
#include "push_constants.h"

layout(binding = 0) readonly buffer XBuf { float xs[]; };
layout(binding = 1) readonly buffer InIdBuf { uint in_ids[]; };
layout(binding = 2) writeonly buffer OutVal { float out_vals[]; };
layout(binding = 3) writeonly buffer OutId { uint out_ids[]; };

shared float val_sh[SEG];
shared uint id_sh[SEG];
shared float rv_sh[gl_WorkGroupSize.x];
shared uint ri_sh[gl_WorkGroupSize.x];
shared uint rl_sh[gl_WorkGroupSize.x];

bool better(float va, uint ia, float vb, uint ib) { return va > vb || (va == vb && ia < ib); }

void main() {
  const uint tid = gl_LocalInvocationID.x;
  const uint WG = gl_WorkGroupSize.x;
  const uint seg = gl_WorkGroupID.x, row = gl_WorkGroupID.y;
  const uint c0 = seg * SEG;
  for (uint i = tid; i < SEG; i += WG) {
    const uint c = c0 + i;
    float v = NEG_INF;
    uint id = 0xFFFFFFFFu;
    if (c < p.cols) {
      v = xs[p.x_off + row * p.x_stride + c];
      if (isnan(v)) v = NEG_INF;
      id = p.has_ids != 0u ? in_ids[p.ids_off + row * p.ids_stride + c] : c;
    }
    val_sh[i] = v;
    id_sh[i] = id;
  }
  barrier();
  for (uint r = 0; r < p.k; ++r) {
    float bv = NEG_INF;
    uint bi = 0xFFFFFFFFu, bl = 0u;
    for (uint i = tid; i < SEG; i += WG) {
      if (better(val_sh[i], id_sh[i], bv, bi)) {
        bv = val_sh[i];
        bi = id_sh[i];
        bl = i;
      }
    }
    rv_sh[tid] = bv;
    ri_sh[tid] = bi;
    rl_sh[tid] = bl;
    barrier();
    for (uint s = WG / 2; s > 0; s >>= 1) {
      if (tid < s && better(rv_sh[tid + s], ri_sh[tid + s], rv_sh[tid], ri_sh[tid])) {
        rv_sh[tid] = rv_sh[tid + s];
        ri_sh[tid] = ri_sh[tid + s];
        rl_sh[tid] = rl_sh[tid + s];
      }
      barrier();
    }
    if (tid == 0) {
      const uint o = p.out_off + row * p.out_stride + seg * p.k + r;
      out_vals[o] = rv_sh[0];
      out_ids[o] = ri_sh[0];
      val_sh[rl_sh[0]] = NEG_INF;
      id_sh[rl_sh[0]] = 0xFFFFFFFFu;
    }
    barrier();
  }
}
