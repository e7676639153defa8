#include "host/config.h"

#include <cmath>
#include <filesystem>
#include <fstream>

#include "gpu/error.h"

namespace vkvlm {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

json read_json(const fs::path& p) {
  std::ifstream in(p);
  if (!in) fail("cannot read ", p.string());
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail(p.string(), " is not valid JSON: ", e.what());
  }
}

// Typed field access that names the file and field on error.
struct Fields {
  const json& j;
  std::string where;

  bool has(const char* k) const { return j.contains(k) && !j[k].is_null(); }
  int64_t integer(const char* k) const {
    if (!has(k)) fail(where, " has no '", k, "'");
    if (!j[k].is_number_integer()) fail(where, ": '", k, "' must be an integer");
    return j[k].get<int64_t>();
  }
  int64_t integer(const char* k, int64_t dflt) const { return has(k) ? integer(k) : dflt; }
  double number(const char* k, double dflt) const {
    if (!has(k)) return dflt;
    if (!j[k].is_number()) fail(where, ": '", k, "' must be a number");
    return j[k].get<double>();
  }
  std::string string(const char* k, const std::string& dflt) const {
    if (!has(k)) return dflt;
    if (!j[k].is_string()) fail(where, ": '", k, "' must be a string");
    return j[k].get<std::string>();
  }
  bool boolean(const char* k, bool dflt) const {
    if (!has(k)) return dflt;
    if (!j[k].is_boolean()) fail(where, ": '", k, "' must be true or false");
    return j[k].get<bool>();
  }
  std::vector<double> numbers(const json& arr, const char* k) const {
    if (!arr.is_array()) fail(where, ": '", k, "' must be a list of numbers");
    std::vector<double> v;
    for (auto& x : arr) {
      if (!x.is_number()) fail(where, ": '", k, "' must be a list of numbers");
      v.push_back(x.get<double>());
    }
    return v;
  }
};

std::vector<int64_t> id_list(const json& v, const std::string& where, const char* key) {
  std::vector<int64_t> out;
  if (v.is_null()) return out;
  if (v.is_number_integer()) {
    out.push_back(v.get<int64_t>());
  } else if (v.is_array()) {
    for (auto& x : v) {
      if (!x.is_number_integer()) fail(where, ": '", key, "' must hold token ids");
      out.push_back(x.get<int64_t>());
    }
  } else {
    fail(where, ": '", key, "' must be a token id or a list of them");
  }
  return out;
}

void parse_rope(const Fields& f, TextConfig& t) {
  RopeConfig& r = t.rope;
  r.theta = f.number("rope_theta", 10000.0);
  json scaling;
  if (f.has("rope_parameters") && f.j["rope_parameters"].is_object()) {
    // transformers 5: theta and scaling live together.
    scaling = f.j["rope_parameters"];
    if (scaling.contains("rope_theta") && scaling["rope_theta"].is_number()) r.theta = scaling["rope_theta"].get<double>();
  }
  if (f.has("rope_scaling")) {
    if (!f.j["rope_scaling"].is_object()) fail(f.where, ": 'rope_scaling' must be an object");
    scaling = f.j["rope_scaling"];
  }
  const double partial = f.number("partial_rotary_factor", 1.0);
  r.rot_dim = int(std::lround(t.head_dim * partial));
  if (r.rot_dim % 2) --r.rot_dim;
  if (!scaling.is_object()) return;
  Fields s{scaling, f.where + " rope scaling"};
  std::string type = s.string("rope_type", s.string("type", "default"));
  if (type == "su") type = "longrope";
  r.type = type;
  if (type == "default") return;
  if (type == "linear") {
    r.factor = s.number("factor", 1.0);
  } else if (type == "llama3") {
    r.factor = s.number("factor", 8.0);
    r.low_freq_factor = s.number("low_freq_factor", 1.0);
    r.high_freq_factor = s.number("high_freq_factor", 4.0);
    r.original_max_position = s.integer("original_max_position_embeddings", 8192);
  } else if (type == "longrope") {
    if (!s.has("short_factor") || !s.has("long_factor")) fail(f.where, ": longrope scaling needs short_factor and long_factor");
    r.short_factor = s.numbers(scaling["short_factor"], "short_factor");
    r.long_factor = s.numbers(scaling["long_factor"], "long_factor");
    r.original_max_position = s.integer("original_max_position_embeddings", f.integer("original_max_position_embeddings", t.max_position));
    if (int(r.short_factor.size()) != r.rot_dim / 2 || int(r.long_factor.size()) != r.rot_dim / 2)
      fail(f.where, ": longrope factor lists need ", r.rot_dim / 2, " entries (rotary dimension ", r.rot_dim, ")");
    if (s.has("attention_factor")) {
      r.attention_factor = s.number("attention_factor", 1.0);
    } else {
      const double scale = double(t.max_position) / double(r.original_max_position);
      r.attention_factor = scale <= 1.0 ? 1.0 : std::sqrt(1.0 + std::log(scale) / std::log(double(r.original_max_position)));
    }
  } else {
    fail(f.where, ": rope scaling type '", type, "' is not supported (default, linear, llama3, longrope/su are)");
  }
}

