// Stream-socket endpoints ("HOST:PORT", "[V6]:PORT", "unix:PATH") and the few blocking
// socket calls the frontends and peers share.
#pragma once

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

// Creates a listening socket. A stale unix socket file (one nobody listens on) is
// replaced; a live one is "already in use". Throws std::runtime_error whose message
// names the endpoint and the reason.
UniqueFd ListenOn(const Endpoint& endpoint);

// Connects to `endpoint`. Returns the socket, or an invalid UniqueFd with *error set.
UniqueFd ConnectTo(const Endpoint& endpoint, std::string* error);

// Sends or receives exactly `length` bytes, retrying on EINTR and short transfers.
// Return 0, -errno, or (ReadFull) -ECONNRESET when the peer closed the stream early.
int WriteFull(int fd, const void* data, std::size_t length) noexcept;
int ReadFull(int fd, void* data, std::size_t length) noexcept;

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
