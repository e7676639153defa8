#include "host/image_processing.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "base/error.h"

namespace vkvlm {
namespace {

// ---- PIL's resampling (libImaging/Resample.c semantics) ------------------------------------

constexpr int k_precision_bits = 32 - 8 - 2;

double bicubic_filter(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

double bilinear_filter(double x) {
  if (x < 0.0) x = -x;
  if (x < 1.0) return 1.0 - x;
  return 0.0;
}

struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;   // (min, count) per output
  std::vector<int32_t> kk;   // fixed-point weights, ksize per output
};

// Weights for resampling [0, in_size) onto out_size samples, for outputs [first, first + count).
Coeffs precompute_coeffs(int in_size, int out_size, PilFilter f, int first, int count) {
  const double support0 = f == PilFilter::Bicubic ? 2.0 : 1.0;
  const double scale = double(in_size) / double(out_size);
  const double filterscale = std::max(scale, 1.0);
  const double support = support0 * filterscale;
  Coeffs c;
  c.ksize = int(std::ceil(support)) * 2 + 1;
  c.bounds.resize(size_t(count) * 2);
  c.kk.assign(size_t(count) * size_t(c.ksize), 0);
  std::vector<double> k(static_cast<size_t>(c.ksize));
  for (int o = 0; o < count; ++o) {
    const int xx = first + o;
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = int(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = int(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      const double arg = (x + xmin - center + 0.5) * ss;
      const double w = f == PilFilter::Bicubic ? bicubic_filter(arg) : bilinear_filter(arg);
      k[size_t(x)] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; ++x) {
      double w = ww != 0.0 ? k[size_t(x)] / ww : k[size_t(x)];
      // normalize_coeffs_8bpc: round half away from zero into fixed point
      c.kk[size_t(o) * size_t(c.ksize) + size_t(x)] =
          w < 0 ? int32_t(-0.5 + w * (1 << k_precision_bits)) : int32_t(0.5 + w * (1 << k_precision_bits));
    }
    c.bounds[size_t(o) * 2] = xmin;
    c.bounds[size_t(o) * 2 + 1] = xmax;
  }
  return c;
}

uint8_t clip8(int32_t v) {
  if (v >= (1 << (k_precision_bits + 8))) return 255;
  if (v <= 0) return 0;
  return uint8_t(v >> k_precision_bits);
}

// Pixels [x0, x0 + w) x [y0, y0 + h) of an image (inside it).
Image crop_image(const Image& in, int x0, int y0, int w, int h) {
  Image out;
  out.width = w;
  out.height = h;
  out.source = in.source;
  out.hash = in.hash;
  out.rgb.resize(size_t(w) * size_t(h) * 3);
  for (int y = 0; y < h; ++y)
    std::copy_n(in.rgb.data() + (size_t(y0 + y) * size_t(in.width) + size_t(x0)) * 3, size_t(w) * 3,
                out.rgb.data() + size_t(y) * size_t(w) * 3);
  return out;
}

}  // namespace

Image pil_resize(const Image& in, int out_w, int out_h, PilFilter filter, int x0, int y0, int w, int h) {
  if (out_w <= 0 || out_h <= 0) fail("cannot resize image ", in.source, " to ", out_w, "x", out_h);
  if (w == 0) w = out_w - x0;
  if (h == 0) h = out_h - y0;
  if (x0 < 0 || y0 < 0 || w <= 0 || h <= 0 || x0 + w > out_w || y0 + h > out_h)
    fail("internal: crop box outside the resized image");
  const bool need_h = out_w != in.width, need_v = out_h != in.height;
  if (!need_h && !need_v) return x0 == 0 && y0 == 0 && w == in.width && h == in.height ? in : crop_image(in, x0, y0, w, h);
  Image out;
  out.width = w;
  out.height = h;
  out.source = in.source;
  out.hash = in.hash;
  // Horizontal pass over the source rows the vertical pass needs (for the output rows kept),
  // into an 8-bit image (as PIL does), only for the output columns kept.
  Coeffs cv;
  int ybox_first = y0, ybox_last = y0 + h;
  if (need_v) {
    cv = precompute_coeffs(in.height, out_h, filter, y0, h);
    ybox_first = in.height;
    ybox_last = 0;
    for (int o = 0; o < h; ++o) {
      ybox_first = std::min(ybox_first, cv.bounds[size_t(o) * 2]);
      ybox_last = std::max(ybox_last, cv.bounds[size_t(o) * 2] + cv.bounds[size_t(o) * 2 + 1]);
    }
  }
  std::vector<uint8_t> tmp;
  int tmp_w = w;
  const int tmp_h = ybox_last - ybox_first;
  if (need_h) {
    Coeffs ch = precompute_coeffs(in.width, out_w, filter, x0, w);
    tmp.resize(size_t(tmp_w) * size_t(tmp_h) * 3);
    for (int y = 0; y < tmp_h; ++y) {
      const uint8_t* row = in.rgb.data() + size_t(ybox_first + y) * size_t(in.width) * 3;
      for (int xx = 0; xx < w; ++xx) {
        const int xmin = ch.bounds[size_t(xx) * 2], xmax = ch.bounds[size_t(xx) * 2 + 1];
        const int32_t* k = &ch.kk[size_t(xx) * size_t(ch.ksize)];
        int32_t s0 = 1 << (k_precision_bits - 1), s1 = s0, s2 = s0;
        for (int x = 0; x < xmax; ++x) {
          const uint8_t* p = row + size_t(x + xmin) * 3;
          s0 += p[0] * k[x];
          s1 += p[1] * k[x];
          s2 += p[2] * k[x];
        }
        uint8_t* d = tmp.data() + (size_t(y) * size_t(tmp_w) + size_t(xx)) * 3;
        d[0] = clip8(s0);
        d[1] = clip8(s1);
        d[2] = clip8(s2);
      }
    }
  } else {
    tmp = crop_image(in, x0, ybox_first, w, tmp_h).rgb;
  }
  if (!need_v) {
    out.rgb = std::move(tmp);
    return out;
  }
  out.rgb.resize(size_t(w) * size_t(h) * 3);
  for (int yy = 0; yy < h; ++yy) {
    const int ymin = cv.bounds[size_t(yy) * 2] - ybox_first, ymax = cv.bounds[size_t(yy) * 2 + 1];
    const int32_t* k = &cv.kk[size_t(yy) * size_t(cv.ksize)];
    for (int xx = 0; xx < w; ++xx) {
      int32_t s0 = 1 << (k_precision_bits - 1), s1 = s0, s2 = s0;
      for (int y = 0; y < ymax; ++y) {
        const uint8_t* p = tmp.data() + (size_t(ymin + y) * size_t(tmp_w) + size_t(xx)) * 3;
        s0 += p[0] * k[y];
        s1 += p[1] * k[y];
        s2 += p[2] * k[y];
      }
      uint8_t* d = out.rgb.data() + (size_t(yy) * size_t(w) + size_t(xx)) * 3;
      d[0] = clip8(s0);
      d[1] = clip8(s1);
      d[2] = clip8(s2);
    }
  }
  return out;
}

std::vector<float> torch_bicubic(const std::vector<float>& chw, int channels, int in_h, int in_w, int out_h, int out_w) {
  const float A = -0.75f;
  auto conv1 = [&](float x) { return ((A + 2) * x - (A + 3)) * x * x + 1; };
  auto conv2 = [&](float x) { return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A; };
  auto coeffs = [&](float t, float c[4]) {
    c[0] = conv2(t + 1.0f);
    c[1] = conv1(t);
    c[2] = conv1(1.0f - t);
    c[3] = conv2(2.0f - t);
  };
  const float sh = float(in_h) / float(out_h), sw = float(in_w) / float(out_w);
  std::vector<float> out(size_t(channels) * size_t(out_h) * size_t(out_w));
  for (int oy = 0; oy < out_h; ++oy) {
    const float ry = sh * (float(oy) + 0.5f) - 0.5f;
    const int iy = int(std::floor(ry));
    float cy[4];
    coeffs(ry - float(iy), cy);
    for (int ox = 0; ox < out_w; ++ox) {
      const float rx = sw * (float(ox) + 0.5f) - 0.5f;
      const int ix = int(std::floor(rx));
      float cx[4];
      coeffs(rx - float(ix), cx);
      for (int c = 0; c < channels; ++c) {
        const float* plane = chw.data() + size_t(c) * size_t(in_h) * size_t(in_w);
        float rows[4];
        for (int j = 0; j < 4; ++j) {
          const int y = std::clamp(iy - 1 + j, 0, in_h - 1);
          float acc = 0;
          for (int i = 0; i < 4; ++i) acc += plane[size_t(y) * size_t(in_w) + size_t(std::clamp(ix - 1 + i, 0, in_w - 1))] * cx[i];
          rows[j] = acc;
        }
        out[(size_t(c) * size_t(out_h) + size_t(oy)) * size_t(out_w) + size_t(ox)] =
            rows[0] * cy[0] + rows[1] * cy[1] + rows[2] * cy[2] + rows[3] * cy[3];
      }
    }
  }
  return out;
}

ProcessorConfig ProcessorConfig::from_json(const nlohmann::json& j, const std::string& where) {
  ProcessorConfig c;
  if (!j.is_object()) fail(where, " is not a JSON object");
  auto num = [&](const nlohmann::json& v, const char* what, double lo, double hi) {
    if (!v.is_number()) fail(where, ": ", what, " must be a number");
    const double x = v.get<double>();
    if (!(x >= lo && x <= hi)) fail(where, ": ", what, " is ", x, "; it must be between ", lo, " and ", hi);
    return x;
  };
  auto side = [&](const nlohmann::json& v, const char* what) { return int(num(v, what, 1, 16384)); };
  auto flag = [&](const char* key, bool dflt) {
    if (!j.contains(key) || j[key].is_null()) return dflt;
    if (!j[key].is_boolean()) fail(where, ": ", key, " must be true or false");
    return j[key].get<bool>();
  };
  if (j.contains("image_processor_type") && j["image_processor_type"].is_string()) c.type = j["image_processor_type"].get<std::string>();
  if (j.contains("size")) {
    const auto& s = j["size"];
    if (s.is_object() && s.contains("shortest_edge")) {
      c.shortest_edge = side(s["shortest_edge"], "size.shortest_edge");
    } else if (s.is_object() && s.contains("height") && s.contains("width")) {
      c.size_h = side(s["height"], "size.height");
      c.size_w = side(s["width"], "size.width");
      c.shortest_edge = std::min(c.size_h, c.size_w);
    } else if (s.is_object() && s.contains("height")) {
      c.shortest_edge = side(s["height"], "size.height");
    } else if (s.is_number()) {
      c.shortest_edge = side(s, "size");
    }
    if (s.is_object() && s.contains("min_pixels")) c.min_pixels = int64_t(num(s["min_pixels"], "size.min_pixels", 1, 1e9));
    if (s.is_object() && s.contains("max_pixels")) c.max_pixels = int64_t(num(s["max_pixels"], "size.max_pixels", 1, 1e9));
  }
  c.crop_h = c.size_h ? c.size_h : c.shortest_edge;
  c.crop_w = c.size_w ? c.size_w : c.shortest_edge;
  if (j.contains("crop_size")) {
    const auto& s = j["crop_size"];
    if (s.is_object() && s.contains("height") && s.contains("width")) {
      c.crop_h = side(s["height"], "crop_size.height");
      c.crop_w = side(s["width"], "crop_size.width");
    } else if (s.is_number()) {
      c.crop_h = c.crop_w = side(s, "crop_size");
    }
  }
  c.do_resize = flag("do_resize", true);
  c.do_center_crop = flag("do_center_crop", true);
  c.do_rescale = flag("do_rescale", true);
  c.do_normalize = flag("do_normalize", true);
  if (j.contains("rescale_factor")) c.rescale_factor = num(j["rescale_factor"], "rescale_factor", 1e-9, 1e9);
  for (auto [key, arr] : {std::pair{"image_mean", &c.mean}, std::pair{"image_std", &c.std}}) {
    if (!j.contains(key)) continue;
    const auto& v = j[key];
    if (!v.is_array() || v.size() != 3) fail(where, ": ", key, " must be a list of 3 numbers");
    for (size_t i = 0; i < 3; ++i) (*arr)[i] = float(num(v[i], key, -1e9, 1e9));
  }
  for (float sd : c.std)
    if (sd == 0.0f) fail(where, ": image_std must not hold zeros");
  if (j.contains("resample")) {
    const int r = int(num(j["resample"], "resample", 0, 5));
    if (r == 2) c.resample = PilFilter::Bilinear;
    else if (r == 3) c.resample = PilFilter::Bicubic;
    else fail(where, ": resample ", r, " is not supported (2 bilinear, 3 bicubic)");
  }
  if (j.contains("num_crops")) c.num_crops = int(num(j["num_crops"], "num_crops", 1, 64));
  if (j.contains("image_grid_pinpoints") && j["image_grid_pinpoints"].is_array()) {
    if (j["image_grid_pinpoints"].size() > 256) fail(where, ": image_grid_pinpoints lists more than 256 resolutions");
    for (auto& p : j["image_grid_pinpoints"]) {
      if (!p.is_array() || p.size() != 2) fail(where, ": image_grid_pinpoints entries must be [height, width]");
      c.grid_pinpoints.push_back({side(p[0], "image_grid_pinpoints"), side(p[1], "image_grid_pinpoints")});
    }
  }
  // Qwen2-VL: top-level min/max_pixels win over size's (as the processor's constructor does).
  if (j.contains("min_pixels")) c.min_pixels = int64_t(num(j["min_pixels"], "min_pixels", 1, 1e9));
  if (j.contains("max_pixels")) c.max_pixels = int64_t(num(j["max_pixels"], "max_pixels", 1, 1e9));
  if (c.min_pixels > c.max_pixels) fail(where, ": min_pixels ", c.min_pixels, " is above max_pixels ", c.max_pixels);
  if (j.contains("patch_size")) c.patch_size = int(num(j["patch_size"], "patch_size", 1, 1024));
  if (j.contains("merge_size")) c.merge_size = int(num(j["merge_size"], "merge_size", 1, 16));
  if (j.contains("temporal_patch_size")) c.temporal_patch_size = int(num(j["temporal_patch_size"], "temporal_patch_size", 1, 16));
  return c;
}

namespace {

// rescale then normalize, in float32 as the reference does, into CHW.
void to_chw(const Image& img, int x0, int y0, int w, int h, const ProcessorConfig& cfg, float* out) {
  for (int c = 0; c < 3; ++c)
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x) {
        const int sy = y0 + y, sx = x0 + x;
        // Outside the image (crop larger than the image): zero padding, as center_crop pads.
        const uint8_t v = (sy >= 0 && sy < img.height && sx >= 0 && sx < img.width)
                              ? img.rgb[(size_t(sy) * size_t(img.width) + size_t(sx)) * 3 + size_t(c)]
                              : 0;
        float f = cfg.do_rescale ? float(double(v) * cfg.rescale_factor) : float(v);
        if (cfg.do_normalize) f = (f - cfg.mean[size_t(c)]) / cfg.std[size_t(c)];
        out[(size_t(c) * size_t(h) + size_t(y)) * size_t(w) + size_t(x)] = f;
      }
}

// Python floor division by 2.
int floordiv2(int v) { return v >= 0 ? v / 2 : -((-v + 1) / 2); }

ProcessedImage crops_of(const Image& img, int size, std::vector<float> pixels, int64_t crops) {
  ProcessedImage p;
  p.layout = ProcessedImage::Layout::Crops;
  p.pixels = std::move(pixels);
  p.rows = crops;
  p.size = size;
  p.orig_width = img.width;
  p.orig_height = img.height;
  return p;
}

// Python's round(): halves to even.
int64_t round_half_even(double v) { return int64_t(std::nearbyint(v)); }

}  // namespace

ClipProcessor::ClipProcessor(ProcessorConfig c) : ImageProcessor(std::move(c)) {
  if (cfg_.crop_h != cfg_.crop_w) fail("image processor ", cfg_.type, ": crops of ", cfg_.crop_h, "x", cfg_.crop_w, " are not square");
}

std::vector<float> ClipProcessor::crop(const Image& img) const {
  const ProcessorConfig& c = cfg_;
  std::vector<float> out(size_t(3) * size_t(c.crop_h) * size_t(c.crop_w));
  int rw = img.width, rh = img.height;
  if (c.do_resize) {
    if (c.size_h) {
      rw = c.size_w;
      rh = c.size_h;
    } else {
      const int short_side = std::min(img.width, img.height), long_side = std::max(img.width, img.height);
      const int new_long = int(int64_t(c.shortest_edge) * long_side / short_side);
      if (short_side != c.shortest_edge) {
        rw = img.width <= img.height ? c.shortest_edge : new_long;
        rh = img.width <= img.height ? new_long : c.shortest_edge;
      }
    }
  }
  if (!c.do_center_crop) {
    // Resized straight to the crop size afterwards (the shortest-edge view is never kept whole).
    Image r = c.do_resize ? pil_resize(img, rw, rh, c.resample) : img;
    if (r.width != c.crop_w || r.height != c.crop_h) r = pil_resize(r, c.crop_w, c.crop_h, c.resample);
    to_chw(r, 0, 0, c.crop_w, c.crop_h, c, out.data());
    return out;
  }
  // The center crop window of the resized image: top = (H - crop) // 2, left = (W - crop) // 2.
  // Only the part of the window inside the resized image is computed; the rest is padding.
  const int left = floordiv2(rw - c.crop_w), top = floordiv2(rh - c.crop_h);
  const int x0 = std::max(left, 0), y0 = std::max(top, 0);
  const int x1 = std::min(left + c.crop_w, rw), y1 = std::min(top + c.crop_h, rh);
  Image r = pil_resize(img, rw, rh, c.resample, x0, y0, x1 - x0, y1 - y0);
  to_chw(r, left - x0, top - y0, c.crop_w, c.crop_h, c, out.data());
  return out;
}

ProcessedImage ClipProcessor::process(const Image& img) const { return crops_of(img, cfg_.crop_h, crop(img), 1); }

SiglipProcessor::SiglipProcessor(ProcessorConfig c) : ImageProcessor(std::move(c)) {
  if (!cfg_.size_h) cfg_.size_h = cfg_.size_w = cfg_.shortest_edge;
  if (cfg_.size_h != cfg_.size_w) fail("image processor ", cfg_.type, ": size ", cfg_.size_h, "x", cfg_.size_w, " is not square");
}

ProcessedImage SiglipProcessor::process(const Image& img) const {
  const ProcessorConfig& c = cfg_;
  const int S = c.size_h;
  Image r = c.do_resize ? pil_resize(img, S, S, c.resample) : img;
  if (r.width != S || r.height != S)
    fail("image ", img.source, " is ", r.width, "x", r.height, " but the processor (do_resize false) needs ", S, "x", S);
  std::vector<float> out(size_t(3) * size_t(S) * size_t(S));
  to_chw(r, 0, 0, S, S, c, out.data());
  return crops_of(img, S, std::move(out), 1);
}

std::pair<int, int> select_best_resolution(int height, int width, const std::vector<std::pair<int, int>>& pinpoints) {
  if (pinpoints.empty()) fail("image_grid_pinpoints is empty");
  std::pair<int, int> best = pinpoints[0];
  int64_t best_effective = -1, best_waste = INT64_MAX;
  for (auto [h, w] : pinpoints) {
    const double scale = std::min(double(w) / width, double(h) / height);
    const int64_t dw = int64_t(width * scale), dh = int64_t(height * scale);
    const int64_t effective = std::min<int64_t>(dw * dh, int64_t(width) * height);
    const int64_t waste = int64_t(w) * h - effective;
    if (effective > best_effective || (effective == best_effective && waste < best_waste)) {
      best_effective = effective;
      best_waste = waste;
      best = {h, w};
    }
  }
  return best;
}

AnyresLayout anyres_layout(int orig_h, int orig_w, int grid_rows, int grid_cols, int patches_per_side) {
  AnyresLayout l;
  const int cur_h = grid_rows * patches_per_side, cur_w = grid_cols * patches_per_side;
  const double orig_aspect = double(orig_w) / orig_h, cur_aspect = double(cur_w) / cur_h;
  l.feature_rows = cur_h;
  l.feature_cols = cur_w;
  // Python's round(x, 7) then int(): the unpadding of LLaVA-NeXT.
  auto round7 = [](double v) { return int(std::floor(std::nearbyint(v * 1e7) / 1e7)); };
  if (orig_aspect > cur_aspect) {
    const int new_h = round7(orig_h * (double(cur_w) / orig_w));
    const int pad = (cur_h - new_h) / 2;
    l.row_offset = pad;
    l.feature_rows = cur_h - 2 * pad;
  } else {
    const int new_w = round7(orig_w * (double(cur_h) / orig_h));
    const int pad = (cur_w - new_w) / 2;
    l.col_offset = pad;
    l.feature_cols = cur_w - 2 * pad;
  }
  return l;
}

AnyresProcessor::AnyresProcessor(ProcessorConfig c) : ImageProcessor(std::move(c)) {
  if (cfg_.crop_h != cfg_.crop_w) fail("image processor ", cfg_.type, ": crops of ", cfg_.crop_h, "x", cfg_.crop_w, " are not square");
  // Each tile is a whole pass of the vision tower: resolutions of more tiles than any model uses
  // would only make an image cost minutes.
  constexpr int k_max_tiles = 64;
  for (auto [h, w] : cfg_.grid_pinpoints) {
    if (h % cfg_.crop_h || w % cfg_.crop_w)
      fail("image processor ", cfg_.type, ": image_grid_pinpoints entry [", h, ", ", w, "] is not a multiple of the ", cfg_.crop_h,
           "-pixel tile");
    if (int64_t(h / cfg_.crop_h) * (w / cfg_.crop_w) > k_max_tiles)
      fail("image processor ", cfg_.type, ": image_grid_pinpoints entry [", h, ", ", w, "] makes ",
           int64_t(h / cfg_.crop_h) * (w / cfg_.crop_w), " tiles of ", cfg_.crop_h, " px; at most ", k_max_tiles, " are supported");
  }
}

ProcessedImage AnyresProcessor::process(const Image& img) const {
  const ProcessorConfig& c = cfg_;
  const int tile = c.crop_h;
  auto [th, tw] = select_best_resolution(img.height, img.width, c.grid_pinpoints);
  // Resize keeping the aspect to fit the target, then pad (zeros, centered) to exactly it.
  const double sw = double(tw) / img.width, sh = double(th) / img.height;
  int new_w, new_h;
  if (sw < sh) {
    new_w = tw;
    new_h = std::max(1, std::min(int(std::ceil(img.height * sw)), th));
  } else {
    new_h = th;
    new_w = std::max(1, std::min(int(std::ceil(img.width * sh)), tw));
  }
  Image resized = pil_resize(img, new_w, new_h, c.resample);
  Image padded;
  padded.width = tw;
  padded.height = th;
  padded.rgb.assign(size_t(tw) * size_t(th) * 3, 0);
  const int px = (tw - new_w) / 2, py = (th - new_h) / 2;
  for (int y = 0; y < new_h; ++y)
    std::copy_n(resized.rgb.data() + size_t(y) * size_t(new_w) * 3, size_t(new_w) * 3,
                padded.rgb.data() + (size_t(y + py) * size_t(tw) + size_t(px)) * 3);
  const int grid_rows = th / tile, grid_cols = tw / tile;
  const int64_t crops = 1 + int64_t(grid_rows) * grid_cols;
  const size_t crop_elems = size_t(3) * size_t(tile) * size_t(tile);
  std::vector<float> out(crop_elems * size_t(crops));
  // The base view: the whole image squeezed to tile x tile, then the usual CLIP steps.
  const ClipProcessor clip(c);
  auto base_px = clip.crop(pil_resize(img, tile, tile, c.resample));
  std::copy(base_px.begin(), base_px.end(), out.begin());
  for (int r = 0; r < grid_rows; ++r)
    for (int col = 0; col < grid_cols; ++col) {
      Image t = crop_image(padded, col * tile, r * tile, tile, tile);
      auto tp = clip.crop(t);
      std::copy(tp.begin(), tp.end(), out.begin() + long(crop_elems * size_t(1 + r * grid_cols + col)));
    }
  ProcessedImage p = crops_of(img, tile, std::move(out), crops);
  p.grid_rows = grid_rows;
  p.grid_cols = grid_cols;
  return p;
}

std::vector<float> phi3v_hd_image(const Image& img, const ProcessorConfig& cfg, int& height, int& width) {
  // Tall images are transposed first, so the padding always goes on top and bottom.
  Image im = img;
  const bool transposed = img.width < img.height;
  if (transposed) {
    im.width = img.height;
    im.height = img.width;
    for (int y = 0; y < img.height; ++y)
      for (int x = 0; x < img.width; ++x)
        std::copy_n(img.rgb.data() + (size_t(y) * size_t(img.width) + size_t(x)) * 3, 3,
                    im.rgb.data() + (size_t(x) * size_t(im.width) + size_t(y)) * 3);
  }
  const double ratio = double(im.width) / im.height;
  int scale = 1;
  while (scale * std::ceil(scale / ratio) <= cfg.num_crops) ++scale;
  --scale;
  const int new_w = scale * 336;
  const int new_h = std::max(1, int(new_w / ratio));
  Image resized = pil_resize(im, new_w, new_h, PilFilter::Bilinear);
  const int target = int(std::ceil(new_h / 336.0) * 336);
  const int top = int((target - new_h) / 2.0);
  Image padded;
  padded.width = new_w;
  padded.height = target;
  padded.rgb.assign(size_t(new_w) * size_t(target) * 3, 255);
  for (int y = 0; y < new_h; ++y)
    std::copy_n(resized.rgb.data() + size_t(y) * size_t(new_w) * 3, size_t(new_w) * 3,
                padded.rgb.data() + size_t(y + top) * size_t(new_w) * 3);
  const int H = transposed ? padded.width : padded.height, W = transposed ? padded.height : padded.width;
  std::vector<float> out(size_t(3) * size_t(H) * size_t(W));
  for (int c = 0; c < 3; ++c)
    for (int y = 0; y < H; ++y)
      for (int x = 0; x < W; ++x) {
        const int sy = transposed ? x : y, sx = transposed ? y : x;
        const uint8_t v = padded.rgb[(size_t(sy) * size_t(padded.width) + size_t(sx)) * 3 + size_t(c)];
        out[(size_t(c) * size_t(H) + size_t(y)) * size_t(W) + size_t(x)] = (float(v) / 255.0f - cfg.mean[size_t(c)]) / cfg.std[size_t(c)];
      }
  height = H;
  width = W;
  return out;
}

Phi3vProcessor::Phi3vProcessor(ProcessorConfig c) : ImageProcessor(std::move(c)) {}

ProcessedImage Phi3vProcessor::process(const Image& img) const {
  int H = 0, W = 0;
  auto hd = phi3v_hd_image(img, cfg_, H, W);
  const int rows = H / 336, cols = W / 336;
  const int64_t crops = 1 + int64_t(rows) * cols;
  const size_t crop = size_t(3) * 336 * 336;
  std::vector<float> pixels(crop * size_t(crops));
  // The global view: the HD image interpolated (torch bicubic) down to one crop.
  auto global = torch_bicubic(hd, 3, H, W, 336, 336);
  std::copy(global.begin(), global.end(), pixels.begin());
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) {
      float* dst = pixels.data() + crop * size_t(1 + i * cols + j);
      for (int c = 0; c < 3; ++c)
        for (int y = 0; y < 336; ++y)
          std::copy_n(hd.data() + (size_t(c) * size_t(H) + size_t(i * 336 + y)) * size_t(W) + size_t(j * 336), 336,
                      dst + (size_t(c) * 336 + size_t(y)) * 336);
    }
  ProcessedImage p = crops_of(img, 336, std::move(pixels), crops);
  p.grid_rows = rows;
  p.grid_cols = cols;
  return p;
}

