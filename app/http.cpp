#include "app/http.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

namespace vkvlm::http {
namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string trim(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && (s[a] == ' ' || s[a] == '\t')) ++a;
  while (b > a && (s[b - 1] == ' ' || s[b - 1] == '\t')) --b;
  return s.substr(a, b - a);
}

bool is_token_char(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || std::strchr("!#$%&'*+-.^_`|~", c) != nullptr;
}

const char* reason(int status) {
  switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 413: return "Payload Too Large";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 499: return "Client Closed Request";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
    default: return "Status";
  }
}

// Writes all of data to a non-blocking socket, waiting at most `seconds` for each stall.
bool write_all(int fd, const char* data, size_t n, double seconds) {
  while (n > 0) {
    const ssize_t w = ::send(fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0) {
      data += w;
      n -= size_t(w);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd p{fd, POLLOUT, 0};
      const int r = ::poll(&p, 1, int(seconds * 1000));
      if (r <= 0 || (p.revents & (POLLERR | POLLHUP | POLLNVAL))) return false;
      continue;
    }
    return false;
  }
  return true;
}

bool peer_gone(int fd) {
  pollfd p{fd, short(POLLIN | POLLRDHUP), 0};
  if (::poll(&p, 1, 0) < 0) return true;
  if (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) return true;
  if (p.revents & POLLIN) {
    char c;
    const ssize_t r = ::recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    return r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
  }
  return false;
}

}  // namespace

std::string Request::header(const std::string& name) const {
  const std::string n = lower(name);
  for (auto& [k, v] : headers)
    if (k == n) return v;
  return "";
}

// ---------------------------------------------------------------------------------------------
// Request parsing

void RequestParser::reset() {
  phase_ = Phase::Head;
  req_ = Request();
  remaining_ = 0;
  chunked_ = wants_continue_ = false;
  error_status_ = 0;
  error_.clear();
}

RequestParser::State RequestParser::fail(int status, std::string message) {
  error_status_ = status;
  error_ = std::move(message);
  return State::Error;
}

