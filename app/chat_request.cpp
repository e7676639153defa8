#include "app/chat_request.h"

#include <algorithm>
#include <sstream>

#include "app/request_memory.h"
#include "base/json.h"
#include "base/files.h"

namespace vkvlm::server {
namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

std::string error_body(const std::string& message, const std::string& type, const std::string& param, const std::string& code) {
  json e = {{"message", message}, {"type", type}, {"param", nullptr}, {"code", nullptr}};
  if (!param.empty()) e["param"] = param;
  if (!code.empty()) e["code"] = code;
  return json{{"error", e}}.dump(-1, ' ', false, json::error_handler_t::replace);
}


namespace {

// Typed access to request fields; errors are 400s naming the field.
const json* field(const json& body, const char* name) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return nullptr;
  return &*it;
}
double number_field(const json& body, const char* name, double dflt, double lo, double hi) {
  const json* v = field(body, name);
  if (!v) return dflt;
  if (!v->is_number()) throw ApiError(400, std::string("'") + name + "' must be a number", "invalid_request_error", name);
  double x = v->get<double>();
  if (!(x >= lo && x <= hi)) {
    std::ostringstream os;
    os << "'" << name << "' must be between " << lo << " and " << hi << ", got " << x;
    throw ApiError(400, os.str(), "invalid_request_error", name);
  }
  return x;
}
int64_t int_field(const json& body, const char* name, int64_t dflt, int64_t lo, int64_t hi) {
  const json* v = field(body, name);
  if (!v) return dflt;
  if (!v->is_number_integer()) throw ApiError(400, std::string("'") + name + "' must be an integer", "invalid_request_error", name);
  int64_t x = v->get<int64_t>();
  if (x < lo || x > hi)
    throw ApiError(400, std::string("'") + name + "' must be between " + std::to_string(lo) + " and " + std::to_string(hi),
                   "invalid_request_error", name);
  return x;
}
bool bool_field(const json& body, const char* name, bool dflt) {
  const json* v = field(body, name);
  if (!v) return dflt;
  if (!v->is_boolean()) throw ApiError(400, std::string("'") + name + "' must be true or false", "invalid_request_error", name);
  return v->get<bool>();
}

}  // namespace

Image load_image_url(const std::string& url, const std::string& param, const fs::path& local_root, const ReserveMemory& reserve) {
  ImageLimits limits;
  if (reserve)
    limits.on_size = [&](int w, int h) {
      reserve(uint64_t(w) * uint64_t(h) * cost::per_pixel,
              "an image of " + std::to_string(w) + "x" + std::to_string(h) + " pixels");
    };
  if (url.rfind("data:", 0) == 0) {
    if (reserve) reserve(url.size(), "an image's bytes");  // decoded from base64 beside the URL
    try {
      return decode_data_url(url, limits);
    } catch (const ApiError&) {
      throw;
    } catch (const std::exception& e) {
      throw ApiError(400, std::string("image could not be decoded: ") + e.what(), "invalid_request_error", param, "invalid_image");
    }
  }
  if (url.rfind("http://", 0) == 0 || url.rfind("https://", 0) == 0)
    throw ApiError(400, "remote image URLs are not fetched; send the image as a data: URL (base64)", "invalid_request_error",
                   param, "invalid_image_url");
  const size_t scheme = url.find("://");
  if (scheme != std::string::npos && url.rfind("file://", 0) != 0)
    throw ApiError(400, "image URLs with the scheme '" + url.substr(0, std::min<size_t>(scheme, 20)) +
                            "' are not accepted (data: URLs, or file paths with --allow-local-files)",
                   "invalid_request_error", param, "invalid_image_url");
  if (local_root.empty())
    throw ApiError(400, "image_url must be a data: URL (local files need the server's --allow-local-files)",
                   "invalid_request_error", param, "invalid_image_url");
  const std::string path = url.rfind("file://", 0) == 0 ? url.substr(7) : url;
  if (path.empty() || path.find('\0') != std::string::npos)
    throw ApiError(400, "the image path is empty or holds a NUL byte", "invalid_request_error", param, "invalid_image_url");
  const ApiError outside(400, "no such image file in the folder the server allows", "invalid_request_error", param,
                         "invalid_image_url");
  std::error_code ec;
  const fs::path real = fs::canonical(fs::path(path).is_absolute() ? fs::path(path) : local_root / path, ec);
  if (ec) throw outside;
  if (!path_inside(real, local_root)) throw outside;
  const fs::path rel = real.lexically_relative(local_root);
  std::string bytes;
  if (reserve) {
    const uint64_t size = fs::file_size(real, ec);
    reserve(2 * std::min<uint64_t>(ec ? 0 : size, limits.max_file_bytes), "an image file's bytes");  // read, then copied
  }
  try {
    bytes = read_file_bounded(real.string(), limits.max_file_bytes, "image");
  } catch (const std::exception&) {
    throw ApiError(400, "the image file in the allowed folder cannot be read (not a regular file, or too large)",
                   "invalid_request_error", param, "invalid_image");
  }
  try {
    return decode_image(std::vector<uint8_t>(bytes.begin(), bytes.end()), "file " + rel.string(), limits);
  } catch (const ApiError&) {
    throw;
  } catch (const std::exception& e) {
    throw ApiError(400, std::string("image could not be decoded: ") + e.what(), "invalid_request_error", param, "invalid_image");
  }
}


