// Test entry point for suites that use the GPU: besides the tests' own verdicts, any message the
// Vulkan validation layer printed (under VKVLM_VALIDATE=1) fails the run.
#include <gtest/gtest.h>

#include <cstdio>

#include "gpu/device.h"

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  int rc = RUN_ALL_TESTS();
  const auto messages = vkvlm::gpu::Device::validation_message_count();
  if (messages > 0) {
    std::fprintf(stderr, "FAILED: the Vulkan validation layer reported %llu message(s)\n",
                 static_cast<unsigned long long>(messages));
    rc = 1;
  }
  return rc;
}
