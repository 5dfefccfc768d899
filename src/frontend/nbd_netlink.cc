#include "frontend/nbd_netlink.h"

#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/netlink.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <array>
#include <cerrno>
#include <cstring>

namespace memlend::nbd_netlink {
namespace {

constexpr std::size_t kAlign = 4;  // NLMSG_ALIGNTO and NLA_ALIGNTO
constexpr std::size_t Align(std::size_t length) { return (length + kAlign - 1) & ~(kAlign - 1); }
constexpr std::size_t kMessageHeader = Align(sizeof(nlmsghdr));
constexpr std::size_t kAttributeHeader = Align(sizeof(nlattr));
// How long one request may wait for the kernel's answer.
constexpr int kReplyTimeoutS = 10;

// Builds one netlink message: header, generic netlink header, attributes; nests by offset.
class MessageBuilder {
 public:
  MessageBuilder(std::uint16_t type, std::uint32_t seq, std::uint8_t command) {
    nlmsghdr header{};
    header.nlmsg_type = type;
    header.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
    header.nlmsg_seq = seq;
    Append(&header, sizeof(header));
    genlmsghdr generic{};
    generic.cmd = command;
    generic.version = type == GENL_ID_CTRL ? 1 : NBD_GENL_VERSION;
    Append(&generic, sizeof(generic));
  }

  void PutU32(std::uint16_t type, std::uint32_t value) { Put(type, &value, sizeof(value)); }
  void PutU64(std::uint16_t type, std::uint64_t value) { Put(type, &value, sizeof(value)); }
  void PutString(std::uint16_t type, const std::string& value) {
    Put(type, value.c_str(), value.size() + 1);  // with its terminating NUL
  }
  // Starts a nested attribute; returns the offset EndNest needs.
  std::size_t BeginNest(std::uint16_t type) {
    const std::size_t at = bytes_.size();
    Put(static_cast<std::uint16_t>(type | NLA_F_NESTED), nullptr, 0);
    return at;
  }
  void EndNest(std::size_t at) { SetAttributeLength(at, bytes_.size() - at); }

  std::vector<std::byte> Finish() {
    const auto length = static_cast<std::uint32_t>(bytes_.size());
    std::memcpy(bytes_.data() + offsetof(nlmsghdr, nlmsg_len), &length, sizeof(length));
    return std::move(bytes_);
  }

 private:
  void Append(const void* data, std::size_t size) {
    const std::size_t at = bytes_.size();
    bytes_.resize(at + Align(size));  // padding is zero
    if (size != 0) std::memcpy(bytes_.data() + at, data, size);
  }
  void Put(std::uint16_t type, const void* data, std::size_t size) {
    const std::size_t at = bytes_.size();
    nlattr attribute{};
    attribute.nla_type = type;
    Append(&attribute, sizeof(attribute));
    Append(data, size);
    SetAttributeLength(at, kAttributeHeader + size);
  }
  void SetAttributeLength(std::size_t at, std::size_t length) {
    const auto value = static_cast<std::uint16_t>(length);
    std::memcpy(bytes_.data() + at + offsetof(nlattr, nla_len), &value, sizeof(value));
  }

