#include "host/jinja.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <optional>
#include <sstream>
#include <string_view>
#include <unordered_set>

#include "base/error.h"
#include "host/unicode.h"

namespace vkvlm::jinja {

// =============================================================================================
// Values

namespace {
std::string float_repr(double v);

// What one render may do, counted where the work happens: a statement or a loop iteration is a
// step, and so is every 128 bytes an operation reads (strings compared, searched or hashed, lists
// copied or scanned), so a loop over a cheap-looking `x in long_string` costs what it does.
struct RenderMeter {
  static constexpr int64_t max_steps = 1'000'000;
  static constexpr uint64_t work_bytes_per_step = 128;
  static constexpr uint64_t max_bytes_made = 256u << 20;  // bytes of strings and lists built, all told
  int64_t steps = 0;
  uint64_t work_bytes = 0, bytes_made = 0;
  int line = 0;      // the statement running, for the error
  std::string name;  // the template's
  void check() const {
    if (steps + int64_t(work_bytes / work_bytes_per_step) > max_steps)
      fail(name, " line ", line,
           ": the template ran more than 1000000 steps (a loop that is too long, or long strings or lists "
           "compared, searched or copied too often?)");
  }
};
thread_local RenderMeter* g_meter = nullptr;  // the render running on this thread, if any

constexpr size_t max_string_bytes = 16u << 20;  // one string a template builds
[[noreturn]] void string_too_long() { fail("the template built a string longer than 16 MiB"); }

// Counts `bytes` of work against the running render (none outside a render).
void work(uint64_t bytes) {
  if (!g_meter) return;
  g_meter->work_bytes += bytes;
  g_meter->check();
}

// Counts `bytes` of values built (strings, lists) against the running render; `line` for the error.
void made(uint64_t bytes, int line = 0) {
  if (!g_meter) return;
  g_meter->bytes_made += bytes;
  if (g_meter->bytes_made > RenderMeter::max_bytes_made)
    fail(g_meter->name, " line ", line ? line : g_meter->line, ": the template built more than 256 MiB of strings and lists");
}

// Where `needle` next occurs in `hay` at or after `from` (npos: nowhere), in time linear in the
// bytes it reads whatever the text: short needles by the library's search (at most 32 compares
// a byte), longer ones by Knuth-Morris-Pratt, since a naive search of 'aaa…ab' in 'aaa…a' is
// quadratic.
size_t find_text(std::string_view hay, std::string_view needle, size_t from = 0) {
  if (from > hay.size()) return std::string_view::npos;
  const size_t m = needle.size();
  if (m <= 32) {
    const size_t at = hay.find(needle, from);
    work((at == std::string_view::npos ? hay.size() : at + m) - from);
    return at;
  }
  std::vector<uint32_t> border(m, 0);  // border[i]: the longest proper border of needle[0..i]
  for (size_t i = 1, k = 0; i < m; ++i) {
    while (k && needle[i] != needle[k]) k = border[k - 1];
    if (needle[i] == needle[k]) ++k;
    border[i] = uint32_t(k);
  }
  size_t k = 0;
  for (size_t i = from; i < hay.size(); ++i) {
    while (k && hay[i] != needle[k]) k = border[k - 1];
    if (hay[i] == needle[k]) ++k;
    if (k == m) {
      work(m + i + 1 - from);
      return i + 1 - m;
    }
  }
  work(m + hay.size() - from);
  return std::string_view::npos;
}

// How many characters (code points; an invalid byte is one) a UTF-8 string holds.
size_t char_count(std::string_view s) {
  work(s.size());
  // ASCII bytes are characters each; the decoder runs from the first byte that is not.
  size_t i = 0;
  while (i < s.size() && static_cast<unsigned char>(s[i]) < 0x80) ++i;
  size_t n = i;
  for (; i < s.size(); ++n) unicode::next(s, i);
  return n;
}

// The characters of a UTF-8 string by index, with no value per character: ASCII text indexes
// its bytes, other text keeps each character's starting offset (4 bytes a character).
class CharIndex {
 public:
  explicit CharIndex(std::string_view s) : s_(s) {
    work(s.size());
    ascii_ = std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; });
    if (ascii_) return;
    for (size_t i = 0; i < s.size();) {
      starts_.push_back(uint32_t(i));
      unicode::next(s, i);
    }
    starts_.push_back(uint32_t(s.size()));
  }
  size_t size() const { return ascii_ ? s_.size() : starts_.size() - 1; }
  std::string_view at(size_t i) const {
    return ascii_ ? s_.substr(i, 1) : s_.substr(starts_[i], starts_[i + 1] - starts_[i]);
  }

 private:
  std::string_view s_;
  bool ascii_ = true;
  std::vector<uint32_t> starts_;
};
}  // namespace

std::string Dict::hash_key(const Value& k) {
  switch (k.kind()) {
    case Value::Kind::String: work(k.str().size()); return "s" + k.str();
    case Value::Kind::None: return "n";
    case Value::Kind::Bool:
    case Value::Kind::Int: return "i" + std::to_string(k.as_int());
    case Value::Kind::Float: {
      // 2.0 is the key 2, as in Python.
      const double f = k.as_float();
      if (std::isfinite(f) && f == std::floor(f) && std::fabs(f) < 9.2e18) return "i" + std::to_string(int64_t(f));
      return "f" + float_repr(f);
    }
    default: return "";
  }
}

Value* Dict::find(const Value& k) {
  const std::string h = hash_key(k);
  if (h.empty()) return nullptr;
  auto it = index.find(h);
  return it == index.end() ? nullptr : &items[it->second].second;
}
Value* Dict::find(const std::string& k) {
  auto it = index.find("s" + k);
  return it == index.end() ? nullptr : &items[it->second].second;
}

void Dict::set(const Value& k, Value v) {
  const std::string h = hash_key(k);
  if (h.empty()) fail("unhashable type: a ", k.type_name(), " cannot be a dict key");
  auto it = index.find(h);
  if (it != index.end()) {
    items[it->second].second = std::move(v);  // the first key stays, as in Python
    return;
  }
  index.emplace(h, items.size());
  items.push_back({k, std::move(v)});
}
void Dict::set(const std::string& k, Value v) { set(Value(k), std::move(v)); }
void Dict::set(const char* k, Value v) { set(Value(k), std::move(v)); }

static_assert(sizeof(Value) == 32, "a value is 32 bytes: what lists cost is counted at that size");

const std::string& Value::empty_string() {
  static const std::string empty;
  return empty;
}
Value Value::undefined(std::string name) {
  Value v;
  if (!name.empty()) v.ptr_ = std::make_shared<std::string>(std::move(name));
  return v;
}
Value Value::none() {
  Value v;
  v.kind_ = Kind::None;
  return v;
}
Value::Value(bool b) : kind_(Kind::Bool), b_(b) {}
Value::Value(int v) : kind_(Kind::Int), i_(v) {}
Value::Value(int64_t v) : kind_(Kind::Int), i_(v) {}
Value::Value(double v) : kind_(Kind::Float), f_(v) {}
Value::Value(const char* s) : kind_(Kind::String), ptr_(std::make_shared<std::string>(s)) {}
Value::Value(std::string s) : kind_(Kind::String), ptr_(std::make_shared<std::string>(std::move(s))) {}
Value::Value(List l) : kind_(Kind::List), ptr_(std::make_shared<List>(std::move(l))) {
  for (auto& x : list()) depth_ = std::max(depth_, x.depth_);
  if (++depth_ > max_nesting) fail("the template built lists nested deeper than ", max_nesting, " levels");
}

Value& Value::update_depth() {
  if (kind_ != Kind::Dict) return *this;
  int d = 0;
  for (auto& [k, x] : dict_ref().items) d = std::max(d, int(x.depth_));
  if (d + 1 > max_nesting) fail("the template built values nested deeper than ", max_nesting, " levels");
  depth_ = uint16_t(d + 1);
  return *this;
}
Value Value::dict() {
  Value v;
  v.kind_ = Kind::Dict;
  v.ptr_ = std::make_shared<Dict>();
  return v;
}
Value Value::function(Function f) {
  Value v;
  v.kind_ = Kind::Function;
  v.ptr_ = std::make_shared<Function>(std::move(f));
  return v;
}

namespace {
template <typename Json>
Value value_from_json(const Json& j, int depth = 0) {
  if (depth > Value::max_nesting) fail("the template's input is nested deeper than ", Value::max_nesting, " levels");
  switch (j.type()) {
    case Json::value_t::null: return Value::none();
    case Json::value_t::boolean: return Value(j.template get<bool>());
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned: return Value(j.template get<int64_t>());
    case Json::value_t::number_float: return Value(j.template get<double>());
    case Json::value_t::string: return Value(j.template get<std::string>());
    case Json::value_t::array: {
      List l;
      for (auto& x : j) l.push_back(value_from_json(x, depth + 1));
      return Value(std::move(l));
    }
    case Json::value_t::object: {
      Value d = Value::dict();
      for (auto& [k, x] : j.items()) d.dict_ref().set(k, value_from_json(x, depth + 1));
      return d.update_depth();
    }
    default: return Value::none();
  }
}

}  // namespace

Value Value::from_json(const nlohmann::json& j) { return value_from_json(j); }
Value Value::from_json(const nlohmann::ordered_json& j) { return value_from_json(j); }

bool Value::truthy() const {
  switch (kind_) {
    case Kind::Undefined: case Kind::None: return false;
    case Kind::Bool: return b_;
    case Kind::Int: return i_ != 0;
    case Kind::Float: return f_ != 0;
    case Kind::String: return !str().empty();
    case Kind::List: return seq_ == Seq::Iterator || !list().empty();  // a generator object is always true
    case Kind::Dict: return !dict_ref().items.empty();
    case Kind::Function: return true;
  }
  return false;
}

int64_t Value::as_int() const {
  switch (kind_) {
    case Kind::Bool: return b_;
    case Kind::Int: return i_;
    case Kind::Float:
      // Python's int() of a float: truncation; past 64 bits (or NaN, inf) it is an error here.
      if (!(f_ >= -9.223372036854775808e18 && f_ < 9.223372036854775808e18))
        fail("the number ", float_repr(f_), " does not fit a 64-bit integer");
      return int64_t(f_);
    default: fail("expected a number, got ", type_name());
  }
}

double Value::as_float() const {
  switch (kind_) {
    case Kind::Bool: return b_;
    case Kind::Int: return double(i_);
    case Kind::Float: return f_;
    default: fail("expected a number, got ", type_name());
  }
}

std::string Value::type_name() const {
  switch (kind_) {
    case Kind::Undefined: return str().empty() ? "undefined" : "undefined ('" + str() + "')";
    case Kind::None: return "none";
    case Kind::Bool: return "boolean";
    case Kind::Int: return "integer";
    case Kind::Float: return "float";
    case Kind::String: return "string";
    case Kind::List:
      switch (seq_) {
        case Seq::List: return "list";
        case Seq::Tuple: return "tuple";
        case Seq::Iterator: return "generator";
        case Seq::DictItems: return "dict_items";
        case Seq::DictKeys: return "dict_keys";
        case Seq::DictValues: return "dict_values";
      }
      return "list";
    case Kind::Dict: return namespace_ ? "namespace" : "dict";
    case Kind::Function: return "function";
  }
  return "?";
}

namespace {

// Python's repr of a float: shortest round-trip digits, always with a '.' or exponent.
std::string float_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  if (v == 0) return std::signbit(v) ? "-0.0" : "0.0";
  char buf[64];
  // The decimal exponent of the shortest round-trip digits decides the notation, as in Python.
  auto r = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  std::string sci(buf, r.ptr);
  const auto e = sci.find('e');
  const int expo = std::stoi(sci.substr(e + 1));
  if (expo < -4 || expo >= 16) {
    char eb[16];
    std::snprintf(eb, sizeof(eb), "e%c%02d", expo < 0 ? '-' : '+', std::abs(expo));
    return sci.substr(0, e) + eb;
  }
  r = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::fixed);
  std::string s(buf, r.ptr);
  if (s.find('.') == std::string::npos) s += ".0";
  return s;
}

std::string py_str_repr(const std::string& s) {
  // Python prefers single quotes unless the string holds a single quote and no double quote.
  const bool dq = s.find('\'') != std::string::npos && s.find('"') == std::string::npos;
  const char q = dq ? '"' : '\'';
  std::string out(1, q);
  for (unsigned char c : s) {
    if (c == '\\') out += "\\\\";
    else if (c == q) out += std::string("\\") + char(q);
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7F) {
      char b[8];
      std::snprintf(b, sizeof(b), "\\x%02x", c);
      out += b;
    } else out += char(c);
  }
  return out + q;
}

void json_escape(std::string& out, const std::string& s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char b[8];
          std::snprintf(b, sizeof(b), "\\u%04x", c);
          out += b;
        } else {
          out += char(c);
        }
    }
  }
  out += '"';
}

// The text json.dumps makes of a dict key: strings as they are, numbers as Python prints them,
// true/false/null for the rest.
std::string json_key_text(const Value& k) {
  switch (k.kind()) {
    case Value::Kind::String: return k.str();
    case Value::Kind::None: return "null";
    case Value::Kind::Bool: return k.truthy() ? "true" : "false";
    case Value::Kind::Int: return std::to_string(k.as_int());
    case Value::Kind::Float: {
      const double f = k.as_float();
      return std::isnan(f) ? "NaN" : std::isinf(f) ? (f > 0 ? "Infinity" : "-Infinity") : float_repr(f);
    }
    default: fail("keys must be str, int, float, bool or None, not ", k.type_name());
  }
}

// json.dumps(x, ensure_ascii=False, indent=indent) as Python formats it.
void python_json(std::string& out, const Value& v, int indent, int depth, const std::string& item_sep,
                 const std::string& key_sep) {
  if (out.size() > max_string_bytes) string_too_long();
  auto newline = [&](int d) {
    if (out.size() + size_t(indent) * size_t(d) > max_string_bytes) string_too_long();
    out += '\n';
    out.append(size_t(indent * d), ' ');
  };
  switch (v.kind()) {
    case Value::Kind::Undefined:
    case Value::Kind::None: out += "null"; break;
    case Value::Kind::Bool: out += v.truthy() ? "true" : "false"; break;
    case Value::Kind::Int: out += std::to_string(v.as_int()); break;
    case Value::Kind::Float: {
      double f = v.as_float();
      out += std::isnan(f) ? "NaN" : std::isinf(f) ? (f > 0 ? "Infinity" : "-Infinity") : float_repr(f);
      break;
    }
    case Value::Kind::String: json_escape(out, v.str()); break;
    case Value::Kind::List: {
      if (v.seq() != Value::Seq::List && v.seq() != Value::Seq::Tuple)
        fail("Object of type ", v.type_name(), " is not JSON serializable (convert it with |list)");
      const auto& l = v.list();
      if (l.empty()) {
        out += "[]";
        break;
      }
      out += '[';
      for (size_t i = 0; i < l.size(); ++i) {
        if (i) out += item_sep;
        if (indent >= 0) newline(depth + 1);
        python_json(out, l[i], indent, depth + 1, item_sep, key_sep);
      }
      if (indent >= 0) newline(depth);
      out += ']';
      break;
    }
    case Value::Kind::Dict: {
      const auto& d = v.dict_ref();
      if (d.items.empty()) {
        out += "{}";
        break;
      }
      out += '{';
      for (size_t i = 0; i < d.items.size(); ++i) {
        if (i) out += item_sep;
        if (indent >= 0) newline(depth + 1);
        json_escape(out, json_key_text(d.items[i].first));
        out += key_sep;
        python_json(out, d.items[i].second, indent, depth + 1, item_sep, key_sep);
      }
      if (indent >= 0) newline(depth);
      out += '}';
      break;
    }
    case Value::Kind::Function: fail("a function cannot be converted to JSON");
  }
}

