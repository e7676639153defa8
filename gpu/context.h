#pragma once
// Everything a kernel needs to run: the device, its memory, its pipelines and data transfers.
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "gpu/device.h"
#include "gpu/memory.h"
#include "gpu/pipelines.h"

namespace vkvlm::gpu {

// A barrier that makes every earlier shader or transfer write visible to later shaders,
// transfers and the host.
void record_full_barrier(VkCommandBuffer cb);

class Context {
 public:
  explicit Context(std::unique_ptr<Device> device);
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  Device& device() { return *device_; }
  const FeatureProfile& profile() const { return device_->profile(); }
  Allocator& allocator() { return *allocator_; }
  PipelineRegistry& pipelines() { return *pipelines_; }

  // A device-local tensor (contents undefined).
  Tensor tensor(DType dtype, std::vector<int64_t> shape, const std::string& name);
  // A tensor of raw bytes (for quantized words and other packed data).
  Tensor host_tensor(DType dtype, std::vector<int64_t> shape, const std::string& name, MemoryKind kind);

  // Copies host data into a tensor: by mapping where memory is unified, else through the
  // staging ring. Blocks until the data is on the device.
  void upload(const Tensor& dst, const void* data, uint64_t bytes, uint64_t dst_offset = 0);
  // Copies tensor bytes back to the host; waits for the device.
  void download(const Tensor& src, void* data, uint64_t bytes, uint64_t src_offset = 0);
  template <typename T>
  std::vector<T> read(const Tensor& src) {
    std::vector<T> v(src.bytes() / sizeof(T));
    download(src, v.data(), v.size() * sizeof(T));
    return v;
  }
  // Sets every byte of the tensor's range to `byte` (e.g. 0xFF poisons f32 with NaN).
  void fill_bytes(const Tensor& dst, uint8_t byte);

  // Queue submission is serialized: several threads may share one context.
  std::mutex& queue_mutex() { return queue_mutex_; }
  VkCommandPool transfer_pool() const { return transfer_pool_; }
  // Submits one command buffer and waits for it.
  void submit_and_wait(VkCommandBuffer cb);

  // A once-per-context verdict (e.g. a kernel's self-check), computed on first use.
  bool once(const std::string& key, const std::function<bool()>& compute);

 private:
  struct StagingSlot {
    std::shared_ptr<Buffer> buffer;
    VkCommandBuffer cb = VK_NULL_HANDLE;
    VkFence fence = VK_NULL_HANDLE;
    bool pending = false;
  };
  void wait_slot(StagingSlot& s);
  // A one-time command buffer from the transfer pool, begun; end_and_run submits, waits and frees it.
  VkCommandBuffer begin_one_shot();
  void end_and_run(VkCommandBuffer cb);

  std::unique_ptr<Device> device_;
  std::unique_ptr<Allocator> allocator_;
  std::unique_ptr<PipelineRegistry> pipelines_;
  std::mutex queue_mutex_;
  std::mutex transfer_mutex_;
  VkCommandPool transfer_pool_ = VK_NULL_HANDLE;
  VkFence transfer_fence_ = VK_NULL_HANDLE;
  std::vector<StagingSlot> staging_;
  size_t next_slot_ = 0;
  std::shared_ptr<Buffer> readback_;
  std::mutex once_mutex_;
  std::map<std::string, bool> once_;
};

}  // namespace vkvlm::gpu
