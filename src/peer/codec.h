// Encoding and checking of peer protocol messages (see wire.h). Pure functions.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <type_traits>

#include "peer/wire.h"

namespace memlend::peer {

// What a received header says, in host order.
struct Message {
  MessageType type{};
  bool reply = false;
  std::uint16_t version = 0;
  std::uint32_t flags = 0;
  Status status = Status::kOk;
  std::uint64_t tag = 0;
  std::uint32_t payload_bytes = 0;
};

enum class HeaderCheck {
  kOk,
  kBadMagic,      // not a memlend peer, or out of step: hang up
  kBadVersion,    // another protocol version: refuse with kProtocol, then hang up
  kTooLong,       // payload_bytes > kMaxPayload: hang up (the payload cannot be skipped)
};

// Decodes a 32-byte header into *message and checks magic, version and length.
HeaderCheck DecodeHeader(std::span<const std::byte, sizeof(Header)> wire, Message* message);

// Encodes a header.
void EncodeHeader(MessageType type, bool reply, std::uint32_t flags, Status status,
                  std::uint64_t tag, std::uint32_t payload_bytes,
                  std::span<std::byte, sizeof(Header)> wire);

// Fixed-size bodies are copied to and from the wire as packed little-endian structs.
// This project targets little-endian hosts only; the static_assert keeps it honest.
static_assert(std::endian::native == std::endian::little,
              "the peer codec copies little-endian structs as they are");
template <typename Body>
bool DecodeBody(std::span<const std::byte> payload, Body* body) {
  static_assert(std::is_trivially_copyable_v<Body>);
  if (payload.size() < sizeof(Body)) return false;
  std::memcpy(body, payload.data(), sizeof(Body));
  return true;
}
template <typename Body>
void EncodeBody(const Body& body, std::byte* out) {
  static_assert(std::is_trivially_copyable_v<Body>);
  std::memcpy(out, &body, sizeof(Body));
}

// A human-readable name for a status ("no space", ...), for messages and logs.
const char* StatusText(Status status);
// The negative errno a data-path caller should see for a failed reply.
int StatusToErrno(Status status);

}  // namespace memlend::peer
