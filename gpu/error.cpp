#include "gpu/error.h"

namespace vkvlm::gpu {

const char* result_name(VkResult r) {
  switch (r) {
#define CASE(x) \
  case x:       \
    return #x;
    CASE(VK_SUCCESS)
    CASE(VK_NOT_READY)
    CASE(VK_TIMEOUT)
    CASE(VK_INCOMPLETE)
    CASE(VK_ERROR_OUT_OF_HOST_MEMORY)
    CASE(VK_ERROR_OUT_OF_DEVICE_MEMORY)
    CASE(VK_ERROR_INITIALIZATION_FAILED)
    CASE(VK_ERROR_DEVICE_LOST)
    CASE(VK_ERROR_MEMORY_MAP_FAILED)
    CASE(VK_ERROR_LAYER_NOT_PRESENT)
    CASE(VK_ERROR_EXTENSION_NOT_PRESENT)
    CASE(VK_ERROR_FEATURE_NOT_PRESENT)
    CASE(VK_ERROR_INCOMPATIBLE_DRIVER)
    CASE(VK_ERROR_TOO_MANY_OBJECTS)
    CASE(VK_ERROR_FORMAT_NOT_SUPPORTED)
    CASE(VK_ERROR_FRAGMENTED_POOL)
    CASE(VK_ERROR_OUT_OF_POOL_MEMORY)
    CASE(VK_ERROR_INVALID_SHADER_NV)
    CASE(VK_PIPELINE_COMPILE_REQUIRED)
#undef CASE
    default:
      return "VkResult(unknown)";
  }
}

void check(VkResult r, const char* what) {
  if (r == VK_SUCCESS) return;
  std::string msg = std::string("Vulkan call failed with ") + result_name(r) + ": " + what;
  if (r == VK_ERROR_DEVICE_LOST)
    msg += " (the GPU reset or the driver gave up; a watchdog timeout on a long submission is a common cause)";
  if (r == VK_ERROR_INCOMPATIBLE_DRIVER)
    msg += " (no Vulkan driver found: install one, e.g. mesa-vulkan-drivers for the CPU device)";
  throw Error(msg);
}

}  // namespace vkvlm::gpu
