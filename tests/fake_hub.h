#pragma once
// A local stand-in for the Hugging Face hub, on 127.0.0.1, for the download tests (nothing in the
// tests reaches the internet). It answers the endpoints huggingface_hub uses, as the hub does:
//   GET  /api/models/ORG/NAME/revision/REV   {"sha": COMMIT, "siblings": [{"rfilename": ...}]}
//   HEAD/GET /ORG/NAME/resolve/REV/FILE       small files: 200 with an ETag; *.safetensors (LFS):
//                                             302 to /cdn/SHA256 with X-Linked-Etag (the SHA-256)
//                                             and X-Linked-Size
//   GET  /cdn/SHA256                          the blob, honouring Range (206, by httplib)
// and X-Repo-Commit on every file. Repositories come from folders; one can require a token (401
// without one, 403 with another), announce a wrong checksum, or drop the connection part way
// through its first weight download. Unknown repositories and revisions are 404 with the hub's
// X-Error-Code.
#include <openssl/evp.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <httplib.h>
#include <nlohmann/json.hpp>

namespace vkvlm::test {

inline std::string digest_hex(const std::string& data, const EVP_MD* md) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), out, &len, md, nullptr);
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (unsigned i = 0; i < len; ++i) s += std::string(1, hex[out[i] >> 4]) + hex[out[i] & 15];
  return s;
}

inline std::string sha256_hex(const std::string& data) { return digest_hex(data, EVP_sha256()); }
// A small file's ETag on the hub: git's SHA-1 of the blob.
inline std::string git_blob_sha1(const std::string& data) {
  return digest_hex("blob " + std::to_string(data.size()) + std::string(1, '\0') + data, EVP_sha1());
}

class FakeHub {
 public:
  struct Repo {
    std::string commit;
    std::map<std::string, std::string> files;  // path -> contents
    std::string token;                         // required when set
    bool wrong_checksum = false;               // weight files announce another SHA-256
    int64_t drop_after = -1;                   // the first weight download stops after this many bytes
    bool html_listing = false;                 // the file list comes back as a web page (a captive portal)
    bool no_etag = false;                      // files come without ETag or size (a proxy that strips them)
    std::set<std::string> fail_once;           // small files whose first GET is a 500 with an error page
    bool gzip_listing = false;                 // the file list comes gzip-encoded, though nobody asked
    int64_t listing_padding = 0;               // the file list comes with this many bytes of spaces after it
    bool relative_redirects = false;           // small files first answer 302 to a relative Location
    std::string raw_listing;                   // the file list answered verbatim (a JSON of another shape)
    int drip_ms = 0;                           // the file list and small files come a byte every drip_ms
    uint64_t announced_size = 0;               // weight files announce this size instead of their own
  };

