// The end-to-end benchmark: a whole model at a real model's shapes (random weights generated in
// memory and uploaded: nothing to download), or a real checkpoint, timed as a user runs it:
// weight upload, the vision tower per image, time to first token with an image, prefill tokens/s,
// decode tokens/s at a short and a long context (mean and p90), device memory, and decode's share
// of the bandwidth roofline (weight + KV bytes per token over the copy bandwidth measured here).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/numeric.h"
#include "bench/bench_common.h"
#include "bench/bench_model.h"
#include "gpu/device.h"
#include "gpu/error.h"
#include "host/hub_cache.h"
#include "models/session.h"

namespace vkvlm::bench {
namespace {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// A language model's shape; the vision tower's cost shows up as its image tokens in the prompt.
struct Shape {
  const char* name;
  const char* model_type;  // the decoder family (config.json model_type)
  int layers;
  int64_t hidden, intermediate;
  int heads, kv_heads, head_dim;  // head_dim 0: hidden / heads
  int64_t vocab;
  bool tied;
  bool fused;     // one qkv_proj and one gate_up_proj per layer (Phi-3's checkpoints)
  bool qkv_bias;  // q/k/v projections with biases (Qwen2's)
  int image_tokens;  // one typical image's rows in the prompt
  const char* note;
};

const std::vector<Shape>& shapes() {
  static const std::vector<Shape> s = {
      {"llava-1.5-7b", "llama", 32, 4096, 11008, 32, 32, 0, 32064, false, false, false, 576,
       "Vicuna-7B decoder; 576 rows per image"},
      {"llava-v1.6-mistral-7b", "mistral", 32, 4096, 14336, 32, 8, 0, 32064, false, false, false, 2160,
       "Mistral-7B decoder; about 2160 rows for a 672x672 image (any-res)"},
      {"phi-3-vision", "phi3", 32, 3072, 8192, 32, 32, 0, 32064, false, true, false, 757,
       "Phi-3-mini decoder (fused qkv, gate_up)"},
      {"qwen2-vl-2b", "qwen2", 28, 1536, 8960, 12, 2, 0, 151936, true, false, true, 256,
       "Qwen2-1.5B decoder (q/k/v biases, tied head); 256 rows for 448x448"},
      {"paligemma-3b", "gemma", 18, 2048, 16384, 8, 1, 256, 257216, true, false, false, 256,
       "Gemma-2B decoder; 256 rows at 224"},
      {"tiny", "llama", 8, 1024, 2816, 16, 4, 0, 32000, false, false, false, 64, "a small Llama for CPU devices"},
  };
  return s;
}

struct Options {
  std::string shape, model_dir, weights = "f16", image;
  int64_t ctx = 4096, image_tokens = -1;
  int decode_tokens = 32;
  bool json = false, quick = false;
};

const char* k_usage =
    "usage: vkvlm-bench --model-shape NAME [--weights f16|q4|q8] [--ctx N] [--image-tokens N] [--decode-tokens N]\n"
    "                   [--quick] [--json]\n"
    "       vkvlm-bench --model DIR|ORG/NAME [--weights f16|q4|q8] [--image PATH] [--ctx N] [--quick] [--json]\n"
    "  --model-shape: random weights at a real model's language-model shapes (llava-1.5-7b, llava-v1.6-mistral-7b,\n"
    "  phi-3-vision, qwen2-vl-2b, paligemma-3b, tiny), generated in memory; the image is its rows in the prompt.\n"
    "  --model: a real checkpoint, its vision tower included. --ctx: the long decode context (4096).\n"
    "  --quick: small prompts and contexts, for CPU devices (the CI smoke run).\n";

Options parse(int argc, char** argv) {
  Options o;
  auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) fail(argv[i], " needs a value");
    return argv[++i];
  };
  auto whole = [&](int& i, int64_t lo, int64_t hi) {
    const std::string flag = argv[i], v = value(i);
    char* end = nullptr;
    const long long n = std::strtoll(v.c_str(), &end, 10);
    if (v.empty() || *end || n < lo || n > hi) fail(flag, " takes a whole number from ", lo, " to ", hi, ", not '", v, "'");
    return int64_t(n);
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--model-shape") o.shape = value(i);
    else if (a == "--model") o.model_dir = value(i);
    else if (a == "--weights") o.weights = value(i);
    else if (a == "--image") o.image = value(i);
    else if (a == "--ctx") o.ctx = whole(i, 16, int64_t(1) << 20);
    else if (a == "--image-tokens") o.image_tokens = whole(i, 0, 1 << 16);
    else if (a == "--decode-tokens") o.decode_tokens = int(whole(i, 2, 4096));
    else if (a == "--json") o.json = true;
    else if (a == "--quick") o.quick = true;
    else if (a == "--help" || a == "-h") {
      std::printf("%s", k_usage);
      std::exit(0);
    } else fail("unknown argument '", a, "'\n", k_usage);
  }
  if (o.shape.empty() == o.model_dir.empty()) fail("give --model-shape NAME or --model DIR, one of them\n", k_usage);
  if (o.weights != "f16" && o.weights != "q4" && o.weights != "q8") fail("--weights takes f16, q4 or q8, not '", o.weights, "'");
  if (!o.image.empty() && o.model_dir.empty()) fail("--image goes with --model (a shape has no vision tower)");
  if (!o.model_dir.empty() && o.image_tokens >= 0) fail("--image-tokens goes with --model-shape (a real model counts its own)");
  return o;
}

