#pragma once
// Errors are values a user can act on: what failed, on which object, and why.
#include <stdexcept>
#include <string>

#include <vulkan/vulkan.h>

namespace vkvlm {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Concatenates its arguments with operator<< into one message.
template <typename... Args>
[[noreturn]] void fail(const Args&... args);

}  // namespace vkvlm

namespace vkvlm::gpu {

const char* result_name(VkResult r);

// Throws vkvlm::Error naming the call and the result when r is not VK_SUCCESS.
void check(VkResult r, const char* what);

}  // namespace vkvlm::gpu

#include <sstream>
template <typename... Args>
[[noreturn]] void vkvlm::fail(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw Error(os.str());
}

#define VKVLM_VK(call) ::vkvlm::gpu::check((call), #call)
