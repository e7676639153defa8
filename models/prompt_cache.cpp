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
#include "host/safetensors.h"
#include "models/model.h"

namespace vkvlm {
namespace {

constexpr const char* k_format = "vkvlm-prompt-cache";
constexpr const char* k_version = "1";
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
      {"format", k_format},
      {"version", k_version},
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
  const auto& meta = file.metadata();
  auto field = [&](const char* key) -> std::string {
    auto it = meta.find(key);
    if (it == meta.end()) fail("prompt cache ", path, " has no '", key, "' in its metadata");
    return it->second;
  };
  auto number = [&](const char* key, int64_t lo, int64_t hi) {
    const std::string v = field(key);
    size_t used = 0;
    int64_t x = 0;
    try {
      x = std::stoll(v, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != v.size() || x < lo || x > hi)
      fail("prompt cache ", path, ": '", key, "' is '", v, "', not a number from ", lo, " to ", hi);
    return x;
  };
  if (meta.count("format") == 0 || meta.at("format") != k_format) fail(path, " is not a vkvlm prompt cache (vkvlm cache-prompt writes them)");
  if (field("version") != k_version)
    fail("prompt cache ", path, " has format version ", field("version"), "; this vkvlm reads version ", k_version);
  if (field("model_fingerprint") != model_.fingerprint())
    fail("prompt cache ", path, " was made with another model (", field("model"), ", fingerprint ", field("model_fingerprint"),
         ") than ", model_.config().dir, " (fingerprint ", model_.fingerprint(), ")");
  if (field("kv_dtype") != k_kv_dtype)
    fail("prompt cache ", path, " holds a ", field("kv_dtype"), " KV cache; this session's is ", k_kv_dtype);
  const auto& t = model_.config().text;
  const int64_t width = int64_t(t.num_kv_heads) * t.head_dim;
  const int64_t layers = number("layers", 1, 1 << 20), cache_width = number("kv_width", 1, int64_t(1) << 30);
  if (layers != int64_t(cache_.k.size()) || cache_width != width)
    fail("prompt cache ", path, " has ", layers, " layers of width ", cache_width, "; the model has ", cache_.k.size(),
         " of width ", width);
  const int64_t rows = number("rows", 1, int64_t(1) << 30);
  if (rows >= capacity_)
    fail("prompt cache ", path, " holds ", rows, " tokens; a context of ", capacity_,
         " tokens cannot continue it (raise the context size, e.g. --ctx)");
  const int64_t prefix_end = number("prefix_end", 0, rows);
  const bool long_factors = number("rope_long_factors", 0, 1) == 1;
  const int comps = t.rope.positions_per_token();
  auto tensor = [&](const std::string& name, StDType dtype, std::vector<int64_t> shape) -> const StTensor& {
    auto it = file.tensors().find(name);
    if (it == file.tensors().end()) fail("prompt cache ", path, " has no tensor ", name);
    const StTensor& x = it->second;
    if (x.dtype != dtype || x.shape != shape) {
      StTensor want;
      want.shape = shape;
      fail("prompt cache ", path, ": tensor ", name, " is ", st_dtype_name(x.dtype), " ", x.shape_string(), ", not ",
           st_dtype_name(dtype), " ", want.shape_string());
    }
    return x;
  };
  const StTensor& keys = tensor("keys", StDType::U64, {rows});
  tensor("ids", StDType::I32, {rows});
  tensor("positions", StDType::I32, {rows, comps});
  std::vector<uint64_t> cached(size_t(rows), 0);
  std::memcpy(cached.data(), keys.data, keys.bytes);
  // The rows go in only once every tensor has been checked: a bad file leaves the session as it was.
  std::vector<const StTensor*> kv;
  for (size_t l = 0; l < cache_.k.size(); ++l) {
    kv.push_back(&tensor(layer_name("k", l), StDType::F16, {rows, width}));
    kv.push_back(&tensor(layer_name("v", l), StDType::F16, {rows, width}));
  }
  reset();
  for (size_t l = 0; l < cache_.k.size(); ++l) {
    ctx_.upload(cache_.k[l], kv[2 * l]->data, kv[2 * l]->bytes);
    ctx_.upload(cache_.v[l], kv[2 * l + 1]->data, kv[2 * l + 1]->bytes);
  }
  ensure_rope(long_factors, rope_positions_);
  cached_keys_ = std::move(cached);
  cached_prefix_end_ = prefix_end;
  return {rows, meta};
}

}  // namespace vkvlm
