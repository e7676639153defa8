// Prompt caches on disk: a conversation's KV cache, computed once, saved as one safetensors file
// and continued from another process (as mlx-lm's cache_prompt). The file holds per layer the
// K and V rows [rows, kv_heads * head_dim] as the session stores them (RoPE applied; f16, or f16
// rows then MLX-quantized rows: host/prompt_cache_file.h's planes), the
// token ids, the row keys that decide reuse (text tokens by id, image rows by the image's hash),
// the RoPE positions, and in __metadata__ the model's identity and the KV format.
#include <cstring>
#include <map>
#include <sstream>

#include "base/error.h"
#include "gpu/context.h"
#include "host/prompt_cache_file.h"
#include "host/safetensors.h"
#include "models/session.h"

namespace vkvlm {
namespace {

std::string layer_name(const char* kv, size_t layer) { return std::string(kv) + "." + std::to_string(layer); }

// The file's tensors per layer and side, from how the cache stores its segments.
std::vector<PromptCachePlane> cache_planes(const KvCache& cache) {
  std::vector<PromptCachePlane> planes;
  int64_t first = 0;
  for (const gpu::KvMat& seg : cache.k.at(0)) {
    const int64_t end = first + seg.rows();
    if (seg.bits) {
      planes.push_back({".q", StDType::U32, first, end, seg.data.cols});
      planes.push_back({".qp", StDType::U32, first, end, seg.params.cols});
    } else {
      planes.push_back({"", StDType::F16, first, end, seg.data.cols});
    }
    first = end;
  }
  return planes;
}

// The tensors of plane i of one layer's segments (the segment's values or its params).
const gpu::Tensor& plane_tensor(const gpu::KvRows& layer, const std::vector<PromptCachePlane>& planes, size_t i) {
  size_t seg = 0;
  for (size_t j = 0; j < i; ++j)
    if (planes[j].suffix != ".q") ++seg;  // ".q" and ".qp" share one segment
  const gpu::KvMat& m = layer.at(seg);
  return planes[i].suffix == ".qp" ? m.params.t : m.data.t;
}

uint64_t plane_bytes(const PromptCachePlane& pl, int64_t rows) {
  return uint64_t(pl.rows_of(rows)) * uint64_t(pl.cols) * (pl.dtype == StDType::F16 ? 2 : 4);
}

}  // namespace

int64_t Session::save_prompt_cache(const Prompt& prompt, const std::string& path,
                                   const std::map<std::string, std::string>& notes) {
  const Prepared p = prepare(prompt);
  if (p.cancelled) fail("internal: the prompt was not computed whole");
  const int64_t rows = prompt.size();
  const auto& t = model_.config().text;
  const int64_t width = int64_t(t.num_kv_heads) * t.head_dim;
  const std::vector<PromptCachePlane> planes = cache_planes(cache_);
  std::vector<StWrite> tensors;
  std::vector<std::vector<uint8_t>> kv;  // what the tensors point at
  kv.reserve(cache_.k.size() * 2 * planes.size());
  tensors.push_back({"ids", StDType::I32, {rows}, prompt.ids.data(), uint64_t(rows) * 4});
  tensors.push_back({"keys", StDType::U64, {rows}, prompt.keys.data(), uint64_t(rows) * 8});
  tensors.push_back({"positions", StDType::I32, {rows, prompt.position_components}, prompt.positions.data(),
                     prompt.positions.size() * 4});
  // K and V as the cache holds them: per layer, the rows each plane has.
  for (size_t l = 0; l < cache_.k.size(); ++l)
    for (const char* side : {"k", "v"})
      for (size_t i = 0; i < planes.size(); ++i) {
        const PromptCachePlane& pl = planes[i];
        const uint64_t bytes = plane_bytes(pl, rows);
        if (bytes == 0) continue;
        kv.emplace_back(bytes);
        ctx_.download(plane_tensor(side[0] == 'k' ? cache_.k[l] : cache_.v[l], planes, i), kv.back().data(), bytes);
        tensors.push_back({layer_name(side, l) + pl.suffix, pl.dtype, {pl.rows_of(rows), pl.cols}, kv.back().data(), bytes});
      }
  std::vector<std::pair<int64_t, int64_t>> spans;
  for (const BidirectionalSpan& b : prompt.bidirectional) spans.push_back({b.begin, b.end});
  std::ostringstream images;
  for (size_t i = 0; i < prompt.images.size(); ++i) images << (i ? "," : "") << std::hex << prompt.images[i].hash;
  std::map<std::string, std::string> meta = notes;
  const std::map<std::string, std::string> own = {
      {"format", k_prompt_cache_format},
      {"version", k_prompt_cache_version},
      {"model", model_.config().dir},
      {"model_fingerprint", model_.fingerprint()},
      {"kv_dtype", cache_.format.tag()},
      {"layers", std::to_string(cache_.k.size())},
      {"kv_width", std::to_string(width)},
      {"rows", std::to_string(rows)},
      {"bidirectional", format_spans(spans)},
      {"rope_long_factors", rope_long_ ? "1" : "0"},
      {"images", images.str()},
      {"prompt", prompt.text},
  };
  for (const auto& [k, v] : own) meta[k] = v;
  write_safetensors_file(path, tensors, meta);
  return rows;
}

Session::LoadedPromptCache Session::load_prompt_cache(const std::string& path) {
  const SafetensorsFile file(path, "prompt cache");  // validated: a truncated or corrupted file throws here
  const auto& t = model_.config().text;
  PromptCacheLayout expect;
  expect.model = model_.config().dir;
  expect.fingerprint = model_.fingerprint();
  expect.kv_dtype = cache_.format.tag();
  expect.planes = cache_planes(cache_);
  expect.layers = int64_t(cache_.k.size());
  expect.kv_width = int64_t(t.num_kv_heads) * t.head_dim;
  expect.position_components = t.rope.positions_per_token();
  expect.capacity = capacity_;
  expect.context_flag = rotating_ ? "--max-kv-size" : "--ctx";
  // Every tensor is checked before the rows go in: a bad file leaves the session as it was.
  PromptCacheContents c = read_prompt_cache(file, path, expect);
  reset();
  for (size_t l = 0; l < cache_.k.size(); ++l)
    for (size_t i = 0; i < expect.planes.size(); ++i) {
      if (const StTensor* x = c.k[l][i]) ctx_.upload(plane_tensor(cache_.k[l], expect.planes, i), x->data, x->bytes);
      if (const StTensor* x = c.v[l][i]) ctx_.upload(plane_tensor(cache_.v[l], expect.planes, i), x->data, x->bytes);
    }
  ensure_rope(c.long_factors, rope_positions_);
  cached_keys_ = std::move(c.keys);
  cached_spans_.clear();
  for (const auto& [b, e] : c.bidirectional) cached_spans_.push_back({b, e});
  return {c.rows, std::move(c.metadata)};
}

}  // namespace vkvlm
