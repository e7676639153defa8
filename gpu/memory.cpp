#include "gpu/memory.h"

#include <algorithm>
#include <sstream>

#include "gpu/device.h"
#include "gpu/error.h"

namespace vkvlm::gpu {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::I32: return 4;
    case DType::U32: return 4;
    case DType::U8: return 1;
  }
  return 1;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
    case DType::I32: return "i32";
    case DType::U32: return "u32";
    case DType::U8: return "u8";
  }
  return "?";
}

namespace {
std::string mib(uint64_t bytes) {
  std::ostringstream os;
  os.precision(1);
  os << std::fixed << double(bytes) / (1024.0 * 1024.0) << " MiB";
  return os.str();
}
}  // namespace

Buffer::~Buffer() {
  if (owner_) owner_->release(*this);
}

Allocator::Allocator(Device& device) : device_(device) {
  vkGetPhysicalDeviceMemoryProperties(device.physical_device(), &mem_props_);
  block_bytes_ = std::min<uint64_t>(1ull << 30, device.profile().max_allocation_bytes);
  heap_used_.assign(mem_props_.memoryHeapCount, 0);
  has_budget_ = device.has_extension("VK_EXT_memory_budget");
}

Allocator::~Allocator() {
  for (auto& b : blocks_) {
    if (!b) continue;
    if (b->mapped) vkUnmapMemory(device_.device(), b->memory);
    vkFreeMemory(device_.device(), b->memory, nullptr);
  }
}

uint64_t Allocator::bytes_in_use() const {
  std::lock_guard<std::mutex> lock(mutex_);
  uint64_t n = 0;
  for (auto& b : blocks_)
    if (b) n += b->used;
  return n;
}

uint32_t Allocator::pick_memory_type(uint32_t type_bits, MemoryKind kind) const {
  const bool unified = device_.profile().unified_memory;
  using F = VkMemoryPropertyFlags;
  std::vector<std::pair<F, F>> prefs;  // (required, avoided)
  const F local = VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT;
  const F host = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
  const F cached = VK_MEMORY_PROPERTY_HOST_CACHED_BIT;
  switch (kind) {
    case MemoryKind::Device:
      if (unified) prefs.push_back({local | host, 0});
      prefs.push_back({local, 0});
      prefs.push_back({0, 0});
      break;
    case MemoryKind::Upload:
      prefs.push_back({host, local});
      prefs.push_back({host, 0});
      break;
    case MemoryKind::Readback:
      prefs.push_back({host | cached, 0});
      prefs.push_back({host, 0});
      break;
  }
  for (auto [req, avoid] : prefs) {
    // Of the fitting types, take the one on the largest heap.
    int best = -1;
    for (uint32_t t = 0; t < mem_props_.memoryTypeCount; ++t) {
      if (!(type_bits & (1u << t))) continue;
      F f = mem_props_.memoryTypes[t].propertyFlags;
      if ((f & req) != req || (f & avoid)) continue;
      if (best < 0 || mem_props_.memoryHeaps[mem_props_.memoryTypes[t].heapIndex].size >
                          mem_props_.memoryHeaps[mem_props_.memoryTypes[best].heapIndex].size)
        best = int(t);
    }
    if (best >= 0) return uint32_t(best);
  }
  fail("no Vulkan memory type fits a ", kind == MemoryKind::Device ? "device" : "host-visible", " buffer");
}

bool Allocator::try_place(Block& blk, uint64_t size, uint64_t align, uint64_t& offset) {
  for (auto it = blk.free_ranges.begin(); it != blk.free_ranges.end(); ++it) {
    uint64_t start = (it->first + align - 1) / align * align;
    uint64_t end = it->first + it->second;
    if (start + size > end) continue;
    uint64_t range_start = it->first;
    blk.free_ranges.erase(it);
    if (start > range_start) blk.free_ranges[range_start] = start - range_start;
    if (start + size < end) blk.free_ranges[start + size] = end - (start + size);
    offset = start;
    return true;
  }
  return false;
}

