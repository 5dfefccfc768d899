// PeerClient: the borrower's connection to one lender over TCP (or a unix socket): the
// PeerTransport (peer_transport.h) memlend uses today.
//
// Requests are pipelined: any number of threads may call at once; each call sends its
// request (tag, header, body, data) under a send lock, then waits for the reply with its
// tag. A waiting thread reads the socket itself (one at a time, under a receive lock),
// completing its own requests and any others' whose replies come first, so a reply costs
// no hand-off to another thread. While no
// request waits, a background thread looks at the socket every few milliseconds for notices
// (EVICTED, RECLAIM, SHUTDOWN) and a hang-up. Notices go to a callback on whichever thread
// reads them. When the connection drops, every pending and later call fails with -ENOTCONN
// and connected() turns false; reconnecting is the owner's decision (a new PeerClient).
//
// Deadlines. With a request timeout every request has a deadline; a waiter whose reply has
// not come by then withdraws its request (a late reply is skipped by its tag) and gets
// -ETIMEDOUT, and the client counts as *overdue* from that moment until a reply arrives in
// time (overdue_since()). A message that has begun to arrive must arrive in full within the
// stall timeout, else the stream is taken for broken (SO_RCVTIMEO); TCP_USER_TIMEOUT does the
// same for data the lender never acknowledges. A request written but withdrawn may still be
// executed by the lender: requests on one connection are served in order, so a later WRITE
// to the same slot always lands after it.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/unique_fd.h"
#include "peer/codec.h"
#include "peer/peer_transport.h"
#include "transport/socket.h"

namespace memlend::peer {

struct PeerClientOptions {
  std::chrono::milliseconds connect_timeout{3000};  // connect and HELLO, together
  std::chrono::milliseconds request_timeout{0};     // each request's deadline; 0: none
  std::chrono::milliseconds stall_timeout{5000};    // the rest of a message, once begun
  std::optional<SessionSecret> resume;              // a session to resume at HELLO
  std::optional<SessionSecret> forget;              // or one to free (not both)
};
inline PeerClientOptions WithTimeout(std::chrono::milliseconds connect_timeout) {
  PeerClientOptions options;
  options.connect_timeout = connect_timeout;
  return options;
}

class PeerClient final : public PeerTransport {
 public:
  using Pending = PendingRequest;
  using Batch = RequestBatch;

  // Connects to `endpoint` and exchanges HELLO, waiting at most `timeout`. Throws
  // std::runtime_error with a one-line reason on failure: unreachable, a lender of another
  // protocol version (the message names both versions), or no answer in time.
  PeerClient(const Endpoint& endpoint, std::uint64_t node_id, NoticeHandler on_notice,
             const PeerClientOptions& options);
  PeerClient(const Endpoint& endpoint, std::uint64_t node_id, NoticeHandler on_notice,
             std::chrono::milliseconds timeout = std::chrono::milliseconds(3000))
      : PeerClient(endpoint, node_id, std::move(on_notice), WithTimeout(timeout)) {}
  // Hangs up and joins the background thread; pending calls fail with -ENOTCONN.
  // REQUIRES: no thread is inside a call or a Wait on this client.
  ~PeerClient() override;
  PeerClient(const PeerClient&) = delete;
  PeerClient& operator=(const PeerClient&) = delete;

  // Each call returns 0 or a negative errno: the lender's refusal (StatusToErrno, e.g.
  // -ENOSPC, -EPERM), -ENOTCONN when the connection is gone, or -ETIMEDOUT when no reply
  // came by the request's deadline. Thread-safe.
  int Query(QueryReply* reply) noexcept override;
  int AllocSuperpage(std::uint32_t* sid) noexcept override;
  int Write(std::uint32_t sid, std::uint32_t offset,
            std::span<const std::byte> data) noexcept override;
  int Read(std::uint32_t sid, std::uint32_t offset, std::span<std::byte> out) noexcept override;
  // Active protocol: PUT stores one page under `handle` (kPutEphemeral in `flags` for an
  // ephemeral pool); GET returns -ENOENT on a miss.
  int Put(const HandleBody& handle, std::uint32_t flags,
          std::span<const std::byte> page) noexcept override;
  int Get(const HandleBody& handle, std::span<std::byte> out) noexcept override;
  // Sends FLUSH without waiting for (or wanting) its reply: the lender answers every FLUSH
  // with ok, and this connection's later requests are served after it. Returns 0, or
  // -ENOTCONN when the connection is gone (and so is the page).
  int FlushNoReply(const HandleBody& handle) noexcept override;

  // Sends FREE_SUPERPAGE without waiting for its reply (the lender's later replies come
  // after it). With `wait_to_send` false it does not wait for the connection either:
  // -EAGAIN when another thread is sending. Returns 0 or -ENOTCONN.
  int FreeSuperpageNoReply(std::uint32_t sid, bool wait_to_send) noexcept override;
  void Goodbye() noexcept override { SendNoReply(MessageType::kGoodbye, {}, true); }

  // Pipelined requests (see PeerTransport): Submit sends a request and returns at once;
  // Wait blocks until its reply is in `out`.
  int SubmitRead(std::uint32_t sid, std::uint32_t offset, Pending* pending) noexcept override;
  int SubmitQuery(Pending* pending) noexcept override;
  int SubmitWrite(std::uint32_t sid, std::uint32_t offset, std::span<const std::byte> data,
                  Pending* pending) noexcept override;
  // Every request of the batch goes out with one system call.
  void SubmitBatch(std::span<const BatchedRequest> requests) noexcept override;

