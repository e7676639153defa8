#version 450
// Repetition penalty (as in Hugging Face's RepetitionPenaltyLogitsProcessor) on one logits row:
// for each distinct seen token id, x = x < 0 ? x * penalty : x / penalty. Negative ids are unused
// slots, so a fixed-size id list can be replayed while it fills up.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(local_size_x_id = 0) in;

#define PUSH_REPEAT_PENALTY
#include "push_constants.h"

layout(binding = 0) readonly buffer IdBuf { int ids[]; };
layout(binding = 1) buffer XBuf { float xs[]; };

void main() {
  const uint i = gl_GlobalInvocationID.x;
  if (i >= p.n_ids) return;
  const int id = ids[p.ids_off + i];
  if (id < 0) return;
  const uint idx = p.x_off + uint(id);
  const float v = xs[idx];
  xs[idx] = v < 0.0 ? v * p.penalty : v / p.penalty;
}
