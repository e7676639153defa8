// Every case of the reference tokenizer goldens (Hugging Face tokenizers), with and without
// special tokens, token strings, decoded strings, and the streaming detokenizer.
#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "host/tokenizer.h"
#include "tests/expect_error.h"
#include "tests/test_paths.h"

namespace vkvlm::test {
namespace {

class TokenizerGolden : public testing::TestWithParam<std::string> {};

TEST_P(TokenizerGolden, EveryCaseExact) {
  const std::string dir = fixtures_dir() + "/tokenizers/";
  auto tok = Tokenizer::from_file(dir + GetParam() + ".tokenizer.json");
  std::ifstream in(dir + GetParam() + ".golden.json");
  ASSERT_TRUE(in) << "missing golden file";
  auto golden = nlohmann::json::parse(in);
  ASSERT_GT(golden["cases"].size(), 50u);
  for (auto& c : golden["cases"]) {
    const std::string text = c["text"].get<std::string>();
    SCOPED_TRACE("text: " + text);
    const auto ids = c["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok.encode(text, false), ids);
    EXPECT_EQ(tok.encode(text, true), c["ids_with_special"].get<std::vector<int32_t>>());
    EXPECT_EQ(tok.tokens(ids), c["tokens"].get<std::vector<std::string>>());
    EXPECT_EQ(tok.decode(ids, false), c["decoded"].get<std::string>());
    EXPECT_EQ(tok.decode(ids, true), c["decoded_skip_special"].get<std::string>());
    // Streaming: the pieces, concatenated, are the full decode, and every piece is valid UTF-8.
    StreamingDetokenizer stream(tok, true);
    std::string streamed;
    for (int32_t id : ids) streamed += stream.push(id);
    streamed += stream.flush();
    EXPECT_EQ(streamed, c["decoded_skip_special"].get<std::string>());
  }
}

INSTANTIATE_TEST_SUITE_P(Tokenizers, TokenizerGolden, testing::Values("sp-bpe", "sp-bpe-phi3", "bytelevel-bpe"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& ch : n)
                             if (ch == '-') ch = '_';
                           return n;
                         });

TEST(StreamingDetokenizer, HoldsBackIncompleteCharacters) {
  auto tok = Tokenizer::from_file(fixtures_dir() + "/tokenizers/sp-bpe.tokenizer.json");
  // "a🤗b": the emoji is four byte-fallback tokens; nothing broken may come out in between.
  auto ids = tok.encode("a\xF0\x9F\xA4\x97" "b", false);
  StreamingDetokenizer stream(tok);
  std::vector<std::string> pieces;
  for (int32_t id : ids) pieces.push_back(stream.push(id));
  pieces.push_back(stream.flush());
  std::string all;
  for (auto& p : pieces) {
    EXPECT_EQ(p.find("\xEF\xBF\xBD"), std::string::npos) << "a replacement character leaked";
    all += p;
  }
  EXPECT_EQ(all, "a\xF0\x9F\xA4\x97" "b");
}

// What a model can emit for a long time: invalid byte tokens and skipped special tokens. The
// stream still equals the full decode, and it holds back no more than a character's worth of
// tokens (it used to re-decode everything since the last emitted piece at every token: hours
// for a long run).
TEST(StreamingDetokenizer, LongRunsOfInvalidBytesAndSkippedTokensStreamAsTheyDecode) {
  auto tok = Tokenizer::from_file(fixtures_dir() + "/tokenizers/sp-bpe-phi3.tokenizer.json");
  const int32_t invalid = tok.token_to_id("<0xFF>"), eos = tok.token_to_id("<|endoftext|>");
  ASSERT_GE(invalid, 0);
  ASSERT_GE(eos, 0);
  std::vector<int32_t> ids = tok.encode("Hello", false);
  ids.insert(ids.end(), 20000, invalid);
  for (int32_t id : tok.encode(" world \xC3\xA9t\xC3\xA9", false)) ids.push_back(id);
  ids.insert(ids.end(), 20000, eos);
  for (int32_t id : tok.encode(" again", false)) ids.push_back(id);
  for (bool skip : {true, false}) {
    StreamingDetokenizer stream(tok, skip);
    std::string streamed;
    size_t longest_silence = 0, silence = 0;
    for (int32_t id : ids) {
      const std::string piece = stream.push(id);
      silence = piece.empty() ? silence + 1 : 0;
      longest_silence = std::max(longest_silence, silence);
      streamed += piece;
    }
    streamed += stream.flush();
    EXPECT_EQ(streamed, tok.decode(ids, skip)) << "skip_special_tokens " << skip;
    if (!skip) {
      EXPECT_LE(longest_silence, 5u);
    }
  }
}

TEST(Tokenizer, MalformedFilesAreClearErrors) {
  try {
    Tokenizer::from_json(nlohmann::json::parse(R"({"model": {"type": "Unigram", "vocab": []}})"), "t.json");
    FAIL();
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("Unigram"), std::string::npos) << e.what();
  }
  try {
    Tokenizer::from_file("/nonexistent/tokenizer.json");
    FAIL();
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/tokenizer.json"), std::string::npos) << e.what();
  }
}

// Ids a hostile tokenizer.json can hold: each is refused with the token and the id named, never
// an out-of-range write, a huge allocation or an overflow.
TEST(Tokenizer, EveryIdIsValidated) {
  auto with = [](const std::string& vocab, const std::string& added) {
    return nlohmann::json::parse(R"({"model": {"type": "BPE", "vocab": )" + vocab + R"(, "merges": []}, "added_tokens": )" + added + "}");
  };
  const std::string ok_vocab = R"({"a": 0, "b": 1})";
  expect_error([&] { Tokenizer::from_json(with(R"({"a": 0, "b": -1})", "[]"), "t.json"); }, {"t.json", "'b'", "-1"});
  expect_error([&] { Tokenizer::from_json(with(R"({"a": 0, "b": 2147483647})", "[]"), "t.json"); }, {"'b'", "2147483647"});
  expect_error([&] { Tokenizer::from_json(with(R"({"a": 0, "b": 1.5})", "[]"), "t.json"); }, {"'b'", "1.5"});
  expect_error([&] { Tokenizer::from_json(with(R"({"a": 0, "b": true})", "[]"), "t.json"); }, {"'b'", "true"});
  expect_error([&] { Tokenizer::from_json(with(R"({"a": 0, "b": 0})", "[]"), "t.json"); }, {"id 0", "two"});
  expect_error([&] { Tokenizer::from_json(with(R"({"a": 0, "b": 5000000})", "[]"), "t.json"); }, {"5000000", "dense"});
  expect_error([&] { Tokenizer::from_json(with(ok_vocab, R"([{"id": -7, "content": "<x>"}])"), "t.json"); }, {"'<x>'", "-7"});
  expect_error([&] { Tokenizer::from_json(with(ok_vocab, R"([{"id": 2147483647, "content": "<x>"}])"), "t.json"); },
               {"'<x>'", "2147483647"});
  expect_error([&] { Tokenizer::from_json(with(ok_vocab, R"([{"id": 2, "content": "<x>"}, {"id": 2, "content": "<y>"}])"), "t.json"); },
               {"share id 2"});
  auto post = nlohmann::json::parse(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
      "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}],
                         "special_tokens": {"<s>": {"id": "<s>", "ids": [9]}}}})");
  expect_error([&] { Tokenizer::from_json(post, "t.json"); }, {"post-processor", "9", "outside"});
  // A valid one with a gap in its ids still loads.
  EXPECT_EQ(Tokenizer::from_json(with(R"({"a": 0, "b": 3})", R"([{"id": 4, "content": "<x>", "special": true}])"), "t.json").vocab_size(), 5);
}

}  // namespace
}  // namespace vkvlm::test
