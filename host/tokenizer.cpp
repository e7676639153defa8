#include "host/tokenizer.h"

#include <algorithm>
#include <fstream>
#include <queue>
#include <sstream>

#include "base/json.h"
#include "base/error.h"
#include "base/files.h"
#include "host/unicode.h"

namespace vkvlm {
using nlohmann::json;
namespace uc = unicode;

namespace {

// ---------------------------------------------------------------------------------------------
// Byte-level alphabet (GPT-2): every byte maps to a printable code point.

struct ByteAlphabet {
  std::string byte_to_char[256];
  std::unordered_map<uint32_t, uint8_t> char_to_byte;
  ByteAlphabet() {
    std::vector<int> bs;
    for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
    for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
    for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
    std::vector<bool> direct(256, false);
    for (int b : bs) direct[size_t(b)] = true;
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      uint32_t cp = direct[size_t(b)] ? uint32_t(b) : uint32_t(256 + n++);
      byte_to_char[b] = uc::encode(cp);
      char_to_byte[cp] = uint8_t(b);
    }
  }
};
const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet a;
  return a;
}

std::string byte_level_encode(std::string_view s) {
  const auto& a = byte_alphabet();
  std::string out;
  out.reserve(s.size() * 2);
  for (unsigned char c : s) out += a.byte_to_char[c];
  return out;
}

// Replace's pattern: a literal string or a regex.
struct Pattern {
  std::string literal;
  std::shared_ptr<uc::Regex> regex;

  static Pattern from(const json& p, const std::string& where) {
    Pattern r;
    if (p.is_object() && p.contains("String") && p["String"].is_string()) {
      r.literal = p["String"].get<std::string>();
    } else if (p.is_object() && p.contains("Regex") && p["Regex"].is_string()) {
      r.regex = std::make_shared<uc::Regex>(p["Regex"].get<std::string>());
    } else {
      fail(where, ": a pattern must be {\"String\": ...} or {\"Regex\": ...}");
    }
    return r;
  }
  std::vector<std::pair<size_t, size_t>> matches(std::string_view s) const {
    std::vector<std::pair<size_t, size_t>> out;
    if (regex) return regex->find_all(s);
    if (literal.empty()) return out;
    for (size_t pos = s.find(literal); pos != std::string_view::npos; pos = s.find(literal, pos + literal.size()))
      out.push_back({pos, pos + literal.size()});
    return out;
  }
  std::string replace(std::string_view s, std::string_view with) const {
    std::string out;
    size_t last = 0;
    for (auto [b, e] : matches(s)) {
      out.append(s.substr(last, b - last));
      out.append(with);
      last = e;
    }
    out.append(s.substr(last));
    return out;
  }
};

// ---------------------------------------------------------------------------------------------
// Normalizers

struct Normalizer {
  virtual ~Normalizer() = default;
  virtual std::string apply(std::string s) const = 0;
};

struct SequenceNormalizer : Normalizer {
  std::vector<std::unique_ptr<Normalizer>> items;
  std::string apply(std::string s) const override {
    for (auto& n : items) s = n->apply(std::move(s));
    return s;
  }
};
struct PrependNormalizer : Normalizer {
  std::string prefix;
  std::string apply(std::string s) const override { return s.empty() ? s : prefix + s; }
};
struct ReplaceNormalizer : Normalizer {
  Pattern pattern;
  std::string content;
  std::string apply(std::string s) const override { return pattern.replace(s, content); }
};
struct UnicodeNormalizer : Normalizer {
  uc::Form form;
  std::string apply(std::string s) const override { return uc::normalize(s, form); }
};
struct LowercaseNormalizer : Normalizer {
  std::string apply(std::string s) const override { return uc::lowercase(s); }
};
struct StripNormalizer : Normalizer {
  bool left = true, right = true;
  std::string apply(std::string s) const override {
    auto cs = uc::chars(s);
    size_t b = 0, e = cs.size();
    auto ws = [&](size_t i) {
      size_t k = 0;
      return uc::is_whitespace(uc::next(cs[i], k));
    };
    if (left)
      while (b < e && ws(b)) ++b;
    if (right)
      while (e > b && ws(e - 1)) --e;
    std::string out;
    for (size_t i = b; i < e; ++i) out.append(cs[i]);
    return out;
  }
};

std::unique_ptr<Normalizer> make_normalizer(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string type = j.value("type", "");
  if (type == "Sequence") {
    auto s = std::make_unique<SequenceNormalizer>();
    for (auto& n : j.at("normalizers"))
      if (auto p = make_normalizer(n, where)) s->items.push_back(std::move(p));
    return s;
  }
  if (type == "Prepend") {
    auto p = std::make_unique<PrependNormalizer>();
    p->prefix = j.at("prepend").get<std::string>();
    return p;
  }
  if (type == "Replace") {
    auto p = std::make_unique<ReplaceNormalizer>();
    p->pattern = Pattern::from(j.at("pattern"), where + " Replace normalizer");
    p->content = j.at("content").get<std::string>();
    return p;
  }
  if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
    auto p = std::make_unique<UnicodeNormalizer>();
    p->form = type == "NFC" ? uc::Form::NFC : type == "NFD" ? uc::Form::NFD : type == "NFKC" ? uc::Form::NFKC : uc::Form::NFKD;
    return p;
  }
  if (type == "Lowercase") return std::make_unique<LowercaseNormalizer>();
  if (type == "Strip") {
    auto p = std::make_unique<StripNormalizer>();
    p->left = j.value("strip_left", true);
    p->right = j.value("strip_right", true);
    return p;
  }
  fail(where, ": normalizer type '", type, "' is not supported");
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers: split a normalized piece into words (and may rewrite them).

