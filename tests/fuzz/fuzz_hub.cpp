// What a hub (or anything posing as one) answers: a revision's file list, then the headers of a
// file's HEAD answer (X-Linked-Etag, ETag, X-Linked-Size, Content-Length, one part each), read as
// `vkvlm download` reads them. Every answer is either used or refused with an error naming it; a
// file name that could leave the snapshot folder is never listed.
#include <cstdlib>

#include "host/hub_download.h"
#include "tests/fuzz/fuzz_input.h"

using namespace vkvlm;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto parts = fuzz::split_parts(data, size, 5);
  parts.resize(5);
  try {
    const HubListing listing = parse_hub_listing(parts[0], "http://hub", "acme/model", "main");
    for (const auto& f : listing.files)
      if (f.empty() || f.front() == '/' || f.find("..") != std::string::npos || !hub_file_needed(f)) std::abort();
  } catch (const std::exception&) {
  }
  try {
    const HubFileIdentity id = parse_file_identity(parts[1], parts[2], parts[3], parts[4], "model.safetensors");
    // The ETag names a file in blobs/: never a path.
    if (id.etag.empty() || id.etag.find('/') != std::string::npos || id.etag.find("..") != std::string::npos) std::abort();
  } catch (const std::exception&) {
  }
  return 0;
}
