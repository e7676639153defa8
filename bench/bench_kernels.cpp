// Kernel benchmark: times every op at real model shapes with timestamp queries (the CPU clock
// where the driver has none), measures the device's buffer-copy bandwidth in the same run, and
// prints GB/s, GFLOP/s and the share of the copy bandwidth each op reaches.
//
//   vkvlm-bench [--json] [--only SUBSTRING] [--reps N] [--quick]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gpu/context.h"
#include "gpu/device.h"
#include "gpu/error.h"
#include "gpu/ops.h"
#include "base/numeric.h"
#include "bench/bench_common.h"
#include "bench/bench_model.h"

using namespace vkvlm;
using gpu::Mat;
using gpu::Tensor;

namespace {

struct Options {
  bool json = false, quick = false;
  std::string only;
  int reps = 0;  // 0: enough repetitions for ~100 ms
};

struct Result {
  std::string op, shape, variant;
  double us = 0, bytes = 0, flops = 0;
};

class Bench {
 public:
  Bench(gpu::Context& c, Options o) : ctx_(c), opt_(o) {}

  // Seconds per call of fn, recorded `reps` times in one submission between two timestamps.
  double time(const std::function<void(gpu::Recorder&)>& fn) {
    gpu::Recorder warm(ctx_);
    fn(warm);
    warm.submit();  // builds pipelines, touches memory
    double once = warm.cpu_ns() * 1e-9;
    int reps = opt_.reps > 0 ? opt_.reps : std::clamp(int(0.1 / std::max(once, 1e-6)), 3, opt_.quick ? 5 : 200);
    gpu::Recorder rec(ctx_);
    int t0 = rec.timestamp();
    for (int i = 0; i < reps; ++i) fn(rec);
    int t1 = rec.timestamp();
    rec.submit();
    double ns = (t0 >= 0 && t1 >= 0) ? rec.elapsed_ns(t0, t1) : rec.cpu_ns();
    return ns * 1e-9 / reps;
  }

  bool wanted(const std::string& name) const { return opt_.only.empty() || name.find(opt_.only) != std::string::npos; }

  void add(Result r) { results_.push_back(std::move(r)); }

  Tensor random_tensor(gpu::DType dt, std::vector<int64_t> shape) {
    auto t = ctx_.tensor(dt, shape, "bench");
    std::vector<uint32_t> words((t.bytes() + 3) / 4);
    std::mt19937 rng(1);
    for (auto& w : words) {
      // Two halves in [-1, 1) (f16), or one f32 in [-1, 1): never NaN or inf.
      if (dt == gpu::DType::F32) {
        float f = std::uniform_real_distribution<float>(-1, 1)(rng);
        std::memcpy(&w, &f, 4);
      } else if (dt == gpu::DType::U32) {
        w = rng();
      } else {
        float a = std::uniform_real_distribution<float>(-1, 1)(rng), b = std::uniform_real_distribution<float>(-1, 1)(rng);
        w = dt == gpu::DType::BF16 ? (uint32_t(f32_to_bf16(a)) | uint32_t(f32_to_bf16(b)) << 16)
                                   : (uint32_t(f32_to_f16(a)) | uint32_t(f32_to_f16(b)) << 16);
      }
    }
    ctx_.upload(t, words.data(), t.bytes());
    return t;
  }

  gpu::Weight weight(gpu::WeightFormat f, int64_t n, int64_t k, int group = 64) {
    gpu::Weight w;
    w.format = f;
    w.n = n;
    w.k = k;
    w.name = "bench weight";
    switch (f) {
      case gpu::WeightFormat::F32: w.data = random_tensor(gpu::DType::F32, {n, k}); break;
      case gpu::WeightFormat::F16: w.data = random_tensor(gpu::DType::F16, {n, k}); break;
      case gpu::WeightFormat::BF16: w.data = random_tensor(gpu::DType::BF16, {n, k}); break;
      case gpu::WeightFormat::Q4:
      case gpu::WeightFormat::Q8: {
        const int bits = f == gpu::WeightFormat::Q4 ? 4 : 8;
        w.data = random_tensor(gpu::DType::U32, {n, k * bits / 32});
        w.scales = random_tensor(gpu::DType::F16, {n, k / group});
        w.biases = random_tensor(gpu::DType::F16, {n, k / group});
        w.group_size = group;
        break;
      }
    }
    return w;
  }

  // The attention kernel reads the first query's position from a device buffer, as the model does.
  Tensor position_buffer(int32_t position) {
    auto step = ctx_.tensor(gpu::DType::I32, {1}, "step");
    ctx_.upload(step, &position, 4);
    return step;
  }
  static gpu::AttentionParams attention_params(int heads, int head_dim, int64_t queries, bool causal) {
    gpu::AttentionParams ap;
    ap.heads = ap.kv_heads = heads;
    ap.head_dim = head_dim;
    ap.causal = causal;
    ap.scale = 1.0f / std::sqrt(float(head_dim));
    ap.T_total = queries;
    return ap;
  }