  std::vector<std::byte> bytes_;
};

template <typename T>
T Load(const std::byte* at) {
  T value;
  std::memcpy(&value, at, sizeof(value));
  return value;
}

// Reads `attribute` (a u16 or u32) from the attributes in [at, end) into *reply.
void ReadAttributes(const std::byte* at, const std::byte* end, std::uint16_t attribute,
                    Reply* reply) {
  while (end - at >= static_cast<std::ptrdiff_t>(sizeof(nlattr))) {
    const auto header = Load<nlattr>(at);
    if (header.nla_len < sizeof(nlattr) || header.nla_len > end - at) {
      reply->error = -EBADMSG;
      return;
    }
    const std::size_t payload = header.nla_len - kAttributeHeader;
    if ((header.nla_type & NLA_TYPE_MASK) == attribute) {
      if (payload == sizeof(std::uint16_t)) {
        reply->value = Load<std::uint16_t>(at + kAttributeHeader);
        reply->has_value = true;
      } else if (payload == sizeof(std::uint32_t)) {
        reply->value = Load<std::uint32_t>(at + kAttributeHeader);
        reply->has_value = true;
      } else {
        reply->error = -EBADMSG;
        return;
      }
    }
    const std::size_t step = Align(header.nla_len);
    if (step >= static_cast<std::size_t>(end - at)) return;
    at += step;
  }
}

}  // namespace

std::vector<std::byte> EncodeGetFamily(std::uint32_t seq, const std::string& family_name) {
  MessageBuilder message(GENL_ID_CTRL, seq, CTRL_CMD_GETFAMILY);
  message.PutString(CTRL_ATTR_FAMILY_NAME, family_name);
  return message.Finish();
}

std::vector<std::byte> EncodeConnect(std::uint32_t seq, std::uint16_t family,
                                     const ConnectSpec& spec) {
  MessageBuilder message(family, seq, NBD_CMD_CONNECT);
  message.PutU64(NBD_ATTR_SIZE_BYTES, spec.size_bytes);
  message.PutU64(NBD_ATTR_BLOCK_SIZE_BYTES, spec.block_size_bytes);
  message.PutU64(NBD_ATTR_SERVER_FLAGS, spec.server_flags);
  if (spec.timeout_s != 0) message.PutU64(NBD_ATTR_TIMEOUT, spec.timeout_s);
  if (spec.dead_conn_timeout_s != 0) {
    message.PutU64(NBD_ATTR_DEAD_CONN_TIMEOUT, spec.dead_conn_timeout_s);
  }
  if (!spec.backend.empty()) message.PutString(NBD_ATTR_BACKEND_IDENTIFIER, spec.backend);
  const std::size_t sockets = message.BeginNest(NBD_ATTR_SOCKETS);
  const std::size_t item = message.BeginNest(NBD_SOCK_ITEM);
  message.PutU32(NBD_SOCK_FD, static_cast<std::uint32_t>(spec.socket_fd));
  message.EndNest(item);
  message.EndNest(sockets);
  return message.Finish();
}

std::vector<std::byte> EncodeDisconnect(std::uint32_t seq, std::uint16_t family,
                                        std::uint32_t index) {
  MessageBuilder message(family, seq, NBD_CMD_DISCONNECT);
  message.PutU32(NBD_ATTR_INDEX, index);
  return message.Finish();
}

std::vector<std::byte> EncodeReconfigure(std::uint32_t seq, std::uint16_t family,
                                         std::uint32_t index, int socket_fd,
                                         const std::string& backend) {
  MessageBuilder message(family, seq, NBD_CMD_RECONFIGURE);
  message.PutU32(NBD_ATTR_INDEX, index);
  if (!backend.empty()) message.PutString(NBD_ATTR_BACKEND_IDENTIFIER, backend);
  const std::size_t sockets = message.BeginNest(NBD_ATTR_SOCKETS);
  const std::size_t item = message.BeginNest(NBD_SOCK_ITEM);
  message.PutU32(NBD_SOCK_FD, static_cast<std::uint32_t>(socket_fd));
  message.EndNest(item);
  message.EndNest(sockets);
  return message.Finish();
}

void ParseDatagram(std::span<const std::byte> datagram, std::uint32_t seq, std::uint16_t attribute,
                   Reply* reply) {
  const std::byte* at = datagram.data();
  const std::byte* const end = at + datagram.size();
  while (end - at >= static_cast<std::ptrdiff_t>(sizeof(nlmsghdr))) {
    const auto header = Load<nlmsghdr>(at);
    if (header.nlmsg_len < sizeof(nlmsghdr) || header.nlmsg_len > end - at) {
      reply->error = -EBADMSG;
      reply->done = true;
      return;
    }
    const std::byte* const payload = at + kMessageHeader;
    const std::byte* const message_end = at + header.nlmsg_len;
    if (header.nlmsg_seq == seq) {
      if (header.nlmsg_type == NLMSG_ERROR) {
        // An nlmsgerr: the error (0 for an ACK), then the request's header.
        if (message_end - payload < static_cast<std::ptrdiff_t>(sizeof(int))) {
          reply->error = -EBADMSG;
        } else if (const int error = Load<int>(payload); error != 0) {
          reply->error = error < 0 ? error : -error;
        }
        reply->done = true;
      } else if (header.nlmsg_type == NLMSG_DONE) {
        reply->done = true;
      } else if (header.nlmsg_type >= NLMSG_MIN_TYPE &&
                 message_end - payload >= static_cast<std::ptrdiff_t>(GENL_HDRLEN)) {
        ReadAttributes(payload + GENL_HDRLEN, message_end, attribute, reply);
      }
    }
    const std::size_t step = Align(header.nlmsg_len);
    if (step >= static_cast<std::size_t>(end - at)) return;
    at += step;
  }
}

int NbdNetlink::Open() {
  fd_.Reset(::socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC));
  if (!fd_.valid()) return -errno;
  const timeval timeout{kReplyTimeoutS, 0};
  ::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  sockaddr_nl local{};
  local.nl_family = AF_NETLINK;
  if (::bind(fd_.get(), reinterpret_cast<sockaddr*>(&local), sizeof(local)) != 0) return -errno;
  const std::uint32_t seq = seq_++;
  Reply reply;
  const int ret =
      Transact(EncodeGetFamily(seq, NBD_GENL_FAMILY_NAME), seq, CTRL_ATTR_FAMILY_ID, &reply);
  if (ret < 0) return ret;
  if (!reply.has_value || reply.value == 0 || reply.value > 0xffff) return -EBADMSG;
  family_ = static_cast<std::uint16_t>(reply.value);
  return 0;
}

