#include "app/server.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "app/flags.h"
#include "app/http.h"
#include "base/files.h"
#include "gpu/device.h"
#include "gpu/error.h"
#include "host/image.h"
#include "models/model.h"

namespace vkvlm::server {
namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace {

// An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}} with its HTTP status.
struct ApiError : std::runtime_error {
  int status;
  std::string type, param, code;
  ApiError(int s, std::string message, std::string t = "invalid_request_error", std::string p = "", std::string c = "")
      : std::runtime_error(std::move(message)), status(s), type(std::move(t)), param(std::move(p)), code(std::move(c)) {}
};

std::string error_body(const std::string& message, const std::string& type, const std::string& param, const std::string& code) {
  json e = {{"message", message}, {"type", type}, {"param", nullptr}, {"code", nullptr}};
  if (!param.empty()) e["param"] = param;
  if (!code.empty()) e["code"] = code;
  return json{{"error", e}}.dump(-1, ' ', false, json::error_handler_t::replace);
}

void set_error(http::Response& res, const ApiError& e) {
  res.status = e.status;
  res.content_type = "application/json";
  res.body = error_body(e.what(), e.type, e.param, e.code);
}

// Serves waiting requests in arrival order, one at a time on the GPU. A request whose client
// leaves while it waits gives its turn up at once.
class FifoTurns {
 public:
  uint64_t take() {
    std::lock_guard<std::mutex> l(m_);
    return next_ticket_++;
  }
  // Waits for the ticket's turn; false (the ticket given up) when `gone` says the client left.
  bool wait(uint64_t ticket, const std::function<bool()>& gone) {
    std::unique_lock<std::mutex> l(m_);
    while (serving_ != ticket) {
      if (gone && gone()) {
        abandoned_.insert(ticket);
        return false;
      }
      cv_.wait_for(l, std::chrono::milliseconds(50));
    }
    return true;
  }
  void done() {
    std::lock_guard<std::mutex> l(m_);
    ++serving_;
    while (abandoned_.erase(serving_)) ++serving_;
    cv_.notify_all();
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  uint64_t next_ticket_ = 0, serving_ = 0;
  std::set<uint64_t> abandoned_;
};

// Whether an Authorization header carries this key: the Bearer scheme, in any case.
bool bearer_matches(const std::string& header, const std::string& key) {
  const size_t sp = header.find(' ');
  if (sp == std::string::npos) return false;
  std::string scheme = header.substr(0, sp);
  for (char& c : scheme) c = char(std::tolower(static_cast<unsigned char>(c)));
  size_t at = sp;
  while (at < header.size() && header[at] == ' ') ++at;
  const std::string given = header.substr(at);
  if (scheme != "bearer" || given.size() != key.size()) return false;
  unsigned diff = 0;  // compared in constant time
  for (size_t i = 0; i < key.size(); ++i) diff |= unsigned(uint8_t(given[i]) ^ uint8_t(key[i]));
  return diff == 0;
}

struct Metrics {
  std::mutex m;
  std::map<int, uint64_t> requests;  // by HTTP status
  uint64_t prompt_tokens = 0, completion_tokens = 0, cached_tokens = 0, cancelled = 0;
  double prefill_tps = 0, decode_tps = 0;
  std::atomic<int> in_flight{0}, queued{0};
};

struct ChatRequest {
  Messages messages;
  nlohmann::json template_vars;  // chat_template_kwargs (an extension, as in vLLM)
  std::vector<Image> images;
  GenerationParams params;
  bool stream = false, include_usage = false, logprobs = false;
  std::string model;
};

std::string random_id() {
  static std::mt19937_64 rng(std::random_device{}());
  static std::mutex m;
  std::lock_guard<std::mutex> l(m);
  std::ostringstream os;
  os << "chatcmpl-" << std::hex << rng();
  return os.str();
}

int64_t now_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

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

// A token as text for logprobs: its decoded piece, keeping the leading space its vocabulary
// entry stands for.
std::string token_text(const Tokenizer& tok, int32_t id) {
  std::string text = tok.decode({id}, false);
  const std::string piece = tok.id_to_token(id);
  if ((piece.rfind("\xE2\x96\x81", 0) == 0 || piece.rfind("\xC4\xA0", 0) == 0) && (text.empty() || text[0] != ' '))
    text = " " + text;
  return text;
}

json logprob_entry(const Tokenizer& tok, int32_t id, float logprob, const std::string& text_override = {}) {
  std::string t = text_override.empty() ? token_text(tok, id) : text_override;
  std::vector<int> bytes(t.begin(), t.end());
  for (auto& b : bytes) b &= 0xFF;
  return json{{"token", t}, {"logprob", logprob}, {"bytes", bytes}};
}

class Server {
 public:
  explicit Server(Options o) : opt_(std::move(o)) {
    if (opt_.model_name.empty()) opt_.model_name = fs::path(opt_.model_dir).filename().string();
    if (opt_.model_name.empty()) opt_.model_name = fs::path(opt_.model_dir).parent_path().filename().string();
    if (!opt_.allow_local_files.empty()) {
      std::error_code ec;
      if (!fs::is_directory(opt_.allow_local_files, ec))
        fail("--allow-local-files ", opt_.allow_local_files, " is not a folder");
      local_root_ = fs::canonical(opt_.allow_local_files);
    }
  }

  int run() {
    http::Limits limits;
    limits.max_body_bytes = opt_.max_body_bytes;
    limits.request_seconds = opt_.request_seconds;
    // Workers run handlers only (a slow client costs no thread while its request arrives):
    // enough for every admitted chat request and for the cheap endpoints beside them.
    limits.workers = opt_.max_concurrency + 8;
    http_ = std::make_unique<http::Server>(limits, [](int status, const std::string& message) {
      const std::string type = status >= 500 && status != 503 ? "server_error" : "invalid_request_error";
      const std::string code = status == 413 ? "request_too_large" : status == 408 ? "request_timeout" : "";
      return error_body(message, type, "", code);
    });
    http::Server& h = *http_;
    h.route("GET", "/health", [this](const http::Request&, http::Response& res, http::Connection&) {
      res.status = ready_ ? 200 : 503;
      res.body = json{{"status", ready_ ? "ok" : "loading"}}.dump();
    });
    h.route("GET", "/metrics", [this](const http::Request& req, http::Response& res, http::Connection&) {
      if (!opt_.metrics_public && !authorized(req, res)) return;
      res.content_type = "text/plain; version=0.0.4";
      res.body = metrics_text();
    });
    h.route("GET", "/v1/models", [this](const http::Request& req, http::Response& res, http::Connection&) {
      if (!authorized(req, res)) return;
      json m = {{"id", opt_.model_name}, {"object", "model"}, {"created", started_}, {"owned_by", "vkvlm"}};
      res.body = json{{"object", "list"}, {"data", json::array({m})}}.dump();
      count(200);
    });
    h.route("POST", "/v1/chat/completions",
            [this](const http::Request& req, http::Response& res, http::Connection& conn) { chat(req, res, conn); });

    std::string why;
    if (!h.bind(opt_.host, opt_.port, &why)) {
      std::fprintf(stderr, "vkvlm serve: error: cannot listen on %s:%d: %s\n", opt_.host.c_str(), opt_.port, why.c_str());
      return 1;
    }
    std::fprintf(stderr, "vkvlm serve: listening on http://%s:%d (loading %s)\n", opt_.host.c_str(), opt_.port,
                 opt_.model_dir.c_str());
    started_ = now_seconds();
    // SIGINT/SIGTERM stop the server: blocked in every thread (set before any starts) and
    // taken by one watcher.
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    std::thread loader([this] {
      load();
      if (load_failed_) http_->stop();
    });
    std::thread watcher([this, set] {
      int sig = 0;
      sigwait(&set, &sig);
      stop_ = true;
      http_->stop();
    });
    h.run();
    loader.join();
    if (!stop_) pthread_kill(watcher.native_handle(), SIGTERM);
    watcher.join();
    if (load_failed_) return 1;
    std::fprintf(stderr, "vkvlm serve: stopped\n");
    // The GPU objects go before the context.
    sessions_.clear();
    model_.reset();
    return 0;
  }

 private:
  void load() {
    try {
      ctx_ = std::make_unique<gpu::Context>(gpu::Device::create());
      model_ = std::make_unique<Model>(*ctx_, opt_.model_dir, opt_.load);
      for (int i = 0; i < opt_.kv_slots; ++i) sessions_.push_back(std::make_unique<Session>(*model_, opt_.context_tokens));
      last_used_.assign(sessions_.size(), 0);
      ready_ = true;
      std::fprintf(stderr, "vkvlm serve: model %s ready on %s\n", opt_.model_name.c_str(), ctx_->profile().device_name.c_str());
    } catch (const std::exception& e) {
      std::string m = e.what();
      std::replace(m.begin(), m.end(), '\n', ' ');
      std::fprintf(stderr, "vkvlm serve: error: %s\n", m.c_str());
      load_failed_ = true;
    }
  }

  void count(int status) {
    std::lock_guard<std::mutex> l(metrics_.m);
    ++metrics_.requests[status];
  }

  std::string metrics_text() {
    std::lock_guard<std::mutex> l(metrics_.m);
    std::ostringstream os;
    os << "# HELP vkvlm_requests_total HTTP requests answered, by status.\n# TYPE vkvlm_requests_total counter\n";
    for (auto& [status, n] : metrics_.requests) os << "vkvlm_requests_total{status=\"" << status << "\"} " << n << "\n";
    os << "# HELP vkvlm_prompt_tokens_total Prompt tokens of completed requests.\n# TYPE vkvlm_prompt_tokens_total counter\n"
       << "vkvlm_prompt_tokens_total " << metrics_.prompt_tokens << "\n";
    os << "# HELP vkvlm_cached_prompt_tokens_total Prompt tokens served from the KV cache.\n"
       << "# TYPE vkvlm_cached_prompt_tokens_total counter\nvkvlm_cached_prompt_tokens_total " << metrics_.cached_tokens << "\n";
    os << "# HELP vkvlm_generated_tokens_total Generated tokens.\n# TYPE vkvlm_generated_tokens_total counter\n"
       << "vkvlm_generated_tokens_total " << metrics_.completion_tokens << "\n";
    os << "# HELP vkvlm_cancelled_requests_total Generations stopped because the client went away.\n"
       << "# TYPE vkvlm_cancelled_requests_total counter\nvkvlm_cancelled_requests_total " << metrics_.cancelled << "\n";
    os << "# HELP vkvlm_prefill_tokens_per_second Prompt processing speed of the last request.\n"
       << "# TYPE vkvlm_prefill_tokens_per_second gauge\nvkvlm_prefill_tokens_per_second " << metrics_.prefill_tps << "\n";
    os << "# HELP vkvlm_decode_tokens_per_second Generation speed of the last request.\n"
       << "# TYPE vkvlm_decode_tokens_per_second gauge\nvkvlm_decode_tokens_per_second " << metrics_.decode_tps << "\n";
    os << "# HELP vkvlm_queue_depth Requests waiting for the GPU.\n# TYPE vkvlm_queue_depth gauge\nvkvlm_queue_depth "
       << metrics_.queued.load() << "\n";
    os << "# HELP vkvlm_requests_in_flight Requests admitted and not yet answered.\n# TYPE vkvlm_requests_in_flight gauge\n"
       << "vkvlm_requests_in_flight " << metrics_.in_flight.load() << "\n";
    return os.str();
  }

  // An image_url part's image: a data: URL, or a file inside --allow-local-files; never fetched.
  // A local path is resolved whole (every symlink, at every step) and must end inside the
  // folder; the answer is the same whether an outside file exists or not, and names no path of
  // the server's.
  Image load_image_url(const std::string& url, const std::string& param) {
    if (url.rfind("data:", 0) == 0) {
      try {
        return decode_data_url(url);
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
    if (local_root_.empty())
      throw ApiError(400, "image_url must be a data: URL (local files need the server's --allow-local-files)",
                     "invalid_request_error", param, "invalid_image_url");
    const std::string path = url.rfind("file://", 0) == 0 ? url.substr(7) : url;
    if (path.empty() || path.find('\0') != std::string::npos)
      throw ApiError(400, "the image path is empty or holds a NUL byte", "invalid_request_error", param, "invalid_image_url");
    const ApiError outside(400, "no such image file in the folder the server allows", "invalid_request_error", param,
                           "invalid_image_url");
    std::error_code ec;
    const fs::path real = fs::canonical(fs::path(path).is_absolute() ? fs::path(path) : local_root_ / path, ec);
    if (ec) throw outside;
    const fs::path rel = real.lexically_relative(local_root_);
    if (rel.empty() || *rel.begin() == ".." || rel.is_absolute()) throw outside;
    std::string bytes;
    try {
      bytes = read_file_bounded(real.string(), ImageLimits{}.max_file_bytes, "image");
    } catch (const std::exception&) {
      throw ApiError(400, "the image file in the allowed folder cannot be read (not a regular file, or too large)",
                     "invalid_request_error", param, "invalid_image");
    }
    try {
      return decode_image(std::vector<uint8_t>(bytes.begin(), bytes.end()), "file " + rel.string());
    } catch (const std::exception& e) {
      throw ApiError(400, std::string("image could not be decoded: ") + e.what(), "invalid_request_error", param, "invalid_image");
    }
  }

  ChatRequest parse(const std::string& raw) {
    json body;
    try {
      body = json::parse(raw);
    } catch (const json::exception& e) {
      throw ApiError(400, std::string("the request body is not valid JSON: ") + e.what(), "invalid_request_error", "",
                     "invalid_json");
    }
    if (!body.is_object()) throw ApiError(400, "the request body must be a JSON object", "invalid_request_error", "", "invalid_json");
    ChatRequest r;
    if (const json* m = field(body, "model")) {
      if (!m->is_string()) throw ApiError(400, "'model' must be a string", "invalid_request_error", "model");
      r.model = m->get<std::string>();
    }
    const json* msgs = field(body, "messages");
    if (!msgs) throw ApiError(400, "'messages' is required", "invalid_request_error", "messages");
    if (!msgs->is_array()) throw ApiError(400, "'messages' must be a list", "invalid_request_error", "messages");
    if (msgs->empty()) throw ApiError(400, "'messages' must not be empty", "invalid_request_error", "messages");
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
            if (int(r.images.size()) >= opt_.max_images)
              throw ApiError(400, "a request may hold at most " + std::to_string(opt_.max_images) + " images",
                             "invalid_request_error", "messages", "too_many_images");
            r.images.push_back(load_image_url(url, pat + ".image_url"));
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
      r.template_vars = nlohmann::json::parse(kw->dump());
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
    const int64_t max_ctx = opt_.context_tokens;
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

  // A session for the prompt: the slot this prompt continues (it shares at least half of the
  // slot's cached tokens, the longest such share winning), else the least recently used slot, so
  // a shared preamble like "USER:" does not make conversations evict each other.
  Session& pick_session(const Prompt& prompt) {
    size_t best = sessions_.size(), best_len = 0;
    for (size_t i = 0; i < sessions_.size(); ++i) {
      const auto& keys = sessions_[i]->cached_keys();
      size_t n = 0;
      while (n < keys.size() && n < prompt.keys.size() && keys[n] == prompt.keys[n]) ++n;
      if (!keys.empty() && 2 * n >= keys.size() && n > best_len) {
        best = i;
        best_len = n;
      }
    }
    if (best == sessions_.size())
      best = size_t(std::min_element(last_used_.begin(), last_used_.end()) - last_used_.begin());
    last_used_[best] = ++use_clock_;
    return *sessions_[best];
  }

  json completion_json(const std::string& id, const GenerationResult& r, bool logprobs) {
    json choice = {{"index", 0}, {"message", {{"role", "assistant"}, {"content", r.text}}}, {"logprobs", nullptr},
                   {"finish_reason", r.finish_reason}};
    if (logprobs) choice["logprobs"] = {{"content", logprob_list(r.steps)}};
    return json{{"id", id},
                {"object", "chat.completion"},
                {"created", now_seconds()},
                {"model", opt_.model_name},
                {"system_fingerprint", "vkvlm"},
                {"choices", json::array({choice})},
                {"usage", usage(r)}};
  }

  json logprob_list(const std::vector<StepOutput>& steps) {
    json list = json::array();
    const auto& tok = model_->tokenizer();
    for (auto& s : steps) {
      json e = logprob_entry(tok, s.token, s.logprob);
      json tops = json::array();
      for (auto& [id, lp] : s.top_logprobs) tops.push_back(logprob_entry(tok, id, lp));
      e["top_logprobs"] = tops;
      list.push_back(e);
    }
    return list;
  }

  json usage(const GenerationResult& r) {
    return json{{"prompt_tokens", r.prompt_tokens.size()},
                {"completion_tokens", r.tokens.size()},
                {"total_tokens", r.prompt_tokens.size() + r.tokens.size()},
                {"prompt_tokens_details", {{"cached_tokens", r.cached_tokens}}}};
  }

  void record(const GenerationResult& r) {
    std::lock_guard<std::mutex> l(metrics_.m);
    metrics_.prompt_tokens += r.prompt_tokens.size();
    metrics_.completion_tokens += r.tokens.size();
    metrics_.cached_tokens += uint64_t(r.cached_tokens);
    if (r.finish_reason == "cancelled") ++metrics_.cancelled;
    if (r.prefill_seconds > 0) metrics_.prefill_tps = double(r.prefill_tokens) / r.prefill_seconds;
    if (r.decode_seconds > 0 && r.tokens.size() > 1) metrics_.decode_tps = double(r.tokens.size() - 1) / r.decode_seconds;
  }

  // Holds an admission slot for the whole request.
  struct Admission {
    Metrics& m;
    explicit Admission(Metrics& mm) : m(mm) { ++m.in_flight; }
    ~Admission() { --m.in_flight; }
  };

  // Runs fn with the GPU, in arrival order; none when the client left while waiting.
  template <typename F>
  std::optional<GenerationResult> on_gpu(F&& fn, const std::function<bool()>& gone) {
    const uint64_t ticket = turns_.take();
    ++metrics_.queued;
    const bool turn = turns_.wait(ticket, gone);
    --metrics_.queued;
    if (!turn) return std::nullopt;
    struct Done {
      FifoTurns& t;
      ~Done() { t.done(); }
    } done{turns_};
    return fn();
  }

  // Checks the API key inside the handlers, once the request (and its body) has been read.
  bool authorized(const http::Request& req, http::Response& res) {
    if (opt_.api_key.empty()) return true;
    const std::string auth = req.header("authorization");
    if (bearer_matches(auth, opt_.api_key)) return true;
    set_error(res, ApiError(401, auth.empty() ? "missing API key: send 'Authorization: Bearer <key>'" : "incorrect API key",
                            "invalid_request_error", "", "invalid_api_key"));
    count(401);
    return false;
  }

  // A client that left (or a server shutting down): its generation stops, its turn and its
  // admission go at once.
  std::function<bool()> leaving(const http::Connection& conn) {
    return [this, &conn] { return stop_ || conn.client_gone(); };
  }

  void cancelled(const GenerationResult* g) {
    std::lock_guard<std::mutex> l(metrics_.m);
    ++metrics_.cancelled;
    ++metrics_.requests[499];  // the client closed the connection
    if (g) {
      metrics_.prompt_tokens += g->prompt_tokens.size();
      metrics_.completion_tokens += g->tokens.size();
    }
  }

  void chat(const http::Request& req, http::Response& res, http::Connection& conn) {
    if (!authorized(req, res)) return;
    auto admission = std::make_shared<Admission>(metrics_);
    try {
      if (!ready_) throw ApiError(503, "the model is still loading", "server_error", "", "model_loading");
      if (metrics_.in_flight > opt_.max_concurrency)
        throw ApiError(429, "the server is busy (" + std::to_string(opt_.max_concurrency) + " requests in flight); retry later",
                       "rate_limit_exceeded", "", "server_busy");
      ChatRequest r = parse(req.body);
      Prompt prompt;
      try {
        prompt = model_->build_prompt(r.messages, r.images, r.template_vars);
      } catch (const ApiError&) {
        throw;
      } catch (const std::exception& e) {
        throw ApiError(400, e.what(), "invalid_request_error", "messages");
      }
      if (int64_t(prompt.ids.size()) >= opt_.context_tokens)
        throw ApiError(400,
                       "the prompt is " + std::to_string(prompt.ids.size()) + " tokens, more than the context of " +
                           std::to_string(opt_.context_tokens) + " tokens",
                       "invalid_request_error", "messages", "context_length_exceeded");
      const std::string id = random_id();
      if (!r.stream) {
        const auto gone = leaving(conn);
        auto g = on_gpu([&] {
          return pick_session(prompt).generate(prompt, r.params, [&](const StepOutput&) { return !gone(); }, gone);
        }, gone);
        if (!g || g->finish_reason == "cancelled") {
          cancelled(g ? &*g : nullptr);
          res.status = 499;
          return;
        }
        record(*g);
        res.body = completion_json(id, *g, r.logprobs).dump(-1, ' ', false, json::error_handler_t::replace);
        count(200);
        log_request(*g, false);
        return;
      }
      // Streaming: the response starts now; generation runs as the body is written.
      auto shared = std::make_shared<std::pair<ChatRequest, Prompt>>(std::move(r), std::move(prompt));
      res.content_type = "text/event-stream";
      res.headers.push_back({"Cache-Control", "no-cache"});
      res.stream = [this, shared, id, admission](http::Stream& sink) {
        const auto& [cr, pr] = *shared;
        const int64_t created = now_seconds();
        auto chunk = [&](json delta, json finish, json logprobs) {
          json c = {{"index", 0}, {"delta", std::move(delta)}, {"logprobs", std::move(logprobs)}, {"finish_reason", std::move(finish)}};
          json j = {{"id", id}, {"object", "chat.completion.chunk"}, {"created", created}, {"model", opt_.model_name},
                    {"system_fingerprint", "vkvlm"}, {"choices", json::array({c})}};
          if (cr.include_usage) j["usage"] = nullptr;
          return "data: " + j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
        };
        const auto gone = leaving(sink);
        bool alive = sink.write(chunk({{"role", "assistant"}, {"content", ""}}, nullptr, nullptr));
        std::optional<GenerationResult> g;
        try {
          g = on_gpu([&] {
            return pick_session(pr).generate(pr, cr.params, [&](const StepOutput& s) {
              if (!alive || stop_) return false;
              if (s.text.empty() && !cr.logprobs) return !sink.client_gone();
              json lp = nullptr;
              if (cr.logprobs) lp = {{"content", logprob_list({s})}};
              alive = sink.write(chunk({{"content", s.text}}, nullptr, lp));
              return alive;
            }, gone);
          }, gone);
        } catch (const std::exception& e) {
          // Too late for a status code: report in the stream's own error shape and end it.
          sink.write("data: " + error_body(e.what(), "server_error", "", "") + "\n\n");
          count(500);
          return;
        }
        if (!g || g->finish_reason == "cancelled" || !alive) {
          cancelled(g ? &*g : nullptr);
          if (g) log_request(*g, true);
          return;
        }
        record(*g);
        log_request(*g, true);
        sink.write(chunk(json::object(), g->finish_reason, nullptr));
        if (cr.include_usage) {
          json j = {{"id", id}, {"object", "chat.completion.chunk"}, {"created", created}, {"model", opt_.model_name},
                    {"system_fingerprint", "vkvlm"}, {"choices", json::array()}, {"usage", usage(*g)}};
          sink.write("data: " + j.dump() + "\n\n");
        }
        sink.write("data: [DONE]\n\n");
        count(200);
      };
    } catch (const ApiError& e) {
      set_error(res, e);
      count(e.status);
    }
  }

  void log_request(const GenerationResult& g, bool stream) {
    std::fprintf(stderr, "vkvlm serve: chat%s prompt %zu (cached %lld) completion %zu finish %s\n", stream ? " stream" : "",
                 g.prompt_tokens.size(), (long long)g.cached_tokens, g.tokens.size(), g.finish_reason.c_str());
  }

  Options opt_;
  fs::path local_root_;
  std::unique_ptr<http::Server> http_;
  std::unique_ptr<gpu::Context> ctx_;
  std::unique_ptr<Model> model_;
  std::vector<std::unique_ptr<Session>> sessions_;
  std::vector<uint64_t> last_used_;  // per slot, for least-recently-used eviction (under the GPU turn)
  uint64_t use_clock_ = 0;
  std::atomic<bool> ready_{false}, load_failed_{false}, stop_{false};
  int64_t started_ = 0;
  FifoTurns turns_;
  Metrics metrics_;
};

}  // namespace

int run_serve(int argc, char** argv, int first) {
  Flags f(argc, argv, first,
          {{"model", true}, {"model-name", true}, {"host", true}, {"port", true}, {"api-key", true}, {"max-concurrency", true},
           {"ctx", true}, {"kv-slots", true}, {"allow-local-files", true}, {"max-images", true}, {"max-body-mb", true},
           {"quantize", true}, {"metrics-public", false}, {"request-timeout", true}});
  Options o;
  o.model_dir = f.has("model") ? f.str("model") : default_model_dir();
  o.model_name = f.str("model-name");
  o.host = f.str("host", "127.0.0.1");
  o.port = int(f.integer("port", 8080, 1, 65535));
  o.api_key = f.str("api-key");
  o.max_concurrency = int(f.integer("max-concurrency", 16, 1, 1024));
  o.context_tokens = f.integer("ctx", 4096, 16, int64_t(1) << 24);
  o.kv_slots = int(f.integer("kv-slots", 1, 1, 64));
  o.allow_local_files = f.str("allow-local-files");
  o.max_images = int(f.integer("max-images", 8, 0, 256));
  o.max_body_bytes = size_t(f.integer("max-body-mb", 64, 1, 4096)) << 20;
  o.metrics_public = f.has("metrics-public");
  o.request_seconds = double(f.integer("request-timeout", 30, 1, 3600));
  o.load.quantize = f.str("quantize");
  if (!o.load.quantize.empty() && o.load.quantize != "q4" && o.load.quantize != "q8")
    throw UsageError("--quantize takes q4 or q8, not '" + o.load.quantize + "'");
  std::error_code ec;
  if (!fs::is_directory(o.model_dir, ec)) throw Error("model folder " + o.model_dir + " does not exist");
  Server s(o);
  return s.run();
}

}  // namespace vkvlm::server
