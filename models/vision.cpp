#include "models/vision.h"

#include <cmath>
#include <filesystem>
#include <fstream>

#include "gpu/error.h"
#include "gpu/recorder.h"
#include "host/image_processing.h"
#include "host/numeric.h"

namespace vkvlm {
namespace fs = std::filesystem;
using gpu::Mat;
using gpu::Tensor;

namespace {
enum class Kind { Llava, LlavaNext, Phi3V };

struct ClipLayer {
  Tensor ln1_w, ln1_b, ln2_w, ln2_b;  // f32 [E]
  Projection qkv;                     // [rows, E] -> [rows, 3E]: q, k, v
  Projection out;                     // [rows, E] -> [rows, E]
  Projection fc1;                     // [rows, E] -> [rows, I]
  Projection fc2;                     // [rows, I] -> [rows, E]
};
}  // namespace

struct VisionModel::Impl {
  gpu::Context& ctx;
  const ModelConfig& cfg;
  Kind kind = Kind::Llava;
  ProcessorConfig proc;
  // CLIP ViT
  int64_t E = 0, I = 0;
  int heads = 0, head_dim = 0, patch = 0, image_size = 0, side = 0;  // side: patches per row
  int64_t n_patches = 0, tokens_per_crop = 0;
  int run_layers = 0;
  bool quick_gelu = true;
  Tensor patch_w;    // f32 [E, 3 * P * P]
  Tensor class_emb;  // f32 [E]
  Tensor pos_emb;    // f32 [1 + patches, E]
  Tensor pre_ln_w, pre_ln_b;
  std::vector<ClipLayer> layers;
  Tensor zero_step;  // i32 [1] = 0: vision attention sees every token of its crop
  // Projector: LLaVA's linear_1 / linear_2, Phi-3-Vision's img_projection.0 / .2 (GELU between).
  Projection proj1, proj2;
  Tensor image_newline;    // f32 [text E] (LLaVA-NeXT)
  std::vector<float> sub_gn, glb_gn;  // Phi-3-Vision separators, [4C] each
  uint64_t bytes = 0;

  Impl(gpu::Context& c, const ModelConfig& m) : ctx(c), cfg(m) {}

  // Runs the tower over crops [B, 3, S, S] and returns the selected features [B * n_sel, E].
  Tensor tower(gpu::Recorder& rec, const Tensor& pixels, int B, int64_t& n_sel) const;
};

VisionModel::VisionModel(gpu::Context& ctx, const ModelConfig& cfg, WeightLoader& loader)
    : impl_(std::make_unique<Impl>(ctx, cfg)) {
  Impl& m = *impl_;
  const auto& store = loader.store();
  const VisionConfig& v = *cfg.vision;
  m.kind = cfg.model_type == "llava_next" ? Kind::LlavaNext : cfg.model_type == "phi3_v" ? Kind::Phi3V : Kind::Llava;
  const fs::path pp = fs::path(cfg.dir) / "preprocessor_config.json";
  std::error_code ec;
  if (fs::exists(pp, ec)) {
    std::ifstream in(pp);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const std::exception& e) {
      fail(pp.string(), " is not valid JSON: ", e.what());
    }
    m.proc = ProcessorConfig::from_json(j, pp.string());
  } else if (m.kind != Kind::Phi3V) {
    fail("model folder ", cfg.dir, " has no preprocessor_config.json (needed to prepare images)");
  }
  if (m.kind == Kind::LlavaNext && m.proc.grid_pinpoints.empty()) m.proc.grid_pinpoints = cfg.image_grid_pinpoints;
  if (m.kind == Kind::Phi3V) m.proc.crop_h = m.proc.crop_w = m.proc.shortest_edge = 336;

  m.E = v.hidden_size;
  m.I = v.intermediate_size;
  m.heads = v.num_heads;
  m.head_dim = int(v.hidden_size / v.num_heads);
  m.patch = v.patch_size;
  m.image_size = v.image_size;
  m.side = v.image_size / v.patch_size;
  m.n_patches = int64_t(m.side) * m.side;
  m.tokens_per_crop = m.n_patches + 1;
  m.quick_gelu = v.hidden_act == "quick_gelu";
  if (m.proc.crop_h != v.image_size || m.proc.crop_w != v.image_size)
    fail(pp.string(), ": crop size ", m.proc.crop_h, "x", m.proc.crop_w, " differs from the vision tower's ", v.image_size);
  // hidden_states[k] is the output of layer k (0: the embeddings), so feature layer L needs
  // L (or num_layers + 1 + L when negative) layers.
  const int L = cfg.vision_feature_layer;
  m.run_layers = L < 0 ? v.num_layers + 1 + L : L;
  if (m.run_layers < 0 || m.run_layers > v.num_layers)
    fail(cfg.dir, ": vision_feature_layer ", L, " is outside a tower of ", v.num_layers, " layers");
  if (m.kind == Kind::LlavaNext && cfg.vision_feature_select_strategy != "default")
    fail(cfg.dir, ": LLaVA-NeXT is supported with vision_feature_select_strategy 'default'");

