#version 450
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) (+ y[m, n]), shaped for CPU devices.
//
// On a CPU driver (lavapipe) a subgroup is the SIMD lanes of one core, and a load whose address
// differs between lanes is issued lane by lane, component by component, while a load whose
// address is the same for every lane is one scalar load broadcast to all. So here each
// invocation owns COLS output columns (local size apart) and walks all of k alone, reading their
// weight rows in 16-byte loads, while every x element it multiplies is read at an address that is
// the same for the whole workgroup. No cross-lane reduction is needed. Each x load serves COLS
// products, and each workgroup takes NX
// rows of x (gl_WorkGroupID.z picks which NX), so each weight load serves NX products. Larger M
// is covered by more z groups, which makes this one kernel the CPU's GEMV and GEMM.
//
// Every output is the same sequential sum over k whatever M and NX are, so a row's result does
// not depend on how many rows it was computed with (batched decode equals decode alone).
//
// MLX affine quantization: W[n, k] = scale[n, g] * q[n, k] + bias[n, g], dequantized once per
// load and shared by the NX rows.
#extension GL_GOOGLE_include_directive : require
#ifdef X_F16
#extension GL_EXT_shader_16bit_storage : require
#endif
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint NX = 1;  // rows of x per workgroup, 1..8
layout(constant_id = 2) const bool SCALES_BF16 = false;
// x rows start 16-byte aligned (x_off and x_stride multiples of 4): vec4 loads. A constant, not
// a flag: a branch on a CPU device runs both sides under a mask.
layout(constant_id = 3) const bool X_VEC4 = false;
layout(constant_id = 4) const uint COLS = 1;  // output columns per invocation, 1..4

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

// W is read 16 bytes (one uvec4) at a time per column and used 4 values (a quad) at a time.
layout(binding = 1) readonly buffer WBuf4 { uvec4 ws4[]; };
#if defined(W_F32)
layout(binding = 1) readonly buffer WBuf { float ws[]; };
const uint CHUNK = 4;  // values per 16-byte load
#else
layout(binding = 1) readonly buffer WBuf { uint ws[]; };
#if defined(W_Q4) || defined(W_Q8)
#define QUANTIZED 1
#if defined(W_Q4)
const uint BITS = 4;
#else
const uint BITS = 8;
#endif
const uint CHUNK = 4 * (32 / BITS);  // 32 (q4) or 16 (q8) values per 16-byte load
layout(binding = 2) readonly buffer ScaleBuf { uint scales[]; };
layout(binding = 3) readonly buffer QBiasBuf { uint qbiases[]; };
#else
const uint CHUNK = 8;
#endif
#endif
const uint QUADS = CHUNK / 4;
// Units of w_off / w_stride (f32 values, halves or quantized words) per 16-byte load.
#if defined(W_F32) || defined(QUANTIZED)
const uint W_UNITS_PER_LOAD = 4;
#else
const uint W_UNITS_PER_LOAD = 8;
#endif
layout(binding = 4) readonly buffer BiasBuf { float bias[]; };
layout(binding = 5) buffer YBuf { float ys[]; };

#include "weight_elem.glsl"

// Values 4q .. 4q + 3 of a 16-byte load of W (scale and bias: the group's, quantized only).
vec4 quad_of(uvec4 v, uint q, float sc, float bi) {
#if defined(W_F32)
  return uintBitsToFloat(v);
#elif defined(W_F16)
  return vec4(unpackHalf2x16(v[2 * q]), unpackHalf2x16(v[2 * q + 1]));
#elif defined(W_BF16)
  const uint a = v[2 * q], b = v[2 * q + 1];
  return uintBitsToFloat(uvec4(a << 16, a & 0xFFFF0000u, b << 16, b & 0xFFFF0000u));
#else
  const uint word = v[q * BITS / 8];
  const uint shift = (q * 4 * BITS) % 32;
  const uvec4 qv = (uvec4(word) >> (uvec4(shift) + uvec4(0, BITS, 2 * BITS, 3 * BITS))) & ((1u << BITS) - 1u);
  return fma(vec4(qv), vec4(sc), vec4(bi));
#endif
}

