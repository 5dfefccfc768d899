#include "raw_nbd_client.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>

namespace memlend::integration {
namespace {

using namespace nbd_wire;
using Clock = std::chrono::steady_clock;

std::runtime_error SocketError(const std::string& what) {
  return std::runtime_error("raw NBD client: " + what + ": " + std::strerror(errno));
}

// Big-endian encoding into a byte vector.
void PutU16(std::vector<uint8_t>& out, uint16_t v) {
  out.push_back(static_cast<uint8_t>(v >> 8));
  out.push_back(static_cast<uint8_t>(v));
}
void PutU32(std::vector<uint8_t>& out, uint32_t v) {
  PutU16(out, static_cast<uint16_t>(v >> 16));
  PutU16(out, static_cast<uint16_t>(v));
}
void PutU64(std::vector<uint8_t>& out, uint64_t v) {
  PutU32(out, static_cast<uint32_t>(v >> 32));
  PutU32(out, static_cast<uint32_t>(v));
}

// Big-endian decoding from a byte span at a position.
uint16_t GetU16(std::span<const uint8_t> in, size_t at) {
  return static_cast<uint16_t>(in[at] << 8 | in[at + 1]);
}
uint32_t GetU32(std::span<const uint8_t> in, size_t at) {
  return static_cast<uint32_t>(GetU16(in, at)) << 16 | GetU16(in, at + 2);
}
uint64_t GetU64(std::span<const uint8_t> in, size_t at) {
  return static_cast<uint64_t>(GetU32(in, at)) << 32 | GetU32(in, at + 4);
}

std::string Hex(uint64_t v) {
  char text[32];
  std::snprintf(text, sizeof text, "0x%llx", static_cast<unsigned long long>(v));
  return text;
}

// Waits until fd is readable or the hang guard expires; returns false on expiry.
bool WaitReadable(int fd, Clock::time_point deadline) {
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return false;
    pollfd p = {fd, POLLIN, 0};
    int n = poll(&p, 1, static_cast<int>(left.count()));
    if (n > 0) return true;
    if (n < 0 && errno != EINTR) return true;  // let the following recv report the error
  }
}

}  // namespace

RawNbdClient::RawNbdClient(const Endpoint& endpoint) {
  fd_ = ConnectSocket(endpoint);
  if (fd_ < 0) throw SocketError("connect " + endpoint.Describe());
}

RawNbdClient::~RawNbdClient() {
  if (fd_ >= 0) close(fd_);
}

void RawNbdClient::SendBytes(std::span<const uint8_t> bytes) {
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = send(fd_, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw SocketError("send");
    done += static_cast<size_t>(n);
  }
}

std::vector<uint8_t> RawNbdClient::ReceiveBytes(size_t count) {
  std::vector<uint8_t> bytes(count);
  const auto deadline = Clock::now() + std::chrono::milliseconds(kHangGuardMs);
  size_t done = 0;
  while (done < count) {
    if (!WaitReadable(fd_, deadline)) {
      throw std::runtime_error("raw NBD client: no reply within the hang guard (got " +
                               std::to_string(done) + " of " + std::to_string(count) + " bytes)");
    }
    ssize_t n = recv(fd_, bytes.data() + done, count - done, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw SocketError("recv");
    if (n == 0) {
      throw std::runtime_error("raw NBD client: server closed the connection (got " +
                               std::to_string(done) + " of " + std::to_string(count) +
                               " expected bytes)");
    }
    done += static_cast<size_t>(n);
  }
  return bytes;
}

bool RawNbdClient::WaitForClose() {
  const auto deadline = Clock::now() + std::chrono::milliseconds(kHangGuardMs);
  for (;;) {
    if (!WaitReadable(fd_, deadline)) return false;
    char discard[4096];
    ssize_t n = recv(fd_, discard, sizeof discard, 0);
    if (n == 0) return true;
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno == ECONNRESET || errno == EPIPE;
  }
}

uint16_t RawNbdClient::ReadGreeting() {
  std::vector<uint8_t> greeting = ReceiveBytes(18);
  if (GetU64(greeting, 0) != NBDMAGIC) {
    throw std::runtime_error("greeting: bad magic " + Hex(GetU64(greeting, 0)));
  }
  if (GetU64(greeting, 8) != IHAVEOPT) {
    throw std::runtime_error("greeting: not newstyle, second magic " + Hex(GetU64(greeting, 8)));
  }
  return GetU16(greeting, 16);
}

void RawNbdClient::SendClientFlags(uint32_t flags) {
  std::vector<uint8_t> bytes;
  PutU32(bytes, flags);
  SendBytes(bytes);
}

void RawNbdClient::SendOption(uint32_t option, std::span<const uint8_t> data) {
  std::vector<uint8_t> bytes;
  PutU64(bytes, IHAVEOPT);
  PutU32(bytes, option);
  PutU32(bytes, static_cast<uint32_t>(data.size()));
  bytes.insert(bytes.end(), data.begin(), data.end());
  SendBytes(bytes);
}

void RawNbdClient::SendOption(uint32_t option, const std::string& data) {
  SendOption(option,
             std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(data.data()), data.size()));
}

