// Target: what serves a ublk device's I/O. The library (UblkServer, server.h) owns the
// kernel side — control commands, one thread and one io_uring per hardware queue, per-tag
// buffers — and hands each request to the target as (operation, start sector, sector
// count, buffer). A target knows nothing of io_uring or tags; the library knows nothing of
// what a target stores.
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>
#include <span>

namespace memlend::ublk {

inline constexpr unsigned kSectorShift = 9;
inline constexpr std::uint32_t kSectorSize = 1u << kSectorShift;

enum class IoOp : std::uint8_t {
  kRead,         // fill `buffer` with the sectors' contents
  kWrite,        // store `buffer` at the sectors
  kFlush,        // make earlier completed writes durable; sector_count is 0, buffer empty
  kDiscard,      // the sectors may be forgotten; they must read as zeros afterwards here
  kWriteZeroes,  // the sectors must read as zeros; buffer empty
};

// What HandleBatch sets as a request's result to say that it will complete the request
// later, from any thread, through request.completer.
inline constexpr int kIoDeferred = INT_MIN;

// Completes requests a target deferred. One per queue, owned by the library; valid from the
// queue's QueueStarted until its QueueStopped returns.
class IoCompleter {
 public:
  // Any thread, any time before QueueStopped returns: completes the deferred request `tag`
  // of this queue with `result`, as HandleIo would have returned it. Each deferred request
  // is completed exactly once; its buffer may be used until then and not after. Never
  // blocks for long (a short lock, an eventfd write) and never allocates.
  virtual void Complete(unsigned tag, int result) noexcept = 0;

 protected:
  ~IoCompleter() = default;
};

// One request, validated by the library before the target sees it: the op is one of the
// five above, start_sector + sector_count <= the device's sectors, and for kRead/kWrite
// buffer.size() == sector_count * kSectorSize (never 0) and fits the per-tag buffer.
struct IoRequest {
  IoOp op = IoOp::kRead;
  std::uint32_t flags = 0;  // UBLK_IO_F_* (e.g. FUA, NOUNMAP), for information
  std::uint64_t start_sector = 0;
  std::uint32_t sector_count = 0;
  std::span<std::byte> buffer;  // the tag's buffer; empty unless kRead or kWrite
  unsigned queue = 0;           // the hardware queue the request came on
  unsigned tag = 0;             // its tag in that queue
  IoCompleter* completer = nullptr;  // the queue's, for a deferred request
};

class Target {
 public:
  virtual ~Target() = default;

  // Required. Serves one request on the queue's own thread (a different thread per queue,
  // so the target must be safe for concurrent calls from all queues; calls on one queue
  // never overlap). Returns the bytes transferred for kRead/kWrite (buffer.size() on
  // success; a shorter positive count completes the request partially and the kernel
  // reissues the rest), 0 on success for the other ops, or a negative errno on failure,
  // which fails the request (-EIO, -ENOSPC, -ENOMEM, -EINVAL are reported as such).
  // Must not throw; should not block for long, since the queue's other requests wait.
  virtual int HandleIo(const IoRequest& request) noexcept = 0;

  // Optional. Serves the requests that reached one queue together (every tag whose request
  // the kernel delivered in one pass over the queue's completions), so that a target can
  // serve them as one: e.g. fetch every remote page they read in one round trip. Sets
  // results[i] to what HandleIo(requests[i]) would return, or to kIoDeferred for a request
  // it will complete later through requests[i].completer (asynchronous serving: a request
  // that must wait, for a peer say, does not hold up the queue's other tags). Requests in
  // one batch, like any requests in flight together, have no order among themselves.
  // Called on the queue's thread like HandleIo; the default serves them one at a time.
  // REQUIRES: results.size() == requests.size().
  virtual void HandleBatch(std::span<const IoRequest> requests, std::span<int> results) noexcept {
    for (std::size_t i = 0; i < requests.size(); ++i) results[i] = HandleIo(requests[i]);
  }

  // Optional. Runs on queue `queue`'s thread before its first request and after its last
  // one (e.g. for per-thread state). Must not throw. When QueueStopped runs, every deferred
  // request of the queue has been completed or, the device having been stopped by force,
  // abandoned: the target must make sure no Complete for this queue runs after QueueStopped
  // returns (e.g. by joining the thread that would call it).
  virtual void QueueStarted(unsigned /*queue*/) noexcept {}
  virtual void QueueStopped(unsigned /*queue*/) noexcept {}
};

}  // namespace memlend::ublk