// Walks over values (repr, tojson, comparisons) go no deeper than this: a namespace can hold
// itself, which would otherwise recurse without end.
thread_local int g_walk_depth = 0;
struct WalkGuard {
  WalkGuard() {
    if (++g_walk_depth > 2 * Value::max_nesting) {
      g_walk_depth = 0;
      fail("the template's values are nested too deeply (or hold themselves) to be printed or compared");
    }
  }
  ~WalkGuard() {
    if (g_walk_depth > 0) --g_walk_depth;
  }
};

}  // namespace

std::string Value::repr() const {
  const WalkGuard guard;
  switch (kind_) {
    case Kind::Undefined: return "Undefined";  // as repr(jinja2.Undefined()) inside a list or dict
    case Kind::None: return "None";
    case Kind::Bool: return b_ ? "True" : "False";
    case Kind::Int: return std::to_string(i_);
    case Kind::Float: return float_repr(f_);
    case Kind::String: return py_str_repr(str());
    case Kind::List: {
      // Jinja2 prints a generator as its memory address, which no prompt can use.
      if (seq_ == Seq::Iterator) fail("a generator cannot be printed (convert it with |list)");
      const bool tuple = seq_ == Seq::Tuple;
      std::string s = tuple ? "(" : "[";
      for (size_t i = 0; i < list().size(); ++i) {
        if (i) s += ", ";
        s += list()[i].repr();
        if (s.size() > max_string_bytes) string_too_long();
      }
      s += tuple ? (list().size() == 1 ? ",)" : ")") : "]";
      if (seq_ == Seq::DictItems || seq_ == Seq::DictKeys || seq_ == Seq::DictValues) s = type_name() + "(" + s + ")";
      return s;
    }
    case Kind::Dict: {
      std::string s = "{";
      for (size_t i = 0; i < dict_ref().items.size(); ++i) {
        if (i) s += ", ";
        s += dict_ref().items[i].first.repr();
        s += ": ";
        s += dict_ref().items[i].second.repr();
        if (s.size() > max_string_bytes) string_too_long();
      }
      return s + "}";
    }
    case Kind::Function: return "<function>";
  }
  return "";
}

std::string Value::to_output() const {
  switch (kind_) {
    case Kind::Undefined: return "";
    case Kind::String: return str();
    default: return repr();
  }
}

nlohmann::json Value::to_json() const {
  const WalkGuard guard;
  switch (kind_) {
    case Kind::Undefined: case Kind::None: return nullptr;
    case Kind::Bool: return b_;
    case Kind::Int: return i_;
    case Kind::Float: return f_;
    case Kind::String: return str();
    case Kind::List: {
      auto a = nlohmann::json::array();
      for (auto& x : list()) a.push_back(x.to_json());
      return a;
    }
    case Kind::Dict: {
      auto o = nlohmann::json::object();
      for (auto& [k, x] : dict_ref().items) o[json_key_text(k)] = x.to_json();
      return o;
    }
    case Kind::Function: return nullptr;
  }
  return nullptr;
}

Value Args::get(size_t i, const char* name, Value dflt) const {
  for (auto& [k, v] : keyword)
    if (name && k == name) return v;
  if (i < positional.size()) return positional[i];
  return dflt;
}

// =============================================================================================
// Lexing: template text into segments, expressions into tokens.

namespace {

struct Segment {
  enum Kind { Text, Output, Statement } kind;
  std::string text;
  int line;
};


// Finds the end delimiter of a tag, skipping string literals inside it.
size_t find_tag_end(const std::string& src, size_t from, const char* end) {
  char quote = 0;
  for (size_t i = from; i + 1 < src.size(); ++i) {
    char c = src[i];
    if (quote) {
      if (c == '\\') ++i;
      else if (c == quote) quote = 0;
      continue;
    }
    if (c == '\'' || c == '"') {
      quote = c;
      continue;
    }
    if (src.compare(i, 2, end) == 0) return i;
  }
  return std::string::npos;
}

void rstrip_all(std::string& s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
}

std::vector<Segment> segment(const std::string& src, const std::string& name) {
  std::vector<Segment> out;
  std::string text;
  size_t pos = 0;
  // Lines are counted as the scan moves forward (counting from the start at every tag would
  // take quadratic time on a large template).
  size_t counted_to = 0;
  int counted_line = 1;
  auto line_at = [&](size_t at) {
    counted_line += int(std::count(src.begin() + long(counted_to), src.begin() + long(at), '\n'));
    counted_to = at;
    return counted_line;
  };
  // Whitespace control works on the text between two tags only, as Jinja2's lexer does: a
  // '-' never strips across a comment, and lstrip_blocks counts a line as started when the
  // previous tag's match ended with a newline (trim_blocks ate it) or at the template start.
  bool strip_next = false;    // the previous tag closed with '-'
  bool trim_newline = false;  // the previous tag was a block or comment (trim_blocks)
  bool line_starting = true;
  auto flush_text = [&]() {
    if (!text.empty()) out.push_back({Segment::Text, text, 0});
    text.clear();
  };
  while (pos < src.size()) {
    size_t open = src.find('{', pos);
    while (open != std::string::npos && open + 1 < src.size() && src[open + 1] != '{' && src[open + 1] != '%' &&
           src[open + 1] != '#')
      open = src.find('{', open + 1);
    if (open == std::string::npos || open + 1 >= src.size()) open = src.size();
    std::string chunk = src.substr(pos, open - pos);
    if (strip_next) {
      size_t k = 0;
      while (k < chunk.size() && std::isspace(static_cast<unsigned char>(chunk[k]))) ++k;
      line_starting = k > 0 && chunk[k - 1] == '\n';
      chunk.erase(0, k);
    } else if (trim_newline && !chunk.empty() && chunk[0] == '\n') {
      chunk.erase(0, 1);
      line_starting = true;
    }
    strip_next = trim_newline = false;
    if (open >= src.size()) {
      text += chunk;
      break;
    }
    const char kind = src[open + 1];
    const int line = line_at(open);
    size_t inner = open + 2;
    bool left_minus = false, left_plus = false;
    if (inner < src.size() && src[inner] == '-') {
      left_minus = true;
      ++inner;
    } else if (inner < src.size() && src[inner] == '+') {
      left_plus = true;
      ++inner;
    }
    const char* close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    size_t end = kind == '#' ? src.find("#}", inner) : find_tag_end(src, inner, close);
    if (end == std::string::npos)
      fail(name, " line ", line, ": '", src.substr(open, 2), "' is never closed with '", close, "'");
    bool right_minus = false, right_plus = false;
    size_t inner_end = end;
    if (inner_end > inner && src[inner_end - 1] == '-') {
      right_minus = true;
      --inner_end;
    } else if (inner_end > inner && src[inner_end - 1] == '+' && kind != '{') {
      right_plus = true;
      --inner_end;
    }
    if (left_minus) {
      rstrip_all(chunk);
    } else if (kind != '{' && !left_plus) {
      // lstrip_blocks: only spaces and tabs between the line start and the tag go away.
      size_t line_start = chunk.rfind('\n');
      line_start = line_start == std::string::npos ? 0 : line_start + 1;
      if ((line_start > 0 || line_starting) && chunk.find_first_not_of(" \t", line_start) == std::string::npos)
        chunk.resize(line_start);
    }
    text += chunk;
    line_starting = false;
    std::string body = src.substr(inner, inner_end - inner);
    pos = end + 2;
    if (kind == '#') {
      flush_text();  // a comment ends the text before it; whitespace control stops there
    } else if (kind == '{') {
      flush_text();
      out.push_back({Segment::Output, body, line});
    } else {
      // {% raw %} ... {% endraw %} is copied verbatim.
      std::string trimmed = body;
      trimmed.erase(0, trimmed.find_first_not_of(" \t\r\n"));
      trimmed.erase(trimmed.find_last_not_of(" \t\r\n") + 1);
      if (trimmed == "raw") {
        size_t e = src.find("endraw", pos);
        size_t tag = e == std::string::npos ? e : src.rfind("{%", e);
        if (tag == std::string::npos) fail(name, " line ", line, ": {% raw %} without {% endraw %}");
        std::string raw = src.substr(pos, tag - pos);
        // Unlike other blocks, {% raw %} keeps the newline after it (Jinja2 gives it no
        // trim_blocks suffix); '-' strips all whitespace.
        if (right_minus) raw.erase(0, std::min(raw.size(), raw.find_first_not_of(" \t\r\n")));
        size_t close_raw = src.find("%}", e);
        if (close_raw == std::string::npos) fail(name, " line ", line, ": {% endraw %} is never closed");
        const char raw_left = tag + 2 < src.size() ? src[tag + 2] : 0;
        if (raw_left == '-') {
          rstrip_all(raw);
        } else if (raw_left != '+') {
          size_t line_start = raw.rfind('\n');
          if (line_start != std::string::npos && raw.find_first_not_of(" \t", line_start + 1) == std::string::npos)
            raw.resize(line_start + 1);
        }
        text += raw;
        pos = close_raw + 2;
        bool raw_right_minus = close_raw > 0 && src[close_raw - 1] == '-';
        strip_next = raw_right_minus;
        trim_newline = !raw_right_minus;
        continue;
      }
      flush_text();
      out.push_back({Segment::Statement, body, line});
    }
    if (right_minus) strip_next = true;
    else if (kind != '{' && !right_plus) trim_newline = true;
  }
  flush_text();
  return out;
}

struct Token {
  enum Type { Name, Int, Float, String, Op, End } type;
  std::string text;
  int64_t i = 0;
  double f = 0;
};

std::vector<Token> tokenize(const std::string& s, const std::string& where) {
  std::vector<Token> out;
  size_t i = 0;
  static const char* ops2[] = {"==", "!=", "<=", ">=", "//", "**", nullptr};
  while (i < s.size()) {
    char c = s[i];
    if (std::isspace(static_cast<unsigned char>(c))) {
      ++i;
      continue;
    }
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t b = i;
      while (i < s.size() && (std::isalnum(static_cast<unsigned char>(s[i])) || s[i] == '_')) ++i;
      out.push_back({Token::Name, s.substr(b, i - b)});
      continue;
    }
    if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t b = i;
      while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '_')) ++i;
      bool is_float = false;
      if (i + 1 < s.size() && s[i] == '.' && std::isdigit(static_cast<unsigned char>(s[i + 1]))) {
        is_float = true;
        ++i;
        while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
      }
      if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
        size_t k = i + 1;
        if (k < s.size() && (s[k] == '+' || s[k] == '-')) ++k;
        if (k < s.size() && std::isdigit(static_cast<unsigned char>(s[k]))) {
          is_float = true;
          i = k;
          while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
        }
      }
      std::string num = s.substr(b, i - b);
      num.erase(std::remove(num.begin(), num.end(), '_'), num.end());
      Token t{is_float ? Token::Float : Token::Int, num};
      if (is_float) t.f = std::stod(num);
      else t.i = std::stoll(num);
      out.push_back(t);
      continue;
    }
    if (c == '\'' || c == '"') {
      const char q = c;
      std::string v;
      ++i;
      bool closed = false;
      while (i < s.size()) {
        char d = s[i++];
        if (d == q) {
          closed = true;
          break;
        }
        if (d != '\\' || i >= s.size()) {
          v += d;
          continue;
        }
        char e = s[i++];
        switch (e) {
          case 'n': v += '\n'; break;
          case 't': v += '\t'; break;
          case 'r': v += '\r'; break;
          case '0': v += '\0'; break;
          case 'b': v += '\b'; break;
          case 'f': v += '\f'; break;
          case '\\': v += '\\'; break;
          case '\'': v += '\''; break;
          case '"': v += '"'; break;
          case '\n': break;
          case 'x': case 'u': case 'U': {
            const size_t len = e == 'x' ? 2 : e == 'u' ? 4 : 8;
            if (i + len > s.size()) fail(where, ": bad escape in string literal");
            uint32_t cp = uint32_t(std::stoul(s.substr(i, len), nullptr, 16));
            i += len;
            unicode::append(v, cp);
            break;
          }
          default: v += '\\'; v += e;
        }
      }
      if (!closed) fail(where, ": unterminated string literal");
      out.push_back({Token::String, v});
      continue;
    }
    bool matched = false;
    for (const char** o = ops2; *o; ++o)
      if (s.compare(i, 2, *o) == 0) {
        out.push_back({Token::Op, *o});
        i += 2;
        matched = true;
        break;
      }
    if (matched) continue;
    if (std::strchr("+-*/%~|.,:()[]{}<>=!", c)) {
      out.push_back({Token::Op, std::string(1, c)});
      ++i;
      continue;
    }
    fail(where, ": unexpected character '", std::string(1, c), "'");
  }
  out.push_back({Token::End, ""});
  return out;
}

// =============================================================================================
// Expressions

struct Context;

struct Expr {
  int line = 0;
  virtual ~Expr() = default;
  virtual Value eval(Context& ctx) const = 0;
};
using ExprPtr = std::unique_ptr<Expr>;

}  // namespace

// =============================================================================================
// Statements

struct Template::Node {
  enum Kind { Text, Output, If, For, Set, SetBlock, Macro, Break, Continue, FilterBlock, Generation } kind;
  int line = 0;
  std::string text;                                      // Text; Set/SetBlock/Macro target name
  ExprPtr expr;                                          // Output expr, For iterable, Set value
  std::vector<std::pair<ExprPtr, std::vector<std::unique_ptr<Node>>>> branches;  // If
  std::vector<std::unique_ptr<Node>> body, else_body;    // For, SetBlock, Macro, FilterBlock
  std::vector<std::string> targets;                      // For / Set tuple targets
  std::string attr;                                      // Set ns.attr
  ExprPtr filter_cond;                                   // For ... if cond
  std::vector<std::pair<std::string, ExprPtr>> params;   // Macro parameters with defaults
  ExprPtr filter_call;                                   // FilterBlock / SetBlock filter: applied to the body
};

