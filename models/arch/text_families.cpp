#include "models/arch/text_families.h"

#include "base/error.h"

namespace vkvlm {
namespace {

// A family with transformers' defaults: Llama, Mistral, Phi-3.
TextDefaults plain(const char* family) {
  TextDefaults d;
  d.family = family;
  return d;
}

// Qwen2 writes sliding_window into every config but applies it only with use_sliding_window.
TextDefaults qwen2() {
  TextDefaults d = plain("qwen2");
  d.attention_bias = true;
  d.use_sliding_window = false;
  return d;
}

// Gemma: head_dim 256, RMSNorm by (1 + w), inputs scaled by sqrt(hidden), a tied head, and no
// sliding window. transformers' Gemma takes hidden_activation and falls back to the tanh GELU
// (not to hidden_act, which older configs set to "gelu").
TextDefaults gemma() {
  TextDefaults d = plain("gemma");
  d.head_dim = 256;
  d.activation_key = "hidden_activation";
  d.activation = "gelu_pytorch_tanh";
  d.norm_plus_one = true;
  d.embed_scale_sqrt_hidden = true;
  d.tie_embeddings = true;
  d.sliding_window = false;
  return d;
}

const std::vector<TextDefaults>& families() {
  static const std::vector<TextDefaults> f = {plain("llama"), plain("mistral"), plain("phi3"), qwen2(), gemma()};
  return f;
}

}  // namespace

const TextDefaults& text_family(const std::string& family, const std::string& where) {
  for (const TextDefaults& d : families())
    if (d.family == family) return d;
  std::string list;
  for (const std::string& k : text_families()) list += (list.empty() ? "" : ", ") + k;
  fail(where, ": language model type '", family, "' is not supported (", list, " are)");
}

std::vector<std::string> text_families() {
  std::vector<std::string> out;
  for (const TextDefaults& d : families()) out.push_back(d.family);
  return out;
}

}  // namespace vkvlm
