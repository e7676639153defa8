// Checkpoint files and images: what is valid loads exactly; what is corrupt, truncated or not
// what it claims to be fails with an error that names the file and the problem.
#include <gtest/gtest.h>

#include <webp/encode.h>

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "host/config.h"
#include "host/image.h"
#include "host/image_processing.h"
#include "base/numeric.h"
#include "host/safetensors.h"
#include "host/tokenizer.h"
#include "tests/expect_error.h"
#include "tests/test_paths.h"
#include "tests/scratch_dir.h"

extern "C" int stbi_write_png(const char* filename, int w, int h, int comp, const void* data, int stride_in_bytes);
extern "C" int stbi_write_bmp(const char* filename, int w, int h, int comp, const void* data);
extern "C" int stbi_write_tga(const char* filename, int w, int h, int comp, const void* data);

namespace vkvlm::test {
namespace {
namespace fs = std::filesystem;

std::string temp_dir() {
  static std::string dir = [] {
    std::string d = (scratch_dir() / "io").string();
    fs::create_directories(d);
    return d;
  }();
  return dir;
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary).write(bytes.data(), std::streamsize(bytes.size()));
}

// A safetensors file from a header object and a data section.
std::string safetensors_bytes(const nlohmann::json& header, const std::string& data) {
  std::string h = header.dump();
  uint64_t n = h.size();
  std::string out(reinterpret_cast<const char*>(&n), 8);
  return out + h + data;
}


// ---- safetensors -------------------------------------------------------------------------------

TEST(Safetensors, EveryDtypeAndUnalignedOffsets) {
  // One byte of padding first: MLX writes tensors at unaligned offsets.
  std::string data = "X";
  nlohmann::json h;
  auto add = [&](const char* name, const char* dtype, std::vector<int64_t> shape, const std::string& bytes) {
    h[name] = {{"dtype", dtype}, {"shape", shape}, {"data_offsets", {data.size(), data.size() + bytes.size()}}};
    data += bytes;
  };
  auto raw = [](const auto& v) { return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(v[0])); };
  add("f32", "F32", {2}, raw(std::vector<float>{1.5f, -2.0f}));
  add("f16", "F16", {2}, raw(std::vector<uint16_t>{f32_to_f16(0.5f), f32_to_f16(-3.0f)}));
  add("bf16", "BF16", {1, 2}, raw(std::vector<uint16_t>{f32_to_bf16(7.0f), f32_to_bf16(-0.25f)}));
  add("u32", "U32", {1}, raw(std::vector<uint32_t>{4000000000u}));
  add("i32", "I32", {2}, raw(std::vector<int32_t>{-5, 6}));
  add("i64", "I64", {1}, raw(std::vector<int64_t>{-1234567}));
  add("u8", "U8", {3}, raw(std::vector<uint8_t>{1, 2, 255}));
  add("i8", "I8", {1}, raw(std::vector<int8_t>{-7}));
  add("bool", "BOOL", {2}, raw(std::vector<uint8_t>{1, 0}));
  add("empty", "F32", {0, 4}, "");
  h["__metadata__"] = {{"format", "mlx"}};
  const std::string path = temp_dir() + "/all.safetensors";
  write_bytes(path, safetensors_bytes(h, data));
  auto s = TensorStore::open_file(path);
  EXPECT_EQ(s.get("f32").to_f32(), (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(s.get("f16").to_f32(), (std::vector<float>{0.5f, -3.0f}));
  EXPECT_EQ(s.get("bf16").to_f32(), (std::vector<float>{7.0f, -0.25f}));
  EXPECT_EQ(s.get("bf16").shape, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(s.get("u32").to_f32()[0], 4000000000.0f);
  EXPECT_EQ(s.get("i32").to_f32(), (std::vector<float>{-5, 6}));
  EXPECT_EQ(s.get("i64").to_f32()[0], -1234567.0f);
  EXPECT_EQ(s.get("u8").to_f32(), (std::vector<float>{1, 2, 255}));
  EXPECT_EQ(s.get("i8").to_f32()[0], -7.0f);
  EXPECT_EQ(s.get("bool").to_f32(), (std::vector<float>{1, 0}));
  EXPECT_EQ(s.get("empty").numel(), 0);
  expect_error([&] { s.get("missing"); }, {"missing", path.c_str()});
}

TEST(Safetensors, CorruptFilesNameTheFileAndTheProblem) {
  const std::string dir = temp_dir();
  nlohmann::json ok = {{"w", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}}};
  struct Bad {
    const char* name;
    std::string bytes;
    std::vector<const char*> words;
  };
  std::vector<Bad> cases = {
      {"short.safetensors", "abc", {"short.safetensors", "truncated"}},
      {"hugeheader.safetensors", std::string("\xff\xff\xff\x00\x00\x00\x00\x00{}", 10), {"hugeheader.safetensors", "header length"}},
      {"notjson.safetensors", safetensors_bytes(nlohmann::json(), "").replace(8, 4, "nope"), {"notjson.safetensors"}},
      {"truncated.safetensors", safetensors_bytes(ok, "1234"), {"truncated.safetensors", "'w'", "truncated"}},
      {"shape.safetensors",
       safetensors_bytes({{"w", {{"dtype", "F32"}, {"shape", {3}}, {"data_offsets", {0, 8}}}}}, "12345678"),
       {"shape.safetensors", "'w'", "[3]", "12 bytes"}},
      {"dtype.safetensors",
       safetensors_bytes({{"w", {{"dtype", "Q9"}, {"shape", {2}}, {"data_offsets", {0, 8}}}}}, "12345678"),
       {"dtype.safetensors", "'w'", "Q9"}},
      {"overlap.safetensors",
       safetensors_bytes({{"a", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}},
                          {"b", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {4, 12}}}}},
                         "123456789012"),
       {"overlap.safetensors", "'a'", "'b'", "overlap"}},
      {"negative.safetensors",
       safetensors_bytes({{"w", {{"dtype", "F32"}, {"shape", {-2}}, {"data_offsets", {0, 8}}}}}, "12345678"),
       {"negative.safetensors", "shape"}},
  };
  for (auto& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string path = dir + "/" + c.name;
    write_bytes(path, c.bytes);
    try {
      TensorStore::open_file(path);
      ADD_FAILURE() << "should fail";
    } catch (const std::exception& e) {
      for (auto* w : c.words) EXPECT_NE(std::string(e.what()).find(w), std::string::npos) << e.what();
    }
  }
}

