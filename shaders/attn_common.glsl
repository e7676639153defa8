// Parameters and K/V access shared by the attention kernels.
//
// q, o: f32 rows [T, H * D] with row strides; K, V: rows [keys, HKV * D] in f16 (the KV cache,
// read as packed words), in MLX affine quantization (KV_Q4, KV_Q8: packed values, and one word
// of (scale, bias) halves per group of group_size values) or f32 (vision, straight from the QKV
// projection). Query t of this
// dispatch is token q_t0 + t of the forward pass, stored at KV row first + q_t0 + t, where first
// is read from the row buffer. Masks work on KV rows (not RoPE positions). Keys j in
// [key_begin, key_end) are bound, the first at k_off/v_off; keys at or past first + T_total do
// not exist yet.
//
// The mask is data: a causal query sees the keys up to its own row (within the sliding window),
// and, when the span buffer is bound (flag 8), also every key of the span its row belongs to
// (PaliGemma's prefix, Gemma 3's image blocks); a query that is not causal sees every key, or
// only its span's (a vision tower's images, block-diagonal). Spans are [begin, end) in KV rows,
// one pair per query of the pass (begin == end: none).
#define PUSH_ATTENTION
#include "push_constants.h"

layout(binding = 0) readonly buffer QBuf { float qs[]; };
#ifdef KV_F16
layout(binding = 1) readonly buffer KBuf { uint ks[]; };
layout(binding = 2) readonly buffer VBuf { uint vs[]; };
float k_at(uint j, uint kvh, uint d) {
  uint i = p.k_off + (j - p.key_begin) * p.k_stride + kvh * D + d;
  return unpackHalf2x16(ks[i >> 1])[i & 1u];
}
float v_at(uint j, uint kvh, uint d) {
  uint i = p.v_off + (j - p.key_begin) * p.v_stride + kvh * D + d;
  return unpackHalf2x16(vs[i >> 1])[i & 1u];
}
#elif defined(KV_Q4) || defined(KV_Q8)
#if defined(KV_Q4)
const uint KV_BITS = 4u;
#else
const uint KV_BITS = 8u;
#endif
const uint KV_PER_WORD = 32u / KV_BITS;
layout(binding = 1) readonly buffer KBuf { uint ks[]; };
layout(binding = 2) readonly buffer VBuf { uint vs[]; };
layout(binding = 6) readonly buffer KParamBuf { uint kps[]; };
layout(binding = 7) readonly buffer VParamBuf { uint vps[]; };
// Element e of a row, from the word holding it and its group's (scale, bias).
float kv_dequant(uint word, uint params, uint e) {
  const float q = float((word >> (KV_BITS * (e % KV_PER_WORD))) & ((1u << KV_BITS) - 1u));
  const vec2 sb = unpackHalf2x16(params);
  return sb.x * q + sb.y;
}
float k_at(uint j, uint kvh, uint d) {
  const uint r = j - p.key_begin, e = kvh * D + d;
  return kv_dequant(ks[p.k_off + r * p.k_stride + e / KV_PER_WORD], kps[p.kp_off + r * p.kp_stride + e / p.group_size], e);
}
float v_at(uint j, uint kvh, uint d) {
  const uint r = j - p.key_begin, e = kvh * D + d;
  return kv_dequant(vs[p.v_off + r * p.v_stride + e / KV_PER_WORD], vps[p.vp_off + r * p.vp_stride + e / p.group_size], e);
}
#else
layout(binding = 1) readonly buffer KBuf { float ks[]; };
layout(binding = 2) readonly buffer VBuf { float vs[]; };
float k_at(uint j, uint kvh, uint d) { return ks[p.k_off + (j - p.key_begin) * p.k_stride + kvh * D + d]; }
float v_at(uint j, uint kvh, uint d) { return vs[p.v_off + (j - p.key_begin) * p.v_stride + kvh * D + d]; }
#endif
layout(binding = 3) readonly buffer RowBuf { int first_row[]; };
layout(binding = 4) writeonly buffer OBuf { float os[]; };
layout(binding = 5) writeonly buffer PartBuf { float parts[]; };
layout(binding = 8) readonly buffer SpanBuf { int spans[]; };

// The keys [lo, hi) the pass's query i (at KV row `row`) sees: one contiguous range.
uvec2 visible_keys(uint i, uint row) {
  uvec2 r = uvec2(0u, 0xffffffffu);
  if ((p.flags & 1u) != 0u) r = uvec2(p.window != 0u && row + 1u > p.window ? row + 1u - p.window : 0u, row + 1u);
  if ((p.flags & 8u) != 0u) {
    const uint b = uint(spans[p.span_off + 2u * i]), e = uint(spans[p.span_off + 2u * i + 1u]);
    if (e > b) r = (p.flags & 1u) != 0u ? uvec2(min(r.x, b), max(r.y, e)) : uvec2(b, e);
  }
  return r;
}

// The keys [kb, ke) that can be visible from the pass's queries [i0, i1] (KV rows from row0),
// within [kb, ke) given.
void visible_range(uint i0, uint i1, uint row0, inout uint kb, inout uint ke) {
  uvec2 r = visible_keys(i0, row0);
  for (uint i = i0 + 1u; i <= i1; ++i) {
    const uvec2 ri = visible_keys(i, row0 + (i - i0));
    r = uvec2(min(r.x, ri.x), max(r.y, ri.y));
  }
  kb = max(kb, r.x);
  ke = min(ke, r.y);
}

// Writes one output element, or the partial result when the keys are split across dispatches.
void store_result(uint part, uint t, uint h, uint d, float acc, float m, float l) {
  if ((p.flags & 2u) != 0u) {
    const uint base = ((t * p.H + h) * p.n_parts + part) * (D + 2);
    parts[base + d] = acc;
    if (d == 0u) {
      parts[base + D] = m;
      parts[base + D + 1] = l;
    }
  } else {
    os[p.o_off + t * p.o_stride + h * D + d] = l > 0.0 ? acc / l : 0.0;
  }
}
