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
layout(push_constant) uniform Params {
  uint T, H, HKV;
  uint q_off, q_stride;
  uint k_off, k_stride;
  uint v_off, v_stride;
  uint o_off, o_stride;
  uint row_off;
  uint key_begin, key_end;
  uint flags;  // 1: causal, 2: write partial (acc, max, sum) instead of the output, 4: rotating
              // cache (keys are a set: rows below first_row[row_off + 1] are all visible; no mask)
  uint window;  // sliding window: key j is visible from row i when i - j < window (0: off)
  float scale;
  uint part_index, n_parts;
  uint q_t0, T_total;
  uint split_size;  // keys per workgroup (attn_rows)
  uint prefix_end;  // prefix-LM: keys below it are visible to every query despite causality
  uint block;       // block-diagonal: key j is visible from row i only when j / block == i / block (0: off)
  uint kp_off, kp_stride, vp_off, vp_stride, group_size;  // quantized K/V: the (scale, bias) words
} p;

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

bool key_visible(uint j, uint row) {
  if (p.block != 0u && j / p.block != row / p.block) return false;
  if (p.window != 0u && j + p.window <= row) return false;
  if ((p.flags & 1u) != 0u && j > row && j >= p.prefix_end) return false;
  return true;
}

// The keys [kb, ke) that can be visible from rows [first, last], within [kb, ke) given.
void visible_range(uint first, uint last, inout uint kb, inout uint ke) {
  if ((p.flags & 1u) != 0u) ke = min(ke, max(last + 1, p.prefix_end));
  if (p.window != 0u && first + 1 > p.window) kb = max(kb, first + 1 - p.window);
  if (p.block != 0u) {
    kb = max(kb, first / p.block * p.block);
    ke = min(ke, (last / p.block + 1) * p.block);
  }
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