  bool connected() const noexcept override { return connected_.load(std::memory_order_acquire); }
  // Ends the connection now: every pending and later call fails with -ENOTCONN.
  void Hangup() noexcept override;
  const Endpoint& endpoint() const noexcept override { return endpoint_; }
  // The lender's HELLO reply. Constant after construction.
  const HelloBody& lender() const noexcept override { return lender_; }
  const SessionGrant& session() const noexcept override { return session_; }
  // The round-trip time of the most recent QUERY, in microseconds.
  std::uint64_t last_rtt_us() const noexcept override {
    return last_rtt_us_.load(std::memory_order_relaxed);
  }
  // Since when a request has been overdue with no reply in time after it (see Deadlines),
  // or time_point::min() when none is.
  std::chrono::steady_clock::time_point overdue_since() const noexcept override;
  // When the last message (reply or notice) arrived; the HELLO reply at first.
  std::chrono::steady_clock::time_point last_heard() const noexcept override;

 private:
  // Registers `pending` under a new tag; returns the tag, or 0 (with `pending` completed
  // with the error) when the connection is gone.
  std::uint64_t Register(Pending* pending) noexcept;
  // Registers `pending` under a new tag and sends the request. On failure returns
  // -errno and `pending` is already completed with that error.
  int Submit(MessageType type, std::uint32_t flags, std::span<const std::byte> body,
             std::span<const std::byte> data, Pending* pending) noexcept;
  // Sends one request and waits for its reply. `out` receives the reply payload, which
  // must be exactly out.size() bytes on success.
  int Call(MessageType type, std::uint32_t flags, std::span<const std::byte> body,
           std::span<const std::byte> data, std::span<std::byte> out) noexcept;
  // Sends a request whose reply nobody waits for (tag 0). See FreeSuperpageNoReply.
  int SendNoReply(MessageType type, std::span<const std::byte> body, bool wait_to_send) noexcept;
  // Waits for `pending` (reading replies and notices as the reader when nobody else is)
  // until it is done or its deadline passes, then withdraws it with -ETIMEDOUT.
  void AwaitReply(Pending* pending) noexcept override;
  // Removes `pending` from the table and completes it with `error`, unless a reader has
  // taken it already (then it is being completed; returns false). REQUIRES: pending_mu_.
  bool WithdrawLocked(Pending* pending, int error) noexcept;
  // Completes a taken request and wakes its waiter.
  void Complete(Pending* pending, int result) noexcept;
  enum class ReadOutcome { kMessage, kTimeout, kEnd };
  // Reads one message and dispatches it, busy-polling up to `spin` for its first bytes and
  // waiting for them until `deadline` (kTimeout: nothing came; the stream is still whole).
  // kEnd when the stream is over (or garbled). REQUIRES: recv_mu_ held.
  ReadOutcome ReadMessageLocked(std::chrono::microseconds spin = {},
                                std::chrono::steady_clock::time_point deadline =
                                    std::chrono::steady_clock::time_point::max()) noexcept;

  // A lender on a fast link answers within tens of microseconds: wait that long awake.
  static constexpr std::chrono::microseconds kReplySpin{50};
  // The stream is over: fails every pending call, now and later. REQUIRES: recv_mu_ held.
  void EndStreamLocked() noexcept;
  // The background thread: drains notices while nobody else reads.
  void IdleLoop();
  // Fails every pending call. REQUIRES: pending_mu_ held.
  void FailAllLocked(int error);

  // Constant after construction.
  const Endpoint endpoint_;
  const NoticeHandler on_notice_;
  const PeerClientOptions options_;
  UniqueFd fd_;
  HelloBody lender_{};
  SessionGrant session_{};

  std::atomic<bool> connected_{false};
  std::atomic<std::uint64_t> next_tag_{1};
  std::atomic<std::uint64_t> last_rtt_us_{0};
  std::mutex send_mu_;  // serialises whole requests on the socket
  std::mutex pending_mu_;
  std::unordered_map<std::uint64_t, Pending*> pending_;  // guarded by pending_mu_
  std::atomic<std::int64_t> overdue_since_ns_{0};  // steady clock; 0: nothing overdue
  std::atomic<std::int64_t> last_heard_ns_{0};
  std::timed_mutex recv_mu_;  // held by the one thread reading the socket
  std::unique_ptr<class StreamReader> stream_;  // guarded by recv_mu_
  bool ended_ = false;                          // guarded by recv_mu_
  std::vector<std::byte> notice_;               // guarded by recv_mu_
  // Superpages granted after their ALLOC_SUPERPAGE gave up waiting: nobody uses them, so
  // they go back (FREE_SUPERPAGE) from the reader, or, when the socket was busy, with the
  // next Query. A leaf lock; at most kMaxLateGrants (the rest stay unused until the end).
  static constexpr std::size_t kMaxLateGrants = 1024;
  std::mutex late_mu_;
  std::vector<std::uint32_t> late_grants_;  // guarded by late_mu_
  // Gives back late grants; with `wait_to_send`, waits for the socket to do so.
  void ReturnLateGrants(bool wait_to_send) noexcept;
  std::atomic<bool> stopping_{false};
  std::mutex idle_mu_;
  std::condition_variable idle_wake_;  // the destructor wakes the idle reader's wait
  std::thread idle_reader_;
};

}  // namespace memlend::peer
