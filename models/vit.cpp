#include "models/vit.h"

#include <algorithm>
#include <cmath>

#include "gpu/error.h"
#include "gpu/recorder.h"

namespace vkvlm {

using gpu::Mat;
using gpu::Tensor;

std::vector<float> conv_weight_channels_first(const StTensor& t, const std::string& name, int64_t E, int C,
                                              const std::vector<int64_t>& kernel) {
  std::vector<int64_t> hf{E, C}, mlx{E};
  int64_t K = 1;
  for (int64_t k : kernel) {
    hf.push_back(k);
    mlx.push_back(k);
    K *= k;
  }
  mlx.push_back(C);
  std::vector<float> w = t.to_f32();
  if (t.shape == hf) return w;
  if (t.shape != mlx) {
    auto str = [](const std::vector<int64_t>& s) {
      std::string r = "[";
      for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
      return r + "]";
    };
    fail("tensor ", name, " has shape ", t.shape_string(), "; expected ", str(hf), " (or MLX's channels-last ", str(mlx), ")");
  }
  // MLX: [E, kernel..., C] -> [E, C, kernel...]
  std::vector<float> out(w.size());
  for (int64_t e = 0; e < E; ++e)
    for (int64_t k = 0; k < K; ++k)
      for (int c = 0; c < C; ++c) out[size_t((e * C + c) * K + k)] = w[size_t((e * K + k) * C + c)];
  return out;
}

VitShape vit_shape(const VisionConfig& v, int layers) {
  VitShape s;
  s.width = v.hidden_size;
  s.intermediate = v.intermediate_size;
  s.heads = v.num_heads;
  s.layers = layers;
  s.channels = v.num_channels;
  s.patch = v.patch_size;
  s.image_size = v.image_size;
  s.eps = v.layer_norm_eps;
  return s;
}

gpu::UnaryOp vit_activation(const std::string& act, const std::string& where) {
  if (act == "quick_gelu") return gpu::UnaryOp::QuickGelu;
  if (act == "gelu") return gpu::UnaryOp::GeluErf;
  if (act == "gelu_pytorch_tanh" || act == "gelu_new" || act == "gelu_fast" || act == "gelu_tanh") return gpu::UnaryOp::GeluTanh;
  fail(where, ": vision hidden_act '", act, "' is not supported (quick_gelu, gelu, gelu_pytorch_tanh are)");
}

VitNames hf_vit_names(const std::string& prefix) {
  VitNames n;
  n.patch_embed = prefix + "embeddings.patch_embedding";
  n.class_embedding = prefix + "embeddings.class_embedding";
  n.position_embedding = prefix + "embeddings.position_embedding";
  n.pre_norm = prefix + "pre_layrnorm";
  n.post_norm = prefix + "post_layernorm";
  n.layer = [prefix](int l) { return prefix + "encoder.layers." + std::to_string(l) + "."; };
  n.norm1 = "layer_norm1";
  n.norm2 = "layer_norm2";
  n.q = "self_attn.q_proj";
  n.k = "self_attn.k_proj";
  n.v = "self_attn.v_proj";
  n.out = "self_attn.out_proj";
  n.fc1 = "mlp.fc1";
  n.fc2 = "mlp.fc2";
  return n;
}

std::string find_prefix(const TensorStore& store, const std::vector<std::string>& prefixes, const std::string& probe,
                        const std::string& what) {
  for (auto& p : prefixes)
    if (store.has(p + probe)) return p;
  std::string list;
  for (auto& p : prefixes) list += (list.empty() ? "" : ", ") + p + probe;
  fail("no ", what, " found in ", store.where(), " (looked for ", list, ")");
}

VisionTransformer::VisionTransformer(gpu::Context& ctx, const VitShape& shape, const VitTraits& traits, const VitNames& names,
                                     WeightLoader& loader)
    : ctx_(ctx), shape_(shape), traits_(traits) {
  const int64_t E = shape.width, I = shape.intermediate;
  const int C = shape.channels, P = shape.patch;
  if (shape.heads <= 0 || E % shape.heads) fail("internal: vision width ", E, " is not a multiple of ", shape.heads, " heads");
  const int D = int(E / shape.heads);
  if (traits.rotary_2d && D % 4) fail("vision heads of ", D, " dimensions cannot take the 2-D rotary (a multiple of 4 is needed)");
  const StTensor& conv = loader.store().get(names.patch_embed + ".weight");
  std::vector<int64_t> kernel;
  if (traits.patch_rows && shape.temporal_patch > 1) kernel.push_back(shape.temporal_patch);
  kernel.push_back(P);
  kernel.push_back(P);
  std::vector<float> w = conv_weight_channels_first(conv, names.patch_embed + ".weight", E, C, kernel);
  const int64_t K = int64_t(w.size()) / E;
  patch_w_ = ctx.tensor(gpu::DType::F32, {E, K}, "patch embedding");
  ctx.upload(patch_w_, w.data(), w.size() * 4);
  bytes_ += patch_w_.bytes();
  patch_w_mat_.format = gpu::WeightFormat::F32;
  patch_w_mat_.n = E;
  patch_w_mat_.k = K;
  patch_w_mat_.data = patch_w_;
  patch_w_mat_.name = names.patch_embed;
  if (traits.conv_bias) conv_bias_ = loader.f32(names.patch_embed + ".bias", {E});
  if (traits.class_token) class_emb_ = loader.f32(names.class_embedding, {E});
  if (!traits.rotary_2d) pos_emb_ = loader.f32(names.position_embedding + ".weight", {tokens_per_crop(), E});
  if (traits.pre_norm) {
    pre_w_ = loader.f32(names.pre_norm + ".weight", {E});
    pre_b_ = loader.f32(names.pre_norm + ".bias", {E});
  }
  if (traits.post_norm) {
    post_w_ = loader.f32(names.post_norm + ".weight", {E});
    post_b_ = loader.f32(names.post_norm + ".bias", {E});
  }
  for (int l = 0; l < shape.layers; ++l) {
    const std::string p = names.layer(l);
    Block B;
    B.ln1_w = loader.f32(p + names.norm1 + ".weight", {E});
    B.ln1_b = loader.f32(p + names.norm1 + ".bias", {E});
    B.ln2_w = loader.f32(p + names.norm2 + ".weight", {E});
    B.ln2_b = loader.f32(p + names.norm2 + ".bias", {E});
    B.qkv = names.qkv.empty() ? loader.projection({p + names.q, p + names.k, p + names.v}, {E, E, E}, E, false, true)
                              : loader.projection({p + names.qkv}, {3 * E}, E, false, true);
    B.out = loader.projection({p + names.out}, {E}, E, false, true);
    B.fc1 = loader.projection({p + names.fc1}, {I}, E, false, true);
    B.fc2 = loader.projection({p + names.fc2}, {E}, I, false, true);
    bytes_ += B.qkv.bytes() + B.out.bytes() + B.fc1.bytes() + B.fc2.bytes() + 4 * uint64_t(E) * 4;
    blocks_.push_back(std::move(B));
  }
  bytes_ += pos_emb_.valid() ? pos_emb_.bytes() : 0;
  zero_row_ = ctx.tensor(gpu::DType::I32, {1}, "vision first row");
  int32_t zero = 0;
  ctx.upload(zero_row_, &zero, 4);
}

int64_t VisionTransformer::tokens_per_crop() const {
  if (traits_.patch_rows) return 0;
  const int64_t side = shape_.image_size / shape_.patch;
  return side * side + (traits_.class_token ? 1 : 0);
}

void VisionTransformer::blocks(gpu::Recorder& rec, const Mat& x, int64_t block, const Tensor* row_col,
                               const Tensor* rope_table) const {
  const int64_t rows = x.rows, E = shape_.width, I = shape_.intermediate;
  const int H = shape_.heads, D = int(E / H);
  Mat h = Mat::of(rec.scratch(gpu::DType::F32, {rows, E}, "vision normed"));         // [rows, E]
  Mat qkv = Mat::of(rec.scratch(gpu::DType::F32, {rows, 3 * E}, "vision qkv"));      // [rows, 3E]
  Mat attn = Mat::of(rec.scratch(gpu::DType::F32, {rows, E}, "vision attention"));   // [rows, E]
  // The MLP's [rows, I] intermediate runs in row chunks, so a large image (Qwen2-VL's dynamic
  // resolution) needs no more than this many rows of it.
  constexpr int64_t k_mlp_rows = 1024;
  const int64_t mlp_rows = std::min(rows, k_mlp_rows);
  Mat mlp = Mat::of(rec.scratch(gpu::DType::F32, {mlp_rows, I}, "vision mlp"));      // [chunk, I]
  gpu::AttentionParams ap;
  ap.heads = ap.kv_heads = H;
  ap.head_dim = D;
  ap.causal = false;
  ap.scale = float(1.0 / std::sqrt(double(D)));
  ap.T_total = rows;
  if (block < rows) {  // crops batched: each attends to itself alone
    std::vector<int32_t> pairs(size_t(2 * rows));
    for (int64_t r = 0; r < rows; ++r) {
      pairs[size_t(2 * r)] = int32_t(r / block * block);
      pairs[size_t(2 * r + 1)] = int32_t(std::min(rows, (r / block + 1) * block));
    }
    ap.spans = rec.scratch(gpu::DType::I32, {rows, 2}, "vision attention spans");
    ctx_.upload(ap.spans, pairs.data(), pairs.size() * 4);
  }
  const float eps = float(shape_.eps);
  const auto sections = gpu::RopeSections::of_sizes({D / 4, D / 4}, D);
  for (const Block& B : blocks_) {
    gpu::layernorm(rec, x, B.ln1_w, B.ln1_b, eps, h);
    B.qkv.run(rec, h, qkv);
    Mat q = qkv.col_range(0, E), k = qkv.col_range(E, E), v = qkv.col_range(2 * E, E);
    if (row_col) {
      gpu::rope(rec, q, H, D, D, gpu::RopeMode::RotateHalf, *rope_table, *row_col, 0, sections);
      gpu::rope(rec, k, H, D, D, gpu::RopeMode::RotateHalf, *rope_table, *row_col, 0, sections);
    }
    gpu::attention(rec, q, k, v, attn, zero_row_, 0, ap);
    B.out.run(rec, attn, x, /*accumulate=*/true);
    gpu::layernorm(rec, x, B.ln2_w, B.ln2_b, eps, h);
    for (int64_t r0 = 0; r0 < rows; r0 += mlp_rows) {
      const int64_t n = std::min(mlp_rows, rows - r0);
      Mat m = mlp.row_range(0, n);
      B.fc1.run(rec, h.row_range(r0, n), m);
      gpu::unary(rec, traits_.act, m, m);
      B.fc2.run(rec, m, x.row_range(r0, n), /*accumulate=*/true);
    }
  }
  if (traits_.post_norm) gpu::layernorm(rec, x, post_w_, post_b_, eps, x);
}

Mat VisionTransformer::run_crops(gpu::Recorder& rec, const Tensor& pixels, int64_t B, bool drop_first) const {
  if (traits_.patch_rows) fail("internal: this vision tower takes patch rows");
  const int64_t T = tokens_per_crop(), rows = B * T;
  Mat x = Mat::of(rec.scratch(gpu::DType::F32, {rows, shape_.width}, "vision hidden"));  // [B*T, E]
  gpu::patch_embed(rec, pixels, int(B), shape_.channels, shape_.image_size, shape_.image_size, shape_.patch, patch_w_,
                   traits_.class_token ? &class_emb_ : nullptr, pos_emb_, traits_.conv_bias ? &conv_bias_ : nullptr, x);
  if (traits_.pre_norm) gpu::layernorm(rec, x, pre_w_, pre_b_, float(shape_.eps), x);
  blocks(rec, x, T, nullptr, nullptr);
  if (!drop_first) return x;
  const int64_t E = shape_.width, kept = T - 1;
  Tensor sel = rec.scratch(gpu::DType::F32, {B * kept, E}, "vision features");  // [B * (T - 1), E]
  for (int64_t b = 0; b < B; ++b)
    rec.copy(x.t, uint64_t(b * T + 1) * uint64_t(E) * 4, sel, uint64_t(b * kept) * uint64_t(E) * 4, uint64_t(kept) * uint64_t(E) * 4);
  return Mat::of(sel);
}

Mat VisionTransformer::run_patches(gpu::Recorder& rec, const Tensor& patches, int64_t n, const Tensor& row_col,
                                   int max_row_col) const {
  if (!traits_.patch_rows) fail("internal: this vision tower takes crops");
  Mat x = Mat::of(rec.scratch(gpu::DType::F32, {n, shape_.width}, "vision hidden"));  // [n, E]
  gpu::matmul(rec, Mat::of(patches, n, patch_w_mat_.k), patch_w_mat_, traits_.conv_bias ? &conv_bias_ : nullptr, x);
  // The 2-D rotary's table: position p at frequency i holds angle p * f_(i mod D/4), with the
  // D/4 frequencies f_j = theta^(-2j / (D/2)); rows read it at (row, column).
  const int D = int(shape_.width / shape_.heads), q = D / 4;
  std::vector<double> inv(static_cast<size_t>(q));
  for (int j = 0; j < q; ++j) inv[size_t(j)] = 1.0 / std::pow(shape_.rope_theta, 2.0 * j / (D / 2));
  const int64_t n_pos = int64_t(max_row_col) + 1;
  std::vector<float> table(size_t(n_pos) * size_t(D / 2) * 2);
  for (int64_t p = 0; p < n_pos; ++p)
    for (int i = 0; i < D / 2; ++i) {
      const double a = double(p) * inv[size_t(i % q)];
      table[(size_t(p) * size_t(D / 2) + size_t(i)) * 2] = float(std::cos(a));
      table[(size_t(p) * size_t(D / 2) + size_t(i)) * 2 + 1] = float(std::sin(a));
    }
  Tensor tt = rec.scratch(gpu::DType::F32, {n_pos, D / 2, 2}, "vision rope table");
  ctx_.upload(tt, table.data(), table.size() * 4);
  blocks(rec, x, n, &row_col, &tt);
  return x;
}

}  // namespace vkvlm
