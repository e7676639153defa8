// PaliGemma: a SigLIP tower (no class token, learned positions, post-LayerNorm, tanh GELU), one
// linear projector whose output is divided by sqrt(hidden_size), and a Gemma decoder that reads
// the whole prompt bidirectionally (prefix-LM) with positions counted from 1. No chat template:
// the prompt is "<image>" x N, then <bos>, the task prefix and a newline.
#include <cmath>

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

struct PaligemmaSettings : ArchSettings {
  int32_t image_token = 257152, bos_token = 2;
  int64_t image_tokens = 256;    // rows per image: (image_size / patch_size)^2
  int64_t feature_divisor_width = 0;  // image features are divided by sqrt of it (config.json's top-level hidden_size)
  VisionConfig vision;
  std::shared_ptr<const ImageProcessor> processor;
};

// A linear layer's output width as the checkpoint stores it (quantized or not).
int64_t stored_rows(const TensorStore& store, const std::string& module) {
  const StTensor& w = store.get(module + ".weight");
  if (w.shape.size() != 2) fail("tensor ", module, ".weight has shape ", w.shape_string(), "; expected a matrix");
  return w.shape[0];
}

class PaligemmaVision : public VisionPath {
 public:
  PaligemmaVision(gpu::Context& ctx, const ModelConfig& c, const PaligemmaSettings& s, WeightLoader& loader) : ctx_(ctx), c_(c), s_(s) {
    const auto& store = loader.store();
    const VisionConfig& v = s.vision;
    const std::string vp = find_prefix(store, {"vision_tower.vision_model.", "model.vision_tower.vision_model."},
                                       "embeddings.patch_embedding.weight", "SigLIP vision tower");
    const std::string pp = find_prefix(store, {"multi_modal_projector.", "model.multi_modal_projector."}, "linear.weight",
                                       "multi_modal_projector.linear");
    VitShape shape = vit_shape(v, v.num_layers);
    // Conversions of 2024 zero-padded the MLP (4304 -> 4352) to quantize it; the padding adds
    // nothing (gelu(0) = 0 meets zero columns), so take the width the checkpoint has.
    const int64_t stored = stored_rows(store, hf_vit_names(vp).layer(0) + "mlp.fc1");
    if (stored != v.intermediate_size) {
      if (stored < v.intermediate_size || stored % 32)
        fail(store.where(), ": the vision MLP is ", stored, " wide, but vision_config.intermediate_size is ", v.intermediate_size);
      shape.intermediate = stored;
    }
    VitTraits traits;
    traits.post_norm = true;
    traits.conv_bias = true;
    traits.act = vit_activation(v.hidden_act, c.dir + " vision_config");
    vit_ = std::make_unique<VisionTransformer>(ctx, shape, traits, hf_vit_names(vp), loader);
    proj_ = loader.projection({pp + "linear"}, {c.text.hidden_size}, v.hidden_size, false, true);
  }

  ImagePlan plan(const Image& image) const override {
    ImagePlan p;
    p.pixels = s_.processor->process(image);
    p.tokens = s_.image_tokens;
    p.hash = image.hash ^ 0x50414C4947454Dull;
    return p;
  }

  Tensor encode(const ImagePlan& plan) const override {
    const auto& px = plan.pixels;
    const int64_t Et = c_.text.hidden_size;
    gpu::Recorder rec(ctx_);
    Tensor pixels = upload_pixels(rec, px);
    Mat x = vit_->run_crops(rec, pixels, px.rows);  // [tokens, E]
    Tensor out = ctx_.tensor(gpu::DType::F32, {plan.tokens, Et}, "image features");
    proj_.run(rec, x, Mat::of(out));
    gpu::unary(rec, gpu::UnaryOp::Identity, Mat::of(out), Mat::of(out), float(1.0 / std::sqrt(double(s_.feature_divisor_width))));
    rec.submit();
    return out;
  }

  uint64_t weight_bytes() const override { return vit_->weight_bytes() + proj_.bytes(); }
  std::vector<std::string> describe() const override {
    const auto& s = vit_->shape();
    return {"vision tower: SigLIP ViT, " + std::to_string(s.layers) + " layers, width " + std::to_string(s.width) + ", " +
                std::to_string(s.heads) + " heads, " + std::to_string(s.image_size) + " px, patch " + std::to_string(s.patch) +
                "; linear projector",
            "image processor: " + s_.processor->config().type + ", " + std::to_string(s.image_size) + " px; " +
                std::to_string(s_.image_tokens) + " image tokens per image; prompt: <image> tokens, <bos>, the prefix, newline"};
  }

 private:
  gpu::Context& ctx_;
  const ModelConfig& c_;
  const PaligemmaSettings& s_;
  std::unique_ptr<VisionTransformer> vit_;
  Projection proj_;
};

