#include "gpu/context.h"

#include <algorithm>
#include <cstring>

#include "gpu/error.h"

namespace vkvlm::gpu {
namespace {
constexpr uint64_t k_staging_slot_bytes = 16ull << 20;
constexpr size_t k_staging_slots = 4;

}  // namespace

void record_full_barrier(VkCommandBuffer cb) {
  VkMemoryBarrier mb{VK_STRUCTURE_TYPE_MEMORY_BARRIER};
  mb.srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT;
  mb.dstAccessMask = VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_READ_BIT |
                     VK_ACCESS_TRANSFER_WRITE_BIT | VK_ACCESS_HOST_READ_BIT;
  vkCmdPipelineBarrier(cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT,
                       VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT | VK_PIPELINE_STAGE_HOST_BIT,
                       0, 1, &mb, 0, nullptr, 0, nullptr);
}

Context::Context(std::unique_ptr<Device> device) : device_(std::move(device)) {
  allocator_ = std::make_unique<Allocator>(*device_);
  pipelines_ = std::make_unique<PipelineRegistry>(*device_);
  VkCommandPoolCreateInfo pi{VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO};
  pi.flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT;
  pi.queueFamilyIndex = device_->queue_family();
  check(vkCreateCommandPool(device_->device(), &pi, nullptr, &transfer_pool_), "vkCreateCommandPool");
  VkFenceCreateInfo fi{VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
  check(vkCreateFence(device_->device(), &fi, nullptr, &transfer_fence_), "vkCreateFence");
}

Context::~Context() {
  VkDevice dev = device_->device();
  device_->wait_idle();
  for (auto& s : staging_) {
    if (s.fence) vkDestroyFence(dev, s.fence, nullptr);
    if (s.cb) vkFreeCommandBuffers(dev, transfer_pool_, 1, &s.cb);
  }
  staging_.clear();
  readback_.reset();
  vkDestroyFence(dev, transfer_fence_, nullptr);
  vkDestroyCommandPool(dev, transfer_pool_, nullptr);
  pipelines_.reset();
  allocator_.reset();
}

Tensor Context::tensor(DType dtype, std::vector<int64_t> shape, const std::string& name) {
  uint64_t n = dtype_size(dtype);
  for (auto d : shape) {
    if (d < 0) fail("internal: negative dimension in tensor ", name);
    n *= uint64_t(d);
  }
  return Tensor(allocator_->allocate(n, MemoryKind::Device, "tensor " + name), dtype, std::move(shape));
}

Tensor Context::host_tensor(DType dtype, std::vector<int64_t> shape, const std::string& name, MemoryKind kind) {
  uint64_t n = dtype_size(dtype);
  for (auto d : shape) n *= uint64_t(d);
  return Tensor(allocator_->allocate(n, kind, "buffer " + name), dtype, std::move(shape));
}

void Context::submit_and_wait(VkCommandBuffer cb) {
  VkSubmitInfo si{VK_STRUCTURE_TYPE_SUBMIT_INFO};
  si.commandBufferCount = 1;
  si.pCommandBuffers = &cb;
  std::lock_guard<std::mutex> lock(queue_mutex_);
  check(vkResetFences(device_->device(), 1, &transfer_fence_), "vkResetFences");
  check(device_->submit(1, &si, transfer_fence_), "vkQueueSubmit");
  check(vkWaitForFences(device_->device(), 1, &transfer_fence_, VK_TRUE, UINT64_MAX), "vkWaitForFences");
}

bool Context::once(const std::string& key, const std::function<bool()>& compute) {
  {
    std::lock_guard<std::mutex> lock(once_mutex_);
    auto it = once_.find(key);
    if (it != once_.end()) return it->second;
  }
  const bool v = compute();
  std::lock_guard<std::mutex> lock(once_mutex_);
  return once_.emplace(key, v).first->second;
}

void Context::wait_slot(StagingSlot& s) {
  if (!s.pending) return;
  check(vkWaitForFences(device_->device(), 1, &s.fence, VK_TRUE, UINT64_MAX), "vkWaitForFences");
  s.pending = false;
}

void Context::upload(const Tensor& dst, const void* data, uint64_t bytes, uint64_t dst_offset) {
  if (dst_offset + bytes > dst.capacity())
    fail("internal: upload of ", bytes, " bytes at offset ", dst_offset, " overflows ", dst.name());
  if (bytes == 0) return;
  if (void* m = dst.mapped()) {
    std::memcpy(static_cast<char*>(m) + dst_offset, data, bytes);
    return;
  }
  std::lock_guard<std::mutex> lock(transfer_mutex_);
  VkDevice dev = device_->device();
  if (staging_.empty()) {
    staging_.resize(k_staging_slots);
    for (auto& s : staging_) {
      s.buffer = allocator_->allocate(k_staging_slot_bytes, MemoryKind::Upload, "staging buffer");
      VkCommandBufferAllocateInfo ai{VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO};
      ai.commandPool = transfer_pool_;
      ai.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY;
      ai.commandBufferCount = 1;
      check(vkAllocateCommandBuffers(dev, &ai, &s.cb), "vkAllocateCommandBuffers");
      VkFenceCreateInfo fi{VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
      check(vkCreateFence(dev, &fi, nullptr, &s.fence), "vkCreateFence");
    }
  }
  const char* src = static_cast<const char*>(data);
  uint64_t done = 0;
  while (done < bytes) {
    StagingSlot& s = staging_[next_slot_];
    next_slot_ = (next_slot_ + 1) % staging_.size();
    wait_slot(s);
    uint64_t n = std::min<uint64_t>(k_staging_slot_bytes, bytes - done);
    std::memcpy(s.buffer->mapped(), src + done, n);
    check(vkResetCommandBuffer(s.cb, 0), "vkResetCommandBuffer");
    VkCommandBufferBeginInfo bi{VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO};
    bi.flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT;
    check(vkBeginCommandBuffer(s.cb, &bi), "vkBeginCommandBuffer");
    VkBufferCopy region{0, dst_offset + done, n};
    vkCmdCopyBuffer(s.cb, s.buffer->handle(), dst.buffer(), 1, &region);
    record_full_barrier(s.cb);
    check(vkEndCommandBuffer(s.cb), "vkEndCommandBuffer");
    VkSubmitInfo si{VK_STRUCTURE_TYPE_SUBMIT_INFO};
    si.commandBufferCount = 1;
    si.pCommandBuffers = &s.cb;
    check(vkResetFences(dev, 1, &s.fence), "vkResetFences");
    {
      std::lock_guard<std::mutex> q(queue_mutex_);
      check(device_->submit(1, &si, s.fence), "vkQueueSubmit");
    }
    s.pending = true;
    done += n;
  }
  for (auto& s : staging_) wait_slot(s);
}

void Context::download(const Tensor& src, void* data, uint64_t bytes, uint64_t src_offset) {
  if (src_offset + bytes > src.capacity())
    fail("internal: download of ", bytes, " bytes at offset ", src_offset, " overflows ", src.name());
  if (bytes == 0) return;
  if (const void* m = src.mapped()) {
    std::memcpy(data, static_cast<const char*>(m) + src_offset, bytes);
    return;
  }
  std::lock_guard<std::mutex> lock(transfer_mutex_);
  const uint64_t chunk = k_staging_slot_bytes;
  if (!readback_) readback_ = allocator_->allocate(chunk, MemoryKind::Readback, "readback buffer");
  char* out = static_cast<char*>(data);
  for (uint64_t done = 0; done < bytes;) {
    const uint64_t n = std::min(chunk, bytes - done);
    VkCommandBuffer cb = begin_one_shot();
    VkBufferCopy region{src_offset + done, 0, n};
    vkCmdCopyBuffer(cb, src.buffer(), readback_->handle(), 1, &region);
    end_and_run(cb);
    std::memcpy(out + done, readback_->mapped(), n);
    done += n;
  }
}

VkCommandBuffer Context::begin_one_shot() {
  VkCommandBuffer cb;
  VkCommandBufferAllocateInfo ai{VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO};
  ai.commandPool = transfer_pool_;
  ai.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY;
  ai.commandBufferCount = 1;
  check(vkAllocateCommandBuffers(device_->device(), &ai, &cb), "vkAllocateCommandBuffers");
  VkCommandBufferBeginInfo bi{VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO};
  bi.flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT;
  check(vkBeginCommandBuffer(cb, &bi), "vkBeginCommandBuffer");
  return cb;
}

void Context::end_and_run(VkCommandBuffer cb) {
  record_full_barrier(cb);
  check(vkEndCommandBuffer(cb), "vkEndCommandBuffer");
  submit_and_wait(cb);
  vkFreeCommandBuffers(device_->device(), transfer_pool_, 1, &cb);
}

void Context::fill_bytes(const Tensor& dst, uint8_t byte) {
  if (void* m = dst.mapped()) {
    std::memset(m, byte, dst.capacity());
    return;
  }
  std::lock_guard<std::mutex> lock(transfer_mutex_);
  VkCommandBuffer cb = begin_one_shot();
  const uint32_t word = 0x01010101u * byte;
  vkCmdFillBuffer(cb, dst.buffer(), 0, dst.capacity() / 4 * 4, word);
  end_and_run(cb);
}

}  // namespace vkvlm::gpu