struct Piece {
  std::string text;
  bool at_start = false;  // begins at offset 0 of the original input (Metaspace "first")
};

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

// Splits s at the given match ranges per HF's SplitDelimiterBehavior.
std::vector<std::string> split_by(std::string_view s, std::vector<std::pair<size_t, size_t>> matches,
                                  SplitBehavior behavior, bool invert) {
  // (range, is_match) covering s.
  std::vector<std::pair<std::pair<size_t, size_t>, bool>> parts;
  size_t last = 0;
  for (auto [b, e] : matches) {
    if (b > last) parts.push_back({{last, b}, false});
    parts.push_back({{b, e}, true});
    last = e;
  }
  if (last < s.size()) parts.push_back({{last, s.size()}, false});
  if (invert)
    for (auto& p : parts) p.second = !p.second;
  std::vector<std::string> out;
  auto sub = [&](std::pair<size_t, size_t> r) { return std::string(s.substr(r.first, r.second - r.first)); };
  switch (behavior) {
    case SplitBehavior::Removed:
      for (auto& p : parts)
        if (!p.second) out.push_back(sub(p.first));
      break;
    case SplitBehavior::Isolated:
      for (auto& p : parts) out.push_back(sub(p.first));
      break;
    case SplitBehavior::MergedWithPrevious: {
      bool prev_was_gap = false;
      for (auto& p : parts) {
        if (p.second && prev_was_gap && !out.empty()) {
          out.back() += sub(p.first);
          prev_was_gap = false;
        } else {
          out.push_back(sub(p.first));
          prev_was_gap = !p.second;
        }
      }
      break;
    }
    case SplitBehavior::MergedWithNext: {
      std::string pending;
      bool has_pending = false;
      for (auto& p : parts) {
        if (p.second) {
          if (has_pending) out.push_back(pending);
          pending = sub(p.first);
          has_pending = true;
        } else {
          out.push_back((has_pending ? pending : "") + sub(p.first));
          has_pending = false;
          pending.clear();
        }
      }
      if (has_pending) out.push_back(pending);
      break;
    }
    case SplitBehavior::Contiguous: {
      bool prev_match = false;
      for (auto& p : parts) {
        if (p.second && prev_match && !out.empty()) out.back() += sub(p.first);
        else out.push_back(sub(p.first));
        prev_match = p.second;
      }
      break;
    }
  }
  out.erase(std::remove_if(out.begin(), out.end(), [](const std::string& x) { return x.empty(); }), out.end());
  return out;
}

SplitBehavior parse_behavior(const std::string& b, const std::string& where) {
  if (b == "Removed") return SplitBehavior::Removed;
  if (b == "Isolated") return SplitBehavior::Isolated;
  if (b == "MergedWithPrevious") return SplitBehavior::MergedWithPrevious;
  if (b == "MergedWithNext") return SplitBehavior::MergedWithNext;
  if (b == "Contiguous") return SplitBehavior::Contiguous;
  fail(where, ": split behavior '", b, "' is unknown");
}

struct PreTokenizer {
  virtual ~PreTokenizer() = default;
  virtual void apply(std::vector<Piece>& pieces) const = 0;
};

struct SequencePre : PreTokenizer {
  std::vector<std::unique_ptr<PreTokenizer>> items;
  void apply(std::vector<Piece>& pieces) const override {
    for (auto& p : items) p->apply(pieces);
  }
};

struct SplitPre : PreTokenizer {
  Pattern pattern;
  SplitBehavior behavior = SplitBehavior::Isolated;
  bool invert = false;
  void apply(std::vector<Piece>& pieces) const override {
    std::vector<Piece> out;
    for (auto& p : pieces) {
      bool first = p.at_start;
      for (auto& s : split_by(p.text, pattern.matches(p.text), behavior, invert)) {
        out.push_back({std::move(s), first});
        first = false;
      }
    }
    pieces = std::move(out);
  }
};

const char* k_gpt2_pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct ByteLevelPre : PreTokenizer {
  bool add_prefix_space = false, use_regex = true;
  std::shared_ptr<uc::Regex> regex;
  void apply(std::vector<Piece>& pieces) const override {
    std::vector<Piece> out;
    for (auto& p : pieces) {
      std::string t = p.text;
      if (add_prefix_space && !t.empty() && t[0] != ' ') t = " " + t;
      std::vector<std::string> words;
      if (use_regex) words = split_by(t, regex->find_all(t), SplitBehavior::Isolated, false);
      else words.push_back(t);
      bool first = p.at_start;
      for (auto& w : words) {
        out.push_back({byte_level_encode(w), first});
        first = false;
      }
    }
    pieces = std::move(out);
  }
};

struct MetaspacePre : PreTokenizer {
  std::string replacement = "\xE2\x96\x81";  // U+2581
  std::string prepend_scheme = "always";
  bool split = true;
  void apply(std::vector<Piece>& pieces) const override {
    std::vector<Piece> out;
    for (auto& p : pieces) {
      std::string t;
      for (char c : p.text) {
        if (c == ' ') t += replacement;
        else t += c;
      }
      const bool prepend = prepend_scheme == "always" || (prepend_scheme == "first" && p.at_start);
      if (prepend && t.compare(0, replacement.size(), replacement) != 0) t = replacement + t;
      if (split) {
        Pattern pat;
        pat.literal = replacement;
        bool first = p.at_start;
        for (auto& s : split_by(t, pat.matches(t), SplitBehavior::MergedWithNext, false)) {
          out.push_back({std::move(s), first});
          first = false;
        }
      } else {
        out.push_back({std::move(t), p.at_start});
      }
    }
    pieces = std::move(out);
  }
};