TEST(Safetensors, ShardedIndexIsChecked) {
  const std::string dir = temp_dir() + "/sharded";
  fs::create_directories(dir);
  write_bytes(dir + "/a.safetensors",
              safetensors_bytes({{"x", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0, 4}}}}}, "abcd"));
  auto index = [&](nlohmann::json map) {
    std::ofstream(dir + "/model.safetensors.index.json") << nlohmann::json{{"metadata", {}}, {"weight_map", map}}.dump();
  };
  index({{"x", "a.safetensors"}});
  EXPECT_TRUE(TensorStore::open_directory(dir).has("x"));
  index({{"x", "a.safetensors"}, {"y", "b.safetensors"}});
  expect_error([&] { TensorStore::open_directory(dir); }, {"b.safetensors", "missing"});
  index({{"z", "a.safetensors"}});
  expect_error([&] { TensorStore::open_directory(dir); }, {"'z'", "a.safetensors"});
  index({{"x", "../../etc/passwd"}});
  expect_error([&] { TensorStore::open_directory(dir); }, {"outside"});
  // The fixture's sharded checkpoint, with shards shared through symlinks.
  auto s = TensorStore::open_directory(fixtures_dir() + "/phi3v-long-bf16");
  EXPECT_TRUE(s.has("model.embed_tokens.weight"));
}

// ---- images --------------------------------------------------------------------------------

std::vector<uint8_t> file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)), {});
}

