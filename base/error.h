#pragma once
// Errors are values a user can act on: what failed, on which object, and why. The base layer:
// every other layer may use it, and it needs nothing (no Vulkan, no JSON).
#include <sstream>
#include <stdexcept>
#include <string>

namespace vkvlm {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Concatenates its arguments with operator<< into one message and throws it as an Error.
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw Error(os.str());
}

}  // namespace vkvlm