struct CharClassPre : PreTokenizer {
  // Whitespace: \w+|[^\w\s]+ ; WhitespaceSplit: split on whitespace; Punctuation: isolate
  // punctuation; Digits: isolate digits (each one, or runs).
  enum Kind { Whitespace, WhitespaceSplit, Punctuation, Digits } kind;
  bool individual_digits = false;
  std::shared_ptr<uc::Regex> word_regex;
  void apply(std::vector<Piece>& pieces) const override {
    std::vector<Piece> out;
    for (auto& p : pieces) {
      std::vector<std::string> parts;
      const std::string& s = p.text;
      if (kind == Whitespace) {
        parts = split_by(s, word_regex->find_all(s), SplitBehavior::Removed, true);
      } else {
        std::vector<std::pair<size_t, size_t>> m;
        size_t i = 0;
        while (i < s.size()) {
          size_t b = i;
          uint32_t cp = uc::next(s, i);
          bool hit = kind == WhitespaceSplit ? uc::is_whitespace(cp) : kind == Punctuation ? uc::is_punctuation(cp) : uc::is_digit(cp);
          if (!hit) continue;
          if (kind == Digits && !individual_digits && !m.empty() && m.back().second == b) m.back().second = i;
          else m.push_back({b, i});
        }
        parts = split_by(s, m, kind == WhitespaceSplit ? SplitBehavior::Removed : SplitBehavior::Isolated, false);
      }
      bool first = p.at_start;
      for (auto& x : parts) {
        out.push_back({std::move(x), first});
        first = false;
      }
    }
    pieces = std::move(out);
  }
};

std::string prepend_scheme_of(const json& j) {
  if (j.contains("prepend_scheme") && j["prepend_scheme"].is_string()) return j["prepend_scheme"].get<std::string>();
  return j.value("add_prefix_space", true) ? "always" : "never";
}

std::unique_ptr<PreTokenizer> make_pre(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string type = j.value("type", "");
  if (type == "Sequence") {
    auto s = std::make_unique<SequencePre>();
    for (auto& p : j.at("pretokenizers"))
      if (auto x = make_pre(p, where)) s->items.push_back(std::move(x));
    return s;
  }
  if (type == "Split") {
    auto s = std::make_unique<SplitPre>();
    s->pattern = Pattern::from(j.at("pattern"), where + " Split pre-tokenizer");
    s->behavior = parse_behavior(j.value("behavior", "Isolated"), where);
    s->invert = j.value("invert", false);
    return s;
  }
  if (type == "ByteLevel") {
    auto s = std::make_unique<ByteLevelPre>();
    s->add_prefix_space = j.value("add_prefix_space", false);
    s->use_regex = j.value("use_regex", true);
    if (s->use_regex) s->regex = std::make_shared<uc::Regex>(k_gpt2_pattern);
    return s;
  }
  if (type == "Metaspace") {
    auto s = std::make_unique<MetaspacePre>();
    if (j.contains("replacement")) s->replacement = j["replacement"].get<std::string>();
    s->prepend_scheme = prepend_scheme_of(j);
    s->split = j.value("split", true);
    return s;
  }
  if (type == "Whitespace" || type == "WhitespaceSplit" || type == "Punctuation" || type == "Digits") {
    auto s = std::make_unique<CharClassPre>();
    s->kind = type == "Whitespace" ? CharClassPre::Whitespace
              : type == "WhitespaceSplit" ? CharClassPre::WhitespaceSplit
              : type == "Punctuation" ? CharClassPre::Punctuation : CharClassPre::Digits;
    s->individual_digits = j.value("individual_digits", false);
    if (s->kind == CharClassPre::Whitespace) s->word_regex = std::make_shared<uc::Regex>(R"(\w+|[^\w\s]+)");
    return s;
  }
  fail(where, ": pre-tokenizer type '", type, "' is not supported");
}

// ---------------------------------------------------------------------------------------------
// Decoders: token strings in, strings out (HF's decode_chain), joined at the end.

struct Decoder {
  virtual ~Decoder() = default;
  virtual std::vector<std::string> chain(std::vector<std::string> tokens) const = 0;
};

