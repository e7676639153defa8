// The decoder for each supported family on tiny random checkpoints written in the real layouts
// (Qwen2 with q/k/v biases and tied embeddings, Mistral with GQA and a sliding window shorter
// than the sequence, Phi-3 with fused projections and partial rotary, Llama with MLX 4-bit
// weights, Gemma with RMSNorm (1 + w), the sqrt(hidden) embedding scale, the tanh-GELU gate, MQA
// and a head_dim that is not hidden / heads), against a double-precision implementation of the
// Hugging Face formulas; and the cached decode step against a full forward pass.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>

#include <nlohmann/json.hpp>

#include "host/config.h"
#include "base/numeric.h"
#include "host/safetensors.h"
#include "models/decoder.h"
#include "tests/kernel_harness.h"
#include "tests/scratch_dir.h"

namespace vkvlm::test {
namespace {
namespace fs = std::filesystem;

using Mat2 = std::vector<double>;  // row-major

struct Family {
  const char* name;
  std::string model_type;
  bool bias = false, tied = false, fused = false, mlx4 = false;
  int window = 0;
  double partial = 1.0;
  int heads = 4, kv_heads = 2;
  bool gemma = false;
};

void PrintTo(const Family& f, std::ostream* os) { *os << f.name; }

constexpr int64_t V = 64, E = 64, I = 96, D = 16, L = 2, T = 23;

// Writes tensors (f32 values, stored as `dtype`) to a safetensors file.
struct Writer {
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  void raw(const std::string& name, const char* dtype, std::vector<int64_t> shape, const void* p, size_t bytes) {
    header[name] = {{"dtype", dtype}, {"shape", shape}, {"data_offsets", {data.size(), data.size() + bytes}}};
    data.append(static_cast<const char*>(p), bytes);
  }
  void f16(const std::string& name, std::vector<int64_t> shape, const std::vector<double>& v) {
    std::vector<uint16_t> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) h[i] = f32_to_f16(float(v[i]));
    raw(name, "F16", std::move(shape), h.data(), h.size() * 2);
  }
  void save(const std::string& path) {
    std::string h = header.dump();
    uint64_t n = h.size();
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << h << data;
  }
};

std::vector<double> rounded_f16(std::vector<double> v) {
  for (auto& x : v) x = f16_to_f32(f32_to_f16(float(x)));
  return v;
}

struct Checkpoint {
  std::string dir;
  // The values the model holds (after f16 rounding or quantization), per HF name.
  std::map<std::string, Mat2> w;
};

Checkpoint make_checkpoint(const Family& f, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, 0.08);
  auto randv = [&](int64_t n, double scale = 1.0) {
    Mat2 v(static_cast<size_t>(n));
    for (auto& x : v) x = nd(rng) * scale;
    return v;
  };
  Checkpoint c;
  c.dir = (scratch_dir() / ("lm-" + std::string(f.name))).string();
  fs::create_directories(c.dir);
  Writer wr;
  const int64_t qd = int64_t(f.heads) * D, kvd = int64_t(f.kv_heads) * D;
  auto put = [&](const std::string& name, std::vector<int64_t> shape, Mat2 v, bool quantize) {
    if (quantize && f.mlx4) {
      std::vector<float> fv(v.begin(), v.end());
      auto q = quantize_affine(fv.data(), shape[0], shape[1], 4, 32, false);
      auto deq = dequantize_affine(q, shape[0], shape[1]);
      const std::string base = name.substr(0, name.size() - 7);  // drop ".weight"
      wr.raw(name, "U32", {shape[0], shape[1] / 8}, q.words.data(), q.words.size() * 4);
      wr.raw(base + ".scales", "F16", {shape[0], shape[1] / 32}, q.scales.data(), q.scales.size() * 2);
      wr.raw(base + ".biases", "F16", {shape[0], shape[1] / 32}, q.biases.data(), q.biases.size() * 2);
      c.w[name] = Mat2(deq.begin(), deq.end());
    } else {
      c.w[name] = rounded_f16(v);
      wr.f16(name, std::move(shape), v);
    }
  };
  put("model.embed_tokens.weight", {V, E}, randv(V * E, 10.0), true);
  for (int l = 0; l < L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    auto around_one = [&](int64_t n) {
      Mat2 v = randv(n, 2.0);
      for (auto& x : v) x += 1.0;
      return v;
    };
    put(p + "input_layernorm.weight", {E}, around_one(E), false);
    put(p + "post_attention_layernorm.weight", {E}, around_one(E), false);
    Mat2 q = randv(qd * E), k = randv(kvd * E), v = randv(kvd * E), o = randv(E * qd);
    Mat2 g = randv(I * E), u = randv(I * E), dn = randv(E * I);
    if (f.fused) {
      Mat2 qkv = q;
      qkv.insert(qkv.end(), k.begin(), k.end());
      qkv.insert(qkv.end(), v.begin(), v.end());
      put(p + "self_attn.qkv_proj.weight", {qd + 2 * kvd, E}, qkv, true);
      Mat2 gu = g;
      gu.insert(gu.end(), u.begin(), u.end());
      put(p + "mlp.gate_up_proj.weight", {2 * I, E}, gu, true);
    } else {
      put(p + "self_attn.q_proj.weight", {qd, E}, q, true);
      put(p + "self_attn.k_proj.weight", {kvd, E}, k, true);
      put(p + "self_attn.v_proj.weight", {kvd, E}, v, true);
      put(p + "mlp.gate_proj.weight", {I, E}, g, true);
      put(p + "mlp.up_proj.weight", {I, E}, u, true);
      if (f.bias) {
        put(p + "self_attn.q_proj.bias", {qd}, randv(qd, 3.0), false);
        put(p + "self_attn.k_proj.bias", {kvd}, randv(kvd, 3.0), false);
        put(p + "self_attn.v_proj.bias", {kvd}, randv(kvd, 3.0), false);
      }
    }
    put(p + "self_attn.o_proj.weight", {E, qd}, o, true);
    put(p + "mlp.down_proj.weight", {E, I}, dn, true);
  }
  put("model.norm.weight", {E}, randv(E), false);
  if (!f.tied) put("lm_head.weight", {V, E}, randv(V * E, 3.0), true);
  wr.save(c.dir + "/model.safetensors");
  nlohmann::json cfg = {{"model_type", f.model_type}, {"vocab_size", V}, {"hidden_size", E}, {"intermediate_size", I},
                        {"num_hidden_layers", L}, {"num_attention_heads", f.heads}, {"num_key_value_heads", f.kv_heads},
                        {"head_dim", D}, {"max_position_embeddings", 128}, {"rms_norm_eps", 1e-6},
                        {"rope_theta", 500.0}, {"tie_word_embeddings", f.tied}, {"hidden_act", "silu"}};
  if (f.window) cfg["sliding_window"] = f.window;
  if (f.model_type == "qwen2") cfg["use_sliding_window"] = false;
  if (f.partial != 1.0) cfg["partial_rotary_factor"] = f.partial;
  if (f.mlx4) cfg["quantization"] = {{"group_size", 32}, {"bits", 4}};
  if (f.gemma) {
    cfg.erase("hidden_act");
    cfg["hidden_activation"] = "gelu_pytorch_tanh";
  }
  std::ofstream(c.dir + "/config.json") << cfg.dump();
  return c;
}