// A folder with the shape's config.json and a tokenizer (the demo model's: the bench feeds ids),
// removed when the bench ends; the weights come from memory.
struct ShapeFolder {
  fs::path dir;
  ~ShapeFolder() {
    std::error_code ec;
    if (!dir.empty()) fs::remove_all(dir, ec);
  }
};

// Random f16 weights for every tensor of the shape, all views of one buffer as large as the
// largest tensor (values uniform in [-0.05, 0.05]: finite activations, no NaN).
std::shared_ptr<const TensorStore> random_weights(const Shape& s) {
  const int64_t E = s.hidden, I = s.intermediate, D = s.head_dim ? s.head_dim : s.hidden / s.heads;
  const int64_t qd = s.heads * D, kvd = s.kv_heads * D;
  std::vector<std::pair<std::string, std::vector<int64_t>>> list;
  list.push_back({"model.embed_tokens.weight", {s.vocab, E}});
  for (int l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    list.push_back({p + "input_layernorm.weight", {E}});
    list.push_back({p + "post_attention_layernorm.weight", {E}});
    if (s.fused) {
      list.push_back({p + "self_attn.qkv_proj.weight", {qd + 2 * kvd, E}});
      list.push_back({p + "mlp.gate_up_proj.weight", {2 * I, E}});
    } else {
      list.push_back({p + "self_attn.q_proj.weight", {qd, E}});
      list.push_back({p + "self_attn.k_proj.weight", {kvd, E}});
      list.push_back({p + "self_attn.v_proj.weight", {kvd, E}});
      if (s.qkv_bias) {
        list.push_back({p + "self_attn.q_proj.bias", {qd}});
        list.push_back({p + "self_attn.k_proj.bias", {kvd}});
        list.push_back({p + "self_attn.v_proj.bias", {kvd}});
      }
      list.push_back({p + "mlp.gate_proj.weight", {I, E}});
      list.push_back({p + "mlp.up_proj.weight", {I, E}});
    }
    list.push_back({p + "self_attn.o_proj.weight", {E, qd}});
    list.push_back({p + "mlp.down_proj.weight", {E, I}});
  }
  list.push_back({"model.norm.weight", {E}});
  if (!s.tied) list.push_back({"lm_head.weight", {s.vocab, E}});
  int64_t largest = 0;
  for (const auto& [name, shape] : list) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    largest = std::max(largest, n);
  }
  auto data = std::make_shared<std::vector<uint16_t>>(size_t(largest));
  uint32_t x = 12345;
  for (auto& h : *data) {
    x = x * 1664525u + 1013904223u;
    h = f32_to_f16((float(x >> 8) / float(1u << 24) - 0.5f) * 0.1f);
  }
  std::vector<StTensor> tensors;
  for (const auto& [name, shape] : list) {
    StTensor t;
    t.name = name;
    t.dtype = StDType::F16;
    t.shape = shape;
    t.data = reinterpret_cast<const uint8_t*>(data->data());
    t.bytes = uint64_t(t.numel()) * 2;
    t.file = "(random)";
    tensors.push_back(std::move(t));
  }
  return std::make_shared<const TensorStore>(TensorStore::in_memory(std::move(tensors), data, std::string("random ") + s.name));
}

void write_shape_folder(const Shape& s, const fs::path& dir) {
  fs::create_directories(dir);
  nlohmann::json cfg = {{"model_type", s.model_type}, {"vocab_size", s.vocab}, {"hidden_size", s.hidden},
                        {"intermediate_size", s.intermediate}, {"num_hidden_layers", s.layers},
                        {"num_attention_heads", s.heads}, {"num_key_value_heads", s.kv_heads},
                        {"max_position_embeddings", 131072}, {"rms_norm_eps", 1e-6}, {"rope_theta", 10000.0},
                        {"tie_word_embeddings", s.tied}};
  if (s.head_dim) cfg["head_dim"] = s.head_dim;
  std::ofstream(dir / "config.json") << cfg.dump();
  fs::copy_file(fs::path(default_model_dir()) / "tokenizer.json", dir / "tokenizer.json", fs::copy_options::overwrite_existing);
}