namespace {

enum class Flow { Normal, Break, Continue };

struct Scope {
  std::unordered_map<std::string, Value> vars;
};

struct Context {
  std::vector<std::shared_ptr<Scope>> scopes;
  std::string out;
  std::string name;

  // Reference cycles a render can make: a macro holds the scopes it was defined in (which hold
  // the macro), and a namespace can be given a value that holds it. They are broken when the
  // render ends, so nothing a template built outlives it.
  std::vector<std::shared_ptr<Scope>> macro_scopes;
  std::vector<Value> cyclic_candidates;
  std::unordered_set<const void*> tracked;
  ~Context() {
    for (auto& s : macro_scopes) s->vars.clear();
    for (auto& v : cyclic_candidates) {
      v.dict_ref().items.clear();
      v.dict_ref().index.clear();
    }
  }
  void track_macro_scopes(const std::vector<std::shared_ptr<Scope>>& defining, int line) {
    for (size_t i = 1; i < defining.size(); ++i)  // scopes[0] is the shared globals: never cleared
      if (tracked.insert(defining[i].get()).second) {
        charge(256, line);
        macro_scopes.push_back(defining[i]);
      }
  }
  void track_namespace(const Value& ns, int line) {
    if (!tracked.insert(&ns.dict_ref()).second) return;
    charge(256, line);
    cyclic_candidates.push_back(ns);
  }

  // What one render may take. Chat templates take a few thousand steps and produce a few
  // kilobytes; these are far past any of them and far short of hurting the process.
  static constexpr size_t max_output = 16u << 20;   // bytes rendered
  static constexpr size_t max_string = max_string_bytes;  // bytes in one string value
  static constexpr size_t max_list = 1u << 20;      // items in one list value
  static constexpr int max_calls = 64;              // macro calls inside macro calls
  RenderMeter meter;  // steps and work (see RenderMeter)
  int calls = 0;

  void charge(uint64_t bytes, int line) { made(bytes, line); }

  void step(int line) {
    meter.line = line;
    ++meter.steps;
    meter.check();
  }
  void check_output(int line) {
    if (out.size() > max_output) error(line, "the template rendered more than 16 MiB");
  }
  // A value a template computed: strings and lists within their limits.
  const Value& checked(const Value& v, int line) {
    if (v.is_string() && v.str().size() > max_string) error(line, "the template built a string longer than 16 MiB");
    if (v.is_list() && v.list().size() > max_list) error(line, "the template built a list of more than 1048576 items");
    charge(v.is_string() ? v.str().size() : v.is_list() ? v.list().size() * sizeof(Value) : 0, line);
    return v;
  }

  Value lookup(const std::string& n) const {
    for (auto it = scopes.rbegin(); it != scopes.rend(); ++it) {
      auto f = (*it)->vars.find(n);
      if (f != (*it)->vars.end()) return f->second;
    }
    return Value::undefined(n);
  }
  void set(const std::string& n, Value v) { scopes.back()->vars[n] = std::move(v); }
  [[noreturn]] void error(int line, const std::string& msg) const { fail(name, " line ", line, ": ", msg); }
};

Flow exec_body(const std::vector<std::unique_ptr<Template::Node>>& body, Context& ctx);

// ---- value operations -------------------------------------------------------------------------

bool equals(const Value& a, const Value& b) {
  const WalkGuard guard;
  work(sizeof(Value));
  if (a.is_number() && b.is_number()) return a.as_float() == b.as_float();
  if (a.kind() == Value::Kind::Bool && b.is_number()) return double(a.truthy()) == b.as_float();
  if (b.kind() == Value::Kind::Bool && a.is_number()) return double(b.truthy()) == a.as_float();
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case Value::Kind::Undefined: case Value::Kind::None: return true;
    case Value::Kind::Bool: return a.truthy() == b.truthy();
    case Value::Kind::String:
      if (a.str().size() != b.str().size()) return false;
      work(a.str().size());
      return a.str() == b.str();
    case Value::Kind::List: {
      if (a.list().size() != b.list().size()) return false;
      for (size_t i = 0; i < a.list().size(); ++i)
        if (!equals(a.list()[i], b.list()[i])) return false;
      return true;
    }
    case Value::Kind::Dict: {
      auto& da = a.dict_ref();
      auto& db = b.dict_ref();
      if (da.items.size() != db.items.size()) return false;
      for (auto& [k, v] : da.items) {
        auto* o = db.find(k);  // equal keys have equal hash keys
        if (!o || !equals(v, *o)) return false;
      }
      return true;
    }
    default: return false;
  }
}

int compare(const Value& a, const Value& b, int line, Context& ctx) {
  const WalkGuard guard;
  work(sizeof(Value));
  if (a.is_number() && b.is_number()) {
    double x = a.as_float(), y = b.as_float();
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (a.is_string() && b.is_string()) {
    work(std::min(a.str().size(), b.str().size()));
    const int c = a.str().compare(b.str());
    return c < 0 ? -1 : c > 0 ? 1 : 0;
  }
  if (a.is_list() && b.is_list()) {
    for (size_t i = 0; i < std::min(a.list().size(), b.list().size()); ++i) {
      int c = compare(a.list()[i], b.list()[i], line, ctx);
      if (c) return c;
    }
    return a.list().size() < b.list().size() ? -1 : a.list().size() > b.list().size() ? 1 : 0;
  }
  ctx.error(line, "cannot compare " + a.type_name() + " with " + b.type_name());
}

bool contains(const Value& container, const Value& item, int line, Context& ctx) {
  if (container.is_string()) {
    if (!item.is_string()) ctx.error(line, "'in <string>' needs a string on the left, not " + item.type_name());
    return find_text(container.str(), item.str()) != std::string::npos;
  }
  if (container.is_list()) {
    for (auto& x : container.list())
      if (equals(x, item)) return true;
    return false;
  }
  if (container.is_dict()) {
    if (Dict::hash_key(item).empty()) ctx.error(line, "unhashable type: a " + item.type_name() + " cannot be a dict key");
    return container.dict_ref().find(item) != nullptr;
  }
  if (container.is_undefined()) return false;  // Jinja2's Undefined is an empty container
  ctx.error(line, "'in' needs a string, list or dict, not " + container.type_name());
}

// The items a for loop or a filter walks over. A generator is used up by it.
List iterate(const Value& v, int line, Context& ctx) {
  if (v.is_list()) {
    work(v.list().size() * sizeof(Value));
    if (v.seq() != Value::Seq::Iterator) return v.list();
    List items = std::move(v.list());
    v.list().clear();
    return items;
  }
  if (v.is_dict()) {
    work(v.dict_ref().items.size() * sizeof(Value));
    List keys;
    for (auto& [k, x] : v.dict_ref().items) keys.push_back(k);
    return keys;
  }
  if (v.is_string()) {
    // A string walks as its characters, one value each: sized before they are made.
    const CharIndex cs(v.str());
    if (cs.size() > Context::max_list) ctx.error(line, "the template built a list of more than 1048576 items");
    ctx.charge(cs.size() * (sizeof(Value) + 32), line);
    List chars;
    chars.reserve(cs.size());
    for (size_t i = 0; i < cs.size(); ++i) chars.push_back(Value(std::string(cs.at(i))));
    return chars;
  }
  if (v.is_undefined()) return {};
  // None is not iterable in Jinja2 either; a template guards optional lists with {% if %}.
  if (v.is_none()) ctx.error(line, "'NoneType' object is not iterable");
  ctx.error(line, "cannot iterate over " + v.type_name());
}

std::string str_strip(const std::string& s, const std::string& chars, bool left, bool right) {
  auto is_strip = [&](char c) {
    return chars.empty() ? std::isspace(static_cast<unsigned char>(c)) != 0 : chars.find(c) != std::string::npos;
  };
  size_t b = 0, e = s.size();
  if (left)
    while (b < e && is_strip(s[b])) ++b;
  if (right)
    while (e > b && is_strip(s[e - 1])) --e;
  return s.substr(b, e - b);
}

std::string str_title(const std::string& s) {
  std::string out = s;
  bool start = true;
  for (auto& c : out) {
    if (std::isalpha(static_cast<unsigned char>(c))) {
      c = char(start ? std::toupper(static_cast<unsigned char>(c)) : std::tolower(static_cast<unsigned char>(c)));
      start = false;
    } else {
      start = true;
    }
  }
  return out;
}

std::string str_upper(const std::string& s) {
  std::string o = s;
  for (auto& c : o) c = char(std::toupper(static_cast<unsigned char>(c)));
  return o;
}
std::string str_lower(const std::string& s) {
  std::string o = s;
  for (auto& c : o) c = char(std::tolower(static_cast<unsigned char>(c)));
  return o;
}

// str.splitlines(): \n, \r, \r\n, \v, \f, \x1c-\x1e, U+0085, U+2028 and U+2029 end a line.
// Hands each line to `fn` in turn (none held at once).
template <typename F>
void py_splitlines(std::string_view s, F&& fn) {
  size_t start = 0;
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t brk = 0;
    if (c == '\r') brk = i + 1 < s.size() && s[i + 1] == '\n' ? 2 : 1;
    else if (c == '\n' || c == '\v' || c == '\f' || (c >= 0x1c && c <= 0x1e)) brk = 1;
    else if (c == 0xC2 && i + 1 < s.size() && static_cast<unsigned char>(s[i + 1]) == 0x85) brk = 2;
    else if (c == 0xE2 && i + 2 < s.size() && static_cast<unsigned char>(s[i + 1]) == 0x80 &&
             (static_cast<unsigned char>(s[i + 2]) == 0xA8 || static_cast<unsigned char>(s[i + 2]) == 0xA9))
      brk = 3;
    if (brk) {
      fn(s.substr(start, i - start));
      i += brk;
      start = i;
    } else {
      ++i;
    }
  }
  if (start < s.size()) fn(s.substr(start));
}

// markupsafe.escape.
std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&#34;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string str_replace(const std::string& s, const std::string& from, const std::string& to, int64_t count) {
  if (from.empty()) return s;
  std::string out;
  size_t pos = 0;
  int64_t n = 0;
  while (count < 0 || n < count) {
    size_t f = find_text(s, from, pos);
    if (f == std::string::npos) break;
    if (out.size() + (f - pos) + to.size() > max_string_bytes) string_too_long();
    out.append(s, pos, f - pos);
    out += to;
    pos = f + from.size();
    ++n;
  }
  if (out.size() + (s.size() - pos) > max_string_bytes) string_too_long();
  out.append(s, pos, std::string::npos);
  return out;
}

List str_split(const std::string& s, const Value& sep, int64_t maxsplit) {
  List out;
  if (sep.is_undefined() || sep.is_none()) {
    size_t i = 0;
    int64_t n = 0;
    while (i < s.size()) {
      while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
      if (i >= s.size()) break;
      if (maxsplit >= 0 && n == maxsplit) {
        std::string rest = s.substr(i);
        while (!rest.empty() && std::isspace(static_cast<unsigned char>(rest.back()))) rest.pop_back();
        out.push_back(Value(rest));
        return out;
      }
      size_t b = i;
      while (i < s.size() && !std::isspace(static_cast<unsigned char>(s[i]))) ++i;
      if (out.size() >= (1u << 20)) fail("the template built a list of more than 1048576 items");
      out.push_back(Value(s.substr(b, i - b)));
      ++n;
    }
    return out;
  }
  const std::string& d = sep.str();
  if (d.empty()) fail("split: empty separator");
  size_t pos = 0;
  int64_t n = 0;
  while (maxsplit < 0 || n < maxsplit) {
    if (out.size() >= (1u << 20)) fail("the template built a list of more than 1048576 items");
    size_t f = find_text(s, d, pos);
    if (f == std::string::npos) break;
    out.push_back(Value(s.substr(pos, f - pos)));
    pos = f + d.size();
    ++n;
  }
  out.push_back(Value(s.substr(pos)));
  return out;
}

// Python slicing of lists and strings.
Value slice(const Value& v, const Value& start, const Value& stop, const Value& step, int line, Context& ctx) {
  int64_t st = step.is_undefined() || step.is_none() ? 1 : step.as_int();
  if (st == 0) ctx.error(line, "slice step cannot be zero");
  std::optional<CharIndex> chars;
  int64_t n;
  if (v.is_string()) {
    chars.emplace(v.str());
    n = int64_t(chars->size());
  } else if (v.is_list()) {
    n = int64_t(v.list().size());
  } else {
    ctx.error(line, "cannot slice " + v.type_name());
  }
  auto norm = [&](const Value& x, int64_t dflt) {
    if (x.is_undefined() || x.is_none()) return dflt;
    int64_t i = x.as_int();
    if (i < 0) i += n;
    if (st > 0) return std::clamp<int64_t>(i, 0, n);
    return std::clamp<int64_t>(i, -1, n - 1);
  };
  const int64_t b = norm(start, st > 0 ? 0 : n - 1), e = norm(stop, st > 0 ? n : -1);
  // Each index of the slice in order; the count first, so nothing is built past the limits.
  const int64_t count = st > 0 ? (e > b ? (e - b - 1) / st + 1 : 0)
                               : (b > e ? int64_t(uint64_t(b - e - 1) / (uint64_t(0) - uint64_t(st))) + 1 : 0);
  if (v.is_string()) {
    std::string s;
    for (int64_t k = 0; k < count; ++k) s += chars->at(size_t(b + k * st));
    return Value(s);
  }
  List l;
  l.reserve(size_t(count));
  for (int64_t k = 0; k < count; ++k) l.push_back(v.list()[size_t(b + k * st)]);
  return Value(l);
}

Value call_value(const Value& f, Args& args, int line, Context& ctx) {
  if (!f.is_function()) {
    if (f.is_undefined()) ctx.error(line, "'" + f.undefined_name() + "' is undefined and cannot be called");
    ctx.error(line, "a " + f.type_name() + " is not callable");
  }
  args.line = line;
  try {
    return f.fn()(args);
  } catch (const Error& e) {
    std::string m = e.what();
    if (m.rfind(ctx.name, 0) == 0) throw;
    ctx.error(line, m);
  }
}

