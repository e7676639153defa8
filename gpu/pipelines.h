#pragma once
// Compute pipelines built from the embedded SPIR-V, keyed by variant name and specialization
// constants, with a VkPipelineCache kept on disk between runs.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <vulkan/vulkan.h>

namespace vkvlm::gpu {

class Device;

// Every kernel takes its parameters as push constants of at most this size.
constexpr uint32_t k_push_constant_bytes = 128;

struct Pipeline {
  std::string name;
  VkPipeline pipeline = VK_NULL_HANDLE;
  VkPipelineLayout layout = VK_NULL_HANDLE;
  VkDescriptorSetLayout set_layout = VK_NULL_HANDLE;
  std::vector<uint32_t> bindings;  // binding numbers the shader declares, ascending
};

class PipelineRegistry {
 public:
  explicit PipelineRegistry(Device& device);
  ~PipelineRegistry();
  PipelineRegistry(const PipelineRegistry&) = delete;
  PipelineRegistry& operator=(const PipelineRegistry&) = delete;

  // The pipeline of variant `shader` with specialization constants 0..n-1 set to `spec`
  // (constant 0 is the workgroup size by convention). Built on first use.
  const Pipeline& get(const std::string& shader, const std::vector<uint32_t>& spec);
  static bool has_shader(const std::string& shader);
  // Names of every embedded variant.
  static std::vector<std::string> shader_names();
  size_t size() const;
  // Writes the pipeline cache to disk now (also done on destruction).
  void save_cache();

 private:
  Device& device_;
  VkPipelineCache cache_ = VK_NULL_HANDLE;
  std::string cache_path_;
  mutable std::mutex mutex_;
  std::map<std::string, std::unique_ptr<Pipeline>> pipelines_;
  std::map<std::vector<uint32_t>, VkDescriptorSetLayout> set_layouts_;
  std::map<VkDescriptorSetLayout, VkPipelineLayout> layouts_;
  std::map<std::string, VkShaderModule> modules_;
};

}  // namespace vkvlm::gpu
