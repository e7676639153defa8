#pragma once
// One C++ entry per kernel: checks shapes, picks the variant the device can run, splits the work
// where a tensor is larger than one storage-buffer binding, and records the dispatches.
#include <cstdint>
#include <string>
#include <vector>

#include "gpu/memory.h"
#include "gpu/recorder.h"

namespace vkvlm::gpu {

// A row-major matrix view into a tensor: element (r, c) lives at offset + r * stride + c, in
// elements of the tensor's dtype. A stride of 0 repeats one row (broadcast).
struct Mat {
  Tensor t;
  int64_t rows = 0, cols = 0, offset = 0, stride = 0;

  // The tensor as [numel / last_dim, last_dim].
  static Mat of(const Tensor& t);
  static Mat of(const Tensor& t, int64_t rows, int64_t cols);
  Mat row_range(int64_t first, int64_t count) const;
  Mat col_range(int64_t first, int64_t count) const;
};

enum class WeightFormat { F32, F16, BF16, Q4, Q8 };
const char* weight_format_name(WeightFormat f);

// A weight matrix W [n, k], used as y = x W^T. Quantized formats are MLX's affine layout:
// data U32 [n, k * bits / 32] (values packed little-end-first along k), scales and biases
// [n, k / group_size] in f16 or bf16, W = scale * q + bias.
struct Weight {
  WeightFormat format = WeightFormat::F32;
  int64_t n = 0, k = 0;
  Tensor data, scales, biases;
  bool scales_bf16 = false;
  int group_size = 0;
  std::string name;

  bool quantized() const { return format == WeightFormat::Q4 || format == WeightFormat::Q8; }
  int bits() const { return format == WeightFormat::Q4 ? 4 : 8; }
  // Elements (or U32 words when quantized) per row of data.
  int64_t row_elems() const;
  uint64_t bytes() const;
};

// Which variant a kernel runs. The default lets the device profile decide; tests force each one.
struct Variant {
  bool subgroup = true;  // use subgroup operations where the device has them
  // Lanes: one output column per invocation, x read at addresses shared by the workgroup; what
  // CPU devices get by default (see matmul_lanes.comp), any M.
  enum class Matmul { Auto, Gemv, Gemm, Coopmat, Lanes } matmul = Matmul::Auto;
  enum class Attention { Auto, Tiled, Rows } attention = Attention::Auto;
  uint32_t keys_per_split = 0;  // attention rows path: keys per workgroup (0: automatic)
};

void matmul(Recorder& rec, const Mat& x, const Weight& w, const Tensor* bias, const Mat& y, bool accumulate = false,
            const Variant& v = {});
// The product a one-row decode step gets on this device (Lanes on CPU devices, else Gemv). Both
// compute each row independently of the others, so rows computed together with it forced give
// the bits a one-row step gives.
Variant::Matmul decode_matmul(Context& ctx);
// Whether the cooperative-matrix GEMM runs on this device: the driver offers 16x16x16 f16
// products on subgroups of 32, and a first product agreed with the tiled GEMM (checked once per
// context, so a driver or kernel fault falls back instead of giving wrong answers).
bool coopmat_usable(Context& ctx);

void rmsnorm(Recorder& rec, const Mat& x, const Tensor& weight, float eps, bool plus_one, const Mat& y,
             const Variant& v = {});
void layernorm(Recorder& rec, const Mat& x, const Tensor& weight, const Tensor& bias, float eps, const Mat& y,
               const Variant& v = {});

enum class RopeMode { RotateHalf = 0, Interleaved = 1 };
// cos/sin table [n_positions, rot_dim / 2, 2] in f32, computed in double:
// angle = pos / (factor[i] * theta^(2i / rot_dim)); entries are (cos, sin) * attn_scale.
std::vector<float> rope_table(int64_t n_positions, int rot_dim, double theta, const std::vector<double>& factors = {},
                              double attn_scale = 1.0);

// Which of a token's positions each rotary frequency reads. A token carries `count` positions
// (1 for ordinary RoPE; 3 for Qwen2-VL's M-RoPE: temporal, height, width; 2 for the 2-D vision
// rotary: row, column); frequency i reads position s where bounds[s-1] <= i < bounds[s]
// (bounds are cumulative: M-RoPE's mrope_section [16, 24, 24] gives 16, 40, 64).
struct RopeSections {
  int count = 1;
  int bounds[4] = {1 << 30, 1 << 30, 1 << 30, 1 << 30};

  // Sections of the given sizes, in order; their sum must be rot_dim / 2.
  static RopeSections of_sizes(const std::vector<int>& sizes, int rot_dim);
};

// In place on x [T, heads * head_dim] (row stride allowed): row t rotates by the table entries
// of its positions positions[(first + t) * sections.count + s], an I32 buffer (first: the row of
// positions that x's row 0 reads). Positions outside the table leave their frequencies alone
// (callers check them).
void rope(Recorder& rec, const Mat& x, int heads, int head_dim, int rot_dim, RopeMode mode, const Tensor& table,
          const Tensor& positions, int64_t first, const RopeSections& sections = {});

// Rows of keys or values as attention reads them and kv_append writes them: values [rows,
// width] in f32 or f16 (data), or MLX affine quantization with `bits` 4 or 8 (mlx-lm's quantized
// KV cache): data U32 [rows, width * bits / 32], values packed little-end-first along the row,
// and params U32 [rows, width / group_size], each word one group's (scale, bias) as two f16
// halves: value = scale * q + bias.
struct KvMat {
  Mat data, params;
  int bits = 0;  // 0: data holds the values
  int group_size = 0;

