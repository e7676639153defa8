#version 450
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) (+ y[m, n]) on cooperative-matrix units
// (VK_NV_cooperative_matrix): f16 operands, f32 accumulation.
//
// A workgroup of 4 subgroups of 32 computes a 64 x 64 tile of y; each subgroup owns a 32 x 32
// quarter as 2 x 2 accumulators of 16 x 16 (the 16 x 16 x 16 shape drivers list). k advances
// in steps of 32 (one MLX quantization chunk): x and W tiles are converted to f16 (W dequantized)
// in shared memory, then loaded as matrix fragments; W's tile, stored [n][k], is B in column-major
// order. Results go through shared memory so edges, bias and accumulation are handled per
// element.
#extension GL_GOOGLE_include_directive : require
#extension GL_NV_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_KHR_shader_subgroup_basic : require
#include "common.glsl"

layout(local_size_x_id = 0) in;  // 4 subgroups of 32
layout(constant_id = 1) const bool SCALES_BF16 = false;
const uint BM = 64, BN = 64, BK = 32, T = 16;

#define PUSH_MATMUL
#include "push_constants.h"

layout(binding = 0) readonly buffer XBuf { float xs[]; };
#if defined(W_F32)
layout(binding = 1) readonly buffer WBuf { float ws[]; };
#else
layout(binding = 1) readonly buffer WBuf { uint ws[]; };
#endif
#if defined(W_Q4) || defined(W_Q8)
#define QUANTIZED 1
layout(binding = 2) readonly buffer ScaleBuf { uint scales[]; };
layout(binding = 3) readonly buffer QBiasBuf { uint qbiases[]; };
#endif
layout(binding = 4) readonly buffer BiasBuf { float bias[]; };
layout(binding = 5) buffer YBuf { float ys[]; };

shared float16_t a_sh[BM * BK];  // [m][k]
shared float16_t b_sh[BN * BK];  // [n][k]
shared float c_sh[BM * BN];      // [m][n]

#include "weight_elem.glsl"

void main() {
  const uint tid = gl_LocalInvocationID.x;
  const uint WG = gl_WorkGroupSize.x;
  const uint n0 = gl_WorkGroupID.x * BN;
  const uint m0 = gl_WorkGroupID.y * BM;
  // Subgroup s owns rows (s / 2) * 32 and columns (s % 2) * 32 of the tile.
  const uint sg = gl_SubgroupID;
  const uint sm = (sg / 2) * 32, sn = (sg % 2) * 32;

  fcoopmatNV<32, gl_ScopeSubgroup, T, T> acc[2][2];
  [[unroll]] for (uint i = 0; i < 2; ++i)
    [[unroll]] for (uint j = 0; j < 2; ++j) acc[i][j] = fcoopmatNV<32, gl_ScopeSubgroup, T, T>(0.0);

  for (uint k0 = 0; k0 < p.K; k0 += BK) {
    for (uint e = tid; e < BM * BK; e += WG) {
      const uint r = e / BK, kk = e % BK, m = m0 + r, k = k0 + kk;
      a_sh[e] = float16_t((m < p.M && k < p.K) ? xs[p.x_off + m * p.x_stride + k] : 0.0);
    }
    for (uint e = tid; e < BN * BK; e += WG) {
      const uint r = e / BK, kk = e % BK, n = n0 + r, k = k0 + kk;
      b_sh[e] = float16_t((n < p.N && k < p.K) ? weight_elem(n, k) : 0.0);
    }
    barrier();
    [[unroll]] for (uint kk = 0; kk < BK; kk += T) {
      fcoopmatNV<16, gl_ScopeSubgroup, T, T> a[2];
      fcoopmatNV<16, gl_ScopeSubgroup, T, T> b[2];
      [[unroll]] for (uint i = 0; i < 2; ++i) coopMatLoadNV(a[i], a_sh, (sm + i * 16) * BK + kk, BK, false);
      [[unroll]] for (uint j = 0; j < 2; ++j) coopMatLoadNV(b[j], b_sh, (sn + j * 16) * BK + kk, BK, true);
      [[unroll]] for (uint i = 0; i < 2; ++i)
        [[unroll]] for (uint j = 0; j < 2; ++j) acc[i][j] = coopMatMulAddNV(a[i], b[j], acc[i][j]);
    }
    barrier();
  }

  [[unroll]] for (uint i = 0; i < 2; ++i)
    [[unroll]] for (uint j = 0; j < 2; ++j) coopMatStoreNV(acc[i][j], c_sh, (sm + i * 16) * BN + sn + j * 16, BN, false);
  barrier();
  for (uint e = tid; e < BM * BN; e += WG) {
    const uint m = m0 + e / BN, n = n0 + e % BN;
    if (m >= p.M || n >= p.N) continue;
    float v = c_sh[e];
    if ((p.flags & 1u) != 0u) v += bias[p.bias_off + n];
    const uint yi = p.y_off + m * p.y_stride + n;
    if ((p.flags & 2u) != 0u) v += ys[yi];
    ys[yi] = v;
  }
}
