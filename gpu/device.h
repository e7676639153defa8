#pragma once
// The Vulkan device: created by vkvlm or adopted from the application, and the feature profile
// that decides which kernel variants can run on it.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <vulkan/vulkan.h>

namespace vkvlm::gpu {

// One cooperative-matrix shape the driver lists: A is MxK, B is KxN, C/result MxN.
struct CoopMatShape {
  uint32_t m, n, k;
  std::string a_type, b_type, c_type;  // "f16", "f32", "i8", ...
};

struct FeatureProfile {
  std::string device_name;
  std::string driver_name;
  uint32_t vendor_id = 0, device_id = 0;
  VkPhysicalDeviceType device_type = VK_PHYSICAL_DEVICE_TYPE_OTHER;
  VkDriverId driver_id = VkDriverId(0);
  uint32_t api_version = 0;

  bool fp16 = false;            // shaderFloat16: f16 arithmetic in shaders
  bool int8 = false;            // shaderInt8
  bool storage16 = false;       // storageBuffer16BitAccess
  bool storage8 = false;        // storageBuffer8BitAccess
  bool subgroup = false;        // basic + arithmetic + ballot + shuffle in compute shaders
  uint32_t subgroup_size = 1;
  uint32_t min_subgroup_size = 1, max_subgroup_size = 1;
  bool subgroup_size_control = false;
  bool coopmat = false;         // cooperative matrix (VK_NV_cooperative_matrix SPIR-V)
  bool coopmat_khr_listed = false;  // driver exposes VK_KHR_cooperative_matrix
  std::vector<CoopMatShape> coopmat_shapes;
  bool bda = false;             // bufferDeviceAddress
  bool timestamps = false;      // compute-queue timestamps
  double timestamp_period_ns = 1.0;
  uint32_t timestamp_valid_bits = 0;
  uint32_t max_shared_memory = 16384;
  uint64_t max_binding_bytes = 134217728;  // maxStorageBufferRange (possibly lowered)
  uint64_t max_allocation_bytes = 1ull << 30;
  uint64_t min_storage_offset_alignment = 256;
  uint32_t max_workgroup_size = 128;
  uint32_t max_workgroup_count[3] = {65535, 65535, 65535};
  bool unified_memory = false;  // device-local memory is host-visible: map instead of staging
  uint64_t device_local_bytes = 0;

  // What VKVLM_DISABLE masked, for the summary line.
  std::vector<std::string> masked;

  // One line: name, driver, type and every feature, e.g. for `vkvlm devices`.
  std::string summary_line() const;
  std::string type_name() const;
};

// What an application hands over when vkvlm runs on its device. vkvlm creates and destroys
// nothing of these: instance, device and queue stay the application's.
struct AdoptedDevice {
  VkInstance instance = VK_NULL_HANDLE;
  VkPhysicalDevice physical_device = VK_NULL_HANDLE;
  VkDevice device = VK_NULL_HANDLE;
  uint32_t queue_family = 0;
  uint32_t queue_index = 0;
  // The feature chain the application passed to vkCreateDevice (VkPhysicalDeviceFeatures2 with
  // Vulkan11/12/13 feature structs in pNext). Vulkan cannot be asked which features a device
  // was created with, so without it vkvlm uses none of the optional ones.
  const VkPhysicalDeviceFeatures2* enabled_features = nullptr;
  // Device extensions the application enabled (e.g. VK_NV_cooperative_matrix).
  std::vector<std::string> enabled_extensions;
  // The application's lock on the queue (Vulkan requires submits to one queue to be externally
  // synchronized): taken around each of vkvlm's submits and waits on it. Unset: none.
  std::function<void()> lock_queue, unlock_queue;
};

struct DeviceOptions {
  // Index into the list of physical devices, or a substring of the device name; empty picks
  // discrete, then integrated, then virtual, then CPU. Defaults to $VKVLM_DEVICE.
  std::string selector;
  bool validation = false;  // defaults to $VKVLM_VALIDATE=1
};

struct PhysicalDeviceInfo {
  uint32_t index;
  VkPhysicalDevice handle;
  FeatureProfile profile;
};

class Device {
 public:
  // Creates an instance and a device per options (and the VKVLM_* environment variables).
  static std::unique_ptr<Device> create(DeviceOptions options = {});
  // Runs on the application's device; see AdoptedDevice.
  static std::unique_ptr<Device> adopt(const AdoptedDevice& adopted);
  // Every physical device with its profile (creates a temporary instance).
  static std::vector<PhysicalDeviceInfo> enumerate();

  ~Device();
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  VkInstance instance() const { return instance_; }
  VkPhysicalDevice physical_device() const { return physical_; }
  VkDevice device() const { return device_; }
  VkQueue queue() const { return queue_; }
  // vkQueueSubmit and vkQueueWaitIdle on the queue, holding the application's queue lock if it
  // gave one: every use of the queue goes through these.
  VkResult submit(uint32_t count, const VkSubmitInfo* submits, VkFence fence) const;
  VkResult wait_idle() const;
  uint32_t queue_family() const { return queue_family_; }
  const FeatureProfile& profile() const { return profile_; }
  bool owns_device() const { return owns_device_; }
  bool has_extension(const char* name) const;

  // Extension entry points (null when absent).
  PFN_vkGetPhysicalDeviceCooperativeMatrixPropertiesNV get_coopmat_properties_nv = nullptr;

  // Number of validation-layer warnings and errors seen by every Device with validation on.
  static uint64_t validation_message_count();

 private:
  Device() = default;
  void finish_setup();

  VkInstance instance_ = VK_NULL_HANDLE;
  VkDebugUtilsMessengerEXT messenger_ = VK_NULL_HANDLE;
  VkPhysicalDevice physical_ = VK_NULL_HANDLE;
  VkDevice device_ = VK_NULL_HANDLE;
  VkQueue queue_ = VK_NULL_HANDLE;
  uint32_t queue_family_ = 0;
  bool owns_instance_ = false;
  bool owns_device_ = false;
  std::function<void()> lock_queue_, unlock_queue_;
  std::vector<std::string> extensions_;
  FeatureProfile profile_;
};

// Parses VKVLM_DISABLE (comma-separated: fp16,int8,subgroup,coopmat,16bit_storage,8bit_storage,
// bda,timestamps,unified) and throws on an unknown name.
std::vector<std::string> disabled_features_from_env();

}  // namespace vkvlm::gpu
