// PeerTestClient: a tiny blocking peer-protocol client for tests. It sends exactly what it
// is told — any type, flags, body and data, even malformed headers — and reads messages
// one at a time, so tests can check a lender's replies byte for byte. One thread only.
// Not for production: PeerClient (peer_client.h) is the borrower's real client.
#pragma once

#include <sys/socket.h>
#include <sys/time.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/unique_fd.h"
#include "peer/codec.h"
#include "transport/socket.h"

namespace memlend::peer {

// One received message: its decoded header and its payload.
struct TestMessage {
  Message header;
  std::vector<std::byte> payload;

  Status status() const { return header.status; }
  // The payload as text (a failed reply's error message).
  std::string text() const {
    return std::string(reinterpret_cast<const char*>(payload.data()), payload.size());
  }
  // Decodes a fixed-size body; false if the payload is shorter.
  template <typename Body>
  bool As(Body* body) const {
    return DecodeBody(std::span<const std::byte>(payload), body);
  }
};

class PeerTestClient {
 public:
  // Connects to `endpoint`. Reads give up after `timeout`, so a test never hangs on a
  // lender that does not answer. Throws std::runtime_error if it cannot connect.
  explicit PeerTestClient(const Endpoint& endpoint,
                          std::chrono::milliseconds timeout = std::chrono::milliseconds(5000)) {
    std::string error;
    fd_ = ConnectTo(endpoint, &error);
    if (!fd_.valid()) {
      throw std::runtime_error("cannot connect to " + endpoint.ToString() + ": " + error);
    }
    const timeval tv{static_cast<time_t>(timeout.count() / 1000),
                     static_cast<suseconds_t>((timeout.count() % 1000) * 1000)};
    ::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  }

  int fd() const { return fd_.get(); }

  // Sends raw bytes. Returns false if the socket failed.
  bool SendRaw(std::span<const std::byte> bytes) {
    return WriteFull(fd_.get(), bytes.data(), bytes.size()) == 0;
  }

  // Sends a request with the given header fields and payload = body followed by data.
  // `version` other than kVersion patches the header, for mismatch tests.
  bool Send(MessageType type, std::uint64_t tag, std::uint32_t flags,
            std::span<const std::byte> body, std::span<const std::byte> data = {},
            std::uint16_t version = kVersion, bool reply = false) {
    return SendRaw(Encode(type, tag, flags, body, data, version, reply));
  }

  // The bytes Send would send (for tests that send several requests in one write).
  static std::vector<std::byte> Encode(MessageType type, std::uint64_t tag, std::uint32_t flags,
                                       std::span<const std::byte> body,
                                       std::span<const std::byte> data = {},
                                       std::uint16_t version = kVersion, bool reply = false) {
    std::vector<std::byte> wire(sizeof(Header) + body.size() + data.size());
    EncodeHeader(type, reply, flags, Status::kOk, tag,
                 static_cast<std::uint32_t>(body.size() + data.size()),
                 std::span<std::byte, sizeof(Header)>(wire.data(), sizeof(Header)));
    if (version != kVersion) std::memcpy(wire.data() + offsetof(Header, version), &version, 2);
    if (!body.empty()) std::memcpy(wire.data() + sizeof(Header), body.data(), body.size());
    if (!data.empty()) {
      std::memcpy(wire.data() + sizeof(Header) + body.size(), data.data(), data.size());
    }
    return wire;
  }

  // Reads the next message, whatever it is. nullopt when the stream ended or failed, or
  // nothing came within the timeout. A header of another version is returned as it is
  // (its payload is read too); a bad magic or oversized payload gives nullopt.
  std::optional<TestMessage> ReadMessage() {
    std::byte wire[sizeof(Header)];
    if (ReadFull(fd_.get(), wire, sizeof(wire)) != 0) return std::nullopt;
    TestMessage message;
    const HeaderCheck check = DecodeHeader(wire, &message.header);
    if (check == HeaderCheck::kBadMagic || check == HeaderCheck::kTooLong) return std::nullopt;
    message.payload.resize(message.header.payload_bytes);
    if (!message.payload.empty() &&
        ReadFull(fd_.get(), message.payload.data(), message.payload.size()) != 0) {
      return std::nullopt;
    }
    return message;
  }

