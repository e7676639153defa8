#pragma once
// The body of POST /v1/chat/completions into a ChatRequest: every field type- and range-checked,
// image parts decoded (data: URLs, or files inside the folder --allow-local-files names; nothing
// is fetched). Errors are ApiErrors: an OpenAI-shaped message naming the field, with its status.
#include <filesystem>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "host/image.h"
#include "models/model.h"

namespace vkvlm::server {

// An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}} with its HTTP status.
struct ApiError : std::runtime_error {
  int status;
  std::string type, param, code;
  ApiError(int s, std::string message, std::string t = "invalid_request_error", std::string p = "", std::string c = "")
      : std::runtime_error(std::move(message)), status(s), type(std::move(t)), param(std::move(p)), code(std::move(c)) {}
};

std::string error_body(const std::string& message, const std::string& type, const std::string& param, const std::string& code);

struct ChatRequest {
  Messages messages;
  nlohmann::json template_vars;  // chat_template_kwargs (an extension, as in vLLM)
  std::vector<Image> images;
  GenerationParams params;
  bool stream = false, include_usage = false, logprobs = false;
  std::string model;
};

// Reserves memory for a step of a request before it runs (bytes, and what they are for); throws
// an ApiError to refuse. Empty: nothing is counted.
using ReserveMemory = std::function<void(uint64_t bytes, const std::string& what)>;

struct RequestLimits {
  int max_images = 8;                  // image parts per request
  int max_messages = 10000;            // messages per request
  int max_parts = 10000;               // content parts per request, all messages together
  int64_t context_tokens = 4096;       // max_tokens may not exceed it
  std::filesystem::path local_root;    // canonical --allow-local-files folder; empty: data: URLs only
  int num_draft_tokens = 3;            // the server's defaults for speculative decoding
  int lookup_ngram = 0;
  bool has_draft_model = false;        // then requests may not ask for prompt lookup
  ReserveMemory reserve;               // images' files and pixels, before they are read or decoded
};

// The bytes of text a request hands the chat template (message text, template variables): what
// rendering and tokenizing it costs is proportional to them.
uint64_t template_text_bytes(const ChatRequest& r);
// Its messages and content parts, counted.
uint64_t message_items(const ChatRequest& r);

// The body as a JSON object (a 400 invalid_json otherwise): parsed once, then read for its
// "model" (which decides the limits) and by parse_chat_request.
nlohmann::ordered_json parse_request_body(const std::string& raw);
ChatRequest parse_chat_request(const nlohmann::ordered_json& body, const RequestLimits& limits);
inline ChatRequest parse_chat_request(const std::string& raw, const RequestLimits& limits) {
  return parse_chat_request(parse_request_body(raw), limits);
}

// An image_url part's image: a data: URL, or a file inside local_root; never fetched. A local
// path is resolved whole (every symlink, at every step) and must end inside the folder; the
// answer is the same whether an outside file exists or not, and names no path of the server's.
// `reserve` hears of the file's bytes before they are read and of the pixels before they are decoded.
Image load_image_url(const std::string& url, const std::string& param, const std::filesystem::path& local_root,
                     const ReserveMemory& reserve = {});

}  // namespace vkvlm::server