struct SequenceDec : Decoder {
  std::vector<std::unique_ptr<Decoder>> items;
  std::vector<std::string> chain(std::vector<std::string> t) const override {
    for (auto& d : items) t = d->chain(std::move(t));
    return t;
  }
};
struct ReplaceDec : Decoder {
  Pattern pattern;
  std::string content;
  std::vector<std::string> chain(std::vector<std::string> t) const override {
    for (auto& s : t) s = pattern.replace(s, content);
    return t;
  }
};
struct ByteFallbackDec : Decoder {
  std::vector<std::string> chain(std::vector<std::string> t) const override {
    std::vector<std::string> out;
    std::string bytes;
    size_t nbytes = 0;
    auto flush = [&] {
      if (!nbytes) return;
      if (uc::valid_utf8(bytes)) {
        out.push_back(bytes);
      } else {
        for (size_t i = 0; i < nbytes; ++i) out.push_back("\xEF\xBF\xBD");
      }
      bytes.clear();
      nbytes = 0;
    };
    for (auto& s : t) {
      if (s.size() == 6 && s.compare(0, 3, "<0x") == 0 && s[5] == '>' && std::isxdigit(uint8_t(s[3])) &&
          std::isxdigit(uint8_t(s[4]))) {
        bytes += char(std::stoi(s.substr(3, 2), nullptr, 16));
        ++nbytes;
      } else {
        flush();
        out.push_back(s);
      }
    }
    flush();
    return out;
  }
};
struct FuseDec : Decoder {
  std::vector<std::string> chain(std::vector<std::string> t) const override {
    std::string all;
    for (auto& s : t) all += s;
    return {all};
  }
};
struct StripDec : Decoder {
  uint32_t content = ' ';
  size_t start = 0, stop = 0;
  std::vector<std::string> chain(std::vector<std::string> t) const override {
    for (auto& s : t) {
      auto cs = uc::chars(s);
      auto is = [&](size_t i) {
        size_t k = 0;
        return uc::next(cs[i], k) == content;
      };
      size_t b = 0, e = cs.size();
      for (size_t i = 0; i < start && i < cs.size() && is(i); ++i) b = i + 1;
      for (size_t i = 0; i < stop && i < cs.size() && e > b && is(cs.size() - 1 - i); ++i) e = cs.size() - 1 - i;
      std::string r;
      for (size_t i = b; i < e; ++i) r.append(cs[i]);
      s = r;
    }
    return t;
  }
};
struct MetaspaceDec : Decoder {
  std::string replacement = "\xE2\x96\x81";
  bool prepend = true;
  std::vector<std::string> chain(std::vector<std::string> t) const override {
    for (size_t i = 0; i < t.size(); ++i) {
      std::string r;
      size_t pos = 0;
      const std::string& s = t[i];
      while (pos < s.size()) {
        if (s.compare(pos, replacement.size(), replacement) == 0) {
          if (!(i == 0 && prepend)) r += ' ';
          pos += replacement.size();
        } else {
          r += s[pos++];
        }
      }
      t[i] = r;
    }
    return t;
  }
};
struct ByteLevelDec : Decoder {
  std::vector<std::string> chain(std::vector<std::string> t) const override {
    const auto& a = byte_alphabet();
    std::string bytes;
    for (auto& s : t) {
      std::string tok;
      bool ok = true;
      size_t i = 0;
      while (i < s.size()) {
        uint32_t cp = uc::next(s, i);
        auto it = a.char_to_byte.find(cp);
        if (it == a.char_to_byte.end()) {
          ok = false;
          break;
        }
        tok += char(it->second);
      }
      bytes += ok ? tok : s;
    }
    // Lossy UTF-8: invalid sequences become U+FFFD.
    std::string out;
    size_t i = 0;
    while (i < bytes.size()) uc::append(out, uc::next(bytes, i));
    return {out};
  }
};

std::unique_ptr<Decoder> make_decoder(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string type = j.value("type", "");
  if (type == "Sequence") {
    auto s = std::make_unique<SequenceDec>();
    for (auto& d : j.at("decoders"))
      if (auto x = make_decoder(d, where)) s->items.push_back(std::move(x));
    return s;
  }
  if (type == "Replace") {
    auto s = std::make_unique<ReplaceDec>();
    s->pattern = Pattern::from(j.at("pattern"), where + " Replace decoder");
    s->content = j.at("content").get<std::string>();
    return s;
  }
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDec>();
  if (type == "Fuse") return std::make_unique<FuseDec>();
  if (type == "Strip") {
    auto s = std::make_unique<StripDec>();
    std::string c = j.value("content", " ");
    size_t k = 0;
    s->content = c.empty() ? ' ' : uc::next(c, k);
    s->start = j.value("start", 0);
    s->stop = j.value("stop", 0);
    return s;
  }
  if (type == "Metaspace") {
    auto s = std::make_unique<MetaspaceDec>();
    if (j.contains("replacement")) s->replacement = j["replacement"].get<std::string>();
    s->prepend = prepend_scheme_of(j) != "never";
    return s;
  }
  if (type == "ByteLevel") return std::make_unique<ByteLevelDec>();
  fail(where, ": decoder type '", type, "' is not supported");
}

// ---------------------------------------------------------------------------------------------
// Post-processors: the special tokens added around a sequence.

struct PostProcessor {
  std::vector<int32_t> prefix, suffix;
};

// A token id as tokenizer.json writes it: a non-negative integer below 2^24 (no float, no
// bool), so that nothing downstream overflows or indexes outside the vocabulary.
int32_t token_id(const json& v, const std::string& where, const std::string& what) {
  if (!v.is_number_integer() || (v.is_number_unsigned() ? v.get<uint64_t>() >= (1u << 24) : v.get<int64_t>() < 0 || v.get<int64_t>() >= (1 << 24)))
    fail(where, ": ", what, " has id ", v.dump(), "; token ids are integers from 0 to 16777215");
  return int32_t(v.get<int64_t>());
}

void collect_post(const json& j, PostProcessor& pp, const std::string& where) {
  if (j.is_null()) return;
  const std::string type = j.value("type", "");
  if (type == "Sequence") {
    for (auto& p : j.at("processors")) collect_post(p, pp, where);
  } else if (type == "TemplateProcessing") {
    const json& special = j.contains("special_tokens") ? j["special_tokens"] : json::object();
    bool seen_seq = false;
    for (auto& item : j.at("single")) {
      if (item.contains("Sequence")) {
        seen_seq = true;
      } else if (item.contains("SpecialToken")) {
        const std::string id = item["SpecialToken"].at("id").get<std::string>();
        if (!special.contains(id)) fail(where, ": post-processor special token '", id, "' has no ids");
        for (auto& x : special[id].at("ids"))
          (seen_seq ? pp.suffix : pp.prefix).push_back(token_id(x, where, "post-processor token '" + id + "'"));
      }
    }
  } else if (type == "BertProcessing" || type == "RobertaProcessing") {
    pp.prefix.push_back(token_id(j.at("cls").at(1), where, "post-processor cls"));
    pp.suffix.push_back(token_id(j.at("sep").at(1), where, "post-processor sep"));
  } else if (type == "ByteLevel") {
    // Only adjusts offsets.
  } else {
    fail(where, ": post-processor type '", type, "' is not supported");
  }
}

