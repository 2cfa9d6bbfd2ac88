#include "client.hpp"

#include <zmq.h>

#include <cstdint>
#include <fstream>
#include <random>

namespace egx {

namespace {

const char kProtocol[] = "EGX/1";
const char kService[] = "earthgptx";
const char kRequest = '\x01', kPartial = '\x02', kFinal = '\x03';

std::string quoted_after(const std::string& line, const std::string& key) {
  auto at = line.find(key);
  if (at == std::string::npos) return "";
  auto open = line.find('"', at);
  auto close = open == std::string::npos ? open : line.find('"', open + 1);
  if (close == std::string::npos) return "";
  return line.substr(open + 1, close - open - 1);
}

void check(int rc, const char* what) {
  if (rc != 0) throw ServerUnavailable(std::string(what) + ": " + zmq_strerror(zmq_errno()));
}

std::vector<std::string> receive(void* sock) {
  std::vector<std::string> frames;
  while (true) {
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    if (zmq_msg_recv(&msg, sock, 0) < 0) {
      zmq_msg_close(&msg);
      throw ServerUnavailable(std::string("receive: ") + zmq_strerror(zmq_errno()));
    }
    frames.emplace_back(static_cast<const char*>(zmq_msg_data(&msg)), zmq_msg_size(&msg));
    bool more = zmq_msg_more(&msg);
    zmq_msg_close(&msg);
    if (!more) return frames;
  }
}

}  // namespace

std::pair<std::string, std::string> read_key_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read key file " + path + "; write keys with `egx keys --out DIR`");
  std::string line, pub, sec;
  while (std::getline(in, line)) {
    if (pub.empty()) pub = quoted_after(line, "public-key");
    if (sec.empty()) sec = quoted_after(line, "secret-key");
  }
  if (pub.size() != 40 || !(sec.empty() || sec.size() == 40))
    throw std::runtime_error(path + " is not a CURVE key file from `egx keys`");
  return {pub, sec};
}

std::string new_request_id() {
  std::random_device rd;  // 4 x 32 bits straight from the system's source: also good for a session secret
  const char* hex = "0123456789abcdef";
  std::string id;
  for (int word = 0; word < 4; ++word) {
    uint32_t bits = rd();
    for (int i = 0; i < 8; ++i, bits >>= 4) id += hex[bits & 15];
  }
  return id;
}

Client::Client(std::string address, int timeout_ms, int retries, const CurveKeys* curve)
    : address_(std::move(address)), timeout_ms_(timeout_ms), retries_(retries) {
  if (curve != nullptr) {
    curve_ = true;
    keys_ = *curve;
  } else {
    session_ = new_request_id();
  }
  ctx_ = zmq_ctx_new();
  if (ctx_ == nullptr) throw ServerUnavailable("cannot create a ZeroMQ context");
}

Client::~Client() {
  close();
  zmq_ctx_term(ctx_);
}

void Client::close() {
  if (sock_ != nullptr) {
    zmq_close(sock_);
    sock_ = nullptr;
  }
}

void Client::connect() {
  close();
  sock_ = zmq_socket(ctx_, ZMQ_DEALER);
  if (sock_ == nullptr) throw ServerUnavailable("cannot create a socket");
  int linger = 0;
  check(zmq_setsockopt(sock_, ZMQ_LINGER, &linger, sizeof linger), "linger");
  if (curve_) {  // Z85 keys: 40 characters plus the terminating zero
    check(zmq_setsockopt(sock_, ZMQ_CURVE_SERVERKEY, keys_.server_public.c_str(), 41), "server key");
    check(zmq_setsockopt(sock_, ZMQ_CURVE_PUBLICKEY, keys_.client_public.c_str(), 41), "client public key");
    check(zmq_setsockopt(sock_, ZMQ_CURVE_SECRETKEY, keys_.client_secret.c_str(), 41), "client secret key");
  }
  check(zmq_connect(sock_, address_.c_str()), "connect");
}

Json Client::request(Json header, const std::vector<Tensor>& tensors,
                     const std::function<void(const Json&)>& on_partial) {
  if (header.get("id").is_null()) header.set("id", new_request_id());
  if (!curve_ && header.get("session").is_null()) header.set("session", session_);
  const std::string id = header.get("id").as_string();
  if (!tensors.empty()) {
    Json specs = Json::array();
    for (const auto& t : tensors) {
      Json shape = Json::array();
      for (auto d : t.shape) shape.push(static_cast<double>(d));
      Json spec = Json::object();
      spec.set("name", t.name);
      spec.set("dtype", t.dtype);
      spec.set("shape", shape);
      specs.push(spec);
    }
    header.set("buffers", specs);
  }
  const std::string head = header.dump();
  double last_seq = 0;
  for (int attempt = 0; attempt <= retries_; ++attempt) {
    connect();  // the first socket, or Lazy Pirate's fresh one: same request id
    const char command = kRequest;
    zmq_send(sock_, "", 0, ZMQ_SNDMORE);
    zmq_send(sock_, kProtocol, sizeof kProtocol - 1, ZMQ_SNDMORE);
    zmq_send(sock_, &command, 1, ZMQ_SNDMORE);
    zmq_send(sock_, kService, sizeof kService - 1, ZMQ_SNDMORE);
    zmq_send(sock_, head.data(), head.size(), tensors.empty() ? 0 : ZMQ_SNDMORE);
    for (size_t k = 0; k < tensors.size(); ++k)
      zmq_send(sock_, tensors[k].bytes.data(), tensors[k].bytes.size(), k + 1 < tensors.size() ? ZMQ_SNDMORE : 0);
    while (true) {
      zmq_pollitem_t item = {sock_, 0, ZMQ_POLLIN, 0};
      int n = zmq_poll(&item, 1, timeout_ms_);
      if (n < 0) throw ServerUnavailable(std::string("poll: ") + zmq_strerror(zmq_errno()));
      if (n == 0) break;  // silence: retry
      auto frames = receive(sock_);
      if (frames.size() < 5 || frames[1] != kProtocol || frames[2].size() != 1) continue;
      Json reply = Json::parse(frames[4]);
      const Json& rid = reply.get("id");
      if (!rid.is_null() && rid.as_string() != id) continue;  // a late reply to an earlier request
      if (frames[2][0] == kPartial) {
        const Json& seq = reply.get("seq");
        double s = seq.is_null() ? 0 : seq.as_number();
        if (s > last_seq && on_partial) on_partial(reply);
        if (s > last_seq) last_seq = s;
        continue;
      }
      if (frames[2][0] != kFinal) continue;
      close();
      if (reply.get("event").type() == Json::Type::String && reply.get("event").as_string() == "error") {
        const Json& err = reply.get("error");
        throw ServerError(err.get("code").as_string(), err.get("message").as_string());
      }
      return reply;
    }
  }
  close();
  const std::string hint = curve_ ? "the server may be refusing this client's CURVE key: is this client's public "
                                    ".key in the server's --allow folder, and is --server-key the server's public "
                                    "key? (or is `egx serve` not running there?)"
                                  : "is `egx serve` running there?";
  throw ServerUnavailable("no reply from " + address_ + " after " + std::to_string(retries_ + 1) +
                          " attempt(s); " + hint);
}

}  // namespace egx
