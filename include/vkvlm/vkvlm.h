/* vkvlm's C API: load a vision-language model, keep conversations, generate with a streaming
 * callback. Errors are returned as messages (free them with vkvlm_free); nothing aborts.
 *
 *   char* err = NULL;
 *   vkvlm_engine* e = vkvlm_engine_load("models/shapes-llava", NULL, &err);
 *   vkvlm_session* s = vkvlm_session_new(e, 4096, &err);
 *   vkvlm_params p; vkvlm_params_default(&p);
 *   const char* msgs = "[{\"role\":\"user\",\"content\":[{\"type\":\"image\"},"
 *                      "{\"type\":\"text\",\"text\":\"Describe the image.\"}]}]";
 *   char* text = NULL;
 *   vkvlm_generate(s, msgs, &png_bytes, &png_size, 1, &p, on_text, NULL, &text, &err);
 */
#ifndef VKVLM_H
#define VKVLM_H

#include <stddef.h>
#include <stdint.h>

#include <vulkan/vulkan.h>

/* The version of this header (CMake's project version is checked against it). */
#define VKVLM_VERSION_MAJOR 0
#define VKVLM_VERSION_MINOR 1
#define VKVLM_VERSION_PATCH 0
#define VKVLM_VERSION_STRING "0.1.0"