std::pair<int, int> smart_resize(int height, int width, int factor, int64_t min_pixels, int64_t max_pixels) {
  if (height <= 0 || width <= 0) fail("image of ", width, "x", height, " pixels");
  if (std::max(height, width) / std::min(height, width) > 200)
    fail("image of ", width, "x", height, " pixels: the aspect ratio must be below 200 (as Qwen2-VL's processor requires)");
  int64_t h = std::max<int64_t>(factor, round_half_even(double(height) / factor) * factor);
  int64_t w = std::max<int64_t>(factor, round_half_even(double(width) / factor) * factor);
  if (h * w > max_pixels) {
    const double beta = std::sqrt(double(height) * double(width) / double(max_pixels));
    h = std::max<int64_t>(factor, int64_t(std::floor(height / beta / factor)) * factor);
    w = std::max<int64_t>(factor, int64_t(std::floor(width / beta / factor)) * factor);
  } else if (h * w < min_pixels) {
    const double beta = std::sqrt(double(min_pixels) / (double(height) * double(width)));
    h = int64_t(std::ceil(height * beta / factor)) * factor;
    w = int64_t(std::ceil(width * beta / factor)) * factor;
  }
  if (h > 1 << 15 || w > 1 << 15) fail("image of ", width, "x", height, " pixels resizes to ", w, "x", h, ": too large");
  return {int(h), int(w)};
}