TextConfig parse_text(const json& j, const std::string& where) {
  Fields f{j, where};
  TextConfig t;
  t.model_type = f.string("model_type", "llama");
  static const char* known[] = {"llama", "mistral", "phi3", "qwen2"};
  if (std::find(std::begin(known), std::end(known), t.model_type) == std::end(known))
    fail(where, ": language model type '", t.model_type, "' is not supported (llama, mistral, phi3, qwen2 are)");
  t.vocab_size = f.integer("vocab_size");
  t.hidden_size = f.integer("hidden_size");
  t.intermediate_size = f.integer("intermediate_size");
  t.num_layers = f.integer("num_hidden_layers");
  t.num_heads = int(f.integer("num_attention_heads"));
  t.num_kv_heads = int(f.integer("num_key_value_heads", t.num_heads));
  t.head_dim = int(f.integer("head_dim", t.num_heads ? t.hidden_size / t.num_heads : 0));
  t.max_position = f.integer("max_position_embeddings", 4096);
  t.rms_eps = f.number("rms_norm_eps", 1e-6);
  t.hidden_act = f.string("hidden_act", "silu");
  t.attention_bias = f.boolean("attention_bias", t.model_type == "qwen2");
  t.tie_embeddings = f.boolean("tie_word_embeddings", false);
  if (f.has("sliding_window") && f.boolean("use_sliding_window", t.model_type != "qwen2")) {
    if (!j["sliding_window"].is_number_integer()) fail(where, ": 'sliding_window' must be an integer");
    t.sliding_window = int(j["sliding_window"].get<int64_t>());
  }
  if (t.vocab_size <= 0 || t.hidden_size <= 0 || t.intermediate_size <= 0 || t.num_layers <= 0 || t.num_heads <= 0 ||
      t.num_kv_heads <= 0 || t.head_dim <= 0)
    fail(where, ": model sizes must be positive");
  if (t.num_heads % t.num_kv_heads)
    fail(where, ": num_attention_heads (", t.num_heads, ") must be a multiple of num_key_value_heads (", t.num_kv_heads, ")");
  if (t.hidden_act != "silu") fail(where, ": hidden_act '", t.hidden_act, "' is not supported for the language model (silu is)");
  parse_rope(f, t);
  return t;
}

