#include "gpu/ops.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "gpu/error.h"
#include "gpu/shader_variants.h"
#include "shaders/push_constants.h"

namespace vkvlm::gpu {
namespace {

// Rows per dispatch are also bounded by the grid limit.
constexpr int64_t k_max_grid_rows = 65535;
// matmul_lanes.comp: rows of x per workgroup and output columns per invocation (measured on
// lavapipe: 4 columns run 2-3x faster than 1, 8 no faster; 8 rows beat 4 for large M).
constexpr int64_t k_lanes_rows = 8;
constexpr uint32_t k_lanes_cols = 4;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

uint32_t u32(int64_t v, const char* what) {
  if (v < 0 || v > int64_t(UINT32_MAX)) fail("internal: ", what, " = ", v, " does not fit 32 bits");
  return uint32_t(v);
}

struct Limits {
  uint64_t binding;  // usable bytes per binding after aligning its start down
  uint64_t align;
};

Limits limits(Recorder& rec) {
  const auto& pr = rec.context().profile();
  uint64_t align = std::max<uint64_t>(pr.min_storage_offset_alignment, 16);
  if (pr.max_binding_bytes <= 2 * align) fail("the device's storage-buffer binding limit is too small");
  return {pr.max_binding_bytes - align, align};
}

// A binding covering bytes [first, end) of a tensor; `shift` is the element offset of `first`
// from the (aligned-down) start of the binding.
struct Bound {
  Binding binding;
  uint32_t shift = 0;
};

Bound bind_bytes(Recorder& rec, uint32_t slot, const Tensor& t, uint64_t first, uint64_t end, bool writes,
                 uint64_t elem_bytes) {
  Limits lim = limits(rec);
  uint64_t start = first / lim.align * lim.align;
  uint64_t range = std::min<uint64_t>((std::max(end, first + 1) - start + 3) / 4 * 4, t.capacity() - start);
  if (range > rec.context().profile().max_binding_bytes)
    fail("internal: binding of ", t.name(), " spans ", range, " bytes, more than the device binds at once");
  Bound b;
  b.binding = {slot, t.buffer(), start, range, writes};
  b.shift = u32(int64_t((first - start) / elem_bytes), "binding shift");
  return b;
}

uint64_t esize(const Tensor& t) { return dtype_size(t.dtype()); }

Bound bind_mat(Recorder& rec, uint32_t slot, const Mat& m, bool writes) {
  const uint64_t es = esize(m.t);
  const uint64_t first = uint64_t(m.offset) * es;
  const uint64_t last = uint64_t(m.offset + (m.rows > 0 ? (m.rows - 1) * m.stride : 0) + m.cols) * es;
  return bind_bytes(rec, slot, m.t, first, last, writes, es);
}

Bound bind_whole(Recorder& rec, uint32_t slot, const Tensor& t, bool writes) {
  return bind_bytes(rec, slot, t, 0, t.bytes(), writes, esize(t));
}

// How many rows of m one binding can hold.
int64_t rows_per_binding(Recorder& rec, const Mat& m) {
  const uint64_t es = esize(m.t);
  const uint64_t lim = limits(rec).binding / es;
  if (uint64_t(m.cols) > lim) fail("a single row of ", m.t.name(), " (", m.cols, " values) is larger than one binding");
  if (m.stride == 0) return m.rows;
  return std::max<int64_t>(1, int64_t((lim - uint64_t(m.cols)) / uint64_t(m.stride)) + 1);
}

void check_mat(const Mat& m, const char* what) {
  if (!m.t.valid()) fail("internal: ", what, " has no tensor");
  if (m.rows < 0 || m.cols < 0 || m.offset < 0 || m.stride < 0)
    fail("internal: ", what, " view of ", m.t.name(), " is negative");
  if (m.rows == 0) return;
  if (m.stride != 0 && m.stride < m.cols) fail("internal: ", what, " rows of ", m.t.name(), " overlap");
  int64_t end = m.offset + (m.rows - 1) * m.stride + m.cols;
  if (end > m.t.numel())
    fail("internal: ", what, " view [", m.rows, " x ", m.cols, " @", m.offset, " stride ", m.stride,
         "] is outside tensor ", m.t.name(), " ", m.t.shape_string());
}

void check_f32(const Mat& m, const char* what) {
  check_mat(m, what);
  if (m.t.dtype() != DType::F32) fail("internal: ", what, " (", m.t.name(), ") must be f32, is ", dtype_name(m.t.dtype()));
}

uint32_t pick_wg(Recorder& rec, uint32_t want) {
  uint32_t maxwg = rec.context().profile().max_workgroup_size;
  uint32_t wg = 1;
  while (wg * 2 <= std::min(want, maxwg)) wg *= 2;
  return wg;
}

bool use_subgroup(Recorder& rec, const Variant& v) { return v.subgroup && rec.context().profile().subgroup; }

// Reduction workgroup size: a few subgroups wide.
uint32_t reduce_wg(Recorder& rec) {
  const auto& pr = rec.context().profile();
  return pick_wg(rec, std::clamp<uint32_t>(pr.max_subgroup_size * 4, 64, 256));
}

// Calls fn(first_row, count) over chunks of at most `chunk` rows.
template <typename F>
void for_chunks(int64_t rows, int64_t chunk, F&& fn) {
  chunk = std::max<int64_t>(1, chunk);
  for (int64_t r = 0; r < rows; r += chunk) fn(r, std::min(chunk, rows - r));
}

const char* w_suffix(WeightFormat f) {
  switch (f) {
    case WeightFormat::F32: return "f32";
    case WeightFormat::F16: return "f16";
    case WeightFormat::BF16: return "bf16";
    case WeightFormat::Q4: return "q4";
    case WeightFormat::Q8: return "q8";
  }
  return "?";
}

// A weight's data, scales and biases as row views, and how many rows one binding holds of all.
struct WeightRows {
  Mat data, scales, biases;
  int64_t rows_per_chunk = 0;
};

WeightRows weight_rows(Recorder& rec, const Weight& w) {
  WeightRows r;
  r.data = Mat::of(w.data, w.n, w.row_elems());
  r.rows_per_chunk = rows_per_binding(rec, r.data);
  if (w.quantized()) {
    r.scales = Mat::of(w.scales, w.n, w.k / w.group_size);
    r.biases = Mat::of(w.biases, w.n, w.k / w.group_size);
    r.rows_per_chunk = std::min(r.rows_per_chunk, rows_per_binding(rec, r.scales));
  }
  return r;
}


}  // namespace

Mat Mat::of(const Tensor& t) {
  Mat m;
  m.t = t;
  m.cols = t.shape().empty() ? 1 : t.shape().back();
  m.rows = m.cols ? t.numel() / m.cols : 0;
  m.stride = m.cols;
  return m;
}

Mat Mat::of(const Tensor& t, int64_t rows, int64_t cols) {
  Mat m;
  m.t = t;
  m.rows = rows;
  m.cols = cols;
  m.stride = cols;
  check_mat(m, "matrix");
  return m;
}

Mat Mat::row_range(int64_t first, int64_t count) const {
  if (first < 0 || count < 0 || first + count > rows)
    fail("internal: rows [", first, ", ", first + count, ") of a ", rows, "-row view of ", t.name());
  Mat m = *this;
  m.offset = offset + first * stride;
  m.rows = count;
  return m;
}

Mat Mat::col_range(int64_t first, int64_t count) const {
  if (first < 0 || count < 0 || first + count > cols)
    fail("internal: columns [", first, ", ", first + count, ") of a ", cols, "-column view of ", t.name());
  Mat m = *this;
  m.offset = offset + first;
  m.cols = count;
  return m;
}

const char* weight_format_name(WeightFormat f) { return w_suffix(f); }

int64_t Weight::row_elems() const { return quantized() ? k * bits() / 32 : k; }

uint64_t Weight::bytes() const {
  uint64_t b = data.valid() ? data.bytes() : 0;
  if (scales.valid()) b += scales.bytes();
  if (biases.valid()) b += biases.bytes();
  return b;
}

// ---------------------------------------------------------------------------------------------
// matmul

void matmul(Recorder& rec, const Mat& x, const Weight& w, const Tensor* bias, const Mat& y, bool accumulate,
            const Variant& var) {
  check_mat(x, "matmul x");
  check_f32(y, "matmul y");
  if (x.t.dtype() != DType::F32 && x.t.dtype() != DType::F16)
    fail("internal: matmul x must be f32 or f16, is ", dtype_name(x.t.dtype()));
  const bool x16 = x.t.dtype() == DType::F16;
  if (x16 && !rec.context().profile().storage16)
    fail("internal: f16 activations need the 16-bit storage feature, which this device lacks or is masked");
  if (x.cols != w.k) fail("matmul ", w.name, ": x has ", x.cols, " columns, weight expects ", w.k);
  if (y.rows != x.rows || y.cols != w.n)
    fail("matmul ", w.name, ": y is [", y.rows, " x ", y.cols, "], expected [", x.rows, " x ", w.n, "]");
  if (w.quantized()) {
    if (w.group_size != 32 && w.group_size != 64 && w.group_size != 128)
      fail("weight ", w.name, ": quantization group size ", w.group_size, " is not 32, 64 or 128");
    if (w.k % w.group_size) fail("weight ", w.name, ": k = ", w.k, " is not a multiple of the group size");
  }
  if (bias && (bias->dtype() != DType::F32 || bias->numel() < w.n)) fail("internal: bias of ", w.name, " must be f32 [n]");
  const int64_t M = x.rows, N = w.n, K = w.k;
  if (M == 0 || N == 0) return;

  // CPU devices: see matmul_lanes.comp for why one kernel shaped for SIMD lanes serves every M.
  const bool lanes = var.matmul == Variant::Matmul::Lanes ||
                     (var.matmul == Variant::Matmul::Auto && decode_matmul(rec.context()) == Variant::Matmul::Lanes);
  const bool gemv = !lanes && (var.matmul == Variant::Matmul::Gemv || (var.matmul == Variant::Matmul::Auto && M <= 8));
  bool coop = var.matmul == Variant::Matmul::Coopmat;
  if (coop && (x16 || !coopmat_usable(rec.context())))
    fail("internal: the cooperative-matrix GEMM is not available here (device, f16 input or failed self-check)");
  if (var.matmul == Variant::Matmul::Auto && !lanes && !gemv && !x16 && M >= 64) coop = coopmat_usable(rec.context());
  const bool sg = use_subgroup(rec, var);
  const variant::MatmulKernel kernel = coop    ? variant::MatmulKernel::Coopmat
                                      : lanes ? variant::MatmulKernel::Lanes
                                      : gemv  ? variant::MatmulKernel::Gemv
                                              : variant::MatmulKernel::Gemm;
  const std::string shader = variant::matmul(kernel, w.format, x16, gemv && sg);

  // Split W by output rows so that each chunk (and its scales) fits one binding.
  const WeightRows wr = weight_rows(rec, w);
  const Mat& wmat = wr.data;
  const Mat &smat = wr.scales, &bmat = wr.biases;
  int64_t n_chunk = wr.rows_per_chunk;
  // Keep W chunk starts 16-byte aligned so vector loads stay aligned.
  const uint64_t wrow_bytes = uint64_t(wmat.cols) * esize(w.data);
  if (n_chunk < N) {
    int64_t step = 1;
    while ((uint64_t(step) * wrow_bytes) % 16) ++step;
    n_chunk = std::max<int64_t>(step, n_chunk / step * step);
  }

  const uint32_t chunk_elems = w.quantized() ? 32 : (w.format == WeightFormat::F32 ? 4 : 8);
  const uint32_t wvec_unit = w.quantized() ? 4 : chunk_elems;  // alignment the vector view needs, in data elements

  for_chunks(N, n_chunk, [&](int64_t n0, int64_t nn) {
    Mat wc = wmat.row_range(n0, nn);
    Mat yc_all = y.col_range(n0, nn);
    int64_t m_chunk = std::min(rows_per_binding(rec, x), rows_per_binding(rec, yc_all));
    if (gemv) m_chunk = std::min<int64_t>(m_chunk, 8);
    if (lanes) m_chunk = std::min<int64_t>(m_chunk, k_lanes_rows * k_max_grid_rows);
    for_chunks(M, m_chunk, [&](int64_t m0, int64_t mm) {
      Mat xc = x.row_range(m0, mm);
      Mat yc = yc_all.row_range(m0, mm);
      Bound bx = bind_mat(rec, 0, xc, false);
      Bound bw = bind_mat(rec, 1, wc, false);
      Bound by = bind_mat(rec, 5, yc, true);
      std::vector<Binding> bindings = {bx.binding, bw.binding, by.binding};
      push::Matmul pc{};
      pc.M = u32(mm, "M");
      pc.N = u32(nn, "N");
      pc.K = u32(K, "K");
      pc.x_off = bx.shift;
      pc.x_stride = u32(xc.stride, "x stride");
      pc.w_off = bw.shift;
      pc.w_stride = u32(wc.stride, "w stride");
      pc.y_off = by.shift;
      pc.y_stride = u32(yc.stride, "y stride");
      pc.group_size = uint32_t(w.group_size);
      if (w.quantized()) {
        Bound bs = bind_mat(rec, 2, smat.row_range(n0, nn), false);
        Bound bb = bind_mat(rec, 3, bmat.row_range(n0, nn), false);
        if (bs.shift != bb.shift) {
          // Scales and biases are separate tensors of one shape: their shifts agree unless their
          // buffers differ in alignment, which sub-allocation never produces.
          fail("internal: scale/bias alignment of ", w.name, " differs");
        }
        bindings.push_back(bs.binding);
        bindings.push_back(bb.binding);
        pc.s_off = bs.shift;
        pc.s_stride = u32(w.k / w.group_size, "scale stride");
      }
      if (bias) {
        Bound bb = bind_bytes(rec, 4, *bias, uint64_t(n0) * 4, uint64_t(n0 + nn) * 4, false, 4);
        bindings.push_back(bb.binding);
        pc.bias_off = bb.shift;
        pc.flags |= 1;
      } else {
        // The bias slot is declared but not read: any valid range will do.
        bindings.push_back({4, bw.binding.buffer, bw.binding.offset, std::min<uint64_t>(16, bw.binding.range), false});
      }
      if (accumulate) pc.flags |= 2;
      const bool wvec = (K % chunk_elems == 0) && (pc.w_off % wvec_unit == 0) && (pc.w_stride % wvec_unit == 0);
      if (w.quantized() && !wvec) fail("internal: quantized weight ", w.name, " is misaligned");
      if (wvec) pc.flags |= 4;
      if (pc.x_off % 4 == 0 && pc.x_stride % 4 == 0) pc.flags |= 8;

      if (coop) {
        const auto& pl = rec.context().pipelines().get(shader, {128, w.scales_bf16 ? 1u : 0u});
        rec.dispatch(pl, bindings, &pc, sizeof(pc), uint32_t(ceil_div(nn, 64)), uint32_t(ceil_div(mm, 64)));
      } else if (lanes) {
        const uint32_t wg = pick_wg(rec, 64);
        const uint32_t nx = uint32_t(std::min<int64_t>(mm, k_lanes_rows));
        const uint32_t x_vec4 = (pc.flags & 8) ? 1u : 0u;
        const auto& pl = rec.context().pipelines().get(shader, {wg, nx, w.scales_bf16 ? 1u : 0u, x_vec4, k_lanes_cols});
        const int64_t groups = ceil_div(nn, int64_t(wg) * k_lanes_cols);
        const int64_t gx = std::min<int64_t>(groups, k_max_grid_rows);
        rec.dispatch(pl, bindings, &pc, sizeof(pc), uint32_t(gx), uint32_t(ceil_div(groups, gx)), uint32_t(ceil_div(mm, nx)));
      } else if (gemv) {
        const uint32_t rows_per_wg = 2;
        const uint32_t wg = pick_wg(rec, std::clamp<uint32_t>(rec.context().profile().max_subgroup_size * 4, 64, 256));
        const auto& pl = rec.context().pipelines().get(shader, {wg, rows_per_wg, uint32_t(mm), w.scales_bf16 ? 1u : 0u});
        const int64_t groups = ceil_div(nn, rows_per_wg);
        const int64_t gx = std::min<int64_t>(groups, k_max_grid_rows);
        rec.dispatch(pl, bindings, &pc, sizeof(pc), uint32_t(gx), uint32_t(ceil_div(groups, gx)));
      } else {
        uint32_t bm = 64, bn = 64, tm = 4, tn = 4;
        if (rec.context().profile().max_workgroup_size < 256) tm = 8;
        const uint32_t wg = (bm / tm) * (bn / tn);
        const auto& pl = rec.context().pipelines().get(shader, {wg, bm, bn, tm, tn, w.scales_bf16 ? 1u : 0u});
        rec.dispatch(pl, bindings, &pc, sizeof(pc), uint32_t(ceil_div(nn, bn)), uint32_t(ceil_div(mm, bm)));
      }
    });
  });
}

Variant::Matmul decode_matmul(Context& ctx) {
  return ctx.profile().device_type == VK_PHYSICAL_DEVICE_TYPE_CPU ? Variant::Matmul::Lanes : Variant::Matmul::Gemv;
}

bool coopmat_usable(Context& ctx) {
  const auto& pr = ctx.profile();
  if (!pr.coopmat || pr.subgroup_size != 32 || pr.max_workgroup_size < 128 || pr.max_shared_memory < 24 * 1024) return false;
  bool shape = false;
  for (auto& s : pr.coopmat_shapes)
    shape = shape || (s.m == 16 && s.n == 16 && s.k == 16 && s.a_type == "f16" && s.b_type == "f16" && s.c_type == "f32");
  if (!shape) return false;
  return ctx.once("coopmat self-check", [&] {
    // A product with edges in every dimension, against the tiled GEMM on the same device.
    const int64_t M = 70, N = 97, K = 96;
    std::vector<float> xv(size_t(M * K)), wv(size_t(N * K));
    uint32_t state = 17;
    for (auto* v : {&xv, &wv})
      for (auto& e : *v) {
        state = state * 1664525u + 1013904223u;
        e = float(int(state >> 20) - 2048) / 2048.0f;
      }
    Weight w;
    w.format = WeightFormat::F32;
    w.n = N;
    w.k = K;
    w.name = "cooperative-matrix self-check";
    w.data = ctx.tensor(DType::F32, {N, K}, w.name);
    ctx.upload(w.data, wv.data(), wv.size() * 4);
    Tensor x = ctx.tensor(DType::F32, {M, K}, "self-check x"), a = ctx.tensor(DType::F32, {M, N}, "self-check tiled"),
           b = ctx.tensor(DType::F32, {M, N}, "self-check coopmat");
    ctx.upload(x, xv.data(), xv.size() * 4);
    Recorder rec(ctx);
    Variant tiled;
    tiled.matmul = Variant::Matmul::Gemm;
    gpu::matmul(rec, Mat::of(x), w, nullptr, Mat::of(a), false, tiled);
    // Dispatched directly: matmul's coopmat path would ask for this very verdict.
    push::Matmul pc{};
    pc.M = uint32_t(M);
    pc.N = uint32_t(N);
    pc.K = uint32_t(K);
    pc.x_stride = uint32_t(K);
    pc.w_stride = uint32_t(K);
    pc.y_stride = uint32_t(N);
    Bound bx = bind_whole(rec, 0, x, false), bw = bind_whole(rec, 1, w.data, false), by = bind_whole(rec, 5, b, true);
    Binding bias{4, bw.binding.buffer, bw.binding.offset, 16, false};
    rec.dispatch(ctx.pipelines().get(variant::matmul(variant::MatmulKernel::Coopmat, WeightFormat::F32, false, false), {128, 0u}), {bx.binding, bw.binding, bias, by.binding}, &pc,
                 sizeof(pc), uint32_t(ceil_div(N, 64)), uint32_t(ceil_div(M, 64)));
    rec.submit();
    auto va = ctx.read<float>(a), vb = ctx.read<float>(b);
    double num = 0, den = 0;
    for (size_t i = 0; i < va.size(); ++i) {
      num += double(vb[i] - va[i]) * double(vb[i] - va[i]);
      den += double(va[i]) * double(va[i]);
    }
    const bool ok = std::isfinite(num) && num <= 1e-5 * den;
    if (!ok)
      std::fprintf(stderr, "vkvlm: warning: the cooperative-matrix GEMM disagrees with the tiled GEMM on %s; not using it\n",
                   pr.device_name.c_str());
    return ok;
  });
}

// ---------------------------------------------------------------------------------------------
// normalization

namespace {

void norm(Recorder& rec, bool rms, const Mat& x, const Tensor& weight, const Tensor* bias, float eps, bool plus_one,
          const Mat& y, const Variant& var) {
  check_f32(x, "norm x");
  check_f32(y, "norm y");
  if (x.rows != y.rows || x.cols != y.cols) fail("internal: norm shapes differ");
  if (weight.dtype() != DType::F32 || weight.numel() < x.cols) fail("internal: norm weight must be f32 [cols]");
  if (bias && (bias->dtype() != DType::F32 || bias->numel() < x.cols)) fail("internal: norm bias must be f32 [cols]");
  const bool sg = use_subgroup(rec, var);
  const std::string shader = variant::norm(rms, sg);
  const uint32_t wg = reduce_wg(rec);
  const auto& pl = rec.context().pipelines().get(shader, {wg});
  int64_t chunk = std::min({rows_per_binding(rec, x), rows_per_binding(rec, y), k_max_grid_rows * 64});
  for_chunks(x.rows, chunk, [&](int64_t r0, int64_t n) {
    Bound bx = bind_mat(rec, 0, x.row_range(r0, n), false);
    Bound by = bind_mat(rec, 3, y.row_range(r0, n), true);
    Bound bw = bind_whole(rec, 1, weight, false);
    std::vector<Binding> b = {bx.binding, by.binding, bw.binding};
    push::Norm pc{u32(n, "rows"), u32(x.cols, "cols"), bx.shift, u32(x.stride, "stride"), by.shift,
                u32(y.stride, "stride"), bw.shift, 0, eps, plus_one ? 1u : 0u};
    if (bias) {
      Bound bb = bind_whole(rec, 2, *bias, false);
      b.push_back(bb.binding);
      pc.b_off = bb.shift;
    }
    const int64_t gx = std::min<int64_t>(n, k_max_grid_rows);
    rec.dispatch(pl, b, &pc, sizeof(pc), uint32_t(gx), uint32_t(ceil_div(n, gx)));
  });
}
}  // namespace

void rmsnorm(Recorder& rec, const Mat& x, const Tensor& weight, float eps, bool plus_one, const Mat& y,
             const Variant& v) {
  norm(rec, true, x, weight, nullptr, eps, plus_one, y, v);
}

void layernorm(Recorder& rec, const Mat& x, const Tensor& weight, const Tensor& bias, float eps, const Mat& y,
               const Variant& v) {
  norm(rec, false, x, weight, &bias, eps, false, y, v);
}

// ---------------------------------------------------------------------------------------------
// RoPE and the KV cache

std::vector<float> rope_table(int64_t n_positions, int rot_dim, double theta, const std::vector<double>& factors,
                              double attn_scale) {
  if (rot_dim <= 0 || rot_dim % 2) fail("rotary dimension ", rot_dim, " must be a positive even number");
  const int half = rot_dim / 2;
  if (!factors.empty() && int(factors.size()) != half)
    fail("rope scaling has ", factors.size(), " factors; the rotary dimension ", rot_dim, " needs ", half);
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int i = 0; i < half; ++i) {
    double f = factors.empty() ? 1.0 : factors[size_t(i)];
    inv_freq[size_t(i)] = 1.0 / (f * std::pow(theta, 2.0 * i / rot_dim));
  }
  std::vector<float> table(size_t(n_positions) * size_t(half) * 2);
  for (int64_t p = 0; p < n_positions; ++p)
    for (int i = 0; i < half; ++i) {
      double a = double(p) * inv_freq[size_t(i)];
      table[(size_t(p) * half + i) * 2] = float(std::cos(a) * attn_scale);
      table[(size_t(p) * half + i) * 2 + 1] = float(std::sin(a) * attn_scale);
    }
  return table;
}