std::shared_ptr<Buffer> Allocator::allocate(uint64_t bytes, MemoryKind kind, const std::string& what) {
  VkDevice dev = device_.device();
  uint64_t size = std::max<uint64_t>((bytes + 3) / 4 * 4, 16);
  if (size > device_.profile().max_allocation_bytes)
    fail("cannot allocate ", what, ": it needs ", size, " bytes (", mib(size),
         "), more than the device's largest allocation of ", device_.profile().max_allocation_bytes, " bytes");
  VkBufferCreateInfo bi{VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO};
  bi.size = size;
  bi.usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT;
  bi.sharingMode = VK_SHARING_MODE_EXCLUSIVE;
  std::shared_ptr<Buffer> buf(new Buffer());
  buf->name_ = what;
  buf->size_ = size;
  check(vkCreateBuffer(dev, &bi, nullptr, &buf->handle_), "vkCreateBuffer");
  VkMemoryRequirements req{};
  vkGetBufferMemoryRequirements(dev, buf->handle_, &req);
  uint32_t type = 0;
  try {
    type = pick_memory_type(req.memoryTypeBits, kind);
  } catch (...) {
    vkDestroyBuffer(dev, buf->handle_, nullptr);
    buf->handle_ = VK_NULL_HANDLE;
    throw;
  }
  const uint64_t align = std::max<uint64_t>(req.alignment, 256);
  const bool host_access = kind != MemoryKind::Device || device_.profile().unified_memory;

  std::unique_lock<std::mutex> lock(mutex_);
  int block_index = -1;
  uint64_t offset = 0;
  if (req.size <= block_bytes_) {
    for (size_t i = 0; i < blocks_.size(); ++i) {
      auto& b = blocks_[i];
      if (!b || b->dedicated || b->memory_type != type || b->host_access != host_access) continue;
      if (try_place(*b, req.size, align, offset)) {
        block_index = int(i);
        break;
      }
    }
  }
  if (block_index < 0) {
    auto blk = std::make_unique<Block>();
    blk->memory_type = type;
    blk->dedicated = req.size > block_bytes_;
    blk->host_access = host_access;
    // Small host-visible blocks: staging and readback buffers are few and small.
    uint64_t want = blk->dedicated ? req.size
                                   : (kind == MemoryKind::Device ? block_bytes_ : std::min<uint64_t>(block_bytes_, 64ull << 20));
    want = std::max<uint64_t>(want, req.size);
    uint32_t heap = mem_props_.memoryTypes[type].heapIndex;
    uint64_t heap_size = mem_props_.memoryHeaps[heap].size;
    // A whole block might not fit where the request itself would: shrink the block first.
    if (!blk->dedicated && heap_used_[heap] + want > heap_size && heap_used_[heap] + req.size <= heap_size)
      want = std::max<uint64_t>(req.size, heap_size - heap_used_[heap]);
    auto oom = [&](const char* why) {
      vkDestroyBuffer(dev, buf->handle_, nullptr);
      buf->handle_ = VK_NULL_HANDLE;
      std::ostringstream os;
      os << "out of " << (kind == MemoryKind::Device ? "device" : "host-visible") << " memory: " << what
         << " needs " << mib(req.size) << " (" << req.size << " bytes); memory heap " << heap << " holds "
         << mib(heap_size) << " of which vkvlm already uses " << mib(heap_used_[heap]);
      if (has_budget_) {
        VkPhysicalDeviceMemoryBudgetPropertiesEXT budget{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MEMORY_BUDGET_PROPERTIES_EXT};
        VkPhysicalDeviceMemoryProperties2 mp2{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MEMORY_PROPERTIES_2};
        mp2.pNext = &budget;
        vkGetPhysicalDeviceMemoryProperties2(device_.physical_device(), &mp2);
        os << "; the driver reports " << mib(budget.heapBudget[heap] - std::min(budget.heapBudget[heap], budget.heapUsage[heap]))
           << " still available";
      }
      os << " (" << why << ")";
      throw Error(os.str());
    };
    if (heap_used_[heap] + req.size > heap_size) oom("the heap is full");
    VkMemoryAllocateInfo ai{VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO};
    ai.allocationSize = want;
    ai.memoryTypeIndex = type;
    VkResult r = vkAllocateMemory(dev, &ai, nullptr, &blk->memory);
    if (r == VK_ERROR_OUT_OF_DEVICE_MEMORY || r == VK_ERROR_OUT_OF_HOST_MEMORY) {
      if (!blk->dedicated && want > req.size) {
        ai.allocationSize = want = req.size;
        r = vkAllocateMemory(dev, &ai, nullptr, &blk->memory);
      }
      if (r != VK_SUCCESS) oom("the driver refused the allocation");
    }
    check(r, "vkAllocateMemory");
    blk->size = want;
    heap_used_[heap] += want;
    if (host_access && (mem_props_.memoryTypes[type].propertyFlags & VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT)) {
      void* p = nullptr;
      check(vkMapMemory(dev, blk->memory, 0, VK_WHOLE_SIZE, 0, &p), "vkMapMemory");
      blk->mapped = static_cast<char*>(p);
    }
    blk->free_ranges[0] = want;
    if (!try_place(*blk, req.size, align, offset)) fail("internal: fresh memory block cannot hold its buffer");
    // Reuse a freed slot so indices of live blocks stay stable.
    auto slot = std::find(blocks_.begin(), blocks_.end(), nullptr);
    if (slot != blocks_.end()) {
      *slot = std::move(blk);
      block_index = int(slot - blocks_.begin());
    } else {
      blocks_.push_back(std::move(blk));
      block_index = int(blocks_.size() - 1);
    }
  }
  Block& blk = *blocks_[block_index];
  blk.used += req.size;
  lock.unlock();
  check(vkBindBufferMemory(dev, buf->handle_, blk.memory, offset), "vkBindBufferMemory");
  buf->owner_ = this;
  buf->block_ = uint32_t(block_index);
  buf->memory_type_ = type;
  buf->offset_ = offset;
  buf->reserved_ = req.size;
  buf->mapped_ = blk.mapped ? blk.mapped + offset : nullptr;
  return buf;
}