VisionConfig parse_vision(const json& j, const std::string& where) {
  Fields f{j, where};
  VisionConfig v;
  v.model_type = f.string("model_type", "clip_vision_model");
  if (v.model_type != "clip_vision_model")
    fail(where, ": vision tower '", v.model_type, "' is not supported (clip_vision_model is)");
  v.hidden_size = f.integer("hidden_size", 1024);
  v.intermediate_size = f.integer("intermediate_size", 4096);
  v.num_layers = int(f.integer("num_hidden_layers", 24));
  v.num_heads = int(f.integer("num_attention_heads", 16));
  v.num_channels = int(f.integer("num_channels", 3));
  v.image_size = int(f.integer("image_size", 336));
  v.patch_size = int(f.integer("patch_size", 14));
  v.layer_norm_eps = f.number("layer_norm_eps", 1e-5);
  v.hidden_act = f.string("hidden_act", "quick_gelu");
  if (v.hidden_act != "quick_gelu" && v.hidden_act != "gelu")
    fail(where, ": vision hidden_act '", v.hidden_act, "' is not supported (quick_gelu, gelu are)");
  if (v.image_size % v.patch_size) fail(where, ": image_size is not a multiple of patch_size");
  if (v.hidden_size % v.num_heads) fail(where, ": vision hidden_size is not a multiple of num_attention_heads");
  return v;
}

void parse_quantization(const json& q, ModelConfig& c, const std::string& where) {
  if (!q.is_object()) fail(where, ": 'quantization' must be an object");
  Fields f{q, where + " quantization"};
  c.quantization.bits = int(f.integer("bits", 4));
  c.quantization.group_size = int(f.integer("group_size", 64));
  for (auto& [k, v] : q.items()) {
    if (k == "bits" || k == "group_size" || k == "mode") continue;
    if (v.is_object()) {
      Fields o{v, where + " quantization." + k};
      c.quantization_overrides[k] = {int(o.integer("bits", c.quantization.bits)), int(o.integer("group_size", c.quantization.group_size))};
    } else if (v.is_boolean() && !v.get<bool>()) {
      c.quantization_overrides[k] = {0, 0};
    }
  }
}

}  // namespace

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

