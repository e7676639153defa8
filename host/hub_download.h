#pragma once
// Downloading a model from the Hugging Face hub (or any server with its API: HF_ENDPOINT) into
// the Hugging Face cache, laid out as huggingface_hub lays it out (host/hub_cache.h), so that the
// Python tools find the files too: blobs/ETAG, snapshots/COMMIT/FILE -> ../../blobs/ETAG,
// refs/REVISION holding the commit, .locks/ for writers. Only the files vkvlm reads are fetched.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace vkvlm {

struct HubOptions {
  std::string endpoint = "https://huggingface.co";  // HF_ENDPOINT
  std::string token;                                // HF_TOKEN (sent to the endpoint's host only)
  std::string cache;                                // the cache folder (hub_cache_dir())
  bool progress = false;                            // a progress bar on stderr
  // A request that brings fewer than stall_bytes in any stall_seconds (its answer's head included:
  // it must begin within that time) is given up, so a server that drips bytes keeps no one waiting.
  double stall_seconds = 30;
  uint64_t stall_bytes = 16 << 10;
  static HubOptions from_environment();             // HF_ENDPOINT, HF_TOKEN, the cache, stderr a terminal
};

struct HubDownloadResult {
  std::string snapshot;                // the snapshot folder
  std::string commit;
  std::vector<std::string> fetched;    // files downloaded now (the rest were in the cache)
  uint64_t bytes = 0;                  // bytes downloaded now
};

// What the hub answers, read as hub_download reads it (exposed for the fuzzer). The file list of
// a revision: its commit and the files vkvlm reads, every shape error naming the hub and repo.
struct HubListing {
  std::string commit;
  std::vector<std::string> files;
};
HubListing parse_hub_listing(const std::string& body, const std::string& endpoint, const std::string& repo,
                             const std::string& revision);
// A file's identity from the headers of the hub's answer to HEAD: the blob's ETag (SHA-256 for
// an LFS file, git's SHA-1 otherwise) and size; an error when they are missing or unusable.
struct HubFileIdentity {
  std::string etag;
  uint64_t size = 0;
};
HubFileIdentity parse_file_identity(const std::string& linked_etag, const std::string& etag, const std::string& linked_size,
                                    const std::string& content_length, const std::string& where);

// Whether a repository file is one vkvlm reads: configs, tokenizer files, chat templates,
// processor configs and safetensors weights with their index.
bool hub_file_needed(const std::string& path);

// Brings the files vkvlm needs of `repo` (ORG/NAME[@REVISION], default main) into the cache:
// asks the hub for the revision's commit and files, and downloads what the snapshot lacks,
// resuming a file an earlier run left incomplete, checking sizes and, for weight files stored
// with LFS, the SHA-256 the hub announces, and holding a lock per file so that two processes
// do not write the same blob. Throws with what happened: no such repository or revision, a
// gated or private one (401/403, with a hint about HF_TOKEN), no network, a full disk, a
// checksum mismatch, an interrupted transfer (run again to resume).
HubDownloadResult hub_download(const std::string& repo, const HubOptions& options);

}  // namespace vkvlm