void Allocator::release(Buffer& b) {
  VkDevice dev = device_.device();
  if (b.handle_) vkDestroyBuffer(dev, b.handle_, nullptr);
  std::lock_guard<std::mutex> lock(mutex_);
  auto& blk = blocks_[b.block_];
  if (!blk) return;
  blk->used -= b.reserved_;
  if (blk->dedicated) {
    uint32_t heap = mem_props_.memoryTypes[blk->memory_type].heapIndex;
    heap_used_[heap] -= blk->size;
    if (blk->mapped) vkUnmapMemory(dev, blk->memory);
    vkFreeMemory(dev, blk->memory, nullptr);
    blk.reset();
    return;
  }
  // Return the range and merge it with its free neighbours.
  uint64_t start = b.offset_, size = b.reserved_;
  auto next = blk->free_ranges.lower_bound(start);
  if (next != blk->free_ranges.end() && next->first == start + size) {
    size += next->second;
    next = blk->free_ranges.erase(next);
  }
  if (next != blk->free_ranges.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == start) {
      start = prev->first;
      size += prev->second;
      blk->free_ranges.erase(prev);
    }
  }
  blk->free_ranges[start] = size;
}

Tensor::Tensor(std::shared_ptr<Buffer> buffer, DType dtype, std::vector<int64_t> shape)
    : buf_(std::move(buffer)), dtype_(dtype), shape_(std::move(shape)) {
  if (bytes() > buf_->size())
    fail("internal: tensor ", buf_->name(), " of shape ", shape_string(), " does not fit its buffer");
}

int64_t Tensor::dim(int i) const {
  int n = int(shape_.size());
  int j = i < 0 ? n + i : i;
  if (j < 0 || j >= n) fail("tensor ", name(), " of shape ", shape_string(), " has no dimension ", i);
  return shape_[size_t(j)];
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (auto d : shape_) n *= d;
  return n;
}

std::string Tensor::shape_string() const {
  std::string s = "[";
  for (size_t i = 0; i < shape_.size(); ++i) s += (i ? ", " : "") + std::to_string(shape_[i]);
  return s + "]";
}

Tensor Tensor::view(std::vector<int64_t> shape) const {
  Tensor t(buf_, dtype_, std::move(shape));
  return t;
}

}  // namespace vkvlm::gpu
