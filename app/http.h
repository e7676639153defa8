#pragma once
// A small HTTP/1.1 server for `vkvlm serve`, built for a server anyone can reach: one thread reads
// every connection's requests with poll() (so a slow client costs a file descriptor, not a
// thread), each request's head and body must arrive within a deadline and a size limit whatever
// their framing (Content-Length or chunked), complete requests go to a pool of workers, and a
// handler can notice at any time that its client has gone.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace vkvlm::http {

struct Request {
  std::string method, target, path, query, version;
  std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased, in order
  std::string body;
  std::string remote;  // the client's address, for logs
  std::shared_ptr<void> memory;  // the bytes reserved for it as it arrived (Limits::reserve), until it is done

  // The first header of that (case-insensitive) name, or "".
  std::string header(const std::string& name) const;
};

// A connection as a handler sees it.
class Connection {
 public:
  virtual ~Connection() = default;
  // Whether the client has closed its side (or the connection broke); never blocks.
  virtual bool client_gone() const = 0;
};

// A streamed response body (chunked transfer encoding).
class Stream : public Connection {
 public:
  // Sends one piece; false once the client is gone or a write blocked past the limit.
  virtual bool write(const std::string& data) = 0;
};

struct Response {
  int status = 200;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
  // When set, the body is streamed: the function writes it piece by piece (after the status
  // line and headers have gone out).
  std::function<void(Stream&)> stream;
};

using Handler = std::function<void(const Request&, Response&, Connection&)>;

struct Limits {
  size_t max_head_bytes = 16 << 10;     // request line and headers
  size_t max_headers = 100;
  size_t max_body_bytes = 64 << 20;     // after chunked decoding
  double request_seconds = 30;          // to receive one request's head and body, once it has begun
  double idle_seconds = 15;             // a kept-alive connection waits this long for the next request
  double write_seconds = 30;            // a write blocked longer closes the connection
  int workers = 24;                     // requests handled at once
  int max_connections = 512;            // open connections; more are answered 503 and closed
  int max_requests_per_connection = 1000;
  // CORS: when set ("*" or one origin), every answer allows that origin and preflight requests
  // (OPTIONS) are answered 204 with the methods and headers the API takes.
  std::string cors_origin;
  // Memory for the bytes of requests as they arrive (each connection's buffer and the body parsed
  // so far), held until the request's handler returns: `reserve` says whether that many more fit
  // (the connection that does not fit is answered 503),
  // `release` gives them back. Unset: only the limits above bound them.
  std::function<bool(uint64_t bytes)> reserve;
  std::function<void(uint64_t bytes)> release;
};

// Answers a request the server refuses before any handler runs (413, 400, 404, 405, 503).
using ErrorBody = std::function<std::string(int status, const std::string& message)>;

class Server {
 public:
  Server(Limits limits, ErrorBody error_body);
  ~Server();

  // Routes an exact path; requests for a known path with another method get 405.
  void route(const std::string& method, const std::string& path, Handler handler);
  // Routes every path under `prefix` (ending in '/', a path segment more at least) an exact route
  // does not take; the handler reads the rest from Request::path.
  void route_prefix(const std::string& method, const std::string& prefix, Handler handler);
  // Listens on host:port; false (with a reason in *why) when it cannot.
  bool bind(const std::string& host, int port, std::string* why);
  // Serves until stop() is called (from any thread, or a signal watcher).
  void run();
  void stop();
  bool stopping() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Request parsing, exposed for the fuzzer: feeds bytes, reports a complete request, a need for
// more bytes, or an error status with a message.
class RequestParser {
 public:
  explicit RequestParser(const Limits& limits) : limits_(limits) {}
  enum class State { NeedMore, Done, Error };
  // Consumes from `buffer` (what it used is erased); `request` is filled when Done.
  State feed(std::string& buffer, Request& request);
  int error_status() const { return error_status_; }
  const std::string& error_message() const { return error_; }
  // Whether the client asked to be told to send its body (Expect: 100-continue).
  bool wants_continue() const { return wants_continue_; }
  // Bytes of memory the request holds so far (its body's buffer).
  size_t held_bytes() const { return req_.body.capacity(); }
  bool in_body() const { return phase_ != Phase::Head; }
  void reset();

 private:
  State fail(int status, std::string message);
  const Limits& limits_;
  enum class Phase { Head, Body, ChunkSize, ChunkData, ChunkDataEnd, Trailers } phase_ = Phase::Head;
  Request req_;
  uint64_t remaining_ = 0;
  bool chunked_ = false, wants_continue_ = false;
  int error_status_ = 0;
  std::string error_;
};

}  // namespace vkvlm::http