// One replacement field of str.format: [[fill]align][sign][0][width][,][.precision][type].
std::string format_field(const Value& v, const std::string& spec) {
  size_t i = 0;
  char fill = ' ', align = 0, sign = '-';
  auto is_align = [](char c) { return c == '<' || c == '>' || c == '^' || c == '='; };
  if (spec.size() >= 2 && is_align(spec[1])) {
    fill = spec[0];
    align = spec[1];
    i = 2;
  } else if (!spec.empty() && is_align(spec[0])) {
    align = spec[0];
    i = 1;
  }
  if (i < spec.size() && (spec[i] == '+' || spec[i] == '-' || spec[i] == ' ')) sign = spec[i++];
  if (i < spec.size() && spec[i] == '0') {
    if (!align) {
      fill = '0';
      align = '=';
    }
    ++i;
  }
  int64_t width = 0, precision = -1;
  while (i < spec.size() && std::isdigit(static_cast<unsigned char>(spec[i])) && width < 100000) width = width * 10 + (spec[i++] - '0');
  bool thousands = false;
  if (i < spec.size() && spec[i] == ',') {
    thousands = true;
    ++i;
  }
  if (i < spec.size() && spec[i] == '.') {
    precision = 0;
    ++i;
    while (i < spec.size() && std::isdigit(static_cast<unsigned char>(spec[i])) && precision < 1000)
      precision = precision * 10 + (spec[i++] - '0');
  }
  char type = i < spec.size() ? spec[i++] : 0;
  if (i != spec.size() || width >= 100000 || precision >= 1000)
    fail("format spec '", spec, "' is not supported (fill, align, sign, 0, width, ',', precision and one of s d f e g % are)");
  std::string body;
  bool numeric = false;
  const bool is_int = v.kind() == Value::Kind::Int || v.kind() == Value::Kind::Bool;
  if (type == 's' || (type == 0 && !v.is_number() && v.kind() != Value::Kind::Bool)) {
    if (v.is_number() || v.kind() == Value::Kind::Bool) fail("format code 's' is for strings, not ", v.type_name());
    body = v.to_output();
    if (precision >= 0) {
      size_t end = 0;
      for (int64_t k = 0; k < precision && end < body.size(); ++k) unicode::next(body, end);
      body.resize(end);
    }
  } else {
    if (!v.is_number() && v.kind() != Value::Kind::Bool) fail("format code '", std::string(1, type), "' is for numbers, not ", v.type_name());
    numeric = true;
    char buf[512];
    const double f = v.as_float();
    if (type == 'd' || (type == 0 && is_int && precision < 0)) {
      if (!is_int) fail("format code 'd' is for integers, not float");
      body = std::to_string(v.as_int());
    } else if (type == 'f' || type == 'F' || type == '%') {
      std::snprintf(buf, sizeof(buf), "%.*f", int(precision < 0 ? 6 : precision), type == '%' ? f * 100 : f);
      body = std::string(buf) + (type == '%' ? "%" : "");
    } else if (type == 'e' || type == 'E') {
      std::snprintf(buf, sizeof(buf), type == 'e' ? "%.*e" : "%.*E", int(precision < 0 ? 6 : precision), f);
      body = buf;
    } else if (type == 'g' || type == 'G') {
      std::snprintf(buf, sizeof(buf), type == 'g' ? "%.*g" : "%.*G", int(precision < 0 ? 6 : precision == 0 ? 1 : precision), f);
      body = buf;
    } else if (type == 0) {
      if (precision >= 0) {
        std::snprintf(buf, sizeof(buf), "%.*g", int(precision == 0 ? 1 : precision), f);
        body = buf;
        if (body.find_first_of(".e") == std::string::npos) body += ".0";
      } else {
        body = float_repr(f);
      }
    } else {
      fail("format code '", std::string(1, type), "' is not supported");
    }
    if (thousands) {
      size_t start = body[0] == '-' ? 1 : 0;
      size_t end = body.find_first_not_of("0123456789", start);
      if (end == std::string::npos) end = body.size();
      for (int64_t k = int64_t(end) - 3; k > int64_t(start); k -= 3) body.insert(size_t(k), ",");
    }
    if (body[0] != '-' && sign != '-') body = std::string(1, sign) + body;
  }
  if (!align) align = numeric ? '>' : '<';
  const int64_t n = int64_t(char_count(body));
  if (n >= width) return body;
  const size_t pad = size_t(width - n);
  if (align == '<') return body + std::string(pad, fill);
  if (align == '>') return std::string(pad, fill) + body;
  if (align == '^') return std::string(pad / 2, fill) + body + std::string(pad - pad / 2, fill);
  // '=': padding between the sign and the digits.
  size_t after_sign = !body.empty() && (body[0] == '-' || body[0] == '+' || body[0] == ' ') ? 1 : 0;
  return body.substr(0, after_sign) + std::string(pad, fill) + body.substr(after_sign);
}

// str.format: {} (numbered in order), {0}, {name}, {name.attr}, {0[key]}, !r / !s, a format
// spec, and {{ }} for braces.
std::string py_format(const std::string& fmt, const Args& args, bool escape_args) {
  std::string out;
  int auto_index = 0;
  bool manual = false;
  for (size_t i = 0; i < fmt.size();) {
    const char c = fmt[i];
    if (c == '}') {
      if (i + 1 < fmt.size() && fmt[i + 1] == '}') {
        out += '}';
        i += 2;
        continue;
      }
      fail("format string: single '}' encountered");
    }
    if (c != '{') {
      out += c;
      ++i;
      continue;
    }
    if (i + 1 < fmt.size() && fmt[i + 1] == '{') {
      out += '{';
      i += 2;
      continue;
    }
    const size_t close = fmt.find('}', i + 1);
    if (close == std::string::npos) fail("format string: '{' is never closed");
    std::string field = fmt.substr(i + 1, close - i - 1);
    i = close + 1;
    std::string spec, conversion;
    if (size_t colon = field.find(':'); colon != std::string::npos) {
      spec = field.substr(colon + 1);
      field.resize(colon);
    }
    if (size_t bang = field.find('!'); bang != std::string::npos) {
      conversion = field.substr(bang + 1);
      field.resize(bang);
      if (conversion != "r" && conversion != "s") fail("format string: unknown conversion '!", conversion, "'");
    }
    size_t name_end = field.find_first_of(".[");
    std::string name = field.substr(0, name_end);
    Value v;
    if (name.empty()) {
      if (manual) fail("format string: cannot switch from manual field numbering to automatic");
      if (size_t(auto_index) >= args.positional.size()) fail("format string: replacement index ", auto_index, " out of range");
      v = args.positional[size_t(auto_index++)];
    } else if (std::all_of(name.begin(), name.end(), ::isdigit)) {
      if (auto_index) fail("format string: cannot switch from automatic field numbering to manual");
      manual = true;
      const size_t k = name.size() > 9 ? SIZE_MAX : size_t(std::stoul(name));
      if (k >= args.positional.size()) fail("format string: replacement index ", name, " out of range");
      v = args.positional[k];
    } else {
      bool found = false;
      for (auto& [k, x] : args.keyword)
        if (k == name) v = x, found = true;
      if (!found) fail("format string: no argument named '", name, "'");
    }
    // .attr and [key] after the name.
    for (size_t p = name_end; p != std::string::npos && p < field.size();) {
      if (field[p] == '.') {
        size_t e = field.find_first_of(".[", p + 1);
        std::string attr = field.substr(p + 1, e == std::string::npos ? std::string::npos : e - p - 1);
        Value* x = v.is_dict() ? v.dict_ref().find(attr) : nullptr;
        if (!x) fail("format string: ", v.type_name(), " has no attribute '", attr, "'");
        v = *x;
        p = e;
      } else {
        size_t e = field.find(']', p);
        if (e == std::string::npos) fail("format string: '[' without ']'");
        std::string key = field.substr(p + 1, e - p - 1);
        const bool digits = !key.empty() && key.size() < 10 && std::all_of(key.begin(), key.end(), ::isdigit);
        if (v.is_list() && digits && std::stoul(key) < v.list().size()) {
          v = v.list()[std::stoul(key)];
        } else if (Value* x = v.is_dict() ? (digits ? v.dict_ref().find(Value(int64_t(std::stoul(key)))) : nullptr) : nullptr) {
          v = *x;
        } else if (Value* y = v.is_dict() ? v.dict_ref().find(key) : nullptr) {
          v = *y;
        } else {
          fail("format string: no item [", key, "]");
        }
        p = e + 1;
      }
    }
    if (conversion == "r") v = Value(v.repr());
    else if (conversion == "s") v = Value(v.to_output());
    std::string piece = format_field(v, spec);
    out += escape_args && !v.markup() ? html_escape(piece) : piece;
    if (out.size() > (16u << 20)) fail("format string: the result is longer than 16 MiB");
  }
  return out;
}

// A dict's (key, value) pairs as tuples.
Value dict_items(const Dict& d) {
  made(d.items.size() * (64 + 3 * sizeof(Value)));  // a tuple each
  List l;
  for (auto& [k, v] : d.items) l.push_back(Value(List{k, v}).set_seq(Value::Seq::Tuple));
  return Value(std::move(l));
}

// Methods of strings, lists and dicts, bound to their object.
Value method(const Value& obj, const std::string& name, int line, Context& ctx) {
  auto bind = [&](auto&& f) { return Value::function([obj, f](Args& a) { return f(obj, a); }); };
  if (obj.is_string()) {
    if (name == "strip" || name == "lstrip" || name == "rstrip")
      return bind([name](const Value& o, Args& a) {
        Value c = a.get(0, "chars");
        std::string chars = c.is_string() ? c.str() : "";
        return Value(str_strip(o.str(), chars, name != "rstrip", name != "lstrip"));
      });
    if (name == "format")
      return bind([](const Value& o, Args& a) { return Value(py_format(o.str(), a, o.markup())).set_markup(o.markup()); });
    if (name == "upper") return bind([](const Value& o, Args&) { return Value(str_upper(o.str())); });
    if (name == "lower") return bind([](const Value& o, Args&) { return Value(str_lower(o.str())); });
    if (name == "title") return bind([](const Value& o, Args&) { return Value(str_title(o.str())); });
    if (name == "capitalize")
      return bind([](const Value& o, Args&) {
        std::string s = str_lower(o.str());
        if (!s.empty()) s[0] = char(std::toupper(static_cast<unsigned char>(s[0])));
        return Value(s);
      });
    if (name == "startswith" || name == "endswith")
      return bind([name](const Value& o, Args& a) {
        Value p = a.get(0, "prefix");
        List cands = p.is_list() ? p.list() : List{p};
        for (auto& c : cands) {
          if (!c.is_string()) fail(name, "() takes strings");
          const std::string& s = o.str();
          const std::string& x = c.str();
          work(x.size());
          bool hit = name == "startswith" ? s.compare(0, x.size(), x) == 0
                                          : s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0;
          if (hit) return Value(true);
        }
        return Value(false);
      });
    if (name == "replace")
      return bind([](const Value& o, Args& a) {
        Value from = a.get(0, "old"), to = a.get(1, "new"), count = a.get(2, "count", Value(int64_t(-1)));
        if (!from.is_string() || !to.is_string()) fail("replace() takes two strings");
        return Value(str_replace(o.str(), from.str(), to.str(), count.as_int()));
      });
    if (name == "split" || name == "rsplit")
      return bind([](const Value& o, Args& a) {
        return Value(str_split(o.str(), a.get(0, "sep"), a.get(1, "maxsplit", Value(int64_t(-1))).as_int()));
      });
    if (name == "join")
      return bind([](const Value& o, Args& a) {
        std::string s;
        Value items = a.get(0, "iterable");
        if (!items.is_list()) fail("join() takes a list");
        for (size_t i = 0; i < items.list().size(); ++i) {
          if (i) s += o.str();
          s += items.list()[i].to_output();
          if (s.size() > max_string_bytes) string_too_long();
        }
        return Value(s);
      });
    if (name == "find" || name == "count")
      return bind([name](const Value& o, Args& a) {
        Value x = a.get(0, "sub");
        if (!x.is_string()) fail(name, "() takes a string");
        const std::string& s = o.str();
        const std::string& sub = x.str();
        if (name == "find") {
          size_t f = find_text(s, sub);
          return Value(f == std::string::npos ? int64_t(-1) : int64_t(char_count(std::string_view(s).substr(0, f))));
        }
        if (sub.empty()) return Value(int64_t(char_count(s)) + 1);  // as Python: between every character
        int64_t n = 0;
        for (size_t p = find_text(s, sub); p != std::string::npos; p = find_text(s, sub, p + sub.size())) ++n;
        return Value(n);
      });
    if (name == "isdigit" || name == "isspace" || name == "isalpha" || name == "isalnum" || name == "isupper" ||
        name == "islower")
      return bind([name](const Value& o, Args&) {
        const std::string& s = o.str();
        if (s.empty()) return Value(false);
        for (unsigned char c : s) {
          bool ok = name == "isdigit" ? std::isdigit(c) : name == "isspace" ? std::isspace(c) : name == "isalpha" ? std::isalpha(c)
                    : name == "isalnum" ? std::isalnum(c) : name == "isupper" ? !std::islower(c) : !std::isupper(c);
          if (!ok) return Value(false);
        }
        return Value(true);
      });
  } else if (obj.is_dict() && !obj.namespace_object()) {
    if (name == "items")
      return bind([](const Value& o, Args&) { return dict_items(o.dict_ref()).set_seq(Value::Seq::DictItems); });
    if (name == "keys")
      return bind([](const Value& o, Args&) {
        List l;
        for (auto& [k, v] : o.dict_ref().items) l.push_back(k);
        return Value(l).set_seq(Value::Seq::DictKeys);
      });
    if (name == "values")
      return bind([](const Value& o, Args&) {
        List l;
        for (auto& [k, v] : o.dict_ref().items) l.push_back(v);
        return Value(l).set_seq(Value::Seq::DictValues);
      });
    if (name == "get")
      return bind([](const Value& o, Args& a) {
        Value* v = o.dict_ref().find(a.get(0, "key"));
        return v ? *v : a.get(1, "default", Value::none());
      });
  }
  // transformers renders in Jinja2's immutable sandbox: methods that change a list or a dict
  // are refused (SecurityError there), so templates cannot build cycles or grow values in place.
  static const char* mutating_list[] = {"append", "extend", "insert", "pop", "remove", "reverse", "sort", "clear"};
  static const char* mutating_dict[] = {"clear", "pop", "popitem", "setdefault", "update"};
  if ((obj.is_list() && std::find(std::begin(mutating_list), std::end(mutating_list), name) != std::end(mutating_list)) ||
      (obj.is_dict() && !obj.namespace_object() &&
       std::find(std::begin(mutating_dict), std::end(mutating_dict), name) != std::end(mutating_dict))) {
    const std::string what = "access to attribute '" + name + "' of '" + (obj.is_list() ? "list" : "dict") +
                             "' object is unsafe (chat templates render in an immutable sandbox)";
    return Value::function([what](Args&) -> Value { fail(what); });
  }
  if (obj.is_list()) {
    if (name == "index")
      return bind([](const Value& o, Args& a) {
        Value x = a.get(0, "value");
        for (size_t i = 0; i < o.list().size(); ++i)
          if (equals(o.list()[i], x)) return Value(int64_t(i));
        fail("index(): value is not in the list");
      });
  }
  (void)ctx;
  (void)line;
  return Value::undefined(name);
}

