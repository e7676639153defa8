// LLaVA 1.5: a CLIP ViT's second-to-last layer, an MLP projector, and each <image> token of the
// rendered chat expanded into the image's 576 feature rows.
#include "models/arch/llava.h"

#include "gpu/error.h"
#include "gpu/recorder.h"
#include "models/arch/text_families.h"

namespace vkvlm {
namespace arch {

using gpu::Mat;
using gpu::Tensor;

void read_llava_config(const ConfigFields& top, ModelConfig& c, LlavaSettings& s) {
  const ConfigFields text = top.object("text_config");
  c.text = parse_text_config(text.raw(), text.where(), text_family(text.string("model_type", "llama"), text.where()));
  VisionConfig clip;  // CLIP ViT-L/14-336, what a vision_config leaves out
  clip.model_type = "clip_vision_model";
  s.vision = parse_vision_config(top.object("vision_config").raw(), top.where() + " vision_config", clip);
  if (s.vision.model_type != "clip_vision_model" && s.vision.model_type != "siglip_vision_model")
    fail(top.where(), ": vision tower '", s.vision.model_type, "' is not supported (clip_vision_model, siglip_vision_model are)");
  if (s.vision.num_channels != 3) fail(top.where(), ": vision towers with ", s.vision.num_channels, " channels are not supported (RGB only)");
  s.image_token = int32_t(top.integer_in("image_token_index", top.integer_in("image_token_id", 32000, 0, c.text.vocab_size - 1), 0,
                                         c.text.vocab_size - 1));
  if (top.has("vision_feature_layer") && !top.raw()["vision_feature_layer"].is_number_integer())
    fail(top.where(), ": vision_feature_layer must be one layer index (lists of layers are not supported)");
  s.feature_layer = int(top.integer_in("vision_feature_layer", -2, -s.vision.num_layers - 1, s.vision.num_layers));
  const std::string select = top.string("vision_feature_select_strategy", "default");
  if (select != "default" && select != "full")
    fail(top.where(), ": vision_feature_select_strategy '", select, "' is not default or full");
  s.keep_class_token = select == "full";
  const std::string act = top.string("projector_hidden_act", "gelu");
  if (act != "gelu") fail(top.where(), ": projector_hidden_act '", act, "' is not supported (gelu is)");
  s.projector_bias = top.boolean("multimodal_projector_bias", true);
  if (top.has("image_grid_pinpoints")) {
    const auto& pins = top.raw()["image_grid_pinpoints"];
    if (!pins.is_array() || pins.size() > 256) fail(top.where(), ": image_grid_pinpoints must be a list of [height, width]");
    for (auto& p : pins) {
      if (!p.is_array() || p.size() != 2 || !p[0].is_number_integer() || !p[1].is_number_integer() || p[0].get<int64_t>() <= 0 ||
          p[1].get<int64_t>() <= 0 || p[0].get<int64_t>() > 16384 || p[1].get<int64_t>() > 16384)
        fail(top.where(), ": image_grid_pinpoints entries must be [height, width] in pixels (at most 16384)");
      s.grid_pinpoints.push_back({int(p[0].get<int64_t>()), int(p[1].get<int64_t>())});
    }
  }
}

LlavaTower::LlavaTower(gpu::Context& ctx, const ModelConfig& c, const LlavaSettings& s, WeightLoader& loader) {
  const auto& store = loader.store();
  const VisionConfig& v = s.vision;
  const std::string vp = find_prefix(store, {"model.vision_tower.vision_model.", "model.vision_tower.", "vision_tower.vision_model.", "vision_model."},
                                     "embeddings.patch_embedding.weight", "vision tower");
  const std::string pp = find_prefix(store, {"model.multi_modal_projector.", "multi_modal_projector."}, "linear_1.weight",
                                     "multi_modal_projector.linear_1");
  const bool siglip = v.model_type == "siglip_vision_model";
  kind_ = siglip ? "SigLIP" : "CLIP";
  // hidden_states[k] is the output of layer k (0: the embeddings), so feature layer L needs L
  // layers (num_layers + 1 + L when negative); the layers past it never need to run.
  const int L = s.feature_layer;
  const int run_layers = L < 0 ? v.num_layers + 1 + L : L;
  VitShape shape = vit_shape(v, run_layers);
  VitTraits traits;
  traits.class_token = !siglip;
  traits.pre_norm = !siglip;
  traits.conv_bias = siglip;
  traits.act = vit_activation(v.hidden_act, c.dir + " vision_config");
  vit_ = std::make_unique<VisionTransformer>(ctx, shape, traits, hf_vit_names(vp), loader);
  side_ = v.image_size / v.patch_size;
  // "default" drops the first token of every crop (CLIP's class token).
  drop_class_ = !s.keep_class_token;
  selected_ = vit_->tokens_per_crop() - (drop_class_ ? 1 : 0);
  const int64_t Et = c.text.hidden_size;
  proj1_ = loader.projection({pp + "linear_1"}, {Et}, v.hidden_size, false, s.projector_bias);
  proj2_ = loader.projection({pp + "linear_2"}, {Et}, Et, false, s.projector_bias);
}

uint64_t LlavaTower::weight_bytes() const { return vit_->weight_bytes() + proj1_.bytes() + proj2_.bytes(); }

std::string LlavaTower::describe() const {
  const auto& s = vit_->shape();
  return "vision tower: " + kind_ + " ViT, " + std::to_string(s.layers) + " layers run, width " + std::to_string(s.width) + ", " +
         std::to_string(s.heads) + " heads, " + std::to_string(s.image_size) + " px, patch " + std::to_string(s.patch) +
         "; MLP projector";
}

Mat LlavaTower::features(gpu::Recorder& rec, const Tensor& pixels, int64_t crops) const {
  return vit_->run_crops(rec, pixels, crops, drop_class_);  // [crops * selected, E]
}

void LlavaTower::project(gpu::Recorder& rec, const Mat& in, const Mat& out) const {
  Mat hidden = Mat::of(rec.scratch(gpu::DType::F32, {in.rows, out.cols}, "projector hidden"));  // [rows, text E]
  proj1_.run(rec, in, hidden);
  gpu::unary(rec, gpu::UnaryOp::GeluErf, hidden, hidden);
  proj2_.run(rec, hidden, out);
}

std::shared_ptr<const ImageProcessor> llava_processor(const std::string& dir, const LlavaSettings& s, bool anyres) {
  auto proc = image_processor_for(dir, "");
  const ImageProcessor* p = proc.get();
  const bool ok = anyres ? dynamic_cast<const AnyresProcessor*>(p) != nullptr : dynamic_cast<const ClipProcessor*>(p) != nullptr;
  if (!ok)
    fail(dir, ": this architecture prepares images with ", anyres ? "LlavaNextImageProcessor" : "CLIPImageProcessor",
         "; preprocessor_config.json names ", p->config().type);
  const auto& pc = p->config();
  if (pc.crop_h != s.vision.image_size || pc.crop_w != s.vision.image_size)
    fail(dir, "/preprocessor_config.json: crop size ", pc.crop_h, "x", pc.crop_w, " differs from the vision tower's ",
         s.vision.image_size);
  return proc;
}

size_t LlavaFamily::count_placeholders(const ModelConfig& c, const std::string& text) const {
  return count_substrings(text, "<image>");
}

Prompt LlavaFamily::build_prompt(const PromptTools& t, const Messages& messages, std::vector<ImagePlan> images) const {
  std::string text = t.render(messages);
  auto ids = t.tokenizer.encode(text, true);
  return expand_image_tokens(ids, settings(t.config).image_token, std::move(images), std::move(text), 1);
}

}  // namespace arch

namespace {

using namespace arch;

class LlavaVision : public VisionPath {
 public:
  LlavaVision(gpu::Context& ctx, const ModelConfig& c, const LlavaSettings& s, WeightLoader& loader)
      : ctx_(ctx), c_(c), s_(s), tower_(ctx, c, s, loader) {}

