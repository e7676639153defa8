// Every kernel, in every variant the device can run, against a double-precision CPU reference on
// random inputs, including sizes that are not multiples of any tile or subgroup size. Outputs
// are poisoned with NaN before each run so that an element a kernel fails to write is caught.
#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <set>
#include <sstream>

#include "gpu/pipelines.h"
#include "gpu/shader_variants.h"
#include "tests/kernel_harness.h"

namespace vkvlm::test {
namespace {

using gpu::Mat;
using gpu::Tensor;
using gpu::Variant;
using gpu::WeightFormat;

constexpr double kTolF32 = 1e-7;  // f32 operands
constexpr double kTolF16 = 1e-5;  // f16 operands

// ---------------------------------------------------------------------------------------------
// matmul: y = x W^T (+ bias) (+ y)

struct MatmulCase {
  WeightFormat format;
  int group;
  bool scales_bf16;
  int64_t M, N, K;
  Variant::Matmul path;
  bool bias, accumulate;
};

const char* path_name(Variant::Matmul path) {
  return path == Variant::Matmul::Gemv ? "gemv" : path == Variant::Matmul::Lanes ? "lanes" : "gemm";
}

std::string matmul_name(const testing::TestParamInfo<MatmulCase>& info) {
  const auto& c = info.param;
  std::ostringstream os;
  os << path_name(c.path) << "_" << gpu::weight_format_name(c.format);
  if (c.format == WeightFormat::Q4 || c.format == WeightFormat::Q8) os << "_g" << c.group << (c.scales_bf16 ? "_bf16s" : "");
  os << "_" << c.M << "x" << c.N << "x" << c.K << (c.bias ? "_bias" : "") << (c.accumulate ? "_acc" : "");
  return os.str();
}

class MatmulTest : public testing::TestWithParam<MatmulCase> {};

// Every shader variant the ops can ask for (gpu/shader_variants.h) is compiled, and every
// compiled one is asked for: a misspelled or forgotten variant fails here, not in a user's run.
TEST(ShaderVariants, EveryVariantAskedForIsCompiledAndEveryCompiledOneAskedFor) {
  const std::vector<std::string> compiled = gpu::PipelineRegistry::shader_names();
  const std::set<std::string> have(compiled.begin(), compiled.end());
  std::set<std::string> asked;
  for (const std::string& name : gpu::variant::all()) {
    EXPECT_TRUE(have.count(name)) << name << " is asked for but not compiled (shaders/shaders.cmake)";
    asked.insert(name);
  }
  for (const std::string& name : compiled) EXPECT_TRUE(asked.count(name)) << name << " is compiled but never asked for";
}

TEST_P(MatmulTest, MatchesReference) {
  const auto& c = GetParam();
  auto tw = make_weight(c.format, c.N, c.K, 1234, c.group, c.scales_bf16);
  auto xv = random_floats(size_t(c.M * c.K), 99);
  auto bv = random_floats(size_t(c.N), 7);
  auto y0 = random_floats(size_t(c.M * c.N), 5);
  Tensor bias = upload_f32(bv, {c.N}, "bias");

  std::vector<bool> x16_settings = {false};
  if (ctx().profile().storage16) x16_settings.push_back(true);
  for (bool x16 : x16_settings) {
    std::vector<float> xr = xv;
    Tensor x = x16 ? upload_f16(xv, {c.M, c.K}, &xr) : upload_f32(xv, {c.M, c.K});
    std::vector<double> want(size_t(c.M * c.N));
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t n = 0; n < c.N; ++n) {
        double s = 0;
        for (int64_t k = 0; k < c.K; ++k) s += double(xr[size_t(m * c.K + k)]) * tw.values[size_t(n * c.K + k)];
        if (c.bias) s += bv[size_t(n)];
        if (c.accumulate) s += y0[size_t(m * c.N + n)];
        want[size_t(m * c.N + n)] = s;
      }
    // The tiled GEMM case also covers the cooperative-matrix GEMM where the device has one.
    std::vector<Variant::Matmul> paths = {c.path};
    if (c.path == Variant::Matmul::Gemm && !x16 && gpu::coopmat_usable(ctx())) paths.push_back(Variant::Matmul::Coopmat);
    for (auto path : paths)
      for (bool sg : subgroup_settings()) {
        Tensor y = c.accumulate ? upload_f32(y0, {c.M, c.N}, "y") : poisoned_f32({c.M, c.N});
        Variant v;
        v.subgroup = sg;
        v.matmul = path;
        run([&](gpu::Recorder& rec) { gpu::matmul(rec, Mat::of(x), tw.w, c.bias ? &bias : nullptr, Mat::of(y), c.accumulate, v); });
        double e = nmse(ctx().read<float>(y), want);
        // f16 operands on the cooperative-matrix units.
        const bool f16_operands = x16 || path == Variant::Matmul::Coopmat;
        EXPECT_LE(e, f16_operands ? kTolF16 : kTolF32) << "x16=" << x16 << " subgroup=" << sg << " coopmat=" << (path == Variant::Matmul::Coopmat);
      }
  }
}

std::vector<MatmulCase> matmul_cases() {
  std::vector<MatmulCase> out;
  const std::vector<std::array<int64_t, 3>> float_shapes = {{1, 67, 17}, {3, 67, 96}, {8, 130, 128}, {17, 67, 17},
                                                           {33, 129, 200}, {1, 32064, 64}};
  const std::vector<std::array<int64_t, 3>> quant_shapes = {{1, 67, 128}, {3, 65, 256}, {17, 67, 128}, {70, 33, 384}};
  for (auto path : {Variant::Matmul::Gemv, Variant::Matmul::Gemm, Variant::Matmul::Lanes}) {
    for (auto f : {WeightFormat::F32, WeightFormat::F16, WeightFormat::BF16})
      for (auto s : float_shapes) out.push_back({f, 0, false, s[0], s[1], s[2], path, s[0] == 3, s[0] == 17});
    for (auto f : {WeightFormat::Q4, WeightFormat::Q8})
      for (int g : {32, 64, 128})
        for (auto s : quant_shapes) out.push_back({f, g, g == 128, s[0], s[1], s[2], path, s[0] == 3, s[0] == 17});
    out.push_back({WeightFormat::Q4, 64, false, 1, 32064, 128, path, true, false});
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Kernels, MatmulTest, testing::ValuesIn(matmul_cases()), matmul_name);

// A strided view: x rows and y columns taken from inside larger tensors.
TEST(MatmulViews, GemvAndGemmOnSubMatrices) {
  auto tw = make_weight(WeightFormat::F16, 40, 24, 3);
  auto big = random_floats(10 * 50, 11);
  Tensor xt = upload_f32(big, {10, 50});
  Mat x = Mat::of(xt).row_range(2, 5).col_range(3, 24);  // [5, 24] at stride 50
  for (auto path : {Variant::Matmul::Gemv, Variant::Matmul::Gemm, Variant::Matmul::Lanes}) {
    Tensor yt = poisoned_f32({5, 60});
    Mat y = Mat::of(yt).col_range(10, 40);
    Variant v;
    v.matmul = path;
    run([&](gpu::Recorder& rec) { gpu::matmul(rec, x, tw.w, nullptr, y, false, v); });
    auto got = ctx().read<float>(yt);
    std::vector<float> g;
    std::vector<double> want;
    for (int m = 0; m < 5; ++m)
      for (int n = 0; n < 40; ++n) {
        double s = 0;
        for (int k = 0; k < 24; ++k) s += double(big[size_t((2 + m) * 50 + 3 + k)]) * tw.values[size_t(n * 24 + k)];
        want.push_back(s);
        g.push_back(got[size_t(m * 60 + 10 + n)]);
      }
    EXPECT_LE(nmse(g, want), kTolF32);
    // Columns outside the view stay untouched (still NaN).
    EXPECT_TRUE(std::isnan(got[0]) && std::isnan(got[59]));
  }
}

// A row's product must not depend on how many rows it is computed with: batched decode and
// speculative verification compare bit for bit against one-row decode steps.
TEST(MatmulRows, ARowsResultDoesNotDependOnM) {
  for (auto format : {WeightFormat::F16, WeightFormat::Q4, WeightFormat::Q8}) {
    auto tw = make_weight(format, 300, 256, 21);
    auto xv = random_floats(size_t(20 * 256), 4);
    Tensor x = upload_f32(xv, {20, 256});
    for (auto path : {Variant::Matmul::Gemv, Variant::Matmul::Lanes}) {
      Variant v;
      v.matmul = path;
      Tensor one = poisoned_f32({1, 300});
      run([&](gpu::Recorder& rec) { gpu::matmul(rec, Mat::of(x).row_range(2, 1), tw.w, nullptr, Mat::of(one), false, v); });
      const auto want = ctx().read<float>(one);
      // The same row at an offset that rules out vector loads of x.
      {
        std::vector<float> shifted(size_t(257), 0.0f);
        std::copy(xv.begin() + 2 * 256, xv.begin() + 3 * 256, shifted.begin() + 1);
        Tensor xs = upload_f32(shifted, {1, 257});
        Tensor y1 = poisoned_f32({1, 300});
        run([&](gpu::Recorder& rec) { gpu::matmul(rec, Mat::of(xs).col_range(1, 256), tw.w, nullptr, Mat::of(y1), false, v); });
        const auto got = ctx().read<float>(y1);
        EXPECT_EQ(got, want) << gpu::weight_format_name(format) << " " << path_name(path) << " unaligned x";
      }
      for (int64_t rows : {3, 4, 8, path == Variant::Matmul::Lanes ? 20 : 5}) {
        Tensor many = poisoned_f32({rows, 300});
        run([&](gpu::Recorder& rec) { gpu::matmul(rec, Mat::of(x).row_range(0, rows), tw.w, nullptr, Mat::of(many), false, v); });
        const auto got = ctx().read<float>(many);
        EXPECT_TRUE(std::equal(want.begin(), want.end(), got.begin() + 2 * 300))
            << gpu::weight_format_name(format) << " " << path_name(path) << " rows=" << rows;
      }
    }
  }
}

// A 32064 x 4096 f16 table is 262 MB: more than lavapipe's 128 MiB binding. The gather and the
// product must bind it in parts.
TEST(LargeTensor, EmbeddingAndGemvBeyondBindingLimit) {
  const int64_t N = 32064, K = 4096;
  std::vector<uint16_t> h(size_t(N * K));
  uint32_t state = 12345;
  for (auto& v : h) {
    state = state * 1664525u + 1013904223u;
    v = f32_to_f16((float(state >> 8) / float(1 << 24)) * 2.0f - 1.0f);
  }
  gpu::Weight w;
  w.format = WeightFormat::F16;
  w.n = N;
  w.k = K;
  w.name = "embed_tokens";
  w.data = ctx().tensor(gpu::DType::F16, {N, K}, "embed_tokens");
  ctx().upload(w.data, h.data(), h.size() * 2);
  const std::vector<int32_t> ids = {0, 31999, 16000, 32063, 5};
  Tensor idt = upload_i32(ids);
  Tensor rows = poisoned_f32({int64_t(ids.size()), K});
  run([&](gpu::Recorder& rec) { gpu::get_rows(rec, w, idt, 0, int64_t(ids.size()), Mat::of(rows)); });
  auto got = ctx().read<float>(rows);
  std::vector<double> want;
  for (int32_t id : ids)
    for (int64_t k = 0; k < K; ++k) want.push_back(f16_to_f32(h[size_t(id * K + k)]));
  EXPECT_EQ(nmse(got, want), 0.0);

  auto xv = random_floats(size_t(K), 8);
  Tensor x = upload_f32(xv, {1, K});
  std::vector<double> ref(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) {
    double s = 0;
    for (int64_t k = 0; k < K; ++k) s += double(xv[size_t(k)]) * f16_to_f32(h[size_t(n * K + k)]);
    ref[size_t(n)] = s;
  }
  for (auto path : {Variant::Matmul::Gemv, Variant::Matmul::Lanes}) {
    Tensor y = poisoned_f32({1, N});
    Variant v;
    v.matmul = path;
    run([&](gpu::Recorder& rec) { gpu::matmul(rec, Mat::of(x), w, nullptr, Mat::of(y), false, v); });
    EXPECT_LE(nmse(ctx().read<float>(y), ref), kTolF32) << path_name(path);
  }
}

// ---------------------------------------------------------------------------------------------
// rmsnorm, layernorm

class NormTest : public testing::TestWithParam<std::tuple<int64_t, int64_t>> {};

TEST_P(NormTest, RmsnormMatchesReference) {
  auto [rows, cols] = GetParam();
  auto xv = random_floats(size_t(rows * cols), 1, -3, 3);
  auto wv = random_floats(size_t(cols), 2);
  Tensor x = upload_f32(xv, {rows, cols}), w = upload_f32(wv, {cols});
  for (bool plus_one : {false, true}) {
    std::vector<double> want(xv.size());
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t c = 0; c < cols; ++c) ss += double(xv[size_t(r * cols + c)]) * xv[size_t(r * cols + c)];
      double inv = 1.0 / std::sqrt(ss / double(cols) + 1e-5);
      for (int64_t c = 0; c < cols; ++c)
        want[size_t(r * cols + c)] = xv[size_t(r * cols + c)] * inv * ((plus_one ? 1.0 : 0.0) + wv[size_t(c)]);
    }
    for (bool sg : subgroup_settings()) {
      Tensor y = poisoned_f32({rows, cols});
      Variant v;
      v.subgroup = sg;
      run([&](gpu::Recorder& rec) { gpu::rmsnorm(rec, Mat::of(x), w, 1e-5f, plus_one, Mat::of(y), v); });
      EXPECT_LE(nmse(ctx().read<float>(y), want), kTolF32) << "plus_one=" << plus_one << " subgroup=" << sg;
    }
  }
}

