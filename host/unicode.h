#pragma once
// UTF-8 and Unicode helpers for the tokenizer and the chat templates.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace vkvlm::unicode {

// Decodes the code point at s[i] and advances i; invalid bytes decode as U+FFFD, one byte each.
uint32_t next(std::string_view s, size_t& i);
void append(std::string& out, uint32_t cp);
std::string encode(uint32_t cp);
// Byte length of each code point, in order.
std::vector<std::string_view> chars(std::string_view s);
bool valid_utf8(std::string_view s);
// The longest prefix of s that ends on a complete UTF-8 sequence.
size_t complete_prefix(std::string_view s);

bool is_whitespace(uint32_t cp);    // Unicode White_Space
bool is_alphanumeric(uint32_t cp);  // Alphabetic or numeric (as Rust's char::is_alphanumeric)
bool is_punctuation(uint32_t cp);   // general category P*
bool is_digit(uint32_t cp);         // Nd

enum class Form { NFC, NFD, NFKC, NFKD };
std::string normalize(std::string_view s, Form form);
std::string lowercase(std::string_view s);

// A compiled regular expression (Oniguruma, Ruby syntax: what Hugging Face tokenizers use).
class Regex {
 public:
  explicit Regex(const std::string& pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  // Byte ranges [begin, end) of successive non-overlapping matches; an empty match advances by
  // one character.
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view s) const;
  // Whether the whole of s matches.
  bool full_match(std::string_view s) const;

 private:
  void* regex_ = nullptr;
};

}  // namespace vkvlm::unicode
