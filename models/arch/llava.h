#pragma once
// LLaVA's parts that LLaVA-NeXT builds on: its config fields, the CLIP (or SigLIP) tower with
// LLaVA's feature selection (a hidden layer, with or without the class token), and the MLP
// projector. Used by llava.cpp and llava_next.cpp only.
#include <memory>
#include <string>
#include <vector>

#include "models/arch/architecture.h"
#include "models/vit.h"

namespace vkvlm::arch {

struct LlavaSettings : ArchSettings {
  int32_t image_token = 32000;
  int feature_layer = -2;        // hidden_states[feature_layer]
  bool keep_class_token = false; // vision_feature_select_strategy "full"
  bool projector_bias = true;
  VisionConfig vision;
  std::shared_ptr<const ImageProcessor> processor;
  std::vector<std::pair<int, int>> grid_pinpoints;  // LLaVA-NeXT (height, width)
};

// config.json of a LLaVA-style model (text_config, vision_config, image token, feature layer and
// selection, projector); `s` receives the architecture's fields.
void read_llava_config(const ConfigFields& top, ModelConfig& c, LlavaSettings& s);

// The model folder's image processor: CLIPImageProcessor (or LlavaNextImageProcessor when
// `anyres`), with crops of the tower's size.
std::shared_ptr<const ImageProcessor> llava_processor(const std::string& dir, const LlavaSettings& s, bool anyres);

// The tower and projector: crops -> selected features -> projected features.
class LlavaTower {
 public:
  LlavaTower(gpu::Context& ctx, const ModelConfig& c, const LlavaSettings& s, WeightLoader& loader);
  // Selected features [crops * selected_per_crop(), E] of crops [crops, 3, S, S].
  gpu::Mat features(gpu::Recorder& rec, const gpu::Tensor& pixels, int64_t crops) const;
  // out [rows, text E] = linear_2(gelu(linear_1(in [rows, E])))
  void project(gpu::Recorder& rec, const gpu::Mat& in, const gpu::Mat& out) const;
  int64_t selected_per_crop() const { return selected_; }
  int patches_per_side() const { return side_; }
  uint64_t weight_bytes() const;
  std::string describe() const;  // "CLIP ViT, 23 of 24 layers, width 1024, ..."

 private:
  std::unique_ptr<VisionTransformer> vit_;
  Projection proj1_, proj2_;
  int64_t selected_ = 0;
  int side_ = 0;
  bool drop_class_ = true;
  std::string kind_;
};

// What LLaVA and LLaVA-NeXT prompts share: the rendered chat tokenized with the tokenizer's
// special tokens (as their processors do), each <image> token expanded into its image's rows.
class LlavaFamily : public Architecture {
 public:
  bool has_vision() const override { return true; }
  size_t count_placeholders(const ModelConfig& c, const std::string& text) const override;
  Prompt build_prompt(const PromptTools& t, const Messages& messages, std::vector<ImagePlan> images) const override;

 protected:
  static const LlavaSettings& settings(const ModelConfig& c) { return static_cast<const LlavaSettings&>(*c.settings); }
};

}  // namespace vkvlm::arch