Value get_attr(const Value& obj, const std::string& name, int line, Context& ctx) {
  if (obj.is_dict()) {
    if (!obj.namespace_object()) {
      Value m = method(obj, name, line, ctx);
      if (!m.is_undefined()) return m;
    }
    if (Value* v = obj.dict_ref().find(name)) return *v;
    return Value::undefined(name);
  }
  if (obj.is_undefined()) ctx.error(line, "'" + obj.undefined_name() + "' is undefined (reading ." + name + ")");
  return method(obj, name, line, ctx);
}

Value get_item(const Value& obj, const Value& key, int line, Context& ctx) {
  if (obj.is_dict()) {
    if (Value* v = obj.dict_ref().find(key)) return *v;
    return Value::undefined(key.is_string() ? key.str() : key.repr());
  }
  // A generator has no items (Jinja2 falls back to an undefined attribute).
  if (obj.is_list() && obj.seq() != Value::Seq::List && obj.seq() != Value::Seq::Tuple) return Value::undefined();
  if (obj.is_list() || obj.is_string()) {
    if (key.is_string()) return get_attr(obj, key.str(), line, ctx);
    if (!key.is_number()) ctx.error(line, "list indices must be integers, not " + key.type_name());
    int64_t i = key.as_int();
    if (obj.is_list()) {
      int64_t n = int64_t(obj.list().size());
      if (i < 0) i += n;
      if (i < 0 || i >= n) return Value::undefined("[" + std::to_string(key.as_int()) + "]");
      return obj.list()[size_t(i)];
    }
    const std::string& s = obj.str();
    if (i < 0) i += int64_t(char_count(s));
    if (i < 0) return Value::undefined();
    size_t at = 0;
    for (int64_t k = 0; k < i && at < s.size(); ++k) unicode::next(s, at);
    if (at >= s.size()) return Value::undefined();
    size_t end = at;
    unicode::next(s, end);
    work(end);
    return Value(s.substr(at, end - at));
  }
  if (obj.is_undefined()) ctx.error(line, "'" + obj.undefined_name() + "' is undefined (reading [" + key.to_output() + "])");
  ctx.error(line, "cannot index a " + obj.type_name());
}

// ---- expression nodes ---------------------------------------------------------------------

struct Literal : Expr {
  Value v;
  Value eval(Context&) const override { return v; }
};
struct NameExpr : Expr {
  std::string name;
  Value eval(Context& ctx) const override { return ctx.lookup(name); }
};
struct ListExpr : Expr {
  std::vector<ExprPtr> items;
  bool tuple = false;  // (a, b) rather than [a, b]: prints with parentheses
  Value eval(Context& ctx) const override {
    List l;
    for (auto& e : items) l.push_back(e->eval(ctx));
    return Value(std::move(l)).set_seq(tuple ? Value::Seq::Tuple : Value::Seq::List);
  }
};
struct DictExpr : Expr {
  std::vector<std::pair<ExprPtr, ExprPtr>> items;
  Value eval(Context& ctx) const override {
    Value d = Value::dict();
    for (auto& [k, v] : items) {
      Value key = k->eval(ctx);
      if (Dict::hash_key(key).empty()) ctx.error(line, "unhashable type: a " + key.type_name() + " cannot be a dict key");
      d.dict_ref().set(key, v->eval(ctx));
    }
    return d.update_depth();
  }
};
struct AttrExpr : Expr {
  ExprPtr obj;
  std::string name;
  Value eval(Context& ctx) const override { return get_attr(obj->eval(ctx), name, line, ctx); }
};
struct ItemExpr : Expr {
  ExprPtr obj, key;
  Value eval(Context& ctx) const override { return get_item(obj->eval(ctx), key->eval(ctx), line, ctx); }
};
struct SliceExpr : Expr {
  ExprPtr obj, start, stop, step;
  Value eval(Context& ctx) const override {
    auto ev = [&](const ExprPtr& e) { return e ? e->eval(ctx) : Value(); };
    return slice(obj->eval(ctx), ev(start), ev(stop), ev(step), line, ctx);
  }
};
struct CallArgs {
  std::vector<ExprPtr> positional;
  std::vector<std::pair<std::string, ExprPtr>> keyword;
  Args eval(Context& ctx) const {
    Args a;
    for (auto& e : positional) a.positional.push_back(e->eval(ctx));
    for (auto& [k, e] : keyword) a.keyword.push_back({k, e->eval(ctx)});
    return a;
  }
};
struct CallExpr : Expr {
  ExprPtr callee;
  CallArgs args;
  Value eval(Context& ctx) const override {
    Value f = callee->eval(ctx);
    Args a = args.eval(ctx);
    return ctx.checked(call_value(f, a, line, ctx), line);
  }
};

Value apply_filter(const std::string& name, const Value& v, Args& args, int line, Context& ctx);
bool apply_test(const std::string& name, const Value& v, Args& args, int line, Context& ctx);

struct FilterExpr : Expr {
  ExprPtr input;
  std::string name;
  CallArgs args;
  Value eval(Context& ctx) const override {
    Value v = input->eval(ctx);
    Args a = args.eval(ctx);
    return ctx.checked(apply_filter(name, v, a, line, ctx), line);
  }
};
struct TestExpr : Expr {
  ExprPtr input;
  std::string name;
  CallArgs args;
  bool negated = false;
  Value eval(Context& ctx) const override {
    Value v = input->eval(ctx);
    Args a = args.eval(ctx);
    return Value(apply_test(name, v, a, line, ctx) != negated);
  }
};
struct CondExpr : Expr {
  ExprPtr cond, yes, no;
  Value eval(Context& ctx) const override {
    if (cond->eval(ctx).truthy()) return yes->eval(ctx);
    return no ? no->eval(ctx) : Value::undefined();
  }
};
struct UnaryExpr : Expr {
  std::string op;
  ExprPtr e;
  Value eval(Context& ctx) const override {
    Value v = e->eval(ctx);
    if (op == "not") return Value(!v.truthy());
    if (!v.is_number()) ctx.error(line, "unary " + op + " needs a number, not " + v.type_name());
    if (op == "-" && v.kind() == Value::Kind::Int && v.as_int() == INT64_MIN)
      ctx.error(line, "integer overflow in unary - (the result does not fit 64 bits)");
    if (op == "-") return v.kind() == Value::Kind::Int ? Value(-v.as_int()) : Value(-v.as_float());
    return v;
  }
};

Value arith(const std::string& op, const Value& a, const Value& b, int line, Context& ctx) {
  if (op == "~") {
    const std::string x = a.to_output(), y = b.to_output();
    if (x.size() + y.size() > Context::max_string) ctx.error(line, "the template built a string longer than 16 MiB");
    ctx.charge(x.size() + y.size(), line);
    return Value(x + y);
  }
  if (op == "+") {
    if (a.is_string() && b.is_string()) {
      // Markup + str escapes the str (and str + Markup too: Markup.__radd__ runs first).
      const bool markup = a.markup() || b.markup();
      const std::string x = markup && !a.markup() ? html_escape(a.str()) : a.str();
      const std::string y = markup && !b.markup() ? html_escape(b.str()) : b.str();
      if (x.size() + y.size() > Context::max_string) ctx.error(line, "the template built a string longer than 16 MiB");
      ctx.charge(x.size() + y.size(), line);
      return Value(x + y).set_markup(markup);
    }
    if (a.is_list() && b.is_list()) {
      const bool sequences = (a.seq() == Value::Seq::List || a.seq() == Value::Seq::Tuple) && a.seq() == b.seq();
      if (!sequences) ctx.error(line, "can only concatenate " + a.type_name() + " (not \"" + b.type_name() + "\") to " + a.type_name());
      if (a.list().size() + b.list().size() > Context::max_list) ctx.error(line, "the template built a list of more than 1048576 items");
      ctx.charge((a.list().size() + b.list().size()) * sizeof(Value), line);
      List l = a.list();
      l.insert(l.end(), b.list().begin(), b.list().end());
      return Value(std::move(l)).set_seq(a.seq());
    }
  }
  // Repetition: the size is checked before anything is built.
  if (op == "*" && (a.is_string() || a.is_list()) && b.kind() == Value::Kind::Int) {
    const int64_t times = std::max<int64_t>(0, b.as_int());
    const size_t unit = a.is_string() ? a.str().size() : a.list().size();
    const size_t limit = a.is_string() ? Context::max_string : Context::max_list;
    if (unit && uint64_t(times) > limit / unit) ctx.error(line, a.is_string() ? "the template built a string longer than 16 MiB"
                                                                              : "the template built a list of more than 1048576 items");
    ctx.charge(unit * size_t(times) * (a.is_string() ? 1 : sizeof(Value)), line);
    if (a.is_string()) {
      std::string s;
      s.reserve(unit * size_t(times));
      for (int64_t i = 0; i < times; ++i) s += a.str();
      return Value(s).set_markup(a.markup());
    }
    List l;
    for (int64_t i = 0; i < times; ++i) l.insert(l.end(), a.list().begin(), a.list().end());
    return Value(l);
  }
  const bool numeric = (a.is_number() || a.kind() == Value::Kind::Bool) && (b.is_number() || b.kind() == Value::Kind::Bool);
  if (!numeric) ctx.error(line, "unsupported operand types for " + op + ": " + a.type_name() + " and " + b.type_name());
  const bool ints = a.kind() != Value::Kind::Float && b.kind() != Value::Kind::Float;
  if (op == "/") {
    if (b.as_float() == 0) ctx.error(line, "division by zero");
    return Value(a.as_float() / b.as_float());
  }
  if (ints) {
    // Python's integers do not overflow; 64 bits do: an overflow is an error, not a wrong number.
    const int64_t x = a.as_int(), y = b.as_int();
    int64_t r = 0;
    auto overflow = [&]() -> Value { ctx.error(line, "integer overflow in " + op + " (the result does not fit 64 bits)"); };
    if (op == "+") return __builtin_add_overflow(x, y, &r) ? overflow() : Value(r);
    if (op == "-") return __builtin_sub_overflow(x, y, &r) ? overflow() : Value(r);
    if (op == "*") return __builtin_mul_overflow(x, y, &r) ? overflow() : Value(r);
    if (op == "//" || op == "%") {
      if (y == 0) ctx.error(line, "division by zero");
      if (x == INT64_MIN && y == -1) return op == "//" ? overflow() : Value(int64_t(0));
      int64_t q = x / y, rem = x % y;
      if (rem != 0 && ((rem < 0) != (y < 0))) {
        --q;
        rem += y;
      }
      return op == "//" ? Value(q) : Value(rem);
    }
    if (op == "**") {
      if (y < 0) return Value(std::pow(double(x), double(y)));
      if (x == 0) return Value(int64_t(y == 0 ? 1 : 0));
      if (x == 1) return Value(int64_t(1));
      if (x == -1) return Value(int64_t(y % 2 ? -1 : 1));
      int64_t p = 1;
      for (int64_t i = 0; i < y; ++i)  // |x| >= 2 overflows within 63 rounds
        if (__builtin_mul_overflow(p, x, &p)) return overflow();
      return Value(p);
    }
  }
  const double x = a.as_float(), y = b.as_float();
  if (op == "+") return Value(x + y);
  if (op == "-") return Value(x - y);
  if (op == "*") return Value(x * y);
  if (op == "//") {
    if (y == 0) ctx.error(line, "division by zero");
    return Value(std::floor(x / y));
  }
  if (op == "%") {
    if (y == 0) ctx.error(line, "division by zero");
    return Value(x - std::floor(x / y) * y);
  }
  if (op == "**") return Value(std::pow(x, y));
  ctx.error(line, "unknown operator " + op);
}

struct BinaryExpr : Expr {
  std::string op;
  ExprPtr a, b;
  Value eval(Context& ctx) const override {
    if (op == "and") {
      Value x = a->eval(ctx);
      return x.truthy() ? b->eval(ctx) : x;
    }
    if (op == "or") {
      Value x = a->eval(ctx);
      return x.truthy() ? x : b->eval(ctx);
    }
    Value x = a->eval(ctx), y = b->eval(ctx);
    if (op == "==") return Value(equals(x, y));
    if (op == "!=") return Value(!equals(x, y));
    if (op == "<") return Value(compare(x, y, line, ctx) < 0);
    if (op == "<=") return Value(compare(x, y, line, ctx) <= 0);
    if (op == ">") return Value(compare(x, y, line, ctx) > 0);
    if (op == ">=") return Value(compare(x, y, line, ctx) >= 0);
    if (op == "in") return Value(contains(y, x, line, ctx));
    if (op == "not in") return Value(!contains(y, x, line, ctx));
    return arith(op, x, y, line, ctx);
  }
};

// ---- filters and tests --------------------------------------------------------------------

Value attribute_path(const Value& v, const std::string& path, int line, Context& ctx) {
  Value cur = v;
  size_t b = 0;
  while (b <= path.size()) {
    size_t e = path.find('.', b);
    std::string part = path.substr(b, e == std::string::npos ? std::string::npos : e - b);
    bool numeric = !part.empty() && std::all_of(part.begin(), part.end(), ::isdigit);
    cur = numeric ? get_item(cur, Value(int64_t(std::stoll(part))), line, ctx) : get_item(cur, Value(part), line, ctx);
    if (e == std::string::npos) break;
    b = e + 1;
  }
  return cur;
}

