#include "host/hub_download.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/file.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <regex>
#include <set>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "base/error.h"
#include "base/files.h"
#include "base/json.h"
#include "host/hub_cache.h"

namespace vkvlm {
namespace fs = std::filesystem;

namespace {

// scheme://host[:port] and the path of an absolute URL.
struct Url {
  std::string origin, path;
};
Url split_url(const std::string& url) {
  static const std::regex re(R"(^(https?://[^/?#]+)([/?].*)?$)");
  std::smatch m;
  if (!std::regex_match(url, m, re)) fail("'", url, "' is not an http(s) URL");
  return {m[1], m[2].matched && m[2].length() > 0 ? std::string(m[2]) : "/"};
}

std::string percent_encode_path(const std::string& s) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~' || c == '/') {
      out += char(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

std::string strip_etag(std::string e) {
  if (e.rfind("W/", 0) == 0) e = e.substr(2);
  if (e.size() >= 2 && e.front() == '"' && e.back() == '"') e = e.substr(1, e.size() - 2);
  return e;
}

bool is_sha256(const std::string& s) {
  static const std::regex re("^[0-9a-f]{64}$");
  return std::regex_match(s, re);
}

// A small (non-LFS) file's ETag on the hub: git's blob SHA-1.
bool is_sha1(const std::string& s) {
  static const std::regex re("^[0-9a-f]{40}$");
  return std::regex_match(s, re);
}

// The most a reply kept in memory (a file list, an error) may hold.
constexpr size_t k_max_reply_bytes = size_t(32) << 20;

// A Location header resolved against the URL that answered with it: absolute, scheme-relative
// ("//host/path"), absolute-path ("/path") or relative to the answering path's folder.
std::string resolve_location(const Url& from, const std::string& loc) {
  if (loc.rfind("http://", 0) == 0 || loc.rfind("https://", 0) == 0) return loc;
  if (loc.rfind("//", 0) == 0) return from.origin.substr(0, from.origin.find("//")) + loc;
  if (loc.rfind("/", 0) == 0) return from.origin + loc;
  std::string dir = from.path.substr(0, from.path.find_first_of("?#"));
  dir = dir.substr(0, dir.rfind('/') + 1);
  return from.origin + (dir.empty() ? "/" : dir) + loc;
}

// Watches a request's progress from a thread of its own: when fewer than `min_bytes` arrive in
// any `seconds`, it stops the client (which ends the request at once, wherever it waits).
class StallWatch {
 public:
  StallWatch(httplib::Client& cli, double seconds, uint64_t min_bytes)
      : thread_([this, &cli, seconds, min_bytes] {
          using clock = std::chrono::steady_clock;
          const auto window = std::chrono::duration<double>(seconds);
          auto start = clock::now();
          uint64_t at_start = 0;
          std::unique_lock<std::mutex> l(m_);
          while (!done_) {
            cv_.wait_for(l, std::chrono::duration<double>(std::min(seconds / 4, 1.0)));
            if (done_ || clock::now() - start < window) continue;
            const uint64_t now_bytes = bytes;
            if (now_bytes - at_start < min_bytes) {
              stalled = true;
              cli.stop();
              return;
            }
            start = clock::now();
            at_start = now_bytes;
          }
        }) {}
  ~StallWatch() {
    {
      std::lock_guard<std::mutex> l(m_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  std::atomic<uint64_t> bytes{0};
  std::atomic<bool> stalled{false};

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

// One HTTP exchange at a time, following redirects by hand so that the token goes to the
// endpoint's host only (a CDN it redirects to gets no credentials).
class Hub {
 public:
  explicit Hub(const HubOptions& o) : o_(o), origin_(split_url(o.endpoint).origin) {}

  struct Reply {
    int status = 0;
    httplib::Headers headers;
    std::string body, url;
    std::string header(const char* name) const {
      auto it = headers.find(name);
      return it == headers.end() ? "" : it->second;
    }
  };

  // A request to `url`; with `follow`, redirects are followed (up to 10). `sink` receives a
  // GET's body instead of Reply::body (return false to stop).
  Reply request(const char* method, std::string url, bool follow, const httplib::Headers& extra = {},
                const std::function<bool(const char*, size_t)>& sink = nullptr,
                const std::function<bool(const httplib::Response&)>& on_headers = nullptr) {
    for (int hop = 0; hop <= 10; ++hop) {
      const Url u = split_url(url);
      httplib::Client cli(u.origin);
      cli.set_follow_location(false);
      cli.set_connection_timeout(15);
      cli.set_read_timeout(60);
      cli.enable_server_certificate_verification(true);
      httplib::Headers h = extra;
      h.emplace("User-Agent", "vkvlm");
      if (!o_.token.empty() && u.origin == origin_) h.emplace("Authorization", "Bearer " + o_.token);
      Reply r;
      r.url = url;
      // Nothing is asked for compressed (no Accept-Encoding), so nothing is decompressed: a
      // body that comes encoded anyway is refused, not inflated.
      cli.set_decompress(false);
      bool not_the_file = false;  // a redirect's or an error's body: never handed to the sink
      bool encoded = false, too_large = false;
      StallWatch watch(cli, o_.stall_seconds, o_.stall_bytes);
      // Without a sink the body is kept, up to k_max_reply_bytes.
      auto keep = [&](const char* data, size_t n) {
        if (r.body.size() + n > k_max_reply_bytes) {
          too_large = true;
          return false;
        }
        r.body.append(data, n);
        return true;
      };
      httplib::Result res = [&] {
        if (std::strcmp(method, "HEAD") == 0) return cli.Head(u.path.c_str(), h);
        return cli.Get(
            u.path.c_str(), h,
            [&](const httplib::Response& resp) {
              const std::string coding = resp.get_header_value("Content-Encoding");
              encoded = !coding.empty() && coding != "identity";
              if (encoded) return false;
              not_the_file = resp.status >= 300;
              if (not_the_file || !sink) return true;
              return on_headers ? on_headers(resp) : true;
            },
            [&](const char* data, size_t n) {
              watch.bytes += n;
              if (!sink) return keep(data, n);
              if (not_the_file) return true;
              return sink(data, n);
            });
      }();
      if (watch.stalled)
        fail(u.origin, " sent fewer than ", o_.stall_bytes, " bytes in ", o_.stall_seconds, " s for ", u.path,
             " (a stalled or dripping connection)");
      if (encoded)
        fail(u.origin, " answered ", u.path, " with a body in a content coding that was not asked for (",
             res ? res->get_header_value("Content-Encoding") : std::string("compressed"), ")");
      if (too_large) fail(u.origin, " answered ", u.path, " with more than ", k_max_reply_bytes >> 20, " MB");
      if (!res) {
        const httplib::Error e = res.error();
        if (e == httplib::Error::Canceled) throw Error("canceled");
        if (e == httplib::Error::Connection || e == httplib::Error::SSLConnection)
          fail("cannot reach ", u.origin, ": ", httplib::to_string(e),
               " (no network? With HF_HUB_OFFLINE=1 only the local Hugging Face cache is used)");
        fail("the connection to ", u.origin, " broke: ", httplib::to_string(e));
      }
      r.status = res->status;
      r.headers = res->headers;
      if (follow && r.status >= 300 && r.status < 400 && res->has_header("Location")) {
        url = resolve_location(u, res->get_header_value("Location"));
        continue;
      }
      return r;
    }
    fail("too many redirects from ", url);
  }

  const HubOptions& options() const { return o_; }

 private:
  HubOptions o_;
  std::string origin_;
};

// What an HTTP error means for a repository, in words.
[[noreturn]] void repo_error(const Hub::Reply& r, const RepoId& repo, const HubOptions& o, const std::string& what) {
  const std::string code = r.header("X-Error-Code"), message = r.header("X-Error-Message");
  const std::string id = repo.id();
  if (r.status == 401 || r.status == 403) {
    const bool gated = code == "GatedRepo" || r.status == 403;
    fail(id, " on ", o.endpoint, " needs permission (HTTP ", r.status, gated ? ", a gated repository" : ", private or gated",
         ")", o.token.empty() ? ": set HF_TOKEN to a token of an account that has access"
                              : ": the HF_TOKEN given has no access (accept the model's terms on its page, or check the token)",
         message.empty() ? "" : " - " + message);
  }
  if (r.status == 404) {
    if (code == "RevisionNotFound") fail(id, " has no revision '", repo.revision, "' on ", o.endpoint);
    if (code == "EntryNotFound") fail(id, " has no file ", what, " at revision '", repo.revision, "'");
    fail("no repository ", id, " on ", o.endpoint, " (or it is private: set HF_TOKEN)");
  }
  fail(o.endpoint, " answered HTTP ", r.status, " for ", what, " of ", id, message.empty() ? "" : ": " + message);
}

// An exclusive lock on a file, released on destruction (flock: per open file, so threads of one
// process exclude each other too).
class FileLock {
 public:
  explicit FileLock(const fs::path& path) {
    fs::create_directories(path.parent_path());
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd_ < 0) fail("cannot create the lock file ", path.string(), ": ", std::strerror(errno));
    while (::flock(fd_, LOCK_EX) != 0)
      if (errno != EINTR) fail("cannot lock ", path.string(), ": ", std::strerror(errno));
  }
  ~FileLock() {
    if (fd_ >= 0) ::close(fd_);
  }
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

 private:
  int fd_ = -1;
};

// The hex digest of a file: SHA-256 (an LFS file's identity), or with `git_blob` git's SHA-1 of
// the blob ("blob SIZE\0" then the bytes: a small file's ETag on the hub).
std::string digest_file(const fs::path& path, bool git_blob) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("cannot read ", path.string(), ": ", std::strerror(errno));
  EVP_MD_CTX* md = EVP_MD_CTX_new();
  EVP_DigestInit_ex(md, git_blob ? EVP_sha1() : EVP_sha256(), nullptr);
  if (git_blob) {
    std::error_code ec;
    const std::string header = "blob " + std::to_string(fs::file_size(path, ec)) + std::string(1, '\0');
    EVP_DigestUpdate(md, header.data(), header.size());
  }
  std::vector<char> buf(1 << 20);
  ssize_t n;
  while ((n = ::read(fd, buf.data(), buf.size())) > 0) EVP_DigestUpdate(md, buf.data(), size_t(n));
  ::close(fd);
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(md, out, &len);
  EVP_MD_CTX_free(md);
  if (n < 0) fail("cannot read ", path.string(), ": ", std::strerror(errno));
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (unsigned i = 0; i < len; ++i) {
    s += hex[out[i] >> 4];
    s += hex[out[i] & 15];
  }
  return s;
}

// A progress line on stderr: bytes, rate, time left; at most ten updates a second.
class Progress {
 public:
  Progress(bool on, std::string name, uint64_t total, uint64_t start)
      : on_(on), name_(std::move(name)), total_(total), start_bytes_(start), t0_(clock::now()) {}
  void update(uint64_t done, bool last = false) {
    if (!on_) return;
    const auto now = clock::now();
    if (!last && now - shown_ < std::chrono::milliseconds(100)) return;
    shown_ = now;
    const double s = std::chrono::duration<double>(now - t0_).count();
    const double rate = s > 0 ? double(done - start_bytes_) / s : 0;
    const double left = rate > 0 && total_ > done ? double(total_ - done) / rate : 0;
    std::fprintf(stderr, "\r%-40.40s %8.1f / %.1f MB  %6.1f MB/s  ETA %d:%02d ", name_.c_str(), double(done) / 1e6,
                 double(total_) / 1e6, rate / 1e6, int(left) / 60, int(left) % 60);
    if (last) std::fputc('\n', stderr);
    std::fflush(stderr);
  }

 private:
  using clock = std::chrono::steady_clock;
  bool on_;
  std::string name_;
  uint64_t total_, start_bytes_;
  clock::time_point t0_, shown_{};
};

// Whether the file at `path` is the one the hub announced: its size, and its SHA-256 (LFS files)
// or git blob SHA-1 (small files) when the ETag is one; "" when it is, else what differs.
std::string check_blob(const fs::path& path, uint64_t size, const std::string& etag) {
  std::error_code ec;
  const uint64_t have = fs::file_size(path, ec);
  if (ec || have != size) return "it has " + std::to_string(ec ? 0 : have) + " bytes, not " + std::to_string(size);
  if (is_sha256(etag) || is_sha1(etag)) {
    const std::string actual = digest_file(path, is_sha1(etag));
    if (actual != etag)
      return std::string("checksum mismatch: the hub announced ") + (is_sha1(etag) ? "git SHA-1 " : "SHA-256 ") + etag +
             ", the file has " + actual;
  }
  return "";
}

// Fetches the rest of `url` into `part`, which holds its first `have` bytes (the whole file when
// the server starts over); returns the HTTP status: the file is whole unless it is 416 (the
// server will not resume there). Any other failure is an error that says how far it got.
int transfer(Hub& hub, const std::string& url, const fs::path& part, uint64_t have, uint64_t size,
             const std::string& name, uint64_t& got) {
  // O_NOFOLLOW: a link planted in the cache is never written through.
  int fd = ::open(part.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0) fail("cannot write ", part.string(), ": ", std::strerror(errno));
  uint64_t done = have;
  Progress progress(hub.options().progress, name, size, have);
  std::string write_error;
  httplib::Headers range;
  if (have > 0) range.emplace("Range", "bytes=" + std::to_string(have) + "-");
  Hub::Reply r;
  try {
    r = hub.request(
        "GET", url, true, range,
        [&](const char* data, size_t n) {
          size_t off = 0;
          while (off < n) {
            const ssize_t w = ::write(fd, data + off, n - off);
            if (w < 0) {
              if (errno == EINTR) continue;
              write_error = std::strerror(errno);
              if (errno == ENOSPC || errno == EDQUOT || errno == EFBIG) write_error += " (is the disk full?)";
              return false;
            }
            off += size_t(w);
          }
          done += n;
          got += n;
          progress.update(done);
          return done <= size;
        },
        [&](const httplib::Response& resp) {
          // 206: the server continues where the file stopped; 200: it starts over.
          if (resp.status != 206) {
            if (::ftruncate(fd, 0) != 0) return false;
            done = 0;
          }
          return ::lseek(fd, off_t(done), SEEK_SET) >= 0;
        });
  } catch (const Error& e) {
    ::close(fd);
    if (!write_error.empty()) fail("cannot write ", part.string(), ": ", write_error);
    if (std::string(e.what()) == "canceled" && done > size)
      fail(url, " sent more than the ", size, " bytes the hub announced for ", name);
    fail("the download of ", name, " stopped after ", done, " of ", size, " bytes (", e.what(), "); run again to resume");
  }
  const int close_rc = ::close(fd);
  if (!write_error.empty()) fail("cannot write ", part.string(), ": ", write_error);
  if (close_rc != 0) fail("cannot write ", part.string(), ": ", std::strerror(errno));
  if (r.status == 416) return r.status;
  if (r.status >= 400) fail("downloading ", name, " from ", r.url, " failed with HTTP ", r.status);
  progress.update(done, true);
  if (done != size) fail("the download of ", name, " stopped after ", done, " of ", size, " bytes; run again to resume");
  return r.status;
}

// Downloads `url` into blob via blob.incomplete, resuming what an earlier run left there. A
// partial file that turns out wrong (or that the server will not resume: 416) is downloaded
// anew, once; the file is checked against the hub's size and checksum before it is moved into
// place. Returns the bytes transferred.
uint64_t fetch_blob(Hub& hub, const std::string& url, const fs::path& blob, uint64_t size, const std::string& etag,
                    const std::string& name) {
  const fs::path part = blob.string() + ".incomplete";
  std::error_code ec;
  uint64_t got = 0;
  for (int attempt = 0;; ++attempt) {
    uint64_t have = fs::exists(part, ec) ? fs::file_size(part, ec) : 0;
    if (have > size) {
      fs::remove(part, ec);
      have = 0;
    }
    const bool resumed = have > 0;
    // The disk must hold what is still to come (a hub announcing an absurd size fails here, not
    // when the disk is full).
    struct statvfs fs_info {};
    if (have < size && ::statvfs(blob.parent_path().c_str(), &fs_info) == 0) {
      const uint64_t free_bytes = uint64_t(fs_info.f_bavail) * uint64_t(fs_info.f_frsize);
      if (size - have > free_bytes)
        fail("not enough free space for ", name, ": the hub announces ", size, " bytes, ", size - have, " still to come, and ",
             blob.parent_path().string(), " has ", free_bytes, " bytes free");
    }
    // A whole one (killed while it was being checked) is only checked.
    const int status = have < size ? transfer(hub, url, part, have, size, name, got) : 200;
    const std::string wrong = status == 416 ? "the server would not resume it" : check_blob(part, size, etag);
    if (wrong.empty()) break;
    fs::remove(part, ec);
    if (resumed && attempt == 0) continue;  // what an earlier run left was not the file: from the start
    fail("the download of ", name, " is not the file the hub announced: ", wrong, " (removed; run again to download it anew)");
  }
  fs::rename(part, blob, ec);
  if (ec) fail("cannot move ", part.string(), " into place: ", ec.message());
  return got;
}

// A name for a temporary file beside another, unique across processes and threads.
std::string temporary_suffix() {
  static std::atomic<uint64_t> counter{0};
  return ".tmp." + std::to_string(::getpid()) + "." + std::to_string(++counter);
}

// Writes `data` to `path` through a temporary file in the same folder and a rename, so that a
// reader at any moment sees the old contents or the new, never a part.
void write_file_atomically(const fs::path& path, const std::string& data) {
  const fs::path tmp = path.string() + temporary_suffix();
  FILE* out = std::fopen(tmp.c_str(), "wb");
  if (!out) fail("cannot write ", tmp.string(), ": ", std::strerror(errno));
  const bool written = std::fwrite(data.data(), 1, data.size(), out) == data.size();
  if (std::fclose(out) != 0 || !written) fail("cannot write ", tmp.string());
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) fail("cannot write ", path.string(), ": ", ec.message());
}

// Points `link` at `target` through a temporary link and a rename (which replaces whatever was
// there atomically), so that concurrent downloads of one repository all end with the link.
void link_atomically(const fs::path& target, const fs::path& link) {
  const fs::path tmp = link.string() + temporary_suffix();
  std::error_code ec;
  fs::remove(tmp, ec);
  fs::create_symlink(target, tmp, ec);
  if (!ec) fs::rename(tmp, link, ec);
  if (ec) fail("cannot link ", link.string(), " to its blob: ", ec.message());
}

}  // namespace

HubOptions HubOptions::from_environment() {
  HubOptions o;
  if (std::string e = hub_env("HF_ENDPOINT"); !e.empty()) o.endpoint = e;
  while (o.endpoint.size() > 1 && o.endpoint.back() == '/') o.endpoint.pop_back();
  o.token = hub_env("HF_TOKEN");
  if (o.token.empty()) o.token = hub_env("HUGGING_FACE_HUB_TOKEN");  // the older name
  if (o.token.empty()) o.token = hub_saved_token();
  o.cache = hub_cache_dir();
  o.progress = ::isatty(2) != 0;
  return o;
}

bool hub_file_needed(const std::string& path) {
  static const std::regex re(
      R"(^(config|generation_config|preprocessor_config|processor_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|chat_template)\.json$|^chat_template\.jinja$|^[^/]*\.safetensors$|^[^/]*\.safetensors\.index\.json$)");
  return std::regex_match(path, re);
}

// Of the repository's root *.safetensors, those the checkpoint is made of: the shards its index
// (already in the snapshot) names, else model.safetensors alone, else all of them.
static std::vector<std::string> weights_to_fetch(const std::vector<std::string>& weights, const fs::path& snapshot,
                                          const std::string& repo) {
  std::error_code ec;
  const fs::path index = snapshot / "model.safetensors.index.json";
  if (fs::exists(index, ec)) {
    nlohmann::json j;
    try {
      j = parse_json(read_file_bounded(index.string(), 64 << 20, "weight index"));
    } catch (const nlohmann::json::exception& e) {
      fail("the weight index of ", repo, " is not valid JSON: ", e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      fail("the weight index of ", repo, " has no \"weight_map\" object");
    std::set<std::string> named;
    for (const auto& [tensor, file] : j["weight_map"].items()) {
      if (!file.is_string()) fail("the weight index of ", repo, " maps ", tensor, " to something that is not a file name");
      named.insert(file.get<std::string>());
    }
    std::vector<std::string> out;
    for (const auto& f : weights)
      if (named.erase(f)) out.push_back(f);
    if (!named.empty()) fail("the weight index of ", repo, " names ", *named.begin(), ", which the repository does not hold");
    return out;
  }
  for (const auto& f : weights)
    if (f == "model.safetensors") return {f};
  return weights;
}

HubListing parse_hub_listing(const std::string& body, const std::string& endpoint, const std::string& repo,
                             const std::string& revision) {
  nlohmann::json j;
  try {
    j = parse_json(body);
  } catch (const std::exception&) {
    fail(endpoint, " answered the file list of ", repo, " with something that is not JSON");
  }
  // Its shape, checked before it is read: a wrong one is named, not a library's type error.
  auto shape_error = [&](const char* what) {
    fail(endpoint, " answered the file list of ", repo, " with JSON of another shape: ", what);
  };
  if (!j.is_object()) shape_error("not an object");
  if (j.contains("sha") && !j["sha"].is_string()) shape_error("'sha' is not a string");
  if (j.contains("siblings") && !j["siblings"].is_array()) shape_error("'siblings' is not a list");
  HubListing out;
  out.commit = j.value("sha", "");
  if (!is_commit_hash(out.commit)) fail(endpoint, " gave no commit for revision '", revision, "' of ", repo);
  for (const auto& s : j.value("siblings", nlohmann::json::array())) {
    if (!s.is_object() || (s.contains("rfilename") && !s["rfilename"].is_string()))
      shape_error("a sibling without a string 'rfilename'");
    const std::string f = s.value("rfilename", "");
    if (f.empty() || f.find("..") != std::string::npos || f.front() == '/') continue;
    if (hub_file_needed(f)) out.files.push_back(f);
  }
  return out;
}

HubFileIdentity parse_file_identity(const std::string& linked_etag, const std::string& etag, const std::string& linked_size,
                                    const std::string& content_length, const std::string& where) {
  HubFileIdentity out;
  out.etag = strip_etag(linked_etag);
  if (out.etag.empty()) out.etag = strip_etag(etag);
  const std::string& size_text = linked_size.empty() ? content_length : linked_size;
  static const std::regex safe_etag("^[A-Za-z0-9_\\-]{8,128}$");
  if (!std::regex_match(out.etag, safe_etag) || size_text.empty() || size_text.size() > 15 ||
      size_text.find_first_not_of("0123456789") != std::string::npos)
    fail("the hub gave no usable ETag and size for ", where);
  out.size = std::stoull(size_text);
  return out;
}

HubDownloadResult hub_download(const std::string& name, const HubOptions& o) {
  RepoId repo;
  if (!parse_repo_id(name, repo)) fail("'", name, "' is not a Hugging Face repository id (ORG/NAME[@REVISION])");
  Hub hub(o);
  // The revision's commit and files.
  const std::string api = o.endpoint + "/api/models/" + repo.org + "/" + repo.name + "/revision/" +
                          percent_encode_path(repo.revision);
  const Hub::Reply info = hub.request("GET", api, true);
  if (info.status != 200) repo_error(info, repo, o, "its file list");
  const HubListing listing = parse_hub_listing(info.body, o.endpoint, repo.id(), repo.revision);
  const std::string& commit = listing.commit;
  const std::vector<std::string>& files = listing.files;
  bool has_config = false, has_weights = false;
  for (const auto& f : files) {
    has_config |= f == "config.json";
    has_weights |= f.size() > 12 && f.compare(f.size() - 12, 12, ".safetensors") == 0;
  }
  if (!has_config || !has_weights)
    fail(repo.id(), " at revision '", repo.revision, "' has ", has_config ? "no .safetensors weights" : "no config.json",
         " (vkvlm reads Hugging Face and MLX checkpoints in safetensors)");

  const fs::path dir = fs::path(o.cache) / repo.cache_folder();
  const fs::path snapshot = dir / "snapshots" / commit;
  std::error_code ec;
  fs::create_directories(dir / "blobs", ec);
  fs::create_directories(snapshot, ec);
  if (ec) fail("cannot create ", snapshot.string(), ": ", ec.message());
  HubDownloadResult result;
  result.snapshot = snapshot.string();
  result.commit = commit;
  const fs::path blobs = fs::canonical(dir / "blobs", ec);
  // Brings one file into the snapshot (from the cache when it is there and whole).
  auto bring = [&](const std::string& f) {
    const fs::path link = snapshot / f;
    // A linked file is there (a dangling link is fetched again); a small file's blob, named by
    // its git SHA-1, is checked against its name first (no request needed). A link that leads
    // out of the cache's blobs was not made by a download: it goes (not what it points at), and
    // the file is fetched.
    if (fs::is_symlink(link, ec) && !path_inside(fs::weakly_canonical(link, ec), blobs)) fs::remove(link, ec);
    if (fs::exists(link, ec)) {
      const fs::path blob = fs::canonical(link, ec);
      const std::string named = blob.filename().string();
      if (!is_sha1(named) || check_blob(blob, fs::file_size(blob, ec), named).empty()) return;
      fs::remove(blob, ec);
    }
    // The file's identity without its body: the hub answers HEAD with a redirect for LFS files,
    // and X-Linked-Etag / X-Linked-Size give the blob's SHA-256 and size.
    const std::string url = o.endpoint + "/" + repo.org + "/" + repo.name + "/resolve/" + commit + "/" + percent_encode_path(f);
    Hub::Reply head = hub.request("HEAD", url, false);
    if (head.status >= 400) repo_error(head, repo, o, f);
    if (head.status >= 300 && head.status < 400) {
      // The hub's own redirects (a renamed repository) are followed; a redirect elsewhere is the
      // blob's storage, which the download follows.
      const std::string loc = resolve_location(split_url(head.url), head.header("Location"));
      if (split_url(loc).origin == split_url(o.endpoint).origin && head.header("X-Linked-Etag").empty())
        head = hub.request("HEAD", head.url, true);
    }
    const HubFileIdentity identity = parse_file_identity(head.header("X-Linked-Etag"), head.header("ETag"),
                                                         head.header("X-Linked-Size"), head.header("Content-Length"),
                                                         f + " of " + repo.id() + " on " + o.endpoint);
    const std::string& etag = identity.etag;
    const uint64_t size = identity.size;
    const fs::path blob = dir / "blobs" / etag;
    {
      FileLock lock(fs::path(o.cache) / ".locks" / repo.cache_folder() / (etag + ".lock"));
      // A small file's blob is checked again each time (cheap; a corrupt one, from an earlier
      // version that did not check, is downloaded anew); an LFS blob was checked when it came.
      if (fs::is_symlink(blob, ec) || fs::is_symlink(blob.string() + ".incomplete", ec)) {  // planted: never followed
        fs::remove(blob, ec);
        fs::remove(blob.string() + ".incomplete", ec);
      }
      const bool cached = fs::exists(blob, ec) && fs::file_size(blob, ec) == size &&
                          (!is_sha1(etag) || check_blob(blob, size, etag).empty());
      if (!cached) {
        result.bytes += fetch_blob(hub, url, blob, size, etag, f);
        result.fetched.push_back(f);
      }
    }
    fs::create_directories(link.parent_path(), ec);
    fs::path target = fs::path("..") / ".." / "blobs" / etag;
    for (auto p = fs::path(f).parent_path(); !p.empty(); p = p.parent_path()) target = fs::path("..") / target;
    link_atomically(target, link);  // replacing a dangling link from an interrupted run
    };
  // The configs, tokenizer and index first; then the weights the index names (or the one
  // model.safetensors), not every *.safetensors the repository happens to hold.
  auto is_weights = [](const std::string& f) { return f.size() > 12 && f.compare(f.size() - 12, 12, ".safetensors") == 0; };
  std::vector<std::string> weights;
  for (const auto& f : files) {
    if (is_weights(f)) weights.push_back(f);
    else bring(f);
  }
  for (const auto& f : weights_to_fetch(weights, snapshot, repo.id())) bring(f);
  if (!is_commit_hash(repo.revision) || repo.revision != commit) {
    fs::create_directories(dir / "refs" / fs::path(repo.revision).parent_path(), ec);
    write_file_atomically(dir / "refs" / repo.revision, commit);  // readers resolving it offline never see it empty
  }
  return result;
}

}  // namespace vkvlm
