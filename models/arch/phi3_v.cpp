// Phi-3-Vision: the HD transform (a global view plus 336-pixel crops of the resized image), a
// CLIP tower's second-to-last layer, every 2x2 patches merged into one 4C row with sub_GN after
// each row of merged patches and glb_GN between the crops and the global view, an MLP
// projector; the prompt split at <|image_N|> tags, each text chunk tokenized on its own.
#include <regex>
#include <set>

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

const std::regex& image_tag() {
  static const std::regex tag(R"(<\|image_(\d+)\|>)");
  return tag;
}

struct Phi3vSettings : ArchSettings {
  VisionConfig vision;
  int64_t image_dim_out = 1024;
  bool sub_first = true;  // hd_transform_order sub_glb (else glb_sub)
  std::shared_ptr<const ImageProcessor> processor;
};

class Phi3vVision : public VisionPath {
 public:
  Phi3vVision(gpu::Context& ctx, const ModelConfig& c, const Phi3vSettings& s, WeightLoader& loader) : ctx_(ctx), c_(c), s_(s) {
    const VisionConfig& v = s.vision;
    VitShape shape = vit_shape(v, v.num_layers - 1);  // hidden_states[-2]
    VitTraits traits;
    traits.class_token = true;
    traits.pre_norm = true;
    traits.act = vit_activation(v.hidden_act, c.dir + " vision_config");
    const std::string ve = "model.vision_embed_tokens.";
    vit_ = std::make_unique<VisionTransformer>(ctx, shape, traits, hf_vit_names(ve + "img_processor.vision_model."), loader);
    side_ = v.image_size / v.patch_size;
    if (side_ % 2) fail(c.dir, ": Phi-3-Vision merges 2x2 patches, but its crops are ", side_, " patches wide");
    const int64_t C4 = 4 * v.hidden_size, Et = c.text.hidden_size;
    proj1_ = loader.projection({ve + "img_projection.0"}, {Et}, C4, false, true);
    proj2_ = loader.projection({ve + "img_projection.2"}, {Et}, Et, false, true);
    auto sub = loader.host_f32(ve + "sub_GN", C4), glb = loader.host_f32(ve + "glb_GN", C4);
    separators_ = ctx.tensor(gpu::DType::F32, {8, v.hidden_size}, "phi3v separators");  // sub_GN, glb_GN as 4 rows of C each
    sub.insert(sub.end(), glb.begin(), glb.end());
    ctx.upload(separators_, sub.data(), sub.size() * 4);
  }

  ImagePlan plan(const Image& image) const override {
    ImagePlan p;
    p.pixels = s_.processor->process(image);
    const int64_t rows = p.pixels.grid_rows, cols = p.pixels.grid_cols, half = side_ / 2;
    const int64_t n_sel = int64_t(side_) * side_;  // patches per crop (class token dropped)
    const int64_t features = p.pixels.rows * n_sel;
    const int32_t sub_gn = int32_t(features), glb_gn = int32_t(features + 4);
    // Rows of C gathered in groups of 4 = one merged 4C row each.
    auto merged = [&](int64_t crop, int64_t a, int64_t b) {
      for (int dy = 0; dy < 2; ++dy)
        for (int dx = 0; dx < 2; ++dx) p.order.push_back(int32_t(crop * n_sel + (2 * a + dy) * side_ + (2 * b + dx)));
    };
    auto separator = [&](int32_t base) {
      for (int k = 0; k < 4; ++k) p.order.push_back(base + k);
    };
    auto sub = [&] {
      for (int64_t i = 0; i < rows * half; ++i) {
        for (int64_t j = 0; j < cols * half; ++j) merged(1 + (i / half) * cols + (j / half), i % half, j % half);
        separator(sub_gn);
      }
    };
    auto glb = [&] {
      for (int64_t a = 0; a < half; ++a) {
        for (int64_t b = 0; b < half; ++b) merged(0, a, b);
        separator(sub_gn);
      }
    };
    if (s_.sub_first) {
      sub();
      separator(glb_gn);
      glb();
    } else {
      glb();
      separator(glb_gn);
      sub();
    }
    p.tokens = int64_t(p.order.size()) / 4;
    p.hash = image.hash ^ 0x5048493356ull;
    return p;
  }