// ---------------------------------------------------------------------------------------------
// The BPE model.

struct Bpe {
  std::unordered_map<std::string, int32_t> vocab;
  std::vector<std::string> id_to_token;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a, b) -> (rank, merged id)
  int32_t unk_id = -1;
  bool byte_fallback = false, fuse_unk = false, ignore_merges = false;
  std::string prefix, suffix;  // continuing_subword_prefix, end_of_word_suffix
  int32_t byte_ids[256];
  // SentencePiece-style vocabularies hold no token with U+2581 after another character, so no
  // merge can join across the point before such a U+2581: a long text (one "word" when there
  // is no pre-tokenizer) splits there into independent, cacheable words with identical results.
  bool split_before_metaspace = false;
  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;

  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

  void word(std::string_view w, std::vector<int32_t>& out) const {
    if (w.empty()) return;
    if (split_before_metaspace && w.size() > 32) {
      const std::string_view ms = "\xE2\x96\x81";
      size_t start = 0;
      for (size_t pos = w.find(ms, 1); pos != std::string_view::npos; pos = w.find(ms, pos + ms.size())) {
        const bool after_metaspace = pos >= ms.size() && w.compare(pos - ms.size(), ms.size(), ms) == 0;
        if (after_metaspace) continue;  // inside a run of U+2581
        word_unsplit(w.substr(start, pos - start), out);
        start = pos;
      }
      word_unsplit(w.substr(start), out);
      return;
    }
    word_unsplit(w, out);
  }

  void word_unsplit(std::string_view w, std::vector<int32_t>& out) const {
    if (w.empty()) return;
    const bool cacheable = w.size() < 256;
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mutex);
      auto it = cache.find(std::string(w));
      if (it != cache.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int32_t> ids;
    if (ignore_merges) {
      auto it = vocab.find(std::string(w));
      if (it != vocab.end()) ids.push_back(it->second);
    }
    if (ids.empty()) merge_word(w, ids);
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mutex);
      if (cache.size() > 100000) cache.clear();
      cache.emplace(std::string(w), ids);
    }
    out.insert(out.end(), ids.begin(), ids.end());
  }

  void merge_word(std::string_view w, std::vector<int32_t>& out) const {
    struct Sym {
      int32_t id;
      int32_t prev, next;
      bool alive;
    };
    std::vector<Sym> syms;
    auto cs = uc::chars(w);
    std::string buf;
    bool last_unk = false;
    for (size_t i = 0; i < cs.size(); ++i) {
      buf.assign(cs[i]);
      if (i > 0 && !prefix.empty()) buf = prefix + buf;
      if (i + 1 == cs.size() && !suffix.empty()) buf += suffix;
      auto it = vocab.find(buf);
      if (it != vocab.end()) {
        syms.push_back({it->second, 0, 0, true});
        last_unk = false;
        continue;
      }
      if (byte_fallback) {
        bool all = true;
        for (unsigned char c : cs[i]) all = all && byte_ids[c] >= 0;
        if (all) {
          for (unsigned char c : cs[i]) syms.push_back({byte_ids[c], 0, 0, true});
          last_unk = false;
          continue;
        }
      }
      if (unk_id < 0) fail("the tokenizer cannot encode '", std::string(cs[i]), "': no byte fallback and no unknown token");
      if (fuse_unk && last_unk) continue;
      syms.push_back({unk_id, 0, 0, true});
      last_unk = true;
    }
    const int32_t n = int32_t(syms.size());
    for (int32_t i = 0; i < n; ++i) {
      syms[size_t(i)].prev = i - 1;
      syms[size_t(i)].next = i + 1 < n ? i + 1 : -1;
    }
    struct Cand {
      int32_t rank, pos, new_id;
      bool operator<(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Cand> heap;
    auto push = [&](int32_t pos) {
      int32_t nx = syms[size_t(pos)].next;
      if (nx < 0) return;
      auto it = merges.find(key(syms[size_t(pos)].id, syms[size_t(nx)].id));
      if (it != merges.end()) heap.push({it->second.first, pos, it->second.second});
    };
    for (int32_t i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      Cand c = heap.top();
      heap.pop();
      Sym& s = syms[size_t(c.pos)];
      if (!s.alive || s.next < 0) continue;
      Sym& t = syms[size_t(s.next)];
      auto it = merges.find(key(s.id, t.id));
      if (it == merges.end() || it->second.second != c.new_id) continue;
      s.id = c.new_id;
      t.alive = false;
      s.next = t.next;
      if (t.next >= 0) syms[size_t(t.next)].prev = c.pos;
      if (s.prev >= 0) push(s.prev);
      push(c.pos);
    }
    for (auto& s : syms)
      if (s.alive) out.push_back(s.id);
  }
};

// Leftmost-longest matching of added tokens.
struct AddedMatcher {
  struct Node {
    std::map<unsigned char, int32_t> next;
    int32_t token = -1;  // index into the token list
  };
  std::vector<Node> nodes{1};

  void add(const std::string& s, int32_t token_index) {
    if (s.empty()) return;
    int32_t cur = 0;
    for (unsigned char c : s) {
      auto it = nodes[size_t(cur)].next.find(c);
      if (it == nodes[size_t(cur)].next.end()) {
        nodes.push_back({});
        int32_t idx = int32_t(nodes.size() - 1);
        nodes[size_t(cur)].next[c] = idx;
        cur = idx;
      } else {
        cur = it->second;
      }
    }
    nodes[size_t(cur)].token = token_index;
  }
  bool empty() const { return nodes[0].next.empty(); }
  // Longest token starting at pos: (token index, end) or (-1, pos).
  std::pair<int32_t, size_t> longest_at(std::string_view s, size_t pos) const {
    int32_t cur = 0, best = -1;
    size_t best_end = pos;
    for (size_t i = pos; i < s.size(); ++i) {
      auto it = nodes[size_t(cur)].next.find(static_cast<unsigned char>(s[i]));
      if (it == nodes[size_t(cur)].next.end()) break;
      cur = it->second;
      if (nodes[size_t(cur)].token >= 0) {
        best = nodes[size_t(cur)].token;
        best_end = i + 1;
      }
    }
    return {best, best_end};
  }
};

bool ends_with_word(std::string_view s) {
  if (s.empty()) return false;
  size_t i = s.size() - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  size_t k = i;
  return uc::is_alphanumeric(uc::next(s, k));
}
bool starts_with_word(std::string_view s) {
  if (s.empty()) return false;
  size_t k = 0;
  return uc::is_alphanumeric(uc::next(s, k));
}

}  // namespace

