#pragma once
// Device memory: blocks of at most min(1 GiB, maxMemoryAllocationSize) carved into buffers,
// and tensors (a buffer with a dtype and a shape).
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <vulkan/vulkan.h>

namespace vkvlm::gpu {

class Device;

// Storage types of GPU tensors. f16 and bf16 are stored as 16-bit halves (kernels read them
// from 32-bit words, so no 16-bit storage feature is needed); quantized weights are U32 words.
enum class DType : uint8_t { F32, F16, BF16, I32, U32, U8 };
size_t dtype_size(DType t);
const char* dtype_name(DType t);

enum class MemoryKind {
  Device,    // device-local; host-mapped where memory is unified
  Upload,    // host-visible, written by the CPU, read by transfers
  Readback,  // host-visible and cached, written by transfers or kernels, read by the CPU
};

class Allocator;

// One VkBuffer bound to a range of a memory block. Freed back to its block on destruction.
class Buffer {
 public:
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  VkBuffer handle() const { return handle_; }
  uint64_t size() const { return size_; }
  void* mapped() const { return mapped_; }  // null unless host-visible
  const std::string& name() const { return name_; }

 private:
  friend class Allocator;
  Buffer() = default;
  Allocator* owner_ = nullptr;
  VkBuffer handle_ = VK_NULL_HANDLE;
  uint64_t size_ = 0;
  void* mapped_ = nullptr;
  uint32_t block_ = 0;
  uint32_t memory_type_ = 0;
  uint64_t offset_ = 0, reserved_ = 0;
  std::string name_;
};

class Allocator {
 public:
  explicit Allocator(Device& device);
  ~Allocator();

  // A buffer of at least `bytes` bytes; `what` names it in errors ("tensor model.embed_tokens").
  std::shared_ptr<Buffer> allocate(uint64_t bytes, MemoryKind kind, const std::string& what);

  uint64_t bytes_in_use() const;
  uint64_t block_bytes() const { return block_bytes_; }

 private:
  friend class Buffer;
  struct Block {
    VkDeviceMemory memory = VK_NULL_HANDLE;
    uint64_t size = 0;
    uint32_t memory_type = 0;
    char* mapped = nullptr;
    std::map<uint64_t, uint64_t> free_ranges;  // offset -> size
    uint64_t used = 0;
    bool dedicated = false;
    bool host_access = false;  // mapped; device-local blocks are mapped only where memory is unified
  };
  uint32_t pick_memory_type(uint32_t type_bits, MemoryKind kind) const;
  void release(Buffer& b);
  bool try_place(Block& blk, uint64_t size, uint64_t align, uint64_t& offset);

  Device& device_;
  VkPhysicalDeviceMemoryProperties mem_props_{};
  uint64_t block_bytes_ = 0;
  mutable std::mutex mutex_;
  std::vector<std::unique_ptr<Block>> blocks_;  // null entries are freed dedicated blocks
  std::vector<uint64_t> heap_used_;
  bool has_budget_ = false;
};

// A GPU tensor: a shared buffer plus element type and shape. Cheap to copy.
class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<Buffer> buffer, DType dtype, std::vector<int64_t> shape);

  bool valid() const { return buf_ != nullptr; }
  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t dim(int i) const;  // negative counts from the end
  int64_t numel() const;
  uint64_t bytes() const { return uint64_t(numel()) * dtype_size(dtype_); }
  VkBuffer buffer() const { return buf_->handle(); }
  uint64_t capacity() const { return buf_->size(); }
  void* mapped() const { return buf_->mapped(); }
  const std::string& name() const { return buf_->name(); }
  std::string shape_string() const;
  // Same storage, another shape of no more elements (e.g. [T, H*D] as [T, H, D]).
  Tensor view(std::vector<int64_t> shape) const;

 private:
  std::shared_ptr<Buffer> buf_;
  DType dtype_ = DType::F32;
  std::vector<int64_t> shape_;
};

}  // namespace vkvlm::gpu
