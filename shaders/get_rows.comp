#version 450
// Embedding lookup: y[i, :] = table[ids[i], :] as f32, for f32/f16/bf16 tables and MLX-quantized
// ones. A table larger than one binding is bound in row ranges [row_begin, row_end); ids outside
// the bound range are left to the dispatch that binds them.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const bool SCALES_BF16 = false;

layout(push_constant) uniform Params {
  uint n_ids, cols;
  uint ids_off;
  uint w_off, w_stride;
  uint s_off, s_stride;
  uint group_size;
  uint y_off, y_stride;
  uint row_begin, row_end;
} p;

layout(binding = 0) readonly buffer IdBuf { int ids[]; };
#if defined(W_F32)
layout(binding = 1) readonly buffer WBuf { float ws[]; };
#else
layout(binding = 1) readonly buffer WBuf { uint ws[]; };
#endif
#if defined(W_Q4) || defined(W_Q8)
layout(binding = 2) readonly buffer ScaleBuf { uint scales[]; };
layout(binding = 3) readonly buffer QBiasBuf { uint qbiases[]; };
float qhalf(uint word, uint i) {
  uint h = half_of_word(word, i);
  return SCALES_BF16 ? bf16_bits_to_float(h) : f16_bits_to_float(h);
}
#endif
layout(binding = 4) writeonly buffer YBuf { float ys[]; };

void main() {
  const uint c = gl_GlobalInvocationID.x, i = gl_GlobalInvocationID.y;
  if (c >= p.cols || i >= p.n_ids) return;
  const uint id = uint(ids[p.ids_off + i]);
  if (id < p.row_begin || id >= p.row_end) return;
  const uint r = id - p.row_begin;
  float v;
#if defined(W_F32)
  v = ws[p.w_off + r * p.w_stride + c];
#elif defined(W_F16) || defined(W_BF16)
  const uint e = p.w_off + r * p.w_stride + c;
  const uint h = half_of_word(ws[e >> 1], e);
#if defined(W_F16)
  v = f16_bits_to_float(h);
#else
  v = bf16_bits_to_float(h);
#endif
#else
#if defined(W_Q4)
  const uint q = (ws[p.w_off + r * p.w_stride + c / 8] >> (4 * (c % 8))) & 15u;
#else
  const uint q = (ws[p.w_off + r * p.w_stride + c / 4] >> (8 * (c % 4))) & 255u;
#endif
  const uint si = p.s_off + r * p.s_stride + c / p.group_size;
  v = qhalf(scales[si >> 1], si) * float(q) + qhalf(qbiases[si >> 1], si);
#endif
  ys[p.y_off + i * p.y_stride + c] = v;
}
