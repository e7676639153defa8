#include "models/arch/known_models.h"

#include <cctype>

#include "base/error.h"
#include "host/hub_cache.h"

namespace vkvlm {

// Each entry's layout is that of a fixture the suite checks against the Hugging Face reference
// (tests/data/fixtures); the full-size checkpoints need the network, which the suite never uses.
const std::vector<KnownModel>& known_models() {
  static const std::vector<KnownModel> models = {
      {"llava-hf/llava-1.5-7b-hf", "llava", "f16", "Describe this image.", "llava15-f16",
       "LLaVA 1.5: CLIP ViT-L/14-336 + Vicuna 7B; 576 image tokens"},
      {"mlx-community/llava-1.5-7b-4bit", "llava", "MLX 4-bit, group 64", "Describe this image.", "llava15-mlx4",
       "the mlx-community conversion; vision tower in f16"},
      {"llava-hf/llava-v1.6-mistral-7b-hf", "llava_next", "bf16", "Describe this image in detail.", "llavanext-bf16-legacy",
       "LLaVA-NeXT: anyres tiling (up to about 2900 image tokens); Mistral's sliding window"},
      {"microsoft/Phi-3-vision-128k-instruct", "phi3_v", "bf16", "What is shown in this image?", "phi3v-bf16",
       "runs natively (no remote code); LongRoPE switches to its long factors past 4096 tokens"},
      {"Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl", "bf16", "Describe this image.", "qwen2vl-bf16",
       "dynamic resolution: image tokens follow the image's size; M-RoPE"},
      {"mlx-community/Qwen2-VL-2B-Instruct-4bit", "qwen2_vl", "MLX 4-bit, group 64", "Describe this image.", "qwen2vl-mlx4",
       "the mlx-community conversion; vision tower in bf16"},
      {"google/paligemma-3b-mix-224", "paligemma", "bf16", "caption en", "paligemma-bf16",
       "gated: accept the license on its page and set HF_TOKEN; one image, a task prefix instead of a chat"},
      {"mlx-community/paligemma-3b-mix-448-8bit", "paligemma", "MLX 8-bit, group 64", "caption en", "paligemma-mlx8",
       "448x448 input (1024 image tokens); a task prefix instead of a chat"},
  };
  return models;
}

std::string resolve_model(const std::string& name) {
  try {
    return resolve_model_folder(name);
  } catch (const Error& e) {
    auto lower = [](std::string t) {
      for (auto& c : t) c = char(std::tolower(static_cast<unsigned char>(c)));
      return t;
    };
    for (const auto& m : known_models())
      if (name.find('/') == std::string::npos && lower(m.repo.substr(m.repo.find('/') + 1)) == lower(name))
        throw Error(std::string(e.what()) + "; did you mean the repository " + m.repo + "?");
    throw;
  }
}

}  // namespace vkvlm
