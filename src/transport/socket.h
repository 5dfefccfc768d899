// Stream-socket endpoints ("HOST:PORT", "[V6]:PORT", "unix:PATH") and the few blocking
// socket calls the frontends and peers share.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "common/unique_fd.h"

namespace memlend {

struct Endpoint {
  enum class Kind { kTcp, kUnix };
  Kind kind = Kind::kTcp;
  std::string host;    // kTcp: name or address, without brackets
  std::uint16_t port = 0;
  std::string path;    // kUnix

  // Formats the endpoint the way ParseEndpoint reads it.
  std::string ToString() const;
};

// Parses an endpoint. On failure returns nullopt and sets *error to a short reason.
std::optional<Endpoint> ParseEndpoint(std::string_view text, std::string* error);

// Who may connect to a unix socket: the socket file's permission bits and group.
struct UnixSocketAccess {
  mode_t mode = 0600;
  gid_t group = static_cast<gid_t>(-1);  // -1: the creating process's group
};

// Creates a listening socket. A stale unix socket file (one nobody listens on) is
// replaced; a live one is "already in use". A unix socket file is created with exactly
// `access` — never more permissive for a moment, whatever the umask, and without
// following a symbolic link planted at its path. Throws std::runtime_error whose message
// names the endpoint and the reason.
UniqueFd ListenOn(const Endpoint& endpoint, const UnixSocketAccess& access = {});

using Deadline = std::chrono::steady_clock::time_point;

// Connects to `endpoint`, giving up at `deadline` (a TCP connect to a host that does not
// answer otherwise takes minutes). Returns the socket, or an invalid UniqueFd with *error
// set ("timed out" when the deadline passed). Name resolution is not bounded: peers are
// given as numeric addresses or names the host resolves at once.
UniqueFd ConnectTo(const Endpoint& endpoint, std::string* error,
                   Deadline deadline = Deadline::max());

// Sends or receives exactly `length` bytes, retrying on EINTR and short transfers.
// Return 0, -errno, or (ReadFull) -ECONNRESET when the peer closed the stream early.
int WriteFull(int fd, const void* data, std::size_t length) noexcept;
// As WriteFull, for the bytes of `parts` in order (one sendmsg per try); advances `parts` as
// it goes. REQUIRES: count <= IOV_MAX.
int WriteVectorFull(int fd, struct iovec* parts, int count) noexcept;
int ReadFull(int fd, void* data, std::size_t length) noexcept;

// A point in time by which a whole exchange must be done (a handshake, say).
// Waits until `fd` has something to read (data, end of stream or an error). Returns 0, or
// -ETIMEDOUT once `deadline` has passed, or -errno.
int WaitReadable(int fd, Deadline deadline) noexcept;

// As ReadFull and WriteFull, but the whole transfer must be done by `deadline`, however
// slowly the other end sends or reads: -ETIMEDOUT otherwise. For exchanges with a party
// that has not yet shown it is what it claims to be.
int ReadFullBefore(int fd, void* data, std::size_t length, Deadline deadline) noexcept;
int WriteFullBefore(int fd, const void* data, std::size_t length, Deadline deadline) noexcept;

// Receives whatever is there, up to `length` bytes, like recv(2) but retrying EINTR:
// returns the byte count, 0 at end of stream, or -errno. With a positive `spin` it first
// polls without blocking for that long, and only then sleeps: a peer that answers within
// microseconds is caught awake, which saves the tens of microseconds a sleeping thread
// takes to be woken and scheduled. Between polls it yields the CPU (sched_yield) to any
// thread ready to run there, which may be the one that is to send the data: a borrower, its
// lenders and the client share few CPUs in tests and benchmarks. On two CPUs that took
// random reads at depth 1 through a lender from 0.77 to 1.37 of nbdkit's IOPS
// (bench/peer_bench.sh) and changed depth 32 within the noise.
long ReceiveSome(int fd, void* data, std::size_t length, std::chrono::microseconds spin) noexcept;

}  // namespace memlend
