#pragma once
// An environment variable set (or, given "", unset) for a scope, restored after it.
#include <cstdlib>
#include <string>

namespace vkvlm::test {

struct Env {
  std::string name;
  std::string old;
  bool had;
  Env(const char* n, const std::string& v) : name(n), had(std::getenv(n) != nullptr) {
    if (had) old = std::getenv(n);
    if (v.empty()) ::unsetenv(n);
    else ::setenv(n, v.c_str(), 1);
  }
  ~Env() {
    if (had) ::setenv(name.c_str(), old.c_str(), 1);
    else ::unsetenv(name.c_str());
  }
  Env(const Env&) = delete;
  Env& operator=(const Env&) = delete;
};

}  // namespace vkvlm::test