TEST_P(NormTest, LayernormMatchesReference) {
  auto [rows, cols] = GetParam();
  auto xv = random_floats(size_t(rows * cols), 3, -2, 4);
  auto wv = random_floats(size_t(cols), 4), bv = random_floats(size_t(cols), 5);
  Tensor x = upload_f32(xv, {rows, cols}), w = upload_f32(wv, {cols}), b = upload_f32(bv, {cols});
  std::vector<double> want(xv.size());
  for (int64_t r = 0; r < rows; ++r) {
    double mean = 0, var = 0;
    for (int64_t c = 0; c < cols; ++c) mean += xv[size_t(r * cols + c)];
    mean /= double(cols);
    for (int64_t c = 0; c < cols; ++c) var += (xv[size_t(r * cols + c)] - mean) * (xv[size_t(r * cols + c)] - mean);
    double inv = 1.0 / std::sqrt(var / double(cols) + 1e-5);
    for (int64_t c = 0; c < cols; ++c)
      want[size_t(r * cols + c)] = (xv[size_t(r * cols + c)] - mean) * inv * wv[size_t(c)] + bv[size_t(c)];
  }
  for (bool sg : subgroup_settings()) {
    Tensor y = poisoned_f32({rows, cols});
    Variant v;
    v.subgroup = sg;
    run([&](gpu::Recorder& rec) { gpu::layernorm(rec, Mat::of(x), w, b, 1e-5f, Mat::of(y), v); });
    EXPECT_LE(nmse(ctx().read<float>(y), want), kTolF32) << "subgroup=" << sg;
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, NormTest,
                         testing::Values(std::make_tuple(1, 1), std::make_tuple(3, 17), std::make_tuple(17, 4096),
                                         std::make_tuple(2, 5120), std::make_tuple(577, 64)));

// ---------------------------------------------------------------------------------------------
// rope

// Positions are data: every row reads its own position(s) from a buffer, not "first + t".
// Sections: one position per token; M-RoPE's three (temporal, height, width) over
// mrope_section-sized runs of frequencies; the 2-D vision rotary's two (row, column).
struct RopeCase {
  const char* name;
  int64_t T;
  int heads, head_dim, rot_dim;
  gpu::RopeMode mode;
  bool factors;
  std::vector<int> sections;  // empty: one position per token
  int first;                  // the positions row of x's row 0
};

void PrintTo(const RopeCase& c, std::ostream* os) { *os << c.name; }

class RopeTest : public testing::TestWithParam<RopeCase> {};

TEST_P(RopeTest, MatchesReference) {
  const auto& c = GetParam();
  const double theta = 10000.0, scale = c.factors ? 1.1902380714238083 : 1.0;
  std::vector<double> factors;
  if (c.factors) {
    auto f = random_floats(size_t(c.rot_dim / 2), 21, 1.0f, 4.0f);
    factors.assign(f.begin(), f.end());
  }
  const int comps = c.sections.empty() ? 1 : int(c.sections.size());
  const int64_t positions = 5000;  // a table larger than the 1 MiB binding of the masked run
  auto table = gpu::rope_table(positions, c.rot_dim, theta, factors, scale);
  Tensor tt = upload_f32(table, {positions, c.rot_dim / 2, 2}, "rope table");
  // Positions in no particular order, repeated and far apart (as image grids give them).
  std::mt19937 rng(7);
  std::vector<int32_t> pos(size_t((c.first + c.T) * comps));
  for (auto& p : pos) p = int32_t(rng() % positions);
  Tensor pt = upload_i32(pos, "positions");
  const int64_t row = int64_t(c.heads) * c.head_dim + 5;  // rows wider than the heads
  auto xv = random_floats(size_t(c.T * row), 31);
  Tensor x = upload_f32(xv, {c.T, row});
  std::vector<double> want(xv.begin(), xv.end());
  const int half = c.rot_dim / 2;
  auto section = [&](int i) {
    int s = 0, end = c.sections.empty() ? half : c.sections[0];
    while (i >= end) end += c.sections[size_t(++s)];
    return s;
  };
  for (int64_t t = 0; t < c.T; ++t)
    for (int h = 0; h < c.heads; ++h)
      for (int i = 0; i < half; ++i) {
        const double f = factors.empty() ? 1.0 : factors[size_t(i)];
        const int32_t p = pos[size_t((c.first + t) * comps + section(i))];
        const double a = double(p) / (f * std::pow(theta, 2.0 * i / c.rot_dim));
        const size_t base = size_t(t * row + h * c.head_dim);
        const size_t i0 = c.mode == gpu::RopeMode::RotateHalf ? base + i : base + 2 * i;
        const size_t i1 = c.mode == gpu::RopeMode::RotateHalf ? base + i + half : base + 2 * i + 1;
        want[i0] = (xv[i0] * std::cos(a) - xv[i1] * std::sin(a)) * scale;
        want[i1] = (xv[i1] * std::cos(a) + xv[i0] * std::sin(a)) * scale;
      }
  const auto sections = c.sections.empty() ? gpu::RopeSections{} : gpu::RopeSections::of_sizes(c.sections, c.rot_dim);
  run([&](gpu::Recorder& rec) { gpu::rope(rec, Mat::of(x), c.heads, c.head_dim, c.rot_dim, c.mode, tt, pt, c.first, sections); });
  EXPECT_LE(nmse(ctx().read<float>(x), want), kTolF32);
}

INSTANTIATE_TEST_SUITE_P(
    Kernels, RopeTest,
    testing::Values(RopeCase{"single_decode", 1, 2, 64, 64, gpu::RopeMode::RotateHalf, false, {}, 0},
                    RopeCase{"longrope_factors", 3, 4, 96, 96, gpu::RopeMode::RotateHalf, true, {}, 40},
                    RopeCase{"partial_rotary", 17, 2, 128, 64, gpu::RopeMode::RotateHalf, false, {}, 7},
                    RopeCase{"interleaved", 17, 3, 80, 80, gpu::RopeMode::Interleaved, false, {}, 1},
                    RopeCase{"interleaved_partial_factors", 5, 2, 64, 32, gpu::RopeMode::Interleaved, true, {}, 3},
                    RopeCase{"mrope_sections", 23, 4, 64, 64, gpu::RopeMode::RotateHalf, false, {8, 12, 12}, 5},
                    RopeCase{"mrope_decode", 1, 2, 128, 128, gpu::RopeMode::RotateHalf, false, {16, 24, 24}, 0},
                    RopeCase{"vision_2d", 37, 2, 32, 32, gpu::RopeMode::RotateHalf, false, {8, 8}, 0}),
    [](const auto& info) { return std::string(info.param.name); });

// ---------------------------------------------------------------------------------------------
// attention (with kv_append filling the f16 cache)

struct AttnCase {
  int64_t T, n_past;
  int H, HKV, D;
  bool causal;
  int window;
  Variant::Attention path;
  uint32_t keys_per_split;
  // Bidirectional spans [begin, end) of KV rows: a causal query in one also sees the whole span
  // (PaliGemma's prefix, Gemma 3's images); a query that is not causal sees only its span.
  std::vector<std::pair<int64_t, int64_t>> spans = {};
  int64_t rotating_rows = 0;  // a rotating cache of this many written rows: all visible (0: off)
};

std::string attn_name(const testing::TestParamInfo<AttnCase>& info) {
  const auto& c = info.param;
  std::ostringstream os;
  os << (c.path == Variant::Attention::Tiled ? "tiled" : "rows") << "_T" << c.T << "_past" << c.n_past << "_H" << c.H
     << "kv" << c.HKV << "_D" << c.D << (c.causal ? "_causal" : "_full");
  if (c.window) os << "_window" << c.window;
  if (c.keys_per_split) os << "_split" << c.keys_per_split;
  for (const auto& [b, e] : c.spans) os << "_span" << b << "to" << e;
  if (c.rotating_rows) os << "_rotating" << c.rotating_rows;
  return os.str();
}

// The span holding KV row `row` ([0, 0): none).
std::pair<int64_t, int64_t> span_of(const AttnCase& c, int64_t row) {
  for (const auto& s : c.spans)
    if (s.first <= row && row < s.second) return s;
  return {0, 0};
}

// softmax(q k^T * scale + mask) v in double over the cache rows kr, vr [rows, HKV * D].
std::vector<double> attention_reference(const AttnCase& c, const std::vector<float>& qv, const std::vector<float>& kr,
                                        const std::vector<float>& vr) {
  const int64_t qd = int64_t(c.H) * c.D, kvd = int64_t(c.HKV) * c.D;
  const double scale = 1.0 / std::sqrt(double(c.D));
  std::vector<double> want(size_t(c.T * qd));
  for (int64_t t = 0; t < c.T; ++t)
    for (int h = 0; h < c.H; ++h) {
      const int kvh = h / (c.H / c.HKV);
      const int64_t pos = c.n_past + t;
      std::vector<double> s;
      std::vector<int64_t> js;
      const auto span = span_of(c, pos);
      for (int64_t j = 0; j < (c.rotating_rows ? c.rotating_rows : c.n_past + c.T); ++j) {
        const bool in_span = span.first <= j && j < span.second;
        if (c.rotating_rows) {  // a rotating cache: every written row, older or newer
        } else if (c.causal) {  // its own row and those before it, within the window, and its span
          if (!in_span && (j > pos || (c.window && pos - j >= c.window))) continue;
        } else if (span.second > span.first && !in_span) {
          continue;  // only its span
        }
        double d = 0;
        for (int e = 0; e < c.D; ++e) d += double(qv[size_t(t * qd + h * c.D + e)]) * kr[size_t(j * kvd + kvh * c.D + e)];
        s.push_back(d * scale);
        js.push_back(j);
      }
      double m = *std::max_element(s.begin(), s.end()), sum = 0;
      for (auto& x : s) sum += (x = std::exp(x - m));
      for (int e = 0; e < c.D; ++e) {
        double o = 0;
        for (size_t i = 0; i < s.size(); ++i) o += s[i] * vr[size_t(js[i] * kvd + kvh * c.D + e)];
        want[size_t(t * qd + h * c.D + e)] = o / sum;
      }
    }
  return want;
}

gpu::AttentionParams attention_params(const AttnCase& c) {
  gpu::AttentionParams ap;
  ap.heads = c.H;
  ap.kv_heads = c.HKV;
  ap.head_dim = c.D;
  ap.causal = c.causal;
  ap.window = c.window;
  ap.scale = float(1.0 / std::sqrt(double(c.D)));
  ap.T_total = c.T;
  if (!c.spans.empty()) {  // each query's span, as the kernels read it
    std::vector<int32_t> pairs;
    for (int64_t t = 0; t < c.T; ++t) {
      const auto s = span_of(c, c.n_past + t);
      pairs.push_back(int32_t(s.first));
      pairs.push_back(int32_t(s.second));
    }
    ap.spans = upload_i32(pairs, "spans");
  }
  ap.rotating = c.rotating_rows > 0;
  return ap;
}

Variant attention_variant(const AttnCase& c, bool subgroup) {
  Variant v;
  v.subgroup = subgroup;
  v.attention = c.path;
  v.keys_per_split = c.keys_per_split;
  return v;
}

class AttentionTest : public testing::TestWithParam<AttnCase> {};

TEST_P(AttentionTest, CacheMatchesReference) {
  const auto& c = GetParam();
  const int64_t cap = c.n_past + c.T + 9;  // cache capacity beyond the keys in use
  const int64_t qd = int64_t(c.H) * c.D, kvd = int64_t(c.HKV) * c.D;
  auto qv = random_floats(size_t(c.T * qd), 1, -2, 2);
  auto kn = random_floats(size_t(c.T * kvd), 2, -2, 2), vn = random_floats(size_t(c.T * kvd), 3);
  auto kold = random_floats(size_t(cap * kvd), 4, -2, 2), vold = random_floats(size_t(cap * kvd), 5);
  std::vector<float> kr, vr;
  Tensor kc = upload_f16(kold, {cap, kvd}, &kr), vc = upload_f16(vold, {cap, kvd}, &vr);
  // What the cache holds after the append: new rows rounded to f16.
  for (int64_t t = 0; t < c.T; ++t)
    for (int64_t j = 0; j < kvd; ++j) {
      kr[size_t((c.n_past + t) * kvd + j)] = f16_to_f32(f32_to_f16(kn[size_t(t * kvd + j)]));
      vr[size_t((c.n_past + t) * kvd + j)] = f16_to_f32(f32_to_f16(vn[size_t(t * kvd + j)]));
    }
  const std::vector<double> want = attention_reference(c, qv, kr, vr);

  Tensor q = upload_f32(qv, {c.T, qd}), knew = upload_f32(kn, {c.T, kvd}), vnew = upload_f32(vn, {c.T, kvd});
  Tensor step = upload_i32({int32_t(c.n_past), int32_t(c.rotating_rows)}, "step");
  const gpu::AttentionParams ap = attention_params(c);
  for (bool sg : subgroup_settings()) {
    Tensor kcache = upload_f16(kold, {cap, kvd}), vcache = upload_f16(vold, {cap, kvd});
    Tensor out = poisoned_f32({c.T, qd});
    const Variant v = attention_variant(c, sg);
    run([&](gpu::Recorder& rec) {
      gpu::kv_append(rec, Mat::of(knew), kcache, step, 0);
      gpu::kv_append(rec, Mat::of(vnew), vcache, step, 0);
      gpu::attention(rec, Mat::of(q), Mat::of(kcache), Mat::of(vcache), Mat::of(out), step, 0, ap, v);
    });
    EXPECT_LE(nmse(ctx().read<float>(out), want), kTolF16) << "subgroup=" << sg;
  }
}

std::vector<AttnCase> attn_cases() {
  std::vector<AttnCase> out;
  for (auto path : {Variant::Attention::Tiled, Variant::Attention::Rows}) {
    out.push_back({1, 0, 2, 1, 64, true, 0, path, 0});
    out.push_back({1, 37, 4, 2, 128, true, 0, path, 0});
    out.push_back({3, 20, 2, 2, 80, true, 0, path, 0});
    out.push_back({17, 0, 2, 1, 96, true, 0, path, 0});
    out.push_back({17, 5, 4, 1, 64, true, 8, path, 0});
    out.push_back({40, 300, 2, 1, 64, true, 0, path, 0});
    out.push_back({1, 600, 2, 1, 128, true, 0, path, 0});
    out.push_back({5, 0, 3, 3, 80, false, 0, path, 0});
  }
  out.push_back({1, 300, 2, 1, 64, true, 0, Variant::Attention::Rows, 7});
  out.push_back({3, 61, 4, 2, 96, true, 16, Variant::Attention::Rows, 32});
  // Prefix-LM (PaliGemma): the prefix's rows see each other whole; later rows are causal.
  for (auto path : {Variant::Attention::Tiled, Variant::Attention::Rows}) {
    out.push_back({37, 0, 4, 1, 32, true, 0, path, 0, {{0, 37}}});  // the whole prompt in one pass
    out.push_back({20, 0, 2, 1, 64, true, 0, path, 0, {{0, 13}}});  // a prefix, then causal rows
    out.push_back({3, 4, 2, 2, 64, true, 0, path, 0, {{0, 7}}});    // the rest of a cached prefix
    out.push_back({1, 40, 4, 1, 32, true, 0, path, 0, {{0, 30}}});  // decoding after the prefix
    // Gemma 3: images attend to themselves whole inside a causal prompt, with a sliding window
    // shorter than an image (its rows still see the whole image) and rows between and after.
    out.push_back({40, 0, 4, 2, 64, true, 8, path, 0, {{5, 17}, {20, 33}}});
    out.push_back({12, 30, 2, 1, 32, true, 6, path, 0, {{31, 39}}});  // an image in a later pass
    // Block-diagonal (crops batched through a vision tower): uneven last block; uneven images.
    out.push_back({37, 0, 2, 2, 64, false, 0, path, 0, {{0, 12}, {12, 24}, {24, 36}, {36, 37}}});
    out.push_back({37, 0, 2, 2, 32, false, 0, path, 0, {{0, 5}, {5, 23}, {23, 37}}});
  }
  out.push_back({40, 0, 2, 1, 64, true, 0, Variant::Attention::Rows, 16, {{0, 29}}});
  // A rotating cache, decoding at row 5 of a full cache (rows after it hold older tokens), and
  // split over workgroups; and before it filled (written rows only).
  out.push_back({1, 5, 4, 2, 64, true, 0, Variant::Attention::Rows, 0, {}, 15});
  out.push_back({1, 3, 2, 1, 128, true, 0, Variant::Attention::Rows, 4, {}, 13});
  out.push_back({1, 6, 2, 2, 80, true, 0, Variant::Attention::Rows, 0, {}, 7});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Kernels, AttentionTest, testing::ValuesIn(attn_cases()), attn_name);

// ---------------------------------------------------------------------------------------------
// quantized KV cache (--kv-bits): kv_append quantizing rows as MLX's affine_quantize does, and
// attention reading the packed rows, after `f16_rows` rows kept in f16.

struct QuantKvCase {
  AttnCase attn;
  int bits, group;
  int64_t f16_rows;
};

std::string quant_kv_name(const testing::TestParamInfo<QuantKvCase>& info) {
  const auto& c = info.param;
  std::ostringstream os;
  os << "q" << c.bits << "g" << c.group << "_f16rows" << c.f16_rows << "_"
     << attn_name(testing::TestParamInfo<AttnCase>(c.attn, info.index));
  return os.str();
}

// One group quantized on the host as MLX's affine_quantize (mlx/ops.cpp): the endpoint of
// larger magnitude is the bias, exactly; the scale spans the range in 2^bits - 1 steps; both
// stored as f16, the codes computed with the unrounded ones (as mx.quantize does). Returns the
// codes and writes what they dequantize to.
std::vector<int> mlx_quantize_group(const float* x, int n, int bits, float* dequantized, float* scale_out) {
  // In float, as MLX computes it.
  const float n_bins = float((1 << bits) - 1);
  float lo = x[0], hi = x[0];
  for (int i = 1; i < n; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);
  const bool low_edge = std::abs(lo) > std::abs(hi);
  float scale = std::max((hi - lo) / n_bins, 1e-7f);
  if (!low_edge) scale = -scale;
  const float edge = low_edge ? lo : hi;
  const float q0 = std::nearbyint(edge / scale);
  float bias = 0;
  if (q0 != 0) scale = edge / q0, bias = edge;
  const float s16 = f16_to_f32(f32_to_f16(scale)), b16 = f16_to_f32(f32_to_f16(bias));
  std::vector<int> q(size_t(n), 0);
  for (int i = 0; i < n; ++i) {
    q[size_t(i)] = int(std::clamp(std::nearbyint((x[i] - bias) / scale), 0.0f, n_bins));
    dequantized[i] = s16 * float(q[size_t(i)]) + b16;
  }
  *scale_out = s16;
  return q;
}

class QuantizedKvTest : public testing::TestWithParam<QuantKvCase> {};

TEST_P(QuantizedKvTest, AppendAndAttentionMatchReference) {
  const auto& qc = GetParam();
  const AttnCase& c = qc.attn;
  const int64_t cap = c.n_past + c.T + 9;
  const int64_t qd = int64_t(c.H) * c.D, kvd = int64_t(c.HKV) * c.D;
  const int64_t q_rows = cap - qc.f16_rows, words = kvd * qc.bits / 32, groups = kvd / qc.group;
  auto qv = random_floats(size_t(c.T * qd), 1, -2, 2);
  auto kn = random_floats(size_t(c.T * kvd), 2, -2, 2), vn = random_floats(size_t(c.T * kvd), 3);
  auto kold = random_floats(size_t(cap * kvd), 4, -2, 2), vold = random_floats(size_t(cap * kvd), 5);
  // What the cache holds: every row as written (old rows, then the new ones over rows n_past..),
  // each f16 below f16_rows and quantized from there.
  std::vector<float> kin = kold, vin = vold;
  std::copy(kn.begin(), kn.end(), kin.begin() + c.n_past * kvd);
  std::copy(vn.begin(), vn.end(), vin.begin() + c.n_past * kvd);
  std::vector<float> kr(kin.size()), vr(vin.size());
  std::vector<std::vector<int>> kq(size_t(cap * groups)), vq(size_t(cap * groups));  // codes per group
  std::vector<float> kscale(size_t(cap * groups)), vscale(size_t(cap * groups));
  for (int64_t r = 0; r < cap; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const size_t at = size_t(r * kvd + g * qc.group), gi = size_t(r * groups + g);
      if (r < qc.f16_rows) {
        for (int i = 0; i < qc.group; ++i) {
          kr[at + i] = f16_to_f32(f32_to_f16(kin[at + i]));
          vr[at + i] = f16_to_f32(f32_to_f16(vin[at + i]));
        }
      } else {
        kq[gi] = mlx_quantize_group(&kin[at], qc.group, qc.bits, &kr[at], &kscale[gi]);
        vq[gi] = mlx_quantize_group(&vin[at], qc.group, qc.bits, &vr[at], &vscale[gi]);
      }
    }
  const std::vector<double> want = attention_reference(c, qv, kr, vr);

  Tensor q = upload_f32(qv, {c.T, qd}), kall = upload_f32(kold, {cap, kvd}), vall = upload_f32(vold, {cap, kvd});
  Tensor knew = upload_f32(kn, {c.T, kvd}), vnew = upload_f32(vn, {c.T, kvd});
  Tensor zero = upload_i32({0}, "zero");
  Tensor step = upload_i32({int32_t(c.n_past), int32_t(c.rotating_rows)}, "step");
  const gpu::AttentionParams ap = attention_params(c);
  auto cache = [&](const char* name) {
    gpu::KvRows rows;
    if (qc.f16_rows) rows.push_back(Mat::of(ctx().tensor(gpu::DType::F16, {qc.f16_rows, kvd}, name)));
    rows.push_back(gpu::KvMat::quantized(ctx().tensor(gpu::DType::U32, {q_rows, words}, name),
                                         ctx().tensor(gpu::DType::U32, {q_rows, groups}, name), qc.bits, qc.group, kvd));
    return rows;
  };
  for (bool sg : subgroup_settings()) {
    const gpu::KvRows kcache = cache("k"), vcache = cache("v");
    Tensor out = poisoned_f32({c.T, qd});
    const Variant v = attention_variant(c, sg);
    run([&](gpu::Recorder& rec) {
      gpu::kv_append(rec, Mat::of(kall), kcache, zero, 0);
      gpu::kv_append(rec, Mat::of(vall), vcache, zero, 0);
      gpu::kv_append(rec, Mat::of(knew), kcache, step, 0);
      gpu::kv_append(rec, Mat::of(vnew), vcache, step, 0);
      gpu::attention(rec, Mat::of(q), kcache, vcache, Mat::of(out), step, 0, ap, v);
    });
    EXPECT_LE(nmse(ctx().read<float>(out), want), kTolF16) << "subgroup=" << sg;

    // The stored codes and (scale, bias) words, against the host's quantization: a code may
    // differ by one step where a value falls on a rounding tie (f32 on the GPU).
    const gpu::KvMat& seg = kcache.back();
    const auto data = ctx().read<uint32_t>(seg.data.t), params = ctx().read<uint32_t>(seg.params.t);
    int64_t differing = 0, total = 0;
    for (int64_t r = 0; r < q_rows; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        const size_t gi = size_t((qc.f16_rows + r) * groups + g);
        const uint32_t pw = params[size_t(r * groups + g)];
        EXPECT_NEAR(f16_to_f32(uint16_t(pw & 0xffff)), kscale[gi], std::abs(kscale[gi]) * 2e-3) << "row " << r << " group " << g;
        for (int i = 0; i < qc.group; ++i) {
          const int64_t e = g * qc.group + i;
          const uint32_t word = data[size_t(r * words + e * qc.bits / 32)];
          const int code = int((word >> (qc.bits * (e % (32 / qc.bits)))) & ((1u << qc.bits) - 1));
          ASSERT_LE(std::abs(code - kq[gi][size_t(i)]), 1);
          differing += code != kq[gi][size_t(i)];
          ++total;
        }
      }
    EXPECT_LE(differing, total / 100) << differing << " of " << total << " codes differ from the host's";
  }
}

std::vector<QuantKvCase> quant_kv_cases() {
  std::vector<QuantKvCase> out;
  for (auto path : {Variant::Attention::Tiled, Variant::Attention::Rows})
    for (int bits : {4, 8}) {
      out.push_back({{1, 37, 4, 2, 128, true, 0, path, 0}, bits, 64, 0});
      out.push_back({{17, 5, 4, 1, 64, true, 0, path, 0}, bits, 32, 0});
      out.push_back({{3, 20, 2, 2, 64, true, 0, path, 0}, bits, 32, 7});  // f16 rows, then quantized
    }
  // Split over workgroups, across the f16/quantized boundary; a rotating cache.
  out.push_back({{1, 300, 2, 1, 64, true, 0, Variant::Attention::Rows, 64}, 8, 64, 100});
  out.push_back({{1, 5, 4, 2, 64, true, 0, Variant::Attention::Rows, 0, {}, 15}, 4, 32, 4});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Kernels, QuantizedKvTest, testing::ValuesIn(quant_kv_cases()), quant_kv_name);

// Vision attention: non-causal, q/k/v f32 taken from one fused [T, 3 * H * D] projection.
TEST(AttentionVision, FusedQkvF32NonCausal) {
  const int64_t T = 37;
  const int H = 2, D = 64;
  const int64_t w = int64_t(H) * D;
  auto qkv = random_floats(size_t(T * 3 * w), 9, -2, 2);
  Tensor t = upload_f32(qkv, {T, 3 * w});
  Tensor step = upload_i32({0}, "step");
  std::vector<double> want(size_t(T * w));
  const double scale = 0.125;
  for (int64_t i = 0; i < T; ++i)
    for (int h = 0; h < H; ++h) {
      std::vector<double> s(static_cast<size_t>(T));
      for (int64_t j = 0; j < T; ++j) {
        double d = 0;
        for (int e = 0; e < D; ++e) d += double(qkv[size_t(i * 3 * w + h * D + e)]) * qkv[size_t(j * 3 * w + w + h * D + e)];
        s[size_t(j)] = d * scale;
      }
      double m = *std::max_element(s.begin(), s.end()), sum = 0;
      for (auto& x : s) sum += (x = std::exp(x - m));
      for (int e = 0; e < D; ++e) {
        double o = 0;
        for (int64_t j = 0; j < T; ++j) o += s[size_t(j)] * qkv[size_t(j * 3 * w + 2 * w + h * D + e)];
        want[size_t(i * w + h * D + e)] = o / sum;
      }
    }
  gpu::AttentionParams ap;
  ap.heads = ap.kv_heads = H;
  ap.head_dim = D;
  ap.causal = false;
  ap.scale = float(scale);
  ap.T_total = T;
  Mat all = Mat::of(t);
  for (auto path : {Variant::Attention::Tiled, Variant::Attention::Rows}) {
    Tensor out = poisoned_f32({T, w});
    Variant v;
    v.attention = path;
    run([&](gpu::Recorder& rec) {
      gpu::attention(rec, all.col_range(0, w), all.col_range(w, w), all.col_range(2 * w, w), Mat::of(out), step, 0, ap, v);
    });
    EXPECT_LE(nmse(ctx().read<float>(out), want), kTolF32);
  }
}

// ---------------------------------------------------------------------------------------------
// element-wise: silu, gelu (erf, tanh), quick_gelu, scale, add, mul, silu*mul, convert

double silu_ref(double x) { return x / (1 + std::exp(-x)); }
double gelu_erf_ref(double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }
double gelu_tanh_ref(double x) { return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x))); }
double quick_gelu_ref(double x) { return x / (1 + std::exp(-1.702 * x)); }