RopeSections RopeSections::of_sizes(const std::vector<int>& sizes, int rot_dim) {
  if (sizes.empty() || sizes.size() > 4) fail("rope sections: 1 to 4 sections, not ", sizes.size());
  RopeSections r;
  r.count = int(sizes.size());
  int sum = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] < 0) fail("rope sections must not be negative");
    sum += sizes[i];
    r.bounds[i] = sum;
  }
  if (sum != rot_dim / 2)
    fail("rope sections add up to ", sum, " frequencies, but the rotary dimension ", rot_dim, " has ", rot_dim / 2);
  return r;
}

void rope(Recorder& rec, const Mat& x, int heads, int head_dim, int rot_dim, RopeMode mode, const Tensor& table,
          const Tensor& positions, int64_t first, const RopeSections& sec) {
  check_f32(x, "rope x");
  if (int64_t(heads) * head_dim > x.cols) fail("internal: rope heads exceed the row");
  if (rot_dim > head_dim || rot_dim % 2) fail("internal: rope rotary dimension ", rot_dim, " is invalid");
  if (table.dtype() != DType::F32) fail("internal: rope table must be f32");
  if (positions.dtype() != DType::I32) fail("internal: rope positions must be i32");
  if (sec.count < 1 || sec.count > 4) fail("internal: rope takes 1 to 4 positions per token");
  if (first < 0 || (first + x.rows) * sec.count > positions.numel())
    fail("internal: rope positions ", positions.shape_string(), " do not cover rows ", first, "..", first + x.rows);
  const int64_t half = rot_dim / 2;
  const int64_t n_positions = table.numel() / (half * 2);
  Mat tmat = Mat::of(table, n_positions, half * 2);
  const int64_t pos_chunk = rows_per_binding(rec, tmat);
  const int64_t t_chunk = std::min(rows_per_binding(rec, x), k_max_grid_rows);
  const uint32_t wg = pick_wg(rec, 64);
  const auto& pl = rec.context().pipelines().get(variant::k_rope, {wg});
  push::Rope pc;
  auto bound = [&](int i) { return uint32_t(std::min<int64_t>(sec.bounds[i], half)); };
  for_chunks(x.rows, t_chunk, [&](int64_t t0, int64_t tn) {
    Bound bx = bind_mat(rec, 0, x.row_range(t0, tn), true);
    Bound bp = bind_whole(rec, 1, positions, false);
    for_chunks(n_positions, pos_chunk, [&](int64_t p0, int64_t pn) {
      Bound bt = bind_mat(rec, 2, tmat.row_range(p0, pn), false);
      if (p0 + pn > int64_t(INT32_MAX)) fail("internal: rope table has too many positions");
      pc = {u32(tn, "T"), uint32_t(heads), uint32_t(head_dim), uint32_t(rot_dim), bx.shift, u32(x.stride, "stride"),
            bp.shift + u32((first + t0) * sec.count, "positions offset"), uint32_t(sec.count), bound(0), bound(1),
            bound(2), uint32_t(mode), int32_t(p0), int32_t(p0 + pn), bt.shift / 2};
      rec.dispatch(pl, {bx.binding, bp.binding, bt.binding}, &pc, sizeof(pc), uint32_t(ceil_div(half, wg)),
                   uint32_t(heads), uint32_t(tn));
    });
  });
}

