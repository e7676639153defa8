#pragma once
// A checkpoint folder's configuration: config.json (through its architecture's reader),
// generation_config.json and preprocessor_config.json. Reading it touches no GPU, so every
// mistake in a model folder is reported before anything is allocated.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "host/config.h"

namespace vkvlm {

class Architecture;

// What an architecture keeps of the config for itself (its own fields, its image processor).
// Each architecture file derives its own and is the only one to read it.
struct ArchSettings {
  virtual ~ArchSettings() = default;
};

struct ModelConfig {
  std::string dir;
  std::string model_type;    // config.json's model_type
  std::string architecture;  // architectures[0], for messages
  const Architecture* arch = nullptr;
  TextConfig text;
  std::shared_ptr<const ArchSettings> settings;
  Quantization quantization;               // MLX's, when the checkpoint is quantized
  std::vector<int64_t> eos_token_ids;      // generation_config.json wins over config.json
  nlohmann::json generation;               // generation_config.json (or null)
  nlohmann::json raw;                      // config.json

  bool is_vlm() const;
};

// Reads a checkpoint folder's configuration; every missing or wrong field is an error that
// names the file and the field, and an unknown model_type lists the supported ones.
ModelConfig load_model_config(const std::string& dir);

}  // namespace vkvlm