  std::string vp, proj;
  if (m.kind == Kind::Phi3V) {
    vp = "model.vision_embed_tokens.img_processor.vision_model.";
  } else {
    for (const char* p : {"model.vision_tower.vision_model.", "model.vision_tower.", "vision_tower.vision_model.", "vision_model."})
      if (store.has(std::string(p) + "embeddings.patch_embedding.weight")) {
        vp = p;
        break;
      }
    for (const char* p : {"model.multi_modal_projector.", "multi_modal_projector."})
      if (store.has(std::string(p) + "linear_1.weight") || store.has(std::string(p) + "linear_1.scales")) {
        proj = p;
        break;
      }
    if (proj.empty()) fail("no multi_modal_projector.linear_1 found in ", store.where());
  }
  if (vp.empty() || !store.has(vp + "embeddings.patch_embedding.weight"))
    fail("no vision tower (", vp.empty() ? "vision_tower.vision_model." : vp, "embeddings.patch_embedding.weight) found in ",
         store.where());

  // Patch embedding: HF stores the conv as [E, C, P, P]; MLX as [E, P, P, C]. Kernels take [E, C*P*P].
  const StTensor& conv = store.get(vp + "embeddings.patch_embedding.weight");
  const int C = v.num_channels, P = v.patch_size;
  if (C != 3) fail(cfg.dir, ": vision towers with ", C, " channels are not supported (RGB only)");
  std::vector<float> w = conv.to_f32();
  const std::vector<int64_t> hf{m.E, C, P, P}, mlx{m.E, P, P, C};
  if (conv.shape == mlx && conv.shape != hf) {
    std::vector<float> t(w.size());
    for (int64_t e = 0; e < m.E; ++e)
      for (int y = 0; y < P; ++y)
        for (int x = 0; x < P; ++x)
          for (int c = 0; c < C; ++c)
            t[size_t(((e * C + c) * P + y) * P + x)] = w[size_t(((e * P + y) * P + x) * C + c)];
    w.swap(t);
  } else if (conv.shape != hf) {
    fail("tensor ", vp, "embeddings.patch_embedding.weight has shape ", conv.shape_string(), "; expected [", m.E, ", ", C,
         ", ", P, ", ", P, "] (or MLX's [", m.E, ", ", P, ", ", P, ", ", C, "])");
  }
  m.patch_w = ctx.tensor(gpu::DType::F32, {m.E, int64_t(C) * P * P}, "patch embedding");
  ctx.upload(m.patch_w, w.data(), w.size() * 4);
  m.class_emb = loader.f32(vp + "embeddings.class_embedding", {m.E});
  m.pos_emb = loader.f32(vp + "embeddings.position_embedding.weight", {m.tokens_per_crop, m.E});
  m.pre_ln_w = loader.f32(vp + "pre_layrnorm.weight", {m.E});
  m.pre_ln_b = loader.f32(vp + "pre_layrnorm.bias", {m.E});
  for (int l = 0; l < m.run_layers; ++l) {
    const std::string p = vp + "encoder.layers." + std::to_string(l) + ".";
    ClipLayer L;
    L.ln1_w = loader.f32(p + "layer_norm1.weight", {m.E});
    L.ln1_b = loader.f32(p + "layer_norm1.bias", {m.E});
    L.ln2_w = loader.f32(p + "layer_norm2.weight", {m.E});
    L.ln2_b = loader.f32(p + "layer_norm2.bias", {m.E});
    L.qkv = loader.projection({p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"}, {m.E, m.E, m.E},
                              m.E, false, true);
    L.out = loader.projection({p + "self_attn.out_proj"}, {m.E}, m.E, false, true);
    L.fc1 = loader.projection({p + "mlp.fc1"}, {m.I}, m.E, false, true);
    L.fc2 = loader.projection({p + "mlp.fc2"}, {m.E}, m.I, false, true);
    m.bytes += L.qkv.bytes() + L.out.bytes() + L.fc1.bytes() + L.fc2.bytes();
    m.layers.push_back(std::move(L));
  }
  const int64_t Et = cfg.text.hidden_size;
  if (m.kind == Kind::Phi3V) {
    const std::string ve = "model.vision_embed_tokens.";
    const int64_t C4 = 4 * m.E;
    if (cfg.phi3v_image_dim_out != m.E)
      fail(cfg.dir, ": img_processor.image_dim_out ", cfg.phi3v_image_dim_out, " differs from the tower's width ", m.E);
    m.proj1 = loader.projection({ve + "img_projection.0"}, {Et}, C4, false, true);
    m.proj2 = loader.projection({ve + "img_projection.2"}, {Et}, Et, false, true);
    m.sub_gn = loader.host_f32(ve + "sub_GN", C4);
    m.glb_gn = loader.host_f32(ve + "glb_GN", C4);
  } else {
    const int64_t feat = m.E;
    m.proj1 = loader.projection({proj + "linear_1"}, {Et}, feat, false, cfg.projector_bias);
    m.proj2 = loader.projection({proj + "linear_2"}, {Et}, Et, false, cfg.projector_bias);
    if (cfg.projector_hidden_act != "gelu")
      fail(cfg.dir, ": projector_hidden_act '", cfg.projector_hidden_act, "' is not supported (gelu is)");
    if (m.kind == Kind::LlavaNext) {
      std::string nl = store.has("model.image_newline") ? "model.image_newline" : "image_newline";
      m.image_newline = loader.f32(nl, {Et});
    }
  }
  m.bytes += m.proj1.bytes() + m.proj2.bytes() + m.patch_w.bytes() + m.pos_emb.bytes();
  m.zero_step = ctx.tensor(gpu::DType::I32, {1}, "vision step");
  int32_t zero = 0;
  ctx.upload(m.zero_step, &zero, 4);
}

VisionModel::~VisionModel() = default;

uint64_t VisionModel::weight_bytes() const { return impl_->bytes; }

ProcessedImage VisionModel::process(const Image& image) const {
  const Impl& m = *impl_;
  ProcessedImage p;
  p.orig_width = image.width;
  p.orig_height = image.height;
  p.size = m.image_size;
  p.hash = image.hash ^ (uint64_t(int(m.kind)) << 56);
  switch (m.kind) {
    case Kind::Llava:
      p.pixels = clip_preprocess(image, m.proc);
      p.crops = 1;
      p.tokens = m.cfg.vision_feature_select_strategy == "full" ? m.tokens_per_crop : m.n_patches;
      break;
    case Kind::LlavaNext: {
      p.pixels = anyres_preprocess(image, m.proc, p.crops, p.grid_rows, p.grid_cols);
      auto l = anyres_layout(image.height, image.width, m.proc.grid_pinpoints, m.image_size, m.side);
      p.tokens = m.n_patches + int64_t(l.feature_rows) * (l.feature_cols + 1);
      break;
    }
    case Kind::Phi3V: {
      int H = 0, W = 0;
      auto hd = phi3v_hd_image(image, m.proc, H, W);
      p.hd_rows = H / 336;
      p.hd_cols = W / 336;
      p.crops = 1 + p.hd_rows * p.hd_cols;
      const size_t crop = size_t(3) * 336 * 336;
      p.pixels.resize(crop * size_t(p.crops));
      auto global = torch_bicubic(hd, 3, H, W, 336, 336);
      std::copy(global.begin(), global.end(), p.pixels.begin());
      for (int i = 0; i < p.hd_rows; ++i)
        for (int j = 0; j < p.hd_cols; ++j) {
          float* dst = p.pixels.data() + crop * size_t(1 + i * p.hd_cols + j);
          for (int c = 0; c < 3; ++c)
            for (int y = 0; y < 336; ++y)
              std::copy_n(hd.data() + (size_t(c) * size_t(H) + size_t(i * 336 + y)) * size_t(W) + size_t(j * 336), 336,
                          dst + (size_t(c) * 336 + size_t(y)) * 336);
        }
      const int64_t half = m.side / 2;  // merged tokens per side of a crop
      p.tokens = int64_t(p.hd_rows * p.hd_cols + 1) * half * half + 1 + int64_t(p.hd_rows + 1) * half;
      break;
    }
  }
  return p;
}

Tensor VisionModel::Impl::tower(gpu::Recorder& rec, const Tensor& pixels, int B, int64_t& n_sel) const {
  const int64_t T = tokens_per_crop, rows = int64_t(B) * T;
  Mat x = Mat::of(rec.scratch(gpu::DType::F32, {rows, E}, "vision hidden"));      // [B*T, E]
  Mat h = Mat::of(rec.scratch(gpu::DType::F32, {rows, E}, "vision normed"));      // [B*T, E]
  Mat qkv = Mat::of(rec.scratch(gpu::DType::F32, {rows, 3 * E}, "vision qkv"));   // [B*T, 3E]
  Mat attn = Mat::of(rec.scratch(gpu::DType::F32, {rows, E}, "vision attention"));  // [B*T, E]
  Mat mlp = Mat::of(rec.scratch(gpu::DType::F32, {rows, I}, "vision mlp"));       // [B*T, I]
  gpu::patch_embed(rec, pixels, B, 3, image_size, image_size, patch, patch_w, &class_emb, pos_emb, nullptr, x);
  gpu::layernorm(rec, x, pre_ln_w, pre_ln_b, float(cfg.vision->layer_norm_eps), x);
  gpu::AttentionParams ap;
  ap.heads = ap.kv_heads = heads;
  ap.head_dim = head_dim;
  ap.causal = false;
  ap.scale = float(1.0 / std::sqrt(double(head_dim)));
  ap.T_total = T;
  const float eps = float(cfg.vision->layer_norm_eps);
  for (const ClipLayer& L : layers) {
    gpu::layernorm(rec, x, L.ln1_w, L.ln1_b, eps, h);
    L.qkv.run(rec, h, qkv);
    for (int b = 0; b < B; ++b) {
      Mat crop = qkv.row_range(int64_t(b) * T, T);
      gpu::attention(rec, crop.col_range(0, E), crop.col_range(E, E), crop.col_range(2 * E, E), attn.row_range(int64_t(b) * T, T),
                     zero_step, 0, ap);
    }
    L.out.run(rec, attn, x, /*accumulate=*/true);
    gpu::layernorm(rec, x, L.ln2_w, L.ln2_b, eps, h);
    L.fc1.run(rec, h, mlp);
    gpu::unary(rec, quick_gelu ? gpu::UnaryOp::QuickGelu : gpu::UnaryOp::GeluErf, mlp, mlp);
    L.fc2.run(rec, mlp, x, /*accumulate=*/true);
  }
  // Feature selection: without the class token ("default"), or all tokens ("full").
  const bool drop_cls = kind == Kind::Phi3V || cfg.vision_feature_select_strategy == "default";
  n_sel = drop_cls ? n_patches : T;
  if (!drop_cls) return x.t;
  Tensor sel = rec.scratch(gpu::DType::F32, {int64_t(B) * n_sel, E}, "vision features");
  for (int b = 0; b < B; ++b)
    rec.copy(x.t, uint64_t(int64_t(b) * T + 1) * uint64_t(E) * 4, sel, uint64_t(int64_t(b) * n_sel) * uint64_t(E) * 4,
             uint64_t(n_sel) * uint64_t(E) * 4);
  return sel;
}

Tensor VisionModel::encode(const ProcessedImage& img) const {
  const Impl& m = *impl_;
  const int64_t Et = m.cfg.text.hidden_size;
  gpu::Recorder rec(m.ctx);
  Tensor pixels = rec.scratch(gpu::DType::F32, {img.crops, 3, img.size, img.size}, "pixels");
  m.ctx.upload(pixels, img.pixels.data(), img.pixels.size() * 4);
  int64_t n_sel = 0;
  Tensor feats = m.tower(rec, pixels, img.crops, n_sel);  // [crops * n_sel, E]
  const int64_t rows = int64_t(img.crops) * n_sel;
  Tensor out = m.ctx.tensor(gpu::DType::F32, {img.tokens, Et}, "image features");

  // Rows of `source` (a [n, width] f32 table) gathered in `order` into dst.
  auto gather = [&](const Tensor& source, int64_t n, int64_t width, const std::vector<int32_t>& order, const Mat& dst) {
    gpu::Weight table;
    table.format = gpu::WeightFormat::F32;
    table.n = n;
    table.k = width;
    table.data = source;
    table.name = "image feature rows";
    Tensor ids = rec.scratch(gpu::DType::I32, {int64_t(order.size())}, "image feature order");
    m.ctx.upload(ids, order.data(), order.size() * 4);
    gpu::get_rows(rec, table, ids, 0, int64_t(order.size()), dst);
  };

  if (m.kind == Kind::Phi3V) {
    // 2x2 merge of each crop's patches (4 rows of C form one 4C row), sub_GN after every row,
    // glb_GN between the sub-images and the global image.
    const int64_t C = m.E, side = m.side, half = side / 2;
    Tensor src = rec.scratch(gpu::DType::F32, {rows + 8, C}, "phi3v merge source");
    rec.copy(feats, 0, src, 0, uint64_t(rows) * uint64_t(C) * 4);
    std::vector<float> gn(m.sub_gn);
    gn.insert(gn.end(), m.glb_gn.begin(), m.glb_gn.end());
    Tensor gnt = rec.scratch(gpu::DType::F32, {8, C}, "phi3v separators");
    m.ctx.upload(gnt, gn.data(), gn.size() * 4);
    rec.copy(gnt, 0, src, uint64_t(rows) * uint64_t(C) * 4, uint64_t(8 * C) * 4);
    const int32_t sub_gn = int32_t(rows), glb_gn = int32_t(rows + 4);
    std::vector<int32_t> order;
    auto merged = [&](int64_t crop, int64_t a, int64_t b) {
      for (int dy = 0; dy < 2; ++dy)
        for (int dx = 0; dx < 2; ++dx) order.push_back(int32_t(crop * n_sel + (2 * a + dy) * side + (2 * b + dx)));
    };
    auto separator = [&](int32_t base) {
      for (int k = 0; k < 4; ++k) order.push_back(base + k);
    };
    auto sub = [&] {
      for (int64_t i = 0; i < img.hd_rows * half; ++i) {
        for (int64_t j = 0; j < img.hd_cols * half; ++j) merged(1 + (i / half) * img.hd_cols + (j / half), i % half, j % half);
        separator(sub_gn);
      }
    };
    auto glb = [&] {
      for (int64_t a = 0; a < half; ++a) {
        for (int64_t b = 0; b < half; ++b) merged(0, a, b);
        separator(sub_gn);
      }
    };
    if (m.cfg.phi3v_hd_transform_order == "sub_glb") {
      sub();
      separator(glb_gn);
      glb();
    } else {
      glb();
      separator(glb_gn);
      sub();
    }
    if (int64_t(order.size()) != img.tokens * 4) fail("internal: Phi-3-Vision token count mismatch");
    Tensor mergedt = rec.scratch(gpu::DType::F32, {img.tokens * 4, C}, "phi3v merged");
    gather(src, rows + 8, C, order, Mat::of(mergedt));
    Mat hidden = Mat::of(rec.scratch(gpu::DType::F32, {img.tokens, Et}, "projector hidden"));
    m.proj1.run(rec, Mat::of(mergedt, img.tokens, 4 * C), hidden);
    gpu::unary(rec, gpu::UnaryOp::GeluErf, hidden, hidden);
    m.proj2.run(rec, hidden, Mat::of(out));
  } else {
    Mat hidden = Mat::of(rec.scratch(gpu::DType::F32, {rows, Et}, "projector hidden"));
    if (m.kind == Kind::Llava) {
      m.proj1.run(rec, Mat::of(feats, rows, m.E), hidden);
      gpu::unary(rec, gpu::UnaryOp::GeluErf, hidden, hidden);
      m.proj2.run(rec, hidden, Mat::of(out));
    } else {
      // Project every crop's features, then pack: the base view first, then the tile grid
      // unpadded to the image's aspect with image_newline after each row.
      Tensor projected = rec.scratch(gpu::DType::F32, {rows + 1, Et}, "projected crops");
      m.proj1.run(rec, Mat::of(feats, rows, m.E), hidden);
      gpu::unary(rec, gpu::UnaryOp::GeluErf, hidden, hidden);
      m.proj2.run(rec, hidden, Mat::of(projected).row_range(0, rows));
      rec.copy(m.image_newline, 0, projected, uint64_t(rows) * uint64_t(Et) * 4, uint64_t(Et) * 4);
      auto l = anyres_layout(img.orig_height, img.orig_width, m.proc.grid_pinpoints, m.image_size, m.side);
      std::vector<int32_t> order;
      for (int64_t i = 0; i < m.n_patches; ++i) order.push_back(int32_t(i));
      for (int r = 0; r < l.feature_rows; ++r) {
        const int fr = r + l.row_offset;
        for (int c = 0; c < l.feature_cols; ++c) {
          const int fc = c + l.col_offset;
          const int64_t crop = 1 + int64_t(fr / m.side) * img.grid_cols + fc / m.side;
          order.push_back(int32_t(crop * m.n_patches + int64_t(fr % m.side) * m.side + fc % m.side));
        }
        order.push_back(int32_t(rows));  // image_newline
      }
      if (int64_t(order.size()) != img.tokens) fail("internal: LLaVA-NeXT token count mismatch");
      gather(projected, rows + 1, Et, order, Mat::of(out));
    }
  }
  rec.submit();
  return out;
}

}  // namespace vkvlm