KvMat KvMat::quantized(const Tensor& data, const Tensor& params, int bits, int group_size, int64_t width) {
  if ((bits != 4 && bits != 8) || group_size <= 0 || width % group_size || group_size % (32 / bits))
    fail("internal: quantized KV of ", bits, " bits, group ", group_size, ", width ", width);
  const int64_t words = width * bits / 32, groups = width / group_size;
  if (data.dtype() != DType::U32 || params.dtype() != DType::U32 || data.numel() % words ||
      params.numel() != data.numel() / words * groups)
    fail("internal: quantized KV tensors ", data.name(), " and ", params.name(), " do not match their layout");
  KvMat m;
  m.data = Mat::of(data, data.numel() / words, words);
  m.params = Mat::of(params, data.numel() / words, groups);
  m.bits = bits;
  m.group_size = group_size;
  return m;
}

KvMat KvMat::row_range(int64_t first, int64_t count) const {
  KvMat m = *this;
  m.data = data.row_range(first, count);
  if (bits) m.params = params.row_range(first, count);
  return m;
}

namespace {
// Rows of a KV segment one binding holds (data and params alike).
int64_t kv_rows_per_binding(Recorder& rec, const KvMat& m) {
  int64_t n = rows_per_binding(rec, m.data);
  if (m.bits) n = std::min(n, rows_per_binding(rec, m.params));
  return n;
}

void check_kv_segment(const KvMat& m, int64_t width, const char* what) {
  check_mat(m.data, what);
  if (m.width() != width) fail("internal: ", what, " rows hold ", m.width(), " values, not ", width);
  if (m.bits) {
    check_mat(m.params, what);
    if (m.data.t.dtype() != DType::U32 || m.params.t.dtype() != DType::U32 || m.params.rows != m.data.rows ||
        m.params.cols * m.group_size != width)
      fail("internal: ", what, " quantized layout does not match");
  }
}

const char* kv_kind(const KvMat& m) {
  if (m.bits == 4) return "q4";
  if (m.bits == 8) return "q8";
  return m.data.t.dtype() == DType::F16 ? "kv16" : "kv32";
}
}  // namespace

