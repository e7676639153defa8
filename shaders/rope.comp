#version 450
// Rotary position embedding, in place on q or k rows [T, heads * head_dim] (row stride given).
// Token t sits at position n_past + t, with n_past read from the step buffer so a recorded
// decode step can be replayed. cos/sin come from a table built on the host in double precision
// (theta, per-dimension frequency factors, attention scale): table[pos][i] = (cos, sin) * scale.
//   mode 0 (rotate-half, Hugging Face Llama): pairs (i, i + rot/2)
//   mode 1 (interleaved, GPT-J):              pairs (2i, 2i + 1)
// Dimensions at or past rot_dim are left alone (partial rotary).
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(local_size_x_id = 0) in;

layout(push_constant) uniform Params {
  uint T, heads, head_dim, rot_dim;
  uint x_off, x_stride;
  uint step_off;
  uint mode;
  uint table_pos_begin, table_pos_end;  // positions this table binding holds
  uint table_off;                       // in vec2 units, for table_pos_begin
} p;

layout(binding = 0) buffer XBuf { float xs[]; };
layout(binding = 1) readonly buffer StepBuf { int step[]; };
layout(binding = 2) readonly buffer TableBuf { vec2 cs[]; };

void main() {
  const uint half_rot = p.rot_dim / 2;
  const uint i = gl_GlobalInvocationID.x;
  const uint h = gl_GlobalInvocationID.y;
  const uint t = gl_GlobalInvocationID.z;
  if (i >= half_rot || h >= p.heads || t >= p.T) return;
  const uint pos = uint(step[p.step_off]) + t;
  if (pos < p.table_pos_begin || pos >= p.table_pos_end) return;
  const vec2 c = cs[p.table_off + (pos - p.table_pos_begin) * half_rot + i];
  const uint base = p.x_off + t * p.x_stride + h * p.head_dim;
  const uint i0 = p.mode == 0u ? base + i : base + 2 * i;
  const uint i1 = p.mode == 0u ? base + i + half_rot : base + 2 * i + 1;
  const float a = xs[i0], b = xs[i1];
  xs[i0] = a * c.x - b * c.y;
  xs[i1] = b * c.x + a * c.y;
}