  // Sends a request and returns its reply. Notices that arrive first are kept in
  // notices(). nullopt when the connection ends or times out first.
  std::optional<TestMessage> Call(MessageType type, std::uint32_t flags = 0,
                                  std::span<const std::byte> body = {},
                                  std::span<const std::byte> data = {}) {
    const std::uint64_t tag = next_tag_++;
    if (!Send(type, tag, flags, body, data)) return std::nullopt;
    for (;;) {
      std::optional<TestMessage> message = ReadMessage();
      if (!message) return std::nullopt;
      if (!message->header.reply) {
        notices_.push_back(std::move(*message));
        continue;
      }
      if (message->header.tag == tag) return message;
      // A reply to some other request: tests send one at a time, so this is a bug.
      throw std::runtime_error("reply with unexpected tag " +
                               std::to_string(message->header.tag));
    }
  }

  // Call with a fixed-size body struct (byte arrays and spans take the overload above).
  template <typename Body>
    requires(!std::is_convertible_v<const Body&, std::span<const std::byte>>)
  std::optional<TestMessage> Call(MessageType type, std::uint32_t flags, const Body& body,
                                  std::span<const std::byte> data = {}) {
    return Call(type, flags, std::as_bytes(std::span<const Body, 1>(&body, 1)), data);
  }

  // HELLO with `node_id`; returns the lender's reply body, or nullopt on any failure.
  std::optional<HelloBody> Hello(std::uint64_t node_id = 1) {
    const HelloBody hello{node_id, 0, kSuperpageBytes, kCapPassive | kCapActive};
    std::optional<TestMessage> reply = Call(MessageType::kHello, 0, hello);
    HelloBody body{};
    if (!reply || reply->status() != Status::kOk || !reply->As(&body)) return std::nullopt;
    return body;
  }

  // HELLO that reads the session ticket too, resuming the session `resume` names if given.
  // nullopt on any failure; *resumed says whether the lender resumed it.
  std::optional<SessionTicket> HelloSession(std::uint64_t node_id,
                                            const SessionTicket* resume = nullptr,
                                            bool* resumed = nullptr,
                                            std::uint32_t flags = kHelloResume,
                                            std::vector<std::uint32_t>* listed = nullptr) {
    std::byte body[sizeof(HelloBody) + sizeof(ResumeBody)];
    const HelloBody hello{node_id, 0, kSuperpageBytes, kCapPassive | kCapActive};
    std::memcpy(body, &hello, sizeof(hello));
    std::size_t length = sizeof(hello);
    if (resume != nullptr) {
      std::memcpy(body + length, resume->secret, kSecretBytes);
      length += kSecretBytes;
    }
    std::optional<TestMessage> reply = Call(MessageType::kHello, resume ? flags : 0,
                                            std::span<const std::byte>(body, length));
    if (!reply || reply->status() != Status::kOk ||
        reply->payload.size() < sizeof(HelloBody) + sizeof(SessionTicket)) {
      return std::nullopt;
    }
    SessionTicket ticket{};
    std::memcpy(&ticket, reply->payload.data() + sizeof(HelloBody), sizeof(ticket));
    const bool was_resumed = (reply->header.flags & kHelloResumed) != 0;
    if (resumed != nullptr) *resumed = was_resumed;
    // A resumed session's superpages follow, one u32 each; nothing else may.
    const std::size_t list = reply->payload.size() - sizeof(HelloBody) - sizeof(SessionTicket);
    if (list != (was_resumed ? std::size_t{ticket.superpages} * sizeof(std::uint32_t) : 0)) {
      return std::nullopt;
    }
    if (listed != nullptr) {
      listed->resize(ticket.superpages);
      if (list > 0) {
        std::memcpy(listed->data(), reply->payload.data() + sizeof(HelloBody) + sizeof(ticket),
                    list);
      }
    }
    return ticket;
  }

  // QUERY; nullopt on any failure.
  std::optional<QueryReply> Query() {
    std::optional<TestMessage> reply = Call(MessageType::kQuery);
    QueryReply body{};
    if (!reply || reply->status() != Status::kOk || !reply->As(&body)) return std::nullopt;
    return body;
  }

  // True if the lender closed the connection: a read returns end of stream (or a reset)
  // within the timeout. Messages still queued before the end are dropped.
  bool WaitClosed() {
    std::byte scratch[4096];
    for (;;) {
      const ssize_t n = ::recv(fd_.get(), scratch, sizeof(scratch), 0);
      if (n == 0) return true;
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return errno == ECONNRESET;  // EAGAIN: timed out, still open
    }
  }

  // Notices (EVICTED, RECLAIM, SHUTDOWN) received while waiting for replies.
  std::vector<TestMessage>& notices() { return notices_; }

 private:
  UniqueFd fd_;
  std::uint64_t next_tag_ = 1;
  std::vector<TestMessage> notices_;
};

}  // namespace memlend::peer
