#include "host/image.h"

#include <jpeglib.h>
#include <jerror.h>
#include <webp/decode.h>
#include <webp/demux.h>

#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "base/error.h"
#include "base/files.h"

#define STBI_NO_STDIO
#include <stb/stb_image.h>

namespace vkvlm {
namespace {

uint64_t fnv1a(const uint8_t* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

bool starts_with(const std::vector<uint8_t>& b, const char* magic, size_t offset = 0) {
  size_t n = std::strlen(magic);
  return b.size() >= offset + n && std::memcmp(b.data() + offset, magic, n) == 0;
}

// `decoding`: the pixels are decoded next (limits.on_size hears of them); otherwise a header's early check.
void check_size(int w, int h, const std::string& source, const ImageLimits& limits, bool decoding = true) {
  if (w <= 0 || h <= 0) fail("image ", source, " has no pixels");
  if (uint64_t(w) * uint64_t(h) > limits.max_pixels)
    fail("image ", source, " is ", w, "x", h, " pixels, more than the limit of ", limits.max_pixels, " pixels");
  if (decoding && limits.on_size) limits.on_size(w, h);
}

// Like PIL's convert("RGB"): grayscale is replicated, alpha is dropped (not composited).
Image from_channels(const uint8_t* px, int w, int h, int channels, const std::string& source) {
  Image img;
  img.width = w;
  img.height = h;
  img.source = source;
  img.rgb.resize(size_t(w) * size_t(h) * 3);
  for (size_t i = 0; i < size_t(w) * size_t(h); ++i) {
    const uint8_t* s = px + i * size_t(channels);
    uint8_t* d = img.rgb.data() + i * 3;
    if (channels >= 3) {
      d[0] = s[0];
      d[1] = s[1];
      d[2] = s[2];
    } else {
      d[0] = d[1] = d[2] = s[0];
    }
  }
  img.hash = fnv1a(img.rgb.data(), img.rgb.size()) ^ (uint64_t(w) << 32) ^ uint64_t(h);
  return img;
}

// JPEG through libjpeg(-turbo) with its defaults (ISLOW IDCT, fancy upsampling), as PIL decodes
// it, so the pixels are PIL's exactly. libjpeg reports errors by longjmp: nothing in here needs
// destruction between setjmp and a jump.
struct JpegErrors {
  jpeg_error_mgr mgr;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
  bool truncated;
};

void jpeg_error_exit(j_common_ptr c) {
  auto* e = reinterpret_cast<JpegErrors*>(c->err);
  (*c->err->format_message)(c, e->message);
  longjmp(e->jump, 1);
}

void jpeg_note_warning(j_common_ptr c, int level) {
  auto* e = reinterpret_cast<JpegErrors*>(c->err);
  // Data that ends early is a truncated file (PIL refuses it too); other warnings are not errors.
  if (level < 0 && c->err->msg_code == JWRN_JPEG_EOF) e->truncated = true;
}

enum class JpegResult { Ok, Error, Unsupported, TooLarge };

// Decodes baseline/progressive YCbCr, RGB and grayscale JPEGs into RGB; other color spaces (CMYK,
// YCCK) are left to the fallback decoder.
JpegResult decode_jpeg(const uint8_t* data, size_t n, const ImageLimits& limits, std::vector<uint8_t>& rgb, int& w, int& h,
                       char* message) {
  jpeg_decompress_struct cinfo;
  JpegErrors err;
  err.truncated = false;
  err.message[0] = 0;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_error_exit;
  err.mgr.emit_message = jpeg_note_warning;
  if (setjmp(err.jump)) {
    std::snprintf(message, JMSG_LENGTH_MAX, "%s", err.message);
    jpeg_destroy_decompress(&cinfo);
    return JpegResult::Error;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, static_cast<unsigned long>(n));
  jpeg_read_header(&cinfo, TRUE);
  const J_COLOR_SPACE cs = cinfo.jpeg_color_space;
  if (cs != JCS_YCbCr && cs != JCS_GRAYSCALE && cs != JCS_RGB) {
    jpeg_destroy_decompress(&cinfo);
    return JpegResult::Unsupported;
  }
  w = int(cinfo.image_width);
  h = int(cinfo.image_height);
  if (w <= 0 || h <= 0 || uint64_t(w) * uint64_t(h) > limits.max_pixels) {
    jpeg_destroy_decompress(&cinfo);
    return JpegResult::TooLarge;
  }
  if (limits.on_size) {
    try {
      limits.on_size(w, h);
    } catch (...) {
      jpeg_destroy_decompress(&cinfo);
      throw;
    }
  }
  cinfo.out_color_space = JCS_RGB;
  cinfo.dct_method = JDCT_ISLOW;
  cinfo.do_fancy_upsampling = TRUE;
  jpeg_start_decompress(&cinfo);
  rgb.resize(size_t(w) * size_t(h) * 3);
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = rgb.data() + size_t(cinfo.output_scanline) * size_t(w) * 3;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  if (err.truncated) {
    std::snprintf(message, JMSG_LENGTH_MAX, "the file ends before the image data does");
    return JpegResult::Error;
  }
  return JpegResult::Ok;
}

}  // namespace

Image decode_image(const std::vector<uint8_t>& bytes, const std::string& source, const ImageLimits& limits) {
  if (bytes.empty()) fail("image ", source, " is empty");
  if (bytes.size() > limits.max_file_bytes)
    fail("image ", source, " is ", bytes.size(), " bytes, more than the limit of ", limits.max_file_bytes);
  if (starts_with(bytes, "RIFF") && starts_with(bytes, "WEBP", 8)) {
    // First frame of a (possibly animated) WebP.
    WebPData data{bytes.data(), bytes.size()};
    WebPDemuxer* demux = WebPDemux(&data);
    if (!demux) fail("image ", source, " is not a valid WebP file (corrupt or truncated)");
    WebPIterator it;
    if (!WebPDemuxGetFrame(demux, 1, &it)) {
      WebPDemuxDelete(demux);
      fail("image ", source, " is a WebP file without frames");
    }
    int w = 0, h = 0;
    if (!WebPGetInfo(it.fragment.bytes, it.fragment.size, &w, &h)) {
      WebPDemuxReleaseIterator(&it);
      WebPDemuxDelete(demux);
      fail("image ", source, " is not a valid WebP file (corrupt or truncated)");
    }
    try {
      check_size(w, h, source, limits);
    } catch (...) {
      WebPDemuxReleaseIterator(&it);
      WebPDemuxDelete(demux);
      throw;
    }
    uint8_t* px = WebPDecodeRGBA(it.fragment.bytes, it.fragment.size, &w, &h);
    WebPDemuxReleaseIterator(&it);
    WebPDemuxDelete(demux);
    if (!px) fail("image ", source, " could not be decoded as WebP (corrupt or truncated)");
    Image img = from_channels(px, w, h, 4, source);
    WebPFree(px);
    return img;
  }
  if (bytes.size() >= 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF) {
    std::vector<uint8_t> rgb;
    int w = 0, h = 0;
    char message[JMSG_LENGTH_MAX];
    switch (decode_jpeg(bytes.data(), bytes.size(), limits, rgb, w, h, message)) {
      case JpegResult::Ok:
        return from_channels(rgb.data(), w, h, 3, source);
      case JpegResult::TooLarge:
        check_size(w, h, source, limits, false);
        fail("image ", source, " has no pixels");
      case JpegResult::Error:
        fail("image ", source, " could not be decoded as JPEG (corrupt or truncated): ", message);
      case JpegResult::Unsupported:
        break;  // CMYK and YCCK: stb_image below
    }
  }
  // The size from the header of the formats stb_image decodes, checked against the limits before
  // stb sees the file (its reason for refusing a large image is overwritten by the probes of
  // other formats that follow).
  auto be32 = [&](size_t at) { return uint32_t(bytes[at]) << 24 | uint32_t(bytes[at + 1]) << 16 | uint32_t(bytes[at + 2]) << 8 | bytes[at + 3]; };
  auto le16 = [&](size_t at) { return uint32_t(bytes[at]) | uint32_t(bytes[at + 1]) << 8; };
  auto le32 = [&](size_t at) { return le16(at) | le16(at + 2) << 16; };
  if (starts_with(bytes, "\x89PNG\r\n\x1a\n") && bytes.size() >= 24 && starts_with(bytes, "IHDR", 12)) {
    const uint32_t pw = be32(16), ph = be32(20);
    if (pw == 0 || ph == 0 || uint64_t(pw) * ph > limits.max_pixels)
      check_size(int(std::min<uint32_t>(pw, INT32_MAX)), int(std::min<uint32_t>(ph, INT32_MAX)), source, limits, false);
  } else if ((starts_with(bytes, "GIF87a") || starts_with(bytes, "GIF89a")) && bytes.size() >= 10) {
    check_size(int(le16(6)), int(le16(8)), source, limits, false);
  } else if (starts_with(bytes, "BM") && bytes.size() >= 26) {
    const int32_t bw = int32_t(le32(18)), bh = int32_t(le32(22));
    check_size(bw, bh == INT32_MIN ? 0 : std::abs(bh), source, limits, false);
  }
  int w = 0, h = 0, channels = 0;
  if (!stbi_info_from_memory(bytes.data(), int(bytes.size()), &w, &h, &channels))
    fail("image ", source, " is not a supported image (JPEG, PNG, BMP, GIF, TGA, PPM, WebP): ", stbi_failure_reason());
  check_size(w, h, source, limits);
  uint8_t* px = stbi_load_from_memory(bytes.data(), int(bytes.size()), &w, &h, &channels, 0);
  if (!px) fail("image ", source, " could not be decoded (corrupt or truncated): ", stbi_failure_reason());
  Image img = from_channels(px, w, h, channels, source);
  stbi_image_free(px);
  return img;
}

Image load_image_file(const std::string& path, const ImageLimits& limits) {
  const std::string bytes = read_file_bounded(path, limits.max_file_bytes, "image file");
  return decode_image(std::vector<uint8_t>(bytes.begin(), bytes.end()), path, limits);
}

std::vector<uint8_t> base64_decode(const std::string& s, const std::string& what) {
  static int8_t table[256];
  static bool init = [] {
    std::memset(table, -1, sizeof(table));
    const char* a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (int i = 0; i < 64; ++i) table[uint8_t(a[i])] = int8_t(i);
    table[uint8_t('-')] = 62;  // URL-safe alphabet too
    table[uint8_t('_')] = 63;
    return true;
  }();
  (void)init;
  std::vector<uint8_t> out;
  out.reserve(s.size() * 3 / 4);
  uint32_t acc = 0;
  int bits = 0;
  size_t pad = 0;
  for (char c : s) {
    if (c == '=') {
      ++pad;
      continue;
    }
    if (c == '\n' || c == '\r' || c == ' ' || c == '\t') continue;
    int8_t v = table[uint8_t(c)];
    if (v < 0 || pad) fail(what, " is not valid base64");
    acc = (acc << 6) | uint32_t(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(uint8_t(acc >> bits));
    }
  }
  if (pad > 2) fail(what, " is not valid base64");
  return out;
}

std::string base64_encode(const std::vector<uint8_t>& bytes) {
  const char* a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    uint32_t v = uint32_t(bytes[i]) << 16 | uint32_t(bytes[i + 1]) << 8 | bytes[i + 2];
    out += a[v >> 18];
    out += a[(v >> 12) & 63];
    out += a[(v >> 6) & 63];
    out += a[v & 63];
  }
  if (i < bytes.size()) {
    uint32_t v = uint32_t(bytes[i]) << 16 | (i + 1 < bytes.size() ? uint32_t(bytes[i + 1]) << 8 : 0);
    out += a[v >> 18];
    out += a[(v >> 12) & 63];
    out += i + 1 < bytes.size() ? a[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

Image decode_data_url(const std::string& url, const ImageLimits& limits) {
  if (url.rfind("data:", 0) != 0) fail("image URL is not a data: URL");
  const size_t comma = url.find(',');
  if (comma == std::string::npos) fail("data URL has no ',' before its data");
  const std::string meta = url.substr(5, comma - 5);
  if (meta.find(";base64") == std::string::npos) fail("data URL is not base64-encoded (';base64' missing)");
  const std::string mime = meta.substr(0, meta.find(';'));
  if (!mime.empty() && mime.rfind("image/", 0) != 0) fail("data URL has media type '", mime, "', not an image");
  if ((url.size() - comma) / 4 * 3 > limits.max_file_bytes + 3)
    fail("data URL image is larger than the limit of ", limits.max_file_bytes, " bytes");
  auto bytes = base64_decode(url.substr(comma + 1), "data URL image");
  return decode_image(bytes, "data URL (" + (mime.empty() ? std::string("image") : mime) + ")", limits);
}

}  // namespace vkvlm
