// The registry: config.json's model_type -> the architecture, and preprocessor_config.json's
// image_processor_type (or processor_class) -> the image processor, as the MLX Swift library's
// ModelTypeRegistry and ProcessorTypeRegistry do. The only place those strings appear.
#include <filesystem>

#include "base/error.h"
#include "models/arch/architecture.h"

namespace vkvlm {

// Each architecture file defines one of these.
const Architecture& llava_architecture();
const Architecture& llava_next_architecture();
const Architecture& phi3_v_architecture();
const Architecture& qwen2_vl_architecture();
const Architecture& paligemma_architecture();
const Architecture& causal_lm_architecture();

namespace {

struct ArchEntry {
  const char* model_type;
  const Architecture& (*get)();
};

const ArchEntry k_architectures[] = {
    {"llava", llava_architecture},
    {"llava_next", llava_next_architecture},
    {"phi3_v", phi3_v_architecture},
    {"qwen2_vl", qwen2_vl_architecture},
    {"paligemma", paligemma_architecture},
    // Plain causal language models: the decoder family is the model_type.
    {"llama", causal_lm_architecture},
    {"mistral", causal_lm_architecture},
    {"phi3", causal_lm_architecture},
    {"qwen2", causal_lm_architecture},
    {"gemma", causal_lm_architecture},
};

struct ProcessorEntry {
  const char* type;
  std::shared_ptr<const ImageProcessor> (*make)(const ProcessorConfig&);
};

template <typename P>
std::shared_ptr<const ImageProcessor> make(const ProcessorConfig& c) {
  return std::make_shared<P>(c);
}

const ProcessorEntry k_processors[] = {
    {"CLIPImageProcessor", make<ClipProcessor>},
    {"SiglipImageProcessor", make<SiglipProcessor>},
    {"LlavaNextImageProcessor", make<AnyresProcessor>},
    {"Phi3VImageProcessor", make<Phi3vProcessor>},
    {"Qwen2VLImageProcessor", make<Qwen2vlProcessor>},
};

// A preprocessor_config.json without image_processor_type: what its processor_class uses.
const std::pair<const char*, const char*> k_processor_classes[] = {
    {"LlavaProcessor", "CLIPImageProcessor"},
    {"LlavaNextProcessor", "LlavaNextImageProcessor"},
    {"Phi3VProcessor", "Phi3VImageProcessor"},
    {"Qwen2VLProcessor", "Qwen2VLImageProcessor"},
    {"PaliGemmaProcessor", "SiglipImageProcessor"},
};

}  // namespace

const Architecture& architecture_for(const std::string& model_type, const std::string& where) {
  for (const auto& e : k_architectures)
    if (model_type == e.model_type) return e.get();
  std::string list;
  for (const auto& e : k_architectures) list += std::string(list.empty() ? "" : ", ") + e.model_type;
  fail(where, ": model_type '", model_type, "' is not supported (supported: ", list, ")");
}

std::shared_ptr<const ImageProcessor> image_processor_for(const std::string& dir, const std::string& fallback_type) {
  namespace fs = std::filesystem;
  const fs::path path = fs::path(dir) / "preprocessor_config.json";
  std::error_code ec;
  ProcessorConfig cfg;
  std::string where = path.string();
  if (fs::exists(path, ec)) {
    nlohmann::json j = read_json_file(path.string());
    cfg = ProcessorConfig::from_json(j, where);
    if (cfg.type.empty() && j.contains("processor_class") && j["processor_class"].is_string())
      for (auto& [cls, type] : k_processor_classes)
        if (j["processor_class"].get<std::string>() == cls) cfg.type = type;
  } else if (fallback_type.empty()) {
    fail("model folder ", dir, " has no preprocessor_config.json (needed to prepare images)");
  } else {
    where = "the default image processor";
  }
  if (cfg.type.empty()) cfg.type = fallback_type;
  if (cfg.type.empty()) fail(where, " names no image_processor_type");
  // Newer transformers write the "fast" (torchvision) variant's name; the pixels are the same
  // processor's.
  std::string type = cfg.type;
  if (type.size() > 4 && type.compare(type.size() - 4, 4, "Fast") == 0) type.resize(type.size() - 4);
  for (const auto& e : k_processors)
    if (type == e.type) {
      cfg.type = type;
      return e.make(cfg);
    }
  std::string list;
  for (const auto& e : k_processors) list += std::string(list.empty() ? "" : ", ") + e.type;
  fail(where, ": image processor '", cfg.type, "' is not supported (supported: ", list, ")");
}

}  // namespace vkvlm
