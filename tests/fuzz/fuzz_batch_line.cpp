// Lines of a `vkvlm generate --batch` file as anyone may write them: parsed and checked as the
// command does before it loads the model (nesting bounded first, every field's type and range).
#include "app/batch_line.h"

using namespace vkvlm;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string line(reinterpret_cast<const char*>(data), size);
  try {
    if (batch_line_blank(line)) return 0;
    const BatchLine b = parse_batch_line(line, GenerationParams{});
    (void)b.id.dump();  // echoed in the output
  } catch (const std::exception&) {
  }
  return 0;
}
