#pragma once
// `vkvlm serve`: an OpenAI-compatible HTTP server (chat completions with images, streaming,
// models, health, Prometheus metrics) on the HTTP layer in app/http.h.
#include <cstdint>
#include <string>
#include <vector>

#include "models/decoder.h"
#include "models/weights.h"

namespace vkvlm::server {

// One model the server offers: requests name it in "model".
struct ServedModelOptions {
  std::string name;                // what requests' "model" says
  std::string dir;                 // its folder (a repo id is resolved, and downloaded, before)
  int64_t context_tokens = 4096;   // KV cache rows per conversation slot
  bool rotating = false;           // the slots' caches rotate (--max-kv-size)
  KvFormat kv_format;
  LoadOptions load;
  std::string draft_model_dir;     // speculative decoding with this draft model (empty: none)
  std::string prompt_cache;        // a prompt cache of this model every conversation may start from
};

struct Options {
  // The models served (one, or several: --model A --model B, --config FILE).
  std::vector<ServedModelOptions> models;
  std::string active_model;  // the model for requests that name none or "default" (first: empty)
  int max_loaded = 0;        // models kept loaded at once; the least recently used goes (0: all)
  std::string host = "127.0.0.1";
  int port = 8080;
  std::string api_key;            // when set, /v1/* needs "Authorization: Bearer <key>"
  int max_concurrency = 16;       // requests admitted at once (running or queued); more get 429
  // Every model's defaults (a --config entry may say otherwise).
  int64_t context_tokens = 4096;  // KV cache size per conversation slot
  bool rotating = false;          // --max-kv-size: the slots' caches rotate (answers go on past them)
  KvFormat kv_format;             // --kv-bits: the slots' caches store K and V quantized
  int kv_slots = 1;               // conversations whose KV caches are kept for reuse (>= parallel)
  int parallel = 1;               // generations of one model decoded together in one batched step
  std::string allow_local_files;  // folder image_url file paths may come from (empty: none)
  size_t max_body_bytes = 64ull << 20;  // whatever the framing (Content-Length or chunked)
  double request_seconds = 30;          // to receive a request's headers and body, once it has begun
  double drain_seconds = 30;            // on SIGTERM, in-flight requests may finish within this
  bool metrics_public = false;          // /metrics without the API key
  std::string cors_origin;              // browsers from this origin ("*": any) may call the API
  int max_images = 8;             // per request
  int max_messages = 10000;       // per request
  int max_parts = 10000;          // content parts per request
  uint64_t max_request_memory = 0;  // bytes admitted requests may hold together (0: from the machine)
  int num_draft_tokens = 3;       // drafts per round, unless a request says
  int lookup_ngram = 0;           // prompt-lookup drafting by default (no draft model)
  LoadOptions load;
};

// Parses `vkvlm serve` flags from argv[first..], runs until SIGINT/SIGTERM. Returns the exit code.
int run_serve(int argc, char** argv, int first);

}  // namespace vkvlm::server
