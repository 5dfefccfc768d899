// NBD wire constants and the fixed-size messages, as the NBD protocol document defines
// them. Every multi-byte field on the wire is big-endian (network order); the codec
// converts. Names follow the protocol document.
#pragma once

#include <cstddef>
#include <cstdint>

namespace memlend::nbd {

// Handshake.
inline constexpr std::uint64_t NBDMAGIC = 0x4e42444d41474943ull;     // "NBDMAGIC"
inline constexpr std::uint64_t IHAVEOPT = 0x49484156454f5054ull;     // "IHAVEOPT"
inline constexpr std::uint64_t NBD_REP_MAGIC = 0x0003e889045565a9ull;

inline constexpr std::uint16_t NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
inline constexpr std::uint16_t NBD_FLAG_NO_ZEROES = 1 << 1;
inline constexpr std::uint32_t NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
inline constexpr std::uint32_t NBD_FLAG_C_NO_ZEROES = 1 << 1;

inline constexpr std::uint32_t NBD_OPT_EXPORT_NAME = 1;
inline constexpr std::uint32_t NBD_OPT_ABORT = 2;
inline constexpr std::uint32_t NBD_OPT_LIST = 3;
inline constexpr std::uint32_t NBD_OPT_STARTTLS = 5;
inline constexpr std::uint32_t NBD_OPT_INFO = 6;
inline constexpr std::uint32_t NBD_OPT_GO = 7;
inline constexpr std::uint32_t NBD_OPT_STRUCTURED_REPLY = 8;

inline constexpr std::uint32_t NBD_REP_ACK = 1;
inline constexpr std::uint32_t NBD_REP_SERVER = 2;
inline constexpr std::uint32_t NBD_REP_INFO = 3;
inline constexpr std::uint32_t NBD_REP_FLAG_ERROR = 1u << 31;
inline constexpr std::uint32_t NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1;
inline constexpr std::uint32_t NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2;
inline constexpr std::uint32_t NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3;
inline constexpr std::uint32_t NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6;
inline constexpr std::uint32_t NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7;
inline constexpr std::uint32_t NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9;

inline constexpr std::uint16_t NBD_INFO_EXPORT = 0;
inline constexpr std::uint16_t NBD_INFO_NAME = 1;
inline constexpr std::uint16_t NBD_INFO_DESCRIPTION = 2;
inline constexpr std::uint16_t NBD_INFO_BLOCK_SIZE = 3;

// Transmission flags.
inline constexpr std::uint16_t NBD_FLAG_HAS_FLAGS = 1 << 0;
inline constexpr std::uint16_t NBD_FLAG_READ_ONLY = 1 << 1;
inline constexpr std::uint16_t NBD_FLAG_SEND_FLUSH = 1 << 2;
inline constexpr std::uint16_t NBD_FLAG_SEND_FUA = 1 << 3;
inline constexpr std::uint16_t NBD_FLAG_SEND_TRIM = 1 << 5;
inline constexpr std::uint16_t NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
inline constexpr std::uint16_t NBD_FLAG_CAN_MULTI_CONN = 1 << 8;

// Transmission.
inline constexpr std::uint32_t NBD_REQUEST_MAGIC = 0x25609513;
inline constexpr std::uint32_t NBD_SIMPLE_REPLY_MAGIC = 0x67446698;

inline constexpr std::uint16_t NBD_CMD_READ = 0;
inline constexpr std::uint16_t NBD_CMD_WRITE = 1;
inline constexpr std::uint16_t NBD_CMD_DISC = 2;
inline constexpr std::uint16_t NBD_CMD_FLUSH = 3;
inline constexpr std::uint16_t NBD_CMD_TRIM = 4;
inline constexpr std::uint16_t NBD_CMD_WRITE_ZEROES = 6;

inline constexpr std::uint16_t NBD_CMD_FLAG_FUA = 1 << 0;
inline constexpr std::uint16_t NBD_CMD_FLAG_NO_HOLE = 1 << 1;

// Error values carried in replies (not the host's errno numbers, although they agree on
// Linux).
inline constexpr std::uint32_t NBD_EPERM = 1;
inline constexpr std::uint32_t NBD_EIO = 5;
inline constexpr std::uint32_t NBD_ENOMEM = 12;
inline constexpr std::uint32_t NBD_EINVAL = 22;
inline constexpr std::uint32_t NBD_ENOSPC = 28;
inline constexpr std::uint32_t NBD_EOVERFLOW = 75;
inline constexpr std::uint32_t NBD_ENOTSUP = 95;
inline constexpr std::uint32_t NBD_ESHUTDOWN = 108;

// Sizes of the fixed messages.
inline constexpr std::size_t kGreetingSize = 8 + 8 + 2;        // NBDMAGIC, IHAVEOPT, flags
inline constexpr std::size_t kOptionHeaderSize = 8 + 4 + 4;    // IHAVEOPT, option, length
inline constexpr std::size_t kOptionReplyHeaderSize = 8 + 4 + 4 + 4;
inline constexpr std::size_t kRequestSize = 4 + 2 + 2 + 8 + 8 + 4;
inline constexpr std::size_t kSimpleReplySize = 4 + 4 + 8;

// Limits this server enforces.
inline constexpr std::uint32_t kMaxOptionLength = 64 * 1024;   // longer: hang up
inline constexpr std::uint32_t kMaxNameLength = 4096;          // the protocol's string bound
inline constexpr std::uint32_t kMaxPayload = 32 * 1024 * 1024; // the advertised maximum block
inline constexpr std::uint32_t kPreferredBlock = 4096;

}  // namespace memlend::nbd
