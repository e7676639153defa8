// A prompt-cache file (vkvlm cache-prompt) as someone may hand it over: the safetensors reader,
// then every check of its metadata and tensors against a session's layout (2 layers of width
// 8, one position per token, 64 rows). The fingerprint expected is the file's own, so inputs get
// past it to the checks behind. Whatever passes must describe only bytes inside the file.
#include "host/prompt_cache_file.h"
#include "tests/fuzz/fuzz_input.h"

using namespace vkvlm;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto dir = fuzz::fresh_dir();
  const auto path = (dir / "cache.safetensors").string();
  fuzz::write_file(dir / "cache.safetensors", std::string(reinterpret_cast<const char*>(data), size));
  try {
    const SafetensorsFile file(path);
    PromptCacheLayout expect;
    expect.model = "fuzz";
    const auto it = file.metadata().find("model_fingerprint");
    expect.fingerprint = it == file.metadata().end() ? "" : it->second;
    expect.kv_dtype = "f16";
    expect.layers = 2;
    expect.kv_width = 8;
    expect.position_components = 1;
    expect.capacity = 64;
    const PromptCacheContents c = read_prompt_cache(file, path, expect);
    volatile uint8_t sink = 0;
    for (const auto* t : c.k) sink = sink ^ t->data[0] ^ t->data[t->bytes - 1];
    for (const auto* t : c.v) sink = sink ^ t->data[0] ^ t->data[t->bytes - 1];
    if (c.keys.size() != size_t(c.rows) || c.prefix_end > c.rows) __builtin_trap();
  } catch (const std::exception&) {
  }
  return 0;
}
