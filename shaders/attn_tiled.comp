#version 450
// Attention for many queries (prefill, vision): softmax(q k^T * scale + mask) v without ever
// materializing the score matrix. A workgroup takes BR queries of one head and streams the keys
// in tiles of BC through shared memory, keeping a running max and sum per query (online
// softmax). Grouped-query heads share K/V: head h reads kv head h / (H / HKV).
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint BR = 16;
layout(constant_id = 2) const uint BC = 32;
layout(constant_id = 3) const uint D = 64;
layout(constant_id = 4) const uint EPT = 8;  // output elements per thread: ceil(BR * D / workgroup size)

#include "attn_common.glsl"

shared float q_sh[BR * D];
shared float kv_sh[BC * D];
shared float s_sh[BR * BC];
shared float m_sh[BR];
shared float l_sh[BR];
shared float alpha_sh[BR];
shared uvec2 keys_sh[BR];  // each query's visible keys [lo, hi)

void main() {
  const uint tid = gl_LocalInvocationID.x;
  const uint WG = gl_WorkGroupSize.x;
  const uint qt0 = gl_WorkGroupID.x * BR;
  const uint h = gl_WorkGroupID.y;
  const uint kvh = h / (p.H / p.HKV);
  const uint first = uint(first_row[p.row_off]);
  const uint first_q_row = first + p.q_t0 + qt0;

  for (uint e = tid; e < BR * D; e += WG) {
    const uint r = e / D, d = e % D, t = qt0 + r;
    q_sh[e] = t < p.T ? qs[p.q_off + t * p.q_stride + h * D + d] * p.scale : 0.0;
  }
  if (tid < BR) {
    m_sh[tid] = NEG_INF;
    l_sh[tid] = 0.0;
    keys_sh[tid] = qt0 + tid < p.T ? visible_keys(p.q_t0 + qt0 + tid, first_q_row + tid) : uvec2(0u, 0u);
  }
  float o[EPT];
  [[unroll]] for (uint i = 0; i < EPT; ++i) o[i] = 0.0;

  uint kb = p.key_begin;
  uint ke = min(p.key_end, first + p.T_total);
  visible_range(p.q_t0 + qt0, p.q_t0 + min(qt0 + BR, p.T) - 1, first_q_row, kb, ke);
  barrier();

  for (uint j0 = kb; j0 < ke; j0 += BC) {
    for (uint e = tid; e < BC * D; e += WG) {
      const uint c = e / D, d = e % D, j = j0 + c;
      kv_sh[e] = j < ke ? k_at(j, kvh, d) : 0.0;
    }
    barrier();
    for (uint e = tid; e < BR * BC; e += WG) {
      const uint r = e / BC, c = e % BC, j = j0 + c;
      float s = NEG_INF;
      if (j < ke && j >= keys_sh[r].x && j < keys_sh[r].y) {
        s = 0.0;
        for (uint d = 0; d < D; ++d) s += q_sh[r * D + d] * kv_sh[c * D + d];
      }
      s_sh[e] = s;
    }
    barrier();
    if (tid < BR) {
      const uint r = tid;
      const float m_old = m_sh[r];
      float m_new = m_old;
      for (uint c = 0; c < BC; ++c) m_new = max(m_new, s_sh[r * BC + c]);
      const float alpha = m_new == NEG_INF ? 1.0 : exp(m_old - m_new);
      float sum = 0.0;
      for (uint c = 0; c < BC; ++c) {
        const float s = s_sh[r * BC + c];
        const float pv = s == NEG_INF ? 0.0 : exp(s - m_new);
        s_sh[r * BC + c] = pv;
        sum += pv;
      }
      l_sh[r] = l_sh[r] * alpha + sum;
      m_sh[r] = m_new;
      alpha_sh[r] = alpha;
    }
    for (uint e = tid; e < BC * D; e += WG) {
      const uint c = e / D, d = e % D, j = j0 + c;
      kv_sh[e] = j < ke ? v_at(j, kvh, d) : 0.0;
    }
    barrier();
    [[unroll]] for (uint i = 0; i < EPT; ++i) {
      const uint e = tid + i * WG;
      if (e < BR * D) {
        const uint r = e / D, d = e % D;
        float acc = o[i] * alpha_sh[r];
        for (uint c = 0; c < BC; ++c) acc += s_sh[r * BC + c] * kv_sh[c * D + d];
        o[i] = acc;
      }
    }
    barrier();
  }

  [[unroll]] for (uint i = 0; i < EPT; ++i) {
    const uint e = tid + i * WG;
    if (e >= BR * D) continue;
    const uint r = e / D, d = e % D, t = qt0 + r;
    if (t < p.T) store_result(p.part_index, t, h, d, o[i], m_sh[r], l_sh[r]);
  }
}