  FakeHub() {
    server_.Get(R"(/api/models/([^/]+)/([^/]+)/revision/(.+))", [this](const httplib::Request& req, httplib::Response& res) {
      ++requests_;
      const Repo* r = find(req, res, req.matches[1].str() + "/" + req.matches[2].str());
      if (!r) return;
      const std::string rev = req.matches[3];
      if (rev != "main" && rev != r->commit) return not_found(res, "RevisionNotFound");
      if (r->html_listing) return res.set_content("<html><body>Sign in to the network</body></html>", "text/html");
      if (!r->raw_listing.empty()) return res.set_content(r->raw_listing, "application/json");
      if (r->gzip_listing) {  // a small gzip stream that would inflate to far more (a bomb)
        res.set_header("Content-Encoding", "gzip");
        return res.set_content(std::string("\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff", 10) + std::string(4096, '\0'),
                               "application/json");
      }
      if (r->listing_padding > 0) {  // an answer that goes on and on
        const int64_t pad = r->listing_padding;
        res.set_content_provider(size_t(pad), "application/json", [](size_t offset, size_t length, httplib::DataSink& sink) {
          const std::string spaces(std::min<size_t>(length, 1 << 20), ' ');
          sink.write(spaces.data(), spaces.size());
          return true;
        });
        return;
      }
      nlohmann::json siblings = nlohmann::json::array();
      for (const auto& [path, data] : r->files) siblings.push_back({{"rfilename", path}});
      send(res, nlohmann::json{{"id", req.matches[1].str() + "/" + req.matches[2].str()}, {"sha", r->commit},
                               {"siblings", siblings}}.dump(),
           "application/json", r->drip_ms);
    });
    server_.Get(R"(/([^/]+)/([^/]+)/resolve/([^/]+)/(.+))", [this](const httplib::Request& req, httplib::Response& res) {
      ++requests_;
      const Repo* r = find(req, res, req.matches[1].str() + "/" + req.matches[2].str());
      if (!r) return;
      const std::string rev = req.matches[3], path = req.matches[4];
      if (rev != "main" && rev != r->commit) return not_found(res, "RevisionNotFound");
      auto it = r->files.find(path);
      if (it == r->files.end()) return not_found(res, "EntryNotFound");
      res.set_header("X-Repo-Commit", r->commit);
      const std::string sha = sha256_hex(it->second);
      if (path.size() > 12 && path.compare(path.size() - 12, 12, ".safetensors") == 0) {
        res.status = 302;
        res.set_header("Location", "/cdn/" + sha);
        res.set_header("X-Linked-Etag", "\"" + (r->wrong_checksum ? sha256_hex(it->second + "x") : sha) + "\"");
        res.set_header("X-Linked-Size", std::to_string(r->announced_size ? r->announced_size : it->second.size()));
        res.set_header("ETag", "\"" + sha.substr(0, 40) + "\"");
        std::lock_guard<std::mutex> l(m_);
        blobs_.emplace(sha, Blob{it->second, r->drop_after});  // a HEAD again does not re-arm the drop
        return;
      }
      if (r->relative_redirects && !req.has_param("moved")) {  // to the same file, by a relative URL
        res.status = 302;
        return res.set_header("Location", path.substr(path.rfind('/') + 1) + "?moved=1");
      }
      if (!r->no_etag) res.set_header("ETag", "\"" + git_blob_sha1(it->second) + "\"");
      {
        std::lock_guard<std::mutex> l(m_);
        if (req.method == "GET" && r->fail_once.count(path) && !failed_.count(path)) {
          failed_.insert(path);  // a transient server error, with a body that is not the file
          res.status = 500;
          return res.set_content("Internal Server Error: try again later", "text/plain");
        }
      }
      send(res, it->second, "application/octet-stream", r->drip_ms);
    });
    server_.Get(R"(/cdn/([0-9a-f]{64}))", [this](const httplib::Request& req, httplib::Response& res) {
      ++requests_;
      Blob b;
      {
        std::lock_guard<std::mutex> l(m_);
        auto it = blobs_.find(req.matches[1]);
        if (it == blobs_.end()) return not_found(res, "EntryNotFound");
        b = it->second;
        it->second.drop_after = -1;  // only the first download is cut
      }
      // httplib answers a Range request itself (206 and Content-Range) from the provider below.
      if (!req.get_header_value("Range").empty()) ++ranged_;
      auto data = std::make_shared<std::string>(b.data);
      const int64_t drop = b.drop_after;
      res.set_content_provider(data->size(), "application/octet-stream",
                               [data, drop](size_t offset, size_t length, httplib::DataSink& sink) {
                                 if (drop >= 0 && offset >= size_t(drop)) return false;  // the connection drops
                                 size_t n = std::min<size_t>(length, 64 << 10);
                                 if (drop >= 0) n = std::min(n, size_t(drop) - offset);
                                 sink.write(data->data() + offset, n);
                                 return true;
                               });
    });
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    while (!server_.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ~FakeHub() {
    server_.stop();
    thread_.join();
  }

  std::string endpoint() const { return "http://127.0.0.1:" + std::to_string(port_); }
  // A repository holding a folder's files.
  Repo& add(const std::string& id, const std::filesystem::path& folder, const std::string& commit) {
    Repo& r = repos_[id];
    r.commit = commit;
    for (const auto& e : std::filesystem::recursive_directory_iterator(folder)) {
      if (!e.is_regular_file()) continue;
      std::ifstream in(e.path(), std::ios::binary);
      r.files[std::filesystem::relative(e.path(), folder).string()] = std::string((std::istreambuf_iterator<char>(in)), {});
    }
    return r;
  }
  Repo& repo(const std::string& id) { return repos_.at(id); }
  int requests() const { return requests_; }
  int ranged_requests() const { return ranged_; }

 private:
  struct Blob {
    std::string data;
    int64_t drop_after = -1;
  };
  const Repo* find(const httplib::Request& req, httplib::Response& res, const std::string& id) {
    auto it = repos_.find(id);
    if (it == repos_.end()) {
      not_found(res, "RepoNotFound");
      return nullptr;
    }
    if (!it->second.token.empty()) {
      const std::string auth = req.get_header_value("Authorization");
      if (auth.empty()) return unauthorized(res, 401), nullptr;
      if (auth != "Bearer " + it->second.token) return unauthorized(res, 403), nullptr;
    }
    return &it->second;
  }
  // A body, all at once or (drip_ms > 0) a byte every drip_ms.
  static void send(httplib::Response& res, const std::string& body, const char* type, int drip_ms) {
    if (drip_ms <= 0) return res.set_content(body, type);
    auto data = std::make_shared<std::string>(body);
    res.set_content_provider(data->size(), type, [data, drip_ms](size_t offset, size_t, httplib::DataSink& sink) {
      std::this_thread::sleep_for(std::chrono::milliseconds(drip_ms));
      return sink.write(data->data() + offset, 1);
    });
  }
  static void not_found(httplib::Response& res, const char* code) {
    res.status = 404;
    res.set_header("X-Error-Code", code);
    res.set_content("{\"error\": \"not found\"}", "application/json");
  }
  static void unauthorized(httplib::Response& res, int status) {
    res.status = status;
    res.set_header("X-Error-Code", "GatedRepo");
    res.set_header("X-Error-Message", "Access to model is restricted.");
    res.set_content("{\"error\": \"gated\"}", "application/json");
  }

  httplib::Server server_;
  std::thread thread_;
  int port_ = 0;
  std::map<std::string, Repo> repos_;
  std::mutex m_;
  std::map<std::string, Blob> blobs_;
  std::set<std::string> failed_;  // fail_once files already failed
  std::atomic<int> requests_{0}, ranged_{0};
};

}  // namespace vkvlm::test