TEST(Images, EveryFormatDecodesAsPilConvertRgbDoes) {
  const std::string dir = temp_dir();
  // 3x2 test pattern.
  const uint8_t rgba[] = {10, 20, 30, 0, 40, 50, 60, 255, 70, 80, 90, 128, 100, 110, 120, 1, 130, 140, 150, 64, 250, 0, 5, 200};
  std::vector<uint8_t> rgb, gray;
  for (int i = 0; i < 6; ++i) {
    rgb.insert(rgb.end(), {rgba[i * 4], rgba[i * 4 + 1], rgba[i * 4 + 2]});
    gray.push_back(rgba[i * 4 + 1]);
  }
  std::vector<uint8_t> gray_as_rgb;
  for (uint8_t g : gray) gray_as_rgb.insert(gray_as_rgb.end(), {g, g, g});
  ASSERT_TRUE(stbi_write_png((dir + "/rgba.png").c_str(), 3, 2, 4, rgba, 12));
  ASSERT_TRUE(stbi_write_png((dir + "/gray.png").c_str(), 3, 2, 1, gray.data(), 3));
  ASSERT_TRUE(stbi_write_bmp((dir + "/rgb.bmp").c_str(), 3, 2, 3, rgb.data()));
  ASSERT_TRUE(stbi_write_tga((dir + "/rgb.tga").c_str(), 3, 2, 3, rgb.data()));
  uint8_t* webp = nullptr;
  size_t webp_size = WebPEncodeLosslessRGB(rgb.data(), 3, 2, 9, &webp);
  ASSERT_GT(webp_size, 0u);
  write_bytes(dir + "/rgb.webp", std::string(reinterpret_cast<char*>(webp), webp_size));
  WebPFree(webp);
  // RGBA: alpha dropped, not composited over anything.
  EXPECT_EQ(load_image_file(dir + "/rgba.png").rgb, rgb);
  EXPECT_EQ(load_image_file(dir + "/gray.png").rgb, gray_as_rgb);
  EXPECT_EQ(load_image_file(dir + "/rgb.bmp").rgb, rgb);
  EXPECT_EQ(load_image_file(dir + "/rgb.tga").rgb, rgb);
  auto w = load_image_file(dir + "/rgb.webp");
  EXPECT_EQ(w.width, 3);
  EXPECT_EQ(w.rgb, rgb);
  // A 2x1 palette GIF (first frame): red, blue.
  const unsigned char gif[] = {'G', 'I', 'F', '8', '9', 'a', 2, 0, 1, 0, 0x80, 0, 0, 255, 0, 0, 0, 0, 255,
                               ',', 0, 0, 0, 0, 2, 0, 1, 0, 0, 2, 2, 0x44, 0x0A, 0, ';'};
  auto g = decode_image(std::vector<uint8_t>(std::begin(gif), std::end(gif)), "tiny.gif");
  EXPECT_EQ(g.rgb, (std::vector<uint8_t>{255, 0, 0, 0, 0, 255}));
  // The fixture images: grayscale and RGBA PNGs and a JPEG.
  EXPECT_EQ(load_image_file(fixtures_dir() + "/images/camera.png").width, 512);
  EXPECT_EQ(load_image_file(fixtures_dir() + "/images/coffee_rgba.png").rgb.size(), size_t(600 * 400 * 3));
  EXPECT_EQ(load_image_file(fixtures_dir() + "/images/chelsea.jpg").height, 300);
  // The same pixels hash the same, whatever the container.
  EXPECT_EQ(load_image_file(dir + "/rgb.bmp").hash, load_image_file(dir + "/rgb.tga").hash);
}

TEST(Images, DataUrls) {
  auto png = file_bytes(fixtures_dir() + "/images/camera.png");
  auto img = decode_data_url("data:image/png;base64," + base64_encode(png));
  EXPECT_EQ(img.rgb, load_image_file(fixtures_dir() + "/images/camera.png").rgb);
  expect_error([] { decode_data_url("data:image/png;base64,@@@@"); }, {"base64"});
  expect_error([] { decode_data_url("data:text/plain;base64,aGVsbG8="); }, {"text/plain"});
  expect_error([] { decode_data_url("data:image/png,rawbytes"); }, {"base64"});
  expect_error([] { decode_data_url("data:image/png;base64,aGVsbG8="); }, {"not a supported image"});
}

TEST(Images, BadFilesAreClearErrors) {
  const std::string dir = temp_dir();
  expect_error([&] { load_image_file(dir + "/absent.png"); }, {"absent.png", "does not exist"});
  expect_error([&] { load_image_file(dir); }, {"folder"});
  write_bytes(dir + "/empty.png", "");
  expect_error([&] { load_image_file(dir + "/empty.png"); }, {"empty.png", "empty"});
  write_bytes(dir + "/text.png", "this is not an image at all");
  expect_error([&] { load_image_file(dir + "/text.png"); }, {"text.png", "not a supported image"});
  auto png = file_bytes(fixtures_dir() + "/images/astronaut.png");
  write_bytes(dir + "/cut.png", std::string(png.begin(), png.begin() + long(png.size() / 3)));
  expect_error([&] { load_image_file(dir + "/cut.png"); }, {"cut.png"});
  ImageLimits small;
  small.max_pixels = 1000;
  expect_error([&] { load_image_file(fixtures_dir() + "/images/astronaut.png", small); }, {"512x512", "limit"});
  // A valid header of a 30000x30000 PNG: the size is what is wrong, not the type.
  std::string header("\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\x75\x30\0\0\x75\x30\x08\x02\0\0\0", 29);
  expect_error([&] { decode_image(std::vector<uint8_t>(header.begin(), header.end()), "huge.png"); },
               {"huge.png", "30000x30000", "limit of 67108864 pixels"});
  small = {};
  small.max_file_bytes = 100;
  expect_error([&] { load_image_file(fixtures_dir() + "/images/astronaut.png", small); }, {"bytes", "limit"});
}