  Tensor encode(const ImagePlan& plan) const override {
    const auto& px = plan.pixels;
    const int64_t C = s_.vision.hidden_size, Et = c_.text.hidden_size;
    gpu::Recorder rec(ctx_);
    Tensor pixels = upload_pixels(rec, px);
    Mat feats = vit_->run_crops(rec, pixels, px.rows, /*drop_first=*/true);  // [crops * patches, C]
    const int64_t rows = feats.rows;
    Tensor src = rec.scratch(gpu::DType::F32, {rows + 8, C}, "phi3v merge source");  // features, then the separators
    rec.copy(feats.t, 0, src, 0, uint64_t(rows) * uint64_t(C) * 4);
    rec.copy(separators_, 0, src, uint64_t(rows) * uint64_t(C) * 4, uint64_t(8 * C) * 4);
    Tensor merged = rec.scratch(gpu::DType::F32, {plan.tokens * 4, C}, "phi3v merged");  // = [tokens, 4C]
    gather_rows(rec, src, rows + 8, C, plan.order, Mat::of(merged));
    Mat hidden = Mat::of(rec.scratch(gpu::DType::F32, {plan.tokens, Et}, "projector hidden"));
    Tensor out = ctx_.tensor(gpu::DType::F32, {plan.tokens, Et}, "image features");
    proj1_.run(rec, Mat::of(merged, plan.tokens, 4 * C), hidden);
    gpu::unary(rec, gpu::UnaryOp::GeluErf, hidden, hidden);
    proj2_.run(rec, hidden, Mat::of(out));
    rec.submit();
    return out;
  }

  uint64_t weight_bytes() const override { return vit_->weight_bytes() + proj1_.bytes() + proj2_.bytes() + separators_.bytes(); }
  std::vector<std::string> describe() const override {
    const auto& s = vit_->shape();
    const int64_t half = side_ / 2, crops = s_.processor->config().num_crops;
    return {"vision tower: CLIP ViT, " + std::to_string(s.layers) + " layers run, width " + std::to_string(s.width) + ", " +
                std::to_string(s.heads) + " heads, " + std::to_string(s.image_size) + " px; 2x2 merge, glb_GN/sub_GN, MLP projector",
            "image processor: " + s_.processor->config().type + " (HD transform, up to " + std::to_string(crops) +
                " crops); " + std::to_string((half * half + half) * 2 + 1) + " or more image tokens per image, by its size"};
  }

 private:
  gpu::Context& ctx_;
  const ModelConfig& c_;
  const Phi3vSettings& s_;
  std::unique_ptr<VisionTransformer> vit_;
  Projection proj1_, proj2_;
  Tensor separators_;
  int side_ = 0;
};

