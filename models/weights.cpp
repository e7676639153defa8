#include "models/weights.h"

#include <unistd.h>

#include <cstdio>
#include <cstring>

#include "gpu/error.h"
#include "base/numeric.h"

namespace vkvlm {
namespace {

constexpr int k_load_quant_group = 64;  // group size of --quantize, as mlx-lm uses

std::string shape_of(std::initializer_list<int64_t> s) {
  std::string r = "[";
  size_t i = 0;
  for (auto v : s) r += (i++ ? ", " : "") + std::to_string(v);
  return r + "]";
}

struct PartInfo {
  gpu::WeightFormat format = gpu::WeightFormat::F32;
  int group = 0;
  bool scales_bf16 = false;
  bool convert_quantize = false;  // float in the checkpoint, quantized here
  const StTensor* data = nullptr;
  const StTensor* scales = nullptr;
  const StTensor* biases = nullptr;
};

}  // namespace

void Projection::run(gpu::Recorder& rec, const gpu::Mat& x, const gpu::Mat& y, bool accumulate,
                     const gpu::Variant& v) const {
  for (size_t i = 0; i < parts.size(); ++i) {
    const gpu::Tensor* b = biases[i].valid() ? &biases[i] : nullptr;
    gpu::matmul(rec, x, parts[i], b, y.col_range(offsets[i], parts[i].n), accumulate, v);
  }
}

uint64_t Projection::bytes() const {
  uint64_t b = 0;
  for (auto& p : parts) b += p.bytes();
  return b;
}

WeightLoader::WeightLoader(gpu::Context& ctx, const TensorStore& store, const ModelConfig& config, LoadOptions options)
    : ctx_(ctx), store_(store), config_(config), options_(std::move(options)) {
  if (!options_.quantize.empty() && options_.quantize != "q4" && options_.quantize != "q8")
    fail("--quantize takes q4 or q8, not '", options_.quantize, "'");
  total_ = store.total_bytes();
  options_.progress = options_.progress && isatty(2);
}

void WeightLoader::progress(uint64_t bytes) {
  uploaded_ += bytes;
  if (!options_.progress || total_ == 0) return;
  int pct = int(100.0 * double(std::min(uploaded_, total_)) / double(total_));
  if (pct == last_percent_) return;
  last_percent_ = pct;
  const int width = 30, filled = pct * width / 100;
  std::fprintf(stderr, "\rloading [%.*s%*s] %3d%% %.2f/%.2f GB", filled, "==============================", width - filled,
               "", pct, double(uploaded_) / 1e9, double(total_) / 1e9);
  std::fflush(stderr);
}

void WeightLoader::finish_progress() {
  if (options_.progress && last_percent_ >= 0) std::fprintf(stderr, "\r%*s\r", 60, "");
}

QuantSpec WeightLoader::spec_for(const std::string& module) const {
  auto it = config_.quantization.overrides.find(module);
  if (it != config_.quantization.overrides.end()) return it->second;
  return config_.quantization.spec;
}

static PartInfo describe(const TensorStore& store, const QuantSpec& spec,
                         const std::string& module, int64_t n, int64_t k, bool may_quantize, int quant_bits) {
  PartInfo p;
  if (const StTensor* sc = store.find(module + ".scales")) {
    // MLX: a layer is quantized exactly when its scales exist.
    p.data = &store.get(module + ".weight");
    p.scales = sc;
    p.biases = &store.get(module + ".biases");
    if (p.data->dtype != StDType::U32 || p.data->shape.size() != 2 || p.data->shape[0] != n)
      fail("quantized tensor ", module, ".weight has dtype ", st_dtype_name(p.data->dtype), " and shape ",
           p.data->shape_string(), "; expected U32 [", n, ", k*bits/32] for k = ", k);
    if (sc->shape.size() != 2 || sc->shape[0] != n || p.biases->shape != sc->shape || p.biases->dtype != sc->dtype)
      fail("quantization scales/biases of ", module, " have shapes ", sc->shape_string(), " and ",
           p.biases->shape_string(), "; expected [", n, ", k/group] for both");
    int bits = spec.bits, group = spec.group_size;
    if (bits == 0 || p.data->shape[1] * 32 != k * bits) bits = int(p.data->shape[1] * 32 / k);
    if (group == 0 || sc->shape[1] * group != k) group = sc->shape[1] ? int(k / sc->shape[1]) : 0;
    if ((bits != 4 && bits != 8) || p.data->shape[1] * 32 != k * bits)
      fail("quantized layer ", module, ": ", p.data->shape[1], " words per row do not hold ", k,
           " values at 4 or 8 bits");
    if ((group != 32 && group != 64 && group != 128) || sc->shape[1] * group != k)
      fail("quantized layer ", module, ": ", sc->shape[1], " groups per row do not divide ", k,
           " values into groups of 32, 64 or 128");
    if (sc->dtype != StDType::F16 && sc->dtype != StDType::BF16 && sc->dtype != StDType::F32)
      fail("quantization scales of ", module, " have dtype ", st_dtype_name(sc->dtype), " (F16, BF16 or F32 expected)");
    p.format = bits == 4 ? gpu::WeightFormat::Q4 : gpu::WeightFormat::Q8;
    p.group = group;
    p.scales_bf16 = sc->dtype == StDType::BF16;
    return p;
  }
  p.data = &store.get(module + ".weight");
  if (p.data->shape.size() != 2 || p.data->shape[0] != n || p.data->shape[1] != k)
    fail("tensor ", module, ".weight has shape ", p.data->shape_string(), "; expected ", shape_of({n, k}));
  switch (p.data->dtype) {
    case StDType::F16: p.format = gpu::WeightFormat::F16; break;
    case StDType::BF16: p.format = gpu::WeightFormat::BF16; break;
    case StDType::F32: case StDType::F64: p.format = gpu::WeightFormat::F32; break;
    default:
      fail("tensor ", module, ".weight has dtype ", st_dtype_name(p.data->dtype),
           " but no quantization scales; a linear layer must be F32, F16, BF16 or MLX-quantized");
  }
  if (may_quantize && quant_bits && k % k_load_quant_group == 0) {
    p.format = quant_bits == 4 ? gpu::WeightFormat::Q4 : gpu::WeightFormat::Q8;
    p.group = k_load_quant_group;
    p.convert_quantize = true;
  }
  return p;
}

static bool same_storage(const PartInfo& a, const PartInfo& b) {
  return a.format == b.format && a.group == b.group && a.scales_bf16 == b.scales_bf16;
}

Projection WeightLoader::projection(const std::vector<std::string>& modules, const std::vector<int64_t>& ns, int64_t k,
                                    bool quantizable, bool with_bias) {
  const int quant_bits = options_.quantize == "q4" ? 4 : options_.quantize == "q8" ? 8 : 0;
  std::vector<PartInfo> infos;
  for (size_t i = 0; i < modules.size(); ++i)
    infos.push_back(describe(store_, spec_for(modules[i]), modules[i], ns[i], k, quantizable, quant_bits));
  Projection proj;
  proj.k = k;
  for (auto n : ns) proj.n_total += n;
  // Groups of consecutive parts with one storage format share a weight.
  size_t i = 0;
  int64_t col = 0;
  while (i < infos.size()) {
    size_t j = i + 1;
    while (j < infos.size() && same_storage(infos[i], infos[j])) ++j;
    int64_t n = 0;
    for (size_t t = i; t < j; ++t) n += ns[t];
    const PartInfo& f = infos[i];
    gpu::Weight w;
    w.format = f.format;
    w.n = n;
    w.k = k;
    w.name = modules[i] + (j - i > 1 ? " (fused)" : "");
    w.group_size = f.group;
    w.scales_bf16 = f.scales_bf16;
    const bool quant = w.quantized();
    const int64_t row_elems = w.row_elems();
    gpu::DType dt = quant ? gpu::DType::U32
                          : f.format == gpu::WeightFormat::F16 ? gpu::DType::F16
                          : f.format == gpu::WeightFormat::BF16 ? gpu::DType::BF16 : gpu::DType::F32;
    w.data = ctx_.tensor(dt, {n, row_elems}, w.name);
    if (quant) {
      const gpu::DType st = f.scales_bf16 ? gpu::DType::BF16 : gpu::DType::F16;
      w.scales = ctx_.tensor(st, {n, k / f.group}, w.name + " scales");
      w.biases = ctx_.tensor(st, {n, k / f.group}, w.name + " biases");
    }
    int64_t row = 0;
    for (size_t t = i; t < j; ++t) {
      const PartInfo& p = infos[t];
      const int64_t pn = ns[t];
      if (p.convert_quantize) {
        auto vals = p.data->to_f32();
        auto q = quantize_affine(vals.data(), pn, k, w.bits(), p.group, false);
        ctx_.upload(w.data, q.words.data(), q.words.size() * 4, uint64_t(row * row_elems) * 4);
        ctx_.upload(w.scales, q.scales.data(), q.scales.size() * 2, uint64_t(row * (k / p.group)) * 2);
        ctx_.upload(w.biases, q.biases.data(), q.biases.size() * 2, uint64_t(row * (k / p.group)) * 2);
      } else if (quant) {
        ctx_.upload(w.data, p.data->data, p.data->bytes, uint64_t(row * row_elems) * 4);
        for (auto [src, dst] : {std::pair{p.scales, &w.scales}, std::pair{p.biases, &w.biases}}) {
          if (src->dtype == StDType::F32) {
            auto v = src->to_f32();
            std::vector<uint16_t> h(v.size());
            for (size_t e = 0; e < v.size(); ++e) h[e] = f32_to_f16(v[e]);
            ctx_.upload(*dst, h.data(), h.size() * 2, uint64_t(row * (k / p.group)) * 2);
          } else {
            ctx_.upload(*dst, src->data, src->bytes, uint64_t(row * (k / p.group)) * 2);
          }
        }
      } else if (p.data->dtype == StDType::F64) {
        auto v = p.data->to_f32();
        ctx_.upload(w.data, v.data(), v.size() * 4, uint64_t(row * k) * 4);
      } else {
        ctx_.upload(w.data, p.data->data, p.data->bytes, uint64_t(row * k) * gpu::dtype_size(dt));
      }
      progress(p.data->bytes + (p.scales ? p.scales->bytes + p.biases->bytes : 0));
      row += pn;
    }
    gpu::Tensor bias;
    bool any_bias = false;
    for (size_t t = i; t < j; ++t) any_bias = any_bias || (with_bias && store_.has(modules[t] + ".bias"));
    if (any_bias) {
      // A part without a bias of its own gets zeros beside its fused neighbours' biases.
      std::vector<float> b;
      for (size_t t = i; t < j; ++t) {
        auto v = store_.has(modules[t] + ".bias") ? host_f32(modules[t] + ".bias", ns[t]) : std::vector<float>(size_t(ns[t]), 0.0f);
        b.insert(b.end(), v.begin(), v.end());
      }
      bias = ctx_.tensor(gpu::DType::F32, {n}, w.name + " bias");
      ctx_.upload(bias, b.data(), b.size() * 4);
    }
    proj.parts.push_back(std::move(w));
    proj.biases.push_back(bias);
    proj.offsets.push_back(col);
    col += n;
    i = j;
  }
  return proj;
}

gpu::Weight WeightLoader::linear(const std::string& module, int64_t n, int64_t k, bool quantizable) {
  Projection p = projection({module}, {n}, k, quantizable, false);
  return p.parts[0];
}

std::vector<float> WeightLoader::host_f32(const std::string& name, int64_t numel) const {
  // A quantized embedding where a float table is expected (older MLX conversions quantized every
  // nn.Embedding, SigLIP's position embedding included): dequantized here.
  const std::string base = name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0 ? name.substr(0, name.size() - 7) : "";
  if (!base.empty() && store_.has(base + ".scales")) {
    const StTensor& sc = store_.get(base + ".scales");
    if (sc.shape.size() != 2 || sc.shape[0] <= 0 || numel % sc.shape[0])
      fail("quantized tensor ", name, ": scales of shape ", sc.shape_string(), " do not fit ", numel, " values");
    const int64_t n = sc.shape[0], k = numel / n;
    const PartInfo p = describe(store_, spec_for(base), base, n, k, false, 0);
    AffineQuantized q;
    q.bits = p.format == gpu::WeightFormat::Q4 ? 4 : 8;
    q.group = p.group;
    q.scales_bf16 = p.scales_bf16;
    q.words.resize(size_t(p.data->bytes / 4));
    std::memcpy(q.words.data(), p.data->data, q.words.size() * 4);
    for (auto [src, dst] : {std::pair{p.scales, &q.scales}, std::pair{p.biases, &q.biases}}) {
      if (src->dtype == StDType::F32) {
        for (float v : src->to_f32()) dst->push_back(f32_to_f16(v));
      } else {
        dst->resize(size_t(src->bytes / 2));
        std::memcpy(dst->data(), src->data, dst->size() * 2);
      }
    }
    return dequantize_affine(q, n, k);
  }
  const StTensor& t = store_.get(name);
  if (t.numel() != numel) fail("tensor ", name, " has shape ", t.shape_string(), " (", t.numel(), " values); expected ", numel);
  return t.to_f32();
}

gpu::Tensor WeightLoader::f32(const std::string& name, std::vector<int64_t> shape) {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  auto v = host_f32(name, n);
  auto t = ctx_.tensor(gpu::DType::F32, std::move(shape), name);
  ctx_.upload(t, v.data(), v.size() * 4);
  progress(store_.get(name).bytes);
  return t;
}

}  // namespace vkvlm
