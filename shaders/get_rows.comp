#version 450
// Embedding lookup: y[i, :] = table[ids[i], :] as f32, for f32/f16/bf16 tables and MLX-quantized
// ones. A table larger than one binding is bound in row ranges [row_begin, row_end); ids outside
// the bound range are left to the dispatch that binds them.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const bool SCALES_BF16 = false;

#define PUSH_GET_ROWS
#include "push_constants.h"

layout(binding = 0) readonly buffer IdBuf { int ids[]; };
#if defined(W_F32)
layout(binding = 1) readonly buffer WBuf { float ws[]; };
#else
layout(binding = 1) readonly buffer WBuf { uint ws[]; };
#endif
#if defined(W_Q4) || defined(W_Q8)
layout(binding = 2) readonly buffer ScaleBuf { uint scales[]; };
layout(binding = 3) readonly buffer QBiasBuf { uint qbiases[]; };
#endif
layout(binding = 4) writeonly buffer YBuf { float ys[]; };

#include "weight_elem.glsl"

void main() {
  const uint c = gl_GlobalInvocationID.x, i = gl_GlobalInvocationID.y;
  if (c >= p.cols || i >= p.n_ids) return;
  const uint id = uint(ids[p.ids_off + i]);
  if (id < p.row_begin || id >= p.row_end) return;
  const uint r = id - p.row_begin;
  ys[p.y_off + i * p.y_stride + c] = weight_elem(r, c);
}
