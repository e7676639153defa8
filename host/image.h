#pragma once
// Images: decoding (JPEG, PNG, BMP, GIF, TGA, PPM through stb_image; WebP through libwebp) into 8-bit
// RGB, and the Hugging Face image processors' pixel pipelines.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace vkvlm {

struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // height * width * 3, row-major
  std::string source;        // file name or "data URL", for messages
  uint64_t hash = 0;         // of the decoded pixels
};

struct ImageLimits {
  uint64_t max_file_bytes = 64ull << 20;
  uint64_t max_pixels = 64ull << 20;  // width * height
  // Called with an image's size once its header is read, before its pixels are decoded (a
  // server reserves their memory here); it may throw to refuse the image.
  std::function<void(int width, int height)> on_size;
};

// Decodes an image file's bytes; errors name `source` and the reason.
Image decode_image(const std::vector<uint8_t>& bytes, const std::string& source, const ImageLimits& limits = {});
Image load_image_file(const std::string& path, const ImageLimits& limits = {});
// "data:image/png;base64,...."
Image decode_data_url(const std::string& url, const ImageLimits& limits = {});
std::vector<uint8_t> base64_decode(const std::string& s, const std::string& what);
std::string base64_encode(const std::vector<uint8_t>& bytes);

}  // namespace vkvlm
