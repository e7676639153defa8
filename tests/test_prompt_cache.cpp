// Prompt caches on disk: a conversation's KV cache saved by one session and loaded by another
// continues exactly as computing the whole prompt from scratch does (same tokens, logits within
// 1e-3), with the images in the cached prefix and without recomputing it; a conversation that
// leaves the cached one early is recomputed from where they part. Every damaged or foreign file
// is an error naming it, and leaves the session as it was.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "tests/expect_error.h"
#include "tests/fixture_models.h"
#include "tests/scratch_dir.h"

namespace vkvlm::test {
namespace {
namespace fs = std::filesystem;

std::string temp_file(const std::string& name) {
  fs::create_directories(scratch_dir() / "pc");
  return (scratch_dir() / "pc" / name).string();
}

GenerationParams greedy(int tokens) {
  GenerationParams p;
  p.max_tokens = tokens;
  p.ignore_eos = true;
  p.top_logits = 5;
  return p;
}

void expect_same_run(const GenerationResult& got, const GenerationResult& want) {
  EXPECT_EQ(got.tokens, want.tokens);
  ASSERT_EQ(got.steps.size(), want.steps.size());
  for (size_t i = 0; i < got.steps.size(); ++i) {
    ASSERT_EQ(got.steps[i].top_logits.size(), want.steps[i].top_logits.size());
    for (size_t k = 0; k < got.steps[i].top_logits.size(); ++k) {
      EXPECT_EQ(got.steps[i].top_logits[k].first, want.steps[i].top_logits[k].first) << "step " << i;
      EXPECT_NEAR(got.steps[i].top_logits[k].second, want.steps[i].top_logits[k].second, 1e-3) << "step " << i;
    }
  }
}

class PromptCache : public testing::TestWithParam<std::string> {};

// The fixture's conversation with its image is cached; the same conversation asked for an answer
// (its generation prompt added) continues it.
TEST_P(PromptCache, ContinuesAsComputingTheWholePromptDoes) {
  const std::string name = GetParam();
  Model& model = fixture_model(name);
  const auto c = fixture_case(name, "describe");
  const std::vector<Image> images = case_images(c);
  Messages messages = case_messages(c);
  const Prompt cached = model.build_cacheable_prompt(messages, images);
  const Prompt full = model.build_prompt(messages, images);
  const Prompt unasked = model.build_prompt(messages, images, nullptr, /*add_generation_prompt=*/false);
  ASSERT_GT(full.size(), cached.size());
  ASSERT_TRUE(std::equal(cached.keys.begin(), cached.keys.end(), full.keys.begin())) << "the cached prompt is a prefix";
  // All of the conversation without its generation prompt, but for LLaVA's trailing space.
  EXPECT_EQ(cached.size(), unasked.size() - (name == "llava15-f16" ? 1 : 0));
  EXPECT_EQ(cached.spans.size(), 1u);
  const std::string file = temp_file(name + ".safetensors");
  {
    Session writer(model, cached.size() + 1);
    EXPECT_EQ(writer.save_prompt_cache(cached, file), cached.size());
  }
  Session fresh(model, full.size() + 16);
  const GenerationResult want = fresh.generate(full, greedy(8));

  Session reader(model, full.size() + 16);
  const auto loaded = reader.load_prompt_cache(file);
  EXPECT_EQ(loaded.rows, cached.size());
  EXPECT_EQ(loaded.metadata.at("model_fingerprint"), model.fingerprint());
  const GenerationResult got = reader.generate(full, greedy(8));
  EXPECT_EQ(got.cached_tokens, cached.size()) << "the cached rows are not recomputed";
  EXPECT_EQ(got.prefill_tokens, full.size() - cached.size());
  expect_same_run(got, want);

  // Another question about another image parts from the cache at the image: recomputed from
  // there, and still exact.
  Messages other = Messages::array({{{"role", "user"},
                                     {"content", Messages::array({{{"type", "image"}},
                                                                  {{"type", "text"}, {"text", "And this one?"}}})}}});
  const std::vector<Image> other_images = {load_image_file(fixtures_dir() + "/images/camera.png")};
  const Prompt elsewhere = model.build_prompt(other, other_images);
  Session fresh2(model, elsewhere.size() + 16), reader2(model, elsewhere.size() + 16);
  reader2.load_prompt_cache(file);
  const GenerationResult part = reader2.generate(elsewhere, greedy(4));
  EXPECT_LT(part.cached_tokens, cached.size());
  expect_same_run(part, fresh2.generate(elsewhere, greedy(4)));
  fs::remove(file);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, PromptCache, testing::Values("llava15-f16", "qwen2vl-bf16"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& ch : n)
                             if (ch == '-') ch = '_';
                           return n;
                         });

// A quantized KV cache (--kv-bits, with f16 rows before --quantized-kv-start) is saved as it is
// stored and continues exactly; a session storing its KV another way refuses the file by name.
TEST(PromptCacheQuantized, ContinuesAsComputingTheWholePromptDoes) {
  Model& model = fixture_model("llava15-f16");
  const auto c = fixture_case("llava15-f16", "describe");
  const std::vector<Image> images = case_images(c);
  const Messages messages = case_messages(c);
  const Prompt cached = model.build_cacheable_prompt(messages, images);
  const Prompt full = model.build_prompt(messages, images);
  KvFormat kv;
  kv.bits = 8;
  kv.group_size = 64;
  kv.quantized_start = 5;  // the first rows in f16, the rest quantized: both kinds of tensor in the file
  const std::string file = temp_file("quantized.safetensors");
  {
    Session writer(model, cached.size() + 1, false, kv);
    writer.save_prompt_cache(cached, file);
  }
  Session fresh(model, full.size() + 16, false, kv), reader(model, full.size() + 16, false, kv);
  const GenerationResult want = fresh.generate(full, greedy(8));
  EXPECT_EQ(reader.load_prompt_cache(file).metadata.at("kv_dtype"), "q8g64s5");
  const GenerationResult got = reader.generate(full, greedy(8));
  EXPECT_EQ(got.cached_tokens, cached.size());
  expect_same_run(got, want);

  Session plain(model, full.size() + 16);
  expect_error([&] { plain.load_prompt_cache(file); }, {file.c_str(), "q8g64s5", "f16"});
  KvFormat q4 = kv;
  q4.bits = 4;
  Session other(model, full.size() + 16, false, q4);
  expect_error([&] { other.load_prompt_cache(file); }, {file.c_str(), "q8g64s5", "q4g64s5"});
  fs::remove(file);
}

// Rewrites a cache with metadata entries changed (an empty value: the entry removed).
void rewrite_metadata(const std::string& from, const std::string& to,
                      const std::vector<std::pair<std::string, std::string>>& changes) {
  SafetensorsFile f(from);
  std::vector<StWrite> tensors;
  for (const auto& [name, t] : f.tensors()) tensors.push_back({name, t.dtype, t.shape, t.data, t.bytes});
  auto meta = f.metadata();
  for (const auto& [key, value] : changes)
    if (value.empty()) meta.erase(key);
    else meta[key] = value;
  write_safetensors_file(to, tensors, meta);
}
void rewrite_metadata(const std::string& from, const std::string& to, const std::string& key, const std::string& value) {
  rewrite_metadata(from, to, {{key, value}});
}

TEST(PromptCacheErrors, ForeignDamagedOrTooLargeCachesAreRefusedByName) {
  Model& model = fixture_model("llava15-f16");
  Model& twin = fixture_model("llava15-mlx4");
  Messages messages = Messages::array({{{"role", "user"}, {"content", "Write a haiku about GPUs."}}});
  const Prompt cached = model.build_cacheable_prompt(messages, {});
  const Prompt full = model.build_prompt(messages, {});
  const std::string file = temp_file("errors.safetensors");
  Session writer(model, 64);
  writer.save_prompt_cache(cached, file);

  // The session that refuses keeps what it had: its next answer reuses its own cache.
  Session s(model, 64);
  const GenerationResult first = s.generate(full, greedy(4));
  auto still_whole = [&] {
    const GenerationResult again = s.generate(full, greedy(4));
    EXPECT_EQ(again.cached_tokens, full.size() - 1);
    EXPECT_EQ(again.tokens, first.tokens);
  };

  // Another model, even of the same shapes.
  Session other(twin, 64);
  expect_error([&] { other.load_prompt_cache(file); }, {file.c_str(), "another model", "llava15-f16", "llava15-mlx4"});
  // A context that cannot continue it.
  Session small(model, cached.size());
  expect_error([&] { small.load_prompt_cache(file); }, {file.c_str(), "context", "--ctx"});
  // Another KV format, another version, not a cache at all.
  const std::string q8 = temp_file("q8.safetensors");
  rewrite_metadata(file, q8, "kv_dtype", "q8");
  expect_error([&] { s.load_prompt_cache(q8); }, {q8.c_str(), "q8", "f16"});
  rewrite_metadata(file, q8, "version", "99");
  expect_error([&] { s.load_prompt_cache(q8); }, {q8.c_str(), "version", "99"});
  // The bidirectional spans it lists: not spans, unsorted or overlapping, or past its rows.
  for (const char* bad : {"x", "3-1", "0-2,1-3", "0-999", "0-2,"}) {
    SCOPED_TRACE(bad);
    rewrite_metadata(file, q8, "bidirectional", bad);
    expect_error([&] { s.load_prompt_cache(q8); }, {q8.c_str(), "bidirectional", bad});
  }
  // A version 1 file (a prefix-LM boundary instead of spans) still continues; without its
  // boundary it is refused by name.
  rewrite_metadata(file, q8, {{"version", "1"}, {"bidirectional", ""}, {"prefix_end", "0"}});
  {
    Session v1(model, 64);
    EXPECT_EQ(v1.load_prompt_cache(q8).rows, cached.size());
    const GenerationResult got = v1.generate(full, greedy(4));
    EXPECT_EQ(got.cached_tokens, cached.size());
    EXPECT_EQ(got.tokens, first.tokens);
  }
  rewrite_metadata(file, q8, {{"version", "1"}, {"bidirectional", ""}});
  expect_error([&] { s.load_prompt_cache(q8); }, {q8.c_str(), "prefix_end"});
  rewrite_metadata(file, q8, "rows", "12x");
  expect_error([&] { s.load_prompt_cache(q8); }, {q8.c_str(), "rows", "12x"});
  rewrite_metadata(file, q8, "rows", "3");  // the tensors say otherwise
  expect_error([&] { s.load_prompt_cache(q8); }, {q8.c_str(), "keys", "U64"});
  const std::string weights = model_dir("llava15-f16") + "/model.safetensors";
  if (fs::exists(weights)) expect_error([&] { s.load_prompt_cache(weights); }, {"not a vkvlm prompt cache"});
  // Truncated anywhere, or a flipped byte in its header: an error, never a crash.
  std::string bytes;
  {
    std::ifstream in(file, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  const std::string broken = temp_file("broken.safetensors");
  for (size_t cut : {size_t(0), size_t(5), size_t(9), bytes.size() / 3, bytes.size() - 1}) {
    std::ofstream(broken, std::ios::binary | std::ios::trunc).write(bytes.data(), std::streamsize(cut));
    SCOPED_TRACE(cut);
    expect_error([&] { s.load_prompt_cache(broken); }, {broken.c_str()});
  }
  std::string flipped = bytes;
  flipped[8 + 2] = '\x01';
  std::ofstream(broken, std::ios::binary | std::ios::trunc).write(flipped.data(), std::streamsize(flipped.size()));
  expect_error([&] { s.load_prompt_cache(broken); }, {broken.c_str()});
  expect_error([&] { s.load_prompt_cache(temp_file("missing.safetensors")); }, {"missing.safetensors"});
  still_whole();
  for (auto& f : {file, q8, broken}) fs::remove(f);
}

}  // namespace
}  // namespace vkvlm::test