Value apply_filter(const std::string& name, const Value& v, Args& a, int line, Context& ctx) {
  // String filters take str() of anything (Jinja2's soft_str): 42|trim is '42', none|lower 'none'.
  const auto text = [&]() { return v.to_output(); };
  // The case and whitespace filters keep a safe string safe, as Markup's methods do.
  const auto same_safety = [&](std::string s) { return Value(std::move(s)).set_markup(v.markup()); };
  if (name == "trim") {
    Value c = a.get(0, "chars");
    return same_safety(str_strip(text(), c.is_string() ? c.str() : "", true, true));
  }
  if (name == "upper") return same_safety(str_upper(text()));
  if (name == "lower") return same_safety(str_lower(text()));
  if (name == "title") return same_safety(str_title(text()));
  if (name == "capitalize") {
    std::string s = str_lower(text());
    if (!s.empty()) s[0] = char(std::toupper(static_cast<unsigned char>(s[0])));
    return same_safety(s);
  }
  if (name == "length" || name == "count") {
    if (v.is_string()) return Value(int64_t(char_count(v.str())));
    if (v.is_list() && v.seq() == Value::Seq::Iterator) ctx.error(line, "object of type 'generator' has no len() (convert it with |list)");
    if (v.is_list()) return Value(int64_t(v.list().size()));
    if (v.is_dict()) return Value(int64_t(v.dict_ref().items.size()));
    if (v.is_undefined()) return Value(int64_t(0));
    ctx.error(line, "length of a " + v.type_name());
  }
  if (name == "first" || name == "last") {
    if (name == "last" && v.is_list() && v.seq() == Value::Seq::Iterator)
      ctx.error(line, "'generator' object is not reversible (convert it with |list before |last)");
    List l = iterate(v, line, ctx);
    if (l.empty()) return Value::undefined();
    return name == "first" ? l.front() : l.back();
  }
  if (name == "join") {
    Value sep = a.get(0, "d", Value(""));
    Value attr = a.get(1, "attribute");
    std::string s;
    List l = iterate(v, line, ctx);
    const std::string separator = sep.to_output();
    for (size_t i = 0; i < l.size(); ++i) {
      Value item = attr.is_string() ? attribute_path(l[i], attr.str(), line, ctx) : l[i];
      if (i) s += separator;
      s += item.to_output();
      if (s.size() > Context::max_string) ctx.error(line, "the template built a string longer than 16 MiB");
    }
    return Value(s);
  }
  if (name == "default" || name == "d") {
    Value dflt = a.get(0, "default_value", Value(""));
    bool boolean = a.get(1, "boolean", Value(false)).truthy();
    if (v.is_undefined() || (boolean && !v.truthy())) return dflt;
    return v;
  }
  if (name == "tojson") {
    Value indent = a.get(0, "indent");
    std::string out;
    int ind = indent.is_number() ? int(indent.as_int()) : -1;
    python_json(out, v, ind, 0, ind >= 0 ? "," : ", ", ": ");
    return Value(out);
  }
  if (name == "string") return Value(v.to_output()).set_markup(v.markup());
  if (name == "int") {
    if (v.is_string()) {
      try {
        return Value(int64_t(std::stoll(v.str())));
      } catch (...) {
        return a.get(0, "default", Value(int64_t(0)));
      }
    }
    if (v.is_number() || v.kind() == Value::Kind::Bool) return Value(v.as_int());
    return a.get(0, "default", Value(int64_t(0)));
  }
  if (name == "float") {
    if (v.is_string()) {
      try {
        return Value(std::stod(v.str()));
      } catch (...) {
        return a.get(0, "default", Value(0.0));
      }
    }
    if (v.is_number()) return Value(v.as_float());
    return a.get(0, "default", Value(0.0));
  }
  if (name == "abs") {
    if (v.kind() == Value::Kind::Int) {
      if (v.as_int() == INT64_MIN) ctx.error(line, "integer overflow in abs (the result does not fit 64 bits)");
      return Value(int64_t(std::llabs(v.as_int())));
    }
    return Value(std::fabs(v.as_float()));
  }
  if (name == "round") {
    int64_t prec = a.get(0, "precision", Value(int64_t(0))).as_int();
    double m = std::pow(10.0, double(prec));
    return Value(std::round(v.as_float() * m) / m);
  }
  if (name == "replace") {
    Value from = a.get(0, "old"), to = a.get(1, "new");
    if (!from.is_string() || !to.is_string()) ctx.error(line, "replace takes two strings");
    return Value(str_replace(text(), from.str(), to.str(), a.get(2, "count", Value(int64_t(-1))).as_int()));
  }
  if (name == "list") return Value(iterate(v, line, ctx));
  if (name == "items") {
    if (v.is_undefined()) return Value(List{}).set_seq(Value::Seq::Iterator);
    if (!v.is_dict()) ctx.error(line, "items needs a dict");
    return dict_items(v.dict_ref()).set_seq(Value::Seq::Iterator);
  }
  if (name == "reverse") {
    if (v.is_string()) {
      const CharIndex cs(v.str());
      std::string s;
      s.reserve(v.str().size());
      for (size_t i = cs.size(); i-- > 0;) s += cs.at(i);
      return Value(s);
    }
    if (v.is_list() && v.seq() == Value::Seq::Iterator) ctx.error(line, "'generator' object is not reversible");
    List l = iterate(v, line, ctx);
    std::reverse(l.begin(), l.end());
    // reversed() of a list is an iterator; of a dict, its keys.
    return Value(std::move(l)).set_seq(Value::Seq::Iterator);
  }
  // Sorting is stable and, unless case_sensitive, compares strings lower-cased, as Jinja2 does.
  // A key is made once per item (as Python's key= does), its bytes counted as made.
  const auto sort_key = [&](Value k, bool case_sensitive) {
    if (case_sensitive || !k.is_string()) return k;
    ctx.charge(k.str().size(), line);
    return Value(str_lower(k.str()));
  };
  // Sorts items by their keys, stably; the items in their new order.
  const auto sorted_by = [&](const List& items, const List& keys, bool rev) {
    std::vector<size_t> order(items.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) {
      return rev ? compare(keys[y], keys[x], line, ctx) < 0 : compare(keys[x], keys[y], line, ctx) < 0;
    });
    List out;
    out.reserve(items.size());
    for (size_t i : order) out.push_back(items[i]);
    return out;
  };
  if (name == "sort") {
    List l = iterate(v, line, ctx);
    const bool rev = a.get(0, "reverse", Value(false)).truthy();
    const bool case_sensitive = a.get(1, "case_sensitive", Value(false)).truthy();
    Value attr = a.get(2, "attribute");
    List keys;
    keys.reserve(l.size());
    for (auto& x : l) keys.push_back(sort_key(attr.is_string() ? attribute_path(x, attr.str(), line, ctx) : x, case_sensitive));
    return Value(sorted_by(l, keys, rev));
  }
  if (name == "dictsort") {
    if (!v.is_dict()) ctx.error(line, "dictsort needs a dict, not " + v.type_name());
    const bool case_sensitive = a.get(0, "case_sensitive", Value(false)).truthy();
    const Value by = a.get(1, "by", Value("key"));
    const bool rev = a.get(2, "reverse", Value(false)).truthy();
    if (!by.is_string() || (by.str() != "key" && by.str() != "value"))
      ctx.error(line, "dictsort: you can only sort by either \"key\" or \"value\"");
    const size_t pos = by.str() == "key" ? 0 : 1;
    const List l = dict_items(v.dict_ref()).list();
    List keys;
    keys.reserve(l.size());
    for (auto& x : l) keys.push_back(sort_key(x.list()[pos], case_sensitive));
    return Value(sorted_by(l, keys, rev));
  }
  if (name == "unique") {
    // As Jinja2: items (or their attribute) compared lower-cased unless case_sensitive, in a set,
    // so unhashable ones are an error and the time is linear.
    const bool case_sensitive = a.get(0, "case_sensitive", Value(false)).truthy();
    const Value attr = a.get(1, "attribute");
    std::unordered_set<std::string> seen;
    List out;
    for (auto& x : iterate(v, line, ctx)) {
      const Value key = sort_key(attr.is_string() ? attribute_path(x, attr.str(), line, ctx) : x, case_sensitive);
      const std::string hashed = Dict::hash_key(key);
      if (hashed.empty()) ctx.error(line, "unique: unhashable type '" + key.type_name() + "'");
      if (seen.insert(hashed).second) out.push_back(x);
    }
    return Value(std::move(out)).set_seq(Value::Seq::Iterator);
  }
  if (name == "sum") {
    Value total = a.get(1, "start", Value(int64_t(0)));
    Value attr = a.get(0, "attribute");
    for (auto& x : iterate(v, line, ctx))
      total = arith("+", total, attr.is_string() ? attribute_path(x, attr.str(), line, ctx) : x, line, ctx);
    return total;
  }
  if (name == "min" || name == "max") {
    List l = iterate(v, line, ctx);
    if (l.empty()) return Value::undefined();
    Value best = l[0];
    for (auto& x : l)
      if ((name == "min") == (compare(x, best, line, ctx) < 0) && compare(x, best, line, ctx) != 0) best = x;
    return best;
  }
  // As Jinja2's map, select, reject, selectattr and rejectattr: a falsy value (none, undefined,
  // an empty list) gives an empty sequence, its arguments unread (Functionary's template filters
  // `tools` when there are none).
  if ((name == "map" || name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") &&
      !v.truthy())
    return Value(List{}).set_seq(Value::Seq::Iterator);
  if (name == "map") {
    Value attr = a.get(99, "attribute");
    List out;
    if (attr.is_string()) {
      Value dflt = a.get(99, "default");
      for (auto& x : iterate(v, line, ctx)) {
        Value r = attribute_path(x, attr.str(), line, ctx);
        out.push_back(r.is_undefined() && !dflt.is_undefined() ? dflt : r);
      }
      return Value(std::move(out)).set_seq(Value::Seq::Iterator);
    }
    if (a.positional.empty() || !a.positional[0].is_string()) ctx.error(line, "map needs a filter name or attribute=");
    std::string f = a.positional[0].str();
    Args rest;
    rest.positional.assign(a.positional.begin() + 1, a.positional.end());
    rest.keyword = a.keyword;
    // Each item a filter makes is counted as made, as a filter in an expression is.
    for (auto& x : iterate(v, line, ctx)) out.push_back(ctx.checked(apply_filter(f, x, rest, line, ctx), line));
    return Value(std::move(out)).set_seq(Value::Seq::Iterator);
  }
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
    const bool by_attr = name == "selectattr" || name == "rejectattr";
    const bool keep = name == "select" || name == "selectattr";
    size_t first_test_arg = by_attr ? 1 : 0;
    std::string attr;
    if (by_attr) {
      if (a.positional.empty() || !a.positional[0].is_string()) ctx.error(line, name + " needs an attribute name");
      attr = a.positional[0].str();
    }
    std::string test = a.positional.size() > first_test_arg ? a.positional[first_test_arg].str() : "";
    Args targs;
    if (a.positional.size() > first_test_arg + 1)
      targs.positional.assign(a.positional.begin() + long(first_test_arg) + 1, a.positional.end());
    List out;
    for (auto& x : iterate(v, line, ctx)) {
      Value subject = by_attr ? attribute_path(x, attr, line, ctx) : x;
      bool pass = test.empty() ? subject.truthy() : apply_test(test, subject, targs, line, ctx);
      if (pass == keep) out.push_back(x);
    }
    return Value(std::move(out)).set_seq(Value::Seq::Iterator);
  }
  if (name == "batch") {
    int64_t n = a.get(0, "linecount").as_int();
    if (n <= 0) ctx.error(line, "batch needs a positive size");
    List out, cur;
    for (auto& x : iterate(v, line, ctx)) {
      cur.push_back(x);
      if (int64_t(cur.size()) == n) {
        ctx.charge(64 + cur.size() * sizeof(Value), line);  // each batch is a list of its own
        out.push_back(Value(cur));
        cur.clear();
      }
    }
    if (!cur.empty()) out.push_back(Value(cur));
    return Value(std::move(out)).set_seq(Value::Seq::Iterator);
  }
  if (name == "indent") {
    // Jinja2: lines split as str.splitlines() splits them, joined with '\n'; blank lines stay
    // blank unless blank=true; the first line only with first=true.
    const Value width = a.get(0, "width", Value(int64_t(4)));
    const bool first = a.get(1, "first", Value(false)).truthy();
    const bool blank = a.get(2, "blank", Value(false)).truthy();
    std::string pad;
    if (width.is_string()) {
      pad = width.str();
    } else {
      const int64_t w = width.as_int();
      if (w > int64_t(Context::max_string)) ctx.error(line, "the template built a string longer than 16 MiB");
      pad.assign(size_t(std::max<int64_t>(0, w)), ' ');
    }
    std::string out = first ? pad : "";
    bool first_line = true;
    py_splitlines(text() + "\n", [&](std::string_view l) {
      if (!first_line) {
        out += '\n';
        if (blank || !l.empty()) out += pad;
      }
      first_line = false;
      out += l;
      if (out.size() > Context::max_string) ctx.error(line, "the template built a string longer than 16 MiB");
    });
    return Value(out);
  }
  if (name == "safe") return Value(v.to_output()).set_markup(true);
  if (name == "e" || name == "escape" || name == "forceescape") {
    if (v.markup() && name != "forceescape") return v;
    return Value(html_escape(v.to_output())).set_markup(true);
  }
  if (name == "wordcount") {
    // Words are what whitespace separates, counted without making them.
    const std::string s = text();
    int64_t n = 0;
    for (size_t i = 0; i < s.size(); ++i)
      n += !std::isspace(static_cast<unsigned char>(s[i])) && (i == 0 || std::isspace(static_cast<unsigned char>(s[i - 1])));
    return Value(n);
  }
  if (name == "center") {
    int64_t width = a.get(0, "width", Value(int64_t(80))).as_int();
    if (width > int64_t(Context::max_string)) ctx.error(line, "the template built a string longer than 16 MiB");
    std::string s = text();
    int64_t n = int64_t(char_count(s));
    if (n >= width) return same_safety(s);
    const int64_t margin = width - n, left = margin / 2 + (margin & width & 1);  // as CPython's str.center
    return same_safety(std::string(size_t(left), ' ') + s + std::string(size_t(margin - left), ' '));
  }
  ctx.error(line, "filter '" + name + "' is not supported");
}

bool apply_test(const std::string& name, const Value& v, Args& a, int line, Context& ctx) {
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "string") return v.is_string();
  if (name == "number") return v.is_number();
  if (name == "integer") return v.kind() == Value::Kind::Int;
  if (name == "float") return v.kind() == Value::Kind::Float;
  if (name == "boolean") return v.kind() == Value::Kind::Bool;
  if (name == "true") return v.kind() == Value::Kind::Bool && v.truthy();
  if (name == "false") return v.kind() == Value::Kind::Bool && !v.truthy();
  if (name == "mapping") return v.is_dict();
  if (name == "sequence")
    return (v.is_list() && (v.seq() == Value::Seq::List || v.seq() == Value::Seq::Tuple)) || v.is_string() || v.is_dict();
  if (name == "iterable") return v.is_list() || v.is_string() || v.is_dict();
  if (name == "callable") return v.is_function();
  if (name == "even") return v.as_int() % 2 == 0;
  if (name == "odd") return v.as_int() % 2 != 0;
  if (name == "divisibleby") {
    int64_t d = a.get(0, "num").as_int();
    return d != 0 && v.as_int() % d == 0;
  }
  if (name == "equalto" || name == "eq" || name == "==" || name == "sameas") return equals(v, a.get(0, "other"));
  if (name == "ne" || name == "!=") return !equals(v, a.get(0, "other"));
  if (name == "lt" || name == "<") return compare(v, a.get(0, "other"), line, ctx) < 0;
  if (name == "le" || name == "<=") return compare(v, a.get(0, "other"), line, ctx) <= 0;
  if (name == "gt" || name == ">") return compare(v, a.get(0, "other"), line, ctx) > 0;
  if (name == "ge" || name == ">=") return compare(v, a.get(0, "other"), line, ctx) >= 0;
  if (name == "in") return contains(a.get(0, "seq"), v, line, ctx);
  if (name == "lower") return v.is_string() && str_lower(v.str()) == v.str();
  if (name == "upper") return v.is_string() && str_upper(v.str()) == v.str();
  ctx.error(line, "test '" + name + "' is not supported");
}

