#pragma once
// Records kernel dispatches into command buffers with the barriers their data hazards need,
// submits them (split into several submissions so no single one trips a GPU watchdog), and can
// replay a recording, as the decode step does.
#include <chrono>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include <vulkan/vulkan.h>

#include "gpu/context.h"

namespace vkvlm::gpu {

// One storage-buffer binding: a byte range of a buffer, and whether the kernel writes it.
struct Binding {
  uint32_t slot = 0;  // binding number in the shader
  VkBuffer buffer = VK_NULL_HANDLE;
  uint64_t offset = 0;
  uint64_t range = 0;
  bool writes = false;
};

class Recorder {
 public:
  explicit Recorder(Context& ctx);
  ~Recorder();
  Recorder(const Recorder&) = delete;
  Recorder& operator=(const Recorder&) = delete;

  Context& context() { return ctx_; }

  void dispatch(const Pipeline& pipeline, const std::vector<Binding>& bindings, const void* push,
                uint32_t push_bytes, uint32_t groups_x, uint32_t groups_y = 1, uint32_t groups_z = 1);
  void copy(const Tensor& src, uint64_t src_offset, const Tensor& dst, uint64_t dst_offset, uint64_t bytes);
  // Writes a timestamp after all work recorded so far; returns its index for elapsed_ns().
  // Without timestamp support it returns -1 and timing falls back to the CPU clock.
  int timestamp();
  // Submits everything recorded and waits for it.
  void submit();
  // Submits the recorded command buffers (again, after submit()), until reset().
  void replay();
  // Forgets the recording (and its scratch tensors); the next dispatch starts a new one.
  void reset();
  // A temporary device tensor that lives as long as this recording.
  Tensor scratch(DType dtype, std::vector<int64_t> shape, const std::string& name);

  // Nanoseconds between two timestamps of the last submission.
  double elapsed_ns(int from, int to) const;
  // Wall-clock nanoseconds of the last submit()/replay(), submission to completion.
  double cpu_ns() const { return cpu_ns_; }
  size_t dispatch_count() const { return dispatches_total_; }

 private:
  void begin_segment();
  void end_segment();
  void barrier();
  // Byte ranges of buffers accessed since the last barrier: whether [offset, offset + bytes) of
  // `buffer` conflicts with them (a write overlapping anything, a read overlapping a write), and
  // noting an access. Ranges, not whole buffers: dispatches on disjoint rows of one scratch
  // buffer (a batch's sequences) need no barrier between them.
  bool conflicts(VkBuffer buffer, uint64_t offset, uint64_t bytes, bool writes) const;
  void touch(VkBuffer buffer, uint64_t offset, uint64_t bytes, bool writes);
  VkDescriptorSet allocate_set(VkDescriptorSetLayout layout);
  void run_segments();

  Context& ctx_;
  VkCommandPool pool_ = VK_NULL_HANDLE;
  std::vector<VkCommandBuffer> segments_;  // recorded command buffers, in order
  std::vector<VkCommandBuffer> spare_;
  VkCommandBuffer current_ = VK_NULL_HANDLE;
  uint32_t dispatches_in_segment_ = 0;
  uint32_t max_dispatches_per_segment_ = 256;
  size_t dispatches_total_ = 0;
  std::vector<VkDescriptorPool> descriptor_pools_;
  size_t descriptor_pool_index_ = 0;
  VkFence fence_ = VK_NULL_HANDLE;
  VkQueryPool query_pool_ = VK_NULL_HANDLE;
  uint32_t query_capacity_ = 0, queries_used_ = 0;
  std::vector<uint64_t> query_results_;
  double cpu_ns_ = 0;
  std::vector<Tensor> scratch_;
  struct Access {
    uint64_t begin, end;
    bool writes;
  };
  std::unordered_map<VkBuffer, std::vector<Access>> touched_;  // since the last barrier
};

}  // namespace vkvlm::gpu
