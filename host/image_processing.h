#pragma once
// The pixel pipelines of the Hugging Face image processors, reproduced from their definitions:
// PIL's resampling of 8-bit images (separable, antialiased, fixed point), torch's bicubic
// interpolation of float images, and one ImageProcessor per image_processor_type:
// CLIPImageProcessor, SiglipImageProcessor, LlavaNextImageProcessor (anyres tiling),
// Phi3VImageProcessor (HD transform) and Qwen2VLImageProcessor (dynamic resolution, patches).
// Every processor's work and memory are bounded by its output, not by the input's size.
#include <array>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "host/image.h"

namespace vkvlm {

enum class PilFilter { Bilinear, Bicubic };
// PIL Image.resize((out_w, out_h), filter) of an 8-bit RGB image, cropped to the box
// [x0, x0 + w) x [y0, y0 + h) of the resized image (w = 0: the whole width; h likewise). Each
// output pixel depends only on its own source window, so cropping after resizing gives exactly
// these pixels; only they are computed.
Image pil_resize(const Image& in, int out_w, int out_h, PilFilter filter, int x0 = 0, int y0 = 0, int w = 0, int h = 0);

// torch.nn.functional.interpolate(mode="bicubic", align_corners=False) of a float CHW image.
std::vector<float> torch_bicubic(const std::vector<float>& chw, int channels, int in_h, int in_w, int out_h, int out_w);

// preprocessor_config.json's fields, as the processors read them.
struct ProcessorConfig {
  std::string type;                 // image_processor_type (or what processor_class implies)
  int shortest_edge = 336;          // size.shortest_edge
  int size_h = 0, size_w = 0;       // size.{height, width}: resize exactly (0: shortest edge)
  int crop_h = 336, crop_w = 336;
  bool do_resize = true, do_center_crop = true, do_rescale = true, do_normalize = true;
  double rescale_factor = 1.0 / 255.0;
  std::array<float, 3> mean{0.48145466f, 0.4578275f, 0.40821073f};
  std::array<float, 3> std{0.26862954f, 0.26130258f, 0.27577711f};
  PilFilter resample = PilFilter::Bicubic;
  int num_crops = 16;                               // Phi-3-Vision
  std::vector<std::pair<int, int>> grid_pinpoints;  // LLaVA-NeXT (height, width)
  int64_t min_pixels = 56 * 56, max_pixels = 28 * 28 * 1280;  // Qwen2-VL
  int patch_size = 14, merge_size = 2, temporal_patch_size = 2;  // Qwen2-VL

  // From preprocessor_config.json (missing fields keep their defaults; wrong ones are errors).
  static ProcessorConfig from_json(const nlohmann::json& j, const std::string& where);
};

// What a processor makes of one image.
struct ProcessedImage {
  // Crops: [rows = crops, 3, size, size] normalized CHW crops (CLIP, SigLIP, anyres, Phi-3 HD).
  // Patches: [rows = patches, patch_values] flattened patches (Qwen2-VL).
  enum class Layout { Crops, Patches } layout = Layout::Crops;
  std::vector<float> pixels;
  int64_t rows = 0;
  int size = 0;              // crop side (Crops)
  int64_t patch_values = 0;  // values per patch row (Patches)
  // The grid the image was cut into: LLaVA-NeXT's tiles, Phi-3-Vision's HD crops, Qwen2-VL's
  // patches (h, w); 1 x 1 otherwise.
  int grid_rows = 1, grid_cols = 1;
  int orig_width = 0, orig_height = 0;
};

class ImageProcessor {
 public:
  explicit ImageProcessor(ProcessorConfig c) : cfg_(std::move(c)) {}
  virtual ~ImageProcessor() = default;
  const ProcessorConfig& config() const { return cfg_; }
  virtual ProcessedImage process(const Image& image) const = 0;

 protected:
  ProcessorConfig cfg_;
};

// CLIPImageProcessor: shortest-edge resize (or exact resize to size.{height,width}), center
// crop, rescale, normalize: one crop.
class ClipProcessor : public ImageProcessor {
 public:
  explicit ClipProcessor(ProcessorConfig c);
  ProcessedImage process(const Image& image) const override;
  // The crop as CHW floats.
  std::vector<float> crop(const Image& image) const;
};

// SiglipImageProcessor: resize straight to size (aspect ignored), rescale, normalize.
class SiglipProcessor : public ImageProcessor {
 public:
  explicit SiglipProcessor(ProcessorConfig c);
  ProcessedImage process(const Image& image) const override;
};

// LlavaNextImageProcessor: the base view (the image squeezed to one crop), then the tiles of the
// best-fitting pinpoint resolution, row by row; grid = tiles.
class AnyresProcessor : public ImageProcessor {
 public:
  explicit AnyresProcessor(ProcessorConfig c);
  ProcessedImage process(const Image& image) const override;
};

// Phi3VImageProcessor: the global 336x336 view, then the HD image's 336x336 crops; grid = crops.
class Phi3vProcessor : public ImageProcessor {
 public:
  explicit Phi3vProcessor(ProcessorConfig c);
  ProcessedImage process(const Image& image) const override;
};

// Qwen2VLImageProcessor: smart_resize to multiples of patch * merge, the frame repeated
// temporal_patch_size times, patches [(h/p)*(w/p), 3 * t * p * p] in merge-window order (for
// each window row and column, its merge x merge patches in raster order); grid = patches (h, w).
class Qwen2vlProcessor : public ImageProcessor {
 public:
  explicit Qwen2vlProcessor(ProcessorConfig c);
  ProcessedImage process(const Image& image) const override;
};

// Qwen2-VL's smart_resize: (height, width) rounded to multiples of `factor` (Python's round,
// halves to even) with the pixel count brought inside [min_pixels, max_pixels].
std::pair<int, int> smart_resize(int height, int width, int factor, int64_t min_pixels, int64_t max_pixels);

// LLaVA-NeXT: the pinpoint (height, width) that best fits the image.
std::pair<int, int> select_best_resolution(int height, int width, const std::vector<std::pair<int, int>>& pinpoints);
// The unpadded feature grid of a tile grid (LLaVA-NeXT's count and order).
struct AnyresLayout {
  int feature_rows = 0, feature_cols = 0;  // of the unpadded grid
  int row_offset = 0, col_offset = 0;      // unpadding crop inside the full (tiles * side) grid
};
AnyresLayout anyres_layout(int orig_h, int orig_w, int grid_rows, int grid_cols, int patches_per_side);

// Phi-3-Vision: the HD image (transposed when tall, bilinear-resized, white-padded to 336
// multiples) normalized; returns [3, H, W] floats with H, W multiples of 336.
std::vector<float> phi3v_hd_image(const Image& img, const ProcessorConfig& cfg, int& height, int& width);

}  // namespace vkvlm
