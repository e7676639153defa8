#pragma once
// Hugging Face tokenizer.json: added tokens, normalizers, pre-tokenizers, the BPE model
// (SentencePiece-style with byte fallback, and byte-level), post-processors and decoders,
// reproducing the `tokenizers` library's output; plus a streaming detokenizer.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

namespace vkvlm {

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool single_word = false, lstrip = false, rstrip = false, normalized = false, special = false;
};

class Tokenizer {
 public:
  static Tokenizer from_file(const std::string& path);
  static Tokenizer from_json(const nlohmann::json& j, const std::string& where);
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Token ids of text; with add_special_tokens the post-processor's tokens (BOS, ...) are added.
  // Added tokens in the text (special or not) are always recognized.
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const;
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const;
  // Token strings of ids (as stored in the vocabulary).
  std::vector<std::string> tokens(const std::vector<int32_t>& ids) const;

  int32_t token_to_id(std::string_view token) const;  // -1 when absent
  std::string id_to_token(int32_t id) const;          // "" when absent
  bool is_special(int32_t id) const;
  bool is_added(int32_t id) const;
  int64_t vocab_size() const;  // one past the largest id
  const std::vector<AddedToken>& added_tokens() const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Turns a growing list of generated ids into text, emitting each piece once it is final: never
// broken UTF-8, never a repeat, and with the decoder's context (leading-space rules) intact.
class StreamingDetokenizer {
 public:
  StreamingDetokenizer(const Tokenizer& tok, bool skip_special_tokens = true);
  // Adds one id; returns the text that became final (may be empty).
  std::string push(int32_t id);
  // Returns whatever is still held back (at the end of generation).
  std::string flush();
  const std::string& text() const { return text_; }  // everything emitted so far

 private:
  const Tokenizer& tok_;
  bool skip_special_;
  std::vector<int32_t> ids_;
  size_t prefix_offset_ = 0, read_offset_ = 0;
  std::string text_;
};

}  // namespace vkvlm
