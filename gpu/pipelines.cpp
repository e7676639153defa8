#include "gpu/pipelines.h"

#include <cstdio>
#include <cstdlib>
#include <unistd.h>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "gpu/device.h"
#include "gpu/error.h"
#include "gpu/shader_blobs.h"

namespace vkvlm::gpu {
namespace {

const ShaderBlob* find_blob(const std::string& name) {
  for (size_t i = 0; i < k_shader_blob_count; ++i)
    if (name == k_shader_blobs[i].name) return &k_shader_blobs[i];
  return nullptr;
}

// Binding numbers of the descriptors a SPIR-V module declares (OpDecorate ... Binding n).
std::vector<uint32_t> declared_bindings(const ShaderBlob& blob) {
  std::set<uint32_t> found;
  const uint32_t* w = blob.words;
  size_t i = 5;  // after the header
  while (i < blob.word_count) {
    uint32_t opcode = w[i] & 0xFFFFu, count = w[i] >> 16;
    if (count == 0) break;
    const uint32_t kOpDecorate = 71, kDecorationBinding = 33;
    if (opcode == kOpDecorate && count >= 4 && w[i + 2] == kDecorationBinding) found.insert(w[i + 3]);
    i += count;
  }
  return {found.begin(), found.end()};
}

std::string cache_directory() {
  if (const char* d = std::getenv("VKVLM_CACHE_DIR")) return d;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/vkvlm";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.cache/vkvlm";
  return "";
}

}  // namespace

bool PipelineRegistry::has_shader(const std::string& shader) { return find_blob(shader) != nullptr; }

std::vector<std::string> PipelineRegistry::shader_names() {
  std::vector<std::string> v;
  for (size_t i = 0; i < k_shader_blob_count; ++i) v.emplace_back(k_shader_blobs[i].name);
  return v;
}

PipelineRegistry::PipelineRegistry(Device& device) : device_(device) {
  VkPhysicalDeviceProperties props{};
  vkGetPhysicalDeviceProperties(device.physical_device(), &props);
  std::string dir = cache_directory();
  std::vector<char> initial;
  if (!dir.empty()) {
    std::ostringstream name;
    name << dir << "/pipelines-" << std::hex << props.vendorID << "-" << props.deviceID << "-" << props.driverVersion
         << "-";
    for (uint8_t b : props.pipelineCacheUUID) name << std::hex << (b >> 4) << (b & 15);
    name << ".bin";
    cache_path_ = name.str();
    std::ifstream in(cache_path_, std::ios::binary);
    if (in) initial.assign(std::istreambuf_iterator<char>(in), {});
  }
  VkPipelineCacheCreateInfo ci{VK_STRUCTURE_TYPE_PIPELINE_CACHE_CREATE_INFO};
  ci.initialDataSize = initial.size();
  ci.pInitialData = initial.empty() ? nullptr : initial.data();
  // A stale or foreign cache file is not an error: start empty.
  if (vkCreatePipelineCache(device.device(), &ci, nullptr, &cache_) != VK_SUCCESS) {
    ci.initialDataSize = 0;
    ci.pInitialData = nullptr;
    check(vkCreatePipelineCache(device.device(), &ci, nullptr, &cache_), "vkCreatePipelineCache");
  }
}

void PipelineRegistry::save_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (cache_path_.empty() || !cache_) return;
  size_t n = 0;
  if (vkGetPipelineCacheData(device_.device(), cache_, &n, nullptr) != VK_SUCCESS || n == 0) return;
  std::vector<char> data(n);
  if (vkGetPipelineCacheData(device_.device(), cache_, &n, data.data()) != VK_SUCCESS) return;
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(cache_path_).parent_path(), ec);
  if (ec) return;  // an unwritable cache folder only costs compile time
  std::string tmp = cache_path_ + ".tmp" + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary);
    if (!out) return;
    out.write(data.data(), std::streamsize(n));
    if (!out) return;
  }
  std::filesystem::rename(tmp, cache_path_, ec);
  if (ec) std::filesystem::remove(tmp, ec);
}

