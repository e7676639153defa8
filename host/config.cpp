#include "host/config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "base/json.h"
#include "base/error.h"
#include "base/files.h"

namespace vkvlm {
namespace fs = std::filesystem;
using nlohmann::json;

json read_json_file(const std::string& path) {
  const std::string text = read_file_bounded(path, uint64_t(256) << 20, "file");
  try {
    return parse_json<json>(text);
  } catch (const json::exception& e) {
    fail(path, " is not valid JSON: ", e.what());
  }
}

// ---------------------------------------------------------------------------------------------
// ConfigFields

ConfigFields::ConfigFields(const json& j, std::string where) : j_(j), where_(std::move(where)) {
  if (!j_.is_object()) fail(where_, " is not a JSON object");
}

bool ConfigFields::has(const char* k) const { return j_.contains(k) && !j_[k].is_null(); }

int64_t ConfigFields::integer(const char* k) const {
  if (!has(k)) fail(where_, " has no '", k, "'");
  const json& v = j_[k];
  // 4096.0 is an integer too (some converters write floats); 4096.5 is not.
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e15) return int64_t(d);
    fail(where_, ": '", k, "' must be an integer, not ", v.dump());
  }
  if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX)) fail(where_, ": '", k, "' is out of range");
  if (!v.is_number_integer()) fail(where_, ": '", k, "' must be an integer");
  return v.get<int64_t>();
}

int64_t ConfigFields::integer(const char* k, int64_t dflt) const { return has(k) ? integer(k) : dflt; }

int64_t ConfigFields::integer_in(const char* k, int64_t lo, int64_t hi) const {
  const int64_t v = integer(k);
  if (v < lo || v > hi) fail(where_, ": '", k, "' is ", v, "; it must be between ", lo, " and ", hi);
  return v;
}

int64_t ConfigFields::integer_in(const char* k, int64_t dflt, int64_t lo, int64_t hi) const {
  return has(k) ? integer_in(k, lo, hi) : dflt;
}

double ConfigFields::number(const char* k, double dflt) const {
  if (!has(k)) return dflt;
  if (!j_[k].is_number()) fail(where_, ": '", k, "' must be a number");
  const double v = j_[k].get<double>();
  if (!std::isfinite(v)) fail(where_, ": '", k, "' must be finite");
  return v;
}

double ConfigFields::number_in(const char* k, double dflt, double lo, double hi) const {
  const double v = number(k, dflt);
  if (!(v >= lo && v <= hi)) fail(where_, ": '", k, "' is ", v, "; it must be between ", lo, " and ", hi);
  return v;
}

std::string ConfigFields::string(const char* k, const std::string& dflt) const {
  if (!has(k)) return dflt;
  if (!j_[k].is_string()) fail(where_, ": '", k, "' must be a string");
  return j_[k].get<std::string>();
}

bool ConfigFields::boolean(const char* k, bool dflt) const {
  if (!has(k)) return dflt;
  if (!j_[k].is_boolean()) fail(where_, ": '", k, "' must be true or false");
  return j_[k].get<bool>();
}

std::vector<double> ConfigFields::numbers(const char* k) const {
  if (!has(k) || !j_[k].is_array()) fail(where_, ": '", k, "' must be a list of numbers");
  std::vector<double> v;
  for (auto& x : j_[k]) {
    if (!x.is_number() || !std::isfinite(x.get<double>())) fail(where_, ": '", k, "' must be a list of numbers");
    v.push_back(x.get<double>());
  }
  return v;
}

std::vector<int64_t> ConfigFields::integers(const char* k) const {
  if (!has(k) || !j_[k].is_array()) fail(where_, ": '", k, "' must be a list of integers");
  std::vector<int64_t> v;
  for (auto& x : j_[k]) {
    if (!x.is_number_integer()) fail(where_, ": '", k, "' must be a list of integers");
    v.push_back(x.get<int64_t>());
  }
  return v;
}

bool ConfigFields::has_object(const char* k) const { return has(k) && j_[k].is_object(); }

ConfigFields ConfigFields::object(const char* k) const {
  if (!has(k)) fail(where_, " has no '", k, "'");
  if (!j_[k].is_object()) fail(where_, ": '", k, "' must be an object");
  return ConfigFields(j_[k], where_ + " " + k);
}

// ---------------------------------------------------------------------------------------------
// Language model

