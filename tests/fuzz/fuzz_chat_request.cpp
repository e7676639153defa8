// POST /v1/chat/completions bodies as any client may send them: parsed into a request (fields
// type- and range-checked, image parts as data: URLs decoded), as the server does before it
// touches the model.
#include "app/chat_request.h"

using namespace vkvlm;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  server::RequestLimits limits;
  limits.max_images = 4;
  limits.context_tokens = 8192;
  try {
    const server::ChatRequest r = server::parse_chat_request(std::string(reinterpret_cast<const char*>(data), size), limits);
    r.params.validate();
  } catch (const server::ApiError& e) {
    (void)server::error_body(e.what(), e.type, e.param, e.code);
  } catch (const std::exception&) {
  }
  return 0;
}
