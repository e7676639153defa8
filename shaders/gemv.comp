#version 450
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) (+ y[m, n]) for a few rows m (decode).
//
// Each workgroup owns ROWS output columns n and all NX rows of x, so every weight is read once
// per token. Threads stride along k in chunks that are one 16-byte load per weight row
// (4 f32, 8 f16/bf16) or one 32-value MLX quantization chunk (q4: 16 bytes, q8: 32 bytes):
// consecutive threads read consecutive bytes of the same row. Partial sums are reduced across
// the workgroup at the end.
//
// MLX affine quantization: W[n, k] = scale[n, g] * q[n, k] + bias[n, g], g = k / group_size,
// q packed little-end-first into U32 words along k. The chunk dot product is computed as
// scale * sum(x * q) + bias * sum(x), saving one multiply-add per weight.
#extension GL_GOOGLE_include_directive : require
#ifdef X_F16
#extension GL_EXT_shader_16bit_storage : require
#endif
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint ROWS = 2;  // output columns n per workgroup
layout(constant_id = 2) const uint NX = 1;    // rows of x, 1..8
layout(constant_id = 3) const bool SCALES_BF16 = false;

#include "reduce.glsl"

#define PUSH_MATMUL
#include "push_constants.h"

#ifdef X_F16
layout(binding = 0) readonly buffer XBuf { float16_t xs[]; };
layout(binding = 0) readonly buffer XBuf4 { f16vec4 xs4[]; };
#define XLOAD(i) float(xs[i])
#define XLOAD4(i) vec4(xs4[i])
#else
layout(binding = 0) readonly buffer XBuf { float xs[]; };
layout(binding = 0) readonly buffer XBuf4 { vec4 xs4[]; };
#define XLOAD(i) xs[i]
#define XLOAD4(i) xs4[i]
#endif

#if defined(W_F32)
layout(binding = 1) readonly buffer WBuf { float ws[]; };
layout(binding = 1) readonly buffer WBuf4 { vec4 ws4[]; };
const uint CHUNK = 4;
#else
layout(binding = 1) readonly buffer WBuf { uint ws[]; };
layout(binding = 1) readonly buffer WBuf4 { uvec4 ws4[]; };
#if defined(W_Q4) || defined(W_Q8)
#define QUANTIZED 1
const uint CHUNK = 32;
#if defined(W_Q4)
const uint BITS = 4;
#else
const uint BITS = 8;
#endif
const uint VALUES_PER_WORD = 32 / BITS;
const uint WORDS_PER_CHUNK = CHUNK / VALUES_PER_WORD;  // 4 (q4) or 8 (q8)
layout(binding = 2) readonly buffer ScaleBuf { uint scales[]; };
layout(binding = 3) readonly buffer QBiasBuf { uint qbiases[]; };
#else
const uint CHUNK = 8;
#endif
#endif
layout(binding = 4) readonly buffer BiasBuf { float bias[]; };
layout(binding = 5) buffer YBuf { float ys[]; };

#include "weight_elem.glsl"

shared float partial_sh[NX * ROWS];

