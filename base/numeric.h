#pragma once
// Scalar conversions between f32 and the 16-bit float formats, and MLX's affine quantization.
#include <cstdint>
#include <vector>

namespace vkvlm {

uint16_t f32_to_f16(float f);  // round to nearest even; overflow to inf
float f16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);  // round to nearest even
inline float bf16_to_f32(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// W [n, k] in MLX's affine layout: words [n, k*bits/32] (little-end-first along k), and per group
// of `group` values a scale and bias (f16, or bf16 when scales_bf16) with W ~ scale * q + bias.
struct AffineQuantized {
  int bits = 4, group = 64;
  bool scales_bf16 = false;
  std::vector<uint32_t> words;
  std::vector<uint16_t> scales, biases;
};
AffineQuantized quantize_affine(const float* w, int64_t n, int64_t k, int bits, int group, bool scales_bf16 = false);
// The values the quantized matrix stands for, [n, k].
std::vector<float> dequantize_affine(const AffineQuantized& q, int64_t n, int64_t k);

}  // namespace vkvlm
