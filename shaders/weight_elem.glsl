// Reading single elements of a weight matrix W [N, K] in any gpu::Weight format: f32, f16 or
// bf16 values, or MLX affine quantization (q packed little-end-first into U32 words along k,
// W[n, k] = scale[n, g] * q + bias[n, g] with g = k / group_size, scales and biases f16 or bf16).
//
// Include after declaring: ws (float[] for W_F32, else uint[]); for W_Q4 / W_Q8, scales and
// qbiases (uint[], two halves per word) and the SCALES_BF16 constant; and push constants
// p.w_off, p.w_stride (in elements, or U32 words when quantized), p.s_off, p.s_stride (in
// halves) and p.group_size.

#if defined(W_Q4) || defined(W_Q8)
// Half i of a scale or bias table, given the word that holds it.
float quant_param(uint word, uint i) {
  const uint h = half_of_word(word, i);
  return SCALES_BF16 ? bf16_bits_to_float(h) : f16_bits_to_float(h);
}
float quant_scale(uint i) { return quant_param(scales[i >> 1], i); }
float quant_bias(uint i) { return quant_param(qbiases[i >> 1], i); }
#endif

float weight_elem(uint row, uint k) {
#if defined(W_F32)
  return ws[p.w_off + row * p.w_stride + k];
#elif defined(W_F16) || defined(W_BF16)
  const uint i = p.w_off + row * p.w_stride + k;
  const uint h = half_of_word(ws[i >> 1], i);
#if defined(W_F16)
  return f16_bits_to_float(h);
#else
  return bf16_bits_to_float(h);
#endif
#else
  const uint si = p.s_off + row * p.s_stride + k / p.group_size;
#if defined(W_Q4)
  const uint q = (ws[p.w_off + row * p.w_stride + k / 8] >> (4 * (k % 8))) & 15u;
#else
  const uint q = (ws[p.w_off + row * p.w_stride + k / 4] >> (8 * (k % 4))) & 255u;
#endif
  return quant_scale(si) * float(q) + quant_bias(si);
#endif
}
