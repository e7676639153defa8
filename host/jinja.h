#pragma once
// An interpreter for the Jinja subset Hugging Face chat templates use, rendering as
// transformers does: trim_blocks and lstrip_blocks on, loop controls, raise_exception(), and a
// tojson that keeps non-ASCII characters. Unsupported constructs are errors naming the
// construct and its line.
//
// A template comes from a model folder, so it is data a stranger wrote: parsing and rendering
// are bounded (nesting, macro calls, steps, output and value sizes, values nested in values) and
// arithmetic is checked; a template over a limit fails with an error naming the limit, never
// the process.
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

namespace vkvlm::jinja {

class Value;
using List = std::vector<Value>;

// An insertion-ordered dictionary (Python dict / Jinja namespace). Keys are strings, numbers,
// booleans or none, equal as in Python (1, 1.0 and true are one key).
struct Dict {
  std::vector<std::pair<Value, Value>> items;     // (key, value) in insertion order
  std::unordered_map<std::string, size_t> index;  // hash_key(key) -> position in items
  Value* find(const std::string& k);
  Value* find(const char* k) { return find(std::string(k)); }
  Value* find(const Value& k);  // nullptr also for a key that cannot be a dict key
  void set(const std::string& k, Value v);
  void set(const char* k, Value v);
  void set(const Value& k, Value v);  // fails for a list, dict or function key ("unhashable")
  // The index key of a value, or "" (never a valid index key) when it cannot be a dict key.
  static std::string hash_key(const Value& k);
};

struct Args;
using Function = std::function<Value(Args&)>;

class Value {
 public:
  enum class Kind : uint8_t { Undefined, None, Bool, Int, Float, String, List, Dict, Function };
  // Which Python sequence a List value stands for: they differ in how they print, convert to
  // JSON, count and test true. An Iterator (a generator from map/select/..., reversed()) is
  // always true, has no length, cannot be printed or turned into JSON, and is used up by the
  // first loop or filter that walks it, as in Jinja2.
  enum class Seq : uint8_t { List, Tuple, Iterator, DictItems, DictKeys, DictValues };

  Value() = default;  // undefined
  static Value undefined(std::string name = "");
  static Value none();
  Value(bool b);
  Value(int v);
  Value(int64_t v);
  Value(double v);
  Value(const char* s);
  Value(std::string s);
  Value(List l);
  static Value dict();
  static Value function(Function f);
  // Objects keep their key order when given an ordered_json (as tojson output depends on it).
  static Value from_json(const nlohmann::json& j);
  static Value from_json(const nlohmann::ordered_json& j);

  Kind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == Kind::Undefined; }
  bool is_none() const { return kind_ == Kind::None; }
  bool is_string() const { return kind_ == Kind::String; }
  bool is_number() const { return kind_ == Kind::Int || kind_ == Kind::Float; }
  bool is_list() const { return kind_ == Kind::List; }
  bool is_dict() const { return kind_ == Kind::Dict; }
  bool is_function() const { return kind_ == Kind::Function; }
  bool namespace_object() const { return namespace_; }

  bool truthy() const;
  int64_t as_int() const;
  double as_float() const;
  const std::string& str() const { return ptr_ ? *static_cast<const std::string*>(ptr_.get()) : empty_string(); }
  List& list() const { return *static_cast<List*>(ptr_.get()); }
  Dict& dict_ref() const { return *static_cast<Dict*>(ptr_.get()); }
  const Function& fn() const { return *static_cast<const Function*>(ptr_.get()); }
  const std::string& undefined_name() const { return str(); }

  std::string to_output() const;  // what {{ }} prints (Python str())
  std::string repr() const;       // Python repr()
  nlohmann::json to_json() const;
  std::string type_name() const;

  Value& set_namespace() {
    namespace_ = true;
    return *this;
  }
  Seq seq() const { return seq_; }
  Value& set_seq(Seq s) {
    seq_ = s;
    return *this;
  }
  // A string marked safe (Jinja2's Markup, from |safe or |escape): a plain string added to it
  // is HTML-escaped first.
  bool markup() const { return markup_; }
  Value& set_markup(bool m) {
    markup_ = m;
    return *this;
  }
  // How deeply lists and dicts nest inside this value (0: a scalar). Containers deeper than
  // max_nesting are refused when built, so nothing recursive over a value can overflow the stack.
  int depth() const { return depth_; }
  static constexpr int max_nesting = 200;
  // Recomputes a dict's depth after its entries were set (dict literals, namespaces).
  Value& update_depth();

 private:
  // 32 bytes a value: a list of a million items is 32 MB.
  Kind kind_ = Kind::Undefined;
  Seq seq_ = Seq::List;
  bool b_ = false, namespace_ = false, markup_ = false;
  uint16_t depth_ = 0;
  union {
    int64_t i_ = 0;
    double f_;
  };
  // By kind: the text (a String, or an Undefined's name), List, Dict or Function. Strings are
  // immutable, so copies of a value share their text: a list of one long string repeated holds
  // it once, and a template's memory is the bytes it built.
  std::shared_ptr<void> ptr_;
  static const std::string& empty_string();
};

struct Args {
  std::vector<Value> positional;
  std::vector<std::pair<std::string, Value>> keyword;
  int line = 0;
  // The argument at position i or named `name`, or `dflt`.
  Value get(size_t i, const char* name, Value dflt = Value()) const;
};

class Template {
 public:
  // Parses the template; `name` appears in error messages (e.g. "chat template").
  explicit Template(const std::string& source, std::string name = "template");
  ~Template();
  Template(Template&&) noexcept;
  Template& operator=(Template&&) noexcept;

  // Renders with the given variables (messages, add_generation_prompt, bos_token, ...).
  std::string render(const std::map<std::string, Value>& variables) const;

  struct Node;

 private:
  std::string name_;
  std::vector<std::unique_ptr<Node>> body_;
};

}  // namespace vkvlm::jinja
