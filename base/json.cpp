#include "base/json.h"

namespace vkvlm {

namespace {
// Calls on(i, c) for each byte of `text` outside strings (a string's opening quote included);
// stops early when on returns false.
template <typename F>
void for_each_outside_strings(std::string_view text, F&& on) {
  bool in_string = false, escaped = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    if (!on(i, c)) return;
  }
}
}  // namespace

size_t json_too_deep_at(std::string_view text, int max_depth) {
  int depth = 0;
  size_t at = std::string_view::npos;
  for_each_outside_strings(text, [&](size_t i, char c) {
    if (c == '[' || c == '{') {
      if (++depth > max_depth) {
        at = i;
        return false;
      }
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
    return true;
  });
  return at;
}

uint64_t json_value_count(std::string_view text) {
  // A value starts at each '[', '{' and '"' (keys count: they are held too) and at each other
  // token (numbers, true, false, null) after a separator.
  uint64_t values = 0;
  bool in_token = false;
  for_each_outside_strings(text, [&](size_t, char c) {
    const bool structural = c == '[' || c == '{' || c == ']' || c == '}' || c == ',' || c == ':' || c == '"' ||
                            c == ' ' || c == '\t' || c == '\n' || c == '\r';
    if (c == '[' || c == '{' || c == '"') ++values;
    if (!structural && !in_token) ++values;
    in_token = !structural;
    return true;
  });
  return values;
}

}  // namespace vkvlm
