// Model folders' configuration, read without a GPU: every architecture's real layouts parse
// into the right traits, and every wrong or missing field is an error naming the file and key.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "base/json.h"
#include "host/tokenizer.h"
#include "models/arch/architecture.h"
#include "models/model_config.h"
#include "tests/expect_error.h"
#include "tests/test_paths.h"
#include "tests/scratch_dir.h"

namespace vkvlm::test {
namespace {
namespace fs = std::filesystem;


std::string temp_dir(const std::string& name) {
  std::string d = (scratch_dir() / "config" / name).string();
  fs::create_directories(d);
  return d;
}

// Every JSON file a model folder holds is refused, by name, when its arrays and objects nest
// deeper than k_max_json_depth, as it is read (no later recursive walk can overflow a stack);
// brackets inside strings are text.
TEST(Config, JsonNestedTooDeepIsRefusedAsItIsRead) {
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  EXPECT_EQ(json_too_deep_at(deep), size_t(k_max_json_depth));
  EXPECT_EQ(json_too_deep_at(std::string(k_max_json_depth, '{') + std::string(k_max_json_depth, '}')), std::string_view::npos);
  EXPECT_EQ(json_too_deep_at("{\"a\": \"[[[[\\\"[[[[\", \"b\": [1]}", 1), size_t(25)) << "the bracket of b, not those in a";
  const std::string dir = temp_dir("deep");
  std::ofstream(dir + "/config.json") << R"({"model_type": "llama", "x": )" << deep << "}";
  expect_error([&] { load_model_config(dir); }, {"config.json", "nest deeper than 256"});
  std::ofstream(dir + "/tokenizer.json") << R"({"model": )" << deep << "}";
  expect_error([&] { Tokenizer::from_file(dir + "/tokenizer.json"); }, {"tokenizer.json", "nest deeper than 256"});
}

TEST(Config, MissingAndWrongFieldsAreNamed) {
  const std::string dir = temp_dir("cfg");
  expect_error([&] { load_model_config(dir + "/nope"); }, {"nope", "does not exist"});
  expect_error([&] { load_model_config(dir); }, {"config.json"});
  std::ofstream(dir + "/config.json") << R"({"model_type": "llama", "vocab_size": 10, "hidden_size": 8})";
  expect_error([&] { load_model_config(dir); }, {"config.json", "intermediate_size"});
  std::ofstream(dir + "/config.json") << R"({"model_type": "gpt_bigcode"})";
  // An unknown model_type lists the supported ones.
  expect_error([&] { load_model_config(dir); }, {"gpt_bigcode", "not supported", "llava_next, phi3_v, qwen2_vl, paligemma"});
  std::ofstream(dir + "/config.json") << R"({"model_type": "llama", "vocab_size": 10, "hidden_size": "8"})";
  expect_error([&] { load_model_config(dir); }, {"hidden_size", "integer"});
  std::ofstream(dir + "/config.json") << "{not json";
  expect_error([&] { load_model_config(dir); }, {"config.json", "not valid JSON"});
  // Numbers out of range name their key.
  const std::string base = R"("vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1)";
  std::ofstream(dir + "/config.json") << R"({"model_type": "llama", )" << base << R"(, "num_attention_heads": 0})";
  expect_error([&] { load_model_config(dir); }, {"num_attention_heads", "between"});
  std::ofstream(dir + "/config.json") << R"({"model_type": "llama", )" << base
                                      << R"(, "num_attention_heads": 4294967300})";
  expect_error([&] { load_model_config(dir); }, {"num_attention_heads", "4294967300"});
  std::ofstream(dir + "/config.json") << R"({"model_type": "mistral", )" << base << R"(, "num_attention_heads": 2, "sliding_window": -5})";
  expect_error([&] { load_model_config(dir); }, {"sliding_window", "-5"});
  std::ofstream(dir + "/config.json") << R"({"model_type": "llama", )" << base
                                      << R"(, "num_attention_heads": 2, "max_position_embeddings": 0})";
  expect_error([&] { load_model_config(dir); }, {"max_position_embeddings"});
}

TEST(Config, EveryFixtureLayoutParses) {
  // transformers 5 rope_parameters, LongRoPE scaling, MLX quantization, sliding window.
  auto c = load_model_config(fixtures_dir() + "/phi3v-bf16");
  EXPECT_EQ(c.text.rope.type, "longrope");
  EXPECT_NEAR(c.text.rope.attention_factor, 1.1902380714238083, 1e-12);
  EXPECT_EQ(load_model_config(fixtures_dir() + "/llava15-mlx4").quantization.spec.bits, 4);
  EXPECT_EQ(load_model_config(fixtures_dir() + "/llava15-f16").text.rope.theta, 10000.0);
  // Mistral's sliding window, on every layer; Qwen2 writes one but leaves it off.
  for (const LayerTraits& l : load_model_config(fixtures_dir() + "/llavanext-bf16-legacy").text.layers)
    EXPECT_EQ(l.window, 4096);
  EXPECT_EQ(load_model_config(fixtures_dir() + "/qwen2vl-bf16").text.smallest_window(), 0);
  // Qwen2-VL: a Qwen2 decoder with q/k/v biases, tied head and M-RoPE sections [4, 6, 6].
  for (const char* m : {"qwen2vl-bf16", "qwen2vl-mlx4"}) {
    auto q = load_model_config(fixtures_dir() + "/" + m);
    EXPECT_TRUE(q.is_vlm()) << m;
    EXPECT_EQ(q.text.family, "qwen2");
    EXPECT_TRUE(q.text.attention_bias);
    EXPECT_TRUE(q.text.tie_embeddings);
    EXPECT_EQ(q.text.rope.sections, (std::vector<int>{4, 6, 6}));
    EXPECT_EQ(q.text.rope.positions_per_token(), 3);
    EXPECT_EQ(q.text.rope.theta, 1e6);
  }
  EXPECT_EQ(load_model_config(fixtures_dir() + "/qwen2vl-mlx4").quantization.spec.group_size, 64);
  // mlx-vlm merges generation_config.json in: its eos list wins.
  EXPECT_EQ(load_model_config(fixtures_dir() + "/qwen2vl-mlx4").eos_token_ids, (std::vector<int64_t>{6258, 6256}));
  // PaliGemma: Gemma traits (RMSNorm (1 + w), sqrt(hidden) embedding scale, GeGLU-tanh, explicit
  // head_dim, MQA, tied head) read from text_config.
  for (const char* m : {"paligemma-bf16", "paligemma-mlx8"}) {
    auto p = load_model_config(fixtures_dir() + "/" + m);
    EXPECT_EQ(p.text.family, "gemma") << m;
    EXPECT_TRUE(p.text.norm_plus_one);
    EXPECT_DOUBLE_EQ(p.text.embed_scale, std::sqrt(128.0));
    ASSERT_EQ(p.text.layers.size(), size_t(p.text.num_layers));
    for (const LayerTraits& l : p.text.layers) EXPECT_EQ(l.activation, MlpActivation::GeluTanh);
    EXPECT_EQ(p.text.head_dim, 32);
    EXPECT_EQ(p.text.num_kv_heads, 1);
    EXPECT_TRUE(p.text.tie_embeddings);
    EXPECT_TRUE(p.arch->prefix_lm());
  }
  EXPECT_EQ(load_model_config(fixtures_dir() + "/paligemma-mlx8").quantization.spec.bits, 8);
}

TEST(Config, VisionConfigsAreRangeChecked) {
  const std::string dir = temp_dir("vision");
  fs::copy_file(fixtures_dir() + "/llava15-f16/preprocessor_config.json", dir + "/preprocessor_config.json",
                fs::copy_options::overwrite_existing);
  auto write = [&](const std::string& vision) {
    std::ofstream(dir + "/config.json")
        << R"({"model_type": "llava", "text_config": {"model_type": "llama", "vocab_size": 32064, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2}, "vision_config": )"
        << vision << "}";
  };
  write(R"({"hidden_size": 64, "patch_size": 0, "image_size": 336, "num_attention_heads": 2})");
  expect_error([&] { load_model_config(dir); }, {"vision_config", "patch_size"});
  write(R"({"hidden_size": 64, "patch_size": 14, "image_size": 336, "num_attention_heads": 0})");
  expect_error([&] { load_model_config(dir); }, {"vision_config", "num_attention_heads"});
  write(R"({"hidden_size": 64, "patch_size": 14, "image_size": 300, "num_attention_heads": 2})");
  expect_error([&] { load_model_config(dir); }, {"image_size", "multiple"});
  write(R"({"hidden_size": 64, "patch_size": 14, "image_size": 336, "num_attention_heads": 2, "model_type": "eva"})");
  expect_error([&] { load_model_config(dir); }, {"eva", "not supported"});
}

TEST(Config, ProcessorsComeFromTheRegistry) {
  // image_processor_type names the processor; without it, processor_class says which.
  const std::string dir = temp_dir("proc");
  std::ofstream(dir + "/preprocessor_config.json") << R"({"processor_class": "Qwen2VLProcessor", "min_pixels": 3136})";
  auto p = image_processor_for(dir, "");
  ASSERT_NE(dynamic_cast<const Qwen2vlProcessor*>(p.get()), nullptr);
  EXPECT_EQ(p->config().min_pixels, 3136);
  std::ofstream(dir + "/preprocessor_config.json") << R"({"image_processor_type": "SiglipImageProcessorFast"})";
  EXPECT_NE(dynamic_cast<const SiglipProcessor*>(image_processor_for(dir, "").get()), nullptr);
  std::ofstream(dir + "/preprocessor_config.json") << R"({"image_processor_type": "BlipImageProcessor"})";
  expect_error([&] { image_processor_for(dir, ""); }, {"BlipImageProcessor", "not supported", "Qwen2VLImageProcessor"});
  std::ofstream(dir + "/preprocessor_config.json") << R"({"image_processor_type": "CLIPImageProcessor", "num_crops": 1000000})";
  expect_error([&] { image_processor_for(dir, ""); }, {"num_crops", "between"});
  std::ofstream(dir + "/preprocessor_config.json")
      << R"({"image_processor_type": "LlavaNextImageProcessor", "image_grid_pinpoints": [[67200, 67200]]})";
  expect_error([&] { image_processor_for(dir, ""); }, {"image_grid_pinpoints", "67200"});
  std::ofstream(dir + "/preprocessor_config.json")
      << R"({"image_processor_type": "LlavaNextImageProcessor", "image_grid_pinpoints": [[3360, 3360]]})";
  expect_error([&] { image_processor_for(dir, ""); }, {"100 tiles", "at most 64"});
  fs::remove(dir + "/preprocessor_config.json");
  expect_error([&] { image_processor_for(dir, ""); }, {"preprocessor_config.json"});
  EXPECT_NE(dynamic_cast<const Phi3vProcessor*>(image_processor_for(dir, "Phi3VImageProcessor").get()), nullptr);
}

}  // namespace
}  // namespace vkvlm::test
