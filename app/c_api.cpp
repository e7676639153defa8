// The C API (include/vkvlm/vkvlm.h) over Model and Session.
#include "vkvlm/vkvlm.h"

#include <cstdlib>
#include <cstring>
#include <memory>

#include "gpu/context.h"
#include "gpu/device.h"
#include "gpu/error.h"
#include "app/conversation.h"
#include "host/image.h"
#include "models/model.h"

struct vkvlm_engine {
  std::unique_ptr<vkvlm::gpu::Context> ctx;
  std::unique_ptr<vkvlm::Model> model;
  ~vkvlm_engine() { model.reset(); }  // GPU objects before the context
};

struct vkvlm_session {
  std::unique_ptr<vkvlm::Session> session;
  vkvlm_engine* engine = nullptr;
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
}  // namespace

extern "C" {

void vkvlm_params_default(vkvlm_params* p) {
  if (!p) return;
  *p = vkvlm_params{};
  p->max_tokens = 256;
  p->top_p = 1.0f;
  p->repeat_penalty = 1.0f;
}

static vkvlm_engine* load(const char* dir, const char* quantize, std::unique_ptr<vkvlm::gpu::Device> dev, char** error) {
  try {
    if (!dir) throw vkvlm::Error("no model folder given");
    auto e = std::make_unique<vkvlm_engine>();
    e->ctx = std::make_unique<vkvlm::gpu::Context>(std::move(dev));
    vkvlm::LoadOptions o;
    if (quantize) o.quantize = quantize;
    e->model = std::make_unique<vkvlm::Model>(*e->ctx, dir, o);
    return e.release();
  } catch (const std::exception& ex) {
    set_error(error, ex.what());
    return nullptr;
  }
}

vkvlm_engine* vkvlm_engine_load(const char* model_dir, const char* quantize, char** error) {
  try {
    return load(model_dir, quantize, vkvlm::gpu::Device::create(), error);
  } catch (const std::exception& ex) {
    set_error(error, ex.what());
    return nullptr;
  }
}

vkvlm_engine* vkvlm_engine_load_on_device(const char* model_dir, const char* quantize, VkInstance instance,
                                          VkPhysicalDevice physical_device, VkDevice device, uint32_t queue_family,
                                          uint32_t queue_index, const VkPhysicalDeviceFeatures2* enabled_features,
                                          char** error) {
  try {
    vkvlm::gpu::AdoptedDevice a;
    a.instance = instance;
    a.physical_device = physical_device;
    a.device = device;
    a.queue_family = queue_family;
    a.queue_index = queue_index;
    a.enabled_features = enabled_features;
    return load(model_dir, quantize, vkvlm::gpu::Device::adopt(a), error);
  } catch (const std::exception& ex) {
    set_error(error, ex.what());
    return nullptr;
  }
}

void vkvlm_engine_free(vkvlm_engine* e) { delete e; }

vkvlm_session* vkvlm_session_new(vkvlm_engine* e, int64_t context_tokens, char** error) {
  try {
    if (!e) throw vkvlm::Error("no engine given");
    auto s = std::make_unique<vkvlm_session>();
    s->engine = e;
    s->session = std::make_unique<vkvlm::Session>(*e->model, context_tokens);
    return s.release();
  } catch (const std::exception& ex) {
    set_error(error, ex.what());
    return nullptr;
  }
}

void vkvlm_session_free(vkvlm_session* s) { delete s; }

int vkvlm_generate(vkvlm_session* s, const char* messages_json, const unsigned char* const* images,
                   const size_t* image_sizes, size_t n_images, const vkvlm_params* params, vkvlm_text_callback callback,
                   void* user, char** text, char** error) {
  try {
    if (!s || !messages_json) throw vkvlm::Error("vkvlm_generate needs a session and messages");
    vkvlm::Messages messages;
    try {
      messages = vkvlm::Messages::parse(messages_json);
    } catch (const std::exception& ex) {
      throw vkvlm::Error(std::string("messages are not valid JSON: ") + ex.what());
    }
    std::vector<vkvlm::Image> imgs;
    for (size_t i = 0; i < n_images; ++i) {
      if (!images || !image_sizes || !images[i]) throw vkvlm::Error("image " + std::to_string(i) + " is missing");
      std::vector<uint8_t> bytes(images[i], images[i] + image_sizes[i]);
      imgs.push_back(vkvlm::decode_image(bytes, "image " + std::to_string(i)));
    }
    vkvlm_params p;
    vkvlm_params_default(&p);
    if (params) p = *params;
    vkvlm::GenerationParams gp;
    gp.max_tokens = p.max_tokens;
    gp.sampling.temperature = p.temperature;
    gp.sampling.top_p = p.top_p;
    gp.sampling.top_k = p.top_k;
    gp.sampling.min_p = p.min_p;
    gp.sampling.repeat_penalty = p.repeat_penalty;
    gp.sampling.seed = p.seed;
    gp.sampling.has_seed = p.has_seed != 0;
    for (size_t i = 0; i < p.n_stop; ++i)
      if (p.stop && p.stop[i]) gp.stop.push_back(p.stop[i]);
    imgs = vkvlm::conversation_images(s->engine->model->image_slots(messages), std::move(imgs), /*allow_files=*/false);
    vkvlm::Prompt prompt = s->engine->model->build_prompt(messages, imgs);
    auto r = s->session->generate(prompt, gp, [&](const vkvlm::StepOutput& o) {
      return callback ? callback(o.text.c_str(), o.text.size(), o.token, user) != 0 : true;
    });
    if (text) *text = copy_string(r.text);
    return 0;
  } catch (const std::exception& ex) {
    set_error(error, ex.what());
    return -1;
  }
}

void vkvlm_free(void* p) { std::free(p); }

}  // extern "C"