// ---------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre;
  std::unique_ptr<Decoder> decoder;
  PostProcessor post;
  Bpe bpe;
  std::vector<AddedToken> added;
  std::unordered_map<int32_t, size_t> added_by_id;
  std::unordered_map<std::string, int32_t> added_by_content;
  AddedMatcher raw_matcher, normalized_matcher;
  std::vector<std::string> normalized_contents;
  int64_t vocab_size = 0;

  // Splits s into (text, added token index or -1) using one matcher, honouring
  // single_word / lstrip / rstrip as the reference does.
  std::vector<std::pair<std::string_view, int32_t>> split_added(std::string_view s, const AddedMatcher& m) const {
    std::vector<std::pair<std::string_view, int32_t>> out;
    if (m.empty()) {
      out.push_back({s, -1});
      return out;
    }
    size_t start_offset = 0, pos = 0;
    while (pos < s.size()) {
      auto [tok, end] = m.longest_at(s, pos);
      if (tok < 0) {
        ++pos;
        continue;
      }
      const AddedToken& at = added[size_t(tok)];
      size_t start = pos, stop = end;
      if (at.single_word) {
        bool start_space = start == 0 || !ends_with_word(s.substr(0, start));
        bool stop_space = stop == s.size() || !starts_with_word(s.substr(stop));
        if (!start_space || !stop_space) {
          ++pos;
          continue;
        }
      }
      if (at.lstrip) {
        size_t b = start;
        while (b > start_offset) {
          size_t p = b - 1;
          while (p > 0 && (static_cast<unsigned char>(s[p]) & 0xC0) == 0x80) --p;
          size_t k = p;
          if (!uc::is_whitespace(uc::next(s, k))) break;
          b = p;
        }
        start = b;
      }
      if (at.rstrip) {
        size_t e = stop;
        while (e < s.size()) {
          size_t k = e;
          if (!uc::is_whitespace(uc::next(s, k))) break;
          e = k;
        }
        stop = e;
      }
      if (start > start_offset) out.push_back({s.substr(start_offset, start - start_offset), -1});
      out.push_back({s.substr(start, stop - start), tok});
      start_offset = stop;
      pos = stop;
    }
    if (start_offset < s.size()) out.push_back({s.substr(start_offset), -1});
    return out;
  }

  void encode_plain(std::string_view raw, bool at_start, std::vector<int32_t>& ids) const {
    std::string norm = normalizer ? normalizer->apply(std::string(raw)) : std::string(raw);
    bool first = at_start;
    for (auto& [piece, tok] : split_added(norm, normalized_matcher)) {
      if (tok >= 0) {
        ids.push_back(added[size_t(tok)].id);
        first = false;
        continue;
      }
      std::vector<Piece> pieces{{std::string(piece), first}};
      first = false;
      if (pre) pre->apply(pieces);
      for (auto& p : pieces) bpe.word(p.text, ids);
    }
  }
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_file(const std::string& path) {
  const std::string text = read_file_bounded(path, uint64_t(512) << 20, "tokenizer");
  json j;
  try {
    j = parse_json<json>(text);
  } catch (const json::exception& e) {
    fail(path, " is not valid JSON: ", e.what());
  }
  return from_json(j, path);
}