  ImagePlan plan(const Image& image) const override {
    ImagePlan p;
    p.pixels = s_.processor->process(image);
    p.tokens = tower_.selected_per_crop();
    p.hash = image.hash ^ 0x4C4C41564131ull;
    return p;
  }

  Tensor encode(const ImagePlan& plan) const override {
    const auto& px = plan.pixels;
    gpu::Recorder rec(ctx_);
    Tensor pixels = upload_pixels(rec, px);
    Mat feats = tower_.features(rec, pixels, px.rows);  // [tokens, E]
    Tensor out = ctx_.tensor(gpu::DType::F32, {plan.tokens, c_.text.hidden_size}, "image features");
    tower_.project(rec, feats, Mat::of(out));
    rec.submit();
    return out;
  }

  uint64_t weight_bytes() const override { return tower_.weight_bytes(); }
  std::vector<std::string> describe() const override {
    return {tower_.describe(), "image processor: " + s_.processor->config().type + ", " + std::to_string(s_.vision.image_size) +
                                   " px crop; " + std::to_string(tower_.selected_per_crop()) + " image tokens per image"};
  }

 private:
  gpu::Context& ctx_;
  const ModelConfig& c_;
  const LlavaSettings& s_;
  LlavaTower tower_;
};

class Llava : public LlavaFamily {
 public:
  void read_config(const ConfigFields& top, const std::string& dir, ModelConfig& c) const override {
    auto s = std::make_shared<LlavaSettings>();
    read_llava_config(top, c, *s);
    s->processor = llava_processor(dir, *s, false);
    c.settings = s;
  }
  std::unique_ptr<VisionPath> load_vision(gpu::Context& ctx, const ModelConfig& c, WeightLoader& loader) const override {
    return std::make_unique<LlavaVision>(ctx, c, settings(c), loader);
  }
};

}  // namespace

const Architecture& llava_architecture() {
  static const Llava a;
  return a;
}

}  // namespace vkvlm