void kv_append(Recorder& rec, const Mat& src, const KvRows& cache, const Tensor& first_row, int index) {
  check_f32(src, "kv_append source");
  const int64_t kv_dim = src.cols;
  if (kv_dim % 2) fail("internal: kv_append needs an even row width");
  const int64_t t_chunk = std::min(rows_per_binding(rec, src), k_max_grid_rows);
  const uint32_t wg = pick_wg(rec, 64);
  push::KvAppend pc;
  int64_t base = 0;  // the segment's first cache row
  for (const KvMat& seg : cache) {
    check_kv_segment(seg, kv_dim, "KV cache");
    if (!seg.bits && seg.data.t.dtype() != DType::F16) fail("internal: the KV cache must be f16 or quantized");
    if (seg.data.stride != seg.data.cols || (seg.bits && seg.params.stride != seg.params.cols))
      fail("internal: KV cache segments must be dense");
    const auto& pl = rec.context().pipelines().get(variant::kv_append(seg.bits ? seg.bits : 16), {wg});
    const int64_t row_chunk = kv_rows_per_binding(rec, seg);
    const int64_t row_words = seg.bits ? seg.data.cols : kv_dim / 2;  // 32-bit words per cache row
    const int64_t groups = seg.bits ? kv_dim / seg.group_size : 0;
    for_chunks(src.rows, t_chunk, [&](int64_t t0, int64_t tn) {
      Bound bsrc = bind_mat(rec, 0, src.row_range(t0, tn), false);
      Bound brow = bind_whole(rec, 1, first_row, false);
      for_chunks(seg.rows(), row_chunk, [&](int64_t r0, int64_t rn) {
        const KvMat part = seg.row_range(r0, rn);
        Bound bc = bind_mat(rec, 2, part.data, true);
        Bound bp = seg.bits ? bind_mat(rec, 3, part.params, true) : bc;
        bp.binding.slot = 3;
        if (!seg.bits && bc.shift % 2) fail("internal: KV cache rows are not word aligned");
        // Source row t0 + t goes to cache row first + t0 + t: express the window relative to first + t0.
        int64_t lo = base + r0 - t0, hi = base + r0 + rn - t0;
        uint32_t off = seg.bits ? bc.shift : bc.shift / 2, poff = bp.shift;
        if (lo < 0) {
          off += u32(-lo * row_words, "cache offset");
          poff += u32(-lo * groups, "cache offset");
          lo = 0;
        }
        if (hi <= 0) return;
        pc = {u32(tn, "T"), u32(kv_dim, "kv_dim"), bsrc.shift, u32(src.stride, "stride"), brow.shift + uint32_t(index),
              u32(lo, "row"), u32(hi, "row"), off, poff, uint32_t(seg.group_size)};
        std::vector<Binding> b = {bsrc.binding, brow.binding, bc.binding};
        if (seg.bits) b.push_back(bp.binding);
        rec.dispatch(pl, b, &pc, sizeof(pc), uint32_t(ceil_div(seg.bits ? groups : kv_dim / 2, wg)), uint32_t(tn));
      });
    });
    base += seg.rows();
  }
}

