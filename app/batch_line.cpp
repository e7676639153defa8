#include "app/batch_line.h"

#include <cstdint>
#include <set>

#include "base/error.h"
#include "base/json.h"

namespace vkvlm {

void check_messages(const Messages& messages, const std::string& what) {
  if (!messages.is_array() || messages.empty()) throw Error(what + " must hold a non-empty JSON array of messages");
  for (size_t i = 0; i < messages.size(); ++i) {
    auto& m = messages[i];
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
      throw Error(what + ": message " + std::to_string(i) + " needs a \"role\" string");
    if (!m.contains("content")) throw Error(what + ": message " + std::to_string(i) + " has no content");
  }
}

bool batch_line_blank(const std::string& line) { return line.find_first_not_of(" \t\r") == std::string::npos; }

BatchLine parse_batch_line(const std::string& line, const GenerationParams& defaults) {
  Messages j;
  try {
    j = parse_json<Messages>(line);
  } catch (const nlohmann::json::exception& e) {
    throw Error(std::string("not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw Error("each line must be a JSON object with \"prompt\" or \"messages\"");
  static const std::set<std::string> keys = {"id", "prompt", "messages", "images", "max_tokens", "temperature",
                                             "top_p", "top_k", "min_p", "seed", "stop"};
  for (const auto& [k, v] : j.items())
    if (!keys.count(k)) throw Error("unknown key '" + k + "'");
  if (j.contains("prompt") == j.contains("messages")) throw Error("give exactly one of \"prompt\" and \"messages\"");
  BatchLine b;
  if (j.contains("images")) {
    if (!j["images"].is_array()) throw Error("\"images\" must be a list of file paths");
    for (const auto& p : j["images"]) {
      if (!p.is_string()) throw Error("\"images\" must be a list of file paths");
      b.images.push_back(p.get<std::string>());
    }
  }
  if (j.contains("prompt")) {
    if (!j["prompt"].is_string()) throw Error("\"prompt\" must be a string");
    b.prompt = j["prompt"].get<std::string>();
  } else {
    check_messages(j["messages"], "\"messages\"");
    b.messages = j["messages"];
  }
  if (j.contains("id")) b.id = j["id"];
  b.params = defaults;
  auto number = [&](const char* key, double lo, double hi) {
    if (!j[key].is_number() || j[key].get<double>() < lo || j[key].get<double>() > hi)
      throw Error(std::string("\"") + key + "\" must be a number from " + std::to_string(lo) + " to " + std::to_string(hi));
    return j[key].get<double>();
  };
  auto whole = [&](const char* key, int64_t lo, int64_t hi) {
    if (!j[key].is_number_integer() || j[key].get<int64_t>() < lo || j[key].get<int64_t>() > hi)
      throw Error(std::string("\"") + key + "\" must be a whole number from " + std::to_string(lo) + " to " + std::to_string(hi));
    return j[key].get<int64_t>();
  };
  GenerationParams& p = b.params;
  if (j.contains("max_tokens")) p.max_tokens = int(whole("max_tokens", 0, 1 << 24));
  if (j.contains("temperature")) p.sampling.temperature = float(number("temperature", 0, 100));
  if (j.contains("top_p")) p.sampling.top_p = float(number("top_p", 1e-9, 1));
  if (j.contains("top_k")) p.sampling.top_k = int(whole("top_k", 0, 1 << 24));
  if (j.contains("min_p")) p.sampling.min_p = float(number("min_p", 0, 1));
  if (j.contains("seed")) {
    p.sampling.seed = uint64_t(whole("seed", 0, INT64_MAX));
    p.sampling.has_seed = true;
  }
  if (j.contains("stop")) {
    p.stop.clear();
    const auto& st = j["stop"];
    if (st.is_string()) {
      p.stop.push_back(st.get<std::string>());
    } else if (st.is_array()) {
      for (const auto& x : st) {
        if (!x.is_string()) throw Error("\"stop\" must be a string or a list of strings");
        p.stop.push_back(x.get<std::string>());
      }
    } else {
      throw Error("\"stop\" must be a string or a list of strings");
    }
  }
  p.validate();
  return b;
}

}  // namespace vkvlm