// x[row, k0 .. k0 + 4): the same addresses for every invocation.
vec4 x_quad(uint row, uint k0) {
  const uint i = p.x_off + row * p.x_stride + k0;
  return X_VEC4 ? XLOAD4(i / 4) : vec4(XLOAD(i), XLOAD(i + 1), XLOAD(i + 2), XLOAD(i + 3));
}

void main() {
  const uint wg_index = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
  // Columns past the last one are computed as the last one again and stored nowhere, so every
  // lane stays active and every x address stays the same across the workgroup.
  uint ncol[COLS], n_raw[COLS];
  [[unroll]] for (uint j = 0; j < COLS; ++j) {
    n_raw[j] = (wg_index * COLS + j) * gl_WorkGroupSize.x + gl_LocalInvocationID.x;
    ncol[j] = min(n_raw[j], p.N - 1);
  }
  const uint m0 = gl_WorkGroupID.z * NX;
  // Rows past M reread row M - 1 and store nothing.
  uint xrow[NX];
  [[unroll]] for (uint m = 0; m < NX; ++m) xrow[m] = min(m0 + m, p.M - 1);

  float acc[NX * COLS];
  [[unroll]] for (uint i = 0; i < NX * COLS; ++i) acc[i] = 0.0;

  if ((p.flags & 4u) != 0u) {
#ifdef QUANTIZED
    const uint chunks_per_group = p.group_size / CHUNK;
    const uint groups = p.K / p.group_size;
#else
    const uint chunks_per_group = p.K / CHUNK;
    const uint groups = 1;
#endif
    for (uint g = 0; g < groups; ++g) {
      float sc[COLS], bi[COLS];
      [[unroll]] for (uint j = 0; j < COLS; ++j) {
#ifdef QUANTIZED
        const uint si = p.s_off + ncol[j] * p.s_stride + g;
        sc[j] = quant_scale(si);
        bi[j] = quant_bias(si);
#else
        sc[j] = 1.0;
        bi[j] = 0.0;
#endif
      }
      for (uint c = g * chunks_per_group; c < (g + 1) * chunks_per_group; ++c) {
        uvec4 v[COLS];
        [[unroll]] for (uint j = 0; j < COLS; ++j) v[j] = ws4[(p.w_off + ncol[j] * p.w_stride) / W_UNITS_PER_LOAD + c];
        [[unroll]] for (uint q = 0; q < QUADS; ++q) {
          vec4 w[COLS];
          [[unroll]] for (uint j = 0; j < COLS; ++j) w[j] = quad_of(v[j], q, sc[j], bi[j]);
          [[unroll]] for (uint m = 0; m < NX; ++m) {
            const vec4 xq = x_quad(xrow[m], c * CHUNK + 4 * q);
            [[unroll]] for (uint j = 0; j < COLS; ++j) acc[m * COLS + j] += dot(xq, w[j]);
          }
        }
      }
    }
  } else {
    // Scalar path: any K and any alignment (f32/f16/bf16 only).
    for (uint k = 0; k < p.K; ++k) {
      [[unroll]] for (uint j = 0; j < COLS; ++j) {
        const float wv = weight_elem(ncol[j], k);
        [[unroll]] for (uint m = 0; m < NX; ++m) acc[m * COLS + j] += XLOAD(p.x_off + xrow[m] * p.x_stride + k) * wv;
      }
    }
  }

  [[unroll]] for (uint j = 0; j < COLS; ++j) {
    const uint n = ncol[j];
    if (n_raw[j] < p.N) {
      [[unroll]] for (uint m = 0; m < NX; ++m) {
        if (m0 + m < p.M) {
          float val = acc[m * COLS + j];
          if ((p.flags & 1u) != 0u) val += bias[p.bias_off + n];
          const uint yi = p.y_off + (m0 + m) * p.y_stride + n;
          if ((p.flags & 2u) != 0u) val += ys[yi];
          ys[yi] = val;
        }
      }
    }
  }
}
