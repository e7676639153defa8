#pragma once
// The prompt-cache file (vkvlm cache-prompt) read and checked on the host, before anything
// touches a KV cache: the metadata against the model's identity and KV layout, every tensor's
// dtype and shape. A truncated, corrupted or foreign file is an error naming the file.
#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "host/safetensors.h"

namespace vkvlm {

inline constexpr const char* k_prompt_cache_format = "vkvlm-prompt-cache";
// Version 2 lists the prompt's bidirectional spans ("bidirectional": "BEGIN-END,..."); version 1
// files, with a prefix-LM boundary ("prefix_end"), are read too.
inline constexpr const char* k_prompt_cache_version = "2";

// One tensor per layer and side holding part of the KV rows: "k.L" + suffix, dtype, the cache
// rows [first_row, end_row) it can hold, cols per row. An f16 cache is one plane ("", F16);
// a quantized one adds ".q" (U32 packed values) and ".qp" (U32 scale/bias words) for the rows
// from --quantized-kv-start on. A file holds each plane's rows below its `rows`; a plane with
// none is absent.
struct PromptCachePlane {
  std::string suffix;
  StDType dtype = StDType::F16;
  int64_t first_row = 0, end_row = 0, cols = 0;
  int64_t rows_of(int64_t rows) const { return rows <= first_row ? 0 : std::min(rows, end_row) - first_row; }
};

// What the loading session expects.
struct PromptCacheLayout {
  std::string model, fingerprint, kv_dtype;  // model: its folder, for messages
  int64_t layers = 0, kv_width = 0;          // per layer K and V rows of kv_width values
  std::vector<PromptCachePlane> planes;      // how those rows are stored
  int position_components = 1;
  int64_t capacity = 0;                      // the session's rows: the cache must leave one free
  std::string context_flag = "--ctx";        // the option that sets them, for the advice
};

struct PromptCacheContents {
  int64_t rows = 0;
  std::vector<std::pair<int64_t, int64_t>> bidirectional;  // [begin, end) row spans, sorted, disjoint
  bool long_factors = false;
  std::vector<uint64_t> keys;                      // [rows]
  // Per layer, per plane: [plane rows, cols], inside the file's mapping (null: no rows there).
  std::vector<std::vector<const StTensor*>> k, v;
  std::map<std::string, std::string> metadata;
};

// "BEGIN-END,BEGIN-END": the metadata value of bidirectional spans.
std::string format_spans(const std::vector<std::pair<int64_t, int64_t>>& spans);

// Checks `file` (opened from `path`) against `expect`; throws naming the file and what differs.
PromptCacheContents read_prompt_cache(const SafetensorsFile& file, const std::string& path, const PromptCacheLayout& expect);

}  // namespace vkvlm
