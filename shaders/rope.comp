#version 450
// Rotary position embedding, in place on q or k rows [T, heads * head_dim] (row stride given).
// Positions are data: row t reads its position(s) from the positions buffer (uploaded per
// forward pass, or per decode step, so a recorded step can be replayed). A token may carry
// several positions (M-RoPE's temporal/height/width, the 2-D vision rotary's row/column):
// rotary frequency i reads component s of its token's positions, where s is the section holding
// i (section s covers frequencies [bound[s-1], bound[s])). cos/sin come from a table built on
// the host in double precision: table[pos][i] = (cos, sin) * attention scale.
//   mode 0 (rotate-half, Hugging Face Llama): pairs (i, i + rot/2)
//   mode 1 (interleaved, GPT-J):              pairs (2i, 2i + 1)
// Dimensions at or past rot_dim are left alone (partial rotary).
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(local_size_x_id = 0) in;

#define PUSH_ROPE
#include "push_constants.h"

layout(binding = 0) buffer XBuf { float xs[]; };
layout(binding = 1) readonly buffer PosBuf { int positions[]; };
layout(binding = 2) readonly buffer TableBuf { vec2 cs[]; };

void main() {
  const uint half_rot = p.rot_dim / 2;
  const uint i = gl_GlobalInvocationID.x;
  const uint h = gl_GlobalInvocationID.y;
  const uint t = gl_GlobalInvocationID.z;
  if (i >= half_rot || h >= p.heads || t >= p.T) return;
  const uint s = i < p.bound0 ? 0u : i < p.bound1 ? 1u : i < p.bound2 ? 2u : 3u;
  const int pos = positions[p.pos_off + t * p.sections + min(s, p.sections - 1u)];
  if (pos < p.table_pos_begin || pos >= p.table_pos_end) return;
  const vec2 c = cs[p.table_off + uint(pos - p.table_pos_begin) * half_rot + i];
  const uint base = p.x_off + t * p.x_stride + h * p.head_dim;
  const uint i0 = p.mode == 0u ? base + i : base + 2 * i;
  const uint i1 = p.mode == 0u ? base + i + half_rot : base + 2 * i + 1;
  const float a = xs[i0], b = xs[i1];
  xs[i0] = a * c.x - b * c.y;
  xs[i1] = b * c.x + a * c.y;
}
