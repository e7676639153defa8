#include "gpu/device.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "gpu/error.h"

namespace vkvlm::gpu {
namespace {

std::atomic<uint64_t> g_validation_messages{0};

VKAPI_ATTR VkBool32 VKAPI_CALL on_validation_message(VkDebugUtilsMessageSeverityFlagBitsEXT severity,
                                                     VkDebugUtilsMessageTypeFlagsEXT type,
                                                     const VkDebugUtilsMessengerCallbackDataEXT* data,
                                                     void*) {
  if (severity >= VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT &&
      (type & VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT)) {
    g_validation_messages.fetch_add(1);
    std::fprintf(stderr, "vkvlm: validation %s: %s\n",
                 severity >= VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT ? "error" : "warning",
                 data->pMessage ? data->pMessage : "");
  }
  return VK_FALSE;
}

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

uint64_t env_bytes(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  unsigned long long n = std::strtoull(v, &end, 10);
  if (end == v || *end != '\0' || n == 0)
    fail(name, "='", v, "' is not a positive number of bytes");
  return n;
}

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::strcmp(v, "0") != 0;
}

std::vector<std::string> device_extensions(VkPhysicalDevice pd) {
  uint32_t n = 0;
  vkEnumerateDeviceExtensionProperties(pd, nullptr, &n, nullptr);
  std::vector<VkExtensionProperties> props(n);
  vkEnumerateDeviceExtensionProperties(pd, nullptr, &n, props.data());
  std::vector<std::string> names;
  for (auto& p : props) names.emplace_back(p.extensionName);
  return names;
}

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

const char* component_name(VkComponentTypeNV t) {
  switch (t) {
    case VK_COMPONENT_TYPE_FLOAT16_NV: return "f16";
    case VK_COMPONENT_TYPE_FLOAT32_NV: return "f32";
    case VK_COMPONENT_TYPE_FLOAT64_NV: return "f64";
    case VK_COMPONENT_TYPE_SINT8_NV: return "i8";
    case VK_COMPONENT_TYPE_UINT8_NV: return "u8";
    case VK_COMPONENT_TYPE_SINT32_NV: return "i32";
    case VK_COMPONENT_TYPE_UINT32_NV: return "u32";
    default: return "?";
  }
}

// The optional features a device supports (or an application enabled), before masking.
struct FeatureSet {
  bool fp16 = false, int8 = false, storage16 = false, storage8 = false, bda = false;
  bool subgroup_size_control = false, coopmat_nv = false;
};

// The feature structs vkvlm queries and enables, linked into one chain (Vulkan 1.3 and NV
// cooperative-matrix structs only where the device has them).
struct FeatureChain {
  VkPhysicalDeviceCooperativeMatrixFeaturesNV cm{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV};
  VkPhysicalDeviceVulkan13Features f13{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_3_FEATURES};
  VkPhysicalDeviceVulkan12Features f12{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES};
  VkPhysicalDeviceVulkan11Features f11{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES};
  VkPhysicalDeviceFeatures2 f2{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2};
  bool has13 = false, has_cm = false;