#ifdef __cplusplus
extern "C" {
#endif

/* The version of the library linked ("MAJOR.MINOR.PATCH"), which may differ from the header's
 * when a shared library is replaced. */
const char* vkvlm_version(void);

typedef struct vkvlm_engine vkvlm_engine;   /* a device and a loaded model */
typedef struct vkvlm_session vkvlm_session; /* a conversation and its KV cache */

typedef struct vkvlm_params {
  int max_tokens;        /* default 256 */
  float temperature;     /* 0: greedy (default) */
  float top_p;           /* 1: off */
  int top_k;             /* 0: off */
  float min_p;           /* 0: off */
  float repeat_penalty;  /* 1: off */
  uint64_t seed;
  int has_seed;          /* 0: a random seed */
  const char* const* stop; /* stop strings */
  size_t n_stop;
  int num_draft_tokens;  /* with a draft model (vkvlm_engine_set_draft): tokens it proposes per round; default 3 */
  int lookup_ngram;      /* without one: draft by prompt lookup on n-grams of this length; 0: off (default) */
} vkvlm_params;

/* What the last vkvlm_generate of a session did. */
typedef struct vkvlm_stats {
  int64_t prompt_tokens, cached_tokens, completion_tokens;
  int64_t draft_tokens, accepted_tokens; /* speculative decoding: tokens proposed, and those kept */
  double image_seconds, prefill_seconds, decode_seconds;
  char finish_reason[16]; /* "stop", "length" or "cancelled" ("" before the first) */
} vkvlm_stats;

void vkvlm_params_default(vkvlm_params* params);

/* Called with each piece of text as it becomes final; return 0 to stop generating. */
typedef int (*vkvlm_text_callback)(const char* text, size_t length, int32_t token, void* user);

/* quantize: NULL, "q4" or "q8". On failure returns NULL and sets *error. */
vkvlm_engine* vkvlm_engine_load(const char* model_dir, const char* quantize, char** error);
/* The same on the application's Vulkan device; vkvlm creates and destroys none of these.
 * enabled_features: the chain the device was created with (NULL: no optional features). */
vkvlm_engine* vkvlm_engine_load_on_device(const char* model_dir, const char* quantize, VkInstance instance,
                                          VkPhysicalDevice physical_device, VkDevice device, uint32_t queue_family,
                                          uint32_t queue_index, const VkPhysicalDeviceFeatures2* enabled_features,
                                          char** error);
/* The same, for an application that submits to that queue too: vkvlm calls lock(user) and
 * unlock(user) around each of its submits and waits on it (Vulkan requires them serialized). */
vkvlm_engine* vkvlm_engine_load_on_shared_queue(const char* model_dir, const char* quantize, VkInstance instance,
                                                VkPhysicalDevice physical_device, VkDevice device, uint32_t queue_family,
                                                uint32_t queue_index, const VkPhysicalDeviceFeatures2* enabled_features,
                                                void (*lock)(void* user), void (*unlock)(void* user), void* user,
                                                char** error);
void vkvlm_engine_free(vkvlm_engine* engine);
/* Loads a draft model (same vocabulary, usually smaller) on the engine's device for speculative
 * decoding: sessions created afterwards draft with it, and greedy answers stay identical.
 * Returns 0, or -1 and sets *error. */
int vkvlm_engine_set_draft(vkvlm_engine* engine, const char* draft_model_dir, const char* quantize, char** error);

vkvlm_session* vkvlm_session_new(vkvlm_engine* engine, int64_t context_tokens, char** error);
/* A session whose KV cache of max_kv_size tokens rotates: generation goes on past it, keeping
 * the first 4 tokens and the most recent ones; identical to vkvlm_session_new until it fills. */
vkvlm_session* vkvlm_session_new_rotating(vkvlm_engine* engine, int64_t max_kv_size, char** error);
/* A session whose KV cache stores K and V quantized (mlx-lm's --kv-bits): kv_bits 4 or 8 (16:
 * f16, as vkvlm_session_new), in MLX affine groups of kv_group_size (32, 64 or 128) along each
 * head; the first quantized_kv_start rows stay f16. max_kv_size > 0 makes it rotate (then
 * context_tokens is ignored). */
typedef struct vkvlm_kv_options {
  int kv_bits, kv_group_size;
  int64_t quantized_kv_start;
  int64_t max_kv_size;
} vkvlm_kv_options;
vkvlm_session* vkvlm_session_new_kv(vkvlm_engine* engine, int64_t context_tokens, const vkvlm_kv_options* options,
                                    char** error);
void vkvlm_session_free(vkvlm_session* session);

/* messages_json: a JSON array of {"role", "content"} messages; content is a string or a list of
 * {"type": "text", "text": ...} and {"type": "image"} parts. images: the encoded files (PNG,
 * JPEG, ...) for the image parts, in order. On success returns 0 and, if text is not NULL, sets
 * *text to the whole answer (free with vkvlm_free); on failure returns -1 and sets *error. */
int vkvlm_generate(vkvlm_session* session, const char* messages_json, const unsigned char* const* images,
                   const size_t* image_sizes, size_t n_images, const vkvlm_params* params, vkvlm_text_callback callback,
                   void* user, char** text, char** error);

/* Prompt caches on disk: computes the conversation's KV cache (messages and images as for
 * vkvlm_generate) and writes it to path; a session that loads it continues that conversation
 * without recomputing it (vkvlm_stats.cached_tokens). Both return 0, or -1 and set *error (a
 * cache of another model, a context too small, a damaged file). */
int vkvlm_session_save_prompt_cache(vkvlm_session* session, const char* messages_json, const unsigned char* const* images,
                                    const size_t* image_sizes, size_t n_images, const char* path, char** error);
int vkvlm_session_load_prompt_cache(vkvlm_session* session, const char* path, char** error);

/* The counts and timings of the session's last vkvlm_generate (zeros before the first). */
void vkvlm_session_stats(const vkvlm_session* session, vkvlm_stats* stats);

void vkvlm_free(void* p);

/* Raw pixels as an image vkvlm_generate takes: 8-bit RGB, row-major, width * height * 3 bytes.
 * Returns the image (free with vkvlm_free) and sets *size; on bad sizes returns NULL and sets *error. */
unsigned char* vkvlm_rgb_image(const unsigned char* pixels, int width, int height, size_t* size, char** error);

/* Threads: an engine and its sessions may be used from any thread, one call at a time per
 * engine (calls on sessions of one engine share its device queue); different engines run in
 * parallel. A callback runs on the calling thread. On the application's device
 * (vkvlm_engine_load_on_device), the application must not submit to the queue it gave while a
 * call on that engine runs. */

#ifdef __cplusplus
}
#endif

#endif /* VKVLM_H */