json parse_request_body(const std::string& raw) {
  json body;
  try {
    body = parse_json<json>(raw);
  } catch (const json::exception& e) {
    throw ApiError(400, std::string("the request body is not valid JSON: ") + e.what(), "invalid_request_error", "",
                   "invalid_json");
  }
  if (!body.is_object()) throw ApiError(400, "the request body must be a JSON object", "invalid_request_error", "", "invalid_json");
  return body;
}

ChatRequest parse_chat_request(const json& body, const RequestLimits& limits) {
  ChatRequest r;
  if (const json* m = field(body, "model")) {
    if (!m->is_string()) throw ApiError(400, "'model' must be a string", "invalid_request_error", "model");
    r.model = m->get<std::string>();
  }
  const json* msgs = field(body, "messages");
  if (!msgs) throw ApiError(400, "'messages' is required", "invalid_request_error", "messages");
  if (!msgs->is_array()) throw ApiError(400, "'messages' must be a list", "invalid_request_error", "messages");
  if (msgs->empty()) throw ApiError(400, "'messages' must not be empty", "invalid_request_error", "messages");
  if (msgs->size() > size_t(limits.max_messages))
    throw ApiError(400,
                   "'messages' holds " + std::to_string(msgs->size()) + " messages, more than the server's --max-messages of " +
                       std::to_string(limits.max_messages),
                   "invalid_request_error", "messages", "too_many_messages");
  size_t parts_seen = 0;
  static const char* roles[] = {"system", "user", "assistant", "tool", "developer"};
  r.messages = json::array();
  for (size_t i = 0; i < msgs->size(); ++i) {
    const json& m = (*msgs)[i];
    const std::string at = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) throw ApiError(400, at + " must be an object", "invalid_request_error", at);
    if (!m.contains("role") || !m["role"].is_string())
      throw ApiError(400, at + ".role must be a string", "invalid_request_error", at + ".role");
    const std::string role = m["role"].get<std::string>();
    if (std::find(std::begin(roles), std::end(roles), role) == std::end(roles))
      throw ApiError(400, at + ".role '" + role + "' is not one of system, user, assistant, tool, developer",
                     "invalid_request_error", at + ".role");
    json out = {{"role", role}};
    const json* content = field(m, "content");
    if (!content) {
      if (role != "assistant") throw ApiError(400, at + ".content is required", "invalid_request_error", at + ".content");
      out["content"] = "";
    } else if (content->is_string()) {
      out["content"] = *content;
    } else if (content->is_array()) {
      json parts = json::array();
      parts_seen += content->size();
      if (parts_seen > size_t(limits.max_parts))
        throw ApiError(400,
                       "the messages hold more than the server's --max-parts of " + std::to_string(limits.max_parts) +
                           " content parts",
                       "invalid_request_error", at + ".content", "too_many_parts");
      for (size_t k = 0; k < content->size(); ++k) {
        const json& part = (*content)[k];
        const std::string pat = at + ".content[" + std::to_string(k) + "]";
        if (!part.is_object() || !part.contains("type") || !part["type"].is_string())
          throw ApiError(400, pat + " must be an object with a 'type'", "invalid_request_error", pat);
        const std::string type = part["type"].get<std::string>();
        if (type == "text") {
          if (!part.contains("text") || !part["text"].is_string())
            throw ApiError(400, pat + ".text must be a string", "invalid_request_error", pat + ".text");
          parts.push_back({{"type", "text"}, {"text", part["text"]}});
        } else if (type == "image_url") {
          const json* iu = field(part, "image_url");
          std::string url;
          if (iu && iu->is_string()) url = iu->get<std::string>();
          else if (iu && iu->is_object() && iu->contains("url") && (*iu)["url"].is_string()) url = (*iu)["url"].get<std::string>();
          else throw ApiError(400, pat + ".image_url must hold a 'url' string", "invalid_request_error", pat + ".image_url");
          if (int(r.images.size()) >= limits.max_images)
            throw ApiError(400, "a request may hold at most " + std::to_string(limits.max_images) + " images",
                           "invalid_request_error", "messages", "too_many_images");
          r.images.push_back(load_image_url(url, pat + ".image_url", limits.local_root, limits.reserve));
          parts.push_back({{"type", "image"}});
        } else {
          throw ApiError(400, pat + ".type '" + type + "' is not supported (text, image_url)", "invalid_request_error", pat + ".type");
        }
      }
      out["content"] = parts;
    } else {
      throw ApiError(400, at + ".content must be a string or a list of parts", "invalid_request_error", at + ".content");
    }
    r.messages.push_back(out);
  }
  if (const json* kw = field(body, "chat_template_kwargs")) {
    if (!kw->is_object())
      throw ApiError(400, "'chat_template_kwargs' must be an object", "invalid_request_error", "chat_template_kwargs");
    r.template_vars = nlohmann::json(*kw);  // bounded in depth when the body was parsed
  }
  auto& p = r.params;
  p.sampling.temperature = float(number_field(body, "temperature", 1.0, 0.0, 2.0));
  p.sampling.top_p = float(number_field(body, "top_p", 1.0, 1e-9, 1.0));
  p.sampling.top_k = int(int_field(body, "top_k", 0, 0, 1 << 20));
  p.sampling.min_p = float(number_field(body, "min_p", 0.0, 0.0, 1.0));
  p.sampling.repeat_penalty = float(number_field(body, "repetition_penalty", 1.0, 1e-3, 100.0));
  for (const char* unsupported : {"frequency_penalty", "presence_penalty"})
    if (number_field(body, unsupported, 0.0, -2.0, 2.0) != 0.0)
      throw ApiError(400, std::string("'") + unsupported + "' is not supported (use repetition_penalty)", "invalid_request_error",
                     unsupported);
  const int64_t max_ctx = limits.context_tokens;
  int64_t max_tokens = int_field(body, "max_tokens", -1, 1, max_ctx);
  max_tokens = int_field(body, "max_completion_tokens", max_tokens, 1, max_ctx);
  p.max_tokens = int(max_tokens < 0 ? max_ctx : max_tokens);
  if (const json* seed = field(body, "seed")) {
    if (!seed->is_number_integer()) throw ApiError(400, "'seed' must be an integer", "invalid_request_error", "seed");
    p.sampling.seed = uint64_t(seed->get<int64_t>());
    p.sampling.has_seed = true;
  }
  if (const json* stop = field(body, "stop")) {
    if (stop->is_string()) {
      p.stop.push_back(stop->get<std::string>());
    } else if (stop->is_array() && stop->size() <= 4) {
      for (auto& s : *stop) {
        if (!s.is_string()) throw ApiError(400, "'stop' must be a string or a list of up to 4 strings", "invalid_request_error", "stop");
        p.stop.push_back(s.get<std::string>());
      }
    } else {
      throw ApiError(400, "'stop' must be a string or a list of up to 4 strings", "invalid_request_error", "stop");
    }
    for (auto& s : p.stop)
      if (s.empty()) throw ApiError(400, "'stop' strings must not be empty", "invalid_request_error", "stop");
  }
  p.ignore_eos = bool_field(body, "ignore_eos", false);  // vendor extension, as in vLLM
  // Speculative decoding: drafts per round (as mlx-lm's server), prompt lookup (an extension).
  p.num_draft_tokens = int(int_field(body, "num_draft_tokens", limits.num_draft_tokens, 1, 16));
  p.lookup_ngram = int(int_field(body, "lookup_ngram", limits.has_draft_model ? 0 : limits.lookup_ngram, 0, 16));
  if (p.lookup_ngram && limits.has_draft_model)
    throw ApiError(400, "'lookup_ngram' is not available: this server drafts with its draft model", "invalid_request_error",
                   "lookup_ngram");
  r.logprobs = bool_field(body, "logprobs", false);
  p.top_logprobs = int(int_field(body, "top_logprobs", 0, 0, 20));
  if (p.top_logprobs && !r.logprobs)
    throw ApiError(400, "'top_logprobs' needs 'logprobs': true", "invalid_request_error", "top_logprobs");
  p.logprobs = r.logprobs;
  if (int_field(body, "n", 1, 1, 1) != 1) throw ApiError(400, "only n = 1 is supported", "invalid_request_error", "n");
  r.stream = bool_field(body, "stream", false);
  if (const json* so = field(body, "stream_options")) {
    if (!so->is_object()) throw ApiError(400, "'stream_options' must be an object", "invalid_request_error", "stream_options");
    r.include_usage = bool_field(*so, "include_usage", false);
  }
  return r;
}


namespace {
uint64_t text_bytes(const nlohmann::json& j) {  // nesting bounded when the body was parsed
  if (j.is_string()) return j.get_ref<const std::string&>().size();
  uint64_t n = 0;
  if (j.is_object())
    for (auto& [k, v] : j.items()) n += k.size() + text_bytes(v);
  else if (j.is_array())
    for (auto& v : j) n += text_bytes(v);
  else
    n = 8;
  return n;
}
}  // namespace

uint64_t template_text_bytes(const ChatRequest& r) { return text_bytes(r.messages) + text_bytes(r.template_vars); }

uint64_t message_items(const ChatRequest& r) {
  uint64_t n = 0;
  for (auto& m : r.messages) n += 1 + (m.contains("content") && m["content"].is_array() ? m["content"].size() : 0);
  return n;
}

}  // namespace vkvlm::server
