#include "app/request_memory.h"

#include <unistd.h>

#include <algorithm>
#include <fstream>

#include "app/chat_request.h"
#include "base/json.h"

namespace vkvlm::server {

JsonSize measure_json(std::string_view text) { return {text.size(), json_value_count(text)}; }

uint64_t cost::of_body(const JsonSize& size) {
  return base + size.bytes * per_body_byte + size.values * per_json_value;
}

namespace {
std::string mib(uint64_t bytes) { return std::to_string((bytes + (1 << 20) - 1) >> 20) + " MiB"; }
}  // namespace

RequestMemory::Hold::~Hold() {
  std::lock_guard<std::mutex> l(budget_->m_);
  budget_->in_use_ -= bytes_;
}

void RequestMemory::Hold::grow(uint64_t bytes, const std::string& what) {
  RequestMemory& b = *budget_;
  const uint64_t total = bytes_ + bytes;
  if (total > b.budget_)  // the budget is fixed: no lock needed to compare with it
    throw ApiError(413,
                   "the request needs about " + mib(total) + " of memory (" + what + "), more than the server's --max-request-memory of " +
                       mib(b.budget_),
                   "invalid_request_error", "", "request_too_large");
  if (!b.try_reserve(bytes))
    throw ApiError(429,
                   "the server's request memory is in use (" + mib(b.in_use()) + " of " + mib(b.budget_) + "; this request needs " +
                       mib(total) + "); retry later",
                   "rate_limit_exceeded", "", "server_busy");
  bytes_ = total;
}

bool RequestMemory::try_reserve(uint64_t bytes) {
  std::lock_guard<std::mutex> l(m_);
  if (in_use_ + bytes > budget_) return false;
  in_use_ += bytes;
  peak_ = std::max(peak_, in_use_);
  return true;
}

void RequestMemory::release(uint64_t bytes) {
  std::lock_guard<std::mutex> l(m_);
  in_use_ -= std::min(in_use_, bytes);
}

uint64_t RequestMemory::in_use() const {
  std::lock_guard<std::mutex> l(m_);
  return in_use_;
}

uint64_t RequestMemory::peak() const {
  std::lock_guard<std::mutex> l(m_);
  return peak_;
}

uint64_t default_request_memory() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  uint64_t physical = pages > 0 && page > 0 ? uint64_t(pages) * uint64_t(page) : 4ull << 30;
  // In a container, its cgroup's limit is the machine (cgroup v2, then v1).
  for (const char* limit : {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    std::ifstream in(limit);
    uint64_t bytes = 0;
    if (in >> bytes && bytes > 0) physical = std::min(physical, bytes);
  }
  return std::clamp<uint64_t>(physical / 4, 512ull << 20, 32ull << 30);
}

}  // namespace vkvlm::server
