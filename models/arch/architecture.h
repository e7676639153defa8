#pragma once
// What makes one multimodal architecture different from another, behind one small interface:
// its config fields and image processor, how a conversation and its images become a prompt
// (token ids, per-token positions, where the image rows go, the attention layout), its vision
// path (tower and projector), and its weights' names. Each architecture lives in one file under
// models/arch/; the registry (registry.cpp) maps config.json's model_type to it and
// preprocessor_config.json's processor type to an image processor, and is the only place those
// strings appear.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gpu/context.h"
#include "gpu/memory.h"
#include "gpu/ops.h"
#include "gpu/recorder.h"
#include "host/config.h"
#include "host/image.h"
#include "host/image_processing.h"
#include "host/tokenizer.h"
#include "models/model_config.h"
#include "models/prompt.h"
#include "models/weights.h"

namespace vkvlm {

using Messages = nlohmann::ordered_json;

// One loaded model's vision side: its processor, tower and projector.
class VisionPath {
 public:
  virtual ~VisionPath() = default;
  // CPU: the processor's pixels, and how many prompt rows the image takes, in which order.
  virtual ImagePlan plan(const Image& image) const = 0;
  // GPU: the image's features f32 [plan.tokens, text hidden size], in prompt order.
  virtual gpu::Tensor encode(const ImagePlan& plan) const = 0;
  virtual uint64_t weight_bytes() const = 0;
  // For `vkvlm info`: the tower, the processor and the image-token counts, one line each.
  virtual std::vector<std::string> describe() const = 0;
};

// What an architecture needs from the model to turn a conversation into a prompt.
struct PromptTools {
  const ModelConfig& config;
  const Tokenizer& tokenizer;
  // The chat template applied to messages (fails when the model has none), with the caller's
  // extra template variables.
  std::function<std::string(const Messages& messages)> render;
};

class Architecture {
 public:
  virtual ~Architecture() = default;

  // Reads config.json (given as fields, in folder `dir`) into c.text and c.settings: the
  // language model, and the architecture's own fields and image processor.
  virtual void read_config(const ConfigFields& config, const std::string& dir, ModelConfig& c) const = 0;
  // Whether the architecture takes images.
  virtual bool has_vision() const { return false; }
  // Loads the vision path's weights; text-only architectures return none.
  virtual std::unique_ptr<VisionPath> load_vision(gpu::Context& ctx, const ModelConfig& c, WeightLoader& loader) const {
    return nullptr;
  }
  // Image placeholders written as text in a message (Phi-3-Vision's <|image_1|>, LLaVA's
  // <image>, Qwen2-VL's <|image_pad|>), counted so that images can be given for them.
  virtual size_t count_placeholders(const ModelConfig& c, const std::string& text) const { return 0; }
  // Messages (content parts normalized to {"type": "text"} and {"type": "image"}) and the plans
  // of the images they stand for, in order -> the prompt. Throws when the conversation does not
  // fit the architecture, saying why.
  virtual Prompt build_prompt(const PromptTools& tools, const Messages& messages, std::vector<ImagePlan> images) const = 0;
  // Whether the model attends to the whole prompt bidirectionally (prefix-LM), for messages.
  virtual bool prefix_lm() const { return false; }
};

// The architecture of config.json's model_type; an unknown one is an error listing the
// supported ones.
const Architecture& architecture_for(const std::string& model_type, const std::string& where);
// The image processor preprocessor_config.json in `dir` asks for (image_processor_type, else
// what processor_class implies, else `fallback_type` when the file or the field is missing).
std::shared_ptr<const ImageProcessor> image_processor_for(const std::string& dir, const std::string& fallback_type);

// Helpers the architectures share.
namespace arch {

// Tokens of a rendered prompt with image placeholder `image_token` expanded into each image's
// rows (LLaVA, LLaVA-NeXT, Qwen2-VL); the number of placeholders must equal the images given.
Prompt expand_image_tokens(const std::vector<int32_t>& ids, int32_t image_token, std::vector<ImagePlan> images,
                           std::string text, int position_components);
// The processor's pixels as a recording's scratch tensor: crops [rows, 3, S, S] or patch rows
// [rows, patch_values].
gpu::Tensor upload_pixels(gpu::Recorder& rec, const ProcessedImage& px);
// dst [order.size(), width] = rows `order` of table (an f32 tensor of `rows` x `width`): the
// architectures' reordering of feature rows (LLaVA-NeXT's unpadded grid, Phi-3-Vision's merge).
void gather_rows(gpu::Recorder& rec, const gpu::Tensor& table, int64_t rows, int64_t width, const std::vector<int32_t>& order,
                 const gpu::Mat& dst);
// Counts non-overlapping occurrences of `needle` in `text`.
size_t count_substrings(const std::string& text, const std::string& needle);
// The text of a message's content: the string, or its text parts joined.
std::string content_text(const Messages& content);

}  // namespace arch
}  // namespace vkvlm
