#include "app/server.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
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

#include "base/json.h"
#include "app/chat_request.h"
#include "app/flags.h"
#include "app/http.h"
#include "app/request_memory.h"
#include "models/arch/known_models.h"
#include "base/files.h"
#include "gpu/device.h"
#include "gpu/error.h"
#include "host/hub_cache.h"
#include "host/image.h"
#include "models/batch.h"
#include "models/session.h"

namespace vkvlm::server {
namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace {

void set_error(http::Response& res, const ApiError& e) {
  res.status = e.status;
  res.content_type = "application/json";
  res.body = error_body(e.what(), e.type, e.param, e.code);
  if (e.status == 429) res.headers.emplace_back("Retry-After", "1");
}

// %XX escapes decoded (a model name with '/' may come as %2F); a malformed escape stays as it is.
std::string percent_decode(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && std::isxdigit(static_cast<unsigned char>(s[i + 1])) &&
        std::isxdigit(static_cast<unsigned char>(s[i + 2]))) {
      out += char(std::stoi(s.substr(i + 1, 2), nullptr, 16));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

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
  uint64_t draft_tokens = 0, accepted_tokens = 0;  // speculative decoding
  uint64_t batch_steps = 0, batch_sequences = 0;   // batched decode steps, and the sequences they advanced
  double prefill_tps = 0, decode_tps = 0;
  std::atomic<int> in_flight{0}, queued{0};
  std::atomic<int> decoding{0};  // generations holding a conversation slot now (scheduler thread)
};

// A streaming request as its generation needs it, kept alive by the response's writer.
struct Prepared {
  ChatRequest request;
  Prompt prompt, draft_prompt;
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
  explicit Server(Options o)
      : opt_(std::move(o)),
        request_memory_(opt_.max_request_memory ? opt_.max_request_memory : default_request_memory()) {
    if (opt_.models.empty()) fail("internal: a server without models");
    for (const auto& m : opt_.models) {
      for (const auto& other : models_)
        if (other->spec.name == m.name) fail("two models are named '", m.name, "'");
      if (m.name.empty() || m.name == "default") fail("a model needs a name other than '", m.name, "'");
      models_.push_back(std::make_unique<Served>());
      models_.back()->spec = m;
    }
    active_ = 0;
    if (!opt_.active_model.empty()) active_ = index_of(opt_.active_model, "the active model");
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
    limits.cors_origin = opt_.cors_origin;
    // Bodies as they arrive are held within the request memory too, until their handler returns.
    limits.reserve = [this](uint64_t bytes) { return request_memory_.try_reserve(bytes); };
    limits.release = [this](uint64_t bytes) { request_memory_.release(bytes); };
    // Workers run handlers only (a slow client costs no thread while its request arrives):
    // enough for every admitted chat request and for the cheap endpoints beside them.
    limits.workers = opt_.max_concurrency + 8;
    http_ = std::make_unique<http::Server>(limits, [](int status, const std::string& message) {
      const std::string type = status >= 500 && status != 503 ? "server_error" : "invalid_request_error";
      const std::string code = status == 413 ? "request_too_large" : status == 408 ? "request_timeout" : "";
      return error_body(message, type, "", code);
    });
    http::Server& h = *http_;
    // Readiness (/health, /health/ready): 200 once the active model is loaded, 503 while it loads
    // and once the server drains; liveness (/health/live): 200 while the process serves at all.
    for (const char* path : {"/health", "/health/ready"})
      h.route("GET", path, [this](const http::Request&, http::Response& res, http::Connection&) {
        const bool ready = ready_ && !draining_;
        res.status = ready ? 200 : 503;
        json states = json::object();
        {
          std::lock_guard<std::mutex> l(models_mu_);
          for (const auto& m : models_) states[m->spec.name] = m->state;
        }
        res.body = json{{"status", draining_ ? "draining" : ready_ ? "ok" : "loading"}, {"models", states}}.dump();
      });
    h.route("GET", "/health/live", [](const http::Request&, http::Response& res, http::Connection&) {
      res.body = json{{"status", "alive"}}.dump();
    });
    h.route("GET", "/metrics", [this](const http::Request& req, http::Response& res, http::Connection&) {
      if (!opt_.metrics_public && !authorized(req, res)) return;
      res.content_type = "text/plain; version=0.0.4";
      res.body = metrics_text();
    });
    h.route("GET", "/v1/models", [this](const http::Request& req, http::Response& res, http::Connection&) {
      if (!authorized(req, res)) return;
      json list = json::array();
      {
        std::lock_guard<std::mutex> l(models_mu_);
        for (const auto& m : models_) list.push_back(model_json(*m));
      }
      res.body = json{{"object", "list"}, {"data", list}}.dump();
      count(200);
    });
    // One model by its name (which may hold '/': ORG/NAME), as OpenAI's GET /v1/models/{model}.
    h.route_prefix("GET", "/v1/models/", [this](const http::Request& req, http::Response& res, http::Connection&) {
      if (!authorized(req, res)) return;
      const std::string name = percent_decode(req.path.substr(std::strlen("/v1/models/")));
      std::lock_guard<std::mutex> l(models_mu_);
      for (const auto& m : models_)
        if (m->spec.name == name) {
          res.body = model_json(*m).dump();
          count(200);
          return;
        }
      set_error(res, ApiError(404, "no model named '" + name + "' is served", "invalid_request_error", "model", "model_not_found"));
      count(404);
    });
    // The LLaVA-MLX server's configuration endpoint: GET shows it, PATCH {"active_model": NAME}
    // switches the model for requests that name none or "default".
    // (At /api/v1/config too, the path the LLaVA-MLX server gives it.)
    for (const char* path : {"/v1/config", "/api/v1/config"}) {
    h.route("GET", path, [this](const http::Request& req, http::Response& res, http::Connection&) {
      if (!authorized(req, res)) return;
      res.body = config_json().dump();
      count(200);
    });
    h.route("PATCH", path, [this](const http::Request& req, http::Response& res, http::Connection&) {
      if (!authorized(req, res)) return;
      try {
        json body;
        try {
          body = parse_json<json>(req.body);
        } catch (const std::exception&) {
          throw ApiError(400, "the request body is not valid JSON", "invalid_request_error", "", "invalid_json");
        }
        if (!body.is_object() || body.size() != 1 || !body.contains("active_model") || !body["active_model"].is_string())
          throw ApiError(400, "PATCH " + req.path + " takes {\"active_model\": NAME}", "invalid_request_error", "active_model");
        const size_t i = find_model(body["active_model"].get<std::string>(), /*strict=*/true);
        {
          std::lock_guard<std::mutex> l(models_mu_);
          active_ = i;
        }
        res.body = config_json().dump();
        count(200);
      } catch (const ApiError& e) {
        set_error(res, e);
        count(e.status);
      }
    });
    }
    h.route("POST", "/v1/chat/completions",
            [this](const http::Request& req, http::Response& res, http::Connection& conn) { chat(req, res, conn); });

    std::string why;
    if (!h.bind(opt_.host, opt_.port, &why)) {
      std::fprintf(stderr, "vkvlm serve: error: cannot listen on %s:%d: %s\n", opt_.host.c_str(), opt_.port, why.c_str());
      return 1;
    }
    std::fprintf(stderr, "vkvlm serve: listening on http://%s:%d (loading %s)\n", opt_.host.c_str(), opt_.port,
                 models_[active_]->spec.dir.c_str());
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
    // The first signal drains: no new requests (503), those in flight finish, for at most
    // --drain-timeout seconds; a second signal, or the timeout, stops them.
    std::thread watcher([this, set] {
      int sig = 0;
      sigwait(&set, &sig);
      draining_ = true;
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(opt_.drain_seconds);
      const timespec poll{0, 50'000'000};
      while (!stop_ && metrics_.in_flight > 0 && std::chrono::steady_clock::now() < deadline)
        if (sigtimedwait(&set, nullptr, &poll) > 0) break;
      stop_ = true;
      http_->stop();
    });
    std::thread scheduler([this] { schedule(); });
    h.run();
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      quit_ = true;
      queue_cv_.notify_all();
    }
    scheduler.join();
    loader.join();
    if (!stop_) pthread_kill(watcher.native_handle(), SIGTERM);
    watcher.join();
    if (load_failed_) return 1;
    std::fprintf(stderr, "vkvlm serve: stopped\n");
    // The GPU objects go before the context.
    models_.clear();
    return 0;
  }

 private:
  // What a loaded model holds on the device: the model, its conversation slots, its draft.
  // Shared with the requests using it, so that unloading it (least recently used) frees it only
  // once they are done.
  struct Loaded {
    std::unique_ptr<Model> model;
    std::vector<std::unique_ptr<Session>> sessions;
    std::unique_ptr<Model> draft;                          // --draft-model, if any
    std::vector<std::unique_ptr<Session>> draft_sessions;  // one per slot, beside sessions
    std::vector<uint64_t> cache_keys;                      // the prompt cache's rows (empty: none)
    std::vector<uint64_t> last_used;                       // per slot (scheduler thread)
    uint64_t use_clock = 0, kv_bytes = 0;
  };
  struct Served {
    ServedModelOptions spec;
    std::shared_ptr<Loaded> loaded;  // null until loaded (models_mu_)
    std::string state = "unloaded";  // unloaded, loading, ready, failed (models_mu_)
    uint64_t last_request = 0;       // for least-recently-used unloading (models_mu_)
  };

  std::shared_ptr<Loaded> load_model(const ServedModelOptions& m) {
    auto L = std::make_shared<Loaded>();
    L->model = std::make_unique<Model>(*ctx_, m.dir, m.load);
    for (int i = 0; i < opt_.kv_slots; ++i)
      L->sessions.push_back(std::make_unique<Session>(*L->model, m.context_tokens, m.rotating, m.kv_format));
    if (!m.prompt_cache.empty()) {
      for (auto& s : L->sessions) s->load_prompt_cache(m.prompt_cache);
      L->cache_keys = L->sessions[0]->cached_keys();
      std::fprintf(stderr, "vkvlm serve: prompt cache %s: %zu tokens\n", m.prompt_cache.c_str(), L->cache_keys.size());
    }
    if (!m.draft_model_dir.empty()) {
      L->draft = std::make_unique<Model>(*ctx_, m.draft_model_dir, m.load);
      check_draft_model(*L->model, *L->draft);
      for (int i = 0; i < opt_.kv_slots; ++i)
        L->draft_sessions.push_back(std::make_unique<Session>(*L->draft, m.context_tokens));
    }
    L->last_used.assign(L->sessions.size(), 0);
    for (auto& s : L->sessions) L->kv_bytes += s->kv_bytes();
    return L;
  }

  // Loads a model that is not loaded (with the GPU to itself: at startup, or on the scheduler thread),
  // unloading the least recently used others when --max-loaded would be exceeded, or when the
  // device has no room for it. Throws a 503 naming the model when it cannot be loaded.
  std::shared_ptr<Loaded> ensure_loaded(Served& s) {
    std::vector<std::shared_ptr<Loaded>> unloaded;  // freed outside the lock
    {
      std::lock_guard<std::mutex> l(models_mu_);
      if (s.loaded) return s.loaded;
      s.state = "loading";
      size_t n = 0;
      for (const auto& m : models_) n += m->loaded != nullptr;
      while (opt_.max_loaded > 0 && n >= size_t(opt_.max_loaded)) {
        unloaded.push_back(unload_least_recent(&s));
        --n;
      }
    }
    unloaded.clear();
    std::string why;
    for (int attempt = 0; attempt < 2; ++attempt) {
      try {
        auto L = load_model(s.spec);
        std::lock_guard<std::mutex> l(models_mu_);
        s.loaded = L;
        s.state = "ready";
        std::fprintf(stderr, "vkvlm serve: model %s ready on %s\n", s.spec.name.c_str(), ctx_->profile().device_name.c_str());
        return L;
      } catch (const std::exception& e) {
        why = e.what();
      }
      // No room: the others go (least recently used first), then one more try.
      std::lock_guard<std::mutex> l(models_mu_);
      bool any = false;
      for (const auto& m : models_) any = any || (m.get() != &s && m->loaded);
      if (!any) break;
      while (auto L = unload_least_recent(&s)) unloaded.push_back(L);
    }
    unloaded.clear();
    {
      std::lock_guard<std::mutex> l(models_mu_);
      s.state = "failed";
    }
    std::replace(why.begin(), why.end(), '\n', ' ');
    std::fprintf(stderr, "vkvlm serve: error: model %s: %s\n", s.spec.name.c_str(), why.c_str());
    throw ApiError(503, "model " + s.spec.name + " could not be loaded: " + why, "server_error", "model", "model_unavailable");
  }

  // Under models_mu_: unloads the least recently used loaded model other than `keep`.
  std::shared_ptr<Loaded> unload_least_recent(const Served* keep) {
    Served* victim = nullptr;
    for (const auto& m : models_)
      if (m.get() != keep && m->loaded && (!victim || m->last_request < victim->last_request)) victim = m.get();
    if (!victim) return nullptr;
    std::fprintf(stderr, "vkvlm serve: unloading model %s\n", victim->spec.name.c_str());
    auto L = std::move(victim->loaded);
    victim->state = "unloaded";
    return L;
  }

  void load() {
    try {
      ctx_ = std::make_unique<gpu::Context>(gpu::Device::create());
      ensure_loaded(*models_[active_]);
      ready_ = true;
    } catch (const std::exception& e) {
      std::string m = e.what();
      std::replace(m.begin(), m.end(), '\n', ' ');
      std::fprintf(stderr, "vkvlm serve: error: %s\n", m.c_str());
      load_failed_ = true;
    }
  }

  size_t index_of(const std::string& name, const char* what) const {
    for (size_t i = 0; i < models_.size(); ++i)
      if (models_[i]->spec.name == name) return i;
    fail(what, " '", name, "' is not among the models served");
  }

  // The model a request names: its name, or the active one for none or "default". A server of
  // one model answers whatever a request names (as llama-server does: clients send all sorts).
  size_t find_model(const std::string& name, bool strict = false) {
    std::lock_guard<std::mutex> l(models_mu_);
    if (name.empty() || name == "default" || (models_.size() == 1 && !strict)) return active_;
    for (size_t i = 0; i < models_.size(); ++i)
      if (models_[i]->spec.name == name) return i;
    std::string names;
    for (const auto& m : models_) names += (names.empty() ? "" : ", ") + m->spec.name;
    throw ApiError(404, "the model '" + name + "' does not exist; this server has " + names, "invalid_request_error", "model",
                   "model_not_found");
  }

  // A model as /v1/models lists it.
  json model_json(const Served& m) const {
    return {{"id", m.spec.name}, {"object", "model"}, {"created", started_}, {"owned_by", "vkvlm"}, {"loaded", m.loaded != nullptr}};
  }

  json config_json() {
    std::lock_guard<std::mutex> l(models_mu_);
    json list = json::array();
    for (const auto& m : models_)
      list.push_back({{"name", m->spec.name}, {"model", m->spec.dir}, {"ctx", m->spec.context_tokens}, {"state", m->state},
                      {"kv_cache", m->spec.kv_format.describe()}, {"draft_model", m->spec.draft_model_dir}});
    return json{{"active_model", models_[active_]->spec.name}, {"max_loaded", opt_.max_loaded}, {"models", list}};
  }

  void count(int status) {
    std::lock_guard<std::mutex> l(metrics_.m);
    ++metrics_.requests[status];
  }

  std::string metrics_text() {
    size_t slots = 0;
    {
      std::lock_guard<std::mutex> ml(models_mu_);
      for (const auto& m : models_)
        if (m->loaded) slots += m->loaded->sessions.size();
    }
    std::lock_guard<std::mutex> l(metrics_.m);
    std::ostringstream os;
    // Under the names inference gateways scrape (the Gateway API Inference Extension's model
    // server protocol, KServe): requests waiting and running, and the conversation slots in use
    // as the KV cache's utilization (0 to 1).
    const int waiting = metrics_.queued, running = std::max(0, metrics_.in_flight - waiting);
    const double kv_use = slots ? std::min(1.0, double(metrics_.decoding) / double(slots)) : 0.0;
    os << "# HELP vllm:num_requests_waiting Requests waiting for a conversation slot.\n# TYPE vllm:num_requests_waiting gauge\n"
       << "vllm:num_requests_waiting " << waiting << "\n";
    os << "# HELP vllm:num_requests_running Requests admitted and not waiting.\n# TYPE vllm:num_requests_running gauge\n"
       << "vllm:num_requests_running " << running << "\n";
    for (const char* name : {"vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"})
      os << "# HELP " << name << " Conversation slots (KV caches) decoding now, over all slots: 1 is full.\n# TYPE " << name
         << " gauge\n" << name << " " << kv_use << "\n";
    os << "# HELP vkvlm_requests_total HTTP requests answered, by status.\n# TYPE vkvlm_requests_total counter\n";
    for (auto& [status, n] : metrics_.requests) os << "vkvlm_requests_total{status=\"" << status << "\"} " << n << "\n";
    os << "# HELP vkvlm_prompt_tokens_total Prompt tokens of completed requests.\n# TYPE vkvlm_prompt_tokens_total counter\n"
       << "vkvlm_prompt_tokens_total " << metrics_.prompt_tokens << "\n";
    os << "# HELP vkvlm_cached_prompt_tokens_total Prompt tokens served from the KV cache.\n"
       << "# TYPE vkvlm_cached_prompt_tokens_total counter\nvkvlm_cached_prompt_tokens_total " << metrics_.cached_tokens << "\n";
    os << "# HELP vkvlm_generated_tokens_total Generated tokens.\n# TYPE vkvlm_generated_tokens_total counter\n"
       << "vkvlm_generated_tokens_total " << metrics_.completion_tokens << "\n";
    os << "# HELP vkvlm_draft_tokens_total Tokens proposed by speculative decoding (draft model or prompt lookup).\n"
       << "# TYPE vkvlm_draft_tokens_total counter\nvkvlm_draft_tokens_total " << metrics_.draft_tokens << "\n";
    os << "# HELP vkvlm_accepted_draft_tokens_total Proposed tokens the model accepted.\n"
       << "# TYPE vkvlm_accepted_draft_tokens_total counter\nvkvlm_accepted_draft_tokens_total " << metrics_.accepted_tokens
       << "\n";
    os << "# HELP vkvlm_decode_steps_total Batched decode steps (--parallel).\n"
       << "# TYPE vkvlm_decode_steps_total counter\nvkvlm_decode_steps_total " << metrics_.batch_steps << "\n";
    os << "# HELP vkvlm_decode_step_sequences_total Sequences those steps advanced (over steps: the mean batch size).\n"
       << "# TYPE vkvlm_decode_step_sequences_total counter\nvkvlm_decode_step_sequences_total " << metrics_.batch_sequences
       << "\n";
    os << "# HELP vkvlm_request_memory_bytes Memory reserved by the requests being handled (--max-request-memory).\n"
       << "# TYPE vkvlm_request_memory_bytes gauge\nvkvlm_request_memory_bytes " << request_memory_.in_use() << "\n";
    os << "# HELP vkvlm_request_memory_peak_bytes The most reserved at once since the start.\n"
       << "# TYPE vkvlm_request_memory_peak_bytes gauge\nvkvlm_request_memory_peak_bytes " << request_memory_.peak() << "\n";
    os << "# HELP vkvlm_request_memory_budget_bytes The budget (--max-request-memory).\n"
       << "# TYPE vkvlm_request_memory_budget_bytes gauge\nvkvlm_request_memory_budget_bytes " << request_memory_.budget() << "\n";
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
    os << "# HELP vkvlm_kv_cache_bytes Device memory of the conversation slots' KV caches, by how they store K and V.\n"
       << "# TYPE vkvlm_kv_cache_bytes gauge\n";
    {
      std::lock_guard<std::mutex> ml(models_mu_);
      for (const auto& m : models_)
        os << "vkvlm_kv_cache_bytes{model=\"" << m->spec.name << "\",format=\"" << m->spec.kv_format.describe() << "\"} "
           << (m->loaded ? m->loaded->kv_bytes : 0) << "\n";
    }
    return os.str();
  }

  RequestLimits request_limits(const ServedModelOptions& m, const Loaded& L) const {
    RequestLimits l;
    l.max_images = opt_.max_images;
    l.max_messages = opt_.max_messages;
    l.max_parts = opt_.max_parts;
    // A rotating cache answers past its rows: max_tokens may reach four times them.
    l.context_tokens = m.rotating ? 4 * m.context_tokens : m.context_tokens;
    l.local_root = local_root_;
    l.num_draft_tokens = opt_.num_draft_tokens;
    l.lookup_ngram = opt_.lookup_ngram;
    l.has_draft_model = L.draft != nullptr;
    return l;
  }

  // A free session for the prompt (one no generation is using; none: SIZE_MAX): the slot this
  // prompt continues (it shares at least half of the slot's cached tokens, the longest such
  // share winning), else the least recently used, so a shared preamble like "USER:" does not
  // make conversations evict each other.
  size_t pick_slot(Loaded& L, const Prompt& prompt, const std::vector<bool>& busy) {
    size_t best = SIZE_MAX, best_len = 0;
    for (size_t i = 0; i < L.sessions.size(); ++i) {
      if (busy[i]) continue;
      const auto& keys = L.sessions[i]->cached_keys();
      const size_t n = shared_prefix(keys, prompt.keys);
      if (!keys.empty() && 2 * n >= keys.size() && n > best_len) {
        best = i;
        best_len = n;
      }
    }
    if (best == SIZE_MAX)
      for (size_t i = 0; i < L.sessions.size(); ++i)
        if (!busy[i] && (best == SIZE_MAX || L.last_used[i] < L.last_used[best])) best = i;
    if (best != SIZE_MAX) L.last_used[best] = ++L.use_clock;
    return best;
  }

  json completion_json(const std::string& id, const std::string& model, const Tokenizer& tok, bool draft,
                       const GenerationResult& r, bool logprobs) {
    json choice = {{"index", 0}, {"message", {{"role", "assistant"}, {"content", r.text}}}, {"logprobs", nullptr},
                   {"finish_reason", r.finish_reason}};
    if (logprobs) choice["logprobs"] = {{"content", logprob_list(tok, r.steps)}};
    return json{{"id", id},
                {"object", "chat.completion"},
                {"created", now_seconds()},
                {"model", model},
                {"system_fingerprint", "vkvlm"},
                {"choices", json::array({choice})},
                {"usage", usage(r, draft)}};
  }

  json logprob_list(const Tokenizer& tok, const std::vector<StepOutput>& steps) {
    json list = json::array();
    for (auto& s : steps) {
      json e = logprob_entry(tok, s.token, s.logprob);
      json tops = json::array();
      for (auto& [id, lp] : s.top_logprobs) tops.push_back(logprob_entry(tok, id, lp));
      e["top_logprobs"] = tops;
      list.push_back(e);
    }
    return list;
  }

  json usage(const GenerationResult& r, bool draft) {
    json u = {{"prompt_tokens", r.prompt_tokens.size()},
              {"completion_tokens", r.tokens.size()},
              {"total_tokens", r.prompt_tokens.size() + r.tokens.size()},
              {"prompt_tokens_details", {{"cached_tokens", r.cached_tokens}}}};
    if (draft || r.draft_tokens) {  // an extension: how speculative decoding went
      u["draft_tokens"] = r.draft_tokens;
      u["accepted_tokens"] = r.accepted_tokens;
    }
    return u;
  }

  void record(const GenerationResult& r) {
    std::lock_guard<std::mutex> l(metrics_.m);
    metrics_.prompt_tokens += r.prompt_tokens.size();
    metrics_.completion_tokens += r.tokens.size();
    metrics_.cached_tokens += uint64_t(r.cached_tokens);
    metrics_.draft_tokens += uint64_t(r.draft_tokens);
    metrics_.accepted_tokens += uint64_t(r.accepted_tokens);
    if (r.finish_reason == "cancelled") ++metrics_.cancelled;
    if (const double tps = r.prefill_tokens_per_second(); tps > 0) metrics_.prefill_tps = tps;
    if (const double tps = r.decode_tokens_per_second(); tps > 0) metrics_.decode_tps = tps;
  }

  // Holds an admission slot for the whole request.
  struct Admission {
    Metrics& m;
    explicit Admission(Metrics& mm) : m(mm) { ++m.in_flight; }
    ~Admission() { --m.in_flight; }
  };

  // Work for the GPU, in arrival order: a task that runs alone (loading a model), or a
  // generation. The requester follows it (steps as they come, then the end); the scheduler
  // thread runs it.
  struct Job {
    std::function<void()> task;  // a task; empty for a generation
    // A generation: the model, the conversation (kept alive by the requester) and parameters.
    std::shared_ptr<Loaded> loaded;
    const ServedModelOptions* spec = nullptr;
    const Prompt* prompt = nullptr;
    const Prompt* draft_prompt = nullptr;
    GenerationParams params;
    // What the requester reads (mu):
    std::mutex mu;
    std::condition_variable cv;
    std::deque<StepOutput> steps;
    std::optional<GenerationResult> result;  // none: the job never ran (its client left first)
    std::string error;                        // it failed
    bool done = false;
    std::atomic<bool> cancel{false};  // the client left: a queued job is dropped, a running one stops
  };

  // A model's generations decoding together (--parallel of them at most).
  struct Active {
    std::shared_ptr<Loaded> loaded;
    std::unique_ptr<DecodeBatch> batch;
    std::map<uint64_t, std::shared_ptr<Job>> jobs;  // by tag
  };

  void submit(const std::shared_ptr<Job>& job) {
    std::lock_guard<std::mutex> l(queue_mu_);
    queue_.push_back(job);
    metrics_.queued = int(queue_.size());
    queue_cv_.notify_all();
  }

  static void complete(Job& job, std::optional<GenerationResult> result, const std::string& error = "") {
    std::lock_guard<std::mutex> l(job.mu);
    job.result = std::move(result);
    job.error = error;
    job.done = true;
    job.cv.notify_all();
  }

  // Waits for the job to end, handing each step to on_step as it comes (false: the client
  // left, the generation stops). A client that leaves (gone) cancels the job.
  static void follow(Job& job, const std::function<bool()>& gone, const std::function<bool(const StepOutput&)>& on_step) {
    std::unique_lock<std::mutex> l(job.mu);
    while (true) {
      while (!job.steps.empty()) {
        StepOutput step = std::move(job.steps.front());
        job.steps.pop_front();
        l.unlock();
        const bool keep = on_step ? on_step(step) : true;
        l.lock();
        if (!keep) job.cancel = true;
      }
      if (job.done) return;
      if (gone && gone()) job.cancel = true;
      job.cv.wait_for(l, std::chrono::milliseconds(50));
    }
  }

  // Runs fn on the GPU thread in arrival order; none when the client left while waiting.
  template <typename F>
  auto on_gpu(F&& fn, const std::function<bool()>& gone) -> std::optional<decltype(fn())> {
    std::optional<decltype(fn())> out;
    std::exception_ptr err;
    auto job = std::make_shared<Job>();
    job->task = [&] {
      try {
        out = fn();
      } catch (...) {
        err = std::current_exception();
      }
    };
    submit(job);
    follow(*job, gone, {});
    if (err) std::rethrow_exception(err);
    return out;
  }

  // The GPU's one thread: takes queued jobs in arrival order (tasks at once; generations while
  // their model has a free slot and, unless speculative, room in its batch), then advances every
  // model's batch by one token, so new requests join between steps.
  void schedule() {
    std::map<const Loaded*, Active> active;
    std::unique_lock<std::mutex> l(queue_mu_);
    while (true) {
      if (active.empty()) queue_cv_.wait(l, [&] { return !queue_.empty() || quit_; });
      if (quit_ && queue_.empty() && active.empty()) return;
      const std::vector<std::shared_ptr<Job>> waiting(queue_.begin(), queue_.end());
      l.unlock();
      std::set<const Job*> taken;
      for (const auto& job : waiting) {
        if (job->cancel || stop_) {
          complete(*job, std::nullopt);
          taken.insert(job.get());
        } else if (job->task) {
          job->task();
          complete(*job, std::nullopt);
          taken.insert(job.get());
        } else if (start_generation(job, active)) {
          taken.insert(job.get());
        }
      }
      l.lock();
      std::deque<std::shared_ptr<Job>> left;
      for (auto& job : queue_)
        if (!taken.count(job.get())) left.push_back(job);
      queue_ = std::move(left);
      metrics_.queued = int(queue_.size());
      l.unlock();
      for (auto it = active.begin(); it != active.end();) {
        Active& a = it->second;
        try {
          const size_t n = a.batch->step();
          std::lock_guard<std::mutex> ml(metrics_.m);
          ++metrics_.batch_steps;
          metrics_.batch_sequences += n;
        } catch (const std::exception& e) {
          for (auto& [tag, job] : a.jobs) complete(*job, std::nullopt, e.what());
          a.jobs.clear();
        }
        deliver(a);
        it = a.jobs.empty() ? active.erase(it) : std::next(it);
      }
      int decoding = 0;
      for (const auto& [model, a] : active) decoding += int(a.jobs.size());
      metrics_.decoding = decoding;
      l.lock();
    }
  }

  // Hands the batch's ended generations to their jobs (one a failed step already ended is skipped).
  static void deliver(Active& a) {
    for (auto& f : a.batch->take_finished()) {
      auto it = a.jobs.find(f.tag);
      if (it == a.jobs.end()) continue;
      complete(*it->second, std::move(f.result));
      a.jobs.erase(it);
    }
  }

  // Starts a queued generation when its model has a free slot (and batch room); false to wait.
  // A speculative one (draft model or prompt lookup) runs to its end at once, alone.
  bool start_generation(const std::shared_ptr<Job>& job, std::map<const Loaded*, Active>& active) {
    Loaded& L = *job->loaded;
    const bool solo = L.draft || job->params.lookup_ngram > 0;
    auto found = active.find(&L);
    if (!solo && found != active.end() && int(found->second.jobs.size()) >= opt_.parallel) return false;
    std::vector<bool> busy(L.sessions.size(), false);
    if (found != active.end())
      for (size_t i = 0; i < L.sessions.size(); ++i) busy[i] = found->second.batch->holds(*L.sessions[i]);
    const size_t slot = pick_slot(L, *job->prompt, busy);
    if (slot == SIZE_MAX) return false;
    Job* j = job.get();
    auto on_step = [this, j](const StepOutput& s) {
      std::lock_guard<std::mutex> lk(j->mu);
      j->steps.push_back(s);
      j->cv.notify_all();
      return !j->cancel && !stop_;
    };
    auto cancelled = [this, j] { return j->cancel || stop_; };
    try {
      // A conversation that starts like the prompt cache, on a slot that holds less of it, gets
      // the cached rows back before it runs.
      const Prompt& prompt = *job->prompt;
      if (!L.cache_keys.empty() &&
          shared_prefix(L.cache_keys, prompt.keys) > shared_prefix(L.sessions[slot]->cached_keys(), prompt.keys)) {
        L.sessions[slot]->load_prompt_cache(job->spec->prompt_cache);
        if (L.draft) L.draft_sessions[slot]->reset();
      }
      if (solo) {
        Speculation spec;
        if (L.draft) spec = {L.draft_sessions[slot].get(), job->draft_prompt};
        ++metrics_.decoding;
        struct Done {
          std::atomic<int>& n;
          ~Done() { --n; }
        } done{metrics_.decoding};
        complete(*job, L.sessions[slot]->generate(prompt, job->params, on_step, cancelled, spec));
        return true;
      }
      Active& a = active[&L];
      if (!a.batch) {
        a.loaded = job->loaded;
        a.batch = std::make_unique<DecodeBatch>(*L.model);
      }
      const uint64_t tag = ++job_tags_;
      a.jobs[tag] = job;
      a.batch->add(*L.sessions[slot], prompt, job->params, tag, on_step, cancelled);
      deliver(a);
      if (a.jobs.empty()) active.erase(&L);
    } catch (const std::exception& e) {
      complete(*job, std::nullopt, e.what());
      auto it = active.find(&L);
      if (it != active.end()) {
        for (auto jt = it->second.jobs.begin(); jt != it->second.jobs.end();)
          jt = jt->second == job ? it->second.jobs.erase(jt) : std::next(jt);
        if (it->second.jobs.empty()) active.erase(it);
      }
    }
    return true;
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
      if (draining_) throw ApiError(503, "the server is shutting down", "server_error", "", "server_draining");
      if (!ready_) throw ApiError(503, "the model is still loading", "server_error", "", "model_loading");
      if (metrics_.in_flight > opt_.max_concurrency)
        throw ApiError(429, "the server is busy (" + std::to_string(opt_.max_concurrency) + " requests in flight); retry later",
                       "rate_limit_exceeded", "", "server_busy");
      // The model the request names (unknown: 404), loaded first if it is not (on the scheduler thread: the
      // request waits for it, as for a generation).
      // The memory this request will hold, reserved step by step before each is spent.
      // (Shared: a streamed answer keeps it, with the conversation, until its last byte.)
      auto hold = std::make_shared<RequestMemory::Hold>(request_memory_);
      RequestMemory::Hold& memory = *hold;
      memory.grow(cost::of_body(measure_json(req.body)),
                  "its body of " + std::to_string((req.body.size() + (1 << 20) - 1) >> 20) + " MiB, parsed");
      const json body = parse_request_body(req.body);
      const auto named = body.find("model");
      Served& served = *models_[find_model(named != body.end() && named->is_string() ? named->get<std::string>() : "")];
      std::shared_ptr<Loaded> loaded;
      {
        std::lock_guard<std::mutex> l(models_mu_);
        served.last_request = ++request_clock_;
        loaded = served.loaded;
      }
      if (!loaded) {
        const auto gone = leaving(conn);
        auto got = on_gpu([&] { return ensure_loaded(served); }, gone);
        if (!got) {
          cancelled(nullptr);
          res.status = 499;
          return;
        }
        loaded = *got;
      }
      const ServedModelOptions& spec = served.spec;
      Loaded& L = *loaded;
      RequestLimits limits = request_limits(spec, L);
      limits.reserve = [&memory](uint64_t bytes, const std::string& what) { memory.grow(bytes, what); };
      ChatRequest r = parse_chat_request(body, limits);
      memory.grow(template_text_bytes(r) * cost::per_text_byte + message_items(r) * cost::per_message,
                  "its messages rendered and tokenized");
      Prompt prompt;
      try {
        prompt = L.model->build_prompt(r.messages, r.images, r.template_vars);
      } catch (const ApiError&) {
        throw;
      } catch (const std::exception& e) {
        throw ApiError(400, e.what(), "invalid_request_error", "messages");
      }
      if (int64_t(prompt.ids.size()) >= spec.context_tokens)
        throw ApiError(400,
                       "the prompt is " + std::to_string(prompt.ids.size()) + " tokens, more than the context of " +
                           std::to_string(spec.context_tokens) + " tokens",
                       "invalid_request_error", "messages", "context_length_exceeded");
      Prompt draft_prompt;
      if (L.draft) {
        try {
          draft_prompt = L.draft->build_draft_prompt(r.messages, r.images, r.template_vars);
        } catch (const std::exception& e) {
          throw ApiError(400, std::string("the draft model: ") + e.what(), "invalid_request_error", "messages");
        }
      }
      const std::string id = random_id();
      // The conversation as its generation job needs it, alive until the job ends.
      auto shared = std::make_shared<Prepared>(Prepared{std::move(r), std::move(prompt), std::move(draft_prompt)});
      auto job = std::make_shared<Job>();
      job->loaded = loaded;
      job->spec = &served.spec;
      job->prompt = &shared->prompt;
      job->draft_prompt = &shared->draft_prompt;
      job->params = shared->request.params;
      if (!shared->request.stream) {
        submit(job);
        follow(*job, leaving(conn), {});
        if (!job->error.empty()) throw ApiError(500, job->error, "server_error");
        if (!job->result || job->result->finish_reason == "cancelled") {
          cancelled(job->result ? &*job->result : nullptr);
          res.status = 499;
          return;
        }
        const GenerationResult& g = *job->result;
        record(g);
        res.body = completion_json(id, spec.name, L.model->tokenizer(), L.draft != nullptr, g, shared->request.logprobs)
                       .dump(-1, ' ', false, json::error_handler_t::replace);
        count(200);
        log_request(g, false);
        return;
      }
      // Streaming: the response starts now; generation runs as the body is written.
      res.content_type = "text/event-stream";
      res.headers.push_back({"Cache-Control", "no-cache"});
      res.stream = [this, shared, job, id, admission, hold, loaded, &served](http::Stream& sink) {
        const ServedModelOptions& spec = served.spec;
        Loaded& L = *loaded;
        const ChatRequest& cr = shared->request;
        const int64_t created = now_seconds();
        auto chunk = [&](json delta, json finish, json logprobs) {
          json c = {{"index", 0}, {"delta", std::move(delta)}, {"logprobs", std::move(logprobs)}, {"finish_reason", std::move(finish)}};
          json j = {{"id", id}, {"object", "chat.completion.chunk"}, {"created", created}, {"model", spec.name},
                    {"system_fingerprint", "vkvlm"}, {"choices", json::array({c})}};
          if (cr.include_usage) j["usage"] = nullptr;
          return "data: " + j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
        };
        bool alive = sink.write(chunk({{"role", "assistant"}, {"content", ""}}, nullptr, nullptr));
        if (alive) {
          submit(job);
          follow(*job, leaving(sink), [&](const StepOutput& s) {
            if (!alive || stop_) return false;
            if (s.text.empty() && !cr.logprobs) return !sink.client_gone();
            json lp = nullptr;
            if (cr.logprobs) lp = {{"content", logprob_list(L.model->tokenizer(), {s})}};
            alive = sink.write(chunk({{"content", s.text}}, nullptr, lp));
            return alive;
          });
        }
        if (!job->error.empty()) {
          // Too late for a status code: report in the stream's own error shape and end it.
          sink.write("data: " + error_body(job->error, "server_error", "", "") + "\n\n");
          count(500);
          return;
        }
        const std::optional<GenerationResult>& g = job->result;
        if (!g || g->finish_reason == "cancelled" || !alive) {
          cancelled(g ? &*g : nullptr);
          if (g) log_request(*g, true);
          return;
        }
        record(*g);
        log_request(*g, true);
        sink.write(chunk(json::object(), g->finish_reason, nullptr));
        if (cr.include_usage) {
          json j = {{"id", id}, {"object", "chat.completion.chunk"}, {"created", created}, {"model", spec.name},
                    {"system_fingerprint", "vkvlm"}, {"choices", json::array()}, {"usage", usage(*g, L.draft != nullptr)}};
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
  std::vector<std::unique_ptr<Served>> models_;
  std::mutex models_mu_;  // the models' loaded state, last use and the active one
  size_t active_ = 0;     // the model for requests that name none (models_mu_)
  uint64_t request_clock_ = 0;  // (models_mu_)
  std::atomic<bool> ready_{false}, load_failed_{false}, stop_{false};
  std::atomic<bool> draining_{false};  // SIGTERM came: in-flight requests finish, new ones are refused
  int64_t started_ = 0;
  // The GPU's work queue (queue_mu_), served by the scheduler thread.
  std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool quit_ = false;       // (queue_mu_) the scheduler ends once the queue and batches are empty
  uint64_t job_tags_ = 0;   // (scheduler thread)
  Metrics metrics_;
  RequestMemory request_memory_;
};

}  // namespace

namespace {

// A model the server offers, named by --model NAME=SOURCE, --model SOURCE (the repo id or the
// folder's name), or a --config entry; SOURCE a folder or ORG/NAME[@REVISION].
ServedModelOptions served_model(const std::string& name, const std::string& source, const Options& defaults) {
  ServedModelOptions m;
  m.dir = resolve_model(source);
  m.name = name;
  if (m.name.empty() && m.dir != source) m.name = source;  // a repo id: clients see it
  if (m.name.empty()) m.name = fs::path(m.dir).filename().string();
  if (m.name.empty()) m.name = fs::path(m.dir).parent_path().filename().string();  // "DIR/"
  m.context_tokens = defaults.context_tokens;
  m.rotating = defaults.rotating;
  m.kv_format = defaults.kv_format;
  m.load = defaults.load;
  return m;
}

// --config FILE: {"models": [{"name", "model", "ctx" | "max_kv_size", "quantize", "draft_model",
// "kv_bits", "kv_group_size", "quantized_kv_start", "prompt_cache"}...], "active_model",
// "max_loaded"}; the command line's flags are the defaults of every model.
void read_config(const std::string& path, Options& o) {
  json j;
  try {
    j = parse_json<json>(read_file_bounded(path, 1 << 20, "server config"));
  } catch (const json::exception& e) {
    fail("server config ", path, " is not valid JSON: ", e.what());
  }
  auto where = [&](const std::string& what) { return "server config " + path + ": " + what; };
  if (!j.is_object()) fail(where("must be a JSON object"));
  for (const auto& [k, v] : j.items())
    if (k != "models" && k != "active_model" && k != "max_loaded")
      fail(where("unknown key '" + k + "' (models, active_model, max_loaded)"));
  if (!j.contains("models") || !j["models"].is_array() || j["models"].empty())
    fail(where("needs \"models\": a list of {\"name\", \"model\", ...}"));
  auto text = [&](const json& m, const char* key, const std::string& at) -> std::string {
    if (!m.contains(key)) return "";
    if (!m[key].is_string() || m[key].get<std::string>().empty()) fail(where(at + "." + key + " must be a non-empty string"));
    return m[key].get<std::string>();
  };
  auto integer = [&](const json& m, const char* key, const std::string& at, int64_t lo, int64_t hi) -> int64_t {
    if (!m[key].is_number_integer() || m[key].get<int64_t>() < lo || m[key].get<int64_t>() > hi)
      fail(where(at + "." + key + " must be a whole number from " + std::to_string(lo) + " to " + std::to_string(hi)));
    return m[key].get<int64_t>();
  };
  for (size_t i = 0; i < j["models"].size(); ++i) {
    const json& m = j["models"][i];
    const std::string at = "models[" + std::to_string(i) + "]";
    if (!m.is_object()) fail(where(at + " must be an object"));
    static const std::set<std::string> keys = {"name", "model", "ctx", "max_kv_size", "quantize", "draft_model", "kv_bits",
                                               "kv_group_size", "quantized_kv_start", "prompt_cache"};
    for (const auto& [k, v] : m.items())
      if (!keys.count(k)) fail(where(at + " has an unknown key '" + k + "'"));
    const std::string source = text(m, "model", at);
    if (source.empty()) fail(where(at + " needs \"model\": a folder or ORG/NAME"));
    ServedModelOptions s = served_model(text(m, "name", at), source, o);
    if (m.contains("ctx") && m.contains("max_kv_size")) fail(where(at + ": give ctx or max_kv_size, not both"));
    if (m.contains("ctx")) s.context_tokens = integer(m, "ctx", at, 16, int64_t(1) << 24), s.rotating = false;
    if (m.contains("max_kv_size")) s.context_tokens = integer(m, "max_kv_size", at, 16, int64_t(1) << 24), s.rotating = true;
    if (m.contains("quantize")) {
      s.load.quantize = text(m, "quantize", at);
      if (s.load.quantize != "q4" && s.load.quantize != "q8") fail(where(at + ".quantize must be \"q4\" or \"q8\""));
    }
    if (m.contains("kv_bits")) {
      s.kv_format.bits = int(integer(m, "kv_bits", at, 4, 16));
      if (s.kv_format.bits != 4 && s.kv_format.bits != 8 && s.kv_format.bits != 16) fail(where(at + ".kv_bits must be 4, 8 or 16"));
    }
    if (m.contains("kv_group_size")) s.kv_format.group_size = int(integer(m, "kv_group_size", at, 32, 128));
    if (m.contains("quantized_kv_start")) s.kv_format.quantized_start = integer(m, "quantized_kv_start", at, 0, int64_t(1) << 24);
    if (m.contains("draft_model")) s.draft_model_dir = resolve_model(text(m, "draft_model", at));
    s.prompt_cache = text(m, "prompt_cache", at);
    o.models.push_back(s);
  }
  if (j.contains("active_model")) {
    if (!j["active_model"].is_string()) fail(where("active_model must be a model's name"));
    o.active_model = j["active_model"].get<std::string>();
  }
  if (j.contains("max_loaded")) {
    if (!j["max_loaded"].is_number_integer() || j["max_loaded"].get<int64_t>() < 0 || j["max_loaded"].get<int64_t>() > 64)
      fail(where("max_loaded must be a whole number from 0 (no limit) to 64"));
    o.max_loaded = int(j["max_loaded"].get<int64_t>());
  }
}

}  // namespace

int run_serve(int argc, char** argv, int first) {
  Flags f(argc, argv, first,
          {{"model", true}, {"model-name", true}, {"host", true}, {"port", true}, {"api-key", true}, {"max-concurrency", true},
           {"ctx", true}, {"kv-slots", true}, {"allow-local-files", true}, {"max-images", true}, {"max-body-mb", true},
           {"quantize", true}, {"metrics-public", false}, {"request-timeout", true}, {"draft-model", true},
           {"num-draft-tokens", true}, {"lookup-ngram", true}, {"prompt-cache", true},
           {"max-kv-size", true}, {"kv-bits", true}, {"kv-group-size", true}, {"quantized-kv-start", true},
           {"config", true}, {"max-loaded", true}, {"active-model", true}, {"parallel", true},
           {"max-request-memory", true}, {"max-messages", true}, {"max-parts", true}, {"cors-origin", true},
           {"drain-timeout", true}});
  Options o;
  o.host = f.str("host", "127.0.0.1");
  o.port = int(f.integer("port", 8080, 1, 65535));
  o.api_key = f.str("api-key");
  o.max_concurrency = int(f.integer("max-concurrency", 16, 1, 1024));
  o.context_tokens = f.integer("ctx", 4096, 16, int64_t(1) << 24);
  if (f.has("max-kv-size")) {
    if (f.has("ctx")) throw UsageError("give --ctx or --max-kv-size, not both");
    o.context_tokens = f.integer("max-kv-size", 0, 16, int64_t(1) << 24);
    o.rotating = true;
  }
  o.kv_format = kv_format(f);
  o.parallel = int(f.integer("parallel", 1, 1, 64));
  // Every conversation decoding at once needs its slot: at least --parallel of them.
  o.kv_slots = std::max(o.parallel, int(f.integer("kv-slots", 1, 1, 64)));
  o.allow_local_files = f.str("allow-local-files");
  o.max_images = int(f.integer("max-images", 8, 0, 256));
  o.max_messages = int(f.integer("max-messages", 10000, 1, 1000000));
  o.max_parts = int(f.integer("max-parts", 10000, 1, 1000000));
  o.max_request_memory = uint64_t(f.integer("max-request-memory", 0, 16, int64_t(1) << 30)) << 20;
  {
    const uint64_t budget = o.max_request_memory ? o.max_request_memory : default_request_memory();
    if (o.max_body_bytes + (1 << 20) > budget)
      throw UsageError("--max-body-mb " + std::to_string(o.max_body_bytes >> 20) + " does not fit in the request memory of " +
                       std::to_string(budget >> 20) + " MiB (--max-request-memory): a body must fit with room to spare");
  }
  o.max_body_bytes = size_t(f.integer("max-body-mb", 64, 1, 4096)) << 20;
  o.metrics_public = f.has("metrics-public");
  o.cors_origin = f.str("cors-origin");
  if (o.cors_origin.find_first_of("\r\n") != std::string::npos) throw UsageError("--cors-origin takes one origin or *");
  o.request_seconds = double(f.integer("request-timeout", 30, 1, 3600));
  o.drain_seconds = double(f.integer("drain-timeout", 30, 0, 3600));
  o.num_draft_tokens = int(f.integer("num-draft-tokens", 3, 1, 16));
  o.lookup_ngram = int(f.integer("lookup-ngram", 0, 0, 16));
  o.load.quantize = f.str("quantize");
  if (!o.load.quantize.empty() && o.load.quantize != "q4" && o.load.quantize != "q8")
    throw UsageError("--quantize takes q4 or q8, not '" + o.load.quantize + "'");
  o.max_loaded = int(f.integer("max-loaded", 0, 0, 64));
  const std::vector<std::string> models = f.all("model");
  if (models.size() > 1 || f.has("config")) {
    // Several models: each --model NAME=SOURCE (or SOURCE), then the config's.
    if (f.has("model-name") || f.has("draft-model") || f.has("prompt-cache"))
      throw UsageError("with several models, give names as --model NAME=SOURCE and draft models and prompt caches in --config");
    for (const auto& m : models) {
      const size_t eq = m.find('=');
      const bool named = eq != std::string::npos && m.substr(0, eq).find('/') == std::string::npos;
      o.models.push_back(served_model(named ? m.substr(0, eq) : "", named ? m.substr(eq + 1) : m, o));
    }
    if (f.has("config")) read_config(f.str("config"), o);
    if (f.has("active-model")) o.active_model = f.str("active-model");
  } else {
    if (f.has("active-model") || f.has("max-loaded")) throw UsageError("--active-model and --max-loaded go with several models");
    // One model: a folder, or a repo id found in (or downloaded into) the Hugging Face cache.
    ServedModelOptions m = served_model(f.str("model-name"), f.has("model") ? f.str("model") : default_model_dir(), o);
    m.draft_model_dir = f.has("draft-model") ? resolve_model(f.str("draft-model")) : "";
    m.prompt_cache = f.str("prompt-cache");
    o.models.push_back(m);
  }
  for (const auto& m : o.models)
    if (!m.draft_model_dir.empty() && o.lookup_ngram) throw UsageError("give --draft-model or --lookup-ngram, not both");
  Server s(o);
  return s.run();
}

}  // namespace vkvlm::server
