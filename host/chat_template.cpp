#include "host/chat_template.h"

#include <filesystem>

#include "base/json.h"
#include "base/error.h"
#include "base/files.h"

namespace vkvlm {
namespace fs = std::filesystem;

namespace {

nlohmann::ordered_json read_json_file(const fs::path& p) {
  const std::string text = read_file_bounded(p.string(), uint64_t(64) << 20, "file");
  try {
    return parse_json<nlohmann::ordered_json>(text);
  } catch (const std::exception& e) {
    fail(p.string(), " is not valid JSON: ", e.what());
  }
}

// A special token in tokenizer_config.json: a string, or {"content": "..."}.
std::optional<std::string> token_string(const nlohmann::ordered_json& cfg, const char* key) {
  if (!cfg.contains(key)) return std::nullopt;
  const auto& v = cfg[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return std::nullopt;
}

}  // namespace

ChatTemplate ChatTemplate::from_model_dir(const std::string& dir) {
  ChatTemplate t;
  t.dir_ = dir;
  const fs::path d(dir);
  std::error_code ec;
  if (!fs::is_directory(d, ec)) fail("model folder ", dir, " does not exist");
  nlohmann::ordered_json tcfg = nlohmann::ordered_json::object();
  if (fs::exists(d / "tokenizer_config.json", ec)) tcfg = read_json_file(d / "tokenizer_config.json");
  if (!tcfg.is_object()) fail(dir, "/tokenizer_config.json must hold a JSON object");
  // Where transformers looks: chat_template.jinja, then the processor's chat_template.json,
  // then tokenizer_config.json (a string, or a list of {"name", "template"}).
  auto add = [&](const std::string& name, const std::string& source, const std::string& where) {
    if (!source.empty()) t.templates_[name] = std::make_shared<const jinja::Template>(source, (d / where).string());
  };
  if (fs::exists(d / "chat_template.jinja", ec)) {
    add("default", read_file_bounded((d / "chat_template.jinja").string(), uint64_t(16) << 20, "chat template"),
        "chat_template.jinja");
  } else if (fs::exists(d / "chat_template.json", ec)) {
    auto j = read_json_file(d / "chat_template.json");
    if (!j.is_object() || !j.contains("chat_template") || !j["chat_template"].is_string())
      fail(dir, "/chat_template.json needs a \"chat_template\" string");
    add("default", j["chat_template"].get<std::string>(), "chat_template.json");
  } else if (tcfg.contains("chat_template")) {
    const auto& c = tcfg["chat_template"];
    const std::string where = "tokenizer_config.json chat_template";
    if (c.is_string()) {
      add("default", c.get<std::string>(), where);
    } else if (c.is_array()) {
      for (auto& e : c) {
        if (!e.is_object() || !e.contains("name") || !e["name"].is_string() || !e.contains("template") || !e["template"].is_string())
          fail(dir, "/tokenizer_config.json: chat_template entries need \"name\" and \"template\" strings");
        const std::string name = e["name"].get<std::string>();
        add(name, e["template"].get<std::string>(), where + " '" + name + "'");
      }
    } else if (!c.is_null()) {
      fail(dir, "/tokenizer_config.json: chat_template must be a string or a list of named templates");
    }
  }
  // The tokenizer's special tokens, as its special_tokens_map gives them to the template;
  // special_tokens_map.json fills what tokenizer_config.json leaves out.
  nlohmann::ordered_json smap = nlohmann::ordered_json::object();
  if (fs::exists(d / "special_tokens_map.json", ec)) smap = read_json_file(d / "special_tokens_map.json");
  if (!smap.is_object()) smap = nlohmann::ordered_json::object();
  for (const char* k : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"}) {
    auto s = tcfg.contains(k) ? token_string(tcfg, k) : token_string(smap, k);
    if (s && !s->empty()) t.tokens_[k] = jinja::Value(*s);
  }
  const auto& extra = tcfg.contains("additional_special_tokens") ? tcfg["additional_special_tokens"] : smap.value(
      "additional_special_tokens", nlohmann::ordered_json());
  if (extra.is_array() && !extra.empty()) {
    jinja::List l;
    for (auto& e : extra) {
      if (e.is_string()) l.push_back(jinja::Value(e.get<std::string>()));
      else if (e.is_object() && e.contains("content") && e["content"].is_string()) l.push_back(jinja::Value(e["content"].get<std::string>()));
    }
    t.tokens_["additional_special_tokens"] = jinja::Value(std::move(l));
  }
  t.eos_token_ = token_string(tcfg, "eos_token");
  if (!t.eos_token_) t.eos_token_ = token_string(smap, "eos_token");
  return t;
}

std::string ChatTemplate::render(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                 const nlohmann::ordered_json& vars) const {
  if (templates_.empty())
    fail("model ", dir_, " has no chat template (no chat_template.jinja, chat_template.json or chat_template in "
         "tokenizer_config.json)");
  if (!vars.is_null() && !vars.is_object()) fail("chat template variables must be a JSON object");
  const bool tools = !vars.is_null() && vars.contains("tools") && !vars["tools"].is_null();
  auto chosen = templates_.find(tools && templates_.count("tool_use") ? "tool_use" : "default");
  if (chosen == templates_.end()) {
    std::string names;
    for (auto& [n, x] : templates_) names += (names.empty() ? "" : ", ") + n;
    fail("model ", dir_, " has several chat templates (", names, ") and none named 'default'");
  }
  std::map<std::string, jinja::Value> v = tokens_;
  v["tools"] = jinja::Value::none();
  v["documents"] = jinja::Value::none();
  if (!vars.is_null())
    for (auto& [k, x] : vars.items()) v[k] = jinja::Value::from_json(x);
  v["messages"] = jinja::Value::from_json(messages);
  v["add_generation_prompt"] = jinja::Value(add_generation_prompt);
  return chosen->second->render(v);
}

}  // namespace vkvlm
