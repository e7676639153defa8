#pragma once
// Command-line flags: --name value, --name=value, repeated flags and switches, with typed,
// range-checked access whose errors name the flag.
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "models/decoder.h"

namespace vkvlm {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Flags of one command: --name value, --name=value, repeated flags, and switches.
class Flags {
 public:
  Flags(int argc, char** argv, int first, const std::map<std::string, bool>& known) {
    for (int i = first; i < argc; ++i) {
      std::string a = argv[i];
      if (a.rfind("--", 0) != 0) throw UsageError("unexpected argument '" + a + "'");
      std::string name = a.substr(2), value;
      bool inline_value = false;
      if (auto eq = name.find('='); eq != std::string::npos) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
        inline_value = true;
      }
      auto it = known.find(name);
      if (it == known.end()) throw UsageError("unknown option --" + name);
      if (it->second) {  // takes a value
        if (!inline_value) {
          if (i + 1 >= argc) throw UsageError("--" + name + " needs a value");
          value = argv[++i];
        }
        values_[name].push_back(value);
      } else {
        if (inline_value) throw UsageError("--" + name + " takes no value");
        values_[name].push_back("");
      }
    }
  }
  bool has(const std::string& n) const { return values_.count(n) > 0; }
  std::string str(const std::string& n, const std::string& dflt = "") const {
    auto it = values_.find(n);
    if (it == values_.end()) return dflt;
    if (it->second.size() > 1) throw UsageError("--" + n + " was given more than once");
    return it->second[0];
  }
  std::vector<std::string> all(const std::string& n) const {
    auto it = values_.find(n);
    return it == values_.end() ? std::vector<std::string>{} : it->second;
  }
  int64_t integer(const std::string& n, int64_t dflt, int64_t lo, int64_t hi) const {
    if (!has(n)) return dflt;
    const std::string s = str(n);
    char* end = nullptr;
    errno = 0;
    long long v = std::strtoll(s.c_str(), &end, 10);
    if (s.empty() || *end || errno) throw UsageError("--" + n + " needs a whole number, not '" + s + "'");
    if (v < lo || v > hi)
      throw UsageError("--" + n + " must be between " + std::to_string(lo) + " and " + std::to_string(hi) + ", not " + s);
    return v;
  }
  double number(const std::string& n, double dflt, double lo, double hi) const {
    if (!has(n)) return dflt;
    const std::string s = str(n);
    char* end = nullptr;
    errno = 0;
    double v = std::strtod(s.c_str(), &end);
    if (s.empty() || *end || errno || !std::isfinite(v)) throw UsageError("--" + n + " needs a number, not '" + s + "'");
    if (v < lo || v > hi) {
      std::ostringstream os;
      os << "--" << n << " must be between " << lo << " and " << hi << ", not " << s;
      throw UsageError(os.str());
    }
    return v;
  }

 private:
  std::map<std::string, std::vector<std::string>> values_;
};

// --kv-bits 4|8 [--kv-group-size 32|64|128] [--quantized-kv-start N] (mlx-lm's flags).
inline KvFormat kv_format(const Flags& f) {
  KvFormat k;
  if (!f.has("kv-bits")) {
    if (f.has("kv-group-size") || f.has("quantized-kv-start"))
      throw UsageError("--kv-group-size and --quantized-kv-start go with --kv-bits 4|8");
    return k;
  }
  k.bits = int(f.integer("kv-bits", 16, 4, 8));
  if (k.bits != 4 && k.bits != 8) throw UsageError("--kv-bits takes 4 or 8, not " + f.str("kv-bits"));
  k.group_size = int(f.integer("kv-group-size", 64, 32, 128));
  if (k.group_size != 32 && k.group_size != 64 && k.group_size != 128)
    throw UsageError("--kv-group-size takes 32, 64 or 128, not " + f.str("kv-group-size"));
  k.quantized_start = f.integer("quantized-kv-start", 0, 0, int64_t(1) << 24);
  return k;
}

}  // namespace vkvlm
