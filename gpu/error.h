#pragma once
// Vulkan results as errors: check() turns a failed VkResult into a vkvlm::Error naming the call.
#include <vulkan/vulkan.h>

#include "base/error.h"

namespace vkvlm::gpu {

const char* result_name(VkResult r);

// Throws vkvlm::Error naming the call and the result when r is not VK_SUCCESS.
void check(VkResult r, const char* what);

}  // namespace vkvlm::gpu

#define VKVLM_VK(call) ::vkvlm::gpu::check((call), #call)
