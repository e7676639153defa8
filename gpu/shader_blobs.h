#pragma once
#include <cstddef>
#include <cstdint>

namespace vkvlm::gpu {

// One compiled SPIR-V kernel variant, embedded at build time (see shaders/shaders.cmake).
struct ShaderBlob {
  const char* name;
  const uint32_t* words;
  size_t word_count;
};

extern const ShaderBlob k_shader_blobs[];
extern const size_t k_shader_blob_count;

}  // namespace vkvlm::gpu
