#include "host/image_processing.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "gpu/error.h"

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

// Weights for resampling [0, in_size) onto out_size samples.
Coeffs precompute_coeffs(int in_size, int out_size, PilFilter f) {
  const double support0 = f == PilFilter::Bicubic ? 2.0 : 1.0;
  const double scale = double(in_size) / double(out_size);
  const double filterscale = std::max(scale, 1.0);
  const double support = support0 * filterscale;
  Coeffs c;
  c.ksize = int(std::ceil(support)) * 2 + 1;
  c.bounds.resize(size_t(out_size) * 2);
  c.kk.assign(size_t(out_size) * size_t(c.ksize), 0);
  std::vector<double> k(static_cast<size_t>(c.ksize));
  for (int xx = 0; xx < out_size; ++xx) {
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
      c.kk[size_t(xx) * size_t(c.ksize) + size_t(x)] =
          w < 0 ? int32_t(-0.5 + w * (1 << k_precision_bits)) : int32_t(0.5 + w * (1 << k_precision_bits));
    }
    c.bounds[size_t(xx) * 2] = xmin;
    c.bounds[size_t(xx) * 2 + 1] = xmax;
  }
  return c;
}

uint8_t clip8(int32_t v) {
  if (v >= (1 << (k_precision_bits + 8))) return 255;
  if (v <= 0) return 0;
  return uint8_t(v >> k_precision_bits);
}

}  // namespace

