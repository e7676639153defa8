#pragma once
// The text a generation hands out as it goes: tokens detokenized incrementally, cut at the first
// stop string, holding back what could still become one (and any incomplete UTF-8 character).
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "host/tokenizer.h"

namespace vkvlm {

class TextStream {
 public:
  TextStream(const Tokenizer& tok, std::vector<std::string> stop);

  struct Piece {
    std::string text;   // text that became final with this step (may be empty)
    bool stop = false;  // a stop string was reached: the text ends before it
  };
  // Adds a token (none: an end-of-sequence token, which adds no text). `last`: no token follows,
  // so nothing is held back.
  Piece push(std::optional<int32_t> token, bool last);
  const std::string& text() const { return emitted_; }  // everything handed out

 private:
  StreamingDetokenizer detok_;
  std::vector<std::string> stop_;
  size_t max_stop_ = 0;
  std::string emitted_;
};

}  // namespace vkvlm