  double copy_bandwidth() { return bench::copy_bandwidth(ctx_, opt_.quick ? (64ull << 20) : (512ull << 20)); }

  void run();
  void print(double copy_bw) const;

 private:
  gpu::Context& ctx_;
  Options opt_;
  std::vector<Result> results_;
};

std::string dims(std::initializer_list<int64_t> d) {
  std::string s;
  for (auto v : d) {
    if (!s.empty()) s += 'x';
    s += std::to_string(v);
  }
  return s;
}

void Bench::run() {
  // Decode products: one row against each real weight shape (n x k).
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{4096, 4096}, {11008, 4096}, {4096, 11008}, {8192, 3072}, {32064, 4096}};
  const std::vector<std::pair<gpu::WeightFormat, int>> formats = {
      {gpu::WeightFormat::F16, 0}, {gpu::WeightFormat::Q4, 64}, {gpu::WeightFormat::Q8, 64}};
  for (auto [f, g] : formats) {
    for (auto [n, k] : shapes) {
      std::string name = std::string("gemv_") + gpu::weight_format_name(f) + (g ? "_g" + std::to_string(g) : "");
      if (!wanted(name)) continue;
      auto w = weight(f, n, k, g ? g : 64);
      auto x = random_tensor(gpu::DType::F32, {1, k});
      auto y = ctx_.tensor(gpu::DType::F32, {1, n}, "y");
      double s = time([&](gpu::Recorder& rec) { gpu::matmul(rec, Mat::of(x), w, nullptr, Mat::of(y)); });
      const char* variant = gpu::decode_matmul(ctx_) == gpu::Variant::Matmul::Lanes ? "lanes" : "gemv";
      add({name, dims({1, n, k}), variant, s * 1e6, double(w.bytes() + x.bytes() + y.bytes()), 2.0 * n * k});
    }
  }
  // Prefill / vision products: CLIP-L MLP over 577 tokens, and a 512-token LM projection.
  struct Mm {
    int64_t m, n, k;
    gpu::WeightFormat f;
  };
  for (auto c : {Mm{577, 4096, 1024, gpu::WeightFormat::F16}, Mm{577, 1024, 4096, gpu::WeightFormat::F16},
                 Mm{512, 4096, 4096, gpu::WeightFormat::F16}, Mm{512, 4096, 4096, gpu::WeightFormat::Q4}}) {
    std::string name = std::string("gemm_") + gpu::weight_format_name(c.f);
    if (!wanted(name)) continue;
    auto w = weight(c.f, c.n, c.k, 64);
    auto x = random_tensor(gpu::DType::F32, {c.m, c.k});
    auto y = ctx_.tensor(gpu::DType::F32, {c.m, c.n}, "y");
    double s = time([&](gpu::Recorder& rec) { gpu::matmul(rec, Mat::of(x), w, nullptr, Mat::of(y)); });
    const char* variant = gpu::decode_matmul(ctx_) == gpu::Variant::Matmul::Lanes ? "lanes"
                          : gpu::coopmat_usable(ctx_)                               ? "coopmat"
                                                                                    : "tiled";
    add({name, dims({c.m, c.n, c.k}), variant, s * 1e6, double(w.bytes() + x.bytes() + y.bytes()), 2.0 * c.m * c.n * c.k});
  }
  // Attention, Llama-7B heads (32 x 128): decode at contexts 1, 512, 4096, and a 512-token prefill.
  {
    const int H = 32, D = 128;
    for (int64_t ctxlen : {int64_t(1), int64_t(512), int64_t(4096)}) {
      if (!wanted("attention")) break;
      auto q = random_tensor(gpu::DType::F32, {1, H * D});
      auto k = random_tensor(gpu::DType::F16, {ctxlen, H * D});
      auto v = random_tensor(gpu::DType::F16, {ctxlen, H * D});
      auto o = ctx_.tensor(gpu::DType::F32, {1, H * D}, "o");
      auto step = position_buffer(int32_t(ctxlen - 1));
      auto ap = attention_params(H, D, 1, true);
      double s = time([&](gpu::Recorder& rec) {
        gpu::attention(rec, Mat::of(q), Mat::of(k), Mat::of(v), Mat::of(o), step, 0, ap);
      });
      add({"attention_decode", "ctx" + std::to_string(ctxlen) + "_h32_d128", "rows", s * 1e6,
           double(k.bytes() + v.bytes() + q.bytes() + o.bytes()), 4.0 * H * D * ctxlen});
    }
    // The same decode at 4096 over a quantized KV cache (--kv-bits 8 and 4, groups of 64),
    // filled by kv_append so that the rows hold real quantized values.
    for (int bits : {8, 4}) {
      if (!wanted("attention")) break;
      const int64_t ctxlen = 4096, width = int64_t(H) * D;
      auto q = random_tensor(gpu::DType::F32, {1, width});
      auto src = random_tensor(gpu::DType::F32, {ctxlen, width});
      auto quantized = [&](const char* name) {
        return gpu::KvMat::quantized(ctx_.tensor(gpu::DType::U32, {ctxlen, width * bits / 32}, name),
                                     ctx_.tensor(gpu::DType::U32, {ctxlen, width / 64}, name), bits, 64, width);
      };
      const gpu::KvRows k = {quantized("k")}, v = {quantized("v")};
      auto o = ctx_.tensor(gpu::DType::F32, {1, width}, "o");
      auto zero = position_buffer(0), step = position_buffer(int32_t(ctxlen - 1));
      time([&](gpu::Recorder& rec) {
        gpu::kv_append(rec, Mat::of(src), k, zero, 0);
        gpu::kv_append(rec, Mat::of(src), v, zero, 0);
      });
      auto ap = attention_params(H, D, 1, true);
      double s = time([&](gpu::Recorder& rec) { gpu::attention(rec, Mat::of(q), k, v, Mat::of(o), step, 0, ap); });
      const double kv_bytes = 2.0 * double(k[0].data.t.bytes() + k[0].params.t.bytes());
      add({"attention_decode", "ctx4096_h32_d128_q" + std::to_string(bits) + "g64", "rows", s * 1e6,
           kv_bytes + double(q.bytes() + o.bytes()), 4.0 * H * D * ctxlen});
    }
    if (wanted("attention")) {
      const int64_t T = opt_.quick ? 128 : 512;
      auto q = random_tensor(gpu::DType::F32, {T, H * D});
      auto k = random_tensor(gpu::DType::F16, {T, H * D});
      auto v = random_tensor(gpu::DType::F16, {T, H * D});
      auto o = ctx_.tensor(gpu::DType::F32, {T, H * D}, "o");
      auto step = position_buffer(0);
      auto ap = attention_params(H, D, T, true);
      double s = time([&](gpu::Recorder& rec) {
        gpu::attention(rec, Mat::of(q), Mat::of(k), Mat::of(v), Mat::of(o), step, 0, ap);
      });
      add({"attention_prefill", "T" + std::to_string(T) + "_h32_d128_causal", "tiled", s * 1e6,
           double(q.bytes() + k.bytes() + v.bytes() + o.bytes()), 2.0 * H * D * T * T});
    }
  }
  // Vision attention: CLIP-L, 577 tokens, 16 heads of 64, non-causal, f32 K/V.
  if (wanted("attention")) {
    const int64_t T = 577;
    const int H = 16, D = 64;
    auto qkv = random_tensor(gpu::DType::F32, {T, 3 * H * D});
    auto o = ctx_.tensor(gpu::DType::F32, {T, H * D}, "o");
    auto step = position_buffer(0);
    auto ap = attention_params(H, D, T, false);
    Mat all = Mat::of(qkv);
    double s = time([&](gpu::Recorder& rec) {
      gpu::attention(rec, all.col_range(0, H * D), all.col_range(H * D, H * D), all.col_range(2 * H * D, H * D), Mat::of(o), step, 0, ap);
    });
    add({"attention_vision", "T577_h16_d64", "tiled", s * 1e6, double(qkv.bytes() + o.bytes()), 4.0 * H * D * T * T});
  }
  // Row-wise kernels at LM width.
  if (wanted("rmsnorm")) {
    for (int64_t rows : {int64_t(1), int64_t(512)}) {
      auto x = random_tensor(gpu::DType::F32, {rows, 4096});
      auto w = random_tensor(gpu::DType::F32, {4096});
      auto y = ctx_.tensor(gpu::DType::F32, {rows, 4096}, "y");
      double s = time([&](gpu::Recorder& rec) { gpu::rmsnorm(rec, Mat::of(x), w, 1e-5f, false, Mat::of(y)); });
      add({"rmsnorm", dims({rows, 4096}), "row", s * 1e6, double(x.bytes() * 2 + w.bytes()), 3.0 * rows * 4096});
    }
  }
  if (wanted("silu_mul")) {
    auto a = random_tensor(gpu::DType::F32, {512, 11008});
    auto y = ctx_.tensor(gpu::DType::F32, {512, 11008}, "y");
    double s = time([&](gpu::Recorder& rec) { gpu::binary(rec, gpu::BinaryOp::SiluMul, Mat::of(a), Mat::of(a), Mat::of(y)); });
    add({"silu_mul", dims({512, 11008}), "elementwise", s * 1e6, double(a.bytes() * 2 + y.bytes()), 5.0 * 512 * 11008});
  }
  if (wanted("topk")) {
    auto x = random_tensor(gpu::DType::F32, {1, 32064});
    auto v = ctx_.tensor(gpu::DType::F32, {1, 64}, "v");
    auto i = ctx_.tensor(gpu::DType::U32, {1, 64}, "i");
    for (int k : {1, 64}) {
      double s = time([&](gpu::Recorder& rec) { gpu::topk(rec, Mat::of(x), k, v, i); });
      add({k == 1 ? "argmax" : "topk", "32064_k" + std::to_string(k), "segmented", s * 1e6, double(x.bytes()), 0});
    }
  }
  if (wanted("get_rows")) {
    auto w = weight(gpu::WeightFormat::F16, 32064, 4096);
    std::vector<int32_t> idv(512);
    for (size_t j = 0; j < idv.size(); ++j) idv[j] = int32_t(j * 61 % 32064);
    auto ids = ctx_.tensor(gpu::DType::I32, {512}, "ids");
    ctx_.upload(ids, idv.data(), idv.size() * 4);
    auto y = ctx_.tensor(gpu::DType::F32, {512, 4096}, "y");
    double s = time([&](gpu::Recorder& rec) { gpu::get_rows(rec, w, ids, 0, 512, Mat::of(y)); });
    add({"get_rows_f16", dims({512, 4096}), "gather", s * 1e6, double(512 * 4096 * 2 + y.bytes()), 0});
  }
}

