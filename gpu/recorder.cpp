#include "gpu/recorder.h"

#include <cstdlib>
#include <cstring>

#include "gpu/error.h"

namespace vkvlm::gpu {
namespace {
constexpr uint32_t k_sets_per_pool = 512;
constexpr uint32_t k_query_capacity = 4096;
}  // namespace

Recorder::Recorder(Context& ctx) : ctx_(ctx) {
  VkDevice dev = ctx.device().device();
  VkCommandPoolCreateInfo pi{VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO};
  pi.flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT;
  pi.queueFamilyIndex = ctx.device().queue_family();
  check(vkCreateCommandPool(dev, &pi, nullptr, &pool_), "vkCreateCommandPool");
  VkFenceCreateInfo fi{VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
  check(vkCreateFence(dev, &fi, nullptr, &fence_), "vkCreateFence");
  if (const char* v = std::getenv("VKVLM_MAX_DISPATCHES_PER_SUBMIT")) {
    int n = std::atoi(v);
    if (n <= 0) fail("VKVLM_MAX_DISPATCHES_PER_SUBMIT='", v, "' is not a positive number");
    max_dispatches_per_segment_ = uint32_t(n);
  }
  if (ctx.profile().timestamps) {
    VkQueryPoolCreateInfo qi{VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO};
    qi.queryType = VK_QUERY_TYPE_TIMESTAMP;
    qi.queryCount = k_query_capacity;
    check(vkCreateQueryPool(dev, &qi, nullptr, &query_pool_), "vkCreateQueryPool");
    query_capacity_ = k_query_capacity;
  }
}

Recorder::~Recorder() {
  VkDevice dev = ctx_.device().device();
  for (auto* p : descriptor_pools_) vkDestroyDescriptorPool(dev, p, nullptr);
  if (query_pool_) vkDestroyQueryPool(dev, query_pool_, nullptr);
  vkDestroyFence(dev, fence_, nullptr);
  vkDestroyCommandPool(dev, pool_, nullptr);  // frees every command buffer
}

void Recorder::begin_segment() {
  VkDevice dev = ctx_.device().device();
  if (!spare_.empty()) {
    current_ = spare_.back();
    spare_.pop_back();
    check(vkResetCommandBuffer(current_, 0), "vkResetCommandBuffer");
  } else {
    VkCommandBufferAllocateInfo ai{VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO};
    ai.commandPool = pool_;
    ai.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY;
    ai.commandBufferCount = 1;
    check(vkAllocateCommandBuffers(dev, &ai, &current_), "vkAllocateCommandBuffers");
  }
  VkCommandBufferBeginInfo bi{VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO};
  check(vkBeginCommandBuffer(current_, &bi), "vkBeginCommandBuffer");
  if (segments_.empty() && query_pool_) {
    vkCmdResetQueryPool(current_, query_pool_, 0, query_capacity_);
    queries_used_ = 0;
  }
  // Work in earlier segments must be visible here: segment boundaries carry no dependency.
  if (!segments_.empty()) barrier();
  dispatches_in_segment_ = 0;
}

void Recorder::end_segment() {
  if (!current_) return;
  barrier();  // also makes results visible to the host
  check(vkEndCommandBuffer(current_), "vkEndCommandBuffer");
  segments_.push_back(current_);
  current_ = VK_NULL_HANDLE;
}

void Recorder::barrier() {
  record_full_barrier(current_);
  touched_.clear();
}

bool Recorder::conflicts(VkBuffer buffer, uint64_t offset, uint64_t bytes, bool writes) const {
  const auto it = touched_.find(buffer);
  if (it == touched_.end()) return false;
  for (const Access& a : it->second)
    if ((writes || a.writes) && offset < a.end && a.begin < offset + bytes) return true;
  return false;
}

void Recorder::touch(VkBuffer buffer, uint64_t offset, uint64_t bytes, bool writes) {
  auto& list = touched_[buffer];
  // Merge with an identical range (the common case: one tensor read by several dispatches).
  for (Access& a : list)
    if (a.begin == offset && a.end == offset + bytes) {
      a.writes = a.writes || writes;
      return;
    }
  list.push_back({offset, offset + bytes, writes});
}

VkDescriptorSet Recorder::allocate_set(VkDescriptorSetLayout layout) {
  VkDevice dev = ctx_.device().device();
  for (;;) {
    if (descriptor_pool_index_ == descriptor_pools_.size()) {
      VkDescriptorPoolSize size{VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, k_sets_per_pool * 8};
      VkDescriptorPoolCreateInfo pi{VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO};
      pi.maxSets = k_sets_per_pool;
      pi.poolSizeCount = 1;
      pi.pPoolSizes = &size;
      VkDescriptorPool pool;
      check(vkCreateDescriptorPool(dev, &pi, nullptr, &pool), "vkCreateDescriptorPool");
      descriptor_pools_.push_back(pool);
    }
    VkDescriptorSetAllocateInfo ai{VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO};
    ai.descriptorPool = descriptor_pools_[descriptor_pool_index_];
    ai.descriptorSetCount = 1;
    ai.pSetLayouts = &layout;
    VkDescriptorSet set;
    VkResult r = vkAllocateDescriptorSets(dev, &ai, &set);
    if (r == VK_SUCCESS) return set;
    if (r != VK_ERROR_OUT_OF_POOL_MEMORY && r != VK_ERROR_FRAGMENTED_POOL) check(r, "vkAllocateDescriptorSets");
    ++descriptor_pool_index_;
  }
}

void Recorder::dispatch(const Pipeline& p, const std::vector<Binding>& bindings, const void* push,
                        uint32_t push_bytes, uint32_t gx, uint32_t gy, uint32_t gz) {
  if (gx == 0 || gy == 0 || gz == 0) return;
  const auto& lim = ctx_.profile().max_workgroup_count;
  if (gx > lim[0] || gy > lim[1] || gz > lim[2])
    fail("internal: kernel ", p.name, " dispatch of ", gx, "x", gy, "x", gz, " workgroups exceeds the device limit");
  if (push_bytes > k_push_constant_bytes) fail("internal: push constants of ", p.name, " are too large");
  if (!current_ || dispatches_in_segment_ >= max_dispatches_per_segment_) {
    end_segment();
    begin_segment();
  }
  // Only the bindings the shader declares are written to its set.
  std::vector<VkDescriptorBufferInfo> infos;
  std::vector<VkWriteDescriptorSet> writes;
  infos.reserve(p.bindings.size());
  bool hazard = false;
  for (uint32_t slot : p.bindings) {
    const Binding* b = nullptr;
    for (auto& c : bindings)
      if (c.slot == slot) b = &c;
    if (!b || !b->buffer) fail("internal: kernel ", p.name, " needs binding ", slot, " which was not supplied");
    if (b->range > ctx_.profile().max_binding_bytes)
      fail("internal: kernel ", p.name, " binding ", slot, " spans ", b->range, " bytes, over the device limit of ",
           ctx_.profile().max_binding_bytes);
    if (b->offset % ctx_.profile().min_storage_offset_alignment)
      fail("internal: kernel ", p.name, " binding ", slot, " offset ", b->offset, " is misaligned");
    infos.push_back({b->buffer, b->offset, b->range});
    hazard = hazard || conflicts(b->buffer, b->offset, b->range, b->writes);
  }
  if (hazard) barrier();
  for (uint32_t slot : p.bindings)
    for (auto& c : bindings)
      if (c.slot == slot) touch(c.buffer, c.offset, c.range, c.writes);
  VkDescriptorSet set = allocate_set(p.set_layout);
  for (size_t i = 0; i < p.bindings.size(); ++i) {
    VkWriteDescriptorSet w{VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET};
    w.dstSet = set;
    w.dstBinding = p.bindings[i];
    w.descriptorCount = 1;
    w.descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
    w.pBufferInfo = &infos[i];
    writes.push_back(w);
  }
  vkUpdateDescriptorSets(ctx_.device().device(), uint32_t(writes.size()), writes.data(), 0, nullptr);
  vkCmdBindPipeline(current_, VK_PIPELINE_BIND_POINT_COMPUTE, p.pipeline);
  vkCmdBindDescriptorSets(current_, VK_PIPELINE_BIND_POINT_COMPUTE, p.layout, 0, 1, &set, 0, nullptr);
  if (push_bytes) {
    // Push the whole range so no byte the layout declares is left undefined.
    uint8_t data[k_push_constant_bytes] = {};
    std::memcpy(data, push, push_bytes);
    vkCmdPushConstants(current_, p.layout, VK_SHADER_STAGE_COMPUTE_BIT, 0, k_push_constant_bytes, data);
  }
  vkCmdDispatch(current_, gx, gy, gz);
  ++dispatches_in_segment_;
  ++dispatches_total_;
}

void Recorder::copy(const Tensor& src, uint64_t src_offset, const Tensor& dst, uint64_t dst_offset, uint64_t bytes) {
  if (bytes == 0) return;
  if (src_offset + bytes > src.capacity() || dst_offset + bytes > dst.capacity())
    fail("internal: copy of ", bytes, " bytes from ", src.name(), " to ", dst.name(), " is out of range");
  if (!current_) begin_segment();
  const uint64_t src_at = src_offset, dst_at = dst_offset;
  if (conflicts(src.buffer(), src_at, bytes, false) || conflicts(dst.buffer(), dst_at, bytes, true)) barrier();
  touch(src.buffer(), src_at, bytes, false);
  touch(dst.buffer(), dst_at, bytes, true);
  VkBufferCopy region{src_offset, dst_offset, bytes};
  vkCmdCopyBuffer(current_, src.buffer(), dst.buffer(), 1, &region);
}

int Recorder::timestamp() {
  if (!query_pool_ || queries_used_ >= query_capacity_) return -1;
  if (!current_) begin_segment();
  vkCmdWriteTimestamp(current_, VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, query_pool_, queries_used_);
  return int(queries_used_++);
}

void Recorder::run_segments() {
  if (segments_.empty()) return;
  VkDevice dev = ctx_.device().device();
  std::vector<VkSubmitInfo> submits(segments_.size(), {VK_STRUCTURE_TYPE_SUBMIT_INFO});
  for (size_t i = 0; i < segments_.size(); ++i) {
    submits[i].commandBufferCount = 1;
    submits[i].pCommandBuffers = &segments_[i];
  }
  auto t0 = std::chrono::steady_clock::now();
  {
    std::lock_guard<std::mutex> lock(ctx_.queue_mutex());
    check(vkResetFences(dev, 1, &fence_), "vkResetFences");
    check(ctx_.device().submit(uint32_t(submits.size()), submits.data(), fence_), "vkQueueSubmit");
  }
  check(vkWaitForFences(dev, 1, &fence_, VK_TRUE, UINT64_MAX), "vkWaitForFences");
  cpu_ns_ = double(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
  if (query_pool_ && queries_used_) {
    query_results_.assign(queries_used_, 0);
    check(vkGetQueryPoolResults(dev, query_pool_, 0, queries_used_, queries_used_ * sizeof(uint64_t),
                                query_results_.data(), sizeof(uint64_t), VK_QUERY_RESULT_64_BIT | VK_QUERY_RESULT_WAIT_BIT),
          "vkGetQueryPoolResults");
  }
}

void Recorder::submit() {
  end_segment();
  run_segments();
}

void Recorder::replay() {
  end_segment();  // a recording that was never submitted is closed here
  run_segments();
}

void Recorder::reset() {
  if (current_) {
    vkEndCommandBuffer(current_);
    segments_.push_back(current_);
    current_ = VK_NULL_HANDLE;
  }
  for (auto cb : segments_) spare_.push_back(cb);
  segments_.clear();
  for (auto* p : descriptor_pools_) vkResetDescriptorPool(ctx_.device().device(), p, 0);
  descriptor_pool_index_ = 0;
  touched_.clear();
  queries_used_ = 0;
  dispatches_total_ = 0;
  scratch_.clear();
}

Tensor Recorder::scratch(DType dtype, std::vector<int64_t> shape, const std::string& name) {
  scratch_.push_back(ctx_.tensor(dtype, std::move(shape), name));
  return scratch_.back();
}

double Recorder::elapsed_ns(int from, int to) const {
  if (from < 0 || to < 0 || size_t(to) >= query_results_.size()) return -1;
  uint64_t mask = ctx_.profile().timestamp_valid_bits >= 64 ? ~0ull : ((1ull << ctx_.profile().timestamp_valid_bits) - 1);
  uint64_t d = (query_results_[size_t(to)] - query_results_[size_t(from)]) & mask;
  return double(d) * ctx_.profile().timestamp_period_ns;
}

}  // namespace vkvlm::gpu
