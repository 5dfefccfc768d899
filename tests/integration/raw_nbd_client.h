// A deliberately minimal NBD client over a raw socket, for sending requests that a real client
// library refuses to send: out-of-range and oversized requests, unknown commands and flags, and
// garbled handshakes. It follows the protocol document at
// https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md (fixed newstyle handshake,
// simple replies only). All integers on the wire are big-endian.

#ifndef MEMLEND_TESTS_INTEGRATION_RAW_NBD_CLIENT_H_
#define MEMLEND_TESTS_INTEGRATION_RAW_NBD_CLIENT_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "harness.h"

namespace memlend::integration::nbd_wire {

// Handshake.
inline constexpr uint64_t NBDMAGIC = 0x4e42444d41474943;       // "NBDMAGIC"
inline constexpr uint64_t IHAVEOPT = 0x49484156454F5054;       // "IHAVEOPT"
inline constexpr uint64_t NBD_REP_MAGIC = 0x0003e889045565a9;  // option reply magic
inline constexpr uint16_t NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
inline constexpr uint16_t NBD_FLAG_NO_ZEROES = 1 << 1;
inline constexpr uint32_t NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
inline constexpr uint32_t NBD_FLAG_C_NO_ZEROES = 1 << 1;

// Options.
inline constexpr uint32_t NBD_OPT_EXPORT_NAME = 1;
inline constexpr uint32_t NBD_OPT_ABORT = 2;
inline constexpr uint32_t NBD_OPT_LIST = 3;
inline constexpr uint32_t NBD_OPT_INFO = 6;
inline constexpr uint32_t NBD_OPT_GO = 7;
inline constexpr uint32_t NBD_OPT_STRUCTURED_REPLY = 8;

// Option replies.
inline constexpr uint32_t NBD_REP_ACK = 1;
inline constexpr uint32_t NBD_REP_SERVER = 2;
inline constexpr uint32_t NBD_REP_INFO = 3;
inline constexpr uint32_t NBD_REP_FLAG_ERROR = 1u << 31;
inline constexpr uint32_t NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1;
inline constexpr uint32_t NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6;

// NBD_REP_INFO types.
inline constexpr uint16_t NBD_INFO_EXPORT = 0;
inline constexpr uint16_t NBD_INFO_BLOCK_SIZE = 3;

// Transmission flags.
inline constexpr uint16_t NBD_FLAG_HAS_FLAGS = 1 << 0;
inline constexpr uint16_t NBD_FLAG_READ_ONLY = 1 << 1;
inline constexpr uint16_t NBD_FLAG_SEND_FLUSH = 1 << 2;
inline constexpr uint16_t NBD_FLAG_SEND_FUA = 1 << 3;
inline constexpr uint16_t NBD_FLAG_SEND_TRIM = 1 << 5;
inline constexpr uint16_t NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
inline constexpr uint16_t NBD_FLAG_CAN_MULTI_CONN = 1 << 8;

// Transmission.
inline constexpr uint32_t NBD_REQUEST_MAGIC = 0x25609513;
inline constexpr uint32_t NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
inline constexpr uint16_t NBD_CMD_READ = 0;
inline constexpr uint16_t NBD_CMD_WRITE = 1;
inline constexpr uint16_t NBD_CMD_DISC = 2;
inline constexpr uint16_t NBD_CMD_FLUSH = 3;
inline constexpr uint16_t NBD_CMD_TRIM = 4;
inline constexpr uint16_t NBD_CMD_WRITE_ZEROES = 6;
inline constexpr uint16_t NBD_CMD_FLAG_FUA = 1 << 0;

// Error values in simple replies.
inline constexpr uint32_t NBD_EINVAL = 22;
inline constexpr uint32_t NBD_ENOSPC = 28;
inline constexpr uint32_t NBD_EOVERFLOW = 75;

inline constexpr size_t kRequestSize = 28;
inline constexpr size_t kSimpleReplySize = 16;

}  // namespace memlend::integration::nbd_wire

namespace memlend::integration {

// One raw NBD connection. Every method throws std::runtime_error on a socket error, on an
// unexpected end of stream, on a malformed reply, or when a reply does not arrive within the hang
// guard.
class RawNbdClient {
 public:
  // Connects to endpoint; no bytes are exchanged yet.
  explicit RawNbdClient(const Endpoint& endpoint);
  ~RawNbdClient();
  RawNbdClient(const RawNbdClient&) = delete;
  RawNbdClient& operator=(const RawNbdClient&) = delete;

  // --- Bytes ---
  void SendBytes(std::span<const uint8_t> bytes);
  std::vector<uint8_t> ReceiveBytes(size_t count);
  // Reads and discards whatever the server still sends until it closes the connection. Returns
  // true if the connection was closed (end of stream or reset) within the hang guard.
  bool WaitForClose();

  // --- Handshake ---
  // Reads the server's greeting (NBDMAGIC, IHAVEOPT, handshake flags), checks both magics and
  // returns the handshake flags.
  uint16_t ReadGreeting();
  void SendClientFlags(uint32_t flags);
  // Sends IHAVEOPT, option, length of data, data.
  void SendOption(uint32_t option, std::span<const uint8_t> data);
  void SendOption(uint32_t option, const std::string& data);

  struct OptionReply {
    uint32_t option = 0;
    uint32_t type = 0;
    std::vector<uint8_t> data;
  };
  OptionReply ReadOptionReply();

  // What NBD_OPT_GO / NBD_OPT_INFO / NBD_OPT_EXPORT_NAME told us about an export.
  struct ExportInfo {
    uint64_t size = 0;
    uint16_t transmission_flags = 0;
    bool has_block_size = false;
    uint32_t min_block = 0;
    uint32_t preferred_block = 0;
    uint32_t max_block = 0;
  };

  // Greeting + client flags (FIXED_NEWSTYLE, plus NO_ZEROES if offered).
  void StartHandshake();
  // Sends NBD_OPT_GO (or NBD_OPT_INFO) for name asking for NBD_INFO_BLOCK_SIZE and reads replies
  // up to the final one. Returns the final reply type (NBD_REP_ACK on success) and fills *info.
  uint32_t RequestExport(uint32_t option, const std::string& name, ExportInfo* info);
  // StartHandshake + NBD_OPT_GO; throws unless the server ACKs.
  ExportInfo HandshakeWithGo(const std::string& name);
  // StartHandshake + NBD_OPT_EXPORT_NAME (the old way in; no option reply, just size and flags).
  ExportInfo HandshakeWithExportName(const std::string& name);

  // --- Transmission ---
  void SendRequest(uint16_t flags, uint16_t type, uint64_t cookie, uint64_t offset,
                   uint32_t length);
  struct SimpleReply {
    uint32_t error = 0;
    uint64_t cookie = 0;
  };
  SimpleReply ReadSimpleReply();

  // READ and return the data; throws if the server answers with an error.
  std::vector<uint8_t> Read(uint64_t offset, uint32_t length, uint64_t cookie);
  // WRITE data and return the reply's error (0 on success).
  uint32_t Write(uint64_t offset, std::span<const uint8_t> data, uint64_t cookie);

 private:
  bool no_zeroes_ = false;
  int fd_ = -1;
};

}  // namespace memlend::integration

#endif  // MEMLEND_TESTS_INTEGRATION_RAW_NBD_CLIENT_H_
