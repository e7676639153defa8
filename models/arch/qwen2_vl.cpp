// Qwen2-VL: images at their own resolution (smart_resize to multiples of 28, cut into 14-pixel
// patches), a ViT with 2-D rotary positions and no position embedding, every 2x2 patches merged
// into one token (PatchMerger), and a Qwen2 decoder with M-RoPE: each token has (temporal,
// height, width) positions; image tokens sit on their merged grid, text continues after its
// largest position.
#include "gpu/error.h"
#include "gpu/recorder.h"
#include "models/arch/architecture.h"
#include "models/arch/text_families.h"
#include "models/vit.h"

namespace vkvlm {
namespace {

using namespace arch;
using gpu::Mat;
using gpu::Tensor;

struct Qwen2vlSettings : ArchSettings {
  int32_t image_token = 0, video_token = 0;
  int64_t embed_dim = 0, mlp_hidden = 0, merged_width = 0;  // merged_width: the merger's output (= text hidden)
  int depth = 0, heads = 0, channels = 3, patch = 14, merge = 2, temporal = 2;
  std::string act = "quick_gelu";
  std::shared_ptr<const ImageProcessor> processor;
};

class Qwen2vlVision : public VisionPath {
 public:
  Qwen2vlVision(gpu::Context& ctx, const ModelConfig& c, const Qwen2vlSettings& s, WeightLoader& loader) : ctx_(ctx), c_(c), s_(s) {
    const auto& store = loader.store();
    const std::string p = find_prefix(store, {"visual.", "vision_tower.", "model.visual."}, "patch_embed.proj.weight", "Qwen2-VL vision tower");
    VitShape shape;
    shape.width = s.embed_dim;
    shape.intermediate = s.mlp_hidden;
    shape.heads = s.heads;
    shape.layers = s.depth;
    shape.channels = s.channels;
    shape.patch = s.patch;
    shape.temporal_patch = s.temporal;
    shape.eps = 1e-6;
    VitTraits traits;
    traits.rotary_2d = true;
    traits.patch_rows = true;
    traits.act = vit_activation(s.act, c.dir + " vision_config");
    VitNames n;
    n.patch_embed = p + "patch_embed.proj";
    n.layer = [p](int l) { return p + "blocks." + std::to_string(l) + "."; };
    n.norm1 = "norm1";
    n.norm2 = "norm2";
    n.qkv = "attn.qkv";
    n.out = "attn.proj";
    n.fc1 = "mlp.fc1";
    n.fc2 = "mlp.fc2";
    vit_ = std::make_unique<VisionTransformer>(ctx, shape, traits, n, loader);
    const int64_t E = s.embed_dim, E4 = E * s.merge * s.merge;
    ln_w_ = loader.f32(p + "merger.ln_q.weight", {E});
    ln_b_ = loader.f32(p + "merger.ln_q.bias", {E});
    mlp0_ = loader.projection({p + "merger.mlp.0"}, {E4}, E4, false, true);
    mlp2_ = loader.projection({p + "merger.mlp.2"}, {s.merged_width}, E4, false, true);
  }

  ImagePlan plan(const Image& image) const override {
    ImagePlan p;
    p.pixels = s_.processor->process(image);
    const int M = s_.merge;
    p.grid = {1, p.pixels.grid_rows / M, p.pixels.grid_cols / M};
    p.tokens = p.pixels.rows / (M * M);
    p.hash = image.hash ^ 0x5157454E32564Cull;
    return p;
  }

