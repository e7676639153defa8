// Prompt caches on disk: a conversation's KV cache, computed once, saved as one safetensors file
// and continued from another process (as mlx-lm's cache_prompt). The file holds per layer the
// K and V rows [rows, kv_heads * head_dim] as the session stores them (f16, RoPE applied), the
// token ids, the row keys that decide reuse (text tokens by id, image rows by the image's hash),
// the RoPE positions, and in __metadata__ the model's identity and the KV format.
#include <cstring>
#include <map>
#include <sstream>

#include "base/error.h"
#include "gpu/context.h"
#include "host/prompt_cache_file.h"
#include "host/safetensors.h"
#include "models/model.h"

namespace vkvlm {
namespace {

constexpr const char* k_kv_dtype = "f16";  // what KvCache stores

std::string layer_name(const char* kv, size_t layer) { return std::string(kv) + "." + std::to_string(layer); }

}  // namespace

int64_t Session::save_prompt_cache(const Prompt& prompt, const std::string& path,
                                   const std::map<std::string, std::string>& notes) {
  const Prepared p = prepare(prompt);
  if (p.cancelled) fail("internal: the prompt was not computed whole");
  const int64_t rows = prompt.size();
  const auto& t = model_.config().text;
  const int64_t width = int64_t(t.num_kv_heads) * t.head_dim;
  const uint64_t layer_bytes = uint64_t(rows) * uint64_t(width) * 2;
  // K and V as the cache holds them: f16 [rows, width] per layer.
  std::vector<std::vector<uint8_t>> kv(cache_.k.size() * 2, std::vector<uint8_t>(layer_bytes));
  std::vector<StWrite> tensors;
  tensors.push_back({"ids", StDType::I32, {rows}, prompt.ids.data(), uint64_t(rows) * 4});
  tensors.push_back({"keys", StDType::U64, {rows}, prompt.keys.data(), uint64_t(rows) * 8});
  tensors.push_back({"positions", StDType::I32, {rows, prompt.position_components}, prompt.positions.data(),
                     prompt.positions.size() * 4});
  for (size_t l = 0; l < cache_.k.size(); ++l) {
    ctx_.download(cache_.k[l], kv[2 * l].data(), layer_bytes);
    ctx_.download(cache_.v[l], kv[2 * l + 1].data(), layer_bytes);
    tensors.push_back({layer_name("k", l), StDType::F16, {rows, width}, kv[2 * l].data(), layer_bytes});
    tensors.push_back({layer_name("v", l), StDType::F16, {rows, width}, kv[2 * l + 1].data(), layer_bytes});
  }
  std::ostringstream images;
  for (size_t i = 0; i < prompt.images.size(); ++i) images << (i ? "," : "") << std::hex << prompt.images[i].hash;
  std::map<std::string, std::string> meta = notes;
  const std::map<std::string, std::string> own = {
      {"format", k_prompt_cache_format},
      {"version", k_prompt_cache_version},
      {"model", model_.config().dir},
      {"model_fingerprint", model_.fingerprint()},
      {"kv_dtype", k_kv_dtype},
      {"layers", std::to_string(cache_.k.size())},
      {"kv_width", std::to_string(width)},
      {"rows", std::to_string(rows)},
      {"prefix_end", std::to_string(prompt.prefix_end)},
      {"rope_long_factors", rope_long_ ? "1" : "0"},
      {"images", images.str()},
      {"prompt", prompt.text},
  };
  for (const auto& [k, v] : own) meta[k] = v;
  write_safetensors_file(path, tensors, meta);
  return rows;
}

Session::LoadedPromptCache Session::load_prompt_cache(const std::string& path) {
  const SafetensorsFile file(path);  // validated: a truncated or corrupted file throws here
  const auto& t = model_.config().text;
  PromptCacheLayout expect;
  expect.model = model_.config().dir;
  expect.fingerprint = model_.fingerprint();
  expect.kv_dtype = k_kv_dtype;
  expect.layers = int64_t(cache_.k.size());
  expect.kv_width = int64_t(t.num_kv_heads) * t.head_dim;
  expect.position_components = t.rope.positions_per_token();
  expect.capacity = capacity_;
  // Every tensor is checked before the rows go in: a bad file leaves the session as it was.
  PromptCacheContents c = read_prompt_cache(file, path, expect);
  reset();
  for (size_t l = 0; l < cache_.k.size(); ++l) {
    ctx_.upload(cache_.k[l], c.k[l]->data, c.k[l]->bytes);
    ctx_.upload(cache_.v[l], c.v[l]->data, c.v[l]->bytes);
  }
  ensure_rope(c.long_factors, rope_positions_);
  cached_keys_ = std::move(c.keys);
  cached_prefix_end_ = c.prefix_end;
  return {c.rows, std::move(c.metadata)};
}

}  // namespace vkvlm
