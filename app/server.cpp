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

#include "app/chat_request.h"
#include "app/flags.h"
#include "app/http.h"
#include "base/files.h"
#include "gpu/device.h"
#include "gpu/error.h"
#include "host/hub_cache.h"
#include "host/image.h"
#include "models/model.h"

namespace vkvlm::server {
namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace {

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
  uint64_t draft_tokens = 0, accepted_tokens = 0;  // speculative decoding
  double prefill_tps = 0, decode_tps = 0;
  std::atomic<int> in_flight{0}, queued{0};
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
    draft_sessions_.clear();
    sessions_.clear();
    draft_model_.reset();
    model_.reset();
    return 0;
  }

 private:
  void load() {
    try {
      ctx_ = std::make_unique<gpu::Context>(gpu::Device::create());
      model_ = std::make_unique<Model>(*ctx_, opt_.model_dir, opt_.load);
      for (int i = 0; i < opt_.kv_slots; ++i)
        sessions_.push_back(std::make_unique<Session>(*model_, opt_.context_tokens, opt_.rotating, opt_.kv_format));
      if (!opt_.prompt_cache.empty()) {
        for (auto& s : sessions_) s->load_prompt_cache(opt_.prompt_cache);
        cache_keys_ = sessions_[0]->cached_keys();
        std::fprintf(stderr, "vkvlm serve: prompt cache %s: %zu tokens\n", opt_.prompt_cache.c_str(), cache_keys_.size());
      }
      if (!opt_.draft_model_dir.empty()) {
        draft_model_ = std::make_unique<Model>(*ctx_, opt_.draft_model_dir, opt_.load);
        check_draft_model(*model_, *draft_model_);
        for (int i = 0; i < opt_.kv_slots; ++i)
          draft_sessions_.push_back(std::make_unique<Session>(*draft_model_, opt_.context_tokens));
      }
      last_used_.assign(sessions_.size(), 0);
      for (auto& s : sessions_) kv_bytes_ += s->kv_bytes();
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
    os << "# HELP vkvlm_draft_tokens_total Tokens proposed by speculative decoding (draft model or prompt lookup).\n"
       << "# TYPE vkvlm_draft_tokens_total counter\nvkvlm_draft_tokens_total " << metrics_.draft_tokens << "\n";
    os << "# HELP vkvlm_accepted_draft_tokens_total Proposed tokens the model accepted.\n"
       << "# TYPE vkvlm_accepted_draft_tokens_total counter\nvkvlm_accepted_draft_tokens_total " << metrics_.accepted_tokens
       << "\n";
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
       << "# TYPE vkvlm_kv_cache_bytes gauge\nvkvlm_kv_cache_bytes{format=\"" << opt_.kv_format.describe() << "\"} "
       << kv_bytes_.load() << "\n";
    return os.str();
  }

  RequestLimits request_limits() const {
    RequestLimits l;
    l.max_images = opt_.max_images;
    // A rotating cache answers past its rows: max_tokens may reach four times them.
    l.context_tokens = opt_.rotating ? 4 * opt_.context_tokens : opt_.context_tokens;
    l.local_root = local_root_;
    l.num_draft_tokens = opt_.num_draft_tokens;
    l.lookup_ngram = opt_.lookup_ngram;
    l.has_draft_model = draft_model_ != nullptr;
    return l;
  }

  // A session for the prompt: the slot this prompt continues (it shares at least half of the
  // slot's cached tokens, the longest such share winning), else the least recently used slot, so
  // a shared preamble like "USER:" does not make conversations evict each other.
  size_t pick_slot(const Prompt& prompt) {
    size_t best = sessions_.size(), best_len = 0;
    for (size_t i = 0; i < sessions_.size(); ++i) {
      const auto& keys = sessions_[i]->cached_keys();
      const size_t n = shared_prefix(keys, prompt.keys);
      if (!keys.empty() && 2 * n >= keys.size() && n > best_len) {
        best = i;
        best_len = n;
      }
    }
    if (best == sessions_.size())
      best = size_t(std::min_element(last_used_.begin(), last_used_.end()) - last_used_.begin());
    last_used_[best] = ++use_clock_;
    return best;
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
    json u = {{"prompt_tokens", r.prompt_tokens.size()},
              {"completion_tokens", r.tokens.size()},
              {"total_tokens", r.prompt_tokens.size() + r.tokens.size()},
              {"prompt_tokens_details", {{"cached_tokens", r.cached_tokens}}}};
    if (draft_model_ || r.draft_tokens) {  // an extension: how speculative decoding went
      u["draft_tokens"] = r.draft_tokens;
      u["accepted_tokens"] = r.accepted_tokens;
    }
    return u;
  }

  // Generates on the slot the prompt continues, with the draft model's session of that slot
  // when there is one.
  GenerationResult run_on_slot(const Prompt& prompt, const Prompt& draft_prompt, const GenerationParams& params,
                               const std::function<bool(const StepOutput&)>& on_step, const std::function<bool()>& gone) {
    const size_t slot = pick_slot(prompt);
    // A conversation that starts like the prompt cache, on a slot that holds less of it, gets
    // the cached rows back before it runs.
    if (!cache_keys_.empty() && shared_prefix(cache_keys_, prompt.keys) > shared_prefix(sessions_[slot]->cached_keys(), prompt.keys)) {
      sessions_[slot]->load_prompt_cache(opt_.prompt_cache);
      if (draft_model_) draft_sessions_[slot]->reset();
    }
    Speculation spec;
    if (draft_model_) spec = {draft_sessions_[slot].get(), &draft_prompt};
    return sessions_[slot]->generate(prompt, params, on_step, gone, spec);
  }

  void record(const GenerationResult& r) {
    std::lock_guard<std::mutex> l(metrics_.m);
    metrics_.prompt_tokens += r.prompt_tokens.size();
    metrics_.completion_tokens += r.tokens.size();
    metrics_.cached_tokens += uint64_t(r.cached_tokens);
    metrics_.draft_tokens += uint64_t(r.draft_tokens);
    metrics_.accepted_tokens += uint64_t(r.accepted_tokens);
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
      ChatRequest r = parse_chat_request(req.body, request_limits());
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
      Prompt draft_prompt;
      if (draft_model_) {
        try {
          draft_prompt = draft_model_->build_draft_prompt(r.messages, r.images, r.template_vars);
        } catch (const std::exception& e) {
          throw ApiError(400, std::string("the draft model: ") + e.what(), "invalid_request_error", "messages");
        }
      }
      const std::string id = random_id();
      if (!r.stream) {
        const auto gone = leaving(conn);
        auto g = on_gpu([&] {
          return run_on_slot(prompt, draft_prompt, r.params, [&](const StepOutput&) { return !gone(); }, gone);
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
      auto shared = std::make_shared<Prepared>(Prepared{std::move(r), std::move(prompt), std::move(draft_prompt)});
      res.content_type = "text/event-stream";
      res.headers.push_back({"Cache-Control", "no-cache"});
      res.stream = [this, shared, id, admission](http::Stream& sink) {
        const ChatRequest& cr = shared->request;
        const Prompt& pr = shared->prompt;
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
            return run_on_slot(pr, shared->draft_prompt, cr.params, [&](const StepOutput& s) {
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
  std::unique_ptr<Model> draft_model_;                     // --draft-model, if any
  std::vector<std::unique_ptr<Session>> draft_sessions_;   // one per slot, beside sessions_
  std::vector<uint64_t> cache_keys_;  // the prompt cache's rows (empty: none)
  std::vector<uint64_t> last_used_;  // per slot, for least-recently-used eviction (under the GPU turn)
  uint64_t use_clock_ = 0;
  std::atomic<bool> ready_{false}, load_failed_{false}, stop_{false};
  std::atomic<uint64_t> kv_bytes_{0};  // of all slots, once loaded
  int64_t started_ = 0;
  FifoTurns turns_;
  Metrics metrics_;
};

}  // namespace

int run_serve(int argc, char** argv, int first) {
  Flags f(argc, argv, first,
          {{"model", true}, {"model-name", true}, {"host", true}, {"port", true}, {"api-key", true}, {"max-concurrency", true},
           {"ctx", true}, {"kv-slots", true}, {"allow-local-files", true}, {"max-images", true}, {"max-body-mb", true},
           {"quantize", true}, {"metrics-public", false}, {"request-timeout", true}, {"draft-model", true},
           {"num-draft-tokens", true}, {"lookup-ngram", true}, {"prompt-cache", true},
           {"max-kv-size", true}, {"kv-bits", true}, {"kv-group-size", true}, {"quantized-kv-start", true}});
  Options o;
  // A folder, or a repo id found in the Hugging Face cache: then clients see the repo id.
  o.model_dir = f.has("model") ? resolve_model_folder(f.str("model")) : default_model_dir();
  o.model_name = f.str("model-name");
  if (o.model_name.empty() && f.has("model") && o.model_dir != f.str("model")) o.model_name = f.str("model");
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
  o.kv_slots = int(f.integer("kv-slots", 1, 1, 64));
  o.allow_local_files = f.str("allow-local-files");
  o.max_images = int(f.integer("max-images", 8, 0, 256));
  o.max_body_bytes = size_t(f.integer("max-body-mb", 64, 1, 4096)) << 20;
  o.metrics_public = f.has("metrics-public");
  o.request_seconds = double(f.integer("request-timeout", 30, 1, 3600));
  o.draft_model_dir = f.has("draft-model") ? resolve_model_folder(f.str("draft-model")) : "";
  o.prompt_cache = f.str("prompt-cache");
  o.num_draft_tokens = int(f.integer("num-draft-tokens", 3, 1, 16));
  o.lookup_ngram = int(f.integer("lookup-ngram", 0, 0, 16));
  if (!o.draft_model_dir.empty() && o.lookup_ngram) throw UsageError("give --draft-model or --lookup-ngram, not both");
  o.load.quantize = f.str("quantize");
  if (!o.load.quantize.empty() && o.load.quantize != "q4" && o.load.quantize != "q8")
    throw UsageError("--quantize takes q4 or q8, not '" + o.load.quantize + "'");
  std::error_code ec;
  if (!fs::is_directory(o.model_dir, ec)) throw Error("model folder " + o.model_dir + " does not exist");
  Server s(o);
  return s.run();
}

}  // namespace vkvlm::server
