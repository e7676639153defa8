// safetensors headers and model.safetensors.index.json: a checkpoint folder as a stranger may
// ship it. Input: the first shard's bytes, then optionally an index and a second shard.
// Whatever opens must describe only bytes inside its file.
#include <cstring>

#include "host/safetensors.h"
#include "tests/fuzz/fuzz_input.h"

using namespace vkvlm;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = fuzz::split_parts(data, size, 3);
  const auto dir = fuzz::fresh_dir();
  if (parts.size() == 1) {
    fuzz::write_file(dir / "model.safetensors", parts[0]);
  } else {
    fuzz::write_file(dir / "model-00001-of-00002.safetensors", parts[0]);
    fuzz::write_file(dir / "model.safetensors.index.json", parts[1]);
    if (parts.size() > 2) fuzz::write_file(dir / "model-00002-of-00002.safetensors", parts[2]);
  }
  try {
    TensorStore store = TensorStore::open_directory(dir.string());
    volatile uint8_t sink = 0;
    for (const auto& name : store.names()) {
      const StTensor& t = store.get(name);
      // Every byte a tensor claims must be readable (ASan reports any that is not).
      if (t.bytes) sink = sink ^ t.data[0] ^ t.data[t.bytes - 1];
      (void)st_dtype_name(t.dtype);
      if (t.numel() <= (1 << 16)) (void)t.to_f32();
    }
    (void)store.total_bytes();
  } catch (const std::exception&) {
  }
  return 0;
}