TEST(Elementwise, UnarySiluGeluQuickGeluScale) {
  const int64_t rows = 17, cols = 67;
  auto xv = random_floats(size_t(rows * cols), 4, -8, 8);
  Tensor x = upload_f32(xv, {rows, cols});
  const std::vector<std::pair<gpu::UnaryOp, double (*)(double)>> ops = {
      {gpu::UnaryOp::Silu, silu_ref}, {gpu::UnaryOp::GeluErf, gelu_erf_ref},
      {gpu::UnaryOp::GeluTanh, gelu_tanh_ref}, {gpu::UnaryOp::QuickGelu, quick_gelu_ref},
      {gpu::UnaryOp::Identity, [](double v) { return v; }}};
  for (auto [op, f] : ops) {
    Tensor y = poisoned_f32({rows, cols});
    run([&](gpu::Recorder& rec) { gpu::unary(rec, op, Mat::of(x), Mat::of(y), 0.5f); });
    std::vector<double> want(xv.size());
    for (size_t i = 0; i < xv.size(); ++i) want[i] = f(xv[i]) * 0.5;
    EXPECT_LE(nmse(ctx().read<float>(y), want), kTolF32) << "op " << int(op);
  }
}

TEST(Elementwise, BinaryAddMulSiluMulWithBroadcast) {
  const int64_t rows = 9, cols = 33;
  auto av = random_floats(size_t(rows * cols), 1, -6, 6), bv = random_floats(size_t(rows * cols), 2, -3, 3);
  Tensor a = upload_f32(av, {rows, cols}), b = upload_f32(bv, {rows, cols});
  const std::vector<std::pair<gpu::BinaryOp, double (*)(double, double)>> ops = {
      {gpu::BinaryOp::Add, [](double x, double y) { return x + y; }},
      {gpu::BinaryOp::Mul, [](double x, double y) { return x * y; }},
      {gpu::BinaryOp::SiluMul, [](double x, double y) { return silu_ref(x) * y; }},
      {gpu::BinaryOp::GeluTanhMul, [](double x, double y) { return gelu_tanh_ref(x) * y; }},
      {gpu::BinaryOp::GeluErfMul, [](double x, double y) { return gelu_erf_ref(x) * y; }}};
  for (auto [op, f] : ops) {
    for (bool broadcast : {false, true}) {
      Tensor y = poisoned_f32({rows, cols});
      Mat bm = Mat::of(b);
      if (broadcast) bm = bm.row_range(4, 1), bm.rows = rows, bm.stride = 0;
      run([&](gpu::Recorder& rec) { gpu::binary(rec, op, Mat::of(a), bm, Mat::of(y)); });
      std::vector<double> want(av.size());
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          want[size_t(r * cols + c)] = f(av[size_t(r * cols + c)], bv[size_t((broadcast ? 4 : r) * cols + c)]);
      EXPECT_LE(nmse(ctx().read<float>(y), want), kTolF32) << "op " << int(op) << " broadcast " << broadcast;
    }
  }
}