namespace {

// Sizes beyond these are not models but mistakes (and would ask for absurd allocations).
constexpr int64_t k_max_vocab = int64_t(1) << 22;
constexpr int64_t k_max_width = int64_t(1) << 20;
constexpr int64_t k_max_layers = 1024;
constexpr int64_t k_max_heads = 1024;
constexpr int64_t k_max_positions = int64_t(1) << 30;

void parse_rope(const ConfigFields& f, TextConfig& t) {
  RopeConfig& r = t.rope;
  r.theta = f.number("rope_theta", 10000.0);
  json scaling;
  if (f.has_object("rope_parameters")) {
    // transformers 5: theta and scaling live together.
    scaling = f.raw()["rope_parameters"];
    if (scaling.contains("rope_theta") && scaling["rope_theta"].is_number()) r.theta = scaling["rope_theta"].get<double>();
  }
  if (f.has("rope_scaling")) {
    if (!f.raw()["rope_scaling"].is_object()) fail(f.where(), ": 'rope_scaling' must be an object");
    scaling = f.raw()["rope_scaling"];
  }
  if (!(r.theta > 0) || !std::isfinite(r.theta)) fail(f.where(), ": rope_theta must be a positive number");
  const double partial = f.number_in("partial_rotary_factor", 1.0, 0.0, 1.0);
  r.rot_dim = int(std::lround(t.head_dim * partial));
  if (r.rot_dim % 2) --r.rot_dim;
  if (r.rot_dim <= 0) fail(f.where(), ": partial_rotary_factor ", partial, " leaves no dimension to rotate");
  if (!scaling.is_object()) return;
  ConfigFields s(scaling, f.where() + " rope scaling");
  std::string type = s.string("rope_type", s.string("type", "default"));
  if (type == "su") type = "longrope";
  if (s.has("mrope_section")) {
    // M-RoPE (Qwen2-VL): written as type "mrope", or as "default" with mrope_section.
    for (int64_t n : s.integers("mrope_section")) {
      if (n < 0 || n > r.rot_dim) fail(s.where(), ": mrope_section entries must be between 0 and ", r.rot_dim / 2);
      r.sections.push_back(int(n));
    }
    int sum = 0;
    for (int n : r.sections) sum += n;
    if (r.sections.empty() || r.sections.size() > 3 || sum != r.rot_dim / 2)
      fail(s.where(), ": mrope_section must be up to 3 sizes adding up to head_dim / 2 = ", r.rot_dim / 2, " (they add up to ",
           sum, ")");
    if (type == "mrope") type = "default";
  } else if (type == "mrope") {
    fail(s.where(), ": mrope scaling needs mrope_section");
  }
  r.type = type;
  if (type == "default") return;
  if (type == "linear") {
    r.factor = s.number_in("factor", 1.0, 1e-6, 1e6);
  } else if (type == "llama3") {
    r.factor = s.number_in("factor", 8.0, 1e-6, 1e6);
    r.low_freq_factor = s.number_in("low_freq_factor", 1.0, 1e-6, 1e6);
    r.high_freq_factor = s.number_in("high_freq_factor", 4.0, 1e-6, 1e6);
    if (!(r.high_freq_factor > r.low_freq_factor)) fail(s.where(), ": high_freq_factor must be above low_freq_factor");
    r.original_max_position = s.integer_in("original_max_position_embeddings", 8192, 1, k_max_positions);
  } else if (type == "longrope") {
    r.short_factor = s.numbers("short_factor");
    r.long_factor = s.numbers("long_factor");
    r.original_max_position = s.integer_in("original_max_position_embeddings",
                                           f.integer_in("original_max_position_embeddings", t.max_position, 1, k_max_positions),
                                           1, k_max_positions);
    if (int(r.short_factor.size()) != r.rot_dim / 2 || int(r.long_factor.size()) != r.rot_dim / 2)
      fail(f.where(), ": longrope factor lists need ", r.rot_dim / 2, " entries (rotary dimension ", r.rot_dim, ")");
    for (double x : r.short_factor)
      if (!(x > 0)) fail(f.where(), ": longrope factors must be positive");
    for (double x : r.long_factor)
      if (!(x > 0)) fail(f.where(), ": longrope factors must be positive");
    if (s.has("attention_factor")) {
      r.attention_factor = s.number_in("attention_factor", 1.0, 1e-6, 1e6);
    } else {
      const double scale = double(t.max_position) / double(r.original_max_position);
      r.attention_factor = scale <= 1.0 || r.original_max_position < 2
                               ? 1.0
                               : std::sqrt(1.0 + std::log(scale) / std::log(double(r.original_max_position)));
    }
  } else {
    fail(f.where(), ": rope scaling type '", type, "' is not supported (default, linear, llama3, longrope/su, mrope are)");
  }
}

MlpActivation mlp_activation(const std::string& act, const std::string& where, const char* key) {
  if (act == "silu" || act == "swish") return MlpActivation::Silu;
  if (act == "gelu_pytorch_tanh" || act == "gelu_tanh" || act == "gelu_new" || act == "gelu_fast") return MlpActivation::GeluTanh;
  fail(where, ": ", key, " '", act, "' is not supported for the language model (silu, gelu_pytorch_tanh are)");
}

}  // namespace

