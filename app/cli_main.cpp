// The vkvlm command line: generate, chat, tokenize, render-template, info, devices, serve.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <csignal>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/json.h"
#include "gpu/context.h"
#include "gpu/device.h"
#include "gpu/error.h"
#include "app/batch_line.h"
#include "app/conversation.h"
#include "base/files.h"
#include "app/flags.h"
#include "models/arch/known_models.h"
#include "host/chat_template.h"
#include "host/hub_cache.h"
#include "host/hub_download.h"
#include "host/image.h"
#include "host/jinja.h"
#include "app/server.h"
#include "vkvlm/vkvlm.h"
#include "host/tokenizer.h"
#include "models/batch.h"
#include "models/session.h"

namespace fs = std::filesystem;
using namespace vkvlm;

namespace {

// --model: a folder or a Hugging Face repo id in the local cache; without it, the demo model.
std::string model_folder(const Flags& f) { return f.has("model") ? resolve_model(f.str("model")) : default_model_dir(); }

std::unique_ptr<gpu::Context> make_context() { return std::make_unique<gpu::Context>(gpu::Device::create()); }

std::string read_file(const std::string& path, const char* what) { return read_file_bounded(path, uint64_t(64) << 20, what); }

// A JSON file, key order kept (tojson in a template shows it).
Messages read_json_file(const std::string& path, const char* what) {
  try {
    return parse_json<Messages>(read_file(path, what));
  } catch (const nlohmann::json::exception& e) {
    throw Error(std::string(what) + " " + path + " is not valid JSON: " + e.what());
  }
}

// --messages FILE: a non-empty array of {"role": ..., "content": ...}.
Messages read_messages_file(const std::string& path) {
  Messages messages = read_json_file(path, "messages file");
  check_messages(messages, "messages file " + path);
  return messages;
}

// A conversation and its images: one user turn of `prompt` after an image part per path, or
// `from`, whose {"type": "image"} parts and the image placeholders its text holds
// (Phi-3-Vision's documented "<|image_1|>\nWhat is shown?") take the paths' images in order;
// image_url parts carry their own image. `paths_from` names the paths in a count error.
void make_conversation(const ModelConfig& cfg, const std::optional<std::string>& prompt, Messages from,
                       const std::vector<std::string>& image_paths, const std::string& paths_from, Messages& messages,
                       std::vector<Image>& images) {
  if (prompt) {
    Messages content = Messages::array();
    for (auto& p : image_paths) {
      images.push_back(load_image_file(p));
      content.push_back({{"type", "image"}});
    }
    content.push_back({{"type", "text"}, {"text", *prompt}});
    messages = Messages::array({Messages{{"role", "user"}, {"content", content}}});
    return;
  }
  messages = std::move(from);
  const auto slots = image_slots(cfg, messages);
  const std::string why = check_supplied_images(slots, image_paths.size(), paths_from);
  if (!why.empty()) throw Error(why);
  std::vector<Image> files;
  for (auto& p : image_paths) files.push_back(load_image_file(p));
  images = conversation_images(slots, std::move(files), /*allow_files=*/true);
}

// Messages and their images from --messages FILE / --prompt TEXT and --image PATHs.
void load_conversation(const Flags& f, const ModelConfig& cfg, Messages& messages, std::vector<Image>& images) {
  if (f.has("messages") == f.has("prompt")) throw UsageError("give exactly one of --prompt TEXT and --messages FILE");
  if (f.has("prompt")) make_conversation(cfg, f.str("prompt"), nullptr, f.all("image"), "--image gave", messages, images);
  else make_conversation(cfg, std::nullopt, read_messages_file(f.str("messages")), f.all("image"), "--image gave", messages, images);
}

// --chat-template-kwargs '{"add_vision_id": true}': extra variables for the chat template.
nlohmann::json template_vars(const Flags& f) {
  if (!f.has("chat-template-kwargs")) return nullptr;
  nlohmann::json j;
  try {
    j = parse_json(f.str("chat-template-kwargs"));
  } catch (const nlohmann::json::exception& e) {
    throw UsageError(std::string("--chat-template-kwargs is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw UsageError("--chat-template-kwargs takes a JSON object, e.g. '{\"add_vision_id\": true}'");
  return j;
}

GenerationParams generation_params(const Flags& f) {
  GenerationParams p;
  p.max_tokens = int(f.integer("max-tokens", 256, 0, 1 << 24));
  p.sampling.temperature = float(f.number("temp", 0.0, 0.0, 100.0));
  p.sampling.top_p = float(f.number("top-p", 1.0, 1e-9, 1.0));
  p.sampling.top_k = int(f.integer("top-k", 0, 0, 1 << 24));
  p.sampling.min_p = float(f.number("min-p", 0.0, 0.0, 1.0));
  p.sampling.repeat_penalty = float(f.number("repeat-penalty", 1.0, 1e-6, 100.0));
  if (f.has("seed")) {
    p.sampling.seed = uint64_t(f.integer("seed", 0, 0, INT64_MAX));
    p.sampling.has_seed = true;
  }
  p.top_logits = int(f.integer("top-logits", 0, 0, 64));
  p.stop = f.all("stop");
  p.ignore_eos = f.has("ignore-eos");
  p.num_draft_tokens = int(f.integer("num-draft-tokens", 3, 1, 16));
  p.lookup_ngram = int(f.integer("lookup-ngram", 0, 0, 16));
  if (f.has("draft-model") && p.lookup_ngram) throw UsageError("give --draft-model or --lookup-ngram, not both");
  return p;
}

LoadOptions load_options(const Flags& f) {
  LoadOptions o;
  o.quantize = f.str("quantize");
  if (!o.quantize.empty() && o.quantize != "q4" && o.quantize != "q8")
    throw UsageError("--quantize takes q4 or q8, not '" + o.quantize + "'");
  o.progress = true;
  return o;
}

// --draft-model DIR: the draft model and a session of it (its own KV cache) beside the model's.
struct DraftModel {
  std::unique_ptr<Model> model;
  std::unique_ptr<Session> session;
};
DraftModel load_draft(const Flags& f, gpu::Context& ctx, const Model& target, int64_t context_tokens) {
  DraftModel d;
  if (!f.has("draft-model")) return d;
  d.model = std::make_unique<Model>(ctx, resolve_model(f.str("draft-model")), load_options(f));
  check_draft_model(target, *d.model);
  d.session = std::make_unique<Session>(*d.model, context_tokens);
  return d;
}

// The context: --ctx, or enough for this prompt and its answer (at least 4096 when the model
// allows). Past the model's max_position_embeddings works as in the reference, with a warning.
int64_t context_for(const Flags& f, const Model& m, int64_t prompt_tokens, int max_tokens) {
  // --max-kv-size N: a rotating cache of N rows (generation goes on past them).
  if (f.has("max-kv-size")) {
    if (f.has("ctx")) throw UsageError("give --ctx or --max-kv-size, not both");
    return f.integer("max-kv-size", 0, Session::kRotatingKeep + 2, int64_t(1) << 24);
  }
  const int64_t max_pos = m.config().text.max_position;
  const int64_t ctx = f.has("ctx") ? f.integer("ctx", 0, 2, int64_t(1) << 24)
                                   : std::max<int64_t>(std::min<int64_t>(4096, max_pos), prompt_tokens + max_tokens + 1);
  if (ctx > max_pos)
    std::fprintf(stderr, "vkvlm: warning: a context of %lld tokens is longer than the %lld positions the model was trained for\n",
                 (long long)ctx, (long long)max_pos);
  return ctx;
}

const std::map<std::string, bool> k_generate_flags = {
    {"model", true}, {"prompt", true}, {"messages", true}, {"image", true}, {"max-tokens", true}, {"temp", true},
    {"top-p", true}, {"top-k", true}, {"min-p", true}, {"repeat-penalty", true}, {"seed", true}, {"ctx", true},
    {"quantize", true}, {"json", false}, {"top-logits", true}, {"stop", true}, {"ignore-eos", false}, {"verbose", false},
    {"chat-template-kwargs", true}, {"draft-model", true}, {"num-draft-tokens", true}, {"lookup-ngram", true},
    {"prompt-cache", true}, {"max-kv-size", true}, {"kv-bits", true}, {"kv-group-size", true},
    {"quantized-kv-start", true}};

// --prompt-cache FILE: the session starts from the file's rows (vkvlm cache-prompt).
int64_t load_prompt_cache(const Flags& f, Session& session) {
  if (!f.has("prompt-cache")) return 0;
  return session.load_prompt_cache(f.str("prompt-cache")).rows;
}

// Says so when a prompt continued only part of a prompt cache (the rest was recomputed).
void report_cache_use(int64_t cache_rows, const GenerationResult& r) {
  if (cache_rows > 0 && r.cached_tokens < std::min<int64_t>(cache_rows, int64_t(r.prompt_tokens.size()) - 1))
    std::fprintf(stderr,
                 "vkvlm: the prompt shares only %lld of the prompt cache's %lld tokens; the rest of the prompt was computed\n",
                 (long long)r.cached_tokens, (long long)cache_rows);
}

// The model and the conversation that generate and cache-prompt take from their flags (the
// context first, so that it outlives the model).
struct ModelAndConversation {
  nlohmann::json vars;
  Messages messages;
  std::vector<Image> images;
  std::unique_ptr<gpu::Context> ctx;
  std::unique_ptr<Model> model;
};
ModelAndConversation load_model_and_conversation(const Flags& f) {
  ModelAndConversation m;
  const std::string dir = model_folder(f);
  m.vars = template_vars(f);
  load_conversation(f, load_model_config(dir), m.messages, m.images);
  m.ctx = make_context();
  m.model = std::make_unique<Model>(*m.ctx, dir, load_options(f));
  return m;
}

// A generation as `generate --json` prints it (and `generate --batch`, one line per prompt).
nlohmann::ordered_json result_json(const GenerationResult& r, const Session& session, bool rotating, bool speculative,
                                   int top_logits) {
  nlohmann::ordered_json j;
  j["prompt_tokens"] = r.prompt_tokens;
  j["tokens"] = r.tokens;
  j["text"] = r.text;
  j["finish_reason"] = r.finish_reason;
  if (speculative) {
    j["draft_tokens"] = r.draft_tokens;
    j["accepted_tokens"] = r.accepted_tokens;
  }
  j["kv_cache"] = {{"format", session.kv_format().describe()},
                   {"rows", session.context_tokens()},
                   {"bytes", session.kv_bytes()},
                   {"rotating", rotating}};
  j["timings"] = {{"prompt_tokens", r.prompt_tokens.size()},
                  {"cached_prompt_tokens", r.cached_tokens},
                  {"computed_prompt_tokens", r.prefill_tokens},
                  {"image_seconds", r.image_seconds},
                  {"prefill_seconds", r.prefill_seconds},
                  {"prefill_tokens_per_second", r.prefill_tokens_per_second()},
                  {"decode_seconds", r.decode_seconds},
                  {"decode_tokens_per_second", r.decode_tokens_per_second()}};
  if (top_logits) {
    auto steps = nlohmann::ordered_json::array();
    for (auto& s : r.steps) {
      auto pairs = nlohmann::ordered_json::array();
      for (auto& [id, v] : s.top_logits) pairs.push_back({id, v});
      steps.push_back(pairs);
    }
    j["top_logits"] = steps;
  }
  return j;
}

// vkvlm generate --batch FILE.jsonl: one prompt per line, {"prompt": TEXT, "images": [PATH...]}
// or {"messages": [...], "images": [...]} with optional "id", "max_tokens", "temperature",
// "top_p", "top_k", "min_p", "seed", "stop" (the command line's flags are the defaults). The
// prompts decode together, --parallel at a time (as mlx-lm's batch_generate), each on a fresh
// KV cache; one JSON line per prompt, in the file's order, as `generate --json` prints it alone.
int generate_batch(const Flags& f) {
  for (const char* alone : {"prompt", "messages", "image", "draft-model", "lookup-ngram", "prompt-cache"})
    if (f.has(alone))
      throw UsageError(std::string("--batch takes its prompts and images from the file; --") + alone +
                       " does not go with it (speculative decoding and prompt caches run one prompt at a time)");
  const std::string path = f.str("batch");
  const GenerationParams defaults = generation_params(f);
  const int parallel = int(f.integer("parallel", 8, 1, 64));
  const std::string dir = model_folder(f);
  const nlohmann::json vars = template_vars(f);
  auto ctx = make_context();
  Model model(*ctx, dir, load_options(f));

  struct Item {
    nlohmann::ordered_json id;
    Prompt prompt;
    GenerationParams params;
  };
  std::vector<Item> items;
  std::istringstream lines(read_file(path, "batch file"));
  std::string line;
  for (int n = 1; std::getline(lines, line); ++n) {
    if (batch_line_blank(line)) continue;
    const std::string where = "--batch " + path + " line " + std::to_string(n) + ": ";
    try {
      BatchLine b = parse_batch_line(line, defaults);
      Messages messages;
      std::vector<Image> images;
      make_conversation(model.config(), b.prompt, std::move(b.messages), b.images, "\"images\" gave", messages, images);
      Item it;
      it.id = std::move(b.id);
      it.params = b.params;
      it.prompt = model.build_prompt(messages, images, vars);
      items.push_back(std::move(it));
    } catch (const std::exception& e) {
      throw Error(where + e.what());
    }
  }
  if (items.empty()) throw Error("--batch " + path + " holds no prompts");

  // Every session holds the longest prompt and its answer (or --ctx / --max-kv-size rows).
  int64_t longest = 0, most = 0;
  for (const auto& it : items) {
    longest = std::max(longest, it.prompt.size());
    most = std::max<int64_t>(most, it.params.max_tokens);
  }
  const int64_t context_tokens = context_for(f, model, longest, int(most));
  const bool rotating = f.has("max-kv-size");
  std::vector<std::unique_ptr<Session>> sessions;
  for (size_t i = 0; i < std::min(items.size(), size_t(parallel)); ++i)
    sessions.push_back(std::make_unique<Session>(model, context_tokens, rotating, kv_format(f)));

  DecodeBatch batch(model);
  std::vector<std::optional<nlohmann::ordered_json>> out(items.size());
  std::vector<const Session*> session_of(items.size(), nullptr);
  size_t next = 0, printed = 0;
  auto collect = [&] {
    for (auto& done : batch.take_finished()) {
      nlohmann::ordered_json j;
      j["index"] = done.tag;
      if (!items[done.tag].id.is_null()) j["id"] = items[done.tag].id;
      const auto r = result_json(done.result, *session_of[done.tag], rotating, false, items[done.tag].params.top_logits);
      for (auto& [k, v] : r.items()) j[k] = v;
      out[done.tag] = std::move(j);
    }
    // In the file's order, as soon as the answers before are out.
    for (; printed < out.size() && out[printed]; ++printed) {
      std::printf("%s\n", out[printed]->dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
      std::fflush(stdout);
      out[printed].reset();
    }
  };
  while (printed < items.size()) {
    for (auto& s : sessions) {
      if (next == items.size() || batch.holds(*s)) continue;
      s->reset();  // each prompt from scratch, as it runs alone
      session_of[next] = s.get();
      batch.add(*s, items[next].prompt, items[next].params, next);
      ++next;
    }
    batch.step();
    collect();
  }
  return 0;
}

int cmd_generate(int argc, char** argv) {
  auto flags = k_generate_flags;
  flags["batch"] = true;
  flags["parallel"] = true;
  Flags f(argc, argv, 2, flags);
  if (f.has("batch")) return generate_batch(f);
  if (f.has("parallel")) throw UsageError("--parallel goes with --batch");
  GenerationParams params = generation_params(f);
  ModelAndConversation mc = load_model_and_conversation(f);
  const nlohmann::json& vars = mc.vars;
  const Messages& messages = mc.messages;
  const std::vector<Image>& images = mc.images;
  auto& ctx = mc.ctx;
  Model& model = *mc.model;
  Prompt prompt = model.build_prompt(messages, images, vars);
  const int64_t context_tokens = context_for(f, model, int64_t(prompt.ids.size()), params.max_tokens);
  Session session(model, context_tokens, f.has("max-kv-size"), kv_format(f));
  const int64_t cache_rows = load_prompt_cache(f, session);
  DraftModel draft = load_draft(f, *ctx, model, context_tokens);
  Prompt draft_prompt;
  Speculation spec;
  if (draft.model) {
    draft_prompt = draft.model->build_draft_prompt(messages, images, vars);
    spec = {draft.session.get(), &draft_prompt};
  }
  const bool json = f.has("json");
  auto on_step = [&](const StepOutput& s) {
    if (!json && !s.text.empty()) {
      std::fwrite(s.text.data(), 1, s.text.size(), stdout);
      std::fflush(stdout);
    }
    return true;
  };
  GenerationResult r = session.generate(prompt, params, on_step, {}, spec);
  report_cache_use(cache_rows, r);
  if (json) {
    const auto j = result_json(r, session, f.has("max-kv-size"), spec.draft || params.lookup_ngram, params.top_logits);
    std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::printf("\n");
    if (f.has("verbose"))
      std::fprintf(stderr, "prompt %zu tokens (%.1f tok/s), generated %zu tokens (%.1f tok/s), finish: %s\n",
                   r.prompt_tokens.size(), r.prefill_tokens_per_second(), r.tokens.size(), r.decode_tokens_per_second(), r.finish_reason.c_str());
  }
  return 0;
}

// vkvlm cache-prompt: computes a conversation's KV cache once and writes it to a file that
// generate, chat and serve continue from (--prompt-cache).
int cmd_cache_prompt(int argc, char** argv) {
  Flags f(argc, argv, 2,
          {{"model", true}, {"prompt", true}, {"messages", true}, {"image", true}, {"out", true}, {"ctx", true},
           {"quantize", true}, {"chat-template-kwargs", true}, {"kv-bits", true}, {"kv-group-size", true},
           {"quantized-kv-start", true}});
  if (!f.has("out")) throw UsageError("cache-prompt needs --out FILE");
  ModelAndConversation mc = load_model_and_conversation(f);
  Model& model = *mc.model;
  const nlohmann::json& vars = mc.vars;
  const Messages& messages = mc.messages;
  const Prompt prompt = model.build_cacheable_prompt(messages, mc.images, vars);
  const int64_t context_tokens = f.has("ctx") ? f.integer("ctx", 0, 2, int64_t(1) << 24) : prompt.size() + 1;
  Session session(model, context_tokens, false, kv_format(f));
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t rows = session.save_prompt_cache(
      prompt, f.str("out"), {{"messages", messages.dump()}, {"template_vars", vars.is_null() ? "" : vars.dump()}});
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::error_code ec;
  const auto bytes = std::filesystem::file_size(f.str("out"), ec);
  std::printf("cached %lld prompt tokens (%zu image(s)) in %s: %.1f MB, computed in %.2f s\n", (long long)rows,
              prompt.images.size(), f.str("out").c_str(), double(bytes) / 1e6, seconds);
  return 0;
}

// Ctrl-C in `vkvlm chat`: during a reply it stops the reply (the conversation stays, the
// partial reply with it); at the prompt, a second Ctrl-C in a row exits.
// The handler sets a flag (polled by generation) and writes to a pipe (polled beside stdin at the
// prompt, so no signal is lost between a check and a blocking read).
volatile std::sig_atomic_t g_interrupted = 0;
int g_interrupt_pipe[2] = {-1, -1};
void on_sigint(int) {
  g_interrupted = 1;
  const int saved = errno;
  [[maybe_unused]] ssize_t n = ::write(g_interrupt_pipe[1], "i", 1);
  errno = saved;
}

void install_sigint_handler() {
  if (::pipe(g_interrupt_pipe) != 0) throw Error(std::string("cannot create a pipe: ") + std::strerror(errno));
  for (int fd : g_interrupt_pipe) ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  struct sigaction sa {};
  sa.sa_handler = on_sigint;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);
}

// Forgets interrupts that came before now.
void clear_interrupts() {
  char buf[64];
  while (::read(g_interrupt_pipe[0], buf, sizeof(buf)) > 0) {
  }
  g_interrupted = 0;
}

// One line from stdin, unless Ctrl-C comes first.
class PromptReader {
 public:
  enum class Got { Line, End, Interrupted };
  Got read_line(std::string& line) {
    for (;;) {
      if (size_t nl = buf_.find('\n'); nl != std::string::npos) {
        line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return Got::Line;
      }
      if (eof_) {
        if (buf_.empty()) return Got::End;
        line = std::move(buf_);
        buf_.clear();
        return Got::Line;
      }
      pollfd fds[2] = {{0, POLLIN, 0}, {g_interrupt_pipe[0], POLLIN, 0}};
      if (::poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        return Got::End;
      }
      if (fds[1].revents & POLLIN) {
        clear_interrupts();
        return Got::Interrupted;
      }
      if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
        char chunk[4096];
        const ssize_t n = ::read(0, chunk, sizeof(chunk));
        if (n > 0) buf_.append(chunk, size_t(n));
        else if (n == 0 || errno != EINTR) eof_ = true;
      }
    }
  }

 private:
  std::string buf_;
  bool eof_ = false;
};

int cmd_chat(int argc, char** argv) {
  auto flags = k_generate_flags;
  flags.erase("prompt");
  flags.erase("messages");
  flags.erase("json");
  flags.erase("top-logits");
  flags["system"] = true;
  Flags f(argc, argv, 2, flags);
  GenerationParams params = generation_params(f);
  const nlohmann::json vars = template_vars(f);
  const std::string dir = model_folder(f);
  auto ctx = make_context();
  Model model(*ctx, dir, load_options(f));
  const int64_t ctx_tokens = context_for(f, model, 0, 0);
  Session session(model, ctx_tokens, f.has("max-kv-size"), kv_format(f));
  DraftModel draft = load_draft(f, *ctx, model, ctx_tokens);
  // Where the conversation starts (and /reset returns): a system message, or the conversation a
  // prompt cache holds, its images from --image.
  Messages start = Messages::array();
  std::vector<Image> start_images;
  std::vector<Image> pending;
  for (auto& p : f.all("image")) pending.push_back(load_image_file(p));
  if (f.has("prompt-cache")) {
    const auto cache = session.load_prompt_cache(f.str("prompt-cache"));
    const auto it = cache.metadata.find("messages");
    if (it == cache.metadata.end() || it->second.empty())
      throw Error("prompt cache " + f.str("prompt-cache") + " holds no conversation (vkvlm cache-prompt writes one)");
    if (f.has("system")) throw UsageError("give --system or --prompt-cache, not both: the cached conversation has its start");
    start = parse_json<Messages>(it->second);
    const auto slots = model.image_slots(start);
    const std::string why = check_supplied_images(slots, pending.size(), "--image gave");
    if (!why.empty()) throw Error("the prompt cache's conversation: " + why);
    start_images = conversation_images(slots, std::move(pending), /*allow_files=*/true);
    pending.clear();
    std::fprintf(stderr, "(continuing the cached conversation: %lld tokens, %zu message(s))\n", (long long)cache.rows,
                 start.size());
  } else if (f.has("system")) {
    start.push_back({{"role", "system"}, {"content", f.str("system")}});
  }
  Messages history = start;
  std::vector<Image> images = start_images;
  const bool tty = isatty(0);
  static const char* k_chat_help =
      "Commands: /image PATH (attach to the next message), /save FILE (the conversation as a prompt cache;\n"
      "  `vkvlm chat --prompt-cache FILE` continues it), /clear (start again), /help, /exit. A message that\n"
      "  begins with / is a command: begin it with // to send one /. Ctrl-C stops a reply.\n";
  std::fprintf(stderr, "vkvlm chat: %s. /help lists the commands.\n", dir.c_str());
  install_sigint_handler();
  PromptReader reader;
  bool interrupted_at_prompt = false;
  for (;;) {
    if (tty) std::fprintf(stderr, "> ");
    std::string line;
    const auto got = reader.read_line(line);
    if (got == PromptReader::Got::End) break;
    if (got == PromptReader::Got::Interrupted) {
      if (interrupted_at_prompt) break;
      interrupted_at_prompt = true;
      std::fprintf(stderr, "\n(Ctrl-C again to exit)\n");
      continue;
    }
    interrupted_at_prompt = false;
    if (line.empty()) continue;
    if (line == "/exit" || line == "/quit") break;
    if (line == "/help") {
      std::fputs(k_chat_help, stderr);
      continue;
    }
    if (line == "/reset" || line == "/clear") {
      history = start;
      images = start_images;
      session.reset();
      if (f.has("prompt-cache")) session.load_prompt_cache(f.str("prompt-cache"));
      std::fprintf(stderr, "(conversation cleared)\n");
      continue;
    }
    if (line.rfind("/image ", 0) == 0) {
      try {
        pending.push_back(load_image_file(line.substr(7)));
        std::fprintf(stderr, "(image attached to the next message)\n");
      } catch (const std::exception& e) {
        std::fprintf(stderr, "vkvlm: error: %s\n", e.what());
      }
      continue;
    }
    if (line == "/save" || line.rfind("/save ", 0) == 0) {
      const std::string path = line.size() > 6 ? line.substr(6) : "";
      try {
        if (path.empty()) throw UsageError("/save takes the file to write: /save FILE");
        if (history.empty()) throw UsageError("there is no conversation to save yet");
        const Prompt prompt = model.build_cacheable_prompt(history, images, vars);
        const int64_t rows = session.save_prompt_cache(
            prompt, path, {{"messages", history.dump()}, {"template_vars", vars.is_null() ? "" : vars.dump()}});
        std::fprintf(stderr, "(saved %lld tokens and %zu message(s) to %s)\n", (long long)rows, history.size(), path.c_str());
      } catch (const std::exception& e) {
        std::fprintf(stderr, "vkvlm: error: %s\n", e.what());
      }
      continue;
    }
    if (line[0] == '/' && line.rfind("//", 0) != 0) {
      std::fprintf(stderr, "(unknown command %s: /help lists them; begin a message with // to send one /)\n",
                   line.substr(0, line.find(' ')).c_str());
      continue;
    }
    if (line.rfind("//", 0) == 0) line.erase(0, 1);
    Messages content = Messages::array();
    for (auto& img : pending) {
      images.push_back(img);
      content.push_back({{"type", "image"}});
    }
    pending.clear();
    content.push_back({{"type", "text"}, {"text", line}});
    history.push_back({{"role", "user"}, {"content", content}});
    try {
      Prompt prompt = model.build_prompt(history, images, vars);
      Prompt draft_prompt;
      Speculation spec;
      if (draft.model) {
        draft_prompt = draft.model->build_draft_prompt(history, images, vars);
        spec = {draft.session.get(), &draft_prompt};
      }
      clear_interrupts();
      GenerationResult r = session.generate(
          prompt, params,
          [](const StepOutput& s) {
            std::fwrite(s.text.data(), 1, s.text.size(), stdout);
            std::fflush(stdout);
            return !g_interrupted;
          },
          [] { return g_interrupted != 0; }, spec);
      std::printf("\n");
      std::fflush(stdout);
      clear_interrupts();  // a Ctrl-C that stopped this reply is not one at the prompt
      if (r.finish_reason == "cancelled") std::fprintf(stderr, "(reply stopped)\n");
      if (f.has("verbose"))
        std::fprintf(stderr, "prompt %zu tokens (%lld from the cache), generated %zu tokens, finish: %s\n",
                     r.prompt_tokens.size(), (long long)r.cached_tokens, r.tokens.size(), r.finish_reason.c_str());
      if (f.has("verbose") && (spec.draft || params.lookup_ngram))
        std::fprintf(stderr, "drafted %lld tokens, %lld accepted\n", (long long)r.draft_tokens, (long long)r.accepted_tokens);
      // What was shown stays in the conversation, a stopped reply too.
      history.push_back({{"role", "assistant"}, {"content", Messages::array({{{"type", "text"}, {"text", r.text}}})}});
    } catch (const std::exception& e) {
      history.erase(history.size() - 1);
      std::fprintf(stderr, "vkvlm: error: %s\n", e.what());
    }
  }
  return 0;
}

int cmd_tokenize(int argc, char** argv) {
  Flags f(argc, argv, 2, {{"model", true}, {"tokenizer", true}, {"text", true}, {"no-special", false}, {"json", false}});
  if (f.has("model") == f.has("tokenizer")) throw UsageError("give exactly one of --model DIR and --tokenizer FILE");
  std::string path = f.has("tokenizer") ? f.str("tokenizer") : (fs::path(model_folder(f)) / "tokenizer.json").string();
  std::error_code ec;
  if (!fs::exists(path, ec)) throw Error("tokenizer " + path + " does not exist");
  Tokenizer tok = Tokenizer::from_file(path);
  std::string text;
  if (f.has("text")) {
    text = f.str("text");
  } else {
    std::ostringstream ss;
    ss << std::cin.rdbuf();  // byte for byte, nothing stripped
    text = ss.str();
  }
  auto ids = tok.encode(text, !f.has("no-special"));
  if (f.has("json")) {
    std::printf("%s\n", nlohmann::json(ids).dump().c_str());
  } else {
    auto toks = tok.tokens(ids);
    for (size_t i = 0; i < ids.size(); ++i) {
      std::string shown = nlohmann::json(toks[i]).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
      std::printf("%d\t%s\n", ids[i], shown.c_str());
    }
  }
  return 0;
}

// The text a chat template renders, byte for byte, without weights or a GPU: a model folder's
// template over --messages, or any template file over a --context JSON object whose top-level
// keys are the template's variables.
int cmd_render_template(int argc, char** argv) {
  Flags f(argc, argv, 2,
          {{"model", true}, {"messages", true}, {"tools", true}, {"no-generation-prompt", false},
           {"chat-template-kwargs", true}, {"template", true}, {"context", true}});
  std::string text;
  if (f.has("template") || f.has("context")) {
    if (!f.has("template") || !f.has("context") || f.has("model") || f.has("messages") || f.has("tools") ||
        f.has("no-generation-prompt") || f.has("chat-template-kwargs"))
      throw UsageError("give either --model DIR --messages FILE [--tools FILE] [--no-generation-prompt] or --template FILE --context FILE");
    const std::string path = f.str("template");
    const jinja::Template tmpl(read_file_bounded(path, uint64_t(16) << 20, "template"), path);
    const Messages context = read_json_file(f.str("context"), "context file");
    if (!context.is_object()) throw Error("context file " + f.str("context") + " must hold a JSON object (its keys are the template's variables)");
    std::map<std::string, jinja::Value> vars;
    for (auto& [k, v] : context.items()) vars[k] = jinja::Value::from_json(v);
    text = tmpl.render(vars);
  } else {
    if (!f.has("messages")) throw UsageError("give either --model DIR --messages FILE [--tools FILE] [--no-generation-prompt] or --template FILE --context FILE");
    const std::string dir = model_folder(f);
    const ChatTemplate chat = ChatTemplate::from_model_dir(dir);
    const Messages messages = read_messages_file(f.str("messages"));
    Messages vars = Messages(template_vars(f));
    if (vars.is_null()) vars = Messages::object();
    if (f.has("tools")) {
      Messages tools = read_json_file(f.str("tools"), "tools file");
      if (!tools.is_array()) throw Error("tools file " + f.str("tools") + " must hold a JSON array of tool definitions");
      vars["tools"] = std::move(tools);
    }
    text = chat.render(messages, !f.has("no-generation-prompt"), vars);
  }
  std::fwrite(text.data(), 1, text.size(), stdout);
  return 0;
}

int cmd_info(int argc, char** argv) {
  Flags f(argc, argv, 2,
          {{"model", true}, {"ctx", true}, {"quantize", true}, {"kv-bits", true}, {"kv-group-size", true},
           {"quantized-kv-start", true}});
  const KvFormat kv = kv_format(f);
  const std::string dir = model_folder(f);
  auto ctx = make_context();
  Model model(*ctx, dir, load_options(f));
  const int64_t ctx_tokens = context_for(f, model, 0, 0);
  std::printf("%s", model.info(ctx_tokens, kv).c_str());
  std::printf("device: %s\n", ctx->profile().summary_line().c_str());
  return 0;
}

// vkvlm download ORG/NAME[@REVISION]: brings a model's files into the Hugging Face cache
// without running it (the other commands download a missing model by themselves).
int cmd_download(int argc, char** argv) {
  if (argc < 3 || std::strncmp(argv[2], "--", 2) == 0) throw UsageError("download needs a repository id: vkvlm download ORG/NAME[@REVISION]");
  Flags f(argc, argv, 3, {});
  const std::string repo = argv[2];
  if (hub_offline())
    throw Error("HF_HUB_OFFLINE is set, so vkvlm download cannot reach the hub (unset it to download " + repo + ")");
  const HubOptions o = HubOptions::from_environment();
  const HubDownloadResult r = hub_download(repo, o);
  std::fprintf(stderr, "vkvlm: %s at %s: %zu file(s) downloaded (%.1f MB), the rest already in %s\n", repo.c_str(),
               r.commit.c_str(), r.fetched.size(), double(r.bytes) / 1e6, o.cache.c_str());
  std::printf("%s\n", r.snapshot.c_str());
  return 0;
}

// vkvlm models: the known models, and which of them the local Hugging Face cache holds.
int cmd_models(int argc, char** argv) {
  Flags f(argc, argv, 2, {{"json", false}});
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  for (const KnownModel& m : known_models()) {
    RepoId id;
    parse_repo_id(m.repo, id);
    const std::string cached = cached_model_folder(id);
    list.push_back({{"repo", m.repo}, {"architecture", m.architecture}, {"weights", m.weights}, {"prompt", m.prompt},
                    {"notes", m.notes}, {"tested_with", "tests/data/fixtures/" + m.fixture}, {"cached", cached.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(cached)}});
  }
  if (f.has("json")) {
    std::printf("%s\n", list.dump(2).c_str());
    return 0;
  }
  for (const auto& m : list) {
    std::printf("%-42s %-10s %-20s %s\n", m["repo"].get<std::string>().c_str(), m["architecture"].get<std::string>().c_str(),
                m["weights"].get<std::string>().c_str(), m["cached"].is_null() ? "" : "(in the cache)");
    std::printf("    prompt: \"%s\"; %s\n", m["prompt"].get<std::string>().c_str(), m["notes"].get<std::string>().c_str());
  }
  std::printf("\nvkvlm generate --model REPO ... downloads a model the cache (%s) lacks; vkvlm download REPO fetches it.\n",
              hub_cache_dir().c_str());
  return 0;
}

int cmd_devices(int argc, char** argv) {
  Flags f(argc, argv, 2, {});
  for (auto& d : gpu::Device::enumerate()) std::printf("[%u] %s\n", d.index, d.profile.summary_line().c_str());
  return 0;
}

const char* k_usage =
    "usage: vkvlm COMMAND [options]\n"
    "\n"
    "commands:\n"
    "  generate  [--model DIR] (--prompt TEXT | --messages FILE) [--image PATH]... [--max-tokens N]\n"
    "            [--temp T] [--top-p P] [--top-k K] [--min-p P] [--repeat-penalty R] [--seed S] [--ctx N]\n"
    "            [--quantize q4|q8] [--stop TEXT]... [--json] [--top-logits N] [--ignore-eos] [--verbose]\n"
    "            [--chat-template-kwargs JSON]   (PaliGemma: --prompt is the task prefix, e.g. \"caption en\")\n"
    "            [--draft-model DIR | --lookup-ngram N] [--num-draft-tokens N]   speculative decoding\n"
    "            [--prompt-cache FILE]   start from a cached prompt (vkvlm cache-prompt)\n"
    "            [--max-kv-size N]   a rotating KV cache of N tokens: generation goes on past it\n"
    "            [--kv-bits 4|8 [--kv-group-size 32|64|128] [--quantized-kv-start N]]   a quantized KV cache\n"
    "            (MLX affine, groups along each head; the first N rows stay f16)\n"
    "            --batch FILE.jsonl [--parallel N]   one prompt per line ({\"prompt\"|\"messages\", \"images\",\n"
    "            \"max_tokens\", \"temperature\", \"seed\", \"stop\", \"id\"}), decoded N at a time (8); one JSON line each\n"
    "  chat      [--model DIR] [--image PATH]... [--system TEXT] [sampling and drafting options] [--verbose]\n"
    "            interactive, multi-turn; Ctrl-C stops a reply, a second Ctrl-C at the prompt exits\n"
    "  cache-prompt [--model DIR] (--prompt TEXT | --messages FILE) [--image PATH]... --out FILE [--kv-bits ...]\n"
    "            compute a conversation's KV cache once; generate/chat/serve --prompt-cache FILE continue it\n"
    "  tokenize  (--model DIR | --tokenizer FILE) [--text TEXT] [--no-special] [--json]   (stdin without --text)\n"
    "  render-template [--model DIR] --messages FILE [--tools FILE] [--no-generation-prompt]\n"
    "            [--chat-template-kwargs JSON]  |  --template FILE --context FILE.json\n"
    "            print the text the chat template renders (no weights, no GPU)\n"
    "  info      [--model DIR] [--ctx N] [--quantize q4|q8] [--kv-bits 4|8 ...]   sizes, memory per KV setting\n"
    "  serve     [--model DIR] [--host 127.0.0.1] [--port 8080] [--api-key KEY] [--max-concurrency N]\n"
    "            [--ctx N] [--kv-slots N] [--allow-local-files DIR] [--max-images N] [--quantize q4|q8]\n"
    "            [--model-name NAME] [--draft-model DIR | --lookup-ngram N] [--num-draft-tokens N]\n"
    "            [--prompt-cache FILE]   a cached prompt every conversation may start from\n"
    "            [--max-kv-size N]   rotating KV caches of N tokens instead of --ctx\n"
    "            [--kv-bits 4|8 [--kv-group-size G] [--quantized-kv-start N]]   quantized KV caches\n"
    "            [--model NAME=DIR|REPO]... [--config FILE] [--max-loaded N] [--active-model NAME]\n"
    "            several models, chosen by the request's \"model\", loaded on first use\n"
    "            [--parallel N]   decode up to N conversations of a model together (continuous batching)\n"
    "            [--max-request-memory MB]   memory requests may hold together (default: a quarter of RAM)\n"
    "            [--max-messages N] [--max-parts N] [--max-body-mb MB]   per request (10000, 10000, 64)\n"
    "            [--cors-origin ORIGIN|*]   browsers from ORIGIN may call the API (preflight answered)\n"
    "            [--drain-timeout S]   on SIGTERM, requests in flight may finish within S seconds (30);\n"
    "            GET /health/ready (503 while loading or draining), /health/live\n"
    "            OpenAI-compatible server\n"
    "  download  ORG/NAME[@REVISION]   fetch a model from the Hugging Face hub into its cache (HF_ENDPOINT,\n"
    "            HF_TOKEN); prints the snapshot folder. Elsewhere a missing ORG/NAME is downloaded as needed\n"
    "  models    [--json]   known models by repo id, with a prompt and notes each, and which are cached\n"
    "  devices   list Vulkan devices with their feature profiles\n"
    "\n"
    "Without --model, the bundled demo model (models/shapes-llava) is used.\n"
    "Environment: VKVLM_DEVICE (index or name), VKVLM_DISABLE (fp16,int8,subgroup,coopmat,...),\n"
    "VKVLM_VALIDATE=1, VKVLM_MAX_BINDING_BYTES, VKVLM_MAX_ALLOCATION_BYTES, VKVLM_MODEL; models named\n"
    "ORG/NAME[@REVISION]: HF_HUB_CACHE / HF_HOME, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE=1 (cache only).\n";

// One command's part of the usage (its lines, up to the next command's), with the notes that
// apply to every command; the whole usage for a name that is no command.
std::string command_usage(const std::string& cmd) {
  const std::string usage = k_usage;
  const size_t at = usage.find("\n  " + cmd + " ");
  if (at == std::string::npos) return usage;
  size_t end = at + 1;
  for (size_t next = usage.find('\n', end); next != std::string::npos; next = usage.find('\n', end)) {
    end = next + 1;
    // A line that starts another command ("  NAME  ...") or leaves the list ends this one.
    if (usage.compare(end, 12, std::string(12, ' ')) != 0) break;
  }
  const size_t notes = usage.find("\nWithout --model");
  return "usage: vkvlm " + cmd + " [options]\n\n" + usage.substr(at + 1, end - at - 1) +
         (notes == std::string::npos ? "" : usage.substr(notes));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0 ||
      std::strcmp(argv[1], "help") == 0) {
    std::fputs(k_usage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  if (cmd == "--version" || cmd == "version") {
    std::printf("vkvlm %s\n", vkvlm_version());
    return 0;
  }
  for (int i = 2; i < argc; ++i)
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      std::fputs(command_usage(cmd).c_str(), stdout);
      return 0;
    }
  try {
    if (cmd == "generate") return cmd_generate(argc, argv);
    if (cmd == "chat") return cmd_chat(argc, argv);
    if (cmd == "tokenize") return cmd_tokenize(argc, argv);
    if (cmd == "info") return cmd_info(argc, argv);
    if (cmd == "cache-prompt") return cmd_cache_prompt(argc, argv);
    if (cmd == "render-template") return cmd_render_template(argc, argv);
    if (cmd == "devices") return cmd_devices(argc, argv);
    if (cmd == "download") return cmd_download(argc, argv);
    if (cmd == "models") return cmd_models(argc, argv);
    if (cmd == "serve") return server::run_serve(argc, argv, 2);
    throw UsageError("unknown command '" + cmd +
                     "' (generate, chat, serve, cache-prompt, render-template, tokenize, info, download, models, devices)");
  } catch (const UsageError& e) {
    std::fprintf(stderr, "vkvlm: %s (see vkvlm --help)\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::string m = e.what();
    std::replace(m.begin(), m.end(), '\n', ' ');
    std::fprintf(stderr, "vkvlm: error: %s\n", m.c_str());
    return 1;
  }
}