  Tensor encode(const ImagePlan& plan) const override {
    const auto& px = plan.pixels;
    const int M = s_.merge, gh = px.grid_rows, gw = px.grid_cols;
    const int64_t n = px.rows, E = s_.embed_dim, E4 = E * M * M;
    gpu::Recorder rec(ctx_);
    Tensor patches = upload_pixels(rec, px);  // [n, C * T * P * P]
    // Each patch's (row, column), in the processor's merge-window order.
    std::vector<int32_t> rc;
    rc.reserve(size_t(n) * 2);
    for (int wy = 0; wy < gh / M; ++wy)
      for (int wx = 0; wx < gw / M; ++wx)
        for (int dy = 0; dy < M; ++dy)
          for (int dx = 0; dx < M; ++dx) {
            rc.push_back(wy * M + dy);
            rc.push_back(wx * M + dx);
          }
    Tensor row_col = rec.scratch(gpu::DType::I32, {n, 2}, "patch rows and columns");
    ctx_.upload(row_col, rc.data(), rc.size() * 4);
    Mat x = vit_->run_patches(rec, patches, n, row_col, std::max(gh, gw) - 1);  // [n, E]
    // PatchMerger: LayerNorm per patch, each merge window's M*M rows side by side, an MLP.
    Mat normed = Mat::of(rec.scratch(gpu::DType::F32, {n, E}, "merger normed"));  // [n, E] = [n / M^2, E4]
    gpu::layernorm(rec, x, ln_w_, ln_b_, 1e-6f, normed);
    Mat windows = Mat::of(normed.t, plan.tokens, E4);
    Mat hidden = Mat::of(rec.scratch(gpu::DType::F32, {plan.tokens, E4}, "merger hidden"));
    Tensor out = ctx_.tensor(gpu::DType::F32, {plan.tokens, s_.merged_width}, "image features");
    mlp0_.run(rec, windows, hidden);
    gpu::unary(rec, gpu::UnaryOp::GeluErf, hidden, hidden);
    mlp2_.run(rec, hidden, Mat::of(out));
    rec.submit();
    return out;
  }

  uint64_t weight_bytes() const override {
    return vit_->weight_bytes() + mlp0_.bytes() + mlp2_.bytes() + ln_w_.bytes() + ln_b_.bytes();
  }
  std::vector<std::string> describe() const override {
    const auto& pc = s_.processor->config();
    const int64_t unit = int64_t(s_.patch) * s_.merge * s_.patch * s_.merge;
    return {"vision tower: Qwen2-VL ViT, " + std::to_string(s_.depth) + " blocks, width " + std::to_string(s_.embed_dim) + ", " +
                std::to_string(s_.heads) + " heads, patch " + std::to_string(s_.patch) + ", 2-D rotary; " + std::to_string(s_.merge) +
                "x" + std::to_string(s_.merge) + " patch merger",
            "image processor: " + pc.type + " (dynamic resolution, " + std::to_string(pc.min_pixels) + " to " +
                std::to_string(pc.max_pixels) + " pixels); " + std::to_string(std::max<int64_t>(1, pc.min_pixels / unit)) + " to " +
                std::to_string(pc.max_pixels / unit) + " image tokens per image, by its size"};
  }

