/* A C program built against an installed vkvlm (tests/install/run): asks the installed demo model
 * about one of its example images and prints the library's version and the answer. */
#include <stdio.h>
#include <stdlib.h>

#include <vkvlm/vkvlm.h>

#include "../read_file.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: app MODEL_DIR IMAGE\n");
    return 2;
  }
  char* err = NULL;
  vkvlm_engine* e = vkvlm_engine_load(argv[1], NULL, &err);
  if (!e) {
    fprintf(stderr, "load: %s\n", err);
    return 1;
  }
  vkvlm_session* s = vkvlm_session_new(e, 512, &err);
  size_t size = 0;
  unsigned char* png = read_file(argv[2], &size);
  if (!s || !png) {
    fprintf(stderr, "session or image: %s\n", err ? err : argv[2]);
    return 1;
  }
  const unsigned char* images[1] = {png};
  vkvlm_params p;
  vkvlm_params_default(&p);
  char* text = NULL;
  const char* msgs = "[{\"role\":\"user\",\"content\":[{\"type\":\"image\"},{\"type\":\"text\",\"text\":\"What color is the square?\"}]}]";
  if (vkvlm_generate(s, msgs, images, &size, 1, &p, NULL, NULL, &text, &err) != 0) {
    fprintf(stderr, "generate: %s\n", err);
    return 1;
  }
  printf("vkvlm %s: %s\n", vkvlm_version(), text);
  vkvlm_free(text);
  free(png);
  vkvlm_session_free(s);
  vkvlm_engine_free(e);
  return 0;
}