ModelConfig load_model_config(const std::string& dir) {
  const fs::path d(dir);
  std::error_code ec;
  if (!fs::exists(d, ec)) fail("model folder ", dir, " does not exist");
  if (!fs::is_directory(d, ec)) fail("model path ", dir, " is not a folder (expected a checkpoint folder with config.json)");
  const fs::path cfg_path = d / "config.json";
  if (!fs::exists(cfg_path, ec)) fail("model folder ", dir, " has no config.json");
  ModelConfig c;
  c.dir = dir;
  c.raw = read_json(cfg_path);
  const std::string where = cfg_path.string();
  if (!c.raw.is_object()) fail(where, " is not a JSON object");
  Fields top{c.raw, where};
  c.model_type = top.string("model_type", "");
  if (c.model_type.empty()) fail(where, " has no model_type");
  if (top.has("architectures") && c.raw["architectures"].is_array() && !c.raw["architectures"].empty() &&
      c.raw["architectures"][0].is_string())
    c.architecture = c.raw["architectures"][0].get<std::string>();

  if (c.model_type == "llava" || c.model_type == "llava_next") {
    if (!top.has("text_config") || !c.raw["text_config"].is_object()) fail(where, " has no text_config");
    if (!top.has("vision_config") || !c.raw["vision_config"].is_object()) fail(where, " has no vision_config");
    c.text = parse_text(c.raw["text_config"], where + " text_config");
    c.vision = parse_vision(c.raw["vision_config"], where + " vision_config");
    c.image_token_index = top.integer("image_token_index", top.integer("image_token_id", 32000));
    if (top.has("vision_feature_layer")) {
      if (!c.raw["vision_feature_layer"].is_number_integer())
        fail(where, ": vision_feature_layer must be one layer index (lists of layers are not supported)");
      c.vision_feature_layer = int(c.raw["vision_feature_layer"].get<int64_t>());
    }
    c.vision_feature_select_strategy = top.string("vision_feature_select_strategy", "default");
    if (c.vision_feature_select_strategy != "default" && c.vision_feature_select_strategy != "full")
      fail(where, ": vision_feature_select_strategy '", c.vision_feature_select_strategy, "' is not default or full");
    c.projector_hidden_act = top.string("projector_hidden_act", "gelu");
    c.projector_bias = top.boolean("multimodal_projector_bias", true);
    c.image_seq_length = top.integer("image_seq_length", 576);
    if (c.model_type == "llava_next") {
      if (!top.has("image_grid_pinpoints") || !c.raw["image_grid_pinpoints"].is_array())
        fail(where, " has no image_grid_pinpoints");
      for (auto& p : c.raw["image_grid_pinpoints"]) {
        if (!p.is_array() || p.size() != 2 || !p[0].is_number_integer() || !p[1].is_number_integer())
          fail(where, ": image_grid_pinpoints entries must be [height, width]");
        c.image_grid_pinpoints.push_back({int(p[0].get<int64_t>()), int(p[1].get<int64_t>())});
      }
    }
  } else if (c.model_type == "phi3_v") {
    json text = c.raw;
    text["model_type"] = "phi3";
    c.text = parse_text(text, where);
    // A real Phi-3-Vision config has no vision_config: it means CLIP ViT-L/14 at 336 pixels.
    c.vision = top.has("vision_config") ? parse_vision(c.raw["vision_config"], where + " vision_config") : VisionConfig{};
    if (top.has("img_processor") && c.raw["img_processor"].is_object()) {
      Fields ip{c.raw["img_processor"], where + " img_processor"};
      c.phi3v_image_dim_out = ip.integer("image_dim_out", c.vision->hidden_size);
      c.phi3v_num_img_tokens = int(ip.integer("num_img_tokens", 144));
    } else {
      c.phi3v_image_dim_out = c.vision->hidden_size;
    }
    if (top.has("embd_layer") && c.raw["embd_layer"].is_object()) {
      Fields el{c.raw["embd_layer"], where + " embd_layer"};
      c.phi3v_hd_transform_order = el.string("hd_transform_order", "sub_glb");
      if (c.phi3v_hd_transform_order != "sub_glb" && c.phi3v_hd_transform_order != "glb_sub")
        fail(where, ": hd_transform_order '", c.phi3v_hd_transform_order, "' is not sub_glb or glb_sub");
    }
    c.vision_feature_layer = -2;
    c.image_token_index = -1;
  } else {
    // A plain causal language model.
    c.text = parse_text(c.raw, where);
  }
  if (top.has("quantization")) parse_quantization(c.raw["quantization"], c, where);
  else if (top.has("quantization_config") && c.raw["quantization_config"].is_object() &&
           c.raw["quantization_config"].contains("group_size"))
    parse_quantization(c.raw["quantization_config"], c, where);

  // Token ids: generation_config.json wins over config.json (as in transformers).
  const json* idsrc = &c.raw;
  if (c.raw.contains("text_config") && c.raw["text_config"].is_object()) idsrc = &c.raw["text_config"];
  auto ids_from = [&](const json& j, const std::string& w) {
    if (j.contains("eos_token_id")) {
      auto e = id_list(j["eos_token_id"], w, "eos_token_id");
      if (!e.empty()) c.eos_token_ids = e;
    }
    if (j.contains("bos_token_id") && j["bos_token_id"].is_number_integer()) c.bos_token_id = j["bos_token_id"].get<int64_t>();
    if (j.contains("pad_token_id") && j["pad_token_id"].is_number_integer()) c.pad_token_id = j["pad_token_id"].get<int64_t>();
  };
  ids_from(*idsrc, where);
  ids_from(c.raw, where);
  const fs::path gen = d / "generation_config.json";
  if (fs::exists(gen, ec)) {
    c.generation = read_json(gen);
    if (!c.generation.is_object()) fail(gen.string(), " is not a JSON object");
    ids_from(c.generation, gen.string());
  }
  return c;
}

}  // namespace vkvlm
