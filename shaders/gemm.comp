#version 450
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) (+ y[m, n]) for many rows m (prefill, vision).
//
// Classic shared-memory tiling: a workgroup computes a BM x BN tile of y, walking k in steps of
// BK = 32 (one MLX quantization chunk, so a tile row never straddles a quantization group).
// x and W tiles are staged in shared memory as f32 (W dequantized on the way in); each thread
// accumulates TM x TN outputs strided by the thread grid so stores are coalesced.
#extension GL_GOOGLE_include_directive : require
#ifdef X_F16
#extension GL_EXT_shader_16bit_storage : require
#endif
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint BM = 64;
layout(constant_id = 2) const uint BN = 64;
layout(constant_id = 3) const uint TM = 4;
layout(constant_id = 4) const uint TN = 4;
layout(constant_id = 5) const bool SCALES_BF16 = false;
const uint BK = 32;

#define PUSH_MATMUL
#include "push_constants.h"

#ifdef X_F16
layout(binding = 0) readonly buffer XBuf { float16_t xs[]; };
#define XLOAD(i) float(xs[i])
#else
layout(binding = 0) readonly buffer XBuf { float xs[]; };
#define XLOAD(i) xs[i]
#endif

#if defined(W_F32)
layout(binding = 1) readonly buffer WBuf { float ws[]; };
layout(binding = 1) readonly buffer WBuf4 { vec4 ws4[]; };
#else
layout(binding = 1) readonly buffer WBuf { uint ws[]; };
layout(binding = 1) readonly buffer WBuf4 { uvec4 ws4[]; };
#endif
#if defined(W_Q4) || defined(W_Q8)
#define QUANTIZED 1
layout(binding = 2) readonly buffer ScaleBuf { uint scales[]; };
layout(binding = 3) readonly buffer QBiasBuf { uint qbiases[]; };
#endif
layout(binding = 4) readonly buffer BiasBuf { float bias[]; };
layout(binding = 5) buffer YBuf { float ys[]; };

shared float a_sh[BK * BM];  // [k][m]
shared float b_sh[BK * BN];  // [k][n]

#include "weight_elem.glsl"

// Eight consecutive weights W[row, k .. k+7] (k a multiple of 8) into b_sh.
void load_w8(uint row, uint k, uint local_n, uint local_k) {
  float v[8];
  const bool in_range = row < p.N;
#ifdef QUANTIZED
  if (in_range) {
    const uint si = p.s_off + row * p.s_stride + k / p.group_size;
    const float sc = quant_scale(si);
    const float bi = quant_bias(si);
#if defined(W_Q4)
    const uint word = ws[p.w_off + row * p.w_stride + k / 8];
    [[unroll]] for (uint e = 0; e < 8; ++e) v[e] = sc * float((word >> (4 * e)) & 15u) + bi;
#else
    const uint base = p.w_off + row * p.w_stride + k / 4;
    [[unroll]] for (uint j = 0; j < 2; ++j) {
      const uint word = ws[base + j];
      [[unroll]] for (uint e = 0; e < 4; ++e) v[j * 4 + e] = sc * float((word >> (8 * e)) & 255u) + bi;
    }
#endif
  } else {
    [[unroll]] for (uint e = 0; e < 8; ++e) v[e] = 0.0;
  }
#else
  if ((p.flags & 4u) != 0u) {
    // Aligned rows and K % 8 == 0: a block of 8 is wholly inside or outside the row.
    if (in_range && k < p.K) {
#if defined(W_F32)
      const uint b4 = (p.w_off + row * p.w_stride + k) / 4;
      vec4 lo = ws4[b4], hi = ws4[b4 + 1];
      v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w;
      v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
#else
      uvec4 w4 = ws4[(p.w_off + row * p.w_stride + k) / 8];
      uint words[4] = uint[4](w4.x, w4.y, w4.z, w4.w);
      [[unroll]] for (uint j = 0; j < 4; ++j) {
#if defined(W_F16)
        vec2 f = unpackHalf2x16(words[j]);
#else
        vec2 f = vec2(uintBitsToFloat(words[j] << 16), uintBitsToFloat(words[j] & 0xFFFF0000u));
#endif
        v[2 * j] = f.x;
        v[2 * j + 1] = f.y;
      }
#endif
    } else {
      [[unroll]] for (uint e = 0; e < 8; ++e) v[e] = 0.0;
    }
  } else {
    [[unroll]] for (uint e = 0; e < 8; ++e) v[e] = (in_range && k + e < p.K) ? weight_elem(row, k + e) : 0.0;
  }
#endif
  [[unroll]] for (uint e = 0; e < 8; ++e) b_sh[(local_k + e) * BN + local_n] = v[e];
}

void main() {
  const uint tid = gl_LocalInvocationID.x;
  const uint TX = BN / TN, TY = BM / TM;
  const uint tx = tid % TX, ty = tid / TX;
  const uint n0 = gl_WorkGroupID.x * BN;
  const uint m0 = gl_WorkGroupID.y * BM;

  float acc[TM * TN];
  [[unroll]] for (uint i = 0; i < TM * TN; ++i) acc[i] = 0.0;

  for (uint k0 = 0; k0 < p.K; k0 += BK) {
    for (uint e = tid; e < BM * BK; e += gl_WorkGroupSize.x) {
      const uint r = e / BK, kk = e % BK;
      const uint m = m0 + r, k = k0 + kk;
      a_sh[kk * BM + r] = (m < p.M && k < p.K) ? XLOAD(p.x_off + m * p.x_stride + k) : 0.0;
    }
    for (uint u = tid; u < BN * (BK / 8); u += gl_WorkGroupSize.x) {
      const uint r = u / (BK / 8), part = u % (BK / 8);
      load_w8(n0 + r, k0 + part * 8, r, part * 8);
    }
    barrier();
    [[unroll]] for (uint kk = 0; kk < BK; ++kk) {
      float a[TM], b[TN];
      [[unroll]] for (uint i = 0; i < TM; ++i) a[i] = a_sh[kk * BM + ty + i * TY];
      [[unroll]] for (uint j = 0; j < TN; ++j) b[j] = b_sh[kk * BN + tx + j * TX];
      [[unroll]] for (uint i = 0; i < TM; ++i)
        [[unroll]] for (uint j = 0; j < TN; ++j) acc[i * TN + j] += a[i] * b[j];
    }
    barrier();
  }

  [[unroll]] for (uint i = 0; i < TM; ++i) {
    const uint m = m0 + ty + i * TY;
    if (m >= p.M) continue;
    [[unroll]] for (uint j = 0; j < TN; ++j) {
      const uint n = n0 + tx + j * TX;
      if (n >= p.N) continue;
      float v = acc[i * TN + j];
      if ((p.flags & 1u) != 0u) v += bias[p.bias_off + n];
      const uint yi = p.y_off + m * p.y_stride + n;
      if ((p.flags & 2u) != 0u) v += ys[yi];
      ys[yi] = v;
    }
  }
}