// A very narrow image resized to the crop's short side would be millions of pixels long; only
// the crop window is computed, with exactly the pixels resizing everything then cropping gives.
TEST(Images, NarrowImagesCostTheirOutputNotTheirResize) {
  auto narrow = [](int w, int h) {
    Image img;
    img.width = w;
    img.height = h;
    img.source = "narrow";
    img.rgb.resize(size_t(w) * size_t(h) * 3);
    for (size_t i = 0; i < img.rgb.size(); ++i) img.rgb[i] = uint8_t((i * 2654435761u) >> 13);
    return img;
  };
  ProcessorConfig pc;  // CLIPImageProcessor at 336
  pc.type = "CLIPImageProcessor";
  const ClipProcessor clip(pc);
  // Small enough to resize whole: the crop equals resize-then-crop.
  for (auto [w, h] : {std::pair{3, 2000}, std::pair{2000, 5}, std::pair{400, 1000}}) {
    Image img = narrow(w, h);
    const int short_side = std::min(w, h), long_side = std::max(w, h);
    const int new_long = int(int64_t(336) * long_side / short_side);
    const int rw = w <= h ? 336 : new_long, rh = w <= h ? new_long : 336;
    Image full = pil_resize(img, rw, rh, PilFilter::Bicubic);
    auto got = clip.process(img).pixels;
    const int left = (rw - 336) / 2, top = (rh - 336) / 2;
    for (int c = 0; c < 3; ++c)
      for (int y = 0; y < 336; ++y)
        for (int x = 0; x < 336; ++x) {
          const uint8_t v = full.rgb[(size_t(top + y) * size_t(rw) + size_t(left + x)) * 3 + size_t(c)];
          const float want = (float(double(v) * pc.rescale_factor) - pc.mean[size_t(c)]) / pc.std[size_t(c)];
          ASSERT_EQ(got[(size_t(c) * 336 + size_t(y)) * 336 + size_t(x)], want) << w << "x" << h << " at " << x << "," << y;
        }
  }
  // 1x200000 would resize to 336 x 67 million pixels: the crop costs what a square image costs.
  struct rusage before {}, after {};
  getrusage(RUSAGE_SELF, &before);
  auto px = clip.process(narrow(1, 200000));
  getrusage(RUSAGE_SELF, &after);
  EXPECT_EQ(px.rows, 1);
  EXPECT_EQ(px.pixels.size(), size_t(3) * 336 * 336);
  EXPECT_LT(after.ru_maxrss - before.ru_maxrss, 64 * 1024) << "KiB of peak memory for one narrow image";
}

// A FIFO would block a reader forever and /dev/zero never ends: neither is read at all.
TEST(Files, SpecialFilesAreRefusedWithoutBlocking) {
  const std::string fifo = temp_dir() + "/fifo";
  ::unlink(fifo.c_str());
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  for (const std::string& path : {fifo, std::string("/dev/zero")}) {
    expect_error([&] { load_image_file(path); }, {path.c_str(), "not a regular file"});
    expect_error([&] { TensorStore::open_file(path); }, {path.c_str(), "not a regular file"});
    expect_error([&] { Tokenizer::from_file(path); }, {path.c_str(), "not a regular file"});
    expect_error([&] { read_json_file(path); }, {path.c_str(), "not a regular file"});
  }
  // Larger than the limit: refused before reading.
  ImageLimits small;
  small.max_file_bytes = 10;
  expect_error([&] { load_image_file(fixtures_dir() + "/images/camera.png", small); }, {"camera.png", "limit of 10"});
}

}  // namespace
}  // namespace vkvlm::test
