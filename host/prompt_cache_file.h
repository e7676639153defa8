#pragma once
// The prompt-cache file (vkvlm cache-prompt) read and checked on the host, before anything
// touches a KV cache: the metadata against the model's identity and KV layout, every tensor's
// dtype and shape. A truncated, corrupted or foreign file is an error naming the file.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "host/safetensors.h"

namespace vkvlm {

inline constexpr const char* k_prompt_cache_format = "vkvlm-prompt-cache";
inline constexpr const char* k_prompt_cache_version = "1";

// What the loading session expects.
struct PromptCacheLayout {
  std::string model, fingerprint, kv_dtype;  // model: its folder, for messages
  int64_t layers = 0, kv_width = 0;          // per layer K and V rows of kv_width values
  int position_components = 1;
  int64_t capacity = 0;                      // the session's rows: the cache must leave one free
};

struct PromptCacheContents {
  int64_t rows = 0, prefix_end = 0;
  bool long_factors = false;
  std::vector<uint64_t> keys;               // [rows]
  std::vector<const StTensor*> k, v;        // per layer, [rows, kv_width], inside the file's mapping
  std::map<std::string, std::string> metadata;
};

// Checks `file` (opened from `path`) against `expect`; throws naming the file and what differs.
PromptCacheContents read_prompt_cache(const SafetensorsFile& file, const std::string& path, const PromptCacheLayout& expect);

}  // namespace vkvlm
