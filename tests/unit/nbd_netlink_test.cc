// The nbd netlink messages (src/frontend/nbd_netlink.h): what the encoders put on the wire,
// and that the reply parser reads the kernel's answers and refuses malformed ones.
#include "frontend/nbd_netlink.h"

#include <doctest/doctest.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/netlink.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <vector>

namespace memlend::nbd_netlink {
namespace {

using Bytes = std::vector<std::byte>;

template <typename T>
T Load(const Bytes& bytes, std::size_t at) {
  REQUIRE(at + sizeof(T) <= bytes.size());
  T value;
  std::memcpy(&value, bytes.data() + at, sizeof(value));
  return value;
}

template <typename T>
void Append(Bytes* bytes, const T& value) {
  const std::size_t at = bytes->size();
  bytes->resize(at + sizeof(T));
  std::memcpy(bytes->data() + at, &value, sizeof(T));
}

void Pad(Bytes* bytes) { bytes->resize((bytes->size() + 3) & ~std::size_t{3}); }

// The attributes in [begin, end) of `bytes`, by type (nested flag stripped): their payload's
// offset and length.
std::map<int, std::pair<std::size_t, std::size_t>> Attributes(const Bytes& bytes, std::size_t begin,
                                                              std::size_t end) {
  std::map<int, std::pair<std::size_t, std::size_t>> found;
  while (begin + sizeof(nlattr) <= end) {
    const auto header = Load<nlattr>(bytes, begin);
    REQUIRE(header.nla_len >= sizeof(nlattr));
    REQUIRE(begin + header.nla_len <= end);
    found[header.nla_type & NLA_TYPE_MASK] = {begin + NLA_HDRLEN, header.nla_len - NLA_HDRLEN};
    begin += NLA_ALIGN(header.nla_len);
  }
  return found;
}

// A generic netlink data message for `seq` with one u32 (or u16) attribute.
template <typename T>
Bytes DataMessage(std::uint32_t seq, std::uint16_t attribute, T value) {
  Bytes bytes;
  nlmsghdr header{};
  header.nlmsg_type = 30;  // some family id
  header.nlmsg_seq = seq;
  Append(&bytes, header);
  Append(&bytes, genlmsghdr{NBD_CMD_CONNECT, 1, 0});
  Append(&bytes, nlattr{static_cast<std::uint16_t>(NLA_HDRLEN + sizeof(T)), attribute});
  Append(&bytes, value);
  Pad(&bytes);
  const auto length = static_cast<std::uint32_t>(bytes.size());
  std::memcpy(bytes.data(), &length, sizeof(length));
  return bytes;
}

// An NLMSG_ERROR for `seq` carrying `error` (0: an ACK).
Bytes ErrorMessage(std::uint32_t seq, int error) {
  Bytes bytes;
  nlmsghdr header{};
  header.nlmsg_len = NLMSG_HDRLEN + sizeof(nlmsgerr);
  header.nlmsg_type = NLMSG_ERROR;
  header.nlmsg_seq = seq;
  Append(&bytes, header);
  nlmsgerr payload{};
  payload.error = error;
  payload.msg.nlmsg_seq = seq;
  Append(&bytes, payload);
  return bytes;
}

Bytes Concat(Bytes first, const Bytes& second) {
  first.insert(first.end(), second.begin(), second.end());
  return first;
}

TEST_CASE("NBD_CMD_CONNECT carries the size, flags, timeout, backend and the socket") {
  ConnectSpec spec;
  spec.size_bytes = std::uint64_t{3} << 30;
  spec.block_size_bytes = 4096;
  spec.server_flags = 0x4d;
  spec.timeout_s = 120;
  spec.socket_fd = 17;
  spec.backend = "memlend:swap0";
  const Bytes message = EncodeConnect(9, 27, spec);

  const auto header = Load<nlmsghdr>(message, 0);
  CHECK(header.nlmsg_len == message.size());
  CHECK(header.nlmsg_type == 27);
  CHECK(header.nlmsg_seq == 9);
  CHECK(header.nlmsg_flags == (NLM_F_REQUEST | NLM_F_ACK));
  const auto generic = Load<genlmsghdr>(message, NLMSG_HDRLEN);
  CHECK(generic.cmd == NBD_CMD_CONNECT);
  CHECK(generic.version == NBD_GENL_VERSION);

  const auto attributes = Attributes(message, NLMSG_HDRLEN + GENL_HDRLEN, message.size());
  REQUIRE(attributes.count(NBD_ATTR_SIZE_BYTES) == 1);
  CHECK(Load<std::uint64_t>(message, attributes.at(NBD_ATTR_SIZE_BYTES).first) == spec.size_bytes);
  CHECK(Load<std::uint64_t>(message, attributes.at(NBD_ATTR_BLOCK_SIZE_BYTES).first) == 4096);
  CHECK(Load<std::uint64_t>(message, attributes.at(NBD_ATTR_SERVER_FLAGS).first) == 0x4d);
  CHECK(Load<std::uint64_t>(message, attributes.at(NBD_ATTR_TIMEOUT).first) == 120);
  const auto [backend_at, backend_length] = attributes.at(NBD_ATTR_BACKEND_IDENTIFIER);
  CHECK(std::string(reinterpret_cast<const char*>(message.data() + backend_at)) == "memlend:swap0");
  CHECK(backend_length == spec.backend.size() + 1);
  CHECK(attributes.count(NBD_ATTR_INDEX) == 0);  // the kernel picks the device

  const auto [sockets_at, sockets_length] = attributes.at(NBD_ATTR_SOCKETS);
  const auto items = Attributes(message, sockets_at, sockets_at + sockets_length);
  REQUIRE(items.count(NBD_SOCK_ITEM) == 1);
  const auto [item_at, item_length] = items.at(NBD_SOCK_ITEM);
  const auto socket = Attributes(message, item_at, item_at + item_length);
  REQUIRE(socket.count(NBD_SOCK_FD) == 1);
  CHECK(Load<std::uint32_t>(message, socket.at(NBD_SOCK_FD).first) == 17);
}

TEST_CASE("NBD_CMD_DISCONNECT names the device; GETFAMILY names the family") {
  const Bytes disconnect = EncodeDisconnect(4, 27, 3);
  CHECK(Load<genlmsghdr>(disconnect, NLMSG_HDRLEN).cmd == NBD_CMD_DISCONNECT);
  const auto attributes = Attributes(disconnect, NLMSG_HDRLEN + GENL_HDRLEN, disconnect.size());
  CHECK(Load<std::uint32_t>(disconnect, attributes.at(NBD_ATTR_INDEX).first) == 3);

  const Bytes family = EncodeGetFamily(5, "nbd");
  CHECK(Load<nlmsghdr>(family, 0).nlmsg_type == GENL_ID_CTRL);
  CHECK(Load<genlmsghdr>(family, NLMSG_HDRLEN).cmd == CTRL_CMD_GETFAMILY);
  const auto name = Attributes(family, NLMSG_HDRLEN + GENL_HDRLEN, family.size());
  CHECK(std::string(reinterpret_cast<const char*>(family.data() +
                                                  name.at(CTRL_ATTR_FAMILY_NAME).first)) == "nbd");
}

TEST_CASE("A reply and its ACK give the device index; an error gives the errno") {
  Reply reply;
  ParseDatagram(Concat(DataMessage<std::uint32_t>(7, NBD_ATTR_INDEX, 5), ErrorMessage(7, 0)), 7,
                NBD_ATTR_INDEX, &reply);
  CHECK(reply.done);
  CHECK(reply.error == 0);
  REQUIRE(reply.has_value);
  CHECK(reply.value == 5);

  Reply family;
  ParseDatagram(DataMessage<std::uint16_t>(2, CTRL_ATTR_FAMILY_ID, 31), 2, CTRL_ATTR_FAMILY_ID,
                &family);
  CHECK_FALSE(family.done);  // the ACK comes in the next datagram
  CHECK(family.value == 31);

  Reply refused;
  ParseDatagram(ErrorMessage(8, -EPERM), 8, NBD_ATTR_INDEX, &refused);
  CHECK(refused.done);
  CHECK(refused.error == -EPERM);
  CHECK_FALSE(refused.has_value);
}

TEST_CASE("Messages for another request are skipped") {
  Reply reply;
  ParseDatagram(Concat(DataMessage<std::uint32_t>(6, NBD_ATTR_INDEX, 9), ErrorMessage(6, -EIO)), 7,
                NBD_ATTR_INDEX, &reply);
  CHECK_FALSE(reply.done);
  CHECK(reply.error == 0);
  CHECK_FALSE(reply.has_value);
}

TEST_CASE("Lengths that do not fit the datagram are refused, never read past") {
  const Bytes good = DataMessage<std::uint32_t>(7, NBD_ATTR_INDEX, 5);

  SUBCASE("a message longer than the datagram") {
    Bytes truncated(good.begin(), good.end() - 4);
    Reply reply;
    ParseDatagram(truncated, 7, NBD_ATTR_INDEX, &reply);
    CHECK(reply.done);
    CHECK(reply.error == -EBADMSG);
    CHECK_FALSE(reply.has_value);
  }
  SUBCASE("a message length shorter than its header") {
    Bytes bad = good;
    const std::uint32_t length = 8;
    std::memcpy(bad.data(), &length, sizeof(length));
    Reply reply;
    ParseDatagram(bad, 7, NBD_ATTR_INDEX, &reply);
    CHECK(reply.error == -EBADMSG);
  }
  SUBCASE("an attribute longer than its message") {
    Bytes bad = good;
    const std::uint16_t length = 64;
    std::memcpy(bad.data() + NLMSG_HDRLEN + GENL_HDRLEN, &length, sizeof(length));
    Reply reply;
    ParseDatagram(bad, 7, NBD_ATTR_INDEX, &reply);
    CHECK(reply.error == -EBADMSG);
    CHECK_FALSE(reply.has_value);
  }
  SUBCASE("an attribute of the wrong size") {
    Reply reply;
    ParseDatagram(DataMessage<std::uint64_t>(7, NBD_ATTR_INDEX, 5), 7, NBD_ATTR_INDEX, &reply);
    CHECK(reply.error == -EBADMSG);
    CHECK_FALSE(reply.has_value);
  }
  SUBCASE("an error message too short for its errno") {
    Bytes bad = ErrorMessage(7, -EPERM);
    bad.resize(NLMSG_HDRLEN + 2);
    const auto length = static_cast<std::uint32_t>(bad.size());
    std::memcpy(bad.data(), &length, sizeof(length));
    Reply reply;
    ParseDatagram(bad, 7, NBD_ATTR_INDEX, &reply);
    CHECK(reply.done);
    CHECK(reply.error == -EBADMSG);
  }
}

}  // namespace
}  // namespace memlend::nbd_netlink
