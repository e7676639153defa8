// A prompt-cache file (vkvlm cache-prompt) as someone may hand it over: the safetensors reader,
// then every check of its metadata and tensors against a session's layout (2 layers, one
// position per token, 64 rows; an f16 cache of width 8, or for a file whose kv_dtype is
// q4g32s3 a cache of width 64 with 3 f16 rows, then 4-bit rows in groups of 32). The
// fingerprint expected is the file's own, so inputs get past it to the checks behind. Whatever
// passes must describe only bytes inside the file.
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
    const auto dtype = file.metadata().find("kv_dtype");
    const bool quantized = dtype != file.metadata().end() && dtype->second == "q4g32s3";
    expect.kv_dtype = quantized ? "q4g32s3" : "f16";
    expect.layers = 2;
    expect.kv_width = quantized ? 64 : 8;
    if (quantized)
      expect.planes = {{"", StDType::F16, 0, 3, 64}, {".q", StDType::U32, 3, 64, 8}, {".qp", StDType::U32, 3, 64, 2}};
    else
      expect.planes = {{"", StDType::F16, 0, 64, 8}};
    expect.position_components = 1;
    expect.capacity = 64;
    const PromptCacheContents c = read_prompt_cache(file, path, expect);
    volatile uint8_t sink = 0;
    for (const auto* side : {&c.k, &c.v})
      for (const auto& layer : *side)
        for (const auto* t : layer)
          if (t) sink = sink ^ t->data[0] ^ t->data[t->bytes - 1];
    if (c.keys.size() != size_t(c.rows)) __builtin_trap();
    int64_t end = 0;
    for (const auto& [b, e] : c.bidirectional) {
      if (b < end || e <= b || e > c.rows) __builtin_trap();
      end = e;
    }
  } catch (const std::exception&) {
  }
  return 0;
}
