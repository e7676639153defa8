#include <cstdio>
#include <cstring>
#include <string>

#include "gpu/device.h"
#include "gpu/error.h"

int main(int argc, char** argv) {
  try {
    if (argc >= 2 && std::strcmp(argv[1], "devices") == 0) {
      for (auto& d : vkvlm::gpu::Device::enumerate())
        std::printf("[%u] %s\n", d.index, d.profile.summary_line().c_str());
      return 0;
    }
    std::fprintf(stderr, "usage: vkvlm devices\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vkvlm: error: %s\n", e.what());
    return 1;
  }
}
