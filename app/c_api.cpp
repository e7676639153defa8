// The C API (include/vkvlm/vkvlm.h), over the C++ API: C handles wrap an Engine and a Chat.
#include "vkvlm/vkvlm.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "vkvlm/vkvlm.hpp"

struct vkvlm_engine {
  std::unique_ptr<vkvlm::Engine> engine;
};

struct vkvlm_session {
  std::unique_ptr<vkvlm::Chat> chat;
  vkvlm_stats last{};  // of the last vkvlm_generate
};

namespace {
char* copy_string(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}
void set_error(char** error, const char* what) {
  if (error) *error = copy_string(what);
}
// The encoded images a call passes, checked.
std::vector<std::vector<uint8_t>> image_bytes(const unsigned char* const* images, const size_t* image_sizes, size_t n) {
  std::vector<std::vector<uint8_t>> imgs;
  for (size_t i = 0; i < n; ++i) {
    if (!images || !image_sizes || !images[i]) throw std::runtime_error("image " + std::to_string(i) + " is missing");
    imgs.emplace_back(images[i], images[i] + image_sizes[i]);
  }
  return imgs;
}
vkvlm_session* new_session(vkvlm_engine* e, int64_t context_tokens, bool rotating, char** error,
                           const vkvlm::KvCacheOptions& kv = {}) {
  try {
    if (!e) throw std::runtime_error("no engine given");
    auto s = std::make_unique<vkvlm_session>();
    s->chat = std::make_unique<vkvlm::Chat>(*e->engine, context_tokens, rotating, kv);
    return s.release();
  } catch (const std::exception& ex) {
    set_error(error, ex.what());
    return nullptr;
  }
}
vkvlm::EngineOptions engine_options(const char* quantize) {
  vkvlm::EngineOptions o;
  if (quantize) o.quantize = quantize;
  return o;
}
}  // namespace

