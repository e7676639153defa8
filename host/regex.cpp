// Oniguruma lives in its own translation unit: its headers define a UChar macro that clashes
// with ICU's.
#include <oniguruma.h>

#include <mutex>

#include "base/error.h"
#include "host/unicode.h"

namespace vkvlm::unicode {

namespace {
std::once_flag g_onig_init;
}

Regex::Regex(const std::string& pattern) {
  std::call_once(g_onig_init, [] {
    OnigEncoding enc = ONIG_ENCODING_UTF8;
    onig_initialize(&enc, 1);
  });
  OnigErrorInfo info;
  regex_t* re = nullptr;
  const auto* p = reinterpret_cast<const OnigUChar*>(pattern.data());
  int r = onig_new(&re, p, p + pattern.size(), ONIG_OPTION_NONE, ONIG_ENCODING_UTF8, ONIG_SYNTAX_DEFAULT, &info);
  if (r != ONIG_NORMAL) {
    OnigUChar msg[ONIG_MAX_ERROR_MESSAGE_LEN];
    onig_error_code_to_str(msg, r, &info);
    fail("invalid regular expression '", pattern, "': ", reinterpret_cast<char*>(msg));
  }
  regex_ = re;
}

Regex::~Regex() {
  if (regex_) onig_free(static_cast<regex_t*>(regex_));
}

std::vector<std::pair<size_t, size_t>> Regex::find_all(std::string_view s) const {
  std::vector<std::pair<size_t, size_t>> out;
  auto* re = static_cast<regex_t*>(regex_);
  // A region per call keeps concurrent callers apart.
  OnigRegion* region = onig_region_new();
  const auto* str = reinterpret_cast<const OnigUChar*>(s.data());
  const auto* end = str + s.size();
  size_t pos = 0;
  while (pos <= s.size()) {
    int r = onig_search(re, str, end, str + pos, end, region, ONIG_OPTION_NONE);
    if (r == ONIG_MISMATCH) break;
    if (r < 0) {
      onig_region_free(region, 1);
      fail("regular expression search failed (", r, ")");
    }
    size_t b = size_t(region->beg[0]), e = size_t(region->end[0]);
    out.push_back({b, e});
    if (e > b) {
      pos = e;
    } else {
      if (e >= s.size()) break;
      size_t i = e;
      next(s, i);
      pos = i;
    }
  }
  onig_region_free(region, 1);
  return out;
}

bool Regex::full_match(std::string_view s) const {
  auto* re = static_cast<regex_t*>(regex_);
  OnigRegion* region = onig_region_new();
  const auto* str = reinterpret_cast<const OnigUChar*>(s.data());
  int r = onig_match(re, str, str + s.size(), str, region, ONIG_OPTION_NONE);
  onig_region_free(region, 1);
  return r == int(s.size());
}

}  // namespace vkvlm::unicode
