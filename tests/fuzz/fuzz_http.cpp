// HTTP/1.1 requests as any client may send them, arriving in pieces: the parser must finish,
// ask for more, or refuse with a status, whatever the framing (Content-Length, chunked,
// pipelined requests), within its limits. The first byte of the input picks the piece size.
#include <algorithm>

#include "app/http.h"

using namespace vkvlm;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const size_t piece = size_t(data[0] % 64) + 1;
  ++data;
  --size;
  http::Limits limits;
  limits.max_head_bytes = 4096;
  limits.max_headers = 32;
  limits.max_body_bytes = 1 << 16;
  http::RequestParser parser(limits);
  http::Request request;
  std::string buffer;
  size_t at = 0;
  while (at < size || !buffer.empty()) {
    const size_t n = std::min(piece, size - at);
    buffer.append(reinterpret_cast<const char*>(data) + at, n);
    at += n;
    const auto state = parser.feed(buffer, request);
    if (state == http::RequestParser::State::Error) {
      if (parser.error_status() < 400 || parser.error_status() > 599) __builtin_trap();
      break;
    }
    if (state == http::RequestParser::State::Done) {
      if (request.body.size() > limits.max_body_bytes) __builtin_trap();
      parser.reset();
      request = http::Request();
      continue;
    }
    if (n == 0) break;  // needs more than there is
  }
  return 0;
}