void Bench::print(double copy_bw) const {
  if (opt_.json) {
    nlohmann::json j;
    j["device"] = ctx_.profile().summary_line();
    j["copy_bandwidth_gbs"] = copy_bw / 1e9;
    j["timing"] = ctx_.profile().timestamps ? "timestamps" : "cpu";
    for (auto& r : results_) {
      double gbs = r.bytes / (r.us * 1e-6) / 1e9;
      j["results"].push_back({{"op", r.op}, {"shape", r.shape}, {"variant", r.variant}, {"us", r.us}, {"gbs", gbs},
                              {"gflops", r.flops / (r.us * 1e-6) / 1e9}, {"roofline_pct", 100.0 * gbs * 1e9 / copy_bw}});
    }
    std::printf("%s\n", j.dump(2).c_str());
    return;
  }
  std::printf("device: %s\n", ctx_.profile().summary_line().c_str());
  std::printf("timing: %s; copy bandwidth (read + write): %.1f GB/s\n\n",
              ctx_.profile().timestamps ? "GPU timestamps" : "CPU clock", copy_bw / 1e9);
  std::printf("%-20s %-24s %-12s %12s %10s %10s %9s\n", "op", "shape", "variant", "time (us)", "GB/s", "GFLOP/s", "roofline");
  for (auto& r : results_) {
    double gbs = r.bytes / (r.us * 1e-6) / 1e9;
    double gf = r.flops / (r.us * 1e-6) / 1e9;
    std::printf("%-20s %-24s %-12s %12.1f %10.1f %10.1f %8.1f%%\n", r.op.c_str(), r.shape.c_str(), r.variant.c_str(),
                r.us, gbs, gf, 100.0 * gbs * 1e9 / copy_bw);
  }
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--model-shape" || std::string(argv[i]) == "--model") return vkvlm::bench::run_model_bench(argc, argv);
  Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--json") {
      opt.json = true;
    } else if (a == "--quick") {
      opt.quick = true;
    } else if (a == "--only" && i + 1 < argc) {
      opt.only = argv[++i];
    } else if (a == "--reps" && i + 1 < argc) {
      opt.reps = std::atoi(argv[++i]);
      if (opt.reps <= 0) {
        std::fprintf(stderr, "vkvlm-bench: --reps needs a positive number\n");
        return 2;
      }
    } else if (a == "--help" || a == "-h") {
      std::printf("usage: vkvlm-bench [--json] [--only SUBSTRING] [--reps N] [--quick]   kernels\n"
                  "       vkvlm-bench (--model-shape NAME | --model DIR) [...] [--help]   end to end\n");
      return 0;
    } else {
      std::fprintf(stderr, "vkvlm-bench: unknown argument '%s' (see --help)\n", a.c_str());
      return 2;
    }
  }
  try {
    gpu::Context ctx(gpu::Device::create());
    Bench b(ctx, opt);
    double bw = b.copy_bandwidth();
    b.run();
    b.print(bw);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vkvlm-bench: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
