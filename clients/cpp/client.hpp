// The C++ client of `egx serve` (protocol EGX/1, docs/protocol.md) for embedded boards:
// requests with streamed replies, the Lazy Pirate retry (a fresh socket, the same request
// id, so the server never runs a request twice) and CURVE.
#pragma once
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.hpp"

namespace egx {

// An error reply; `code` is one of the protocol's error codes (e.g. "bad_request", "busy").
struct ServerError : std::runtime_error {
  ServerError(std::string code_, const std::string& message)
      : std::runtime_error(code_ + ": " + message), code(std::move(code_)) {}
  std::string code;
};

// No reply after every retry, or a transport failure.
struct ServerUnavailable : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A named tensor sent as one raw frame: dtype as numpy's dtype.str ("|u1", "<u2", "<f4"...),
// C-order little-endian bytes.
struct Tensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

// CURVE keys as Z85 text (40 characters each).
struct CurveKeys {
  std::string server_public;
  std::string client_public;
  std::string client_secret;
};

// Reads a key file written by `egx keys` (ZeroMQ certificate format). Returns {public, secret};
// secret is empty for a public-only file. Throws std::runtime_error if unreadable.
std::pair<std::string, std::string> read_key_file(const std::string& path);

// 32 random hex characters (128 bits from std::random_device).
std::string new_request_id();

class Client {
 public:
  // timeout_ms: the longest silence between two replies before a retry.
  Client(std::string address, int timeout_ms = 30000, int retries = 2, const CurveKeys* curve = nullptr);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Sends `header` (an "id" is added if missing; without CURVE, this client's "session") and
  // `tensors`; returns the final reply's header.
  // Partial replies (streamed tokens) go to `on_partial`, in order, each once.
  // Throws ServerError for an error reply and ServerUnavailable after `retries` silent timeouts.
  Json request(Json header, const std::vector<Tensor>& tensors,
               const std::function<void(const Json&)>& on_partial = {});

 private:
  void connect();
  void close();
  std::string address_;
  int timeout_ms_;
  int retries_;
  bool curve_ = false;
  CurveKeys keys_;
  std::string session_;  // without CURVE: this client's secret name (a retry's fresh socket reaches its request)
  void* ctx_ = nullptr;
  void* sock_ = nullptr;
};

}  // namespace egx