  FeatureChain(uint32_t api, bool with_coopmat) : has13(api >= VK_API_VERSION_1_3), has_cm(with_coopmat) {
    f2.pNext = &f11;
    f11.pNext = &f12;
    void** tail = &f12.pNext;
    if (has13) {
      *tail = &f13;
      tail = &f13.pNext;
    }
    if (has_cm) *tail = &cm;
  }
  FeatureChain(const FeatureChain&) = delete;
  FeatureChain& operator=(const FeatureChain&) = delete;
};

FeatureSet supported_features(VkPhysicalDevice pd, uint32_t api, const std::vector<std::string>& exts) {
  FeatureChain c(api, contains(exts, "VK_NV_cooperative_matrix"));
  vkGetPhysicalDeviceFeatures2(pd, &c.f2);
  FeatureSet s;
  s.fp16 = c.f12.shaderFloat16;
  s.int8 = c.f12.shaderInt8;
  s.storage16 = c.f11.storageBuffer16BitAccess;
  s.storage8 = c.f12.storageBuffer8BitAccess;
  s.bda = c.f12.bufferDeviceAddress;
  s.subgroup_size_control = c.has13 && c.f13.subgroupSizeControl && c.f13.computeFullSubgroups;
  s.coopmat_nv = c.has_cm && c.cm.cooperativeMatrix;
  return s;
}

// Reads the features an application enabled from the chain it passed to vkCreateDevice.
FeatureSet features_from_chain(const VkPhysicalDeviceFeatures2* chain, const std::vector<std::string>& exts) {
  FeatureSet s;
  if (!chain) return s;
  for (auto* p = static_cast<const VkBaseInStructure*>(chain->pNext); p; p = p->pNext) {
    switch (p->sType) {
      case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES: {
        auto* f = reinterpret_cast<const VkPhysicalDeviceVulkan11Features*>(p);
        s.storage16 = f->storageBuffer16BitAccess;
        break;
      }
      case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES: {
        auto* f = reinterpret_cast<const VkPhysicalDeviceVulkan12Features*>(p);
        s.fp16 = f->shaderFloat16;
        s.int8 = f->shaderInt8;
        s.storage8 = f->storageBuffer8BitAccess;
        s.bda = f->bufferDeviceAddress;
        break;
      }
      case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_3_FEATURES: {
        auto* f = reinterpret_cast<const VkPhysicalDeviceVulkan13Features*>(p);
        s.subgroup_size_control = f->subgroupSizeControl && f->computeFullSubgroups;
        break;
      }
      case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV: {
        auto* f = reinterpret_cast<const VkPhysicalDeviceCooperativeMatrixFeaturesNV*>(p);
        s.coopmat_nv = f->cooperativeMatrix && contains(exts, "VK_NV_cooperative_matrix");
        break;
      }
      default:
        break;
    }
  }
  return s;
}

// Builds the profile of a physical device, given the features that are (or will be) enabled.
FeatureProfile build_profile(VkInstance instance, VkPhysicalDevice pd, const FeatureSet& enabled,
                             const std::vector<std::string>& exts, uint32_t queue_family,
                             const std::vector<std::string>& masked) {
  FeatureProfile p;
  VkPhysicalDeviceVulkan12Properties p12{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_PROPERTIES};
  VkPhysicalDeviceVulkan11Properties p11{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_PROPERTIES};
  VkPhysicalDeviceSubgroupSizeControlProperties psc{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_SIZE_CONTROL_PROPERTIES};
  VkPhysicalDeviceProperties2 p2{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2};
  p2.pNext = &p11;
  p11.pNext = &p12;
  VkPhysicalDeviceProperties base{};
  vkGetPhysicalDeviceProperties(pd, &base);
  if (base.apiVersion >= VK_API_VERSION_1_3 || contains(exts, "VK_EXT_subgroup_size_control")) p12.pNext = &psc;
  vkGetPhysicalDeviceProperties2(pd, &p2);
  const VkPhysicalDeviceProperties& props = p2.properties;
  auto has_mask = [&](const char* n) { return contains(masked, n); };

  p.device_name = props.deviceName;
  p.driver_name = p12.driverName;
  p.vendor_id = props.vendorID;
  p.device_id = props.deviceID;
  p.device_type = props.deviceType;
  p.driver_id = p12.driverID;
  p.api_version = props.apiVersion;
  p.masked = masked;

  p.fp16 = enabled.fp16 && !has_mask("fp16");
  p.int8 = enabled.int8 && !has_mask("int8");
  p.storage16 = enabled.storage16 && !has_mask("16bit_storage");
  p.storage8 = enabled.storage8 && !has_mask("8bit_storage");
  p.bda = enabled.bda && !has_mask("bda");

  const VkSubgroupFeatureFlags needed = VK_SUBGROUP_FEATURE_BASIC_BIT | VK_SUBGROUP_FEATURE_ARITHMETIC_BIT |
                                        VK_SUBGROUP_FEATURE_BALLOT_BIT | VK_SUBGROUP_FEATURE_SHUFFLE_BIT;
  p.subgroup_size = p11.subgroupSize;
  p.min_subgroup_size = psc.minSubgroupSize ? psc.minSubgroupSize : p11.subgroupSize;
  p.max_subgroup_size = psc.maxSubgroupSize ? psc.maxSubgroupSize : p11.subgroupSize;
  p.subgroup = (p11.subgroupSupportedStages & VK_SHADER_STAGE_COMPUTE_BIT) &&
               (p11.subgroupSupportedOperations & needed) == needed && !has_mask("subgroup");
  p.subgroup_size_control = enabled.subgroup_size_control && p.subgroup;

  p.coopmat_khr_listed = contains(exts, "VK_KHR_cooperative_matrix");
  if (enabled.coopmat_nv && !has_mask("coopmat") && p.fp16 && p.storage16 && p.subgroup) {
    auto fn = reinterpret_cast<PFN_vkGetPhysicalDeviceCooperativeMatrixPropertiesNV>(
        vkGetInstanceProcAddr(instance, "vkGetPhysicalDeviceCooperativeMatrixPropertiesNV"));
    if (fn) {
      uint32_t n = 0;
      fn(pd, &n, nullptr);
      std::vector<VkCooperativeMatrixPropertiesNV> shapes(n, {VK_STRUCTURE_TYPE_COOPERATIVE_MATRIX_PROPERTIES_NV});
      fn(pd, &n, shapes.data());
      for (auto& s : shapes) {
        if (s.scope != VK_SCOPE_SUBGROUP_NV) continue;
        p.coopmat_shapes.push_back({s.MSize, s.NSize, s.KSize, component_name(s.AType), component_name(s.BType),
                                    component_name(s.CType)});
      }
      p.coopmat = !p.coopmat_shapes.empty();
    }
  }

  uint32_t nq = 0;
  vkGetPhysicalDeviceQueueFamilyProperties(pd, &nq, nullptr);
  std::vector<VkQueueFamilyProperties> qf(nq);
  vkGetPhysicalDeviceQueueFamilyProperties(pd, &nq, qf.data());
  p.timestamp_valid_bits = queue_family < nq ? qf[queue_family].timestampValidBits : 0;
  p.timestamps = p.timestamp_valid_bits > 0 && props.limits.timestampPeriod > 0 && !has_mask("timestamps");
  p.timestamp_period_ns = props.limits.timestampPeriod;

  p.max_shared_memory = props.limits.maxComputeSharedMemorySize;
  p.max_binding_bytes = std::min<uint64_t>(props.limits.maxStorageBufferRange,
                                           env_bytes("VKVLM_MAX_BINDING_BYTES", UINT64_MAX));
  p.max_allocation_bytes = std::min<uint64_t>(p11.maxMemoryAllocationSize,
                                              env_bytes("VKVLM_MAX_ALLOCATION_BYTES", UINT64_MAX));
  p.min_storage_offset_alignment = std::max<uint64_t>(props.limits.minStorageBufferOffsetAlignment, 4);
  p.max_workgroup_size = props.limits.maxComputeWorkGroupInvocations;
  for (int i = 0; i < 3; ++i) p.max_workgroup_count[i] = props.limits.maxComputeWorkGroupCount[i];

  VkPhysicalDeviceMemoryProperties mem{};
  vkGetPhysicalDeviceMemoryProperties(pd, &mem);
  uint64_t largest_local = 0;
  for (uint32_t h = 0; h < mem.memoryHeapCount; ++h)
    if (mem.memoryHeaps[h].flags & VK_MEMORY_HEAP_DEVICE_LOCAL_BIT)
      largest_local = std::max<uint64_t>(largest_local, mem.memoryHeaps[h].size);
  p.device_local_bytes = largest_local;
  bool mappable_local = false;
  for (uint32_t t = 0; t < mem.memoryTypeCount; ++t) {
    auto f = mem.memoryTypes[t].propertyFlags;
    const auto want = VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT | VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT |
                      VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
    if ((f & want) == want && mem.memoryHeaps[mem.memoryTypes[t].heapIndex].size >= largest_local)
      mappable_local = true;
  }
  p.unified_memory = mappable_local &&
                     (props.deviceType == VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU ||
                      props.deviceType == VK_PHYSICAL_DEVICE_TYPE_CPU) &&
                     !has_mask("unified");
  return p;
}

int type_rank(VkPhysicalDeviceType t) {
  switch (t) {
    case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return 0;
    case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return 1;
    case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return 2;
    case VK_PHYSICAL_DEVICE_TYPE_CPU: return 3;
    default: return 4;
  }
}

// A compute-capable queue family, preferring one with timestamps.
int pick_queue_family(VkPhysicalDevice pd) {
  uint32_t nq = 0;
  vkGetPhysicalDeviceQueueFamilyProperties(pd, &nq, nullptr);
  std::vector<VkQueueFamilyProperties> qf(nq);
  vkGetPhysicalDeviceQueueFamilyProperties(pd, &nq, qf.data());
  int best = -1;
  for (uint32_t i = 0; i < nq; ++i) {
    if (!(qf[i].queueFlags & VK_QUEUE_COMPUTE_BIT) || qf[i].queueCount == 0) continue;
    if (best < 0 || (qf[i].timestampValidBits > 0 && qf[best].timestampValidBits == 0)) best = int(i);
  }
  return best;
}

struct InstanceHolder {
  VkInstance instance = VK_NULL_HANDLE;
  bool validation = false;
};

InstanceHolder make_instance(bool validation) {
  uint32_t loader_api = VK_API_VERSION_1_0;
  vkEnumerateInstanceVersion(&loader_api);
  VkApplicationInfo app{VK_STRUCTURE_TYPE_APPLICATION_INFO};
  app.pApplicationName = "vkvlm";
  app.pEngineName = "vkvlm";
  app.apiVersion = loader_api >= VK_API_VERSION_1_3 ? VK_API_VERSION_1_3 : VK_API_VERSION_1_2;

  std::vector<const char*> layers, extensions;
  uint32_t n = 0;
  vkEnumerateInstanceExtensionProperties(nullptr, &n, nullptr);
  std::vector<VkExtensionProperties> iexts(n);
  vkEnumerateInstanceExtensionProperties(nullptr, &n, iexts.data());
  auto has_iext = [&](const char* e) {
    return std::any_of(iexts.begin(), iexts.end(), [&](auto& p) { return std::strcmp(p.extensionName, e) == 0; });
  };
  VkInstanceCreateInfo ci{VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO};
  if (has_iext(VK_KHR_PORTABILITY_ENUMERATION_EXTENSION_NAME)) {
    extensions.push_back(VK_KHR_PORTABILITY_ENUMERATION_EXTENSION_NAME);
    ci.flags |= VK_INSTANCE_CREATE_ENUMERATE_PORTABILITY_BIT_KHR;
  }
  if (validation) {
    uint32_t nl = 0;
    vkEnumerateInstanceLayerProperties(&nl, nullptr);
    std::vector<VkLayerProperties> lp(nl);
    vkEnumerateInstanceLayerProperties(&nl, lp.data());
    bool found = std::any_of(lp.begin(), lp.end(), [](auto& l) {
      return std::strcmp(l.layerName, "VK_LAYER_KHRONOS_validation") == 0;
    });
    if (!found)
      fail("VKVLM_VALIDATE=1 needs the Khronos validation layer, which is not installed "
           "(Debian: apt-get install vulkan-validationlayers)");
    layers.push_back("VK_LAYER_KHRONOS_validation");
    extensions.push_back(VK_EXT_DEBUG_UTILS_EXTENSION_NAME);
  }
  ci.pApplicationInfo = &app;
  ci.enabledLayerCount = uint32_t(layers.size());
  ci.ppEnabledLayerNames = layers.data();
  ci.enabledExtensionCount = uint32_t(extensions.size());
  ci.ppEnabledExtensionNames = extensions.data();
  InstanceHolder h;
  VkResult r = vkCreateInstance(&ci, nullptr, &h.instance);
  if (r == VK_ERROR_INCOMPATIBLE_DRIVER)
    fail("no Vulkan driver is installed (for the CPU device: apt-get install mesa-vulkan-drivers)");
  check(r, "vkCreateInstance");
  h.validation = validation;
  return h;
}

std::vector<VkPhysicalDevice> physical_devices(VkInstance instance) {
  uint32_t n = 0;
  check(vkEnumeratePhysicalDevices(instance, &n, nullptr), "vkEnumeratePhysicalDevices");
  std::vector<VkPhysicalDevice> pds(n);
  check(vkEnumeratePhysicalDevices(instance, &n, pds.data()), "vkEnumeratePhysicalDevices");
  return pds;
}

}  // namespace

