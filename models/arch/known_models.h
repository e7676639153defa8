#pragma once
// Known models (as the MLX Swift library's ModelRegistry): Hugging Face repository ids of the
// checkpoints vkvlm's architectures and weight layouts are verified for, with a prompt that suits
// each and what to know before using it. `vkvlm models` prints them.
#include <string>
#include <vector>

namespace vkvlm {

struct KnownModel {
  std::string repo;          // ORG/NAME, as --model takes it
  std::string architecture;  // model_type in its config.json
  std::string weights;       // e.g. "f16", "MLX 4-bit, group 64"
  std::string prompt;        // a default prompt (PaliGemma: the task prefix)
  std::string fixture;       // the test fixture of the same layout (tests/data/fixtures/NAME)
  std::string notes;
};

const std::vector<KnownModel>& known_models();

// resolve_model_folder(name) (host/hub_cache.h), and when `name` is no folder but the last part
// of a known model's repository id, the error suggests that id.
std::string resolve_model(const std::string& name);

}  // namespace vkvlm
