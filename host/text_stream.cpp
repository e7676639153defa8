#include "host/text_stream.h"

#include <algorithm>

#include "host/unicode.h"

namespace vkvlm {

TextStream::TextStream(const Tokenizer& tok, std::vector<std::string> stop) : detok_(tok, true), stop_(std::move(stop)) {
  for (auto& s : stop_) max_stop_ = std::max(max_stop_, s.size());
}

TextStream::Piece TextStream::push(std::optional<int32_t> token, bool last) {
  Piece out;
  if (token) detok_.push(*token);
  if (last) detok_.flush();
  const std::string& full = detok_.text();
  // A stop string can only start in what was not handed out yet (or straddle its end).
  size_t cut = std::string::npos;
  for (auto& s : stop_) {
    const size_t from = emitted_.size() > s.size() ? emitted_.size() - s.size() : 0;
    const size_t f = full.find(s, from);
    if (f != std::string::npos && f < cut) cut = f;
  }
  size_t safe = full.size();
  if (cut != std::string::npos) {
    safe = cut;
    out.stop = true;
  } else if (!last) {
    // Hold back the longest tail that is the start of a stop string.
    for (size_t k = std::min(max_stop_, full.size()); k > 0; --k) {
      bool prefix_of_stop = false;
      for (auto& s : stop_) prefix_of_stop = prefix_of_stop || (s.size() >= k && full.compare(full.size() - k, k, s, 0, k) == 0);
      if (prefix_of_stop) {
        safe = full.size() - k;
        break;
      }
    }
    safe = unicode::complete_prefix(std::string_view(full).substr(0, safe));
  }
  if (safe > emitted_.size()) {
    out.text = full.substr(emitted_.size(), safe - emitted_.size());
    emitted_ += out.text;
  }
  return out;
}

}  // namespace vkvlm