RawNbdClient::OptionReply RawNbdClient::ReadOptionReply() {
  std::vector<uint8_t> header = ReceiveBytes(20);
  if (GetU64(header, 0) != NBD_REP_MAGIC) {
    throw std::runtime_error("option reply: bad magic " + Hex(GetU64(header, 0)));
  }
  OptionReply reply;
  reply.option = GetU32(header, 8);
  reply.type = GetU32(header, 12);
  uint32_t length = GetU32(header, 16);
  if (length > 64 * 1024) {
    throw std::runtime_error("option reply: absurd length " + std::to_string(length));
  }
  reply.data = ReceiveBytes(length);
  return reply;
}

void RawNbdClient::StartHandshake() {
  uint16_t flags = ReadGreeting();
  if (!(flags & NBD_FLAG_FIXED_NEWSTYLE)) {
    throw std::runtime_error("server does not offer fixed newstyle (flags " + Hex(flags) + ")");
  }
  no_zeroes_ = flags & NBD_FLAG_NO_ZEROES;
  SendClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE | (no_zeroes_ ? NBD_FLAG_C_NO_ZEROES : 0));
}

uint32_t RawNbdClient::RequestExport(uint32_t option, const std::string& name, ExportInfo* info) {
  std::vector<uint8_t> data;
  PutU32(data, static_cast<uint32_t>(name.size()));
  data.insert(data.end(), name.begin(), name.end());
  PutU16(data, 1);  // one information request:
  PutU16(data, NBD_INFO_BLOCK_SIZE);
  SendOption(option, data);
  for (;;) {
    OptionReply reply = ReadOptionReply();
    if (reply.option != option) {
      throw std::runtime_error("option reply for option " + std::to_string(reply.option) +
                               ", expected " + std::to_string(option));
    }
    if (reply.type != NBD_REP_INFO) return reply.type;
    if (reply.data.size() < 2) throw std::runtime_error("NBD_REP_INFO shorter than 2 bytes");
    uint16_t info_type = GetU16(reply.data, 0);
    if (info_type == NBD_INFO_EXPORT) {
      if (reply.data.size() != 12) throw std::runtime_error("NBD_INFO_EXPORT of wrong length");
      info->size = GetU64(reply.data, 2);
      info->transmission_flags = GetU16(reply.data, 10);
    } else if (info_type == NBD_INFO_BLOCK_SIZE) {
      if (reply.data.size() != 14) throw std::runtime_error("NBD_INFO_BLOCK_SIZE of wrong length");
      info->has_block_size = true;
      info->min_block = GetU32(reply.data, 2);
      info->preferred_block = GetU32(reply.data, 6);
      info->max_block = GetU32(reply.data, 10);
    }
    // Other information types are allowed and ignored.
  }
}

RawNbdClient::ExportInfo RawNbdClient::HandshakeWithGo(const std::string& name) {
  StartHandshake();
  ExportInfo info;
  uint32_t type = RequestExport(NBD_OPT_GO, name, &info);
  if (type != NBD_REP_ACK) {
    throw std::runtime_error("NBD_OPT_GO " + name + " answered with reply type " + Hex(type));
  }
  return info;
}

RawNbdClient::ExportInfo RawNbdClient::HandshakeWithExportName(const std::string& name) {
  StartHandshake();
  SendOption(NBD_OPT_EXPORT_NAME, name);
  std::vector<uint8_t> reply = ReceiveBytes(10 + (no_zeroes_ ? 0 : 124));
  ExportInfo info;
  info.size = GetU64(reply, 0);
  info.transmission_flags = GetU16(reply, 8);
  return info;
}

void RawNbdClient::SendRequest(uint16_t flags, uint16_t type, uint64_t cookie, uint64_t offset,
                               uint32_t length) {
  std::vector<uint8_t> bytes;
  PutU32(bytes, NBD_REQUEST_MAGIC);
  PutU16(bytes, flags);
  PutU16(bytes, type);
  PutU64(bytes, cookie);
  PutU64(bytes, offset);
  PutU32(bytes, length);
  SendBytes(bytes);
}

RawNbdClient::SimpleReply RawNbdClient::ReadSimpleReply() {
  std::vector<uint8_t> bytes = ReceiveBytes(kSimpleReplySize);
  if (GetU32(bytes, 0) != NBD_SIMPLE_REPLY_MAGIC) {
    throw std::runtime_error("reply: bad magic " + Hex(GetU32(bytes, 0)) + " (not a simple reply)");
  }
  return SimpleReply{GetU32(bytes, 4), GetU64(bytes, 8)};
}

std::vector<uint8_t> RawNbdClient::Read(uint64_t offset, uint32_t length, uint64_t cookie) {
  SendRequest(0, NBD_CMD_READ, cookie, offset, length);
  SimpleReply reply = ReadSimpleReply();
  if (reply.cookie != cookie) {
    throw std::runtime_error("READ reply carries cookie " + Hex(reply.cookie) + ", expected " +
                             Hex(cookie));
  }
  if (reply.error != 0) {
    throw std::runtime_error("READ " + std::to_string(offset) + "+" + std::to_string(length) +
                             " failed with NBD error " + std::to_string(reply.error));
  }
  return ReceiveBytes(length);
}

uint32_t RawNbdClient::Write(uint64_t offset, std::span<const uint8_t> data, uint64_t cookie) {
  SendRequest(0, NBD_CMD_WRITE, cookie, offset, static_cast<uint32_t>(data.size()));
  SendBytes(data);
  SimpleReply reply = ReadSimpleReply();
  if (reply.cookie != cookie) {
    throw std::runtime_error("WRITE reply carries cookie " + Hex(reply.cookie) + ", expected " +
                             Hex(cookie));
  }
  return reply.error;
}

}  // namespace memlend::integration
