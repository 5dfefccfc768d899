// A raw client of the peer protocol for integration tests: the wire layout restated from
// docs/peer-protocol.md (not included from src/peer/wire.h), so that tests that speak it
// raw check the documented layout, and a blocking client that sends exactly what it is
// told.
#ifndef MEMLEND_TESTS_INTEGRATION_RAW_PEER_CLIENT_H_
#define MEMLEND_TESTS_INTEGRATION_RAW_PEER_CLIENT_H_

#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "harness.h"

namespace memlend::integration {

inline constexpr uint64_t kSuperpageBytes = 2 * kMiB;

// All integers little-endian.
static_assert(std::endian::native == std::endian::little,
              "the raw peer-protocol helpers memcpy little-endian wire images");

constexpr uint32_t kPeerMagic = 0x4c504c4d;
constexpr uint16_t kPeerVersion = 1;
constexpr uint16_t kReplyBit = 0x8000;
constexpr uint16_t kHello = 1;
constexpr uint16_t kQuery = 2;
constexpr uint16_t kAllocSuperpage = 3;
constexpr uint16_t kFreeSuperpage = 4;
constexpr uint16_t kWrite = 5;
constexpr uint16_t kRead = 6;
constexpr uint16_t kPut = 7;
constexpr uint16_t kGet = 8;
constexpr uint16_t kGoodbye = 11;
constexpr uint32_t kPutEphemeral = 1;
constexpr int32_t kStatusNotFound = 2;
constexpr int32_t kStatusProtocol = 71;
constexpr int32_t kStatusTooManyBorrowers = 87;

#pragma pack(push, 1)
struct PeerHeader {
  uint32_t magic;
  uint16_t version;
  uint16_t type;
  uint32_t flags;
  int32_t status;
  uint64_t tag;
  uint32_t payload_bytes;
  uint32_t reserved;
};
struct HelloBody {
  uint64_t node_id;
  uint64_t pool_bytes;
  uint32_t superpage_bytes;
  uint32_t capabilities;
};
struct QueryReply {
  uint64_t total_pages;
  uint64_t free_pages;
  uint64_t caller_pages;
  uint32_t borrowers;
  uint32_t superpage_pages;
};
struct RangeBody {
  uint32_t sid;
  uint32_t offset;
  uint32_t length;
  uint32_t reserved;
};
struct HandleBody {
  uint32_t pool;
  uint32_t index;
  uint64_t object;
};
#pragma pack(pop)
static_assert(sizeof(PeerHeader) == 32);
static_assert(sizeof(HelloBody) == 24);
static_assert(sizeof(QueryReply) == 32);
static_assert(sizeof(RangeBody) == 16);
static_assert(sizeof(HandleBody) == 16);

struct PeerMessage {
  PeerHeader header{};
  std::vector<uint8_t> payload;

  std::string Text() const { return std::string(payload.begin(), payload.end()); }
  template <typename Body>
  std::optional<Body> As() const {
    if (payload.size() < sizeof(Body)) return std::nullopt;
    Body body;
    std::memcpy(&body, payload.data(), sizeof body);
    return body;
  }
};

inline bool WriteAll(int fd, const void* data, size_t length) {
  const auto* bytes = static_cast<const uint8_t*>(data);
  while (length > 0) {
    ssize_t n = send(fd, bytes, length, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    bytes += n;
    length -= static_cast<size_t>(n);
  }
  return true;
}

inline bool ReadAll(int fd, void* data, size_t length) {
  auto* bytes = static_cast<uint8_t*>(data);
  while (length > 0) {
    ssize_t n = recv(fd, bytes, length, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    bytes += n;
    length -= static_cast<size_t>(n);
  }
  return true;
}

inline void SetReceiveTimeout(int fd, int timeout_ms) {
  timeval tv{timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

// Sends one message: a header with the given fields and payload = body + data.
inline bool SendPeerMessage(int fd, uint16_t type, uint64_t tag, std::span<const uint8_t> body,
                            std::span<const uint8_t> data = {}, uint16_t version = kPeerVersion,
                            int32_t status = 0, uint32_t flags = 0) {
  PeerHeader header{kPeerMagic, version, type, flags, status, tag,
                    static_cast<uint32_t>(body.size() + data.size()), 0};
  std::vector<uint8_t> wire(sizeof header);
  std::memcpy(wire.data(), &header, sizeof header);
  wire.insert(wire.end(), body.begin(), body.end());
  wire.insert(wire.end(), data.begin(), data.end());
  return WriteAll(fd, wire.data(), wire.size());
}

// Reads one message; nullopt on end of stream, error, timeout or an absurd payload length.
inline std::optional<PeerMessage> ReadPeerMessage(int fd) {
  PeerMessage message;
  if (!ReadAll(fd, &message.header, sizeof message.header)) return std::nullopt;
  if (message.header.payload_bytes > kSuperpageBytes + 64) return std::nullopt;
  message.payload.resize(message.header.payload_bytes);
  if (!message.payload.empty() && !ReadAll(fd, message.payload.data(), message.payload.size())) {
    return std::nullopt;
  }
  return message;
}

template <typename Body>
inline std::span<const uint8_t> BytesOf(const Body& body) {
  return {reinterpret_cast<const uint8_t*>(&body), sizeof body};
}

// A blocking raw client of a lender, for one thread. Reads time out after 5 s.
class RawPeerClient {
 public:
  explicit RawPeerClient(int port, int timeout_ms = 5000) {
    Endpoint endpoint;
    endpoint.transport = Transport::kTcp;
    endpoint.port = port;
    fd_ = ConnectSocket(endpoint);
    if (fd_ < 0) {
      throw std::runtime_error("cannot connect to lender port " + std::to_string(port) + ": " +
                               std::strerror(errno));
    }
    SetReceiveTimeout(fd_, timeout_ms);
  }
  ~RawPeerClient() { close(fd_); }
  RawPeerClient(const RawPeerClient&) = delete;
  RawPeerClient& operator=(const RawPeerClient&) = delete;

  int fd() const { return fd_; }

  // Sends a request and returns the next message (the tests send one request at a time).
  std::optional<PeerMessage> Call(uint16_t type, std::span<const uint8_t> body = {},
                                  std::span<const uint8_t> data = {},
                                  uint16_t version = kPeerVersion, uint32_t flags = 0) {
    const uint64_t tag = next_tag_++;
    if (!SendPeerMessage(fd_, type, tag, body, data, version, 0, flags)) return std::nullopt;
    std::optional<PeerMessage> reply = ReadPeerMessage(fd_);
    if (reply && reply->header.tag != tag) {
      throw std::runtime_error("reply with tag " + std::to_string(reply->header.tag) +
                               ", expected " + std::to_string(tag));
    }
    return reply;
  }

  // HELLO as node `node_id`; true if the lender accepted it.
  bool Hello(uint64_t node_id = 0x1234) {
    const HelloBody hello{node_id, 0, static_cast<uint32_t>(kSuperpageBytes), 3};
    const std::optional<PeerMessage> reply = Call(kHello, BytesOf(hello));
    return reply && reply->header.status == 0;
  }

  // True if the other end closes the connection within the read timeout.
  bool WaitClosed() {
    uint8_t scratch[4096];
    for (;;) {
      ssize_t n = recv(fd_, scratch, sizeof scratch, 0);
      if (n == 0) return true;
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return errno == ECONNRESET;
    }
  }

 private:
  int fd_ = -1;
  uint64_t next_tag_ = 1;
};

}  // namespace memlend::integration

#endif  // MEMLEND_TESTS_INTEGRATION_RAW_PEER_CLIENT_H_
