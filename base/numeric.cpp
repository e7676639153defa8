#include "base/numeric.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "base/error.h"

namespace vkvlm {

uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) return uint16_t(sign | 0x7C00u | (abs > 0x7F800000u ? 0x200u : 0u));  // inf / nan
  if (abs >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // rounds past the largest half
  if (abs < 0x38800000u) {
    // Subnormal half (or zero): shift the full mantissa into place with rounding to nearest even.
    if (abs < 0x33000000u) return uint16_t(sign);
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // 14..24
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
    return uint16_t(sign | h);
  }
  uint32_t h = ((abs - 0x38000000u) >> 13);
  const uint32_t rem = abs & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t x;
  if (exp == 0) {
    if (mant == 0) {
      x = sign;
    } else {
      // Normalize the subnormal.
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3FFu;
      x = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    x = sign | 0x7F800000u | (mant << 13);
  } else {
    x = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

uint16_t f32_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((x >> 16) | 0x40u);  // quiet nan
  const uint32_t lsb = (x >> 16) & 1u;
  x += 0x7FFFu + lsb;
  return uint16_t(x >> 16);
}

AffineQuantized quantize_affine(const float* w, int64_t n, int64_t k, int bits, int group, bool scales_bf16) {
  if (bits != 4 && bits != 8) fail("quantization to ", bits, " bits is not supported (4 or 8)");
  if (group != 32 && group != 64 && group != 128) fail("quantization group size ", group, " is not 32, 64 or 128");
  if (k % group) fail("cannot quantize rows of ", k, " values in groups of ", group);
  AffineQuantized q;
  q.bits = bits;
  q.group = group;
  q.scales_bf16 = scales_bf16;
  const int64_t per_word = 32 / bits, groups = k / group;
  const int levels = (1 << bits) - 1;
  q.words.assign(size_t(n * k / per_word), 0);
  q.scales.resize(size_t(n * groups));
  q.biases.resize(size_t(n * groups));
  auto to16 = [&](float v) { return scales_bf16 ? f32_to_bf16(v) : f32_to_f16(v); };
  auto from16 = [&](uint16_t v) { return scales_bf16 ? bf16_to_f32(v) : f16_to_f32(v); };
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* src = w + r * k + g * group;
      float lo = src[0], hi = src[0];
      for (int i = 1; i < group; ++i) {
        lo = std::min(lo, src[i]);
        hi = std::max(hi, src[i]);
      }
      // Quantize against the stored (rounded) scale and bias so the grid matches what kernels see.
      uint16_t s16 = to16(std::max((hi - lo) / float(levels), 1e-8f));
      uint16_t b16 = to16(lo);
      const float scale = from16(s16), bias = from16(b16);
      q.scales[size_t(r * groups + g)] = s16;
      q.biases[size_t(r * groups + g)] = b16;
      for (int i = 0; i < group; ++i) {
        long v = std::lround((src[i] - bias) / scale);
        v = std::clamp<long>(v, 0, levels);
        const int64_t idx = r * k + g * group + i;
        q.words[size_t(idx / per_word)] |= uint32_t(v) << (bits * (idx % per_word));
      }
    }
  }
  return q;
}

std::vector<float> dequantize_affine(const AffineQuantized& q, int64_t n, int64_t k) {
  std::vector<float> out(size_t(n * k));
  const int64_t per_word = 32 / q.bits, groups = k / q.group;
  const uint32_t mask = (1u << q.bits) - 1;
  auto from16 = [&](uint16_t v) { return q.scales_bf16 ? bf16_to_f32(v) : f16_to_f32(v); };
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c) {
      const int64_t idx = r * k + c;
      const uint32_t v = (q.words[size_t(idx / per_word)] >> (q.bits * (idx % per_word))) & mask;
      const size_t gi = size_t(r * groups + c / q.group);
      out[size_t(idx)] = from16(q.scales[gi]) * float(v) + from16(q.biases[gi]);
    }
  return out;
}

}  // namespace vkvlm
