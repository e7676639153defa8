#pragma once
// The pixel pipelines of the Hugging Face image processors, reproduced from their definitions:
// PIL's resampling of 8-bit images (separable, antialiased, fixed point), torch's bicubic
// interpolation of float images, CLIPImageProcessor, LLaVA-NeXT's anyres tiling and
// Phi-3-Vision's HD transform.
#include <array>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "host/image.h"

namespace vkvlm {

enum class PilFilter { Bilinear, Bicubic };
// PIL Image.resize(size, filter) of an 8-bit RGB image.
Image pil_resize(const Image& in, int out_w, int out_h, PilFilter filter);

// torch.nn.functional.interpolate(mode="bicubic", align_corners=False) of a float CHW image.
std::vector<float> torch_bicubic(const std::vector<float>& chw, int channels, int in_h, int in_w, int out_h, int out_w);

struct ProcessorConfig {
  std::string type;  // CLIPImageProcessor, LlavaNextImageProcessor, Phi3VImageProcessor
  int shortest_edge = 336;
  int crop_h = 336, crop_w = 336;
  bool do_resize = true, do_center_crop = true, do_rescale = true, do_normalize = true;
  double rescale_factor = 1.0 / 255.0;
  std::array<float, 3> mean{0.48145466f, 0.4578275f, 0.40821073f};
  std::array<float, 3> std{0.26862954f, 0.26130258f, 0.27577711f};
  PilFilter resample = PilFilter::Bicubic;
  int num_crops = 16;  // Phi-3-Vision
  std::vector<std::pair<int, int>> grid_pinpoints;  // LLaVA-NeXT (height, width)

  // From preprocessor_config.json (missing fields keep their defaults; wrong ones are errors).
  static ProcessorConfig from_json(const nlohmann::json& j, const std::string& where);
};

// CLIPImageProcessor: shortest-edge resize, center crop, rescale, normalize -> CHW floats.
std::vector<float> clip_preprocess(const Image& img, const ProcessorConfig& cfg);

// LLaVA-NeXT: the pinpoint (height, width) that best fits the image.
std::pair<int, int> select_best_resolution(int height, int width, const std::vector<std::pair<int, int>>& pinpoints);
// The rows of the unpadded feature grid and the features they hold (LLaVA-NeXT's count).
struct AnyresLayout {
  int grid_rows = 0, grid_cols = 0;  // tiles
  int feature_rows = 0, feature_cols = 0;  // of the unpadded grid
  int row_offset = 0, col_offset = 0;      // unpadding crop inside the full (tiles * side) grid
};
AnyresLayout anyres_layout(int orig_h, int orig_w, const std::vector<std::pair<int, int>>& pinpoints, int tile,
                           int patches_per_side);
// Base view then tiles (row by row): crops of tile x tile as CHW floats.
std::vector<float> anyres_preprocess(const Image& img, const ProcessorConfig& cfg, int& crops, int& grid_rows,
                                     int& grid_cols);

// Phi-3-Vision: the HD image (transposed when tall, bilinear-resized, white-padded to 336
// multiples) normalized; returns [3, H, W] floats with H, W multiples of 336.
std::vector<float> phi3v_hd_image(const Image& img, const ProcessorConfig& cfg, int& height, int& width);

}  // namespace vkvlm
