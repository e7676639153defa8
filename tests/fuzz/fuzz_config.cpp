// A model folder's configuration as a stranger may ship it: config.json (every architecture),
// preprocessor_config.json and generation_config.json, read as `vkvlm` reads them, then the
// image processor they describe run on a small image. Input: the three files' texts.
#include "models/arch/architecture.h"
#include "models/model_config.h"
#include "tests/fuzz/fuzz_input.h"

using namespace vkvlm;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = fuzz::split_parts(data, size, 3);
  const auto dir = fuzz::fresh_dir();
  fuzz::write_file(dir / "config.json", parts[0]);
  if (parts.size() > 1) fuzz::write_file(dir / "preprocessor_config.json", parts[1]);
  if (parts.size() > 2) fuzz::write_file(dir / "generation_config.json", parts[2]);
  try {
    const ModelConfig cfg = load_model_config(dir.string());
    (void)cfg.is_vlm();
  } catch (const std::exception&) {
  }
  if (parts.size() > 1) {
    try {
      auto processor = image_processor_for(dir.string(), "");
      Image img;
      img.width = 11;
      img.height = 7;
      img.rgb.assign(size_t(img.width) * img.height * 3, 0);
      for (size_t i = 0; i < img.rgb.size(); ++i) img.rgb[i] = uint8_t(i * 37);
      const ProcessedImage px = processor->process(img);
      (void)px.pixels.size();
    } catch (const std::exception&) {
    }
  }
  return 0;
}