Tokenizer Tokenizer::from_json(const json& j, const std::string& where) {
  try {
    auto impl = std::make_unique<Impl>();
    if (!j.is_object() || !j.contains("model")) fail(where, " is not a tokenizer.json (no model)");
    const json& m = j["model"];
    const std::string mtype = m.value("type", "BPE");
    if (mtype != "BPE") fail(where, ": tokenizer model '", mtype, "' is not supported (BPE is)");
    Bpe& bpe = impl->bpe;
    const json& vocab = m.at("vocab");
    if (!vocab.is_object()) fail(where, ": the model's vocab must be an object of token: id");
    // Ids may leave gaps, but not so many that the table outgrows the file many times over.
    const size_t entries = vocab.size() + (j.contains("added_tokens") && j["added_tokens"].is_array() ? j["added_tokens"].size() : 0);
    const int64_t id_limit = std::min<int64_t>(int64_t(1) << 24, 2 * int64_t(entries) + 1024);
    auto check_dense = [&](int32_t i, const std::string& what) {
      if (i >= id_limit)
        fail(where, ": ", what, " has id ", i, ", far past the ", entries, " tokens the file holds (ids must be nearly dense)");
    };
    for (auto& [tok, id] : vocab.items()) {
      const int32_t i = token_id(id, where, "vocabulary token '" + tok.substr(0, 40) + "'");
      check_dense(i, "vocabulary token '" + tok.substr(0, 40) + "'");
      if (!bpe.vocab.emplace(tok, i).second) fail(where, ": vocabulary token '", tok.substr(0, 40), "' appears twice");
      if (size_t(i) >= bpe.id_to_token.size()) bpe.id_to_token.resize(size_t(i) + 1);
      if (!bpe.id_to_token[size_t(i)].empty()) fail(where, ": id ", i, " is given to two vocabulary tokens");
      bpe.id_to_token[size_t(i)] = tok;
    }
    int32_t rank = 0;
    for (auto& mg : m.at("merges")) {
      std::string a, b;
      if (mg.is_string()) {
        const std::string s = mg.get<std::string>();
        size_t sp = s.find(' ', 1);
        if (sp == std::string::npos) fail(where, ": merge '", s, "' is not two tokens");
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else {
        a = mg.at(0).get<std::string>();
        b = mg.at(1).get<std::string>();
      }
      auto ia = bpe.vocab.find(a), ib = bpe.vocab.find(b), ic = bpe.vocab.find(a + b);
      if (ia == bpe.vocab.end() || ib == bpe.vocab.end() || ic == bpe.vocab.end())
        fail(where, ": merge '", a, " ", b, "' uses tokens missing from the vocabulary");
      bpe.merges.emplace(Bpe::key(ia->second, ib->second), std::make_pair(rank++, ic->second));
    }
    bpe.byte_fallback = m.value("byte_fallback", false);
    bpe.fuse_unk = m.value("fuse_unk", false);
    bpe.ignore_merges = m.value("ignore_merges", false);
    if (m.contains("continuing_subword_prefix") && m["continuing_subword_prefix"].is_string())
      bpe.prefix = m["continuing_subword_prefix"].get<std::string>();
    if (m.contains("end_of_word_suffix") && m["end_of_word_suffix"].is_string())
      bpe.suffix = m["end_of_word_suffix"].get<std::string>();
    if (m.contains("unk_token") && m["unk_token"].is_string()) {
      auto it = bpe.vocab.find(m["unk_token"].get<std::string>());
      if (it != bpe.vocab.end()) bpe.unk_id = it->second;
    }
    {
      const std::string ms = "\xE2\x96\x81";
      bool crosses = false;
      for (auto& [tok, id] : bpe.vocab) {
        for (size_t pos = tok.find(ms, 1); pos != std::string::npos && !crosses; pos = tok.find(ms, pos + 1))
          if (!(pos >= ms.size() && tok.compare(pos - ms.size(), ms.size(), ms) == 0)) crosses = true;
        if (crosses) break;
      }
      bpe.split_before_metaspace = !crosses && bpe.prefix.empty() && bpe.suffix.empty() && !bpe.ignore_merges;
    }
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      auto it = bpe.vocab.find(name);
      bpe.byte_ids[b] = it == bpe.vocab.end() ? -1 : it->second;
    }
    impl->normalizer = make_normalizer(j.value("normalizer", json()), where);
    impl->pre = make_pre(j.value("pre_tokenizer", json()), where);
    impl->decoder = make_decoder(j.value("decoder", json()), where);
    collect_post(j.value("post_processor", json()), impl->post, where);
    impl->vocab_size = int64_t(bpe.id_to_token.size());
    if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
      for (auto& a : j["added_tokens"]) {
        AddedToken t;
        t.content = a.at("content").get<std::string>();
        t.id = token_id(a.at("id"), where, "added token '" + t.content.substr(0, 40) + "'");
        check_dense(t.id, "added token '" + t.content.substr(0, 40) + "'");
        if (impl->added_by_id.count(t.id)) fail(where, ": added tokens share id ", t.id);
        t.single_word = a.value("single_word", false);
        t.lstrip = a.value("lstrip", false);
        t.rstrip = a.value("rstrip", false);
        t.normalized = a.value("normalized", false);
        t.special = a.value("special", false);
        const int32_t index = int32_t(impl->added.size());
        impl->added_by_id[t.id] = size_t(index);
        impl->added_by_content[t.content] = t.id;
        impl->vocab_size = std::max<int64_t>(impl->vocab_size, t.id + 1);
        if (t.normalized && impl->normalizer) impl->normalized_matcher.add(impl->normalizer->apply(t.content), index);
        else if (t.normalized) impl->normalized_matcher.add(t.content, index);
        else impl->raw_matcher.add(t.content, index);
        impl->added.push_back(std::move(t));
      }
    }
    for (auto* list : {&impl->post.prefix, &impl->post.suffix})
      for (int32_t id : *list)
        if (id >= impl->vocab_size) fail(where, ": the post-processor adds id ", id, ", outside the vocabulary of ", impl->vocab_size);
    return Tokenizer(std::move(impl));
  } catch (const json::exception& e) {
    fail(where, " is not a valid tokenizer.json: ", e.what());
  }
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::vector<int32_t> ids;
  if (add_special_tokens) ids = impl_->post.prefix;
  size_t offset = 0;
  for (auto& [piece, tok] : impl_->split_added(text, impl_->raw_matcher)) {
    if (tok >= 0) ids.push_back(impl_->added[size_t(tok)].id);
    else impl_->encode_plain(piece, offset == 0, ids);
    offset += piece.size();
  }
  if (add_special_tokens) ids.insert(ids.end(), impl_->post.suffix.begin(), impl_->post.suffix.end());
  return ids;
}

