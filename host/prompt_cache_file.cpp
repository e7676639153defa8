#include "host/prompt_cache_file.h"

#include <cstring>

#include "base/error.h"

namespace vkvlm {

namespace {

// "BEGIN-END,..." -> spans, each within [0, rows), sorted and disjoint.
std::vector<std::pair<int64_t, int64_t>> parse_spans(const std::string& v, int64_t rows, const std::string& path) {
  std::vector<std::pair<int64_t, int64_t>> out;
  size_t i = 0;
  auto number = [&]() {
    const size_t start = i;
    int64_t x = 0;
    while (i < v.size() && v[i] >= '0' && v[i] <= '9' && i - start < 12) x = x * 10 + (v[i++] - '0');
    if (i == start) fail("prompt cache ", path, ": 'bidirectional' is '", v, "', not spans BEGIN-END,...");
    return x;
  };
  while (i < v.size()) {
    const int64_t b = number();
    if (i >= v.size() || v[i++] != '-') fail("prompt cache ", path, ": 'bidirectional' is '", v, "', not spans BEGIN-END,...");
    const int64_t e = number();
    if (b >= e || e > rows || (!out.empty() && b < out.back().second))
      fail("prompt cache ", path, ": its bidirectional spans '", v, "' are not sorted, disjoint spans within its ", rows,
           " rows");
    out.push_back({b, e});
    if (i < v.size() && (v[i++] != ',' || i == v.size()))
      fail("prompt cache ", path, ": 'bidirectional' is '", v, "', not spans BEGIN-END,...");
  }
  return out;
}

}  // namespace

std::string format_spans(const std::vector<std::pair<int64_t, int64_t>>& spans) {
  std::string s;
  for (const auto& [b, e] : spans) s += (s.empty() ? "" : ",") + std::to_string(b) + "-" + std::to_string(e);
  return s;
}

PromptCacheContents read_prompt_cache(const SafetensorsFile& file, const std::string& path, const PromptCacheLayout& expect) {
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
  if (meta.count("format") == 0 || meta.at("format") != k_prompt_cache_format)
    fail(path, " is not a vkvlm prompt cache (vkvlm cache-prompt writes them)");
  const std::string version = field("version");
  if (version != k_prompt_cache_version && version != "1")
    fail("prompt cache ", path, " has format version ", version, "; this vkvlm reads versions 1 and ", k_prompt_cache_version);
  if (field("model_fingerprint") != expect.fingerprint)
    fail("prompt cache ", path, " was made with another model (", field("model"), ", fingerprint ", field("model_fingerprint"),
         ") than ", expect.model, " (fingerprint ", expect.fingerprint, ")");
  if (field("kv_dtype") != expect.kv_dtype)
    fail("prompt cache ", path, " holds a ", field("kv_dtype"), " KV cache; this session's is ", expect.kv_dtype);
  const int64_t layers = number("layers", 1, 1 << 20), width = number("kv_width", 1, int64_t(1) << 30);
  if (layers != expect.layers || width != expect.kv_width)
    fail("prompt cache ", path, " has ", layers, " layers of width ", width, "; the model has ", expect.layers, " of width ",
         expect.kv_width);
  PromptCacheContents c;
  c.rows = number("rows", 1, int64_t(1) << 30);
  if (c.rows >= expect.capacity)
    fail("prompt cache ", path, " holds ", c.rows, " tokens; a context of ", expect.capacity,
         " tokens cannot continue it (raise ", expect.context_flag, ")");
  if (version == "1") {
    if (const int64_t prefix_end = number("prefix_end", 0, c.rows)) c.bidirectional.push_back({0, prefix_end});
  } else {
    c.bidirectional = parse_spans(field("bidirectional"), c.rows, path);
  }
  c.long_factors = number("rope_long_factors", 0, 1) == 1;
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
  const StTensor& keys = tensor("keys", StDType::U64, {c.rows});
  tensor("ids", StDType::I32, {c.rows});
  tensor("positions", StDType::I32, {c.rows, expect.position_components});
  c.keys.resize(size_t(c.rows));
  std::memcpy(c.keys.data(), keys.data, keys.bytes);
  for (int64_t l = 0; l < layers; ++l) {
    for (auto* side : {&c.k, &c.v}) {
      const std::string name = std::string(side == &c.k ? "k." : "v.") + std::to_string(l);
      std::vector<const StTensor*> planes;
      for (const PromptCachePlane& pl : expect.planes) {
        const int64_t n = pl.rows_of(c.rows);
        planes.push_back(n > 0 ? &tensor(name + pl.suffix, pl.dtype, {n, pl.cols}) : nullptr);
      }
      side->push_back(std::move(planes));
    }
  }
  c.metadata = meta;
  return c;
}

}  // namespace vkvlm
