// Plain causal language models (Llama, Mistral, Phi-3, Qwen2, Gemma): config.json is the
// decoder's own config; the prompt is the rendered chat, whose template writes any BOS itself.
#include "models/arch/architecture.h"
#include "models/arch/text_families.h"

namespace vkvlm {
namespace {

class CausalLm : public Architecture {
 public:
  void read_config(const ConfigFields& top, const std::string& dir, ModelConfig& c) const override {
    c.text = parse_text_config(top.raw(), top.where(), text_family(c.model_type, top.where()));
    c.settings = std::make_shared<ArchSettings>();
  }
  Prompt build_prompt(const PromptTools& t, const Messages& messages, std::vector<ImagePlan> images) const override {
    std::string text = t.render(messages);
    PromptBuilder b(t.config.text.rope.positions_per_token());
    b.text(t.tokenizer.encode(text, false));
    return b.finish(std::move(text), {});
  }
};

}  // namespace

const Architecture& causal_lm_architecture() {
  static const CausalLm a;
  return a;
}

}  // namespace vkvlm