std::vector<std::string> Tokenizer::tokens(const std::vector<int32_t>& ids) const {
  std::vector<std::string> out;
  for (int32_t id : ids) out.push_back(id_to_token(id));
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  std::vector<std::string> toks;
  for (int32_t id : ids) {
    auto it = impl_->added_by_id.find(id);
    if (it != impl_->added_by_id.end()) {
      const AddedToken& a = impl_->added[it->second];
      if (skip_special_tokens && a.special) continue;
      toks.push_back(a.content);
    } else if (id >= 0 && size_t(id) < impl_->bpe.id_to_token.size()) {
      toks.push_back(impl_->bpe.id_to_token[size_t(id)]);
    }
  }
  if (!impl_->decoder) {
    std::string s;
    for (size_t i = 0; i < toks.size(); ++i) s += (i ? " " : "") + toks[i];
    return s;
  }
  std::string s;
  for (auto& t : impl_->decoder->chain(std::move(toks))) s += t;
  return s;
}

int32_t Tokenizer::token_to_id(std::string_view token) const {
  auto a = impl_->added_by_content.find(std::string(token));
  if (a != impl_->added_by_content.end()) return a->second;
  auto it = impl_->bpe.vocab.find(std::string(token));
  return it == impl_->bpe.vocab.end() ? -1 : it->second;
}

std::string Tokenizer::id_to_token(int32_t id) const {
  auto it = impl_->added_by_id.find(id);
  if (it != impl_->added_by_id.end()) return impl_->added[it->second].content;
  if (id >= 0 && size_t(id) < impl_->bpe.id_to_token.size()) return impl_->bpe.id_to_token[size_t(id)];
  return "";
}

bool Tokenizer::is_special(int32_t id) const {
  auto it = impl_->added_by_id.find(id);
  return it != impl_->added_by_id.end() && impl_->added[it->second].special;
}

bool Tokenizer::is_added(int32_t id) const { return impl_->added_by_id.count(id) > 0; }

int64_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

const std::vector<AddedToken>& Tokenizer::added_tokens() const { return impl_->added; }

// ---------------------------------------------------------------------------------------------

StreamingDetokenizer::StreamingDetokenizer(const Tokenizer& tok, bool skip_special_tokens)
    : tok_(tok), skip_special_(skip_special_tokens) {}

std::string StreamingDetokenizer::push(int32_t id) {
  ids_.push_back(id);
  // Decode with the previous tokens as context so leading-space rules see what the full decode
  // sees; emit only once the new text does not end in an incomplete character.
  std::vector<int32_t> prefix(ids_.begin() + long(prefix_offset_), ids_.begin() + long(read_offset_));
  std::vector<int32_t> all(ids_.begin() + long(prefix_offset_), ids_.end());
  const std::string prefix_text = tok_.decode(prefix, skip_special_);
  const std::string new_text = tok_.decode(all, skip_special_);
  // Holding back is bounded, so that a token costs the same however long the output runs: a
  // valid UTF-8 character completes within k_max_pending tokens (4 bytes at most). Past that
  // (a run of invalid bytes), what is held is emitted as it decodes, replacement characters
  // included, with the last token kept as context.
  constexpr size_t k_max_pending = 4;
  const size_t pending = ids_.size() - read_offset_;
  const bool extends = new_text.size() > prefix_text.size() && new_text.compare(0, prefix_text.size(), prefix_text) == 0;
  std::string delta;
  if (extends) {
    delta = new_text.substr(prefix_text.size());
    const std::string_view replacement = "\xEF\xBF\xBD";
    const bool incomplete = delta.size() >= 3 && std::string_view(delta).substr(delta.size() - 3) == replacement;
    if (incomplete && pending <= k_max_pending) return "";
    prefix_offset_ = incomplete ? ids_.size() - 1 : read_offset_;
  } else {
    if (new_text == prefix_text) {
      // Skipped special tokens are forgotten; other tokens that show nothing yet may still
      // matter to the next one (a leading "▁" before a word), up to the bound.
      bool all_skipped = skip_special_;
      for (size_t i = read_offset_; i < ids_.size() && all_skipped; ++i) all_skipped = tok_.is_special(ids_[i]);
      if (all_skipped) ids_.resize(read_offset_);
      else if (pending > k_max_pending) prefix_offset_ = ids_.size() - 1, read_offset_ = ids_.size();
      return "";
    }
    if (pending <= k_max_pending) return "";
    // The new tokens rewrote the context's text (a held character completed after it was given
    // up on): emit what differs from what the context showed.
    size_t common = 0;
    while (common < prefix_text.size() && common < new_text.size() && prefix_text[common] == new_text[common]) ++common;
    while (common > 0 && (static_cast<unsigned char>(new_text[common]) & 0xC0) == 0x80) --common;
    delta = new_text.substr(common);
    prefix_offset_ = ids_.size() - 1;
  }
  read_offset_ = ids_.size();
  text_ += delta;
  return delta;
}

std::string StreamingDetokenizer::flush() {
  std::vector<int32_t> prefix(ids_.begin() + long(prefix_offset_), ids_.begin() + long(read_offset_));
  std::vector<int32_t> all(ids_.begin() + long(prefix_offset_), ids_.end());
  const std::string prefix_text = tok_.decode(prefix, skip_special_);
  const std::string new_text = tok_.decode(all, skip_special_);
  std::string delta;
  if (new_text.size() > prefix_text.size() && new_text.compare(0, prefix_text.size(), prefix_text) == 0)
    delta = new_text.substr(prefix_text.size());
  prefix_offset_ = read_offset_ = ids_.size();
  text_ += delta;
  return delta;
}

}  // namespace vkvlm