std::vector<std::string> disabled_features_from_env() {
  static const char* known[] = {"fp16", "int8", "subgroup", "coopmat", "16bit_storage", "8bit_storage",
                                "bda", "timestamps", "unified"};
  std::vector<std::string> out;
  const char* v = std::getenv("VKVLM_DISABLE");
  if (!v) return out;
  std::stringstream ss(v);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (item.empty()) continue;
    if (std::find(std::begin(known), std::end(known), item) == std::end(known))
      fail("VKVLM_DISABLE names an unknown feature '", item,
           "' (known: fp16,int8,subgroup,coopmat,16bit_storage,8bit_storage,bda,timestamps,unified)");
    out.push_back(item);
  }
  return out;
}

std::string FeatureProfile::type_name() const {
  switch (device_type) {
    case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return "discrete";
    case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return "integrated";
    case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return "virtual";
    case VK_PHYSICAL_DEVICE_TYPE_CPU: return "cpu";
    default: return "other";
  }
}

std::string FeatureProfile::summary_line() const {
  std::ostringstream os;
  auto yn = [](bool b) { return b ? "yes" : "no"; };
  os << device_name << " [" << type_name() << ", " << driver_name << ", Vulkan " << VK_API_VERSION_MAJOR(api_version)
     << "." << VK_API_VERSION_MINOR(api_version) << "." << VK_API_VERSION_PATCH(api_version) << "]"
     << " fp16=" << yn(fp16) << " int8=" << yn(int8) << " storage16=" << yn(storage16)
     << " storage8=" << yn(storage8) << " subgroup=" << (subgroup ? std::to_string(subgroup_size) : "no");
  if (min_subgroup_size != max_subgroup_size) os << "(" << min_subgroup_size << "-" << max_subgroup_size << ")";
  os << " size_control=" << yn(subgroup_size_control) << " coopmat=";
  if (coopmat) {
    for (size_t i = 0; i < coopmat_shapes.size(); ++i) {
      auto& s = coopmat_shapes[i];
      os << (i ? "," : "") << s.m << "x" << s.n << "x" << s.k << ":" << s.a_type << s.c_type;
    }
  } else {
    os << "no";
  }
  if (coopmat_khr_listed) os << " khr_coopmat_listed";
  os << " bda=" << yn(bda) << " timestamps=" << yn(timestamps) << " shared=" << max_shared_memory / 1024 << "KiB"
     << " max_binding=" << max_binding_bytes << " max_alloc=" << max_allocation_bytes
     << " unified=" << yn(unified_memory) << " vram=" << device_local_bytes / (1024 * 1024) << "MiB";
  if (!masked.empty()) {
    os << " masked=";
    for (size_t i = 0; i < masked.size(); ++i) os << (i ? "," : "") << masked[i];
  }
  return os.str();
}

