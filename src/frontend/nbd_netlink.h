// The kernel NBD client's generic netlink interface (<linux/nbd-netlink.h>, Linux 4.12 and
// later): connect a socket to a free /dev/nbdN with NBD_CMD_CONNECT and disconnect it with
// NBD_CMD_DISCONNECT. This is what `nbd-client` uses by default; the older ioctls need a
// thread parked in NBD_DO_IT for as long as the device lives and a free index found by the
// caller, where NBD_CMD_CONNECT picks (or creates) a free device itself and returns at once.
//
// Two layers: pure message encoding and reply parsing (unit-tested without a kernel), and
// NbdNetlink, which owns a NETLINK_GENERIC socket and does one request at a time. Every
// length in a reply is checked against the bytes received before it is used.
//
// Control path only; nothing here runs while the device serves I/O.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/unique_fd.h"

namespace memlend::nbd_netlink {

// What NBD_CMD_CONNECT configures.
struct ConnectSpec {
  std::uint64_t size_bytes = 0;
  std::uint64_t block_size_bytes = 4096;
  std::uint64_t server_flags = 0;  // NBD_FLAG_* transmission flags
  std::uint64_t timeout_s = 0;     // a request unanswered this long fails; 0: the kernel's
  // How long the kernel keeps the device and its requests after the socket dies, waiting for
  // a new one (NBD_CMD_RECONFIGURE); 0: the device fails at once.
  std::uint64_t dead_conn_timeout_s = 0;
  int socket_fd = -1;              // the kernel's end; the kernel takes its own reference
  std::string backend;             // shown in /sys/block/nbdN/backend; may be empty
};

// Request encoders: one complete netlink message each, with NLM_F_REQUEST | NLM_F_ACK.
std::vector<std::byte> EncodeGetFamily(std::uint32_t seq, const std::string& family_name);
std::vector<std::byte> EncodeConnect(std::uint32_t seq, std::uint16_t family,
                                     const ConnectSpec& spec);
std::vector<std::byte> EncodeDisconnect(std::uint32_t seq, std::uint16_t family,
                                        std::uint32_t index);
// NBD_CMD_RECONFIGURE of /dev/nbd`index` with a new socket (a server that took over); the
// kernel wants the backend identifier the device was connected with, if it had one.
std::vector<std::byte> EncodeReconfigure(std::uint32_t seq, std::uint16_t family,
                                         std::uint32_t index, int socket_fd,
                                         const std::string& backend);

// What the kernel's replies said about one request.
struct Reply {
  bool done = false;  // an ACK or an error ended the request
  int error = 0;      // negative errno from NLMSG_ERROR, or -EBADMSG for a malformed datagram
  // The attribute asked for (a u16 or u32 at the top level of a data message), if seen.
  bool has_value = false;
  std::uint32_t value = 0;
};

// Parses one received datagram, adding to *reply what it says about request `seq` (messages
// for other sequence numbers are skipped) and reading top-level attribute `attribute` of its
// data messages: CTRL_ATTR_FAMILY_ID after EncodeGetFamily, NBD_ATTR_INDEX after
// EncodeConnect. Never reads past the datagram, whatever its lengths say.
void ParseDatagram(std::span<const std::byte> datagram, std::uint32_t seq, std::uint16_t attribute,
                   Reply* reply);

class NbdNetlink {
 public:
  // Opens the socket and resolves the "nbd" family. Returns 0, or -errno: -ENOENT when the
  // kernel has no nbd netlink family (module not loaded, or a kernel before 4.12).
  int Open();

  // Connects spec.socket_fd to a free nbd device; on success sets *index (the N of
  // /dev/nbdN) and returns 0. Else -errno (-EPERM without CAP_SYS_ADMIN, -EINVAL, ...).
  int Connect(const ConnectSpec& spec, std::uint32_t* index);

  // Asks the kernel to disconnect /dev/nbd`index`: it sends NBD_CMD_DISC down the socket and
  // shuts it down; the device is released once its last opener closes it. Returns 0 or -errno.
  int Disconnect(std::uint32_t index);

  // Gives /dev/nbd`index`, whose socket died, the new socket `socket_fd`: the requests it
  // kept go there. Returns 0 or -errno.
  int Reconfigure(std::uint32_t index, int socket_fd, const std::string& backend);

 private:
  // Sends `message` and reads replies until the kernel acknowledges request `seq`.
  int Transact(const std::vector<std::byte>& message, std::uint32_t seq, std::uint16_t attribute,
               Reply* reply);

  UniqueFd fd_;
  std::uint16_t family_ = 0;
  std::uint32_t seq_ = 1;
};

}  // namespace memlend::nbd_netlink