// Hugging Face's forward in double: logits [T, V].
Mat2 reference_logits(const Family& f, const Checkpoint& c, const std::vector<int32_t>& ids) {
  const int H = f.heads, KV = f.kv_heads;
  const int64_t qd = int64_t(H) * D, kvd = int64_t(KV) * D;
  const int rot = int(std::lround(D * f.partial)) / 2 * 2;
  auto W = [&](const std::string& n) -> const Mat2& { return c.w.at(n); };
  auto linear = [](const Mat2& x, int64_t rows, int64_t k, const Mat2& w, int64_t n, int64_t w_row0 = 0) {
    Mat2 y(size_t(rows * n), 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t i = 0; i < k; ++i) s += x[size_t(r * k + i)] * w[size_t((w_row0 + j) * k + i)];
        y[size_t(r * n + j)] = s;
      }
    return y;
  };
  auto rmsnorm = [&f](Mat2 x, int64_t rows, const Mat2& w) {
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < E; ++i) ss += x[size_t(r * E + i)] * x[size_t(r * E + i)];
      const double inv = 1.0 / std::sqrt(ss / E + 1e-6);
      for (int64_t i = 0; i < E; ++i) x[size_t(r * E + i)] *= inv * (f.gemma ? 1.0 + w[size_t(i)] : w[size_t(i)]);
    }
    return x;
  };
  const int64_t n = int64_t(ids.size());
  Mat2 x(size_t(n * E));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < E; ++i)
      x[size_t(t * E + i)] = W("model.embed_tokens.weight")[size_t(ids[size_t(t)] * E + i)] * (f.gemma ? std::sqrt(double(E)) : 1.0);
  auto rope = [&](Mat2& m, int heads, int64_t width) {
    for (int64_t t = 0; t < n; ++t)
      for (int h = 0; h < heads; ++h)
        for (int i = 0; i < rot / 2; ++i) {
          const double a = double(t) / std::pow(500.0, 2.0 * i / rot);
          double& x0 = m[size_t(t * width + h * D + i)];
          double& x1 = m[size_t(t * width + h * D + i + rot / 2)];
          const double u = x0, v = x1;
          x0 = u * std::cos(a) - v * std::sin(a);
          x1 = v * std::cos(a) + u * std::sin(a);
        }
  };
  for (int l = 0; l < L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    Mat2 h = rmsnorm(x, n, W(p + "input_layernorm.weight"));
    Mat2 q, k, v;
    if (f.fused) {
      q = linear(h, n, E, W(p + "self_attn.qkv_proj.weight"), qd, 0);
      k = linear(h, n, E, W(p + "self_attn.qkv_proj.weight"), kvd, qd);
      v = linear(h, n, E, W(p + "self_attn.qkv_proj.weight"), kvd, qd + kvd);
    } else {
      q = linear(h, n, E, W(p + "self_attn.q_proj.weight"), qd);
      k = linear(h, n, E, W(p + "self_attn.k_proj.weight"), kvd);
      v = linear(h, n, E, W(p + "self_attn.v_proj.weight"), kvd);
      if (f.bias)
        for (int64_t t = 0; t < n; ++t) {
          for (int64_t j = 0; j < qd; ++j) q[size_t(t * qd + j)] += W(p + "self_attn.q_proj.bias")[size_t(j)];
          for (int64_t j = 0; j < kvd; ++j) {
            k[size_t(t * kvd + j)] += W(p + "self_attn.k_proj.bias")[size_t(j)];
            v[size_t(t * kvd + j)] += W(p + "self_attn.v_proj.bias")[size_t(j)];
          }
        }
    }
    rope(q, H, qd);
    rope(k, KV, kvd);
    // The cache holds K and V in f16.
    k = rounded_f16(k);
    v = rounded_f16(v);
    Mat2 attn(size_t(n * qd), 0.0);
    for (int64_t t = 0; t < n; ++t)
      for (int hh = 0; hh < H; ++hh) {
        const int kh = hh / (H / KV);
        std::vector<double> s;
        std::vector<int64_t> js;
        for (int64_t j = 0; j <= t; ++j) {
          if (f.window && t - j >= f.window) continue;
          double d = 0;
          for (int e = 0; e < D; ++e) d += q[size_t(t * qd + hh * D + e)] * k[size_t(j * kvd + kh * D + e)];
          s.push_back(d / std::sqrt(double(D)));
          js.push_back(j);
        }
        double m = *std::max_element(s.begin(), s.end()), z = 0;
        for (auto& e : s) z += (e = std::exp(e - m));
        for (int e = 0; e < D; ++e) {
          double o = 0;
          for (size_t i = 0; i < s.size(); ++i) o += s[i] * v[size_t(js[i] * kvd + kh * D + e)];
          attn[size_t(t * qd + hh * D + e)] = o / z;
        }
      }
    Mat2 o = linear(attn, n, qd, W(p + "self_attn.o_proj.weight"), E);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    h = rmsnorm(x, n, W(p + "post_attention_layernorm.weight"));
    Mat2 g, u;
    if (f.fused) {
      g = linear(h, n, E, W(p + "mlp.gate_up_proj.weight"), I, 0);
      u = linear(h, n, E, W(p + "mlp.gate_up_proj.weight"), I, I);
    } else {
      g = linear(h, n, E, W(p + "mlp.gate_proj.weight"), I);
      u = linear(h, n, E, W(p + "mlp.up_proj.weight"), I);
    }
    for (size_t i = 0; i < g.size(); ++i)
      g[i] = (f.gemma ? 0.5 * g[i] * (1 + std::tanh(std::sqrt(2 / M_PI) * (g[i] + 0.044715 * g[i] * g[i] * g[i])))
                      : g[i] / (1 + std::exp(-g[i]))) * u[i];
    Mat2 dn = linear(g, n, I, W(p + "mlp.down_proj.weight"), E);
    for (size_t i = 0; i < x.size(); ++i) x[i] += dn[i];
  }
  Mat2 out = rmsnorm(x, n, W("model.norm.weight"));
  return linear(out, n, E, f.tied ? W("model.embed_tokens.weight") : W("lm_head.weight"), V);
}

