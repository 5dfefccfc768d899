// Encoding and decoding of NBD messages, and the one place where a transmission request
// is judged valid. Pure functions over byte buffers: no sockets, no devices.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "nbd/protocol.h"

namespace memlend::nbd {

struct Request {
  std::uint16_t flags = 0;
  std::uint16_t type = 0;
  std::uint64_t handle = 0;
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
};

// Decodes kRequestSize bytes. Returns false (and leaves *request unspecified) when the
// magic is wrong, which means the stream is out of sync.
bool DecodeRequest(std::span<const std::byte, kRequestSize> wire, Request* request);
void EncodeRequest(const Request& request, std::span<std::byte, kRequestSize> wire);
void EncodeSimpleReply(std::uint32_t error, std::uint64_t handle,
                       std::span<std::byte, kSimpleReplySize> wire);

// What the server does with a request before it touches a device.
struct Verdict {
  std::uint32_t error = 0;  // 0: serve it; else the NBD error to reply with
  bool hang_up = false;     // after replying, close the connection (the stream can't resync)
};

// Checks type, flags, length and range against an export of `export_size` bytes:
// unknown command or flag (FUA is known to every command) -> EINVAL; READ/WRITE longer than kMaxPayload -> EOVERFLOW
// (a WRITE also hangs up: its payload is too large to skip); READ or TRIM past the end ->
// EINVAL; WRITE or WRITE_ZEROES past the end -> ENOSPC.
Verdict CheckRequest(const Request& request, std::uint64_t export_size);

// True when `request` carries a payload the server must consume (a WRITE it can read).
inline bool HasPayload(const Request& request) {
  return request.type == NBD_CMD_WRITE && request.length <= kMaxPayload;
}

// Maps a negative (or positive) errno from the store to the NBD error of a reply.
std::uint32_t ErrorFromErrno(int error);

// Handshake pieces.
void EncodeGreeting(std::span<std::byte, kGreetingSize> wire);
// Decodes an option header; false when the magic is not IHAVEOPT.
bool DecodeOptionHeader(std::span<const std::byte, kOptionHeaderSize> wire,
                        std::uint32_t* option, std::uint32_t* length);
void AppendOptionReply(std::vector<std::byte>* out, std::uint32_t option, std::uint32_t type,
                       std::span<const std::byte> data = {});
// NBD_REP_SERVER carrying an export name.
void AppendServerReply(std::vector<std::byte>* out, const std::string& name);
void AppendInfoExport(std::vector<std::byte>* out, std::uint32_t option, std::uint64_t size,
                      std::uint16_t transmission_flags);
void AppendInfoBlockSize(std::vector<std::byte>* out, std::uint32_t option,
                         std::uint32_t minimum, std::uint32_t preferred, std::uint32_t maximum);
// The reply to NBD_OPT_EXPORT_NAME: size, flags and, unless `no_zeroes`, 124 zero bytes.
void AppendExportNameReply(std::vector<std::byte>* out, std::uint64_t size,
                           std::uint16_t transmission_flags, bool no_zeroes);

// The data of NBD_OPT_INFO and NBD_OPT_GO.
struct InfoRequest {
  std::string name;
  std::vector<std::uint16_t> info_types;
};
// Returns nullopt when the lengths inside do not add up to the option's length or the
// name is longer than kMaxNameLength.
std::optional<InfoRequest> ParseInfoRequest(std::span<const std::byte> data);

}  // namespace memlend::nbd
