#pragma once
// The vision side of VLMs: the CLIP ViT tower on the GPU and the projectors that turn its
// features into language-model embeddings (LLaVA's MLP, LLaVA-NeXT's packing with unpadding and
// image_newline, Phi-3-Vision's 2x2 merge with separators).
#include <cstdint>
#include <memory>
#include <vector>

#include "gpu/context.h"
#include "gpu/ops.h"
#include "host/config.h"
#include "host/image.h"
#include "models/weights.h"

namespace vkvlm {

class VisionModel {
 public:
  VisionModel(gpu::Context& ctx, const ModelConfig& cfg, WeightLoader& loader);
  ~VisionModel();

  // Prepares one image for the model (resize, crop/tile, normalize) as the reference processor does.
  ProcessedImage process(const Image& image) const;
  // Projected features [image.tokens, text hidden size] of a processed image, in prompt order.
  gpu::Tensor encode(const ProcessedImage& image) const;
  uint64_t weight_bytes() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace vkvlm
