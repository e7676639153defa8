// vkvlm running on a device the application created: it must use the application's instance,
// device and queue, and create or destroy none of them. The calls are counted by interposing
// the Vulkan entry points (this executable's definitions win over the loader's).
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>

#include "gpu/device.h"
#include "gpu/error.h"
#include "tests/kernel_harness.h"

namespace {
std::atomic<int> g_instances_created{0}, g_instances_destroyed{0}, g_devices_created{0}, g_devices_destroyed{0};

template <typename F>
F real(const char* name) {
  return reinterpret_cast<F>(dlsym(RTLD_NEXT, name));
}
}  // namespace

extern "C" {
VkResult vkCreateInstance(const VkInstanceCreateInfo* ci, const VkAllocationCallbacks* a, VkInstance* out) {
  ++g_instances_created;
  static auto fn = real<PFN_vkCreateInstance>("vkCreateInstance");
  return fn(ci, a, out);
}
void vkDestroyInstance(VkInstance i, const VkAllocationCallbacks* a) {
  ++g_instances_destroyed;
  static auto fn = real<PFN_vkDestroyInstance>("vkDestroyInstance");
  fn(i, a);
}
VkResult vkCreateDevice(VkPhysicalDevice pd, const VkDeviceCreateInfo* ci, const VkAllocationCallbacks* a, VkDevice* out) {
  ++g_devices_created;
  static auto fn = real<PFN_vkCreateDevice>("vkCreateDevice");
  return fn(pd, ci, a, out);
}
void vkDestroyDevice(VkDevice d, const VkAllocationCallbacks* a) {
  ++g_devices_destroyed;
  static auto fn = real<PFN_vkDestroyDevice>("vkDestroyDevice");
  fn(d, a);
}
}

namespace vkvlm::test {
namespace {

// The application's side: a plain instance, the first device and its first compute queue.
struct AppDevice {
  VkInstance instance = VK_NULL_HANDLE;
  VkPhysicalDevice physical = VK_NULL_HANDLE;
  VkDevice device = VK_NULL_HANDLE;
  uint32_t family = 0;
  VkPhysicalDeviceVulkan12Features f12{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES};
  VkPhysicalDeviceVulkan11Features f11{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES};
  VkPhysicalDeviceFeatures2 features{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2};

