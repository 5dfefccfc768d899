#include "peer/codec.h"

#include <bit>
#include <cerrno>

namespace memlend::peer {

HeaderCheck DecodeHeader(std::span<const std::byte, sizeof(Header)> wire, Message* message) {
  Header header;
  std::memcpy(&header, wire.data(), sizeof(header));
  if (header.magic != kMagic) return HeaderCheck::kBadMagic;
  message->version = header.version;
  message->type = static_cast<MessageType>(header.type & ~kReplyBit);
  message->reply = (header.type & kReplyBit) != 0;
  message->flags = header.flags;
  message->status = static_cast<Status>(header.status);
  message->tag = header.tag;
  message->payload_bytes = header.payload_bytes;
  if (header.version != kVersion) return HeaderCheck::kBadVersion;
  if (header.payload_bytes > kMaxPayload) return HeaderCheck::kTooLong;
  return HeaderCheck::kOk;
}

void EncodeHeader(MessageType type, bool reply, std::uint32_t flags, Status status,
                  std::uint64_t tag, std::uint32_t payload_bytes,
                  std::span<std::byte, sizeof(Header)> wire) {
  Header header{};
  header.magic = kMagic;
  header.version = kVersion;
  header.type = static_cast<std::uint16_t>(static_cast<std::uint16_t>(type) |
                                           (reply ? kReplyBit : 0));
  header.flags = flags;
  header.status = static_cast<std::int32_t>(status);
  header.tag = tag;
  header.payload_bytes = payload_bytes;
  std::memcpy(wire.data(), &header, sizeof(header));
}

const char* StatusText(Status status) {
  switch (status) {
    case Status::kOk: return "ok";
    case Status::kNotPermitted: return "not the caller's";
    case Status::kNotFound: return "not found";
    case Status::kTooBig: return "too big";
    case Status::kInvalid: return "invalid request";
    case Status::kNoSpace: return "no space";
    case Status::kProtocol: return "protocol version mismatch";
    case Status::kTooManyBorrowers: return "too many borrowers";
    case Status::kUnsupported: return "unsupported request";
    case Status::kShuttingDown: return "lender shutting down";
  }
  return "unknown status";
}

int StatusToErrno(Status status) {
  switch (status) {
    case Status::kOk: return 0;
    case Status::kNotPermitted: return -EPERM;
    case Status::kNotFound: return -ENOENT;
    case Status::kTooBig: return -E2BIG;
    case Status::kInvalid: return -EINVAL;
    case Status::kNoSpace: return -ENOSPC;
    case Status::kProtocol: return -EPROTO;
    case Status::kTooManyBorrowers: return -EUSERS;
    case Status::kUnsupported: return -EOPNOTSUPP;
    case Status::kShuttingDown: return -ESHUTDOWN;
  }
  return -EIO;
}

}  // namespace memlend::peer
