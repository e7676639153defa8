// tokenizer.json as a stranger may ship it, then text through it: encode with and without
// special tokens, decode the ids back (and ids taken from the input), token strings, and the
// streaming detokenizer. Input: tokenizer.json, then the text.
#include <nlohmann/json.hpp>

#include "host/tokenizer.h"
#include "tests/fuzz/fuzz_input.h"

using namespace vkvlm;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = fuzz::split_parts(data, size, 2);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(parts[0]);
  } catch (const std::exception&) {
    return 0;
  }
  try {
    const Tokenizer tok = Tokenizer::from_json(j, "fuzz tokenizer.json");
    const std::string text = parts.size() > 1 ? parts[1] : "Hello world! <s> ünï 你好 \n\t 123";
    for (bool special : {true, false}) {
      const auto ids = tok.encode(text, special);
      (void)tok.decode(ids, true);
      (void)tok.decode(ids, false);
      (void)tok.tokens(ids);
      StreamingDetokenizer stream(tok);
      for (auto id : ids) (void)stream.push(id);
    }
    // Ids a model could produce: anything below the vocabulary size, taken from the text's bytes.
    const int64_t vocab = tok.vocab_size();
    if (vocab > 0) {
      std::vector<int32_t> ids;
      for (size_t i = 0; i + 1 < text.size() && ids.size() < 256; i += 2)
        ids.push_back(int32_t((uint8_t(text[i]) << 8 | uint8_t(text[i + 1])) % vocab));
      (void)tok.decode(ids, false);
      StreamingDetokenizer stream(tok, false);
      for (auto id : ids) (void)stream.push(id);
      (void)stream.flush();
    }
  } catch (const std::exception&) {
  }
  return 0;
}