TEST(Elementwise, ConvertBetweenF32F16Bf16) {
  const int64_t rows = 5, cols = 34;
  auto xv = random_floats(size_t(rows * cols), 6, -100, 100);
  Tensor x = upload_f32(xv, {rows, cols});
  // f32 -> f16 -> f32 round trip equals host rounding exactly.
  Tensor h = ctx().tensor(gpu::DType::F16, {rows, cols}, "half");
  Tensor back = poisoned_f32({rows, cols});
  run([&](gpu::Recorder& rec) {
    gpu::convert(rec, Mat::of(x), Mat::of(h));
    gpu::convert(rec, Mat::of(h), Mat::of(back));
  });
  std::vector<double> want(xv.size());
  for (size_t i = 0; i < xv.size(); ++i) want[i] = f16_to_f32(f32_to_f16(xv[i]));
  EXPECT_EQ(nmse(ctx().read<float>(back), want), 0.0);
  // bf16 -> f32 is exact.
  std::vector<uint16_t> bf(xv.size());
  for (size_t i = 0; i < xv.size(); ++i) {
    bf[i] = f32_to_bf16(xv[i]);
    want[i] = bf16_to_f32(bf[i]);
  }
  Tensor b = ctx().tensor(gpu::DType::BF16, {rows, cols}, "bf16");
  ctx().upload(b, bf.data(), bf.size() * 2);
  Tensor out = poisoned_f32({rows, cols});
  run([&](gpu::Recorder& rec) { gpu::convert(rec, Mat::of(b), Mat::of(out)); });
  EXPECT_EQ(nmse(ctx().read<float>(out), want), 0.0);
}