// `n` random text tokens (no images), positions 0..n-1.
Prompt random_prompt(const Model& m, int64_t n, uint32_t seed) {
  Prompt p;
  p.position_components = m.config().text.rope.positions_per_token();
  const int64_t vocab = std::min<int64_t>(m.config().text.vocab_size, 30000);
  uint32_t x = seed * 2654435761u + 1;
  for (int64_t i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    const int32_t id = int32_t(1 + (x >> 8) % uint32_t(vocab - 1));
    p.ids.push_back(id);
    p.keys.push_back(text_key(id));
    for (int c = 0; c < p.position_components; ++c) p.positions.push_back(int32_t(i));
  }
  p.next_position = n;
  return p;
}

struct Decode {
  int64_t context = 0;
  double mean_tps = 0, p90_ms = 0, roofline_pct = 0;
};

int run(const Options& o) {
  // The preset first: a name it does not have is an error before the device starts.
  const Shape* shape = nullptr;
  if (!o.shape.empty()) {
    for (const auto& s : shapes())
      if (o.shape == s.name) shape = &s;
    if (!shape) {
      std::string names;
      for (const auto& s : shapes()) names += std::string(names.empty() ? "" : ", ") + s.name;
      fail("--model-shape '", o.shape, "' is not one of ", names);
    }
  }
  gpu::Context ctx(gpu::Device::create());
  const auto& prof = ctx.profile();
  const double bw = copy_bandwidth(ctx, o.quick ? (64ull << 20) : (512ull << 20));

  // The model: a shape's random weights, or a checkpoint.
  ShapeFolder folder;
  LoadOptions load;
  if (o.weights != "f16") load.quantize = o.weights;
  std::string dir;
  if (shape) {
    folder.dir = fs::temp_directory_path() / ("vkvlm-bench-shape-" + std::to_string(::getpid()));
    write_shape_folder(*shape, folder.dir);
    dir = folder.dir.string();
    load.weights = random_weights(*shape);
  } else {
    dir = resolve_model_folder(o.model_dir);
  }
  auto t_load = Clock::now();
  Model model(ctx, dir, load);
  const double upload_s = seconds(t_load);
  const auto& tc = model.config().text;

  // --quick: sizes a CPU device gets through in seconds (the figures then say little).
  const int64_t pre_small = o.quick ? 8 : 128, pre_large = o.quick ? 16 : 512;
  const int64_t short_ctx = o.quick ? 8 : 128, long_ctx = o.quick ? std::min<int64_t>(o.ctx, 16) : o.ctx;
  const int decode_tokens = o.quick ? std::min(o.decode_tokens, 3) : o.decode_tokens;
  const int64_t image_tokens = shape ? (o.image_tokens >= 0 ? o.image_tokens : (o.quick ? 4 : shape->image_tokens)) : 0;
  const int64_t text_tokens = o.quick ? 4 : 32;  // the question beside the image
  // A real model's prompt with one image (its processor decides the rows).
  Prompt image_prompt;
  if (!shape && model.vision()) {
    const std::string image = o.image.empty() ? default_model_dir() + "/examples/shapes_1.png" : o.image;
    const std::vector<Image> images = {load_image_file(image)};
    Messages content = Messages::array({{{"type", "image"}}, {{"type", "text"}, {"text", "Describe the image."}}});
    image_prompt = model.build_prompt(Messages::array({{{"role", "user"}, {"content", content}}}), images);
    if (image_prompt.images.empty()) fail("the model took no image from the prompt");
  }
  const int64_t rows =
      std::max({pre_large, long_ctx, image_tokens + text_tokens, image_prompt.size()}) + decode_tokens + 2;
  Session session(model, rows);

  // Pipelines are built on first use: a short warm-up first.
  session.prompt_logits(random_prompt(model, 2, 99));
  auto prefill_tps = [&](int64_t n) {
    session.reset();
    const Prompt p = random_prompt(model, n, uint32_t(n));
    auto t0 = Clock::now();
    session.prompt_logits(p);
    return double(n) / seconds(t0);
  };
  const double prefill_small = prefill_tps(pre_small), prefill_large = prefill_tps(pre_large);

  // Time to first token with one image: the vision tower and the prefill (a shape: its image
  // rows prefilled, no tower), and the tower alone.
  double vision_s = -1, ttft_s = 0;
  if (shape) {
    session.reset();
    const Prompt p = random_prompt(model, image_tokens + text_tokens, 7);
    GenerationParams gp;
    gp.max_tokens = 1;
    auto t0 = Clock::now();
    session.generate(p, gp);
    ttft_s = seconds(t0);
  } else if (model.vision()) {
    const Prompt& p = image_prompt;
    model.vision()->encode(p.images[0]);  // warm-up
    auto t0 = Clock::now();
    model.vision()->encode(p.images[0]);
    vision_s = seconds(t0);
    session.reset();
    GenerationParams gp;
    gp.max_tokens = 1;
    t0 = Clock::now();
    session.generate(p, gp);
    ttft_s = seconds(t0);
  }

  // Decode at a short and a long context: the time between consecutive tokens.
  const uint64_t kv_row_bytes = KvFormat{}.bytes(tc, 1);
  const uint64_t embed_bytes = model.lm().embedding().bytes();
  const uint64_t weight_read = model.lm().weight_bytes() - (tc.tie_embeddings ? 0 : embed_bytes);
  auto decode = [&](int64_t context) {
    session.reset();
    const Prompt p = random_prompt(model, context, uint32_t(context) + 1);
    GenerationParams gp;
    gp.max_tokens = decode_tokens + 1;
    gp.ignore_eos = true;
    std::vector<Clock::time_point> at;
    session.generate(p, gp, [&](const StepOutput&) {
      at.push_back(Clock::now());
      return true;
    });
    std::vector<double> gaps;
    for (size_t i = 1; i < at.size(); ++i) gaps.push_back(std::chrono::duration<double>(at[i] - at[i - 1]).count());
    std::sort(gaps.begin(), gaps.end());
    Decode d;
    d.context = context;
    double sum = 0;
    for (double g : gaps) sum += g;
    d.mean_tps = gaps.empty() ? 0 : double(gaps.size()) / sum;
    d.p90_ms = gaps.empty() ? 0 : 1e3 * gaps[std::min(gaps.size() - 1, size_t(0.9 * double(gaps.size())))];
    const double bytes = double(weight_read) + double(kv_row_bytes) * double(context);
    d.roofline_pct = 100.0 * d.mean_tps / (bw / bytes);
    return d;
  };
  const std::vector<Decode> decodes = {decode(short_ctx), decode(long_ctx)};
  const uint64_t memory = model.weight_bytes() + session.kv_bytes();

  const std::string what = shape ? std::string(shape->name) + " (random " + o.weights + " weights)" : dir + " (" + o.weights + ")";
  if (o.json) {
    nlohmann::ordered_json j;
    j["device"] = prof.summary_line();
    j["model"] = what;
    j["copy_bandwidth_gbs"] = bw / 1e9;
    j["weight_bytes"] = model.weight_bytes();
    j["upload_seconds"] = upload_s;
    j["vision_seconds_per_image"] = vision_s >= 0 ? nlohmann::ordered_json(vision_s) : nlohmann::ordered_json();
    j["image_tokens"] = shape ? nlohmann::ordered_json(image_tokens) : nlohmann::ordered_json();
    j["ttft_seconds"] = ttft_s;
    j["prefill_tps"] = {{std::to_string(pre_small), prefill_small}, {std::to_string(pre_large), prefill_large}};
    j["decode"] = nlohmann::ordered_json::array();
    for (const auto& d : decodes)
      j["decode"].push_back({{"context", d.context}, {"mean_tps", d.mean_tps}, {"p90_ms", d.p90_ms}, {"roofline_pct", d.roofline_pct}});
    j["device_memory_bytes"] = memory;
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("device: %s\n", prof.summary_line().c_str());
  std::printf("model: %s%s%s\n", what.c_str(), shape ? "; " : "", shape ? shape->note : "");
  std::printf("copy bandwidth (read + write): %.1f GB/s\n", bw / 1e9);
  std::printf("weights: %.1f MiB, uploaded in %.2f s\n", double(model.weight_bytes()) / (1 << 20), upload_s);
  if (vision_s >= 0) std::printf("vision tower: %.3f s per image\n", vision_s);
  if (shape)
    std::printf("time to first token, one image (%lld rows + %lld text, prefill only: a shape has no vision tower): %.3f s\n",
                (long long)image_tokens, (long long)text_tokens, ttft_s);
  else if (model.vision())
    std::printf("time to first token, one image: %.3f s\n", ttft_s);
  std::printf("prefill: %.1f tok/s at %lld tokens, %.1f tok/s at %lld\n", prefill_small, (long long)pre_small, prefill_large,
              (long long)pre_large);
  for (const auto& d : decodes)
    std::printf("decode at context %lld: %.2f tok/s mean, p90 %.1f ms/token, %.1f%% of the bandwidth roofline\n",
                (long long)d.context, d.mean_tps, d.p90_ms, d.roofline_pct);
  std::printf("device memory: %.1f MiB (weights and a KV cache of %lld rows)\n", double(memory) / (1 << 20), (long long)rows);
  return 0;
}

}  // namespace

int run_model_bench(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vkvlm-bench: error: %s\n", e.what());
    return 1;
  }
}

}  // namespace vkvlm::bench
