#version 450
// Attention for a few queries (decode): one workgroup per (key split, head, query). Each thread
// scores one key per block of keys; the block's softmax weights go through shared memory and
// threads accumulate the output dimensions. Long caches are split over workgroups and combined
// by attn_merge.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint D = 64;
layout(constant_id = 2) const uint DPT = 1;  // output dimensions per thread: ceil(D / workgroup size)

#include "reduce.glsl"
#include "attn_common.glsl"

shared float q_sh[D];
shared float p_sh[gl_WorkGroupSize.x];

// q_sh . K row j of kv head kvh (q_sh holds the scaled query).
float score(uint j, uint kvh) {
#if defined(KV_Q4) || defined(KV_Q8)
  // Per group: sum q (scale * code + bias) = scale * sum(q * code) + bias * sum(q), one
  // (scale, bias) word and one load per packed word.
  const uint r = j - p.key_begin, e0 = kvh * D, words = p.group_size / KV_PER_WORD;
  const uint wbase = p.k_off + r * p.k_stride + e0 / KV_PER_WORD, pbase = p.kp_off + r * p.kp_stride + e0 / p.group_size;
  float s = 0.0;
  for (uint g = 0; g < D / p.group_size; ++g) {
    float dot = 0.0, qsum = 0.0;
    for (uint w = 0; w < words; ++w) {
      const uint word = ks[wbase + g * words + w];
      const uint d0 = g * p.group_size + w * KV_PER_WORD;
      [[unroll]] for (uint i = 0; i < KV_PER_WORD; ++i) {
        const float qd = q_sh[d0 + i];
        dot += qd * float((word >> (KV_BITS * i)) & ((1u << KV_BITS) - 1u));
        qsum += qd;
      }
    }
    const vec2 sb = unpackHalf2x16(kps[pbase + g]);
    s += sb.x * dot + sb.y * qsum;
  }
  return s;
#else
  float s = 0.0;
  for (uint d = 0; d < D; ++d) s += q_sh[d] * k_at(j, kvh, d);
  return s;
#endif
}

void main() {
  const uint tid = gl_LocalInvocationID.x;
  const uint WG = gl_WorkGroupSize.x;
  const uint split = gl_WorkGroupID.x;
  const uint h = gl_WorkGroupID.y;
  const uint t = gl_WorkGroupID.z;
  const uint kvh = h / (p.H / p.HKV);
  const uint first = uint(first_row[p.row_off]);
  const uint row = first + p.q_t0 + t;

  // The visible keys of one query are contiguous: no per-key mask is needed. In a rotating
  // cache (decode only) they are every row written so far, in no order.
  uint kb = p.key_begin + split * p.split_size;
  uint ke = min(kb + p.split_size, p.key_end);
  if ((p.flags & 4u) != 0u) {
    ke = min(ke, uint(first_row[p.row_off + 1]));
  } else {
    ke = min(ke, first + p.T_total);
    visible_range(p.q_t0 + t, p.q_t0 + t, row, kb, ke);
  }

  for (uint d = tid; d < D; d += WG) q_sh[d] = qs[p.q_off + t * p.q_stride + h * D + d] * p.scale;
  barrier();

  float m = NEG_INF, l = 0.0;
  float acc[DPT];
  [[unroll]] for (uint i = 0; i < DPT; ++i) acc[i] = 0.0;

  for (uint j0 = kb; j0 < ke; j0 += WG) {
    const uint j = j0 + tid;
    float s = NEG_INF;
    if (j < ke) s = score(j, kvh);
    const float m_new = max(m, wg_max(s));
    const float pv = s == NEG_INF ? 0.0 : exp(s - m_new);
    p_sh[tid] = pv;
    const float sum = wg_sum(pv);  // its barriers also publish p_sh
    const float alpha = m_new == NEG_INF ? 1.0 : exp(m - m_new);
    l = l * alpha + sum;
    m = m_new;
    const uint nb = min(WG, ke - j0);
    [[unroll]] for (uint i = 0; i < DPT; ++i) {
      const uint d = tid + i * WG;
      if (d < D) {
        float a = acc[i] * alpha;
        for (uint c = 0; c < nb; ++c) a += p_sh[c] * v_at(j0 + c, kvh, d);
        acc[i] = a;
      }
    }
    barrier();
  }

  [[unroll]] for (uint i = 0; i < DPT; ++i) {
    const uint d = tid + i * WG;
    if (d < D) store_result(p.part_index + split, t, h, d, acc[i], m, l);
  }
}