uint64_t Device::validation_message_count() { return g_validation_messages.load(); }

bool Device::has_extension(const char* name) const { return contains(extensions_, name); }

std::vector<PhysicalDeviceInfo> Device::enumerate() {
  InstanceHolder ih = make_instance(false);
  std::vector<PhysicalDeviceInfo> out;
  auto masked = disabled_features_from_env();
  auto pds = physical_devices(ih.instance);
  for (uint32_t i = 0; i < pds.size(); ++i) {
    VkPhysicalDeviceProperties props{};
    vkGetPhysicalDeviceProperties(pds[i], &props);
    auto exts = device_extensions(pds[i]);
    int qf = pick_queue_family(pds[i]);
    out.push_back({i, pds[i],
                   build_profile(ih.instance, pds[i], supported_features(pds[i], props.apiVersion, exts), exts,
                                 uint32_t(std::max(qf, 0)), masked)});
  }
  vkDestroyInstance(ih.instance, nullptr);
  return out;
}

std::unique_ptr<Device> Device::create(DeviceOptions options) {
  if (options.selector.empty()) {
    if (const char* s = std::getenv("VKVLM_DEVICE")) options.selector = s;
  }
  options.validation = options.validation || env_flag("VKVLM_VALIDATE");
  auto masked = disabled_features_from_env();

  std::unique_ptr<Device> d(new Device());
  InstanceHolder ih = make_instance(options.validation);
  d->instance_ = ih.instance;
  d->owns_instance_ = true;
  if (options.validation) {
    auto create_messenger = reinterpret_cast<PFN_vkCreateDebugUtilsMessengerEXT>(
        vkGetInstanceProcAddr(d->instance_, "vkCreateDebugUtilsMessengerEXT"));
    VkDebugUtilsMessengerCreateInfoEXT mi{VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT};
    mi.messageSeverity = VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT;
    mi.messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT;
    mi.pfnUserCallback = on_validation_message;
    if (create_messenger) check(create_messenger(d->instance_, &mi, nullptr, &d->messenger_), "vkCreateDebugUtilsMessengerEXT");
  }

  auto pds = physical_devices(d->instance_);
  if (pds.empty()) fail("no Vulkan device found (for the CPU device: apt-get install mesa-vulkan-drivers)");
  std::vector<VkPhysicalDeviceProperties> props(pds.size());
  for (size_t i = 0; i < pds.size(); ++i) vkGetPhysicalDeviceProperties(pds[i], &props[i]);

  int chosen = -1;
  if (!options.selector.empty()) {
    const std::string& sel = options.selector;
    bool numeric = std::all_of(sel.begin(), sel.end(), ::isdigit);
    if (numeric) {
      size_t idx = std::stoul(sel);
      if (idx < pds.size()) chosen = int(idx);
    } else {
      for (size_t i = 0; i < pds.size() && chosen < 0; ++i)
        if (lower(props[i].deviceName).find(lower(sel)) != std::string::npos) chosen = int(i);
    }
    if (chosen < 0) {
      std::ostringstream os;
      os << "VKVLM_DEVICE='" << sel << "' matches no device; devices are:";
      for (size_t i = 0; i < pds.size(); ++i) os << " [" << i << "] " << props[i].deviceName << ";";
      d.reset();
      throw Error(os.str());
    }
  } else {
    for (size_t i = 0; i < pds.size(); ++i) {
      if (pick_queue_family(pds[i]) < 0) continue;
      if (chosen < 0 || type_rank(props[i].deviceType) < type_rank(props[chosen].deviceType)) chosen = int(i);
    }
    if (chosen < 0) fail("no Vulkan device has a compute queue");
  }
  VkPhysicalDevice pd = pds[chosen];
  if (props[chosen].apiVersion < VK_API_VERSION_1_2)
    fail("device '", props[chosen].deviceName, "' supports Vulkan ", VK_API_VERSION_MAJOR(props[chosen].apiVersion),
         ".", VK_API_VERSION_MINOR(props[chosen].apiVersion), "; vkvlm needs Vulkan 1.2");
  int qf = pick_queue_family(pd);
  if (qf < 0) fail("device '", props[chosen].deviceName, "' has no compute queue");

  auto exts = device_extensions(pd);
  FeatureSet sup = supported_features(pd, props[chosen].apiVersion, exts);
  // Masked features are not even enabled, so the validation layer catches a kernel that uses one.
  FeatureSet want = sup;
  if (contains(masked, "fp16")) want.fp16 = false;
  if (contains(masked, "int8")) want.int8 = false;
  if (contains(masked, "16bit_storage")) want.storage16 = false;
  if (contains(masked, "8bit_storage")) want.storage8 = false;
  if (contains(masked, "bda")) want.bda = false;
  if (contains(masked, "coopmat")) want.coopmat_nv = false;
  if (contains(masked, "subgroup")) want.subgroup_size_control = false;

  // Only the features vkvlm uses, and none that is masked, are enabled.
  FeatureChain chain(props[chosen].apiVersion, want.coopmat_nv);
  chain.f11.storageBuffer16BitAccess = want.storage16;
  chain.f12.shaderFloat16 = want.fp16;
  chain.f12.shaderInt8 = want.int8;
  chain.f12.storageBuffer8BitAccess = want.storage8;
  chain.f12.bufferDeviceAddress = want.bda;
  chain.f13.subgroupSizeControl = want.subgroup_size_control;
  chain.f13.computeFullSubgroups = want.subgroup_size_control;
  chain.cm.cooperativeMatrix = want.coopmat_nv;
  std::vector<const char*> enable_exts;
  if (want.coopmat_nv) enable_exts.push_back("VK_NV_cooperative_matrix");
  if (contains(exts, "VK_EXT_memory_budget")) enable_exts.push_back("VK_EXT_memory_budget");

  float priority = 1.0f;
  VkDeviceQueueCreateInfo qi{VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO};
  qi.queueFamilyIndex = uint32_t(qf);
  qi.queueCount = 1;
  qi.pQueuePriorities = &priority;
  VkDeviceCreateInfo di{VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO};
  di.pNext = &chain.f2;
  di.queueCreateInfoCount = 1;
  di.pQueueCreateInfos = &qi;
  di.enabledExtensionCount = uint32_t(enable_exts.size());
  di.ppEnabledExtensionNames = enable_exts.data();
  check(vkCreateDevice(pd, &di, nullptr, &d->device_), "vkCreateDevice");
  d->owns_device_ = true;
  d->physical_ = pd;
  d->queue_family_ = uint32_t(qf);
  vkGetDeviceQueue(d->device_, d->queue_family_, 0, &d->queue_);
  for (auto* e : enable_exts) d->extensions_.emplace_back(e);
  d->profile_ = build_profile(d->instance_, pd, want, exts, d->queue_family_, masked);
  return d;
}