Image pil_resize(const Image& in, int out_w, int out_h, PilFilter filter) {
  if (out_w <= 0 || out_h <= 0) fail("cannot resize image ", in.source, " to ", out_w, "x", out_h);
  if (out_w == in.width && out_h == in.height) return in;
  Image out;
  out.width = out_w;
  out.height = out_h;
  out.source = in.source;
  out.hash = in.hash;
  const bool need_h = out_w != in.width, need_v = out_h != in.height;
  Coeffs ch = precompute_coeffs(in.width, out_w, filter);
  Coeffs cv = precompute_coeffs(in.height, out_h, filter);
  // Horizontal pass over the rows the vertical pass needs, into an 8-bit image (as PIL does).
  int ybox_first = 0, ybox_last = in.height;
  if (need_v) {
    ybox_first = cv.bounds[0];
    ybox_last = cv.bounds[size_t(out_h) * 2 - 2] + cv.bounds[size_t(out_h) * 2 - 1];
  }
  std::vector<uint8_t> tmp;
  int tmp_w = in.width, tmp_h = ybox_last - ybox_first;
  const uint8_t* src = in.rgb.data() + size_t(ybox_first) * size_t(in.width) * 3;
  if (need_h) {
    tmp_w = out_w;
    tmp.resize(size_t(tmp_w) * size_t(tmp_h) * 3);
    for (int y = 0; y < tmp_h; ++y) {
      const uint8_t* row = src + size_t(y) * size_t(in.width) * 3;
      for (int xx = 0; xx < out_w; ++xx) {
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
    tmp.assign(src, src + size_t(tmp_w) * size_t(tmp_h) * 3);
  }
  if (!need_v) {
    out.rgb = std::move(tmp);
    return out;
  }
  out.rgb.resize(size_t(out_w) * size_t(out_h) * 3);
  for (int yy = 0; yy < out_h; ++yy) {
    const int ymin = cv.bounds[size_t(yy) * 2] - ybox_first, ymax = cv.bounds[size_t(yy) * 2 + 1];
    const int32_t* k = &cv.kk[size_t(yy) * size_t(cv.ksize)];
    for (int xx = 0; xx < out_w; ++xx) {
      int32_t s0 = 1 << (k_precision_bits - 1), s1 = s0, s2 = s0;
      for (int y = 0; y < ymax; ++y) {
        const uint8_t* p = tmp.data() + (size_t(ymin + y) * size_t(tmp_w) + size_t(xx)) * 3;
        s0 += p[0] * k[y];
        s1 += p[1] * k[y];
        s2 += p[2] * k[y];
      }
      uint8_t* d = out.rgb.data() + (size_t(yy) * size_t(out_w) + size_t(xx)) * 3;
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
  auto num = [&](const nlohmann::json& v, const char* what) {
    if (!v.is_number()) fail(where, ": ", what, " must be a number");
    return v.get<double>();
  };
  c.type = j.value("image_processor_type", "CLIPImageProcessor");
  if (j.contains("size")) {
    const auto& s = j["size"];
    if (s.is_object() && s.contains("shortest_edge")) c.shortest_edge = int(num(s["shortest_edge"], "size.shortest_edge"));
    else if (s.is_object() && s.contains("height")) c.shortest_edge = int(num(s["height"], "size.height"));
    else if (s.is_number()) c.shortest_edge = int(num(s, "size"));
  }
  c.crop_h = c.crop_w = c.shortest_edge;
  if (j.contains("crop_size")) {
    const auto& s = j["crop_size"];
    if (s.is_object() && s.contains("height") && s.contains("width")) {
      c.crop_h = int(num(s["height"], "crop_size.height"));
      c.crop_w = int(num(s["width"], "crop_size.width"));
    } else if (s.is_number()) {
      c.crop_h = c.crop_w = int(num(s, "crop_size"));
    }
  }
  c.do_resize = j.value("do_resize", true);
  c.do_center_crop = j.value("do_center_crop", true);
  c.do_rescale = j.value("do_rescale", true);
  c.do_normalize = j.value("do_normalize", true);
  if (j.contains("rescale_factor")) c.rescale_factor = num(j["rescale_factor"], "rescale_factor");
  for (auto [key, arr] : {std::pair{"image_mean", &c.mean}, std::pair{"image_std", &c.std}}) {
    if (!j.contains(key)) continue;
    const auto& v = j[key];
    if (!v.is_array() || v.size() != 3) fail(where, ": ", key, " must be a list of 3 numbers");
    for (size_t i = 0; i < 3; ++i) (*arr)[i] = float(num(v[i], key));
  }
  if (j.contains("resample")) {
    int r = int(num(j["resample"], "resample"));
    if (r == 2) c.resample = PilFilter::Bilinear;
    else if (r == 3) c.resample = PilFilter::Bicubic;
    else fail(where, ": resample ", r, " is not supported (2 bilinear, 3 bicubic)");
  }
  if (j.contains("num_crops")) c.num_crops = int(num(j["num_crops"], "num_crops"));
  if (j.contains("image_grid_pinpoints") && j["image_grid_pinpoints"].is_array())
    for (auto& p : j["image_grid_pinpoints"]) {
      if (!p.is_array() || p.size() != 2) fail(where, ": image_grid_pinpoints entries must be [height, width]");
      c.grid_pinpoints.push_back({int(num(p[0], "pinpoint")), int(num(p[1], "pinpoint"))});
    }
  if (c.shortest_edge <= 0 || c.crop_h <= 0 || c.crop_w <= 0) fail(where, ": image sizes must be positive");
  if (c.num_crops <= 0) fail(where, ": num_crops must be positive");
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

Image resize_shortest_edge(const Image& img, int edge, PilFilter f) {
  const int short_side = std::min(img.width, img.height), long_side = std::max(img.width, img.height);
  if (short_side == edge) return img;
  const int new_long = int(int64_t(edge) * long_side / short_side);
  return img.width <= img.height ? pil_resize(img, edge, new_long, f) : pil_resize(img, new_long, edge, f);
}

}  // namespace

std::vector<float> clip_preprocess(const Image& img, const ProcessorConfig& cfg) {
  Image r = cfg.do_resize ? resize_shortest_edge(img, cfg.shortest_edge, cfg.resample) : img;
  std::vector<float> out(size_t(3) * size_t(cfg.crop_h) * size_t(cfg.crop_w));
  if (cfg.do_center_crop) {
    // top = (H - crop) // 2, left = (W - crop) // 2 (Python floor division)
    auto floordiv2 = [](int v) { return v >= 0 ? v / 2 : -((-v + 1) / 2); };
    to_chw(r, floordiv2(r.width - cfg.crop_w), floordiv2(r.height - cfg.crop_h), cfg.crop_w, cfg.crop_h, cfg, out.data());
  } else {
    if (r.width != cfg.crop_w || r.height != cfg.crop_h) r = pil_resize(r, cfg.crop_w, cfg.crop_h, cfg.resample);
    to_chw(r, 0, 0, cfg.crop_w, cfg.crop_h, cfg, out.data());
  }
  return out;
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

AnyresLayout anyres_layout(int orig_h, int orig_w, const std::vector<std::pair<int, int>>& pinpoints, int tile,
                           int patches_per_side) {
  auto [bh, bw] = select_best_resolution(orig_h, orig_w, pinpoints);
  AnyresLayout l;
  l.grid_rows = bh / tile;
  l.grid_cols = bw / tile;
  int cur_h = l.grid_rows * patches_per_side, cur_w = l.grid_cols * patches_per_side;
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

std::vector<float> anyres_preprocess(const Image& img, const ProcessorConfig& cfg, int& crops, int& grid_rows,
                                     int& grid_cols) {
  const int tile = cfg.crop_h;
  auto [th, tw] = select_best_resolution(img.height, img.width, cfg.grid_pinpoints);
  // Resize keeping the aspect to fit the target, then pad (zeros, centered) to exactly it.
  const double sw = double(tw) / img.width, sh = double(th) / img.height;
  int new_w, new_h;
  if (sw < sh) {
    new_w = tw;
    new_h = std::min(int(std::ceil(img.height * sw)), th);
  } else {
    new_h = th;
    new_w = std::min(int(std::ceil(img.width * sh)), tw);
  }
  Image resized = pil_resize(img, new_w, new_h, cfg.resample);
  Image padded;
  padded.width = tw;
  padded.height = th;
  padded.rgb.assign(size_t(tw) * size_t(th) * 3, 0);
  const int px = (tw - new_w) / 2, py = (th - new_h) / 2;
  for (int y = 0; y < new_h; ++y)
    std::copy_n(resized.rgb.data() + size_t(y) * size_t(new_w) * 3, size_t(new_w) * 3,
                padded.rgb.data() + (size_t(y + py) * size_t(tw) + size_t(px)) * 3);
  grid_rows = th / tile;
  grid_cols = tw / tile;
  crops = 1 + grid_rows * grid_cols;
  const size_t crop_elems = size_t(3) * size_t(tile) * size_t(tile);
  std::vector<float> out(crop_elems * size_t(crops));
  // The base view: the whole image squeezed to tile x tile, then the usual CLIP steps.
  Image base = pil_resize(img, tile, tile, cfg.resample);
  auto base_px = clip_preprocess(base, cfg);
  std::copy(base_px.begin(), base_px.end(), out.begin());
  for (int r = 0; r < grid_rows; ++r)
    for (int c = 0; c < grid_cols; ++c) {
      Image t;
      t.width = t.height = tile;
      t.rgb.resize(size_t(tile) * size_t(tile) * 3);
      for (int y = 0; y < tile; ++y)
        std::copy_n(padded.rgb.data() + (size_t(r * tile + y) * size_t(tw) + size_t(c * tile)) * 3, size_t(tile) * 3,
                    t.rgb.data() + size_t(y) * size_t(tile) * 3);
      auto tp = clip_preprocess(t, cfg);
      std::copy(tp.begin(), tp.end(), out.begin() + long(crop_elems * size_t(1 + r * grid_cols + c)));
    }
  return out;
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
  const int new_h = int(new_w / ratio);
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

}  // namespace vkvlm
