// POST /v1/chat/completions bodies as any client may send them: the memory they will take planned
// from a scan of the body, then parsed into a request (fields type- and range-checked, image parts
// as data: URLs decoded, each image's pixels reserved before they are decoded), as the server
// does before it touches the model. The scan must never count fewer values than the parse makes.
#include <cstdlib>

#include "app/chat_request.h"
#include "app/request_memory.h"

using namespace vkvlm;

namespace {
uint64_t values_in(const nlohmann::ordered_json& j) {  // depth bounded by the parse
  uint64_t n = 1;
  if (j.is_object())
    for (auto& [k, v] : j.items()) n += 1 + values_in(v);
  else if (j.is_array())
    for (auto& v : j) n += values_in(v);
  return n;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  server::RequestMemory budget(256ull << 20);
  server::RequestLimits limits;
  limits.max_images = 4;
  limits.max_messages = 64;
  limits.max_parts = 64;
  limits.context_tokens = 8192;
  try {
    server::RequestMemory::Hold hold(budget);
    const server::JsonSize planned = server::measure_json(text);
    hold.grow(server::cost::of_body(planned), "its body");
    const auto body = server::parse_request_body(text);
    if (planned.values < values_in(body)) std::abort();  // the plan undercounted what was built
    limits.reserve = [&hold](uint64_t bytes, const std::string& what) { hold.grow(bytes, what); };
    const server::ChatRequest r = server::parse_chat_request(body, limits);
    hold.grow(server::template_text_bytes(r) * server::cost::per_text_byte +
                  server::message_items(r) * server::cost::per_message,
              "its messages");
    r.params.validate();
  } catch (const server::ApiError& e) {
    (void)server::error_body(e.what(), e.type, e.param, e.code);
  } catch (const std::exception&) {
  }
  if (budget.in_use() != 0) std::abort();  // every reservation is given back
  return 0;
}