int NbdNetlink::Connect(const ConnectSpec& spec, std::uint32_t* index) {
  const std::uint32_t seq = seq_++;
  Reply reply;
  const int ret = Transact(EncodeConnect(seq, family_, spec), seq, NBD_ATTR_INDEX, &reply);
  if (ret < 0) return ret;
  if (!reply.has_value) return -EBADMSG;
  *index = reply.value;
  return 0;
}

int NbdNetlink::Disconnect(std::uint32_t index) {
  const std::uint32_t seq = seq_++;
  Reply reply;
  return Transact(EncodeDisconnect(seq, family_, index), seq, NBD_ATTR_INDEX, &reply);
}

int NbdNetlink::Reconfigure(std::uint32_t index, int socket_fd, const std::string& backend) {
  const std::uint32_t seq = seq_++;
  Reply reply;
  return Transact(EncodeReconfigure(seq, family_, index, socket_fd, backend), seq,
                  NBD_ATTR_INDEX, &reply);
}

int NbdNetlink::Transact(const std::vector<std::byte>& message, std::uint32_t seq,
                         std::uint16_t attribute, Reply* reply) {
  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  if (::sendto(fd_.get(), message.data(), message.size(), 0, reinterpret_cast<sockaddr*>(&kernel),
               sizeof(kernel)) < 0) {
    return -errno;
  }
  std::array<std::byte, 8192> buffer;
  while (!reply->done) {
    sockaddr_nl from{};
    socklen_t from_length = sizeof(from);
    const ssize_t received = ::recvfrom(fd_.get(), buffer.data(), buffer.size(), 0,
                                        reinterpret_cast<sockaddr*>(&from), &from_length);
    if (received < 0) {
      if (errno == EINTR) continue;
      return errno == EAGAIN ? -ETIMEDOUT : -errno;
    }
    if (from.nl_pid != 0) continue;  // only the kernel answers
    ParseDatagram({buffer.data(), static_cast<std::size_t>(received)}, seq, attribute, reply);
  }
  return reply->error;
}

}  // namespace memlend::nbd_netlink