PipelineRegistry::~PipelineRegistry() {
  save_cache();
  VkDevice dev = device_.device();
  for (auto& [k, p] : pipelines_) vkDestroyPipeline(dev, p->pipeline, nullptr);
  for (auto& [k, l] : layouts_) vkDestroyPipelineLayout(dev, l, nullptr);
  for (auto& [k, l] : set_layouts_) vkDestroyDescriptorSetLayout(dev, l, nullptr);
  for (auto& [k, m] : modules_) vkDestroyShaderModule(dev, m, nullptr);
  if (cache_) vkDestroyPipelineCache(dev, cache_, nullptr);
}

size_t PipelineRegistry::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return pipelines_.size();
}

const Pipeline& PipelineRegistry::get(const std::string& shader, const std::vector<uint32_t>& spec) {
  std::string key = shader;
  for (uint32_t v : spec) key += ":" + std::to_string(v);
  std::lock_guard<std::mutex> lock(mutex_);
  if (auto it = pipelines_.find(key); it != pipelines_.end()) return *it->second;

  const ShaderBlob* blob = find_blob(shader);
  if (!blob) fail("internal: no kernel variant named '", shader, "' is embedded");
  VkDevice dev = device_.device();
  auto p = std::make_unique<Pipeline>();
  p->name = key;
  p->bindings = declared_bindings(*blob);

  VkShaderModule& module = modules_[shader];
  if (!module) {
    VkShaderModuleCreateInfo mi{VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO};
    mi.codeSize = blob->word_count * 4;
    mi.pCode = blob->words;
    check(vkCreateShaderModule(dev, &mi, nullptr, &module), "vkCreateShaderModule");
  }
  VkDescriptorSetLayout& set_layout = set_layouts_[p->bindings];
  if (!set_layout) {
    std::vector<VkDescriptorSetLayoutBinding> b;
    for (uint32_t n : p->bindings)
      b.push_back({n, VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, 1, VK_SHADER_STAGE_COMPUTE_BIT, nullptr});
    VkDescriptorSetLayoutCreateInfo li{VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO};
    li.bindingCount = uint32_t(b.size());
    li.pBindings = b.data();
    check(vkCreateDescriptorSetLayout(dev, &li, nullptr, &set_layout), "vkCreateDescriptorSetLayout");
  }
  p->set_layout = set_layout;
  VkPipelineLayout& layout = layouts_[set_layout];
  if (!layout) {
    VkPushConstantRange pc{VK_SHADER_STAGE_COMPUTE_BIT, 0, k_push_constant_bytes};
    VkPipelineLayoutCreateInfo li{VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO};
    li.setLayoutCount = 1;
    li.pSetLayouts = &set_layout;
    li.pushConstantRangeCount = 1;
    li.pPushConstantRanges = &pc;
    check(vkCreatePipelineLayout(dev, &li, nullptr, &layout), "vkCreatePipelineLayout");
  }
  p->layout = layout;

  std::vector<VkSpecializationMapEntry> entries;
  for (uint32_t i = 0; i < spec.size(); ++i) entries.push_back({i, i * 4, 4});
  VkSpecializationInfo si{uint32_t(entries.size()), entries.data(), spec.size() * 4, spec.data()};
  VkComputePipelineCreateInfo ci{VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO};
  ci.stage = {VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO};
  ci.stage.stage = VK_SHADER_STAGE_COMPUTE_BIT;
  ci.stage.module = module;
  ci.stage.pName = "main";
  ci.stage.pSpecializationInfo = spec.empty() ? nullptr : &si;
  ci.layout = layout;
  VkResult r = vkCreateComputePipelines(dev, cache_, 1, &ci, nullptr, &p->pipeline);
  if (r != VK_SUCCESS) fail("building kernel ", key, " failed: ", result_name(r));
  auto& ref = *p;
  pipelines_[key] = std::move(p);
  return ref;
}

}  // namespace vkvlm::gpu