RequestParser::State RequestParser::feed(std::string& buf, Request& out) {
  for (;;) {
    switch (phase_) {
      case Phase::Head: {
        const size_t end = buf.find("\r\n\r\n");
        if (end == std::string::npos) {
          if (buf.size() > limits_.max_head_bytes) return fail(431, "the request's headers are larger than the server accepts");
          return State::NeedMore;
        }
        if (end + 4 > limits_.max_head_bytes) return fail(431, "the request's headers are larger than the server accepts");
        const std::string head = buf.substr(0, end);
        buf.erase(0, end + 4);
        size_t line_end = head.find("\r\n");
        const std::string line = head.substr(0, line_end);
        // METHOD SP request-target SP HTTP-version
        const size_t s1 = line.find(' '), s2 = s1 == std::string::npos ? s1 : line.find(' ', s1 + 1);
        if (s1 == std::string::npos || s2 == std::string::npos || line.find(' ', s2 + 1) != std::string::npos)
          return fail(400, "the request line is malformed");
        req_.method = line.substr(0, s1);
        req_.target = line.substr(s1 + 1, s2 - s1 - 1);
        req_.version = line.substr(s2 + 1);
        if (req_.method.empty() || !std::all_of(req_.method.begin(), req_.method.end(), is_token_char))
          return fail(400, "the request method is malformed");
        if (req_.version != "HTTP/1.1" && req_.version != "HTTP/1.0") return fail(505, "only HTTP/1.0 and HTTP/1.1 are served");
        if (req_.target.empty() || req_.target[0] != '/') return fail(400, "the request target must be a path");
        for (char c : req_.target)
          if (static_cast<unsigned char>(c) <= 32 || c == 127) return fail(400, "the request target holds control characters");
        const size_t q = req_.target.find('?');
        req_.path = req_.target.substr(0, q);
        req_.query = q == std::string::npos ? "" : req_.target.substr(q + 1);
        // Headers.
        std::string content_length;
        bool has_length = false;
        std::string transfer_encoding;
        while (line_end != std::string::npos) {
          const size_t start = line_end + 2;
          line_end = head.find("\r\n", start);
          const std::string h = head.substr(start, line_end == std::string::npos ? std::string::npos : line_end - start);
          if (h.empty()) continue;
          if (h[0] == ' ' || h[0] == '\t') return fail(400, "folded header lines are not accepted");
          const size_t colon = h.find(':');
          if (colon == std::string::npos || colon == 0) return fail(400, "a header line has no name");
          const std::string name = h.substr(0, colon);
          if (!std::all_of(name.begin(), name.end(), is_token_char)) return fail(400, "a header name is malformed");
          const std::string value = trim(h.substr(colon + 1));
          for (char c : value)
            if ((static_cast<unsigned char>(c) < 32 && c != '\t') || c == 127) return fail(400, "a header value holds control characters");
          if (req_.headers.size() >= limits_.max_headers) return fail(431, "the request has too many headers");
          const std::string key = lower(name);
          if (key == "content-length") {
            if (has_length && value != content_length) return fail(400, "the request has two different Content-Length headers");
            has_length = true;
            content_length = value;
          } else if (key == "transfer-encoding") {
            transfer_encoding += (transfer_encoding.empty() ? "" : ",") + lower(value);
          } else if (key == "expect") {
            if (lower(value) != "100-continue") return fail(400, "the Expect header asks for something other than 100-continue");
            wants_continue_ = true;
          }
          req_.headers.emplace_back(key, value);
        }
        if (!transfer_encoding.empty()) {
          // Both framings at once is how requests are smuggled; only plain chunked is decoded.
          if (has_length) return fail(400, "the request has both Content-Length and Transfer-Encoding");
          if (trim(transfer_encoding) != "chunked") return fail(501, "only the chunked transfer coding is supported");
          chunked_ = true;
          phase_ = Phase::ChunkSize;
        } else if (has_length) {
          if (content_length.empty() || content_length.size() > 18 ||
              !std::all_of(content_length.begin(), content_length.end(), [](char c) { return c >= '0' && c <= '9'; }))
            return fail(400, "the Content-Length header is not a number");
          remaining_ = std::stoull(content_length);
          if (remaining_ > limits_.max_body_bytes) return fail(413, "the request body is larger than the server accepts");
          phase_ = Phase::Body;
        } else {
          out = std::move(req_);
          reset();
          return State::Done;
        }
        break;
      }
      case Phase::Body: {
        const size_t take = size_t(std::min<uint64_t>(remaining_, buf.size()));
        req_.body.append(buf, 0, take);
        buf.erase(0, take);
        remaining_ -= take;
        if (remaining_ > 0) return State::NeedMore;
        out = std::move(req_);
        reset();
        return State::Done;
      }
      case Phase::ChunkSize: {
        const size_t eol = buf.find("\r\n");
        if (eol == std::string::npos) {
          if (buf.size() > 1024) return fail(400, "a chunk size line is too long");
          return State::NeedMore;
        }
        std::string size = buf.substr(0, eol);
        buf.erase(0, eol + 2);
        if (size_t semi = size.find(';'); semi != std::string::npos) size.resize(semi);  // chunk extensions
        size = trim(size);
        if (size.empty() || size.size() > 15 || !std::all_of(size.begin(), size.end(), [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); }))
          return fail(400, "a chunk size is not a hexadecimal number");
        remaining_ = std::stoull(size, nullptr, 16);
        if (req_.body.size() + remaining_ > limits_.max_body_bytes) return fail(413, "the request body is larger than the server accepts");
        phase_ = remaining_ == 0 ? Phase::Trailers : Phase::ChunkData;
        break;
      }
      case Phase::ChunkData: {
        const size_t take = size_t(std::min<uint64_t>(remaining_, buf.size()));
        req_.body.append(buf, 0, take);
        buf.erase(0, take);
        remaining_ -= take;
        if (remaining_ > 0) return State::NeedMore;
        phase_ = Phase::ChunkDataEnd;
        break;
      }
      case Phase::ChunkDataEnd: {
        if (buf.size() < 2) return State::NeedMore;
        if (buf.compare(0, 2, "\r\n") != 0) return fail(400, "a chunk does not end where its size says");
        buf.erase(0, 2);
        phase_ = Phase::ChunkSize;
        break;
      }
      case Phase::Trailers: {
        const size_t eol = buf.find("\r\n");
        if (eol == std::string::npos) {
          if (buf.size() > limits_.max_head_bytes) return fail(431, "the request's trailers are too large");
          return State::NeedMore;
        }
        const bool last = eol == 0;
        buf.erase(0, eol + 2);
        if (!last) continue;  // trailer fields are ignored
        out = std::move(req_);
        reset();
        return State::Done;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The server

namespace {

struct Conn {
  int fd = -1;
  std::string in;  // received and not yet parsed
  std::unique_ptr<RequestParser> parser;
  double deadline = 0;
  bool in_request = false;  // bytes of a request have arrived
  bool continue_sent = false;
  bool draining = false;    // refused: what the client still sends is read and dropped, then it closes
  double drain_until = 0;   // draining: closed by then even if the client goes on sending
  int requests = 0;
  std::string remote;
  uint64_t reserved = 0;                    // of Limits::reserve, for `in` and the parser's body
  std::function<void(uint64_t)> release;    // Limits::release
  // Gives back what is reserved for bytes no longer held.
  void release_all() {
    if (reserved && release) release(reserved);
    reserved = 0;
  }
  ~Conn() {
    release_all();
    if (fd >= 0) ::close(fd);
  }
};

class ConnView : public Stream {
 public:
  ConnView(int fd, double write_seconds) : fd_(fd), write_seconds_(write_seconds) {}
  bool client_gone() const override { return broken_ || peer_gone(fd_); }
  bool write(const std::string& data) override {
    if (broken_) return false;
    if (data.empty()) return true;
    char size[32];
    const int n = std::snprintf(size, sizeof(size), "%zx\r\n", data.size());
    std::string chunk(size, size_t(n));
    chunk += data;
    chunk += "\r\n";
    if (!write_all(fd_, chunk.data(), chunk.size(), write_seconds_)) broken_ = true;
    return !broken_;
  }
  bool finish() {
    if (!broken_ && !write_all(fd_, "0\r\n\r\n", 5, write_seconds_)) broken_ = true;
    return !broken_;
  }
  bool broken() const { return broken_; }
  void set_broken() { broken_ = true; }

 private:
  int fd_;
  double write_seconds_;
  bool broken_ = false;
};

}  // namespace

struct Server::Impl {
  Limits limits;
  ErrorBody error_body;
  std::map<std::string, std::map<std::string, Handler>> routes;         // path -> method -> handler
  std::map<std::string, std::map<std::string, Handler>> prefix_routes;  // prefix -> method -> handler
  int listen_fd = -1;
  int wake[2] = {-1, -1};
  std::atomic<bool> stop{false};
  std::atomic<int> open{0};

  std::mutex m;
  std::condition_variable cv;
  std::deque<std::pair<std::unique_ptr<Conn>, Request>> work;  // complete requests
  std::vector<std::unique_ptr<Conn>> returned;                 // kept-alive connections back from workers

  void wake_reader() {
    const char c = 1;
    (void)!::write(wake[1], &c, 1);
  }

  std::string head(int status, const std::string& content_type, const std::vector<std::pair<std::string, std::string>>& headers,
                   const std::string* length_of, bool keep_alive) {
    std::string h = "HTTP/1.1 " + std::to_string(status) + " " + reason(status) + "\r\n";
    h += "Content-Type: " + content_type + "\r\n";
    for (auto& [k, v] : headers) h += k + ": " + v + "\r\n";
    h += length_of ? "Content-Length: " + std::to_string(length_of->size()) + "\r\n" : "Transfer-Encoding: chunked\r\n";
    h += keep_alive ? "Connection: keep-alive\r\n\r\n" : "Connection: close\r\n\r\n";
    return h;
  }

  // A refusal written by the reader thread: small, best effort, then the connection closes.
  void refuse(Conn& c, int status, const std::string& message) {
    const std::string body = error_body(status, message);
    const std::string r = head(status, "application/json", {}, &body, false) + body;
    write_all(c.fd, r.data(), r.size(), 0.2);
  }

  // Refuses a request the client is still sending: closing with its bytes unread would reset the
  // connection and lose the answer, so what arrives is read and dropped until the client pauses
  // for 2 s (or, at the most, for 15 s), as servers do in a lingering close.
  void refuse_and_drain(Conn& c, int status, const std::string& message) {
    refuse(c, status, message);
    ::shutdown(c.fd, SHUT_WR);
    c.draining = true;
    c.in.clear();
    c.drain_until = now_seconds() + 15.0;
    c.deadline = now_seconds() + 2.0;
  }

  void serve(std::unique_ptr<Conn> c, Request req) {
    Response res;
    ConnView view(c->fd, limits.write_seconds);
    // The methods of the route the path takes: an exact one, else the longest prefix that holds it.
    const std::map<std::string, Handler>* methods = nullptr;
    if (auto exact = routes.find(req.path); exact != routes.end()) methods = &exact->second;
    for (auto it = prefix_routes.rbegin(); !methods && it != prefix_routes.rend(); ++it)
      if (req.path.size() > it->first.size() && req.path.compare(0, it->first.size(), it->first) == 0) methods = &it->second;
    if (!limits.cors_origin.empty() && req.method == "OPTIONS" && methods) {
      // A browser's preflight: what this path allows, without authentication (it carries none).
      std::string allowed;
      for (const auto& [m, h] : *methods) allowed += m + ", ";
      res.status = 204;
      res.headers.emplace_back("Access-Control-Allow-Methods", allowed + "OPTIONS");
      res.headers.emplace_back("Access-Control-Allow-Headers", "Authorization, Content-Type");
      res.headers.emplace_back("Access-Control-Max-Age", "600");
      if (limits.cors_origin != "*") res.headers.emplace_back("Vary", "Origin");
    } else if (!methods) {
      res.status = 404;
      res.body = error_body(404, "no such endpoint");
    } else if (auto h = methods->find(req.method); h == methods->end()) {
      res.status = 405;
      res.body = error_body(405, "method not allowed");
    } else {
      try {
        h->second(req, res, view);
      } catch (const std::exception& e) {
        res = Response();
        res.status = 500;
        res.body = error_body(500, e.what());
      }
    }
    if (!limits.cors_origin.empty()) res.headers.emplace_back("Access-Control-Allow-Origin", limits.cors_origin);
    // The request's bytes are done with: their memory goes back before the answer does, so a
    // client that has its answer sees the memory free.
    std::string().swap(req.body);
    req.memory.reset();
    const std::string conn_header = lower(req.header("connection"));
    bool keep_alive = req.version == "HTTP/1.1" ? conn_header != "close" : conn_header == "keep-alive";
    keep_alive = keep_alive && !stop && ++c->requests < limits.max_requests_per_connection;
    if (res.stream) {
      const std::string h = head(res.status, res.content_type, res.headers, nullptr, keep_alive);
      if (!write_all(c->fd, h.data(), h.size(), limits.write_seconds)) view.set_broken();
      if (!view.broken()) {
        try {
          res.stream(view);
        } catch (const std::exception&) {
          view.set_broken();  // a stream cannot change its status any more; the connection ends
        }
      }
      // The terminating chunk ends the body whatever the connection does next.
      const bool finished = view.finish();
      keep_alive = keep_alive && finished;
    } else {
      const std::string r = head(res.status, res.content_type, res.headers, &res.body, keep_alive) + res.body;
      keep_alive = write_all(c->fd, r.data(), r.size(), limits.write_seconds) && keep_alive;
    }
    if (!keep_alive) {
      c.reset();
      --open;
      return;
    }
    std::lock_guard<std::mutex> l(m);
    returned.push_back(std::move(c));
    wake_reader();
  }

  void worker() {
    for (;;) {
      std::unique_lock<std::mutex> l(m);
      cv.wait(l, [&] { return stop || !work.empty(); });
      if (work.empty()) return;
      auto [c, req] = std::move(work.front());
      work.pop_front();
      l.unlock();
      serve(std::move(c), std::move(req));
    }
  }

  // Parses what a connection has received: hands a complete request to the workers (true: the
  // connection left the reader), answers a bad one and closes it.
  bool advance(std::unique_ptr<Conn>& c, std::vector<std::unique_ptr<Conn>>& closed) {
    if (!c->in.empty() && !c->in_request) {
      c->in_request = true;
      c->deadline = now_seconds() + limits.request_seconds;
    }
    Request req;
    switch (c->parser->feed(c->in, req)) {
      case RequestParser::State::NeedMore:
        if (c->parser->wants_continue() && !c->continue_sent) {
          c->continue_sent = true;
          write_all(c->fd, "HTTP/1.1 100 Continue\r\n\r\n", 25, 1.0);
        }
        return false;
      case RequestParser::State::Error:
        refuse_and_drain(*c, c->parser->error_status(), c->parser->error_message());
        return false;
      case RequestParser::State::Done: {
        req.remote = c->remote;
        c->in_request = false;
        c->continue_sent = false;
        // What was reserved for its bytes goes with the request, until its handler returns.
        if (c->reserved && limits.release) {
          const uint64_t bytes = c->reserved;
          auto release = limits.release;
          req.memory = std::shared_ptr<void>(nullptr, [release, bytes](void*) { release(bytes); });
          c->reserved = 0;
        }
        std::lock_guard<std::mutex> l(m);
        work.emplace_back(std::move(c), std::move(req));
        cv.notify_one();
        return true;
      }
    }
    return false;
  }

  void reader() {
    std::vector<std::unique_ptr<Conn>> conns;
    std::vector<pollfd> fds;
    char buf[65536];
    while (!stop) {
      {
        std::lock_guard<std::mutex> l(m);
        for (auto& c : returned) {
          c->deadline = now_seconds() + limits.idle_seconds;
          conns.push_back(std::move(c));
        }
        returned.clear();
      }
      std::vector<std::unique_ptr<Conn>> closed;
      // Requests already buffered (pipelined, or read with the previous one).
      for (auto& c : conns)
        if (c && !c->draining && !c->in.empty()) advance(c, closed);
      const double now = now_seconds();
      double next = now + 1.0;
      for (auto& c : conns) {
        if (!c) continue;
        if (c->deadline <= now) {
          if (c->in_request && !c->draining) refuse(*c, 408, "the request did not arrive in time");
          closed.push_back(std::move(c));
          continue;
        }
        next = std::min(next, c->deadline);
      }
      open -= int(closed.size());
      closed.clear();
      conns.erase(std::remove(conns.begin(), conns.end(), nullptr), conns.end());
      fds.clear();
      fds.push_back({listen_fd, POLLIN, 0});
      fds.push_back({wake[0], POLLIN, 0});
      for (auto& c : conns) fds.push_back({c->fd, POLLIN, 0});
      const int timeout = std::max(0, int((next - now) * 1000) + 1);
      if (::poll(fds.data(), fds.size(), timeout) < 0 && errno != EINTR) break;
      if (fds[1].revents & POLLIN) {
        while (::read(wake[0], buf, sizeof(buf)) > 0) {
        }
      }
      if (fds[0].revents & POLLIN) accept_all(conns);
      for (size_t i = 2; i < fds.size(); ++i) {
        auto& c = conns[i - 2];
        if (!c || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        const ssize_t n = ::recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) continue;
        if (n <= 0) {
          closed.push_back(std::move(c));
          continue;
        }
        if (c->draining) {
          c->deadline = std::min(now_seconds() + 2.0, c->drain_until);
          continue;
        }
        c->in.append(buf, size_t(n));
        if (!reserve_arrived(*c)) continue;
        advance(c, closed);
      }
      open -= int(closed.size());
      conns.erase(std::remove(conns.begin(), conns.end(), nullptr), conns.end());
    }
    open -= int(conns.size());
  }

  // Reserves memory for what a connection holds now (Limits::reserve); false when it does not fit,
  // and then the request is refused with 503 (the server makes the budget hold the largest body).
  bool reserve_arrived(Conn& c) {
    if (!limits.reserve) return true;
    // Heads are bounded by max_head_bytes each; what a body brings is reserved.
    // (Capacities: a growing buffer holds up to twice what it has received.)
    const uint64_t holds = c.parser->in_body() ? c.in.capacity() + c.parser->held_bytes() : 0;
    if (holds <= c.reserved) return true;
    if (limits.reserve(holds - c.reserved)) {
      c.reserved = holds;
      return true;
    }
    c.parser->reset();
    c.release_all();
    refuse_and_drain(c, 503, "the server is receiving more request bytes at once than it can hold; retry later");
    return false;
  }

  void accept_all(std::vector<std::unique_ptr<Conn>>& conns) {
    for (;;) {
      sockaddr_storage addr{};
      socklen_t len = sizeof(addr);
      const int fd = ::accept4(listen_fd, reinterpret_cast<sockaddr*>(&addr), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;
      auto c = std::make_unique<Conn>();
      c->fd = fd;
      c->parser = std::make_unique<RequestParser>(limits);
      c->release = limits.release;
      c->deadline = now_seconds() + limits.idle_seconds;
      char host[NI_MAXHOST] = "";
      if (::getnameinfo(reinterpret_cast<sockaddr*>(&addr), len, host, sizeof(host), nullptr, 0, NI_NUMERICHOST) == 0) c->remote = host;
      const int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      if (open >= limits.max_connections) {
        refuse(*c, 503, "the server has too many open connections; retry later");
        continue;
      }
      ++open;
      conns.push_back(std::move(c));
    }
  }
};

Server::Server(Limits limits, ErrorBody error_body) : impl_(std::make_unique<Impl>()) {
  impl_->limits = limits;
  impl_->error_body = std::move(error_body);
  if (::pipe2(impl_->wake, O_NONBLOCK | O_CLOEXEC) != 0) throw std::runtime_error("cannot create the server's wake pipe");
}

Server::~Server() {
  if (impl_->listen_fd >= 0) ::close(impl_->listen_fd);
  for (int fd : impl_->wake)
    if (fd >= 0) ::close(fd);
}

void Server::route(const std::string& method, const std::string& path, Handler handler) {
  impl_->routes[path][method] = std::move(handler);
}

void Server::route_prefix(const std::string& method, const std::string& prefix, Handler handler) {
  impl_->prefix_routes[prefix][method] = std::move(handler);
}

bool Server::bind(const std::string& host, int port, std::string* why) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  const std::string p = std::to_string(port);
  if (int e = ::getaddrinfo(host.c_str(), p.c_str(), &hints, &res); e != 0) {
    if (why) *why = std::string("cannot resolve ") + host + ": " + gai_strerror(e);
    return false;
  }
  int fd = -1;
  std::string last = "no address";
  for (addrinfo* a = res; a; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, 512) == 0) break;
    last = std::strerror(errno);
    ::close(fd);
    fd = -1;
  }
  ::freeaddrinfo(res);
  if (fd < 0) {
    if (why) *why = last;
    return false;
  }
  impl_->listen_fd = fd;
  return true;
}

void Server::run() {
  std::vector<std::thread> workers;
  for (int i = 0; i < impl_->limits.workers; ++i) workers.emplace_back([this] { impl_->worker(); });
  impl_->reader();
  {
    std::lock_guard<std::mutex> l(impl_->m);
    impl_->stop = true;
  }
  impl_->cv.notify_all();
  for (auto& t : workers) t.join();
  std::lock_guard<std::mutex> l(impl_->m);
  impl_->work.clear();
  impl_->returned.clear();
}

void Server::stop() {
  impl_->stop = true;
  impl_->cv.notify_all();
  impl_->wake_reader();
}

bool Server::stopping() const { return impl_->stop; }

}  // namespace vkvlm::http