  KvMat() = default;
  KvMat(const Mat& values) : data(values) {}  // NOLINT: plain values are a KvMat
  static KvMat quantized(const Tensor& data, const Tensor& params, int bits, int group_size, int64_t width);
  int64_t rows() const { return data.rows; }
  int64_t width() const { return bits ? data.cols * 32 / bits : data.cols; }
  KvMat row_range(int64_t first, int64_t count) const;
};
// One layer's K (or V) cache: consecutive segments of rows, each stored its own way (f16 rows,
// then quantized rows from --quantized-kv-start on); segment i starts where i - 1 ends.
using KvRows = std::vector<KvMat>;

// Writes src [T, kv_dim] (f32) into the cache rows first_row[index] + t (first_row: an I32
// buffer, so a recorded step can be replayed with a new row), rounding to f16 or quantizing
// (MLX's affine_quantize, per group: the endpoint of larger magnitude exact) per segment.
void kv_append(Recorder& rec, const Mat& src, const KvRows& cache, const Tensor& first_row, int index);
inline void kv_append(Recorder& rec, const Mat& src, const Tensor& cache, const Tensor& first_row, int index) {
  kv_append(rec, src, KvRows{KvMat(Mat::of(cache))}, first_row, index);
}

struct AttentionParams {
  int heads = 1, kv_heads = 1, head_dim = 64;
  bool causal = true;
  int window = 0;          // sliding window in KV rows (0: none)
  float scale = 0.125f;
  int64_t T_total = 0;     // queries in this forward pass (keys exist below first row + T_total)
  int64_t q_t0 = 0;        // index of q's first row within the forward pass
  // The mask as data: each query's span, I32 [rows, 2] of [begin, end) KV rows (begin == end:
  // none), the pass's query i at row spans_row + i. A causal query sees its span whole besides
  // the keys up to its row (PaliGemma's prefix, Gemma 3's image blocks); a query that is not
  // causal sees only its span (a vision tower's images). Invalid: no spans.
  Tensor spans;
  int64_t spans_row = 0;
  // A rotating KV cache (decode, one query row): the keys are the rows [0, first_row[index + 1]),
  // every one visible, whatever their order (their positions are in their RoPE, not their rows).
  bool rotating = false;
};
// out [T, heads*head_dim] = attention of q [T, heads*head_dim] over keys/values k, v
// [keys, kv_heads*head_dim] (f32, an f16 cache, or a cache of f16 and quantized segments, read
// as stored: no dequantized copy). Query t is at KV row first_row[index] + q_t0 + t; the masks
// (causal, window, spans) compare KV rows, except in a rotating cache.
void attention(Recorder& rec, const Mat& q, const KvRows& k, const KvRows& v, const Mat& out, const Tensor& first_row,
               int index, const AttentionParams& params, const Variant& var = {});
inline void attention(Recorder& rec, const Mat& q, const Mat& k, const Mat& v, const Mat& out, const Tensor& first_row,
                      int index, const AttentionParams& params, const Variant& var = {}) {
  attention(rec, q, KvRows{KvMat(k)}, KvRows{KvMat(v)}, out, first_row, index, params, var);
}

enum class UnaryOp { Identity = 0, Silu = 1, GeluErf = 2, GeluTanh = 3, QuickGelu = 4 };
void unary(Recorder& rec, UnaryOp op, const Mat& x, const Mat& y, float alpha = 1.0f);
enum class BinaryOp { Add = 0, Mul = 1, SiluMul = 2, GeluTanhMul = 3, GeluErfMul = 4 };
void binary(Recorder& rec, BinaryOp op, const Mat& a, const Mat& b, const Mat& y);
// Between f32, f16 and bf16 (bf16 only as a source), per the tensors' dtypes.
void convert(Recorder& rec, const Mat& x, const Mat& y);

// y[i, :] = table[ids[ids_offset + i], :] for i < n. Ids must be valid rows (checked by callers).
void get_rows(Recorder& rec, const Weight& table, const Tensor& ids, int64_t ids_offset, int64_t n, const Mat& y);

// pixels [B, C, H, W] f32; weight [E, C*P*P] f32; class_embedding [E] or none; positions
// [tokens, E]; y [B * tokens, E] with tokens = (H/P)*(W/P) (+1 with a class token).
void patch_embed(Recorder& rec, const Tensor& pixels, int B, int C, int H, int W, int P, const Tensor& weight,
                 const Tensor* class_embedding, const Tensor& positions, const Tensor* conv_bias, const Mat& y);

// The k (<= 64) largest entries of each row of x, descending, ties to the smaller id:
// values f32 [rows, k], ids U32 [rows, k].
void topk(Recorder& rec, const Mat& x, int k, const Tensor& values, const Tensor& ids);
// out[r] = log sum_c exp(x[r, c] * inv_temp).
void logsumexp(Recorder& rec, const Mat& x, float inv_temp, const Tensor& out, const Variant& v = {});
// One logits row: for each distinct id in ids[0..n): x = x < 0 ? x * penalty : x / penalty.
// Negative ids are skipped (free slots of a list that grows during decoding).
void repeat_penalty(Recorder& rec, const Mat& row, const Tensor& ids, int64_t n, float penalty);

}  // namespace vkvlm::gpu
