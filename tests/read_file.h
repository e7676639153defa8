/* A whole file into memory (malloc'd; NULL when it cannot be read), for the C programs of the
 * tests (tests/test_c_api.c, tests/install/app.c), which use only the C API. */
#ifndef VKVLM_TESTS_READ_FILE_H
#define VKVLM_TESTS_READ_FILE_H

#include <stdio.h>
#include <stdlib.h>

static unsigned char* read_file(const char* path, size_t* size) {
  FILE* f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  const long end = ftell(f);
  fseek(f, 0, SEEK_SET);
  unsigned char* data = end >= 0 ? malloc((size_t)end + 1) : NULL;
  *size = end >= 0 ? (size_t)end : 0;
  if (data && fread(data, 1, *size, f) != *size) {
    free(data);
    data = NULL;
  }
  fclose(f);
  return data;
}

#endif
