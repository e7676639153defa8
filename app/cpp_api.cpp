// The C++ API (include/vkvlm/vkvlm.hpp) over Model and Session.
#include "vkvlm/vkvlm.hpp"

#include <filesystem>
#include <fstream>

#include "base/json.h"
#include "models/arch/known_models.h"
#include "app/conversation.h"
#include "base/error.h"
#include "base/files.h"
#include "gpu/context.h"
#include "gpu/device.h"
#include "host/hub_cache.h"
#include "models/session.h"

namespace vkvlm {

struct Engine::Impl {
  std::unique_ptr<gpu::Context> ctx;
  std::unique_ptr<Model> model;
  std::unique_ptr<Model> draft;  // EngineOptions::draft_model
  ~Impl() {  // GPU objects before the context
    draft.reset();
    model.reset();
  }
  void load(const std::string& model_dir, const EngineOptions& options);
  void load_draft(const std::string& dir, const EngineOptions& options);
};

namespace {

LoadOptions load_options(const EngineOptions& o) {
  LoadOptions l;
  l.quantize = o.quantize;
  l.progress = o.progress;
  return l;
}

}  // namespace

void Engine::Impl::load(const std::string& model_dir, const EngineOptions& options) {
  model = std::make_unique<Model>(*ctx, resolve_model(model_dir), load_options(options));
  if (!options.draft_model.empty()) load_draft(options.draft_model, options);
}

void Engine::Impl::load_draft(const std::string& dir, const EngineOptions& options) {
  auto d = std::make_unique<Model>(*ctx, resolve_model(dir), load_options(options));
  check_draft_model(*model, *d);
  draft = std::move(d);
}

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() = default;

std::unique_ptr<Engine> Engine::load(const std::string& model_dir, const EngineOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->ctx = std::make_unique<gpu::Context>(gpu::Device::create());
  impl->load(model_dir, options);
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

std::unique_ptr<Engine> Engine::load_on_device(const std::string& model_dir, const VulkanDevice& d, const EngineOptions& options) {
  gpu::AdoptedDevice a;
  a.instance = d.instance;
  a.physical_device = d.physical_device;
  a.device = d.device;
  a.queue_family = d.queue_family;
  a.queue_index = d.queue_index;
  a.enabled_features = d.enabled_features;
  a.enabled_extensions = d.enabled_extensions;
  a.lock_queue = d.lock_queue;
  a.unlock_queue = d.unlock_queue;
  auto impl = std::make_unique<Impl>();
  impl->ctx = std::make_unique<gpu::Context>(gpu::Device::adopt(a));
  impl->load(model_dir, options);
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

std::string Engine::info(int64_t context_tokens) const { return impl_->model->info(context_tokens); }

std::string Engine::device_name() const { return impl_->ctx->profile().device_name; }

void Engine::load_draft(const std::string& draft_model_dir, const EngineOptions& options) {
  impl_->load_draft(draft_model_dir, options);
}

struct Chat::Impl {
  Engine& engine;
  Session session;
  std::unique_ptr<Session> draft;  // the draft model's cache of this conversation
  Impl(Engine& e, int64_t context_tokens, bool rotating, const KvFormat& kv)
      : engine(e), session(*e.impl().model, context_tokens, rotating, kv) {
    if (e.impl().draft) draft = std::make_unique<Session>(*e.impl().draft, context_tokens);
  }
};

Chat::Chat(Engine& engine, int64_t context_tokens, bool rotating, const KvCacheOptions& kv)
    : impl_(std::make_unique<Impl>(engine, context_tokens, rotating, KvFormat{kv.bits, kv.group_size, kv.quantized_start})) {}
Chat::~Chat() = default;

void Chat::reset() {
  impl_->session.reset();
  if (impl_->draft) impl_->draft->reset();
}

namespace {

// A conversation as the API takes it: messages and template variables as JSON, encoded images.
struct Conversation {
  Messages messages;
  nlohmann::json vars;
  std::vector<Image> images;
};

Conversation parse_conversation(const Model& model, const std::string& messages_json,
                                const std::vector<std::vector<uint8_t>>& images, const std::string& template_vars) {
  Conversation c;
  try {
    c.messages = parse_json<Messages>(messages_json);
  } catch (const std::exception& e) {
    fail("messages are not valid JSON: ", e.what());
  }
  if (!template_vars.empty()) {
    try {
      c.vars = parse_json(template_vars);
    } catch (const std::exception& e) {
      fail("template_vars is not valid JSON: ", e.what());
    }
  }
  for (size_t i = 0; i < images.size(); ++i) c.images.push_back(decode_image(images[i], "image " + std::to_string(i)));
  c.images = conversation_images(model.image_slots(c.messages), std::move(c.images), /*allow_files=*/false);
  return c;
}

}  // namespace

int64_t Chat::save_prompt_cache(const std::string& messages_json, const std::vector<std::vector<uint8_t>>& images,
                                const std::string& path, const std::string& template_vars) {
  const Model& model = *impl_->engine.impl().model;
  const Conversation c = parse_conversation(model, messages_json, images, template_vars);
  const Prompt prompt = model.build_cacheable_prompt(c.messages, c.images, c.vars);
  return impl_->session.save_prompt_cache(prompt, path, {{"messages", c.messages.dump()}, {"template_vars", template_vars}});
}

int64_t Chat::load_prompt_cache(const std::string& path) {
  if (impl_->draft) impl_->draft->reset();
  return impl_->session.load_prompt_cache(path).rows;
}

Result Chat::generate(const std::string& messages_json, const std::vector<std::vector<uint8_t>>& images,
                      const GenerateOptions& o, const OnStep& on_step) {
  Model& model = *impl_->engine.impl().model;
  Conversation c = parse_conversation(model, messages_json, images, o.template_vars);
  const Messages& messages = c.messages;
  const nlohmann::json& vars = c.vars;
  const std::vector<Image>& decoded = c.images;
  GenerationParams p;
  p.max_tokens = o.max_tokens;
  p.sampling.temperature = o.temperature;
  p.sampling.top_p = o.top_p;
  p.sampling.top_k = o.top_k;
  p.sampling.min_p = o.min_p;
  p.sampling.repeat_penalty = o.repeat_penalty;
  if (o.seed) {
    p.sampling.seed = *o.seed;
    p.sampling.has_seed = true;
  }
  p.stop = o.stop;
  p.ignore_eos = o.ignore_eos;
  p.logprobs = o.logprobs;
  p.top_logprobs = o.top_logprobs;
  p.num_draft_tokens = o.num_draft_tokens;
  p.lookup_ngram = o.lookup_ngram;
  if (impl_->draft && o.lookup_ngram) fail("lookup_ngram is not available: the engine drafts with its draft model");
  Prompt draft_prompt;
  Speculation spec;
  if (impl_->draft) {
    draft_prompt = impl_->engine.impl().draft->build_draft_prompt(messages, decoded, vars);
    spec = {impl_->draft.get(), &draft_prompt};
  }
  auto to_step = [](const StepOutput& s) { return Step{s.token, s.text, s.logprob, s.top_logprobs}; };
  GenerationResult g = impl_->session.generate(model.build_prompt(messages, decoded, vars), p, [&](const StepOutput& s) {
    return on_step ? on_step(to_step(s)) : true;
  }, {}, spec);
  Result r;
  r.text = g.text;
  r.finish_reason = g.finish_reason;
  r.prompt_tokens = g.prompt_tokens;
  r.tokens = g.tokens;
  r.cached_tokens = g.cached_tokens;
  r.draft_tokens = g.draft_tokens;
  r.accepted_tokens = g.accepted_tokens;
  r.image_seconds = g.image_seconds;
  r.prefill_seconds = g.prefill_seconds;
  r.decode_seconds = g.decode_seconds;
  for (auto& s : g.steps) r.steps.push_back(to_step(s));
  return r;
}

std::vector<uint8_t> rgb_image(const uint8_t* pixels, int width, int height) {
  if (!pixels || width <= 0 || height <= 0 || int64_t(width) * height > (int64_t(1) << 28))
    throw std::invalid_argument("rgb_image needs pixels and a width and height from 1 up to 2^28 pixels in all, not " +
                                std::to_string(width) + "x" + std::to_string(height));
  const std::string head = "P6\n" + std::to_string(width) + " " + std::to_string(height) + "\n255\n";
  std::vector<uint8_t> out(head.begin(), head.end());
  out.insert(out.end(), pixels, pixels + size_t(width) * size_t(height) * 3);
  return out;
}

std::vector<uint8_t> read_file(const std::string& path) {
  const std::string bytes = read_file_bounded(path, uint64_t(1) << 32, "file");
  return std::vector<uint8_t>(bytes.begin(), bytes.end());
}

}  // namespace vkvlm