void main() {
  const uint tid = gl_LocalInvocationID.x;
  const uint row0 = (gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x) * ROWS;
  if (row0 >= p.N) return;  // whole workgroup leaves together

  float acc[NX * ROWS];
  [[unroll]] for (uint i = 0; i < NX * ROWS; ++i) acc[i] = 0.0;

  if ((p.flags & 4u) != 0u) {
    const uint nchunks = p.K / CHUNK;
    const bool xvec = (p.flags & 8u) != 0u;
    for (uint c = tid; c < nchunks; c += gl_WorkGroupSize.x) {
      const uint k0 = c * CHUNK;
#ifdef QUANTIZED
      uint qw[ROWS * WORDS_PER_CHUNK];
      float sc[ROWS], bi[ROWS];
      [[unroll]] for (uint r = 0; r < ROWS; ++r) {
        const uint row = min(row0 + r, p.N - 1);
        const uint wbase = (p.w_off + row * p.w_stride) / 4 + c * (WORDS_PER_CHUNK / 4);
        [[unroll]] for (uint j = 0; j < WORDS_PER_CHUNK / 4; ++j) {
          uvec4 v = ws4[wbase + j];
          qw[r * WORDS_PER_CHUNK + j * 4 + 0] = v.x;
          qw[r * WORDS_PER_CHUNK + j * 4 + 1] = v.y;
          qw[r * WORDS_PER_CHUNK + j * 4 + 2] = v.z;
          qw[r * WORDS_PER_CHUNK + j * 4 + 3] = v.w;
        }
        const uint si = p.s_off + row * p.s_stride + k0 / p.group_size;
        sc[r] = quant_scale(si);
        bi[r] = quant_bias(si);
      }
      [[unroll]] for (uint m = 0; m < NX; ++m) {
        const uint xb = p.x_off + m * p.x_stride + k0;
        float xsum = 0.0;
        float d[ROWS];
        [[unroll]] for (uint r = 0; r < ROWS; ++r) d[r] = 0.0;
        [[unroll]] for (uint j = 0; j < WORDS_PER_CHUNK; ++j) {
          float xv[VALUES_PER_WORD];
          if (xvec) {
            [[unroll]] for (uint e = 0; e < VALUES_PER_WORD; e += 4) {
              vec4 v4 = XLOAD4((xb + j * VALUES_PER_WORD + e) / 4);
              xv[e] = v4.x; xv[e + 1] = v4.y; xv[e + 2] = v4.z; xv[e + 3] = v4.w;
            }
          } else {
            [[unroll]] for (uint e = 0; e < VALUES_PER_WORD; ++e) xv[e] = XLOAD(xb + j * VALUES_PER_WORD + e);
          }
          [[unroll]] for (uint e = 0; e < VALUES_PER_WORD; ++e) xsum += xv[e];
          [[unroll]] for (uint r = 0; r < ROWS; ++r) {
            const uint word = qw[r * WORDS_PER_CHUNK + j];
            [[unroll]] for (uint e = 0; e < VALUES_PER_WORD; ++e)
              d[r] += xv[e] * float((word >> (BITS * e)) & ((1u << BITS) - 1u));
          }
        }
        [[unroll]] for (uint r = 0; r < ROWS; ++r) acc[m * ROWS + r] += sc[r] * d[r] + bi[r] * xsum;
      }
#else
      float wv[ROWS * CHUNK];
      [[unroll]] for (uint r = 0; r < ROWS; ++r) {
        const uint row = min(row0 + r, p.N - 1);
#if defined(W_F32)
        vec4 v = ws4[(p.w_off + row * p.w_stride) / 4 + c];
        wv[r * 4 + 0] = v.x; wv[r * 4 + 1] = v.y; wv[r * 4 + 2] = v.z; wv[r * 4 + 3] = v.w;
#else
        uvec4 v = ws4[(p.w_off + row * p.w_stride) / 8 + c];
        uint words[4] = uint[4](v.x, v.y, v.z, v.w);
        [[unroll]] for (uint j = 0; j < 4; ++j) {
#if defined(W_F16)
          vec2 f = unpackHalf2x16(words[j]);
#else
          vec2 f = vec2(uintBitsToFloat(words[j] << 16), uintBitsToFloat(words[j] & 0xFFFF0000u));
#endif
          wv[r * 8 + 2 * j] = f.x;
          wv[r * 8 + 2 * j + 1] = f.y;
        }
#endif
      }
      [[unroll]] for (uint m = 0; m < NX; ++m) {
        const uint xb = p.x_off + m * p.x_stride + k0;
        float xv[CHUNK];
        if (xvec) {
          [[unroll]] for (uint e = 0; e < CHUNK; e += 4) {
            vec4 v4 = XLOAD4((xb + e) / 4);
            xv[e] = v4.x; xv[e + 1] = v4.y; xv[e + 2] = v4.z; xv[e + 3] = v4.w;
          }
        } else {
          [[unroll]] for (uint e = 0; e < CHUNK; ++e) xv[e] = XLOAD(xb + e);
        }
        [[unroll]] for (uint r = 0; r < ROWS; ++r) {
          float d = 0.0;
          [[unroll]] for (uint e = 0; e < CHUNK; ++e) d += xv[e] * wv[r * CHUNK + e];
          acc[m * ROWS + r] += d;
        }
      }
#endif
    }
  } else {
    // Scalar path: any K and any alignment (f32/f16/bf16 only).
    for (uint k = tid; k < p.K; k += gl_WorkGroupSize.x) {
      float wv[ROWS];
      [[unroll]] for (uint r = 0; r < ROWS; ++r) wv[r] = weight_elem(min(row0 + r, p.N - 1), k);
      [[unroll]] for (uint m = 0; m < NX; ++m) {
        const float xv = XLOAD(p.x_off + m * p.x_stride + k);
        [[unroll]] for (uint r = 0; r < ROWS; ++r) acc[m * ROWS + r] += xv * wv[r];
      }
    }
  }

  [[unroll]] for (uint i = 0; i < NX * ROWS; ++i) {
    float s = wg_sum(acc[i]);
    if (tid == 0) partial_sh[i] = s;
  }
  barrier();
  if (tid < NX * ROWS) {
    const uint m = tid / ROWS, r = tid % ROWS;
    const uint n = row0 + r;
    if (m < p.M && n < p.N) {
      float v = partial_sh[tid];
      if ((p.flags & 1u) != 0u) v += bias[p.bias_off + n];
      const uint yi = p.y_off + m * p.y_stride + n;
      if ((p.flags & 2u) != 0u) v += ys[yi];
      ys[yi] = v;
    }
  }
}