// ---------------------------------------------------------------------------------------------
// embedding gather

TEST(GetRows, EveryTableFormat) {
  const int64_t n = 70, k = 128;
  const std::vector<int32_t> ids = {0, 69, 3, 3, 41};
  Tensor idt = upload_i32(ids);
  for (auto f : {WeightFormat::F32, WeightFormat::F16, WeightFormat::BF16, WeightFormat::Q4, WeightFormat::Q8}) {
    for (int g : {32, 128}) {
      auto tw = make_weight(f, n, k, 17, g, g == 128);
      Tensor y = poisoned_f32({int64_t(ids.size()), k});
      run([&](gpu::Recorder& rec) { gpu::get_rows(rec, tw.w, idt, 0, int64_t(ids.size()), Mat::of(y)); });
      std::vector<double> want;
      for (int32_t id : ids)
        for (int64_t c = 0; c < k; ++c) want.push_back(tw.values[size_t(id * k + c)]);
      EXPECT_LE(nmse(ctx().read<float>(y), want), 1e-12) << gpu::weight_format_name(f) << " group " << g;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// vision patch embedding

TEST(PatchEmbed, ConvClassTokenAndPositions) {
  const int B = 2, C = 3, H = 28, W = 42, P = 14, E = 17;
  const int np = (H / P) * (W / P);
  for (bool cls : {true, false}) {
    const int tokens = np + (cls ? 1 : 0);
    auto px = random_floats(size_t(B * C * H * W), 1);
    auto wv = random_floats(size_t(E * C * P * P), 2);
    auto cv = random_floats(size_t(E), 3), pv = random_floats(size_t(tokens * E), 4), bv = random_floats(size_t(E), 5);
    Tensor pt = upload_f32(px, {B, C, H, W}), wt = upload_f32(wv, {E, C * P * P}), ct = upload_f32(cv, {E}),
           post = upload_f32(pv, {tokens, E}), bt = upload_f32(bv, {E});
    Tensor y = poisoned_f32({B * tokens, E});
    run([&](gpu::Recorder& rec) {
      gpu::patch_embed(rec, pt, B, C, H, W, P, wt, cls ? &ct : nullptr, post, cls ? nullptr : &bt, Mat::of(y));
    });
    std::vector<double> want;
    for (int b = 0; b < B; ++b)
      for (int tok = 0; tok < tokens; ++tok)
        for (int e = 0; e < E; ++e) {
          double v;
          if (cls && tok == 0) {
            v = cv[size_t(e)];
          } else {
            const int q = cls ? tok - 1 : tok, py = q / (W / P), pxx = q % (W / P);
            v = cls ? 0.0 : bv[size_t(e)];
            for (int c = 0; c < C; ++c)
              for (int ky = 0; ky < P; ++ky)
                for (int kx = 0; kx < P; ++kx)
                  v += double(px[size_t(((b * C + c) * H + py * P + ky) * W + pxx * P + kx)]) *
                       wv[size_t(((e * C + c) * P + ky) * P + kx)];
          }
          want.push_back(v + pv[size_t(tok * E + e)]);
        }
    EXPECT_LE(nmse(ctx().read<float>(y), want), kTolF32) << "class token " << cls;
  }
}

// ---------------------------------------------------------------------------------------------
// logits: argmax, top-k, logsumexp, repetition penalty

TEST(Logits, ArgmaxAndTopkWithTies) {
  for (int64_t cols : {1, 17, 1500, 32064}) {
    const int64_t rows = 3;
    std::vector<float> xv(size_t(rows * cols));
    std::mt19937 rng(static_cast<uint32_t>(cols));
    std::uniform_int_distribution<int> d(-50, 50);  // many ties
    for (auto& v : xv) v = float(d(rng)) * 0.25f;
    if (cols > 10) xv[7] = NAN;  // counts as -inf
    Tensor x = upload_f32(xv, {rows, cols});
    for (int k : {1, 5, 64}) {
      Tensor vals = poisoned_f32({rows, k});
      Tensor ids = ctx().tensor(gpu::DType::U32, {rows, k}, "ids");
      run([&](gpu::Recorder& rec) { gpu::topk(rec, Mat::of(x), k, vals, ids); });
      auto gv = ctx().read<float>(vals);
      auto gi = ctx().read<uint32_t>(ids);
      for (int64_t r = 0; r < rows; ++r) {
        std::vector<int64_t> order(static_cast<size_t>(cols));
        std::iota(order.begin(), order.end(), 0);
        auto key = [&](int64_t i) {
          float v = xv[size_t(r * cols + i)];
          return std::isnan(v) ? -INFINITY : v;
        };
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key(a) > key(b); });
        for (int i = 0; i < k; ++i) {
          if (i < cols) {
            EXPECT_EQ(gi[size_t(r * k + i)], uint32_t(order[size_t(i)])) << "cols " << cols << " k " << k << " rank " << i;
            EXPECT_EQ(gv[size_t(r * k + i)], key(order[size_t(i)]));
          } else {
            EXPECT_EQ(gi[size_t(r * k + i)], 0xFFFFFFFFu);
            EXPECT_EQ(gv[size_t(r * k + i)], -INFINITY);
          }
        }
      }
    }
  }
}

TEST(Logits, LogsumexpWithTemperature) {
  const int64_t rows = 2, cols = 32064;
  auto xv = random_floats(size_t(rows * cols), 8, -20, 20);
  Tensor x = upload_f32(xv, {rows, cols});
  for (float inv_temp : {1.0f, 1.0f / 0.7f}) {
    for (bool sg : subgroup_settings()) {
      Tensor out = poisoned_f32({rows});
      Variant v;
      v.subgroup = sg;
      run([&](gpu::Recorder& rec) { gpu::logsumexp(rec, Mat::of(x), inv_temp, out, v); });
      std::vector<double> want;
      for (int64_t r = 0; r < rows; ++r) {
        double m = -INFINITY, s = 0;
        for (int64_t c = 0; c < cols; ++c) m = std::max(m, double(xv[size_t(r * cols + c)]) * inv_temp);
        for (int64_t c = 0; c < cols; ++c) s += std::exp(double(xv[size_t(r * cols + c)]) * inv_temp - m);
        want.push_back(m + std::log(s));
      }
      EXPECT_LE(nmse(ctx().read<float>(out), want), kTolF32);
    }
  }
}

TEST(Logits, RepetitionPenalty) {
  auto xv = random_floats(100, 3, -5, 5);
  Tensor x = upload_f32(xv, {1, 100});
  const std::vector<int32_t> ids = {0, 17, 99, 42};
  Tensor idt = upload_i32(ids);
  run([&](gpu::Recorder& rec) { gpu::repeat_penalty(rec, Mat::of(x), idt, int64_t(ids.size()), 1.3f); });
  std::vector<double> want(xv.begin(), xv.end());
  for (int32_t id : ids) want[size_t(id)] = xv[size_t(id)] < 0 ? xv[size_t(id)] * 1.3 : xv[size_t(id)] / 1.3;
  EXPECT_LE(nmse(ctx().read<float>(x), want), kTolF32);
}

}  // namespace
}  // namespace vkvlm::test