namespace {
// Holds the application's queue lock for a scope (none when it gave none).
struct QueueLock {
  const std::function<void()>& unlock;
  QueueLock(const std::function<void()>& lock, const std::function<void()>& u) : unlock(u) {
    if (lock) lock();
  }
  ~QueueLock() {
    if (unlock) unlock();
  }
};
}  // namespace

VkResult Device::submit(uint32_t count, const VkSubmitInfo* submits, VkFence fence) const {
  const QueueLock lock(lock_queue_, unlock_queue_);
  return vkQueueSubmit(queue_, count, submits, fence);
}

VkResult Device::wait_idle() const {
  const QueueLock lock(lock_queue_, unlock_queue_);
  return vkQueueWaitIdle(queue_);
}

std::unique_ptr<Device> Device::adopt(const AdoptedDevice& a) {
  if (!a.instance || !a.physical_device || !a.device)
    fail("adopting a device needs the application's VkInstance, VkPhysicalDevice and VkDevice (one was null)");
  std::unique_ptr<Device> d(new Device());
  d->instance_ = a.instance;
  d->physical_ = a.physical_device;
  d->device_ = a.device;
  d->queue_family_ = a.queue_family;
  uint32_t nq = 0;
  vkGetPhysicalDeviceQueueFamilyProperties(a.physical_device, &nq, nullptr);
  std::vector<VkQueueFamilyProperties> qf(nq);
  vkGetPhysicalDeviceQueueFamilyProperties(a.physical_device, &nq, qf.data());
  if (a.queue_family >= nq) fail("adopted queue family ", a.queue_family, " does not exist (device has ", nq, ")");
  if (!(qf[a.queue_family].queueFlags & VK_QUEUE_COMPUTE_BIT))
    fail("adopted queue family ", a.queue_family, " cannot run compute work");
  if (a.queue_index >= qf[a.queue_family].queueCount)
    fail("adopted queue index ", a.queue_index, " is out of range for family ", a.queue_family);
  vkGetDeviceQueue(a.device, a.queue_family, a.queue_index, &d->queue_);
  d->extensions_ = a.enabled_extensions;
  if (bool(a.lock_queue) != bool(a.unlock_queue)) fail("adopting a device: give both queue lock functions or neither");
  d->lock_queue_ = a.lock_queue;
  d->unlock_queue_ = a.unlock_queue;
  FeatureSet enabled = features_from_chain(a.enabled_features, a.enabled_extensions);
  d->profile_ = build_profile(a.instance, a.physical_device, enabled, a.enabled_extensions, a.queue_family,
                              disabled_features_from_env());
  return d;
}

Device::~Device() {
  if (owns_device_ && device_) {
    vkDeviceWaitIdle(device_);
    vkDestroyDevice(device_, nullptr);
  }
  if (owns_instance_ && instance_) {
    if (messenger_) {
      auto destroy = reinterpret_cast<PFN_vkDestroyDebugUtilsMessengerEXT>(
          vkGetInstanceProcAddr(instance_, "vkDestroyDebugUtilsMessengerEXT"));
      if (destroy) destroy(instance_, messenger_, nullptr);
    }
    vkDestroyInstance(instance_, nullptr);
  }
}

}  // namespace vkvlm::gpu
