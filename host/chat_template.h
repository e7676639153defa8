#pragma once
// A model folder's chat template (chat_template.jinja, chat_template.json or the chat_template
// of tokenizer_config.json) with the special tokens it may use, loaded without weights or a
// GPU: Model renders prompts with it, `vkvlm render-template` prints what it renders.
#include <map>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "host/jinja.h"

namespace vkvlm {

class ChatTemplate {
 public:
  // Reads the folder's template files; a folder without a template gives one that is not
  // available() (rendering then fails with a message naming the folder).
  static ChatTemplate from_model_dir(const std::string& dir);

  bool available() const { return !templates_.empty(); }
  // tokenizer_config.json's eos_token, when it names one.
  const std::optional<std::string>& eos_token() const { return eos_token_; }

  // Renders as transformers' apply_chat_template does: messages (an array of {role, content}),
  // add_generation_prompt, the tokenizer's special tokens (bos_token, ..., additional_special_
  // tokens), tools and documents as None unless `vars` (a JSON object, apply_chat_template's
  // keyword arguments) gives them. Of named templates, "tool_use" renders when tools are given,
  // else "default".
  std::string render(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                     const nlohmann::ordered_json& vars = nullptr) const;

 private:
  std::string dir_;
  std::map<std::string, std::shared_ptr<const jinja::Template>> templates_;  // by name; one alone is "default"
  std::map<std::string, jinja::Value> tokens_;                                // bos_token, eos_token, ...
  std::optional<std::string> eos_token_;
};

}  // namespace vkvlm
