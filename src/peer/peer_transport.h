// PeerTransport: what a borrower needs from its link to one lender, whatever carries it
// (docs/remote-tier.md, "Transport"). PeerClient (peer_client.h) is the TCP one; an RDMA
// transport is to implement the same calls, with page reads and writes as one-sided
// operations on the superpage's registered region.
//
// A transport is one session: it is made connected (the HELLO exchanged) by a
// TransportFactory, and ends for good when the link does (connected() turns false; a new
// session is a new transport). Every request has the deadline the factory was given:
// a reply that does not come by then gives -ETIMEDOUT, and the transport counts as overdue
// (overdue_since()) until a reply comes in time. Control requests (QUERY, ALLOC_SUPERPAGE,
// FREE_SUPERPAGE) and the active protocol (PUT, GET, FLUSH) are messages; page transfers are
// addressed by (superpage id, byte offset), so that over RDMA they need no message at all.
// Notices (EVICTED, RECLAIM, SHUTDOWN) go to the NoticeHandler, on whichever thread reads
// them, with no lock of the layers above held.
//
// Asynchronous use: a caller describes requests in PendingRequest objects, submits them
// (one at a time, or many in a RequestBatch that goes out at once), then Waits for each, so
// a batch costs about one round trip. Every submitted request must be waited for before
// its PendingRequest (and its buffers) go away, and the transport must outlive the Wait.
// Thread-safe: any number of threads may submit and wait at once.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>

#include "peer/codec.h"
#include "transport/socket.h"

namespace memlend::peer {

using SessionSecret = std::array<std::uint8_t, kSecretBytes>;

// What a lender's HELLO reply says of the session (wire.h, SessionTicket).
struct SessionGrant {
  SessionSecret secret{};                // names the session, for a later resume
  std::chrono::milliseconds grace{0};    // how long the lender keeps it; 0: not at all
  bool resumed = false;                  // this connection resumed the session asked for
  std::uint32_t superpages = 0;          // what the session holds (when resumed)
  // When resumed: the ids of those superpages, if the lender listed them (`listed`).
  bool listed = false;
  std::vector<std::uint32_t> superpage_ids;
};

class PeerTransport;

// One request in flight, and where its reply goes.
struct PendingRequest {
  std::span<std::byte> out;  // where the reply payload goes (exact size expected)
  std::atomic<bool> done{false};
  int result = 0;
  PeerTransport* transport = nullptr;  // set when submitted: who completes it
  // Whether a thread waiting for this reply may busy-poll for it briefly before sleeping.
  // Good for a reply someone waits on now (a read); batched writes (evictions) turn it off,
  // since spinning takes the CPU the lender needs on a crowded host.
  bool spin = true;
  // Set by the transport when submitted.
  std::uint64_t tag = 0;
  std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::time_point::max();
};

// One request of a RequestBatch, as the transport is to carry it.
struct BatchedRequest {
  MessageType type = MessageType::kRead;  // kRead, kWrite, kPut or kGet
  std::uint32_t flags = 0;                // kPutEphemeral for a PUT
  RangeBody range{};                      // kRead, kWrite: superpage, offset, length
  HandleBody handle{};                    // kPut, kGet
  std::span<const std::byte> data;        // kWrite, kPut: the bytes to send
  PendingRequest* pending = nullptr;
};

class PeerTransport {
 public:
  // Runs on the reading thread for each notice; must not call back into this transport,
  // and may run while that thread holds the transport's own locks, so it takes only leaf
  // locks.
  using NoticeHandler = std::function<void(const Message& notice, std::span<const std::byte>)>;

  virtual ~PeerTransport() = default;

  // Each call returns 0 or a negative errno: the lender's refusal (StatusToErrno, e.g.
  // -ENOSPC, -EPERM), -ENOTCONN when the link is gone, or -ETIMEDOUT when no reply came
  // by the request's deadline.
  virtual int Query(QueryReply* reply) noexcept = 0;
  virtual int AllocSuperpage(std::uint32_t* sid) noexcept = 0;
  // Gives a superpage back without waiting for the reply. With `wait_to_send` false it
  // does not wait for the link either: -EAGAIN when it is busy. Returns 0 or -ENOTCONN.
  virtual int FreeSuperpageNoReply(std::uint32_t sid, bool wait_to_send) noexcept = 0;
  virtual int Write(std::uint32_t sid, std::uint32_t offset,
                    std::span<const std::byte> data) noexcept = 0;
  virtual int Read(std::uint32_t sid, std::uint32_t offset, std::span<std::byte> out) noexcept = 0;
  // Active protocol: PUT stores one page under `handle` (flags: kPutEphemeral); GET returns
  // -ENOENT on a miss; FLUSH is sent without waiting for its reply.
  virtual int Put(const HandleBody& handle, std::uint32_t flags,
                  std::span<const std::byte> page) noexcept = 0;
  virtual int Get(const HandleBody& handle, std::span<std::byte> out) noexcept = 0;
  virtual int FlushNoReply(const HandleBody& handle) noexcept = 0;

  // Asynchronous requests: on failure `pending` is completed with the error (and the error
  // returned); Wait returns its result either way.
  virtual int SubmitRead(std::uint32_t sid, std::uint32_t offset,
                         PendingRequest* pending) noexcept = 0;
  // A QUERY whose reply (a QueryReply) goes to pending->out.
  virtual int SubmitQuery(PendingRequest* pending) noexcept = 0;
  // A WRITE of `data`, which must stay valid until Wait returns.
  virtual int SubmitWrite(std::uint32_t sid, std::uint32_t offset,
                          std::span<const std::byte> data, PendingRequest* pending) noexcept = 0;
  // Sends every request at once (one system call over TCP). A request that cannot be sent
  // has its PendingRequest completed with the error.
  virtual void SubmitBatch(std::span<const BatchedRequest> requests) noexcept = 0;
  static int Wait(PendingRequest* pending) noexcept {
    if (!pending->done.load(std::memory_order_acquire)) pending->transport->AwaitReply(pending);
    return pending->result;
  }

