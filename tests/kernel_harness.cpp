#include "tests/kernel_harness.h"

#include "gpu/device.h"

namespace vkvlm::test {

gpu::Context& ctx() {
  static std::unique_ptr<gpu::Context> c = [] {
    auto d = gpu::Device::create();
    std::printf("device: %s\n", d->profile().summary_line().c_str());
    return std::make_unique<gpu::Context>(std::move(d));
  }();
  return *c;
}

TestWeight make_weight(gpu::WeightFormat format, int64_t n, int64_t k, uint32_t seed, int group, bool scales_bf16) {
  TestWeight tw;
  auto& w = tw.w;
  w.format = format;
  w.n = n;
  w.k = k;
  w.name = "test weight";
  auto v = random_floats(size_t(n * k), seed);
  tw.values.resize(v.size());
  switch (format) {
    case gpu::WeightFormat::F32: {
      w.data = upload_f32(v, {n, k}, "weight");
      for (size_t i = 0; i < v.size(); ++i) tw.values[i] = v[i];
      break;
    }
    case gpu::WeightFormat::F16: {
      std::vector<float> r;
      w.data = upload_f16(v, {n, k}, &r);
      for (size_t i = 0; i < v.size(); ++i) tw.values[i] = r[i];
      break;
    }
    case gpu::WeightFormat::BF16: {
      std::vector<uint16_t> h(v.size());
      for (size_t i = 0; i < v.size(); ++i) {
        h[i] = f32_to_bf16(v[i]);
        tw.values[i] = bf16_to_f32(h[i]);
      }
      w.data = ctx().tensor(gpu::DType::BF16, {n, k}, "bf16 weight");
      ctx().upload(w.data, h.data(), h.size() * 2);
      break;
    }
    case gpu::WeightFormat::Q4:
    case gpu::WeightFormat::Q8: {
      const int bits = format == gpu::WeightFormat::Q4 ? 4 : 8;
      auto q = quantize_affine(v.data(), n, k, bits, group, scales_bf16);
      auto deq = dequantize_affine(q, n, k);
      for (size_t i = 0; i < v.size(); ++i) tw.values[i] = deq[i];
      w.data = ctx().tensor(gpu::DType::U32, {n, k * bits / 32}, "quantized weight");
      ctx().upload(w.data, q.words.data(), q.words.size() * 4);
      const gpu::DType st = scales_bf16 ? gpu::DType::BF16 : gpu::DType::F16;
      w.scales = ctx().tensor(st, {n, k / group}, "scales");
      w.biases = ctx().tensor(st, {n, k / group}, "biases");
      ctx().upload(w.scales, q.scales.data(), q.scales.size() * 2);
      ctx().upload(w.biases, q.biases.data(), q.biases.size() * 2);
      w.group_size = group;
      w.scales_bf16 = scales_bf16;
      break;
    }
  }
  return tw;
}

}  // namespace vkvlm::test