  explicit AppDevice(bool enable_fp16) {
    VkApplicationInfo app{VK_STRUCTURE_TYPE_APPLICATION_INFO};
    app.apiVersion = VK_API_VERSION_1_2;
    VkInstanceCreateInfo ci{VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO};
    ci.pApplicationInfo = &app;
    EXPECT_EQ(vkCreateInstance(&ci, nullptr, &instance), VK_SUCCESS);
    uint32_t n = 1;
    vkEnumeratePhysicalDevices(instance, &n, &physical);
    uint32_t nq = 0;
    vkGetPhysicalDeviceQueueFamilyProperties(physical, &nq, nullptr);
    std::vector<VkQueueFamilyProperties> qf(nq);
    vkGetPhysicalDeviceQueueFamilyProperties(physical, &nq, qf.data());
    for (uint32_t i = 0; i < nq; ++i)
      if (qf[i].queueFlags & VK_QUEUE_COMPUTE_BIT) {
        family = i;
        break;
      }
    float prio = 1.0f;
    VkDeviceQueueCreateInfo qi{VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO};
    qi.queueFamilyIndex = family;
    qi.queueCount = 1;
    qi.pQueuePriorities = &prio;
    features.pNext = &f11;
    f11.pNext = &f12;
    f12.shaderFloat16 = enable_fp16;
    VkDeviceCreateInfo di{VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO};
    di.pNext = &features;
    di.queueCreateInfoCount = 1;
    di.pQueueCreateInfos = &qi;
    EXPECT_EQ(vkCreateDevice(physical, &di, nullptr, &device), VK_SUCCESS);
  }
  ~AppDevice() {
    vkDestroyDevice(device, nullptr);
    vkDestroyInstance(instance, nullptr);
  }
};

TEST(Adopt, RunsKernelsOnTheApplicationsDeviceAndLeavesItAlone) {
  for (bool pass_features : {false, true}) {
    const int before = g_devices_created;
    AppDevice app(true);
    ASSERT_EQ(g_devices_created - before, 1) << "the interposed entry points must see the application's own calls";
    const int ic = g_instances_created, id = g_instances_destroyed, dc = g_devices_created, dd = g_devices_destroyed;
    {
      gpu::AdoptedDevice a;
      a.instance = app.instance;
      a.physical_device = app.physical;
      a.device = app.device;
      a.queue_family = app.family;
      a.enabled_features = pass_features ? &app.features : nullptr;
      auto dev = gpu::Device::adopt(a);
      EXPECT_FALSE(dev->owns_device());
      // Features follow what the application enabled: only fp16 here, nothing without the chain.
      EXPECT_EQ(dev->profile().fp16, pass_features);
      EXPECT_FALSE(dev->profile().storage16);
      gpu::Context c(std::move(dev));
      auto w = random_floats(40 * 33, 1);
      auto xv = random_floats(3 * 33, 2);
      gpu::Weight weight;
      weight.n = 40;
      weight.k = 33;
      weight.name = "w";
      weight.data = c.tensor(gpu::DType::F32, {40, 33}, "w");
      c.upload(weight.data, w.data(), w.size() * 4);
      auto x = c.tensor(gpu::DType::F32, {3, 33}, "x");
      c.upload(x, xv.data(), xv.size() * 4);
      auto y = c.tensor(gpu::DType::F32, {3, 40}, "y");
      gpu::Recorder rec(c);
      gpu::matmul(rec, gpu::Mat::of(x), weight, nullptr, gpu::Mat::of(y));
      rec.submit();
      auto got = c.read<float>(y);
      std::vector<double> want;
      for (int m = 0; m < 3; ++m)
        for (int n = 0; n < 40; ++n) {
          double s = 0;
          for (int k = 0; k < 33; ++k) s += double(xv[size_t(m * 33 + k)]) * w[size_t(n * 33 + k)];
          want.push_back(s);
        }
      EXPECT_LE(nmse(got, want), 1e-7);
    }
    EXPECT_EQ(g_instances_created - ic, 0);
    EXPECT_EQ(g_instances_destroyed - id, 0);
    EXPECT_EQ(g_devices_created - dc, 0);
    EXPECT_EQ(g_devices_destroyed - dd, 0);
    // The application's device and queue still work after vkvlm is gone.
    VkQueue q;
    vkGetDeviceQueue(app.device, app.family, 0, &q);
    EXPECT_EQ(vkQueueWaitIdle(q), VK_SUCCESS);
    VkBufferCreateInfo bi{VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO};
    bi.size = 256;
    bi.usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT;
    VkBuffer b;
    EXPECT_EQ(vkCreateBuffer(app.device, &bi, nullptr, &b), VK_SUCCESS);
    vkDestroyBuffer(app.device, b, nullptr);
  }
}

TEST(Adopt, RejectsABadQueueFamily) {
  AppDevice app(false);
  gpu::AdoptedDevice a;
  a.instance = app.instance;
  a.physical_device = app.physical;
  a.device = app.device;
  a.queue_family = 99;
  try {
    gpu::Device::adopt(a);
    FAIL() << "adopting queue family 99 should fail";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("queue family 99"), std::string::npos) << e.what();
  }
}

TEST(Memory, OutOfDeviceMemoryIsAClearError) {
  // Larger than any single allocation the device allows.
  try {
    ctx().tensor(gpu::DType::F32, {int64_t(1) << 40}, "huge");
    FAIL() << "a 4 TiB tensor should not allocate";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("huge"), std::string::npos) << m;
    EXPECT_NE(m.find("largest allocation"), std::string::npos) << m;
  }
  // More than the heap holds, in allocations that each fit.
  const uint64_t heap = ctx().profile().device_local_bytes;
  const int64_t piece = int64_t(std::min<uint64_t>(ctx().profile().max_allocation_bytes, heap / 2 + 4096) / 4);
  std::vector<gpu::Tensor> held;
  try {
    for (int i = 0; i < 64; ++i) held.push_back(ctx().tensor(gpu::DType::F32, {piece}, "piece " + std::to_string(i)));
    FAIL() << "allocating past the heap size should fail";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("out of device memory"), std::string::npos) << m;
    EXPECT_NE(m.find("piece"), std::string::npos) << m;
    EXPECT_NE(m.find("MiB"), std::string::npos) << m;
  }
  held.clear();
  // Freed memory is reusable.
  auto t = ctx().tensor(gpu::DType::F32, {piece}, "after");
  EXPECT_TRUE(t.valid());
}

}  // namespace
}  // namespace vkvlm::test