class LmFamily : public testing::TestWithParam<Family> {};

TEST_P(LmFamily, MatchesTheReferenceFormulasAndDecodesConsistently) {
  const Family& f = GetParam();
  Checkpoint ck = make_checkpoint(f, 11);
  ModelConfig cfg = load_model_config(ck.dir);
  TensorStore store = TensorStore::open_directory(ck.dir);
  WeightLoader loader(ctx(), store, cfg, {});
  LanguageModel lm(ctx(), cfg.text, loader);
  if (f.mlx4) {
    EXPECT_EQ(lm.format_summary(), "q4 group 32");
  }

  std::mt19937 rng(5);
  std::vector<int32_t> ids(static_cast<size_t>(T));
  for (auto& id : ids) id = int32_t(rng() % V);
  const Mat2 want = reference_logits(f, ck, ids);

  const int64_t cap = 64;
  KvCache cache = KvCache::create(ctx(), cfg.text, cap);
  auto table = gpu::rope_table(cap, cfg.text.rope.rot_dim, cfg.text.rope.theta);
  gpu::Tensor rope = upload_f32(table, {cap, cfg.text.rope.rot_dim / 2, 2}, "rope");
  gpu::Tensor idt = upload_i32(ids);
  std::vector<int32_t> pos(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) pos[size_t(t)] = int32_t(t);
  ForwardRows all;
  all.kv_row = upload_i32({0}, "first row");
  all.positions = upload_i32(pos, "positions");
  // Full forward over all positions, logits for every row.
  gpu::Tensor x = ctx().tensor(gpu::DType::F32, {T, E}, "x");
  gpu::Tensor logits = poisoned_f32({T, V}, "logits");
  run([&](gpu::Recorder& rec) {
    lm.embed(rec, idt, 0, T, gpu::Mat::of(x));
    gpu::Mat lg = gpu::Mat::of(logits);
    lm.forward(rec, cache, gpu::Mat::of(x), all, rope, &lg);
  });
  EXPECT_LE(nmse(ctx().read<float>(logits), want), 1e-5) << f.name;

  // Prefill all but the last token, then one decode step: the last row again.
  KvCache cache2 = KvCache::create(ctx(), cfg.text, cap);
  gpu::Tensor x1 = ctx().tensor(gpu::DType::F32, {T - 1, E}, "x1"), x2 = ctx().tensor(gpu::DType::F32, {1, E}, "x2");
  gpu::Tensor last = poisoned_f32({1, V}, "last");
  // The decode step reads its row and position from buffers, as the recorded step does.
  ForwardRows step;
  step.kv_row = upload_i32({int32_t(T - 1)}, "decode row");
  step.positions = all.positions;
  step.positions_row = T - 1;
  run([&](gpu::Recorder& rec) {
    lm.embed(rec, idt, 0, T - 1, gpu::Mat::of(x1));
    lm.forward(rec, cache2, gpu::Mat::of(x1), all, rope, nullptr);
  });
  run([&](gpu::Recorder& rec) {
    lm.embed(rec, idt, T - 1, 1, gpu::Mat::of(x2));
    gpu::Mat lg = gpu::Mat::of(last);
    lm.forward(rec, cache2, gpu::Mat::of(x2), step, rope, &lg);
  });
  std::vector<double> want_last(want.end() - V, want.end());
  EXPECT_LE(nmse(ctx().read<float>(last), want_last), 1e-5) << f.name << " decode step";
  fs::remove_all(ck.dir);
}

INSTANTIATE_TEST_SUITE_P(
    Families, LmFamily,
    testing::Values(Family{"qwen2_bias_tied", "qwen2", true, true, false, false, 0, 1.0, 4, 2},
                    Family{"mistral_gqa_window", "mistral", false, false, false, false, 7, 1.0, 4, 1},
                    Family{"phi3_fused_partial_rotary", "phi3", false, false, true, false, 0, 0.5, 4, 4},
                    Family{"llama_mlx4", "llama", false, false, false, true, 0, 1.0, 4, 2},
                    Family{"gemma_mqa_geglu", "gemma", false, true, false, false, 0, 1.0, 2, 1, true}),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace vkvlm::test
