// LLaVA-NeXT (1.6): the image cut into the tiles of its best-fitting resolution plus a base view,
// each tile through LLaVA's tower and projector, the tiles' features laid out as one grid,
// unpadded to the image's aspect, with image_newline after every row, the base view first.
#include "models/arch/llava.h"

#include "gpu/error.h"
#include "gpu/recorder.h"

namespace vkvlm {
namespace {

using namespace arch;
using gpu::Mat;
using gpu::Tensor;

class LlavaNextVision : public VisionPath {
 public:
  LlavaNextVision(gpu::Context& ctx, const ModelConfig& c, const LlavaSettings& s, WeightLoader& loader)
      : ctx_(ctx), c_(c), s_(s), tower_(ctx, c, s, loader) {
    const auto& store = loader.store();
    const std::string nl = store.has("model.image_newline") ? "model.image_newline" : "image_newline";
    newline_ = loader.f32(nl, {c.text.hidden_size});
  }

  ImagePlan plan(const Image& image) const override {
    ImagePlan p;
    p.pixels = s_.processor->process(image);
    const int side = tower_.patches_per_side();
    const int64_t per_crop = tower_.selected_per_crop();
    const auto l = anyres_layout(image.height, image.width, p.pixels.grid_rows, p.pixels.grid_cols, side);
    // The base view's rows, then the unpadded grid row by row, each row followed by the
    // newline (the row after all projected ones).
    const int64_t newline = p.pixels.rows * per_crop;
    for (int64_t i = 0; i < per_crop; ++i) p.order.push_back(int32_t(i));
    for (int r = 0; r < l.feature_rows; ++r) {
      const int fr = r + l.row_offset;
      for (int col = 0; col < l.feature_cols; ++col) {
        const int fc = col + l.col_offset;
        const int64_t crop = 1 + int64_t(fr / side) * p.pixels.grid_cols + fc / side;
        p.order.push_back(int32_t(crop * per_crop + int64_t(fr % side) * side + fc % side));
      }
      p.order.push_back(int32_t(newline));
    }
    p.tokens = int64_t(p.order.size());
    p.hash = image.hash ^ 0x4C4C41564E58ull;
    return p;
  }

  Tensor encode(const ImagePlan& plan) const override {
    const auto& px = plan.pixels;
    const int64_t Et = c_.text.hidden_size;
    gpu::Recorder rec(ctx_);
    Tensor pixels = upload_pixels(rec, px);
    Mat feats = tower_.features(rec, pixels, px.rows);  // [crops * per_crop, E]
    const int64_t rows = feats.rows;
    // Every crop's features projected, then the newline row after them.
    Tensor projected = rec.scratch(gpu::DType::F32, {rows + 1, Et}, "projected crops");  // [rows + 1, Et]
    tower_.project(rec, feats, Mat::of(projected).row_range(0, rows));
    rec.copy(newline_, 0, projected, uint64_t(rows) * uint64_t(Et) * 4, uint64_t(Et) * 4);
    Tensor out = ctx_.tensor(gpu::DType::F32, {plan.tokens, Et}, "image features");
    gather_rows(rec, projected, rows + 1, Et, plan.order, Mat::of(out));
    rec.submit();
    return out;
  }

  uint64_t weight_bytes() const override { return tower_.weight_bytes() + newline_.bytes(); }
  std::vector<std::string> describe() const override {
    const auto& pins = static_cast<const AnyresProcessor&>(*s_.processor).config().grid_pinpoints;
    const int64_t base = tower_.selected_per_crop(), side = tower_.patches_per_side();
    int64_t most = 0;
    for (auto [h, w] : pins) most = std::max<int64_t>(most, int64_t(h / s_.vision.image_size * side) * (w / s_.vision.image_size * side + 1));
    return {tower_.describe() + ", image_newline",
            "image processor: " + s_.processor->config().type + " (anyres over " + std::to_string(pins.size()) +
                " resolutions); " + std::to_string(base) + " to " + std::to_string(base + most) +
                " image tokens per image, by its size"};
  }

 private:
  gpu::Context& ctx_;
  const ModelConfig& c_;
  const LlavaSettings& s_;
  LlavaTower tower_;
  Tensor newline_;  // f32 [text E]
};

class LlavaNext : public LlavaFamily {
 public:
  void read_config(const ConfigFields& top, const std::string& dir, ModelConfig& c) const override {
    auto s = std::make_shared<LlavaSettings>();
    read_llava_config(top, c, *s);
    if (s->keep_class_token) fail(top.where(), ": LLaVA-NeXT is supported with vision_feature_select_strategy 'default'");
    auto proc = llava_processor(dir, *s, true);
    // The tiling resolutions: the processor's own, else config.json's.
    ProcessorConfig pc = proc->config();
    if (pc.grid_pinpoints.empty()) pc.grid_pinpoints = s->grid_pinpoints;
    if (pc.grid_pinpoints.empty()) fail(top.where(), " has no image_grid_pinpoints (nor has preprocessor_config.json)");
    s->processor = std::make_shared<AnyresProcessor>(pc);
    c.settings = s;
  }
  std::unique_ptr<VisionPath> load_vision(gpu::Context& ctx, const ModelConfig& c, WeightLoader& loader) const override {
    return std::make_unique<LlavaNextVision>(ctx, c, settings(c), loader);
  }
};

}  // namespace

const Architecture& llava_next_architecture() {
  static const LlavaNext a;
  return a;
}

}  // namespace vkvlm
