#include "nbd/handshake.h"

#include <endian.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "common/log.h"
#include "nbd/codec.h"
#include "transport/socket.h"

namespace memlend::nbd {
namespace {

std::shared_ptr<Device> FindExport(const DeviceTable& devices, const std::string& name) {
  if (!name.empty()) return devices.Find(name);
  const auto all = devices.List();
  return all.size() == 1 ? all.front() : nullptr;
}

bool Send(int fd, const std::vector<std::byte>& bytes, Deadline deadline) {
  return WriteFullBefore(fd, bytes.data(), bytes.size(), deadline) == 0;
}

}  // namespace

std::shared_ptr<Device> RunHandshake(int fd, const DeviceTable& devices, Deadline deadline) {
  std::byte greeting[kGreetingSize];
  EncodeGreeting(greeting);
  if (WriteFullBefore(fd, greeting, sizeof(greeting), deadline) != 0) return nullptr;

  std::uint32_t client_flags = 0;
  if (ReadFullBefore(fd, &client_flags, sizeof(client_flags), deadline) != 0) return nullptr;
  client_flags = be32toh(client_flags);
  if (client_flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
    LogDebug("nbd: unknown client flags 0x%x, closing", client_flags);
    return nullptr;
  }
  const bool no_zeroes = client_flags & NBD_FLAG_C_NO_ZEROES;

  std::vector<std::byte> data;
  std::vector<std::byte> reply;
  for (;;) {
    std::byte header[kOptionHeaderSize];
    if (const int rc = ReadFullBefore(fd, header, sizeof(header), deadline); rc != 0) {
      if (rc == -ETIMEDOUT) LogDebug("nbd: the handshake took too long, closing");
      return nullptr;
    }
    std::uint32_t option = 0;
    std::uint32_t length = 0;
    if (!DecodeOptionHeader(header, &option, &length)) {
      LogDebug("nbd: bad option magic, closing");
      return nullptr;
    }
    if (length > kMaxOptionLength) {
      LogDebug("nbd: option %u of %u bytes is too long, closing", option, length);
      return nullptr;
    }
    data.resize(length);
    if (length > 0 && ReadFullBefore(fd, data.data(), length, deadline) != 0) return nullptr;
    reply.clear();

    switch (option) {
      case NBD_OPT_EXPORT_NAME: {
        if (length > kMaxNameLength) return nullptr;
        const std::string name(reinterpret_cast<const char*>(data.data()), length);
        std::shared_ptr<Device> device = FindExport(devices, name);
        if (!device) {
          LogDebug("nbd: unknown export '%s', closing", name.c_str());
          return nullptr;
        }
        AppendExportNameReply(&reply, device->size_bytes(), kTransmissionFlags, no_zeroes);
        return Send(fd, reply, deadline) ? device : nullptr;
      }
      case NBD_OPT_ABORT:
        AppendOptionReply(&reply, option, NBD_REP_ACK);
        Send(fd, reply, deadline);
        return nullptr;
      case NBD_OPT_LIST:
        if (length != 0) {
          AppendOptionReply(&reply, option, NBD_REP_ERR_INVALID);
        } else {
          for (const auto& device : devices.List()) AppendServerReply(&reply, device->name());
          AppendOptionReply(&reply, option, NBD_REP_ACK);
        }
        break;
      case NBD_OPT_INFO:
      case NBD_OPT_GO: {
        const std::optional<InfoRequest> request = ParseInfoRequest(data);
        std::shared_ptr<Device> device;
        if (!request) {
          AppendOptionReply(&reply, option, NBD_REP_ERR_INVALID);
        } else if (!(device = FindExport(devices, request->name))) {
          static constexpr char kMessage[] = "no such export";
          AppendOptionReply(&reply, option, NBD_REP_ERR_UNKNOWN,
                            std::as_bytes(std::span(kMessage, sizeof(kMessage) - 1)));
        } else {
          AppendInfoExport(&reply, option, device->size_bytes(), kTransmissionFlags);
          AppendInfoBlockSize(&reply, option, 1, kPreferredBlock, kMaxPayload);
          AppendOptionReply(&reply, option, NBD_REP_ACK);
          if (option == NBD_OPT_GO) return Send(fd, reply, deadline) ? device : nullptr;
        }
        break;
      }
      default:
        // STARTTLS, STRUCTURED_REPLY, meta contexts and anything newer: simple replies
        // only, no TLS.
        AppendOptionReply(&reply, option, NBD_REP_ERR_UNSUP);
        break;
    }
    if (!Send(fd, reply, deadline)) return nullptr;
  }
}

}  // namespace memlend::nbd