class Paligemma : public Architecture {
 public:
  void read_config(const ConfigFields& top, const std::string& dir, ModelConfig& c) const override {
    auto s = std::make_shared<PaligemmaSettings>();
    c.text = parse_text_config(top.object("text_config").raw(), top.where() + " text_config", text_family("gemma", top.where()));
    VisionConfig siglip;  // SigLIP So400m/14 at 224 pixels: what a vision_config leaves out
    siglip.model_type = "siglip_vision_model";
    siglip.hidden_size = 1152;
    siglip.intermediate_size = 4304;
    siglip.num_layers = 27;
    siglip.num_heads = 16;
    siglip.image_size = 224;
    siglip.patch_size = 14;
    siglip.layer_norm_eps = 1e-6;
    siglip.hidden_act = "gelu_pytorch_tanh";
    s->vision = parse_vision_config(top.object("vision_config").raw(), top.where() + " vision_config", siglip);
    if (s->vision.model_type != "siglip_vision_model")
      fail(top.where(), ": vision tower '", s->vision.model_type, "' is not supported (siglip_vision_model is)");
    if (s->vision.num_channels != 3) fail(top.where(), ": vision towers with ", s->vision.num_channels, " channels are not supported");
    const int64_t V = c.text.vocab_size;
    s->image_token = int32_t(top.integer_in("image_token_index", top.integer_in("image_token_id", 257152, 0, V - 1), 0, V - 1));
    s->bos_token = int32_t(top.integer_in("bos_token_id", 2, 0, V - 1));
    const int64_t side = s->vision.image_size / s->vision.patch_size;
    s->image_tokens = side * side;
    s->feature_divisor_width = top.integer_in("hidden_size", c.text.hidden_size, 1, 1 << 20);
    const int64_t projection = top.integer_in("projection_dim", c.text.hidden_size, 1, 1 << 20);
    if (projection != c.text.hidden_size)
      fail(top.where(), ": projection_dim ", projection, " differs from the language model's hidden_size ", c.text.hidden_size);
    s->processor = image_processor_for(dir, "SiglipImageProcessor");
    if (!dynamic_cast<const SiglipProcessor*>(s->processor.get()))
      fail(dir, ": PaliGemma prepares images with SiglipImageProcessor; preprocessor_config.json names ", s->processor->config().type);
    if (s->processor->config().size_h != s->vision.image_size)
      fail(dir, "/preprocessor_config.json: images of ", s->processor->config().size_h, " px, but the vision tower takes ",
           s->vision.image_size);
    c.settings = s;
  }
  bool has_vision() const override { return true; }
  bool prefix_lm() const override { return true; }
  std::unique_ptr<VisionPath> load_vision(gpu::Context& ctx, const ModelConfig& c, WeightLoader& loader) const override {
    return std::make_unique<PaligemmaVision>(ctx, c, settings(c), loader);
  }
  // "<image>" written at the start of the prefix (as newer processors accept) stands for the image.
  size_t count_placeholders(const ModelConfig& c, const std::string& text) const override {
    size_t n = 0;
    for (size_t at = 0; text.compare(at, 7, "<image>") == 0; at += 7) ++n;
    return n;
  }

  Prompt build_prompt(const PromptTools& t, const Messages& messages, std::vector<ImagePlan> images) const override {
    const auto& s = settings(t.config);
    if (messages.size() != 1 || messages[0].value("role", "") != "user")
      fail("PaliGemma has no chat template: it takes one user turn, whose text is the task prefix (e.g. \"caption en\"), "
           "and at most one image; this conversation has ", messages.size(), " message(s)",
           messages.size() == 1 ? " from role '" + messages[0].value("role", "") + "'" : std::string());
    if (images.size() > 1) fail("PaliGemma takes at most one image per prompt, not ", images.size());
    std::string prefix = messages[0].contains("content") ? content_text(messages[0]["content"]) : "";
    while (prefix.compare(0, 7, "<image>") == 0) prefix.erase(0, 7);
    if (prefix.find("<image>") != std::string::npos)
      fail("PaliGemma's prefix may hold <image> only at its start (the image goes before the text)");
    // "<image>" x N + <bos> + prefix + "\n", tokenized without the tokenizer's own BOS.
    const std::string bos = t.tokenizer.id_to_token(s.bos_token);
    std::string tail = bos + prefix + "\n";
    PromptBuilder b(t.config.text.rope.positions_per_token(), /*first_position=*/1);
    std::string text;
    if (!images.empty()) {
      if (images[0].tokens != s.image_tokens) fail("internal: PaliGemma image of ", images[0].tokens, " tokens");
      b.image(0, images[0], s.image_token);
      for (int64_t i = 0; i < s.image_tokens; ++i) text += "<image>";
    }
    b.text(t.tokenizer.encode(tail, false));
    text += tail;
    Prompt p = b.finish(std::move(text), std::move(images));
    p.bidirectional = {{0, p.size()}};  // the whole prompt attends to itself
    return p;
  }

 private:
  static const PaligemmaSettings& settings(const ModelConfig& c) { return static_cast<const PaligemmaSettings&>(*c.settings); }
};

}  // namespace

const Architecture& paligemma_architecture() {
  static const Paligemma a;
  return a;
}

}  // namespace vkvlm