// ---------------------------------------------------------------------------------------------
// attention

void attention(Recorder& rec, const Mat& q, const KvRows& k, const KvRows& v, const Mat& out, const Tensor& first_row,
               int index, const AttentionParams& ap, const Variant& var) {
  check_f32(q, "attention q");
  check_f32(out, "attention out");
  const int64_t D = ap.head_dim, H = ap.heads, HKV = ap.kv_heads;
  if (H <= 0 || HKV <= 0 || H % HKV) fail("internal: attention needs heads divisible by kv heads (", H, ", ", HKV, ")");
  if (D <= 0 || D > 256) fail("attention head_dim ", D, " is outside 1..256");
  if (q.cols < H * D || out.cols < H * D) fail("internal: attention rows are narrower than heads * head_dim");
  if (out.rows != q.rows) fail("internal: attention out rows differ from q rows");
  if (k.size() != v.size() || k.empty()) fail("internal: attention k and v are segmented differently");
  int64_t keys = 0;
  for (size_t s = 0; s < k.size(); ++s) {
    const KvMat &ks = k[s], &vs = v[s];
    check_mat(ks.data, "attention k");
    check_mat(vs.data, "attention v");
    if (ks.width() < HKV * D || vs.width() < HKV * D) fail("internal: attention rows are narrower than heads * head_dim");
    if (std::string(kv_kind(ks)) != kv_kind(vs) || ks.group_size != vs.group_size ||
        (!ks.bits && ks.data.t.dtype() != DType::F16 && ks.data.t.dtype() != DType::F32))
      fail("internal: attention k and v must be stored alike, in f32, f16 or quantized");
    if (ks.bits) {
      check_kv_segment(ks, ks.width(), "attention k");
      check_kv_segment(vs, vs.width(), "attention v");
      if (D % ks.group_size) fail("internal: quantized KV groups must not straddle heads");
    }
    if (ks.rows() != vs.rows()) fail("internal: attention k and v hold different numbers of keys");
    keys += ks.rows();
  }
  const int64_t T = q.rows;
  if (T == 0) return;
  if (keys == 0) fail("internal: attention over zero keys");
  if (ap.window < 0) fail("internal: negative attention window");
  if (ap.spans.valid() && (ap.spans.dtype() != DType::I32 || ap.spans.numel() < (ap.spans_row + ap.T_total) * 2 ||
                           ap.spans_row < 0))
    fail("internal: attention spans must be I32 pairs for every query of the pass");
  const auto& prof = rec.context().profile();
  const bool rows_path = var.attention == Variant::Attention::Rows ||
                         (var.attention == Variant::Attention::Auto && T <= 4);
  if (ap.rotating && (!rows_path || ap.window || ap.spans.valid() || first_row.numel() < index + 2))
    fail("internal: rotating-cache attention is for the rows path without masks, with a row count beside the row");

  // Keys per binding, and how the keys split into partial results: a dispatch reads one
  // segment's keys within one binding.
  uint32_t split = var.keys_per_split ? var.keys_per_split : 512;
  struct KeyRange {
    size_t segment;
    int64_t first, count, local;  // the keys [first, first + count), from row `local` of the segment
  };
  std::vector<KeyRange> key_ranges;
  int64_t base = 0;
  for (size_t s = 0; s < k.size(); ++s) {
    const int64_t key_chunk = std::min(kv_rows_per_binding(rec, k[s]), kv_rows_per_binding(rec, v[s]));
    for_chunks(k[s].rows(), key_chunk, [&](int64_t j0, int64_t jn) { key_ranges.push_back({s, base + j0, jn, j0}); });
    base += k[s].rows();
  }
  int64_t n_parts = 0;
  for (auto& kr : key_ranges) n_parts += rows_path ? ceil_div(kr.count, split) : 1;
  const bool partial = n_parts > 1;

  int64_t q_chunk = std::min({rows_per_binding(rec, q), rows_per_binding(rec, out), k_max_grid_rows});
  if (partial) {
    const int64_t per_row = H * n_parts * (D + 2) * 4;
    q_chunk = std::min<int64_t>(q_chunk, int64_t(limits(rec).binding) / per_row);
    if (q_chunk < 1) fail("attention over ", keys, " keys needs more partial results than one binding holds");
  }

  // Tiled path: BR queries x BC keys per step, sized to the device's shared memory.
  uint32_t br = 16, bc = 32;
  auto tiled_shared = [&](uint32_t r, uint32_t c) { return 4ull * (r * D + c * D + r * c + 5 * r); };
  while (tiled_shared(br, bc) > prof.max_shared_memory && bc > 8) bc /= 2;
  while (tiled_shared(br, bc) > prof.max_shared_memory && br > 4) br /= 2;
  const uint32_t wg = pick_wg(rec, 128);
  auto pipeline = [&](const KvMat& m) -> const Pipeline& {
    const std::string shader = variant::attention(rows_path, kv_kind(m), rows_path && use_subgroup(rec, var));
    return rows_path ? rec.context().pipelines().get(shader, {wg, uint32_t(D), uint32_t(ceil_div(D, wg))})
                     : rec.context().pipelines().get(shader, {wg, br, bc, uint32_t(D), uint32_t(ceil_div(br * D, wg))});
  };

  push::Attention pc;
  static_assert(sizeof(pc) <= k_push_constant_bytes);

  for_chunks(T, q_chunk, [&](int64_t t0, int64_t tn) {
    Bound bq = bind_mat(rec, 0, q.row_range(t0, tn), false);
    Bound bo = bind_mat(rec, 4, out.row_range(t0, tn), true);
    Bound bs = bind_whole(rec, 3, first_row, false);
    // The span buffer: the spans' rows of this chunk of queries (or, unread, the row buffer).
    Bound bspan = ap.spans.valid() ? bind_whole(rec, 8, ap.spans, false) : bs;
    bspan.binding.slot = 8;
    Tensor parts;
    Binding bparts = bo.binding;
    bparts.slot = 5;
    if (partial) {
      parts = rec.scratch(DType::F32, {tn * H * n_parts * (D + 2)}, "attention partials");
      bparts = bind_whole(rec, 5, parts, true).binding;
    }
    int64_t part = 0;
    for (const KeyRange& kr : key_ranges) {
      const int64_t j0 = kr.first, jn = kr.count;
      const KvMat kp = k[kr.segment].row_range(kr.local, jn), vp = v[kr.segment].row_range(kr.local, jn);
      const bool kv16 = !kp.bits && kp.data.t.dtype() == DType::F16;
      Bound bk = bind_mat(rec, 1, kp.data, false);
      Bound bv = bind_mat(rec, 2, vp.data, false);
      if (kv16 && (bk.shift % 2 || bv.shift % 2 || kp.data.stride % 2 || vp.data.stride % 2 || D % 2))
        fail("internal: f16 keys and values must be word aligned");
      Bound bkp = kp.bits ? bind_mat(rec, 6, kp.params, false) : bk;
      Bound bvp = vp.bits ? bind_mat(rec, 7, vp.params, false) : bv;
      pc = {u32(tn, "T"), u32(H, "H"), u32(HKV, "HKV"), bq.shift, u32(q.stride, "q stride"), bk.shift,
            u32(kp.data.stride, "k stride"), bv.shift, u32(vp.data.stride, "v stride"), bo.shift, u32(out.stride, "o stride"),
            bs.shift + uint32_t(index), u32(j0, "key"), u32(j0 + jn, "key"),
            (ap.causal && !ap.rotating ? 1u : 0u) | (partial ? 2u : 0u) | (ap.rotating ? 4u : 0u) |
                (ap.spans.valid() ? 8u : 0u),
            u32(ap.window, "window"), ap.scale, u32(part, "part"),
            u32(n_parts, "parts"), u32(ap.q_t0 + t0, "q_t0"), u32(ap.T_total, "T_total"), split,
            bspan.shift + u32(ap.spans_row * 2, "span row"), bkp.shift, u32(kp.params.stride, "k params stride"),
            bvp.shift, u32(vp.params.stride, "v params stride"), uint32_t(kp.group_size)};
      std::vector<Binding> b = {bq.binding, bk.binding, bv.binding, bs.binding, bo.binding, bparts, bspan.binding};
      if (kp.bits) {
        b.push_back(bkp.binding);
        b.push_back(bvp.binding);
      }
      const Pipeline& pl = pipeline(kp);
      if (rows_path) {
        const int64_t splits = ceil_div(jn, split);
        rec.dispatch(pl, b, &pc, sizeof(pc), u32(splits, "splits"), u32(H, "H"), u32(tn, "T"));
        part += splits;
      } else {
        rec.dispatch(pl, b, &pc, sizeof(pc), u32(ceil_div(tn, br), "groups"), u32(H, "H"));
        part += 1;
      }
    }
    if (partial) {
      const auto& mpl = rec.context().pipelines().get(variant::k_attn_merge, {pick_wg(rec, 64)});
      push::AttnMerge mpc{u32(tn, "T"), u32(H, "H"), u32(D, "D"), u32(n_parts, "parts"), bo.shift, u32(out.stride, "o stride")};
      Binding bp = bparts;
      bp.slot = 0;
      bp.writes = false;
      Binding bout = bo.binding;
      bout.slot = 1;
      const int64_t rows = tn * H;
      const int64_t gx = std::min<int64_t>(rows, k_max_grid_rows);
      rec.dispatch(mpl, {bp, bout}, &mpc, sizeof(mpc), uint32_t(gx), uint32_t(ceil_div(rows, gx)));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// element-wise

namespace {
template <typename Push, typename MakePush>
void elementwise(Recorder& rec, const char* shader, uint32_t spec_op, std::vector<Mat> inputs, const Mat& y,
                 uint32_t cols_per_invocation, MakePush make_push) {
  int64_t chunk = std::min(rows_per_binding(rec, y), k_max_grid_rows);
  for (auto& m : inputs) chunk = std::min(chunk, rows_per_binding(rec, m));
  const uint32_t wg = pick_wg(rec, 64);
  const auto& pl = rec.context().pipelines().get(shader, {wg, spec_op});
  for_chunks(y.rows, chunk, [&](int64_t r0, int64_t n) {
    std::vector<Binding> b;
    std::vector<uint32_t> shifts;
    for (size_t i = 0; i < inputs.size(); ++i) {
      Mat part = inputs[i].stride == 0 ? inputs[i] : inputs[i].row_range(r0, n);
      if (inputs[i].stride == 0) part.rows = 1;
      Bound bi = bind_mat(rec, uint32_t(i), part, false);
      b.push_back(bi.binding);
      shifts.push_back(bi.shift);
    }
    Bound by = bind_mat(rec, uint32_t(inputs.size()), y.row_range(r0, n), true);
    b.push_back(by.binding);
    Push pc = make_push(uint32_t(n), shifts, by.shift);
    rec.dispatch(pl, b, &pc, sizeof(pc), uint32_t(ceil_div(ceil_div(y.cols, cols_per_invocation), wg)), uint32_t(n));
  });
}
}  // namespace

void unary(Recorder& rec, UnaryOp op, const Mat& x, const Mat& y, float alpha) {
  check_f32(x, "unary x");
  check_f32(y, "unary y");
  if (x.rows != y.rows || x.cols != y.cols) fail("internal: unary shapes differ");
  using Push = push::Unary;
  elementwise<Push>(rec, variant::k_unary, uint32_t(op), {x}, y, 1, [&](uint32_t n, const std::vector<uint32_t>& sh, uint32_t ys) {
    return Push{n, u32(x.cols, "cols"), sh[0], u32(x.stride, "stride"), ys, u32(y.stride, "stride"), alpha};
  });
}

void binary(Recorder& rec, BinaryOp op, const Mat& a, const Mat& b, const Mat& y) {
  check_f32(a, "binary a");
  check_f32(b, "binary b");
  check_f32(y, "binary y");
  if (a.cols != y.cols || b.cols != y.cols || (a.rows != y.rows && a.stride != 0) || (b.rows != y.rows && b.stride != 0))
    fail("internal: binary shapes differ");
  using Push = push::Binary;
  elementwise<Push>(rec, variant::k_binary, uint32_t(op), {a, b}, y, 1, [&](uint32_t n, const std::vector<uint32_t>& sh, uint32_t ys) {
    return Push{n, u32(y.cols, "cols"), sh[0], u32(a.stride, "stride"), sh[1], u32(b.stride, "stride"), ys,
                u32(y.stride, "stride")};
  });
}

void convert(Recorder& rec, const Mat& x, const Mat& y) {
  check_mat(x, "convert x");
  check_mat(y, "convert y");
  if (x.rows != y.rows || x.cols != y.cols) fail("internal: convert shapes differ");
  const std::string shader = variant::convert(x.t.dtype(), y.t.dtype());
  if (!PipelineRegistry::has_shader(shader)) fail("internal: no conversion from ", dtype_name(x.t.dtype()), " to ", dtype_name(y.t.dtype()));
  const bool pairs = y.t.dtype() == DType::F16;
  if (pairs && (y.offset % 2 || y.stride % 2 || y.cols % 2)) fail("internal: f16 conversion output must be word aligned");
  using Push = push::Convert;
  elementwise<Push>(rec, shader.c_str(), 0, {x}, y, pairs ? 2 : 1, [&](uint32_t n, const std::vector<uint32_t>& sh, uint32_t ys) {
    return Push{n, u32(x.cols, "cols"), sh[0], u32(x.stride, "stride"), ys, u32(y.stride, "stride")};
  });
}

// ---------------------------------------------------------------------------------------------
// gathers

void get_rows(Recorder& rec, const Weight& table, const Tensor& ids, int64_t ids_offset, int64_t n, const Mat& y) {
  check_f32(y, "get_rows y");
  if (ids.dtype() != DType::I32) fail("internal: token ids must be i32");
  if (y.rows != n || y.cols != table.k) fail("internal: get_rows output is [", y.rows, " x ", y.cols, "], expected [", n, " x ", table.k, "]");
  if (ids_offset + n > ids.numel()) fail("internal: get_rows ids out of range");
  if (n == 0) return;
  const WeightRows wr = weight_rows(rec, table);
  const Mat& wmat = wr.data;
  const Mat &smat = wr.scales, &bmat = wr.biases;
  const int64_t row_chunk = wr.rows_per_chunk;
  const std::string shader = variant::get_rows(table.format);
  const uint32_t wg = pick_wg(rec, 64);
  const auto& pl = rec.context().pipelines().get(shader, {wg, table.scales_bf16 ? 1u : 0u});
  push::GetRows pc;
  const int64_t id_chunk = std::min(rows_per_binding(rec, y), k_max_grid_rows);
  for_chunks(n, id_chunk, [&](int64_t i0, int64_t in) {
    Bound bid = bind_bytes(rec, 0, ids, uint64_t(ids_offset + i0) * 4, uint64_t(ids_offset + i0 + in) * 4, false, 4);
    Bound by = bind_mat(rec, 4, y.row_range(i0, in), true);
    for_chunks(table.n, row_chunk, [&](int64_t r0, int64_t rn) {
      Bound bw = bind_mat(rec, 1, wmat.row_range(r0, rn), false);
      std::vector<Binding> b = {bid.binding, bw.binding, by.binding};
      pc = {u32(in, "ids"), u32(table.k, "cols"), bid.shift, bw.shift, u32(wmat.stride, "stride"), 0, 0,
            uint32_t(table.group_size), by.shift, u32(y.stride, "stride"), u32(r0, "row"), u32(r0 + rn, "row")};
      if (table.quantized()) {
        Bound bs = bind_mat(rec, 2, smat.row_range(r0, rn), false);
        Bound bb = bind_mat(rec, 3, bmat.row_range(r0, rn), false);
        b.push_back(bs.binding);
        b.push_back(bb.binding);
        pc.s_off = bs.shift;
        pc.s_stride = u32(smat.stride, "stride");
      }
      rec.dispatch(pl, b, &pc, sizeof(pc), uint32_t(ceil_div(table.k, wg)), u32(in, "ids"));
    });
  });
}

void patch_embed(Recorder& rec, const Tensor& pixels, int B, int C, int H, int W, int P, const Tensor& weight,
                 const Tensor* class_embedding, const Tensor& positions, const Tensor* conv_bias, const Mat& y) {
  check_f32(y, "patch_embed y");
  if (P <= 0 || H % P || W % P) fail("image size ", H, "x", W, " is not a multiple of the patch size ", P);
  const int64_t gw = W / P, np = int64_t(H / P) * gw, E = y.cols;
  const int64_t tokens = np + (class_embedding ? 1 : 0);
  if (pixels.numel() < int64_t(B) * C * H * W) fail("internal: pixel tensor too small");
  if (weight.numel() != E * C * P * P) fail("internal: patch weight must be [E, C*P*P]");
  if (positions.numel() < tokens * E) fail("internal: position embeddings cover fewer than ", tokens, " tokens");
  if (y.rows != B * tokens) fail("internal: patch_embed output rows");
  const uint32_t wg = pick_wg(rec, 64);
  const auto& pl = rec.context().pipelines().get(variant::k_patch_embed, {wg});
  push::PatchEmbed pc;
  const uint64_t image_bytes = uint64_t(C) * H * W * 4;
  for (int b = 0; b < B; ++b) {
    Bound bp = bind_bytes(rec, 0, pixels, image_bytes * b, image_bytes * (b + 1), false, 4);
    if (bp.shift) fail("internal: images must start aligned");
    Bound bw = bind_whole(rec, 1, weight, false);
    Bound bpos = bind_whole(rec, 3, positions, false);
    Bound by = bind_mat(rec, 5, y.row_range(int64_t(b) * tokens, tokens), true);
    Bound bc = class_embedding ? bind_whole(rec, 2, *class_embedding, false) : bind_whole(rec, 2, positions, false);
    Bound bb = conv_bias ? bind_whole(rec, 4, *conv_bias, false) : bind_whole(rec, 4, positions, false);
    pc = {1, uint32_t(C), uint32_t(H), uint32_t(W), uint32_t(P), u32(E, "E"), u32(gw, "grid"), u32(np, "patches"),
          by.shift, u32(y.stride, "stride"), (class_embedding ? 1u : 0u) | (conv_bias ? 2u : 0u)};
    if (bw.shift || bpos.shift || bc.shift || bb.shift) fail("internal: patch_embed parameters must start aligned");
    rec.dispatch(pl, {bp.binding, bw.binding, bc.binding, bpos.binding, bb.binding, by.binding}, &pc, sizeof(pc),
                 uint32_t(ceil_div(E, wg)), u32(tokens, "tokens"), 1);
  }
}

// ---------------------------------------------------------------------------------------------
// logits

void topk(Recorder& rec, const Mat& x, int k, const Tensor& values, const Tensor& ids) {
  check_f32(x, "topk x");
  if (k < 1 || k > 64) fail("top-k supports k from 1 to 64, not ", k);
  if (values.dtype() != DType::F32 || values.numel() < x.rows * k) fail("internal: topk values must be f32 [rows, k]");
  if (ids.dtype() != DType::U32 || ids.numel() < x.rows * k) fail("internal: topk ids must be u32 [rows, k]");
  const uint32_t seg = 1024;
  const uint32_t wg = pick_wg(rec, 128);
  const auto& pl = rec.context().pipelines().get(variant::k_topk, {wg, seg});
  push::Topk pc;
  int64_t chunk = std::min(rows_per_binding(rec, x), k_max_grid_rows);
  for_chunks(x.rows, chunk, [&](int64_t r0, int64_t rn) {
    Mat in = x.row_range(r0, rn);
    Mat in_ids;
    bool has_ids = false;
    for (;;) {
      const int64_t nseg = ceil_div(in.cols, seg);
      Mat outv, outi;
      if (nseg == 1) {
        outv = Mat::of(values, x.rows, k).row_range(r0, rn);
        outi = Mat::of(ids, x.rows, k).row_range(r0, rn);
      } else {
        outv = Mat::of(rec.scratch(DType::F32, {rn, nseg * k}, "topk candidates"));
        outi = Mat::of(rec.scratch(DType::U32, {rn, nseg * k}, "topk candidate ids"));
      }
      Bound bx = bind_mat(rec, 0, in, false);
      Bound bi = has_ids ? bind_mat(rec, 1, in_ids, false) : bx;
      bi.binding.slot = 1;
      Bound bv = bind_mat(rec, 2, outv, true);
      Bound bo = bind_mat(rec, 3, outi, true);
      pc = {u32(rn, "rows"), u32(in.cols, "cols"), bx.shift, u32(in.stride, "stride"), has_ids ? bi.shift : 0,
            has_ids ? u32(in_ids.stride, "stride") : 0, has_ids ? 1u : 0u, uint32_t(k), bv.shift, u32(outv.stride, "stride")};
      if (bv.shift != bo.shift) fail("internal: topk value and id outputs are aligned differently");
      rec.dispatch(pl, {bx.binding, bi.binding, bv.binding, bo.binding}, &pc, sizeof(pc), u32(nseg, "segments"), u32(rn, "rows"));
      if (nseg == 1) break;
      in = outv;
      in_ids = outi;
      has_ids = true;
    }
  });
}

void logsumexp(Recorder& rec, const Mat& x, float inv_temp, const Tensor& out, const Variant& var) {
  check_f32(x, "logsumexp x");
  if (out.dtype() != DType::F32 || out.numel() < x.rows) fail("internal: logsumexp output must be f32 [rows]");
  const std::string shader = variant::logsumexp(use_subgroup(rec, var));
  const auto& pl = rec.context().pipelines().get(shader, {reduce_wg(rec)});
  push::Logsumexp pc;
  int64_t chunk = std::min(rows_per_binding(rec, x), k_max_grid_rows);
  for_chunks(x.rows, chunk, [&](int64_t r0, int64_t rn) {
    Bound bx = bind_mat(rec, 0, x.row_range(r0, rn), false);
    Bound by = bind_bytes(rec, 1, out, uint64_t(r0) * 4, uint64_t(r0 + rn) * 4, true, 4);
    pc = {u32(rn, "rows"), u32(x.cols, "cols"), bx.shift, u32(x.stride, "stride"), by.shift, inv_temp};
    rec.dispatch(pl, {bx.binding, by.binding}, &pc, sizeof(pc), u32(rn, "rows"));
  });
}

void repeat_penalty(Recorder& rec, const Mat& row, const Tensor& ids, int64_t n, float penalty) {
  check_f32(row, "repeat_penalty logits");
  if (ids.dtype() != DType::I32 || ids.numel() < n) fail("internal: penalty ids must be i32 [n]");
  if (row.rows != 1) fail("internal: repeat_penalty takes one logits row");
  if (n == 0) return;
  const uint32_t wg = pick_wg(rec, 64);
  const auto& pl = rec.context().pipelines().get(variant::k_repeat_penalty, {wg});
  Bound bi = bind_bytes(rec, 0, ids, 0, uint64_t(n) * 4, false, 4);
  Bound bx = bind_mat(rec, 1, row, true);
  push::RepeatPenalty pc{u32(n, "ids"), bi.shift, bx.shift, penalty};
  rec.dispatch(pl, {bi.binding, bx.binding}, &pc, sizeof(pc), uint32_t(ceil_div(n, wg)));
}

}  // namespace vkvlm::gpu