Qwen2vlProcessor::Qwen2vlProcessor(ProcessorConfig c) : ImageProcessor(std::move(c)) {
  const int64_t unit = int64_t(cfg_.patch_size) * cfg_.merge_size;
  if (cfg_.max_pixels < unit * unit)
    fail("image processor ", cfg_.type, ": max_pixels ", cfg_.max_pixels, " is below one merged patch (", unit * unit, ")");
}

ProcessedImage Qwen2vlProcessor::process(const Image& img) const {
  const ProcessorConfig& c = cfg_;
  const int P = c.patch_size, M = c.merge_size, Tp = c.temporal_patch_size;
  int H = img.height, W = img.width;
  if (c.do_resize) std::tie(H, W) = smart_resize(img.height, img.width, P * M, c.min_pixels, c.max_pixels);
  if (H % (P * M) || W % (P * M))
    fail("image ", img.source, " is ", W, "x", H, ", not a multiple of ", P * M, " (the processor's do_resize is false)");
  Image r = c.do_resize ? pil_resize(img, W, H, c.resample) : img;
  std::vector<float> chw(size_t(3) * size_t(H) * size_t(W));
  to_chw(r, 0, 0, W, H, c, chw.data());
  const int gh = H / P, gw = W / P;
  ProcessedImage p;
  p.layout = ProcessedImage::Layout::Patches;
  p.rows = int64_t(gh) * gw;
  p.patch_values = int64_t(3) * Tp * P * P;
  p.grid_rows = gh;
  p.grid_cols = gw;
  p.orig_width = img.width;
  p.orig_height = img.height;
  p.pixels.resize(size_t(p.rows * p.patch_values));
  // Patch rows in merge-window order; each row (channel, t, y, x) with the frame repeated over t.
  size_t row = 0;
  for (int wy = 0; wy < gh / M; ++wy)
    for (int wx = 0; wx < gw / M; ++wx)
      for (int dy = 0; dy < M; ++dy)
        for (int dx = 0; dx < M; ++dx, ++row) {
          const int py = wy * M + dy, px = wx * M + dx;
          float* dst = p.pixels.data() + row * size_t(p.patch_values);
          for (int ch = 0; ch < 3; ++ch)
            for (int t = 0; t < Tp; ++t)
              for (int y = 0; y < P; ++y)
                for (int x = 0; x < P; ++x)
                  *dst++ = chw[(size_t(ch) * size_t(H) + size_t(py * P + y)) * size_t(W) + size_t(px * P + x)];
        }
  return p;
}

}  // namespace vkvlm