// ---- parser -------------------------------------------------------------------------------

// Expressions and blocks nest at most this deep: parsing and evaluating recurse once per level.
constexpr int k_max_parse_depth = 100;

class ExprParser {
 public:
  ExprParser(std::vector<Token> toks, int line, std::string where) : t_(std::move(toks)), line_(line), where_(std::move(where)) {}

  ExprPtr parse_expression() { return parse_cond(); }
  // An expression without a trailing `if ... else` (the iterable of `for x in xs if cond`).
  ExprPtr parse_expression_no_cond() { return parse_or(); }
  CallArgs parse_call_args_public() { return parse_call_args(); }
  // A comma-separated expression at the top: a tuple when there is a comma.
  ExprPtr parse_tuple_or_expression() {
    ExprPtr first = parse_expression();
    if (!is_op(",")) return first;
    auto l = make<ListExpr>();
    l->tuple = true;
    l->items.push_back(std::move(first));
    while (accept_op(",")) {
      if (at_end() || is_op(")")) break;  // (1,) is a one-item tuple
      l->items.push_back(parse_expression());
    }
    return l;
  }
  bool at_end() const { return t_[p_].type == Token::End; }
  const Token& peek(size_t k = 0) const { return t_[std::min(p_ + k, t_.size() - 1)]; }
  bool is_name(const char* n, size_t k = 0) const { return peek(k).type == Token::Name && peek(k).text == n; }
  bool is_op(const char* o) const { return peek().type == Token::Op && peek().text == o; }
  bool accept_op(const char* o) {
    if (!is_op(o)) return false;
    ++p_;
    return true;
  }
  bool accept_name(const char* n) {
    if (!is_name(n)) return false;
    ++p_;
    return true;
  }
  void expect_op(const char* o) {
    if (!accept_op(o)) error(std::string("expected '") + o + "' but found '" + peek().text + "'");
  }
  std::string expect_name() {
    if (peek().type != Token::Name) error("expected a name but found '" + peek().text + "'");
    return t_[p_++].text;
  }
  void expect_end() {
    if (!at_end()) error("unexpected '" + peek().text + "'");
  }
  [[noreturn]] void error(const std::string& msg) const { fail(where_, " line ", line_, ": ", msg); }

  template <typename T>
  std::unique_ptr<T> make() {
    auto e = std::make_unique<T>();
    e->line = line_;
    return e;
  }

 private:
  struct Nest {
    ExprParser& p;
    explicit Nest(ExprParser& pp) : p(pp) {
      if (++p.depth_ > k_max_parse_depth) p.error("the expression nests deeper than 100 levels");
    }
    ~Nest() { --p.depth_; }
  };
  ExprPtr parse_cond() {
    const Nest nest(*this);
    ExprPtr e = parse_or();
    while (is_name("if")) {
      ++p_;
      auto c = make<CondExpr>();
      c->yes = std::move(e);
      c->cond = parse_or();
      if (accept_name("else")) c->no = parse_cond();
      e = std::move(c);
    }
    return e;
  }
  ExprPtr binary(const std::string& op, ExprPtr a, ExprPtr b) {
    auto e = make<BinaryExpr>();
    e->op = op;
    e->a = std::move(a);
    e->b = std::move(b);
    return e;
  }
  ExprPtr parse_or() {
    ExprPtr e = parse_and();
    while (accept_name("or")) e = binary("or", std::move(e), parse_and());
    return e;
  }
  ExprPtr parse_and() {
    ExprPtr e = parse_not();
    while (accept_name("and")) e = binary("and", std::move(e), parse_not());
    return e;
  }
  ExprPtr parse_not() {
    const Nest nest(*this);
    if (is_name("not")) {
      ++p_;
      auto u = make<UnaryExpr>();
      u->op = "not";
      u->e = parse_not();
      return u;
    }
    return parse_compare();
  }
  ExprPtr parse_compare() {
    ExprPtr e = parse_math1();
    // Chained comparisons a < b < c mean a < b and b < c; templates do not chain, so combine simply.
    for (;;) {
      std::string op;
      if (peek().type == Token::Op && (peek().text == "==" || peek().text == "!=" || peek().text == "<" ||
                                       peek().text == ">" || peek().text == "<=" || peek().text == ">=")) {
        op = t_[p_++].text;
      } else if (is_name("in")) {
        ++p_;
        op = "in";
      } else if (is_name("not") && is_name("in", 1)) {
        p_ += 2;
        op = "not in";
      } else {
        break;
      }
      e = binary(op, std::move(e), parse_math1());
    }
    return e;
  }
  ExprPtr parse_math1() {
    ExprPtr e = parse_concat();
    while (peek().type == Token::Op && (peek().text == "+" || peek().text == "-")) {
      std::string op = t_[p_++].text;
      e = binary(op, std::move(e), parse_concat());
    }
    return e;
  }
  ExprPtr parse_concat() {
    ExprPtr e = parse_math2();
    while (accept_op("~")) e = binary("~", std::move(e), parse_math2());
    return e;
  }
  ExprPtr parse_math2() {
    ExprPtr e = parse_pow();
    while (peek().type == Token::Op && (peek().text == "*" || peek().text == "/" || peek().text == "//" || peek().text == "%")) {
      std::string op = t_[p_++].text;
      e = binary(op, std::move(e), parse_pow());
    }
    return e;
  }
  ExprPtr parse_pow() {
    ExprPtr e = parse_unary();
    while (accept_op("**")) e = binary("**", std::move(e), parse_unary());
    return e;
  }
  // As Jinja2: in `-x | f` the filter applies to -x.
  ExprPtr parse_unary(bool with_filters = true) {
    const Nest nest(*this);
    ExprPtr e;
    if (peek().type == Token::Op && (peek().text == "-" || peek().text == "+")) {
      auto u = make<UnaryExpr>();
      u->op = t_[p_++].text;
      u->e = parse_unary(false);
      e = std::move(u);
    } else {
      e = parse_postfix(parse_primary());
    }
    return with_filters ? parse_filters(std::move(e)) : std::move(e);
  }
  CallArgs parse_call_args() {
    CallArgs a;
    // '(' already consumed
    if (accept_op(")")) return a;
    for (;;) {
      if (peek().type == Token::Name && peek(1).type == Token::Op && peek(1).text == "=") {
        std::string k = t_[p_].text;
        p_ += 2;
        a.keyword.push_back({k, parse_expression()});
      } else {
        a.positional.push_back(parse_expression());
      }
      if (accept_op(")")) break;
      expect_op(",");
      if (accept_op(")")) break;
    }
    return a;
  }
  ExprPtr parse_postfix(ExprPtr e) {
    for (;;) {
      if (accept_op(".")) {
        auto a = make<AttrExpr>();
        a->obj = std::move(e);
        if (peek().type == Token::Int) {
          auto it = make<ItemExpr>();
          it->obj = std::move(a->obj);
          auto lit = make<Literal>();
          lit->v = Value(t_[p_++].i);
          it->key = std::move(lit);
          e = std::move(it);
          continue;
        }
        a->name = expect_name();
        e = std::move(a);
      } else if (accept_op("[")) {
        ExprPtr start, stop, step;
        bool is_slice = false;
        if (!is_op(":")) start = parse_expression();
        if (accept_op(":")) {
          is_slice = true;
          if (!is_op("]") && !is_op(":")) stop = parse_expression();
          if (accept_op(":") && !is_op("]")) step = parse_expression();
        }
        expect_op("]");
        if (is_slice) {
          auto s = make<SliceExpr>();
          s->obj = std::move(e);
          s->start = std::move(start);
          s->stop = std::move(stop);
          s->step = std::move(step);
          e = std::move(s);
        } else {
          auto it = make<ItemExpr>();
          it->obj = std::move(e);
          it->key = std::move(start);
          e = std::move(it);
        }
      } else if (accept_op("(")) {
        auto c = make<CallExpr>();
        c->callee = std::move(e);
        c->args = parse_call_args();
        e = std::move(c);
      } else {
        return e;
      }
    }
  }
  ExprPtr parse_filters(ExprPtr e) {
    for (;;) {
      if (accept_op("|")) {
        auto f = make<FilterExpr>();
        f->input = std::move(e);
        f->name = expect_name();
        if (accept_op("(")) f->args = parse_call_args();
        e = std::move(f);
      } else if (is_name("is")) {
        ++p_;
        auto t = make<TestExpr>();
        t->negated = accept_name("not");
        t->input = std::move(e);
        if (peek().type == Token::Name) t->name = t_[p_++].text;
        else if (peek().type == Token::Op && (peek().text == "==" || peek().text == "!=" || peek().text == "<" ||
                                              peek().text == ">" || peek().text == "<=" || peek().text == ">="))
          t->name = t_[p_++].text;
        else error("expected a test name after 'is'");
        if (accept_op("(")) {
          t->args = parse_call_args();
        } else if ((peek().type == Token::String || peek().type == Token::Int || peek().type == Token::Float ||
                    (peek().type == Token::Name && !is_name("else") && !is_name("or") && !is_name("and") &&
                     !is_name("if") && !is_name("not") && !is_name("in") && !is_name("is")) ||
                    is_op("[") || is_op("{")) &&
                   t->name != "defined" && t->name != "undefined" && t->name != "none" && t->name != "string" &&
                   t->name != "mapping" && t->name != "number" && t->name != "boolean" && t->name != "integer" &&
                   t->name != "float" && t->name != "sequence" && t->name != "iterable" && t->name != "true" &&
                   t->name != "false") {
          t->args.positional.push_back(parse_postfix(parse_primary()));
        }
        e = std::move(t);
      } else {
        return e;
      }
    }
  }
  ExprPtr parse_primary() {
    const Token& t = peek();
    if (t.type == Token::String) {
      // Adjacent string literals concatenate.
      std::string s;
      while (peek().type == Token::String) s += t_[p_++].text;
      auto l = make<Literal>();
      l->v = Value(s);
      return l;
    }
    if (t.type == Token::Int || t.type == Token::Float) {
      auto l = make<Literal>();
      l->v = t.type == Token::Int ? Value(t.i) : Value(t.f);
      ++p_;
      return l;
    }
    if (t.type == Token::Name) {
      ++p_;
      if (t.text == "true" || t.text == "True") return lit(Value(true));
      if (t.text == "false" || t.text == "False") return lit(Value(false));
      if (t.text == "none" || t.text == "None") return lit(Value::none());
      auto n = make<NameExpr>();
      n->name = t.text;
      return n;
    }
    if (accept_op("(")) {
      if (accept_op(")")) {
        auto empty = make<ListExpr>();
        empty->tuple = true;
        return empty;
      }
      ExprPtr e = parse_tuple_or_expression();
      expect_op(")");
      return e;
    }
    if (accept_op("[")) {
      auto l = make<ListExpr>();
      while (!accept_op("]")) {
        l->items.push_back(parse_expression());
        if (accept_op("]")) break;
        expect_op(",");
      }
      return l;
    }
    if (accept_op("{")) {
      auto d = make<DictExpr>();
      while (!accept_op("}")) {
        ExprPtr k = parse_expression();
        expect_op(":");
        d->items.push_back({std::move(k), parse_expression()});
        if (accept_op("}")) break;
        expect_op(",");
      }
      return d;
    }
    error(t.type == Token::End ? "expression ends too early" : "unexpected '" + t.text + "'");
  }
  ExprPtr lit(Value v) {
    auto l = make<Literal>();
    l->v = std::move(v);
    return l;
  }

  std::vector<Token> t_;
  size_t p_ = 0;
  int line_;
  std::string where_;
  int depth_ = 0;
};

using NodePtr = std::unique_ptr<Template::Node>;

class Parser {
 public:
  Parser(std::vector<Segment> segs, std::string name) : segs_(std::move(segs)), name_(std::move(name)) {}

  std::vector<NodePtr> parse_all() {
    std::string stop;
    auto body = parse_body({}, stop);
    return body;
  }

 private:
  // Parses nodes until a statement whose first word is in `until`; that word goes to `stopped`.
  std::vector<NodePtr> parse_body(const std::vector<std::string>& until, std::string& stopped) {
    if (++depth_ > k_max_parse_depth) fail(name_, ": blocks nest deeper than 100 levels");
    struct Leave {
      int& d;
      ~Leave() { --d; }
    } leave{depth_};
    std::vector<NodePtr> out;
    while (pos_ < segs_.size()) {
      const Segment& s = segs_[pos_];
      if (s.kind == Segment::Text) {
        auto n = node(Template::Node::Text, s.line);
        n->text = s.text;
        out.push_back(std::move(n));
        ++pos_;
        continue;
      }
      if (s.kind == Segment::Output) {
        ExprParser p(tokenize(s.text, where(s.line)), s.line, name_);
        auto n = node(Template::Node::Output, s.line);
        n->expr = p.parse_tuple_or_expression();
        p.expect_end();
        out.push_back(std::move(n));
        ++pos_;
        continue;
      }
      ExprParser p(tokenize(s.text, where(s.line)), s.line, name_);
      if (p.at_end()) p.error("empty statement");
      std::string kw = p.expect_name();
      if (std::find(until.begin(), until.end(), kw) != until.end()) {
        stopped = kw;
        return out;
      }
      ++pos_;
      out.push_back(statement(kw, p, s.line));
    }
    if (!until.empty()) {
      std::string want;
      for (auto& u : until) want += (want.empty() ? "" : " or ") + u;
      fail(name_, ": the template ends before {% ", want, " %}");
    }
    return out;
  }

  std::string where(int line) const { return name_ + " line " + std::to_string(line); }

  NodePtr node(Template::Node::Kind k, int line) {
    auto n = std::make_unique<Template::Node>();
    n->kind = k;
    n->line = line;
    return n;
  }