  // Tells the lender this session ends for good (GOODBYE): it keeps nothing of it after the
  // connection closes. Sent without waiting for a reply; Hangup comes after it.
  virtual void Goodbye() noexcept = 0;
  virtual bool connected() const noexcept = 0;
  // Ends the link now: every pending and later call fails with -ENOTCONN.
  virtual void Hangup() noexcept = 0;
  virtual const Endpoint& endpoint() const noexcept = 0;
  // The lender's HELLO reply. Constant for the transport's life.
  virtual const HelloBody& lender() const noexcept = 0;
  // The session the lender gave at HELLO (docs/restart.md). Constant for the transport's life.
  virtual const SessionGrant& session() const noexcept = 0;
  // The round-trip time of the most recent QUERY, in microseconds.
  virtual std::uint64_t last_rtt_us() const noexcept = 0;
  // Since when a request has been overdue with no reply in time after it, or
  // time_point::min() when none is.
  virtual std::chrono::steady_clock::time_point overdue_since() const noexcept = 0;
  // When the last message (reply or notice) arrived; the HELLO reply at first.
  virtual std::chrono::steady_clock::time_point last_heard() const noexcept = 0;

 protected:
  // Waits for `pending` until it is done or its deadline passes (then withdraws it with
  // -ETIMEDOUT).
  virtual void AwaitReply(PendingRequest* pending) noexcept = 0;
};

// How a transport is made: connected to `endpoint` with HELLO exchanged, `request_timeout`
// the deadline of each request (0: none), within `connect_timeout`. Throws
// std::runtime_error with a one-line reason on failure.
struct TransportParams {
  Endpoint endpoint;
  std::uint64_t node_id = 0;
  // The secret of a session to resume (SessionGrant::secret of an earlier connection).
  std::optional<SessionSecret> resume;
  // The secret of a session to free before a new one begins (this host gave it up).
  std::optional<SessionSecret> forget;
  PeerTransport::NoticeHandler on_notice;
  std::chrono::milliseconds connect_timeout{3000};
  std::chrono::milliseconds request_timeout{0};
  // How long the rest of a message may take once it has begun (a link that stalls inside
  // a message is taken for broken).
  std::chrono::milliseconds stall_timeout{5000};
};
// Thrown by a TransportFactory when nothing listens at the peer's address (the connection
// was refused): the lender's process is gone, and every session it kept went with it.
struct NothingListening : std::runtime_error {
  using std::runtime_error::runtime_error;
};
using TransportFactory = std::function<std::shared_ptr<PeerTransport>(const TransportParams&)>;

// The TCP (and unix socket) transport: a PeerClient.
std::shared_ptr<PeerTransport> ConnectTcp(const TransportParams& params);

// Collects up to kMaxRequests requests and submits them together. One caller's object,
// not shared between threads; nothing goes out until Send (or the destructor).
class RequestBatch {
 public:
  static constexpr std::size_t kMaxRequests = 64;
  explicit RequestBatch(PeerTransport& transport) : transport_(transport) {}
  ~RequestBatch() { Send(); }
  RequestBatch(const RequestBatch&) = delete;
  RequestBatch& operator=(const RequestBatch&) = delete;

  bool full() const { return count_ == kMaxRequests; }
  // When the batch is full, what it holds is sent first.
  void AddRead(std::uint32_t sid, std::uint32_t offset, PendingRequest* pending) noexcept {
    BatchedRequest& r = Next(MessageType::kRead, pending);
    r.range = RangeBody{sid, offset, static_cast<std::uint32_t>(pending->out.size()), 0};
  }
  void AddWrite(std::uint32_t sid, std::uint32_t offset, std::span<const std::byte> data,
                PendingRequest* pending) noexcept {
    pending->spin = false;
    BatchedRequest& r = Next(MessageType::kWrite, pending);
    r.range = RangeBody{sid, offset, static_cast<std::uint32_t>(data.size()), 0};
    r.data = data;
  }
  void AddPut(const HandleBody& handle, std::uint32_t flags, std::span<const std::byte> page,
              PendingRequest* pending) noexcept {
    pending->spin = false;
    BatchedRequest& r = Next(MessageType::kPut, pending);
    r.flags = flags;
    r.handle = handle;
    r.data = page;
  }
  void AddGet(const HandleBody& handle, PendingRequest* pending) noexcept {
    Next(MessageType::kGet, pending).handle = handle;
  }
  // Submits everything added so far.
  void Send() noexcept {
    if (count_ == 0) return;
    transport_.SubmitBatch(std::span<const BatchedRequest>(requests_, count_));
    count_ = 0;
  }

 private:
  BatchedRequest& Next(MessageType type, PendingRequest* pending) noexcept {
    if (full()) Send();  // a larger batch goes out in parts
    BatchedRequest& r = requests_[count_++];
    r = BatchedRequest{};
    r.type = type;
    r.pending = pending;
    return r;
  }

  PeerTransport& transport_;
  std::size_t count_ = 0;
  BatchedRequest requests_[kMaxRequests];
};

}  // namespace memlend::peer
