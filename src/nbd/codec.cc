#include "nbd/codec.h"

#include <endian.h>

#include <cerrno>
#include <cstring>

namespace memlend::nbd {
namespace {

template <typename T>
T LoadBig(const std::byte* p) {
  T value;
  std::memcpy(&value, p, sizeof(value));
  if constexpr (sizeof(T) == 2) return be16toh(value);
  if constexpr (sizeof(T) == 4) return be32toh(value);
  if constexpr (sizeof(T) == 8) return be64toh(value);
}

template <typename T>
void StoreBig(std::byte* p, T value) {
  if constexpr (sizeof(T) == 2) value = htobe16(value);
  if constexpr (sizeof(T) == 4) value = htobe32(value);
  if constexpr (sizeof(T) == 8) value = htobe64(value);
  std::memcpy(p, &value, sizeof(value));
}

template <typename T>
void AppendBig(std::vector<std::byte>* out, T value) {
  const std::size_t at = out->size();
  out->resize(at + sizeof(T));
  StoreBig(out->data() + at, value);
}

}  // namespace

bool DecodeRequest(std::span<const std::byte, kRequestSize> wire, Request* request) {
  const std::byte* p = wire.data();
  if (LoadBig<std::uint32_t>(p) != NBD_REQUEST_MAGIC) return false;
  request->flags = LoadBig<std::uint16_t>(p + 4);
  request->type = LoadBig<std::uint16_t>(p + 6);
  request->handle = LoadBig<std::uint64_t>(p + 8);
  request->offset = LoadBig<std::uint64_t>(p + 16);
  request->length = LoadBig<std::uint32_t>(p + 24);
  return true;
}

void EncodeRequest(const Request& request, std::span<std::byte, kRequestSize> wire) {
  std::byte* p = wire.data();
  StoreBig(p, NBD_REQUEST_MAGIC);
  StoreBig(p + 4, request.flags);
  StoreBig(p + 6, request.type);
  StoreBig(p + 8, request.handle);
  StoreBig(p + 16, request.offset);
  StoreBig(p + 24, request.length);
}

void EncodeSimpleReply(std::uint32_t error, std::uint64_t handle,
                       std::span<std::byte, kSimpleReplySize> wire) {
  StoreBig(wire.data(), NBD_SIMPLE_REPLY_MAGIC);
  StoreBig(wire.data() + 4, error);
  StoreBig(wire.data() + 8, handle);
}

Verdict CheckRequest(const Request& request, std::uint64_t export_size) {
  // FUA is allowed on every command: the protocol says a server that advertises
  // SEND_FUA must accept it anywhere, if only by ignoring it.
  std::uint16_t allowed_flags = NBD_CMD_FLAG_FUA;
  bool writes = false;
  switch (request.type) {
    case NBD_CMD_READ:
    case NBD_CMD_FLUSH:
    case NBD_CMD_DISC:
    case NBD_CMD_TRIM:
      break;
    case NBD_CMD_WRITE:
      writes = true;
      break;
    case NBD_CMD_WRITE_ZEROES:
      allowed_flags |= NBD_CMD_FLAG_NO_HOLE;
      writes = true;
      break;
    default:
      return {NBD_EINVAL, false};
  }
  if (request.type == NBD_CMD_WRITE && request.length > kMaxPayload) {
    return {NBD_EOVERFLOW, true};
  }
  if (request.flags & ~allowed_flags) return {NBD_EINVAL, false};
  if (request.type == NBD_CMD_READ && request.length > kMaxPayload) {
    return {NBD_EOVERFLOW, false};
  }
  // FLUSH and DISC should carry zero offset and length; some clients fill them in, and
  // they name no range, so they are not checked.
  if (request.type == NBD_CMD_FLUSH || request.type == NBD_CMD_DISC) return {};
  const bool past_end =
      request.offset > export_size || request.length > export_size - request.offset;
  if (past_end) return {writes ? NBD_ENOSPC : NBD_EINVAL, false};
  return {};
}

std::uint32_t ErrorFromErrno(int error) {
  switch (error < 0 ? -error : error) {
    case 0: return 0;
    case EPERM: return NBD_EPERM;
    case EIO: return NBD_EIO;
    case ENOMEM: return NBD_ENOMEM;
    case EINVAL: return NBD_EINVAL;
    case ENOSPC: return NBD_ENOSPC;
    case EOVERFLOW: return NBD_EOVERFLOW;
    case ENOTSUP: return NBD_ENOTSUP;
    case ESHUTDOWN: return NBD_ESHUTDOWN;
    default: return NBD_EIO;
  }
}

void EncodeGreeting(std::span<std::byte, kGreetingSize> wire) {
  StoreBig(wire.data(), NBDMAGIC);
  StoreBig(wire.data() + 8, IHAVEOPT);
  StoreBig(wire.data() + 16,
           static_cast<std::uint16_t>(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
}

bool DecodeOptionHeader(std::span<const std::byte, kOptionHeaderSize> wire,
                        std::uint32_t* option, std::uint32_t* length) {
  if (LoadBig<std::uint64_t>(wire.data()) != IHAVEOPT) return false;
  *option = LoadBig<std::uint32_t>(wire.data() + 8);
  *length = LoadBig<std::uint32_t>(wire.data() + 12);
  return true;
}

void AppendOptionReply(std::vector<std::byte>* out, std::uint32_t option, std::uint32_t type,
                       std::span<const std::byte> data) {
  AppendBig(out, NBD_REP_MAGIC);
  AppendBig(out, option);
  AppendBig(out, type);
  AppendBig(out, static_cast<std::uint32_t>(data.size()));
  out->insert(out->end(), data.begin(), data.end());
}

void AppendServerReply(std::vector<std::byte>* out, const std::string& name) {
  std::vector<std::byte> data;
  AppendBig(&data, static_cast<std::uint32_t>(name.size()));
  const auto* chars = reinterpret_cast<const std::byte*>(name.data());
  data.insert(data.end(), chars, chars + name.size());
  AppendOptionReply(out, NBD_OPT_LIST, NBD_REP_SERVER, data);
}

void AppendInfoExport(std::vector<std::byte>* out, std::uint32_t option, std::uint64_t size,
                      std::uint16_t transmission_flags) {
  std::vector<std::byte> data;
  AppendBig(&data, NBD_INFO_EXPORT);
  AppendBig(&data, size);
  AppendBig(&data, transmission_flags);
  AppendOptionReply(out, option, NBD_REP_INFO, data);
}

void AppendInfoBlockSize(std::vector<std::byte>* out, std::uint32_t option,
                         std::uint32_t minimum, std::uint32_t preferred, std::uint32_t maximum) {
  std::vector<std::byte> data;
  AppendBig(&data, NBD_INFO_BLOCK_SIZE);
  AppendBig(&data, minimum);
  AppendBig(&data, preferred);
  AppendBig(&data, maximum);
  AppendOptionReply(out, option, NBD_REP_INFO, data);
}

void AppendExportNameReply(std::vector<std::byte>* out, std::uint64_t size,
                           std::uint16_t transmission_flags, bool no_zeroes) {
  AppendBig(out, size);
  AppendBig(out, transmission_flags);
  if (!no_zeroes) out->resize(out->size() + 124);
}

std::optional<InfoRequest> ParseInfoRequest(std::span<const std::byte> data) {
  if (data.size() < 4) return std::nullopt;
  const std::uint32_t name_length = LoadBig<std::uint32_t>(data.data());
  if (name_length > kMaxNameLength || data.size() < 4ull + name_length + 2) return std::nullopt;
  InfoRequest request;
  request.name.assign(reinterpret_cast<const char*>(data.data() + 4), name_length);
  const std::size_t count_at = 4 + name_length;
  const std::uint16_t count = LoadBig<std::uint16_t>(data.data() + count_at);
  if (data.size() != count_at + 2 + 2ull * count) return std::nullopt;
  for (std::uint16_t i = 0; i < count; ++i) {
    request.info_types.push_back(LoadBig<std::uint16_t>(data.data() + count_at + 2 + 2 * i));
  }
  return request;
}

}  // namespace memlend::nbd