int TextConfig::smallest_window() const {
  int w = 0;
  for (const LayerTraits& l : layers)
    if (l.window > 0 && (w == 0 || l.window < w)) w = l.window;
  return w;
}

TextConfig parse_text_config(const json& j, const std::string& where, const TextDefaults& d) {
  ConfigFields f(j, where);
  TextConfig t;
  t.family = d.family;
  t.vocab_size = f.integer_in("vocab_size", 1, k_max_vocab);
  t.hidden_size = f.integer_in("hidden_size", 1, k_max_width);
  t.intermediate_size = f.integer_in("intermediate_size", 1, k_max_width);
  t.num_layers = f.integer_in("num_hidden_layers", 1, k_max_layers);
  t.num_heads = int(f.integer_in("num_attention_heads", 1, k_max_heads));
  t.num_kv_heads = int(f.integer_in("num_key_value_heads", t.num_heads, 1, t.num_heads));
  const int64_t default_head_dim = d.head_dim ? d.head_dim : t.hidden_size / t.num_heads;
  t.head_dim = int(f.integer_in("head_dim", default_head_dim, 1, 256));
  if (t.head_dim < 2 || t.head_dim % 2) fail(where, ": head_dim ", t.head_dim, " must be an even number of at least 2");
  t.max_position = f.integer_in("max_position_embeddings", 4096, 1, k_max_positions);
  t.rms_eps = f.number_in("rms_norm_eps", 1e-6, 1e-12, 1.0);
  LayerTraits layer;
  layer.activation = mlp_activation(f.string(d.activation_key.c_str(), d.activation), where, d.activation_key.c_str());
  t.norm_plus_one = d.norm_plus_one;
  if (d.embed_scale_sqrt_hidden) t.embed_scale = std::sqrt(double(t.hidden_size));
  t.attention_bias = f.boolean("attention_bias", d.attention_bias);
  t.tie_embeddings = f.boolean("tie_word_embeddings", d.tie_embeddings);
  if (d.sliding_window && f.has("sliding_window") && f.boolean("use_sliding_window", d.use_sliding_window))
    layer.window = int(f.integer_in("sliding_window", 1, k_max_positions));
  if (t.num_heads % t.num_kv_heads)
    fail(where, ": num_attention_heads (", t.num_heads, ") must be a multiple of num_key_value_heads (", t.num_kv_heads, ")");
  parse_rope(f, t);
  t.layers.assign(size_t(t.num_layers), layer);
  return t;
}

VisionConfig parse_vision_config(const json& j, const std::string& where, const VisionConfig& d) {
  ConfigFields f(j, where);
  VisionConfig v = d;
  v.model_type = f.string("model_type", d.model_type);
  v.hidden_size = f.integer_in("hidden_size", d.hidden_size, 1, k_max_width);
  v.intermediate_size = f.integer_in("intermediate_size", d.intermediate_size, 1, k_max_width);
  v.num_layers = int(f.integer_in("num_hidden_layers", d.num_layers, 1, k_max_layers));
  v.num_heads = int(f.integer_in("num_attention_heads", d.num_heads, 1, k_max_heads));
  v.num_channels = int(f.integer_in("num_channels", d.num_channels, 1, 16));
  v.image_size = int(f.integer_in("image_size", d.image_size, 1, 8192));
  v.patch_size = int(f.integer_in("patch_size", d.patch_size, 1, 1024));
  v.layer_norm_eps = f.number_in("layer_norm_eps", d.layer_norm_eps, 1e-12, 1.0);
  v.hidden_act = f.string("hidden_act", d.hidden_act);
  if (v.image_size % v.patch_size) fail(where, ": image_size ", v.image_size, " is not a multiple of patch_size ", v.patch_size);
  if (v.hidden_size % v.num_heads)
    fail(where, ": hidden_size ", v.hidden_size, " is not a multiple of num_attention_heads ", v.num_heads);
  if (v.hidden_size / v.num_heads > 256) fail(where, ": vision heads of ", v.hidden_size / v.num_heads, " dimensions (at most 256)");
  return v;
}