  NodePtr statement(const std::string& kw, ExprParser& p, int line) {
    std::string stopped;
    if (kw == "if") {
      auto n = node(Template::Node::If, line);
      ExprPtr cond = p.parse_tuple_or_expression();
      p.expect_end();
      for (;;) {
        auto body = parse_body({"elif", "else", "endif"}, stopped);
        n->branches.push_back({std::move(cond), std::move(body)});
        const Segment& s = segs_[pos_++];
        ExprParser q(tokenize(s.text, where(s.line)), s.line, name_);
        q.expect_name();
        if (stopped == "elif") {
          cond = q.parse_tuple_or_expression();
          q.expect_end();
          continue;
        }
        q.expect_end();
        if (stopped == "else") {
          n->else_body = parse_body({"endif"}, stopped);
          ++pos_;
        }
        break;
      }
      return n;
    }
    if (kw == "for") {
      auto n = node(Template::Node::For, line);
      n->targets.push_back(p.expect_name());
      while (p.accept_op(",")) n->targets.push_back(p.expect_name());
      if (!p.accept_name("in")) p.error("expected 'in' in for loop");
      n->expr = parse_for_iterable(p);
      if (p.accept_name("if")) n->filter_cond = p.parse_expression();
      if (p.accept_name("recursive")) p.error("recursive for loops are not supported");
      p.expect_end();
      n->body = parse_body({"else", "endfor"}, stopped);
      ++pos_;
      if (stopped == "else") {
        n->else_body = parse_body({"endfor"}, stopped);
        ++pos_;
      }
      return n;
    }
    if (kw == "set") {
      std::string target = p.expect_name();
      if (p.accept_op(".")) {
        auto n = node(Template::Node::Set, line);
        n->text = target;
        n->attr = p.expect_name();
        p.expect_op("=");
        n->expr = p.parse_tuple_or_expression();
        p.expect_end();
        return n;
      }
      std::vector<std::string> targets{target};
      while (p.accept_op(",")) targets.push_back(p.expect_name());
      if (p.accept_op("=")) {
        auto n = node(Template::Node::Set, line);
        n->targets = targets;
        n->text = target;
        n->expr = p.parse_tuple_or_expression();
        p.expect_end();
        return n;
      }
      // Block set: {% set name %}...{% endset %}, optionally | filter.
      auto n = node(Template::Node::SetBlock, line);
      n->text = target;
      if (p.accept_op("|")) n->filter_call = filter_chain(p);
      p.expect_end();
      n->body = parse_body({"endset"}, stopped);
      ++pos_;
      return n;
    }
    if (kw == "macro") {
      auto n = node(Template::Node::Macro, line);
      n->text = p.expect_name();
      p.expect_op("(");
      while (!p.accept_op(")")) {
        std::string param = p.expect_name();
        ExprPtr dflt;
        if (p.accept_op("=")) dflt = p.parse_expression();
        n->params.push_back({param, std::move(dflt)});
        if (p.accept_op(")")) break;
        p.expect_op(",");
      }
      p.expect_end();
      n->body = parse_body({"endmacro"}, stopped);
      ++pos_;
      return n;
    }
    if (kw == "break" || kw == "continue") {
      p.expect_end();
      return node(kw == "break" ? Template::Node::Break : Template::Node::Continue, line);
    }
    if (kw == "filter") {
      auto n = node(Template::Node::FilterBlock, line);
      n->filter_call = filter_chain(p);
      p.expect_end();
      n->body = parse_body({"endfilter"}, stopped);
      ++pos_;
      return n;
    }
    if (kw == "generation") {
      // Marks the assistant's tokens for training masks; renders its body unchanged.
      p.expect_end();
      auto n = node(Template::Node::Generation, line);
      n->body = parse_body({"endgeneration"}, stopped);
      ++pos_;
      return n;
    }
    if (kw == "do") {
      auto n = node(Template::Node::Set, line);
      n->text = "";
      n->expr = p.parse_tuple_or_expression();
      p.expect_end();
      return n;
    }
    fail(name_, " line ", line, ": '{% ", kw, " %}' is not supported");
  }

  ExprPtr parse_for_iterable(ExprParser& p) {
    // `for x in items if cond`: the iterable stops before a bare `if`.
    return p.parse_expression_no_cond();
  }

  // `name(args) | name ...` after a filter keyword: a FilterExpr chain applied to a placeholder.
  ExprPtr filter_chain(ExprParser& p) {
    auto placeholder = p.make<NameExpr>();
    placeholder->name = "\x01body";
    ExprPtr e = std::move(placeholder);
    do {
      auto f = p.make<FilterExpr>();
      f->input = std::move(e);
      f->name = p.expect_name();
      if (p.accept_op("(")) f->args = p.parse_call_args_public();
      e = std::move(f);
    } while (p.accept_op("|"));
    return e;
  }

  std::vector<Segment> segs_;
  size_t pos_ = 0;
  std::string name_;
  int depth_ = 0;
};


// ---- execution ----------------------------------------------------------------------------

Value make_loop(size_t i, const List& items) {
  Value loop = Value::dict();
  Dict& d = loop.dict_ref();
  const int64_t n = int64_t(items.size());
  d.set("index", Value(int64_t(i) + 1));
  d.set("index0", Value(int64_t(i)));
  d.set("revindex", Value(n - int64_t(i)));
  d.set("revindex0", Value(n - int64_t(i) - 1));
  d.set("first", Value(i == 0));
  d.set("last", Value(int64_t(i) + 1 == n));
  d.set("length", Value(n));
  d.set("previtem", i > 0 ? items[i - 1] : Value::undefined("previtem"));
  d.set("nextitem", int64_t(i) + 1 < n ? items[i + 1] : Value::undefined("nextitem"));
  d.set("cycle", Value::function([i](Args& a) {
          if (a.positional.empty()) fail("loop.cycle() needs arguments");
          return a.positional[i % a.positional.size()];
        }));
  return loop;
}

void assign_targets(Context& ctx, const std::vector<std::string>& targets, const Value& v, int line) {
  if (targets.size() == 1) {
    ctx.set(targets[0], v);
    return;
  }
  List items = iterate(v, line, ctx);
  if (items.size() != targets.size())
    ctx.error(line, "cannot unpack " + std::to_string(items.size()) + " values into " + std::to_string(targets.size()) + " names");
  for (size_t i = 0; i < targets.size(); ++i) ctx.set(targets[i], items[i]);
}

std::string render_body(const std::vector<NodePtr>& body, Context& ctx) {
  std::string saved;
  saved.swap(ctx.out);
  exec_body(body, ctx);
  std::string rendered;
  rendered.swap(ctx.out);
  ctx.out.swap(saved);
  return rendered;
}

Value apply_filter_chain(const Expr& chain, const std::string& text, Context& ctx) {
  ctx.scopes.push_back(std::make_shared<Scope>());
  ctx.set("\x01body", Value(text));
  Value r = chain.eval(ctx);
  ctx.scopes.pop_back();
  return r;
}

Flow exec_node(const Template::Node& n, Context& ctx) {
  using K = Template::Node;
  ctx.step(n.line);
  switch (n.kind) {
    case K::Text:
      ctx.out += n.text;
      ctx.check_output(n.line);
      return Flow::Normal;
    case K::Output:
      ctx.out += n.expr->eval(ctx).to_output();
      ctx.check_output(n.line);
      return Flow::Normal;
    case K::If:
      for (auto& [cond, body] : n.branches)
        if (cond->eval(ctx).truthy()) return exec_body(body, ctx);
      return exec_body(n.else_body, ctx);
    case K::For: {
      List all = iterate(n.expr->eval(ctx), n.line, ctx);
      List items;
      if (n.filter_cond) {
        for (auto& x : all) {
          ctx.step(n.line);
          ctx.scopes.push_back(std::make_shared<Scope>());
          assign_targets(ctx, n.targets, x, n.line);
          bool keep = n.filter_cond->eval(ctx).truthy();
          ctx.scopes.pop_back();
          if (keep) items.push_back(x);
        }
      } else {
        items = std::move(all);
      }
      if (items.empty()) return exec_body(n.else_body, ctx);
      for (size_t i = 0; i < items.size(); ++i) {
        ctx.step(n.line);
        ctx.scopes.push_back(std::make_shared<Scope>());
        ctx.set("loop", make_loop(i, items));
        assign_targets(ctx, n.targets, items[i], n.line);
        Flow f = exec_body(n.body, ctx);
        ctx.scopes.pop_back();
        if (f == Flow::Break) break;
      }
      return Flow::Normal;
    }
    case K::Set: {
      Value v = n.expr->eval(ctx);
      if (!n.attr.empty()) {
        Value ns = ctx.lookup(n.text);
        if (!ns.is_dict() || !ns.namespace_object())
          ctx.error(n.line, "'" + n.text + "' is not a namespace(); cannot set ." + n.attr);
        if (v.is_dict() || v.is_list() || v.is_function()) ctx.track_namespace(ns, n.line);
        ns.dict_ref().set(n.attr, v);
        ns.update_depth();
      } else if (!n.targets.empty()) {
        assign_targets(ctx, n.targets, v, n.line);
      }
      return Flow::Normal;
    }
    case K::SetBlock: {
      std::string text = render_body(n.body, ctx);
      Value v = n.filter_call ? apply_filter_chain(*n.filter_call, text, ctx) : Value(text);
      ctx.set(n.text, v);
      return Flow::Normal;
    }
    case K::Macro: {
      const Template::Node* mp = &n;
      // Macros see the scopes where they were defined (template globals) plus their arguments.
      auto defining = ctx.scopes;
      ctx.track_macro_scopes(defining, n.line);
      ctx.set(n.text, Value::function([mp, defining, &ctx](Args& a) {
        if (ctx.calls >= Context::max_calls)
          ctx.error(mp->line, "macro " + mp->text + " is called more than 64 calls deep (endless recursion?)");
        struct Depth {
          int& calls;
          explicit Depth(int& c) : calls(c) { ++calls; }
          ~Depth() { --calls; }
        } depth(ctx.calls);
        std::vector<std::shared_ptr<Scope>> saved = ctx.scopes;
        ctx.scopes = defining;
        ctx.scopes.push_back(std::make_shared<Scope>());
        for (size_t i = 0; i < mp->params.size(); ++i) {
          const auto& [pname, dflt] = mp->params[i];
          Value v = a.get(i, pname.c_str());
          if (v.is_undefined() && dflt) v = dflt->eval(ctx);
          ctx.set(pname, v);
        }
        if (a.positional.size() > mp->params.size()) ctx.set("varargs", Value(List(a.positional.begin() + long(mp->params.size()), a.positional.end())));
        std::string text;
        try {
          text = render_body(mp->body, ctx);
        } catch (...) {
          ctx.scopes = saved;
          throw;
        }
        ctx.scopes = saved;
        return Value(text);
      }));
      return Flow::Normal;
    }
    case K::Break: return Flow::Break;
    case K::Continue: return Flow::Continue;
    case K::FilterBlock: {
      std::string text = render_body(n.body, ctx);
      ctx.out += apply_filter_chain(*n.filter_call, text, ctx).to_output();
      ctx.check_output(n.line);
      return Flow::Normal;
    }
    case K::Generation: return exec_body(n.body, ctx);
  }
  return Flow::Normal;
}

Flow exec_body(const std::vector<NodePtr>& body, Context& ctx) {
  for (auto& n : body) {
    Flow f = exec_node(*n, ctx);
    if (f != Flow::Normal) return f;
  }
  return Flow::Normal;
}

std::shared_ptr<Scope> globals() {
  auto g = std::make_shared<Scope>();
  g->vars["raise_exception"] = Value::function([](Args& a) -> Value {
    fail("the chat template raised an error: ", a.get(0, "message").to_output());
  });
  g->vars["range"] = Value::function([](Args& a) {
    int64_t start = 0, stop, step = 1;
    if (a.positional.size() == 1) {
      stop = a.positional[0].as_int();
    } else if (a.positional.size() >= 2) {
      start = a.positional[0].as_int();
      stop = a.positional[1].as_int();
      if (a.positional.size() > 2) step = a.positional[2].as_int();
    } else {
      fail("range() needs arguments");
    }
    if (step == 0) fail("range() step cannot be zero");
    // The length first (in 128 bits: the bounds may be anything), against the list limit.
    const __int128 span = step > 0 ? __int128(stop) - start : __int128(start) - stop;
    const __int128 n = span <= 0 ? 0 : (span + (step > 0 ? step : -__int128(step)) - 1) / (step > 0 ? step : -__int128(step));
    if (n > __int128(Context::max_list)) fail("range() of more than 1048576 items");
    List l;
    for (int64_t i = 0; i < int64_t(n); ++i) l.push_back(Value(start + i * step));
    return Value(l);
  });
  g->vars["namespace"] = Value::function([](Args& a) {
    Value ns = Value::dict();
    ns.set_namespace();
    if (!a.positional.empty() && a.positional[0].is_dict())
      for (auto& [k, v] : a.positional[0].dict_ref().items) ns.dict_ref().set(k, v);
    for (auto& [k, v] : a.keyword) ns.dict_ref().set(k, v);
    return ns.update_depth();
  });
  g->vars["dict"] = Value::function([](Args& a) {
    Value d = Value::dict();
    for (auto& [k, v] : a.keyword) d.dict_ref().set(k, v);
    return d.update_depth();
  });
  g->vars["strftime_now"] = Value::function([](Args& a) {
    Value fmt = a.get(0, "format");
    if (!fmt.is_string()) fail("strftime_now() needs a format string");
    std::time_t t = std::time(nullptr);
    std::tm tm{};
    localtime_r(&t, &tm);
    char buf[256];
    size_t n = std::strftime(buf, sizeof(buf), fmt.str().c_str(), &tm);
    return Value(std::string(buf, n));
  });
  return g;
}

}  // namespace

// Jinja2's lexer first turns every \r\n and lone \r into \n and drops one trailing newline
// (keep_trailing_newline is off in transformers).
static std::string normalize_newlines(const std::string& source) {
  std::string s;
  s.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] != '\r') s += source[i];
    else if (i + 1 >= source.size() || source[i + 1] != '\n') s += '\n';
  }
  if (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

Template::Template(const std::string& source, std::string name) : name_(std::move(name)) {
  Parser p(segment(normalize_newlines(source), name_), name_);
  body_ = p.parse_all();
}

Template::~Template() = default;
Template::Template(Template&&) noexcept = default;
Template& Template::operator=(Template&&) noexcept = default;

std::string Template::render(const std::map<std::string, Value>& variables) const {
  Context ctx;
  ctx.name = name_;
  ctx.meter.name = name_;
  // The meter counts work done anywhere below this render, on this thread.
  struct MeterScope {
    RenderMeter* saved;
    explicit MeterScope(RenderMeter* m) : saved(g_meter) { g_meter = m; }
    ~MeterScope() { g_meter = saved; }
  } meter_scope(&ctx.meter);
  ctx.scopes.push_back(globals());
  ctx.scopes.push_back(std::make_shared<Scope>());
  for (auto& [k, v] : variables) ctx.set(k, v);
  ctx.scopes.push_back(std::make_shared<Scope>());
  exec_body(body_, ctx);
  return ctx.out;
}

}  // namespace vkvlm::jinja