 private:
  gpu::Context& ctx_;
  const ModelConfig& c_;
  const Qwen2vlSettings& s_;
  std::unique_ptr<VisionTransformer> vit_;
  Tensor ln_w_, ln_b_;
  Projection mlp0_, mlp2_;
};

class Qwen2vl : public Architecture {
 public:
  void read_config(const ConfigFields& top, const std::string& dir, ModelConfig& c) const override {
    auto s = std::make_shared<Qwen2vlSettings>();
    // transformers 4 and mlx-vlm keep the language model's fields at the top; transformers 5
    // moves them into text_config.
    const TextDefaults& qwen2 = text_family("qwen2", top.where());
    c.text = top.has_object("text_config") ? parse_text_config(top.object("text_config").raw(), top.where() + " text_config", qwen2)
                                           : parse_text_config(top.raw(), top.where(), qwen2);
    if (c.text.rope.sections.empty())
      fail(top.where(), ": Qwen2-VL needs M-RoPE (rope_scaling with mrope_section), which the config does not give");
    const int64_t V = c.text.vocab_size;
    s->image_token = int32_t(top.integer_in("image_token_id", 151655, 0, V - 1));
    s->video_token = int32_t(top.integer_in("video_token_id", 151656, 0, V - 1));
    const ConfigFields v = top.object("vision_config");
    s->depth = int(v.integer_in("depth", 32, 1, 1024));
    s->embed_dim = v.integer_in("embed_dim", 1280, 1, 1 << 16);
    s->heads = int(v.integer_in("num_heads", 16, 1, 1024));
    s->channels = int(v.integer_in("in_chans", v.integer_in("in_channels", 3, 1, 16), 1, 16));
    s->patch = int(v.integer_in("patch_size", 14, 1, 1024));
    s->merge = int(v.integer_in("spatial_merge_size", 2, 1, 16));
    s->temporal = int(v.integer_in("temporal_patch_size", 2, 1, 16));
    s->merged_width = v.integer_in("hidden_size", c.text.hidden_size, 1, 1 << 20);
    const double ratio = v.number_in("mlp_ratio", 4.0, 0.01, 64.0);
    s->mlp_hidden = int64_t(double(s->embed_dim) * ratio);
    s->act = v.string("hidden_act", "quick_gelu");
    if (s->channels != 3) fail(v.where(), ": vision towers with ", s->channels, " channels are not supported (RGB only)");
    if (s->embed_dim % s->heads || (s->embed_dim / s->heads) % 4 || s->embed_dim / s->heads > 256)
      fail(v.where(), ": embed_dim ", s->embed_dim, " over ", s->heads, " heads must give heads of a multiple of 4, up to 256, dimensions");
    if (s->merged_width != c.text.hidden_size)
      fail(v.where(), ": the merger's output width (hidden_size ", s->merged_width, ") differs from the language model's ",
           c.text.hidden_size);
    s->processor = image_processor_for(dir, "");
    const auto* proc = dynamic_cast<const Qwen2vlProcessor*>(s->processor.get());
    if (!proc) fail(dir, ": Qwen2-VL prepares images with Qwen2VLImageProcessor; preprocessor_config.json names ", s->processor->config().type);
    const auto& pc = proc->config();
    if (pc.patch_size != s->patch || pc.merge_size != s->merge || pc.temporal_patch_size != s->temporal)
      fail(dir, "/preprocessor_config.json: patch_size ", pc.patch_size, ", merge_size ", pc.merge_size, ", temporal_patch_size ",
           pc.temporal_patch_size, " differ from the vision tower's ", s->patch, ", ", s->merge, ", ", s->temporal);
    c.settings = s;
  }
  bool has_vision() const override { return true; }
  std::unique_ptr<VisionPath> load_vision(gpu::Context& ctx, const ModelConfig& c, WeightLoader& loader) const override {
    return std::make_unique<Qwen2vlVision>(ctx, c, settings(c), loader);
  }
  size_t count_placeholders(const ModelConfig& c, const std::string& text) const override {
    return count_substrings(text, "<|image_pad|>");
  }
  // The rendered chat (its template writes <|vision_start|><|image_pad|><|vision_end|> for an
  // image), each <|image_pad|> expanded into the image's merged grid with M-RoPE positions.
  Prompt build_prompt(const PromptTools& t, const Messages& messages, std::vector<ImagePlan> images) const override {
    const auto& s = settings(t.config);
    std::string text = t.render(messages);
    auto ids = t.tokenizer.encode(text, true);
    for (int32_t id : ids)
      if (id == s.video_token) fail("the prompt holds a video placeholder (<|video_pad|>); videos are not supported");
    return expand_image_tokens(ids, s.image_token, std::move(images), std::move(text), t.config.text.rope.positions_per_token());
  }

 private:
  static const Qwen2vlSettings& settings(const ModelConfig& c) { return static_cast<const Qwen2vlSettings&>(*c.settings); }
};

}  // namespace

const Architecture& qwen2_vl_architecture() {
  static const Qwen2vl a;
  return a;
}

}  // namespace vkvlm