class Phi3v : public Architecture {
 public:
  void read_config(const ConfigFields& top, const std::string& dir, ModelConfig& c) const override {
    auto s = std::make_shared<Phi3vSettings>();
    c.text = parse_text_config(top.raw(), top.where(), text_family("phi3", top.where()));
    // A real Phi-3-Vision config has no vision_config: it means CLIP ViT-L/14 at 336 pixels.
    VisionConfig clip;
    clip.model_type = "clip_vision_model";
    s->vision = top.has("vision_config") ? parse_vision_config(top.object("vision_config").raw(), top.where() + " vision_config", clip)
                                         : clip;
    if (s->vision.num_channels != 3) fail(top.where(), ": vision towers with ", s->vision.num_channels, " channels are not supported");
    s->image_dim_out = s->vision.hidden_size;
    if (top.has_object("img_processor"))
      s->image_dim_out = top.object("img_processor").integer_in("image_dim_out", s->vision.hidden_size, 1, 1 << 20);
    if (s->image_dim_out != s->vision.hidden_size)
      fail(top.where(), ": img_processor.image_dim_out ", s->image_dim_out, " differs from the tower's width ", s->vision.hidden_size);
    if (top.has_object("embd_layer")) {
      const std::string order = top.object("embd_layer").string("hd_transform_order", "sub_glb");
      if (order != "sub_glb" && order != "glb_sub") fail(top.where(), ": hd_transform_order '", order, "' is not sub_glb or glb_sub");
      s->sub_first = order == "sub_glb";
    }
    s->processor = image_processor_for(dir, "Phi3VImageProcessor");
    if (!dynamic_cast<const Phi3vProcessor*>(s->processor.get()))
      fail(dir, ": Phi-3-Vision prepares images with Phi3VImageProcessor; preprocessor_config.json names ", s->processor->config().type);
    if (s->vision.image_size != 336) fail(top.where(), ": Phi-3-Vision's HD transform cuts 336-pixel crops; the tower takes ", s->vision.image_size);
    c.settings = s;
  }
  bool has_vision() const override { return true; }
  std::unique_ptr<VisionPath> load_vision(gpu::Context& ctx, const ModelConfig& c, WeightLoader& loader) const override {
    return std::make_unique<Phi3vVision>(ctx, c, static_cast<const Phi3vSettings&>(*c.settings), loader);
  }
  size_t count_placeholders(const ModelConfig& c, const std::string& text) const override {
    std::set<int> tags;
    for (auto it = std::sregex_iterator(text.begin(), text.end(), image_tag()); it != std::sregex_iterator(); ++it)
      tags.insert(std::stoi((*it)[1].str().substr(0, 6)));
    return tags.size();
  }

  Prompt build_prompt(const PromptTools& t, const Messages& messages, std::vector<ImagePlan> images) const override {
    // Its template wants one string per message: image parts become <|image_N|> tags, numbered
    // after the tags the text already has.
    Messages flat = Messages::array();
    size_t numbered = 0;
    for (const auto& m : messages) {
      if (m.contains("content")) numbered += count_placeholders(t.config, content_text(m["content"]));
    }
    for (const auto& m : messages) {
      Messages out = m;
      if (m.contains("content") && m["content"].is_array()) {
        std::string s;
        for (const auto& part : m["content"]) {
          if (part.value("type", "") == "image") s += "<|image_" + std::to_string(++numbered) + "|>\n";
          else s += part["text"].get<std::string>();
        }
        out["content"] = s;
      }
      flat.push_back(out);
    }
    std::string text = t.render(flat);
    // The prompt splits at the tags; each text chunk is tokenized on its own with its BOS (as
    // Phi3VProcessor does), and image N takes its rows where its tag is.
    std::vector<std::string> chunks;
    std::vector<int> tags;
    size_t last = 0;
    for (auto it = std::sregex_iterator(text.begin(), text.end(), image_tag()); it != std::sregex_iterator(); ++it) {
      chunks.push_back(text.substr(last, size_t(it->position()) - last));
      const std::string num = (*it)[1].str();
      tags.push_back(num.size() > 6 ? 1 << 30 : std::stoi(num));
      last = size_t(it->position() + it->length());
    }
    chunks.push_back(text.substr(last));
    std::set<int> unique(tags.begin(), tags.end());
    if (unique.size() != images.size() ||
        (!unique.empty() && (*unique.begin() != 1 || *unique.rbegin() != int(images.size()))))
      fail("the prompt has image tags for ", unique.size(), " image(s) (<|image_1|> ... in order) but ", images.size(),
           " image(s) were given");
    PromptBuilder b(1);
    for (size_t k = 0; k < chunks.size(); ++k) {
      b.text(t.tokenizer.encode(chunks[k], true));
      if (k < tags.size()) {
        const size_t img = size_t(tags[k] - 1);
        b.image(img, images[img], -int32_t(img) - 1);
      }
    }
    return b.finish(std::move(text), std::move(images));
  }
};

}  // namespace

const Architecture& phi3_v_architecture() {
  static const Phi3v a;
  return a;
}

}  // namespace vkvlm
