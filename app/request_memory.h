#pragma once
// The memory admitted requests hold together, planned before it is spent. Each request reserves
// what it will take in steps, each before the step runs: its body parsed (from a linear scan
// that counts the JSON's values), its text rendered and tokenized, each image decoded (from its
// header's size). A reservation larger than the whole budget is a 413; one that does not fit
// beside the requests already running is a 429, retried later. The costs are upper bounds
// measured on the server (tests/server: peak RSS of large bodies of every shape).
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>

namespace vkvlm::server {

// What a JSON text will take once parsed: its bytes and its values (every scalar, array and object).
struct JsonSize {
  uint64_t bytes = 0, values = 0;
};
JsonSize measure_json(std::string_view text);

// The costs, in bytes, of each step of a request.
namespace cost {
// The body held, parsed into a document and copied once into the request: per byte and per value.
inline constexpr uint64_t per_body_byte = 3, per_json_value = 160;
// Text the template renders and the tokenizer splits: per byte, and per message or content part.
inline constexpr uint64_t per_text_byte = 24, per_message = 2048;
// A decoded image: the decoder's buffer, the RGB copy, and the processor's working images.
inline constexpr uint64_t per_pixel = 16;
inline constexpr uint64_t base = 1 << 20;  // a request's fixed share
uint64_t of_body(const JsonSize& size);
}  // namespace cost

// The server-wide budget.
class RequestMemory {
 public:
  explicit RequestMemory(uint64_t budget) : budget_(budget) {}
  RequestMemory(const RequestMemory&) = delete;
  RequestMemory& operator=(const RequestMemory&) = delete;

  // One request's reservation: returned when it ends.
  class Hold {
   public:
    explicit Hold(RequestMemory& budget) : budget_(&budget) {}
    ~Hold();
    Hold(const Hold&) = delete;
    Hold& operator=(const Hold&) = delete;
    // Reserves `bytes` more for `what` (in the error: "parsing the body", "an image 4000x3000", ...);
    // throws ApiError 413 when the request as a whole needs more than the budget, 429 when it
    // does not fit now.
    void grow(uint64_t bytes, const std::string& what);
    uint64_t bytes() const { return bytes_; }

   private:
    RequestMemory* budget_;
    uint64_t bytes_ = 0;
  };

  // Bytes held outside any Hold (request bodies as they arrive): whether they fit now.
  bool try_reserve(uint64_t bytes);
  void release(uint64_t bytes);

  uint64_t budget() const { return budget_; }
  uint64_t in_use() const;
  uint64_t peak() const;  // the most reserved at once since the start

 private:
  friend class Hold;
  const uint64_t budget_;
  mutable std::mutex m_;
  uint64_t in_use_ = 0, peak_ = 0;
};

// A budget from the machine: a quarter of its physical memory, between 512 MiB and 32 GiB.
uint64_t default_request_memory();

}  // namespace vkvlm::server