Quantization parse_quantization(const json& config, const std::string& where) {
  Quantization q;
  const json* src = nullptr;
  if (config.contains("quantization") && !config["quantization"].is_null()) src = &config["quantization"];
  else if (config.contains("quantization_config") && config["quantization_config"].is_object() &&
           config["quantization_config"].contains("group_size"))
    src = &config["quantization_config"];  // MLX writes both; other tools' quantization_config means something else
  if (!src) return q;
  if (!src->is_object()) fail(where, ": 'quantization' must be an object");
  ConfigFields f(*src, where + " quantization");
  q.spec.bits = int(f.integer_in("bits", 4, 1, 8));
  q.spec.group_size = int(f.integer_in("group_size", 64, 1, 1 << 16));
  const std::string mode = f.string("mode", "affine");
  if (mode != "affine") fail(where, ": quantization mode '", mode, "' is not supported (MLX affine is)");
  for (auto& [k, v] : src->items()) {
    if (k == "bits" || k == "group_size" || k == "mode") continue;
    if (v.is_object()) {
      ConfigFields o(v, where + " quantization." + k);
      q.overrides[k] = {int(o.integer_in("bits", q.spec.bits, 1, 8)), int(o.integer_in("group_size", q.spec.group_size, 1, 1 << 16))};
    } else if (v.is_boolean() && !v.get<bool>()) {
      q.overrides[k] = {0, 0};
    }
  }
  return q;
}

std::vector<int64_t> eos_token_ids(const json& config, const json* generation, const std::string& where) {
  std::vector<int64_t> out;
  auto take = [&](const json& j, const std::string& w) {
    if (!j.is_object() || !j.contains("eos_token_id") || j["eos_token_id"].is_null()) return;
    const json& v = j["eos_token_id"];
    std::vector<int64_t> ids;
    if (v.is_number_integer()) {
      ids.push_back(v.get<int64_t>());
    } else if (v.is_array()) {
      for (auto& x : v) {
        if (!x.is_number_integer()) fail(w, ": 'eos_token_id' must hold token ids");
        ids.push_back(x.get<int64_t>());
      }
    } else {
      fail(w, ": 'eos_token_id' must be a token id or a list of them");
    }
    for (int64_t id : ids)
      if (id < 0 || id >= k_max_vocab) fail(w, ": eos_token_id ", id, " is not a token id");
    if (!ids.empty()) out = ids;
  };
  if (config.contains("text_config")) take(config["text_config"], where + " text_config");
  take(config, where);
  if (generation) take(*generation, "generation_config.json");
  return out;
}

// ---------------------------------------------------------------------------------------------
// RoPE frequencies

std::vector<double> RopeConfig::factors_for(int64_t seq_len) const {
  const int half = rot_dim / 2;
  if (type == "linear") return std::vector<double>(size_t(half), factor);
  if (type == "longrope") return uses_long_factors(seq_len) ? long_factor : short_factor;
  if (type == "llama3") {
    std::vector<double> out(static_cast<size_t>(half));
    const double old_len = double(original_max_position);
    const double low_wavelen = old_len / low_freq_factor, high_wavelen = old_len / high_freq_factor;
    for (int i = 0; i < half; ++i) {
      const double inv = 1.0 / std::pow(theta, 2.0 * i / rot_dim);
      const double wavelen = 2 * M_PI / inv;
      double scaled = wavelen > low_wavelen ? inv / factor : inv;
      if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
        const double smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
        scaled = (1 - smooth) * scaled / factor + smooth * scaled;
      }
      out[size_t(i)] = inv / scaled;
    }
    return out;
  }
  return {};
}

bool RopeConfig::uses_long_factors(int64_t seq_len) const {
  return type == "longrope" && seq_len > original_max_position;
}

}  // namespace vkvlm
