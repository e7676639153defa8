/* The C API from C: the demo model answers its reference question; errors come back as messages. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vkvlm/vkvlm.h"
#include "read_file.h"

static int pieces = 0;
static char streamed[1024];

static int on_text(const char* text, size_t length, int32_t token, void* user) {
  (void)token;
  (void)user;
  if (strlen(streamed) + length < sizeof(streamed)) strncat(streamed, text, length);
  ++pieces;
  return 1;
}

#define CHECK(cond, ...)                  \
  do {                                    \
    if (!(cond)) {                        \
      fprintf(stderr, "FAILED: " __VA_ARGS__); \
      fprintf(stderr, "\n");              \
      return 1;                           \
    }                                     \
  } while (0)

int main(void) {
  char* err = NULL;
  char version[32];
  snprintf(version, sizeof(version), "%d.%d.%d", VKVLM_VERSION_MAJOR, VKVLM_VERSION_MINOR, VKVLM_VERSION_PATCH);
  CHECK(strcmp(vkvlm_version(), VKVLM_VERSION_STRING) == 0 && strcmp(version, VKVLM_VERSION_STRING) == 0,
        "the library's version %s is the header's %s (%s)", vkvlm_version(), VKVLM_VERSION_STRING, version);
  vkvlm_engine* bad = vkvlm_engine_load("/nonexistent/model", NULL, &err);
  CHECK(bad == NULL && err && strstr(err, "/nonexistent/model"), "a missing model is an error naming it (%s)", err ? err : "");
  vkvlm_free(err);
  err = NULL;

  vkvlm_engine* e = vkvlm_engine_load(VKVLM_SOURCE_DIR "/models/shapes-llava", NULL, &err);
  CHECK(e, "load: %s", err ? err : "");
  vkvlm_session* s = vkvlm_session_new(e, 512, &err);
  CHECK(s, "session: %s", err ? err : "");
  size_t size = 0;
  unsigned char* png = read_file(VKVLM_SOURCE_DIR "/models/shapes-llava/examples/shapes_0.png", &size);
  CHECK(png, "cannot read the example image");
  const unsigned char* images[1] = {png};
  size_t sizes[1] = {size};
  vkvlm_params p;
  vkvlm_params_default(&p);
  char* text = NULL;
  const char* msgs = "[{\"role\":\"user\",\"content\":[{\"type\":\"image\"},{\"type\":\"text\",\"text\":\"What color is the square?\"}]}]";
  int rc = vkvlm_generate(s, msgs, images, sizes, 1, &p, on_text, NULL, &text, &err);
  CHECK(rc == 0, "generate: %s", err ? err : "");
  CHECK(strcmp(text, "The square is orange.") == 0, "answer '%s'", text);
  CHECK(strcmp(streamed, text) == 0 && pieces > 1, "streamed '%s' in %d pieces", streamed, pieces);
  vkvlm_free(text);

  vkvlm_stats first;
  vkvlm_session_stats(s, &first);
  CHECK(strcmp(first.finish_reason, "stop") == 0, "finish_reason '%s'", first.finish_reason);

  /* Raw RGB pixels (shapes_0.png decoded by PIL into tests/data) answer as the PNG does. */
  size_t raw_size = 0;
  unsigned char* pixels = read_file(VKVLM_SOURCE_DIR "/tests/data/shapes_0_192x192.rgb", &raw_size);
  CHECK(pixels && raw_size == 192 * 192 * 3, "cannot read the raw pixels");
  size_t image_size = 0;
  unsigned char* image = vkvlm_rgb_image(pixels, 192, 192, &image_size, &err);
  CHECK(image, "rgb image: %s", err ? err : "");
  const unsigned char* raw_images[1] = {image};
  rc = vkvlm_generate(s, msgs, raw_images, &image_size, 1, &p, NULL, NULL, &text, &err);
  CHECK(rc == 0 && strcmp(text, "The square is orange.") == 0, "raw pixels: '%s' %s", text ? text : "", err ? err : "");
  vkvlm_free(text);
  vkvlm_free(image);
  CHECK(vkvlm_rgb_image(pixels, 0, 192, &image_size, &err) == NULL && err && strstr(err, "0x192"),
        "a zero width is an error naming the size (%s)", err ? err : "");
  vkvlm_free(err);
  err = NULL;
  free(pixels);

  /* The placeholder a model card writes in text takes the image too. */
  const char* placeholder = "[{\"role\":\"user\",\"content\":\"<image>\\nWhat color is the square?\"}]";
  rc = vkvlm_generate(s, placeholder, images, sizes, 1, &p, NULL, NULL, &text, &err);
  CHECK(rc == 0, "generate with a placeholder: %s", err ? err : "");
  CHECK(strcmp(text, "The square is orange.") == 0, "answer with a placeholder '%s'", text);
  vkvlm_free(text);

  rc = vkvlm_generate(s, "[not json", NULL, NULL, 0, &p, NULL, NULL, NULL, &err);
  CHECK(rc == -1 && err && strstr(err, "not valid JSON"), "bad JSON is an error (%s)", err ? err : "");
  vkvlm_free(err);
  err = NULL;
  rc = vkvlm_generate(s, msgs, NULL, NULL, 0, &p, NULL, NULL, NULL, &err);
  CHECK(rc == -1 && err && strstr(err, "image"), "a missing image is an error (%s)", err ? err : "");
  vkvlm_free(err);

  /* Prompt lookup drafts ('square' recurs) and answers the same; the stats say so. */
  p.lookup_ngram = 1;
  vkvlm_session* fresh = vkvlm_session_new(e, 512, &err);
  rc = vkvlm_generate(fresh, msgs, images, sizes, 1, &p, NULL, NULL, &text, &err);
  CHECK(rc == 0 && strcmp(text, "The square is orange.") == 0, "lookup answer '%s'", text ? text : "");
  vkvlm_free(text);
  vkvlm_stats st;
  vkvlm_session_stats(fresh, &st);
  CHECK(st.draft_tokens > 0 && st.accepted_tokens <= st.draft_tokens && st.completion_tokens > 0 && st.prompt_tokens > 0,
        "lookup stats: %lld drafted, %lld accepted", (long long)st.draft_tokens, (long long)st.accepted_tokens);
  vkvlm_session_free(fresh);
  p.lookup_ngram = 0;

  /* A draft model: the demo model drafting for itself has every draft accepted. A draft with
   * another vocabulary is refused, naming both. */
  rc = vkvlm_engine_set_draft(e, VKVLM_SOURCE_DIR "/tests/data/fixtures/qwen2vl-bf16", NULL, &err);
  CHECK(rc == -1 && err && strstr(err, "vocabulary") && strstr(err, "qwen2vl-bf16"), "a foreign draft is refused (%s)",
        err ? err : "");
  vkvlm_free(err);
  err = NULL;
  rc = vkvlm_engine_set_draft(e, VKVLM_SOURCE_DIR "/models/shapes-llava", NULL, &err);
  CHECK(rc == 0, "set_draft: %s", err ? err : "");
  vkvlm_session* drafted = vkvlm_session_new(e, 512, &err);
  p.num_draft_tokens = 4;
  rc = vkvlm_generate(drafted, msgs, images, sizes, 1, &p, NULL, NULL, &text, &err);
  CHECK(rc == 0 && strcmp(text, "The square is orange.") == 0, "drafted answer '%s'", text ? text : "");
  vkvlm_free(text);
  vkvlm_session_stats(drafted, &st);
  CHECK(st.draft_tokens > 0 && st.accepted_tokens == st.draft_tokens, "self-draft stats: %lld drafted, %lld accepted",
        (long long)st.draft_tokens, (long long)st.accepted_tokens);
  vkvlm_session_free(drafted);

  /* A prompt cache saved by one session continues in another without recomputing it. */
  const char* cache = "vkvlm-c-api-test.cache";
  const char* prefix = "[{\"role\":\"user\",\"content\":[{\"type\":\"image\"},{\"type\":\"text\",\"text\":\"What color is the square?\"}]}]";
  rc = vkvlm_session_save_prompt_cache(s, prefix, images, sizes, 1, cache, &err);
  CHECK(rc == 0, "save_prompt_cache: %s", err ? err : "");
  vkvlm_session* resumed = vkvlm_session_new(e, 512, &err);
  rc = vkvlm_session_load_prompt_cache(resumed, cache, &err);
  CHECK(rc == 0, "load_prompt_cache: %s", err ? err : "");
  p.num_draft_tokens = 3;
  rc = vkvlm_generate(resumed, msgs, images, sizes, 1, &p, NULL, NULL, &text, &err);
  CHECK(rc == 0 && strcmp(text, "The square is orange.") == 0, "answer from the cache '%s'", text ? text : "");
  vkvlm_free(text);
  vkvlm_session_stats(resumed, &st);
  CHECK(st.cached_tokens > 0 && st.cached_tokens + 8 > st.prompt_tokens, "%lld of %lld prompt tokens from the cache",
        (long long)st.cached_tokens, (long long)st.prompt_tokens);
  rc = vkvlm_session_load_prompt_cache(resumed, "/nonexistent/file.cache", &err);
  CHECK(rc == -1 && err && strstr(err, "/nonexistent/file.cache"), "a missing cache is an error naming it (%s)", err ? err : "");
  vkvlm_free(err);
  err = NULL;
  vkvlm_session_free(resumed);
  remove(cache);

  /* A rotating session answers past its size. */
  vkvlm_session* rot = vkvlm_session_new_rotating(e, 24, &err);
  CHECK(rot, "rotating session: %s", err ? err : "");
  vkvlm_params long_answer;
  vkvlm_params_default(&long_answer);
  long_answer.max_tokens = 30;
  rc = vkvlm_generate(rot, "[{\"role\":\"user\",\"content\":\"Hi\"}]", NULL, NULL, 0, &long_answer, NULL, NULL, NULL, &err);
  CHECK(rc == 0, "rotating generate: %s", err ? err : "");
  vkvlm_session_stats(rot, &st);
  CHECK(st.completion_tokens > 0 && st.prompt_tokens > 0, "a rotating cache of 24 ran %lld + %lld tokens",
        (long long)st.prompt_tokens, (long long)st.completion_tokens);
  CHECK(vkvlm_session_new_rotating(e, 3, &err) == NULL && err && strstr(err, "rotating"), "a rotating cache of 3 rows is refused (%s)",
        err ? err : "");
  vkvlm_free(err);
  err = NULL;
  vkvlm_session_free(rot);

  /* A quantized KV cache (8 bits, the first 4 rows in f16) answers as the f16 one does here; a
   * group size that does not divide the heads is refused, naming it. */
  vkvlm_kv_options kv = {8, 64, 4, 0};
  vkvlm_session* quantized = vkvlm_session_new_kv(e, 512, &kv, &err);
  CHECK(quantized, "quantized session: %s", err ? err : "");
  rc = vkvlm_generate(quantized, msgs, images, sizes, 1, &p, NULL, NULL, &text, &err);
  CHECK(rc == 0 && strcmp(text, "The square is orange.") == 0, "answer from a quantized cache '%s'", text ? text : "");
  vkvlm_free(text);
  vkvlm_session_free(quantized);
  kv.kv_group_size = 128; /* the demo model's heads are 64 wide */
  CHECK(vkvlm_session_new_kv(e, 512, &kv, &err) == NULL && err && strstr(err, "128") && strstr(err, "head_dim 64"),
        "a group wider than the heads is refused (%s)", err ? err : "");
  vkvlm_free(err);
  err = NULL;

  free(png);
  vkvlm_session_free(s);
  vkvlm_engine_free(e);
  printf("C API: ok\n");
  return 0;
}
