#pragma once
// Shared pieces of the kernel tests: one GPU context per process, random inputs, uploads in
// every storage format, and the normalized mean squared error against double-precision
// references.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gpu/context.h"
#include "gpu/ops.h"
#include "gpu/recorder.h"
#include "base/numeric.h"

namespace vkvlm::test {

gpu::Context& ctx();

inline std::vector<float> random_floats(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

inline gpu::Tensor upload_f32(const std::vector<float>& v, std::vector<int64_t> shape, const std::string& name = "input") {
  auto t = ctx().tensor(gpu::DType::F32, std::move(shape), name);
  ctx().upload(t, v.data(), v.size() * 4);
  return t;
}

inline gpu::Tensor upload_i32(const std::vector<int32_t>& v, const std::string& name = "ids") {
  auto t = ctx().tensor(gpu::DType::I32, {int64_t(v.size())}, name);
  ctx().upload(t, v.data(), v.size() * 4);
  return t;
}

// f16 tensor of v (rounded); `rounded` receives the values it holds.
inline gpu::Tensor upload_f16(const std::vector<float>& v, std::vector<int64_t> shape, std::vector<float>* rounded = nullptr) {
  std::vector<uint16_t> h(v.size());
  for (size_t i = 0; i < v.size(); ++i) h[i] = f32_to_f16(v[i]);
  if (rounded) {
    rounded->resize(v.size());
    for (size_t i = 0; i < v.size(); ++i) (*rounded)[i] = f16_to_f32(h[i]);
  }
  auto t = ctx().tensor(gpu::DType::F16, std::move(shape), "f16 input");
  ctx().upload(t, h.data(), h.size() * 2);
  return t;
}

// A weight W [n, k] from random values in the given format, and the exact values it holds.
struct TestWeight {
  gpu::Weight w;
  std::vector<double> values;  // [n, k], what the kernel must multiply by
};
TestWeight make_weight(gpu::WeightFormat format, int64_t n, int64_t k, uint32_t seed, int group = 64,
                       bool scales_bf16 = false);

// An output tensor filled with NaN so that an element the kernel fails to write is caught.
inline gpu::Tensor poisoned_f32(std::vector<int64_t> shape, const std::string& name = "output") {
  auto t = ctx().tensor(gpu::DType::F32, std::move(shape), name);
  ctx().fill_bytes(t, 0xFF);
  return t;
}

// sum (got - want)^2 / sum want^2; NaN anywhere gives infinity.
inline double nmse(const std::vector<float>& got, const std::vector<double>& want) {
  if (got.size() != want.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    double d = double(got[i]) - want[i];
    num += d * d;
    den += want[i] * want[i];
  }
  return den > 0 ? num / den : num;
}

// The subgroup settings this device can run: with (if it has subgroups) and without.
inline std::vector<bool> subgroup_settings() {
  std::vector<bool> s = {false};
  if (ctx().profile().subgroup) s.push_back(true);
  return s;
}

// Runs fn(recorder) and submits.
template <typename F>
void run(F&& fn) {
  gpu::Recorder rec(ctx());
  fn(rec);
  rec.submit();
}

}  // namespace vkvlm::test