extern "C" {

void vkvlm_params_default(vkvlm_params* p) {
  if (!p) return;
  *p = vkvlm_params{};
  p->max_tokens = 256;
  p->top_p = 1.0f;
  p->repeat_penalty = 1.0f;
  p->num_draft_tokens = 3;
}

vkvlm_engine* vkvlm_engine_load(const char* model_dir, const char* quantize, char** error) {
  try {
    if (!model_dir) throw std::runtime_error("no model folder given");
    auto e = std::make_unique<vkvlm_engine>();
    e->engine = vkvlm::Engine::load(model_dir, engine_options(quantize));
    return e.release();
  } catch (const std::exception& ex) {
    set_error(error, ex.what());
    return nullptr;
  }
}

vkvlm_engine* vkvlm_engine_load_on_device(const char* model_dir, const char* quantize, VkInstance instance,
                                          VkPhysicalDevice physical_device, VkDevice device, uint32_t queue_family,
                                          uint32_t queue_index, const VkPhysicalDeviceFeatures2* enabled_features,
                                          char** error) {
  return vkvlm_engine_load_on_shared_queue(model_dir, quantize, instance, physical_device, device, queue_family, queue_index,
                                           enabled_features, nullptr, nullptr, nullptr, error);
}

vkvlm_engine* vkvlm_engine_load_on_shared_queue(const char* model_dir, const char* quantize, VkInstance instance,
                                                VkPhysicalDevice physical_device, VkDevice device, uint32_t queue_family,
                                                uint32_t queue_index, const VkPhysicalDeviceFeatures2* enabled_features,
                                                void (*lock)(void* user), void (*unlock)(void* user), void* user,
                                                char** error) {
  try {
    if (!model_dir) throw std::runtime_error("no model folder given");
    if (!lock != !unlock) throw std::runtime_error("give both queue lock functions or neither");
    vkvlm::VulkanDevice d;
    d.instance = instance;
    d.physical_device = physical_device;
    d.device = device;
    d.queue_family = queue_family;
    d.queue_index = queue_index;
    d.enabled_features = enabled_features;
    if (lock) {
      d.lock_queue = [lock, user] { lock(user); };
      d.unlock_queue = [unlock, user] { unlock(user); };
    }
    auto e = std::make_unique<vkvlm_engine>();
    e->engine = vkvlm::Engine::load_on_device(model_dir, d, engine_options(quantize));
    return e.release();
  } catch (const std::exception& ex) {
    set_error(error, ex.what());
    return nullptr;
  }
}

void vkvlm_engine_free(vkvlm_engine* e) { delete e; }

int vkvlm_engine_set_draft(vkvlm_engine* e, const char* draft_model_dir, const char* quantize, char** error) {
  try {
    if (!e || !draft_model_dir) throw std::runtime_error("vkvlm_engine_set_draft needs an engine and a draft model folder");
    e->engine->load_draft(draft_model_dir, engine_options(quantize));
    return 0;
  } catch (const std::exception& ex) {
    set_error(error, ex.what());
    return -1;
  }
}

vkvlm_session* vkvlm_session_new(vkvlm_engine* e, int64_t context_tokens, char** error) {
  return new_session(e, context_tokens, false, error);
}

vkvlm_session* vkvlm_session_new_rotating(vkvlm_engine* e, int64_t max_kv_size, char** error) {
  return new_session(e, max_kv_size, true, error);
}

vkvlm_session* vkvlm_session_new_kv(vkvlm_engine* e, int64_t context_tokens, const vkvlm_kv_options* o, char** error) {
  if (!o) return new_session(e, context_tokens, false, error);
  const vkvlm::KvCacheOptions kv{o->kv_bits, o->kv_group_size, o->quantized_kv_start};
  return o->max_kv_size > 0 ? new_session(e, o->max_kv_size, true, error, kv) : new_session(e, context_tokens, false, error, kv);
}

void vkvlm_session_free(vkvlm_session* s) { delete s; }

int vkvlm_session_save_prompt_cache(vkvlm_session* s, const char* messages_json, const unsigned char* const* images,
                                    const size_t* image_sizes, size_t n_images, const char* path, char** error) {
  try {
    if (!s || !messages_json || !path) throw std::runtime_error("vkvlm_session_save_prompt_cache needs a session, messages and a path");
    s->chat->save_prompt_cache(messages_json, image_bytes(images, image_sizes, n_images), path);
    return 0;
  } catch (const std::exception& ex) {
    set_error(error, ex.what());
    return -1;
  }
}

int vkvlm_session_load_prompt_cache(vkvlm_session* s, const char* path, char** error) {
  try {
    if (!s || !path) throw std::runtime_error("vkvlm_session_load_prompt_cache needs a session and a path");
    s->chat->load_prompt_cache(path);
    return 0;
  } catch (const std::exception& ex) {
    set_error(error, ex.what());
    return -1;
  }
}

int vkvlm_generate(vkvlm_session* s, const char* messages_json, const unsigned char* const* images,
                   const size_t* image_sizes, size_t n_images, const vkvlm_params* params, vkvlm_text_callback callback,
                   void* user, char** text, char** error) {
  try {
    if (!s || !messages_json) throw std::runtime_error("vkvlm_generate needs a session and messages");
    const std::vector<std::vector<uint8_t>> imgs = image_bytes(images, image_sizes, n_images);
    vkvlm_params p;
    vkvlm_params_default(&p);
    if (params) p = *params;
    vkvlm::GenerateOptions o;
    o.max_tokens = p.max_tokens;
    o.temperature = p.temperature;
    o.top_p = p.top_p;
    o.top_k = p.top_k;
    o.min_p = p.min_p;
    o.repeat_penalty = p.repeat_penalty;
    if (p.has_seed) o.seed = p.seed;
    o.num_draft_tokens = p.num_draft_tokens;
    o.lookup_ngram = p.lookup_ngram;
    for (size_t i = 0; i < p.n_stop; ++i)
      if (p.stop && p.stop[i]) o.stop.push_back(p.stop[i]);
    auto r = s->chat->generate(messages_json, imgs, o, [&](const vkvlm::Step& step) {
      return callback ? callback(step.text.c_str(), step.text.size(), step.token, user) != 0 : true;
    });
    s->last = vkvlm_stats{int64_t(r.prompt_tokens.size()), r.cached_tokens, int64_t(r.tokens.size()), r.draft_tokens,
                          r.accepted_tokens, r.image_seconds, r.prefill_seconds, r.decode_seconds, {}};
    std::snprintf(s->last.finish_reason, sizeof(s->last.finish_reason), "%s", r.finish_reason.c_str());
    if (text) *text = copy_string(r.text);
    return 0;
  } catch (const std::exception& ex) {
    set_error(error, ex.what());
    return -1;
  }
}

void vkvlm_session_stats(const vkvlm_session* s, vkvlm_stats* stats) {
  if (stats) *stats = s ? s->last : vkvlm_stats{};
}

void vkvlm_free(void* p) { std::free(p); }

const char* vkvlm_version(void) { return VKVLM_VERSION_STRING; }

unsigned char* vkvlm_rgb_image(const unsigned char* pixels, int width, int height, size_t* size, char** error) {
  try {
    const std::vector<uint8_t> image = vkvlm::rgb_image(pixels, width, height);
    auto* out = static_cast<unsigned char*>(std::malloc(image.size()));
    if (!out) throw std::runtime_error("out of memory");
    std::memcpy(out, image.data(), image.size());
    if (size) *size = image.size();
    return out;
  } catch (const std::exception& e) {
    set_error(error, e.what());
    return nullptr;
  }
}

}  // extern "C"
