#include "models/model_config.h"

#include <filesystem>

#include "base/error.h"
#include "models/arch/architecture.h"

namespace vkvlm {
namespace fs = std::filesystem;

bool ModelConfig::is_vlm() const { return arch && arch->has_vision(); }

ModelConfig load_model_config(const std::string& dir) {
  const fs::path d(dir);
  std::error_code ec;
  if (!fs::exists(d, ec)) fail("model folder ", dir, " does not exist");
  if (!fs::is_directory(d, ec)) fail("model path ", dir, " is not a folder (expected a checkpoint folder with config.json)");
  const fs::path cfg_path = d / "config.json";
  if (!fs::exists(cfg_path, ec)) fail("model folder ", dir, " has no config.json");
  ModelConfig c;
  c.dir = dir;
  c.raw = read_json_file(cfg_path.string());
  const std::string where = cfg_path.string();
  ConfigFields top(c.raw, where);
  c.model_type = top.string("model_type", "");
  if (c.model_type.empty()) fail(where, " has no model_type");
  if (top.has("architectures") && c.raw["architectures"].is_array() && !c.raw["architectures"].empty() &&
      c.raw["architectures"][0].is_string())
    c.architecture = c.raw["architectures"][0].get<std::string>();
  c.arch = &architecture_for(c.model_type, where);
  const fs::path gen = d / "generation_config.json";
  if (fs::exists(gen, ec)) {
    c.generation = read_json_file(gen.string());
    if (!c.generation.is_object()) fail(gen.string(), " is not a JSON object");
  }
  c.arch->read_config(top, dir, c);
  c.quantization = parse_quantization(c.raw, where);
  c.eos_token_ids = eos_token_ids(c.raw, c.generation.is_object() ? &c.generation : nullptr, where);
  return c;
}

}  // namespace vkvlm
