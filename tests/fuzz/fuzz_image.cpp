// Image files as anyone who can reach the server may send them: decoded (PNG, JPEG, GIF, BMP,
// TGA, WebP), then through an image processor (each of them, with its usual settings, in turn). The pixel limit is
// smaller here than in the server so that each input stays fast; the checks are the same code.
#include <vector>

#include "host/image.h"
#include "host/image_processing.h"

using namespace vkvlm;

namespace {

std::vector<std::unique_ptr<ImageProcessor>> processors() {
  std::vector<std::unique_ptr<ImageProcessor>> v;
  ProcessorConfig clip;  // LLaVA 1.5: shortest edge 336, center crop
  v.push_back(std::make_unique<ClipProcessor>(clip));
  ProcessorConfig siglip;  // PaliGemma: 224 x 224, bilinear
  siglip.size_h = siglip.size_w = 224;
  siglip.crop_h = siglip.crop_w = 224;
  siglip.resample = PilFilter::Bilinear;
  siglip.mean = siglip.std = {0.5f, 0.5f, 0.5f};
  v.push_back(std::make_unique<SiglipProcessor>(siglip));
  ProcessorConfig anyres;  // LLaVA-NeXT
  anyres.grid_pinpoints = {{336, 672}, {672, 336}, {672, 672}, {1008, 336}, {336, 1008}};
  v.push_back(std::make_unique<AnyresProcessor>(anyres));
  ProcessorConfig phi3v;  // Phi-3-Vision, 4 crops
  phi3v.num_crops = 4;
  v.push_back(std::make_unique<Phi3vProcessor>(phi3v));
  ProcessorConfig qwen;  // Qwen2-VL, small pixel budget
  qwen.mean = {0.48145466f, 0.4578275f, 0.40821073f};
  qwen.min_pixels = 56 * 56;
  qwen.max_pixels = 28 * 28 * 256;
  v.push_back(std::make_unique<Qwen2vlProcessor>(qwen));
  return v;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const auto all = processors();
  ImageLimits limits;
  limits.max_pixels = 4ull << 20;
  Image img;
  try {
    img = decode_image(std::vector<uint8_t>(data, data + size), "fuzz image", limits);
  } catch (const std::exception&) {
    return 0;
  }
  // One processor per input (picked by the input's length), or none: decoding stays fast to fuzz.
  const size_t pick = size % (all.size() + 3);
  if (pick < all.size()) {
    try {
      (void)all[pick]->process(img);
    } catch (const std::exception&) {
    }
  }
  return 0;
}
