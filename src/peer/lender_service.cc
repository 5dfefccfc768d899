#include "peer/lender_service.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "common/byte_buffer.h"
#include "common/log.h"
#include "common/realtime.h"
#include "common/thread_name.h"

namespace memlend::peer {
namespace {

constexpr std::size_t kHeaderBytes = sizeof(Header);
constexpr std::size_t kInputBytes = 2 * (kHeaderBytes + kMaxPayload);
constexpr std::size_t kReplyFlushBytes = 256 * 1024;  // send queued replies past this much
constexpr std::size_t kReplyBytes = kReplyFlushBytes + kHeaderBytes + kSuperpageBytes;
// Each buffer of a connection that has not said HELLO yet: a HELLO, or a refusal, fits.
constexpr std::size_t kPreHelloBytes = 4096;
static_assert(kHeaderBytes + kMaxErrorText <= kPreHelloBytes);
// What a session holds after HELLO, in whole pages (ByteBuffer's reservations), and
// before it: never more than this.
static_assert(((kInputBytes + 4095) & ~std::size_t{4095}) +
                  ((kReplyBytes + 4095) & ~std::size_t{4095}) <=
              LenderService::kMaxSessionBufferBytes);

std::span<std::byte, kHeaderBytes> HeaderSpan(std::byte* at) {
  return std::span<std::byte, kHeaderBytes>(at, kHeaderBytes);
}

// A fixed-size request body: kOk if the payload is exactly `expected` bytes, else the
// status to refuse it with.
Status CheckPayload(const Message& request, std::size_t expected) {
  if (request.payload_bytes < expected) return Status::kInvalid;
  if (request.payload_bytes > expected) return Status::kTooBig;
  return Status::kOk;
}

// Compares two secrets in time that does not depend on where they differ.
bool SameSecret(const std::array<std::uint8_t, kSecretBytes>& a,
                const std::array<std::uint8_t, kSecretBytes>& b) noexcept {
  std::uint8_t difference = 0;
  for (std::size_t i = 0; i < kSecretBytes; ++i) difference |= a[i] ^ b[i];
  return difference == 0;
}

// Fills `secret` from the kernel's random source; false if it has none to give now.
bool NewSecret(std::array<std::uint8_t, kSecretBytes>* secret) noexcept {
  std::size_t done = 0;
  while (done < secret->size()) {
    const ssize_t n = ::getrandom(secret->data() + done, secret->size() - done, GRND_NONBLOCK);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<std::size_t>(n);
  }
  return true;
}

const char* RequestName(MessageType type) {
  switch (type) {
    case MessageType::kHello: return "HELLO";
    case MessageType::kGoodbye: return "GOODBYE";
    case MessageType::kQuery: return "QUERY";
    case MessageType::kAllocSuperpage: return "ALLOC_SUPERPAGE";
    case MessageType::kFreeSuperpage: return "FREE_SUPERPAGE";
    case MessageType::kWrite: return "WRITE";
    case MessageType::kRead: return "READ";
    case MessageType::kPut: return "PUT";
    case MessageType::kGet: return "GET";
    case MessageType::kFlush: return "FLUSH";
    case MessageType::kDestroyPool: return "DESTROY_POOL";
    case MessageType::kEvicted: return "EVICTED";
    case MessageType::kReclaim: return "RECLAIM";
    case MessageType::kShutdown: return "SHUTDOWN";
  }
  return "unknown";
}

}  // namespace

// One session's request loop. Lives on the session's thread; owns the buffers a request
// and its reply are assembled in.
class LenderService::Connection {
 public:
  // Throws std::bad_alloc if even the small buffers cannot be had.
  Connection(LenderService* service, Session* session)
      : service_(*service),
        session_(*session),
        fd_(session->fd.get()),
        hello_deadline_(std::chrono::steady_clock::now() + service->options_.hello_timeout),
        input_(kPreHelloBytes),
        replies_(kPreHelloBytes) {}

  // Serves requests until the borrower leaves, the stream breaks or the service stops.
  //
  // Batching: each recv takes whatever the borrower has sent, often many pipelined
  // requests; every complete request is served and its reply built in one output buffer,
  // and the replies go out in one send before the loop blocks again. A borrower that
  // submits a batch of 32 page reads thus costs a few system calls, not two per page.
  void Run() noexcept {
    for (;;) {
      if (input_end_ - input_begin_ < kHeaderBytes) {
        if (!Flush() || !Receive()) return;
        continue;
      }
      Message request;
      const HeaderCheck check = DecodeHeader(
          std::span<const std::byte, kHeaderBytes>(input_.data() + input_begin_, kHeaderBytes),
          &request);
      switch (check) {
        case HeaderCheck::kOk:
          break;
        case HeaderCheck::kBadVersion:
          Refuse(request, Status::kProtocol,
                 "this lender speaks peer protocol version %u, the request was version %u",
                 unsigned{kVersion}, unsigned{request.version});
          Flush();
          return;
        case HeaderCheck::kBadMagic:
          LogDebug("peer session %llu: bad magic, hanging up", Id());
          return;
        case HeaderCheck::kTooLong:
          LogDebug("peer session %llu: payload of %u bytes is over the limit, hanging up", Id(),
                   request.payload_bytes);
          return;
      }
      if (request.reply) {
        LogDebug("peer session %llu: the borrower sent a reply, hanging up", Id());
        Flush();
        return;
      }
      if (kHeaderBytes + request.payload_bytes > input_.capacity()) {
        // Only before HELLO is the buffer smaller than the largest message.
        if (request.type == MessageType::kHello) {
          RefuseLength(request, Status::kTooBig, sizeof(HelloBody));
        } else {
          Refuse(request, Status::kProtocol, "send HELLO before %s", RequestName(request.type));
        }
        Flush();
        return;
      }
      if (input_end_ - input_begin_ < kHeaderBytes + request.payload_bytes) {
        if (!Flush()) return;
        if (request.type == MessageType::kWrite) {
          const DirectWrite direct = ReceiveWriteIntoPool(request);
          if (direct == DirectWrite::kBroken) return;
          if (direct == DirectWrite::kDone) {
            ++served_since_receive_;
            continue;
          }
        }
        if (!Receive()) return;  // the rest of this request is on its way
        continue;
      }
      payload_ = input_.data() + input_begin_ + kHeaderBytes;
      input_begin_ += kHeaderBytes + request.payload_bytes;
      // Room for the largest reply (a superpage READ; before HELLO, a refusal), so Body()
      // stays put while it is built. Never grows: the flush threshold leaves room for it.
      assert(replies_.size() + kHeaderBytes + (hello_ ? kSuperpageBytes : kMaxErrorText) <=
             replies_.capacity());
      ++served_since_receive_;
      if (request.type == MessageType::kRead || request.type == MessageType::kGet) {
        read_since_receive_ = true;
      }
      // READ replies queued to go out from the pool are sent before anything else is
      // served: a later request of this session (a WRITE, a FREE_SUPERPAGE) may change or
      // free what they point at.
      if (request.type != MessageType::kRead && pool_body_count_ > 0 && !Flush()) return;
      if (!Serve(request)) {
        Flush();
        return;
      }
      // Before HELLO, every reply goes out at once: the buffer holds one.
      if ((!hello_ || RepliesFull()) && !Flush()) return;
    }
  }

 private:
  unsigned long long Id() const { return session_.id.load(std::memory_order_relaxed); }
  std::span<const std::byte> Payload(const Message& request) const {
    return {payload_, request.payload_bytes};
  }
  // Where the body of the next reply is built: right after its header's place at the end
  // of the output buffer.
  std::byte* Body() { return replies_.data() + replies_.size() + kHeaderBytes; }

  // Queues the reply to `request` whose body (of `body_bytes`) is already at Body(). It
  // goes out with the next Flush. Always returns true.
  bool Send(const Message& request, Status status, std::size_t body_bytes,
            std::uint32_t flags = 0) noexcept {
    std::byte* header = replies_.Extend(kHeaderBytes + body_bytes);
    EncodeHeader(request.type, true, flags, status, request.tag,
                 static_cast<std::uint32_t>(body_bytes), HeaderSpan(header));
    return true;
  }

  // Sends every queued reply. Returns false if the stream broke. Before HELLO the
  // borrower must take them by the HELLO deadline too.
  bool Flush() noexcept {
    if (replies_.empty()) return true;
    std::lock_guard lock(session_.send_mu);  // notices from other threads share the socket
    // A notice half sent goes first (none is sent before HELLO).
    if (SendTailLocked(session_, /*wait=*/true) != 0) {
      ClearReplies();
      return false;
    }
    int rc;
    if (pool_body_count_ == 0) {
      rc = hello_ ? WriteFull(fd_, replies_.data(), replies_.size())
                  : WriteFullBefore(fd_, replies_.data(), replies_.size(), hello_deadline_);
    } else {
      // The queued bytes, with each READ's body taken from the pool where it goes.
      iovec parts[2 * kMaxPoolBodies + 1];
      int count = 0;
      std::size_t done = 0;
      for (std::size_t i = 0; i < pool_body_count_; ++i) {
        const PoolBody& body = pool_bodies_[i];
        if (body.at > done) parts[count++] = {replies_.data() + done, body.at - done};
        parts[count++] = {const_cast<std::byte*>(body.data), body.length};
        done = body.at;
      }
      if (replies_.size() > done) parts[count++] = {replies_.data() + done, replies_.size() - done};
      rc = WriteVectorFull(fd_, parts, count);
    }
    ClearReplies();
    return rc == 0;
  }

  // A large WRITE whose data is still on its way is received straight into the pool (one
  // copy less than through the input buffer), once its range has been found to be the
  // session's. kNotDone: not such a WRITE (a small one, a range that is refused, or its
  // range not received yet), served the usual way.
  enum class DirectWrite { kDone, kNotDone, kBroken };
  static constexpr std::size_t kDirectWriteBytes = 16 * 1024;
  DirectWrite ReceiveWriteIntoPool(const Message& request) noexcept {
    const std::size_t buffered = input_end_ - input_begin_ - kHeaderBytes;
    if (!hello_ || request.flags != 0 || buffered < sizeof(RangeBody) ||
        request.payload_bytes - buffered < kDirectWriteBytes) {
      return DirectWrite::kNotDone;
    }
    RangeBody range;
    DecodeBody(std::span<const std::byte>(input_.data() + input_begin_ + kHeaderBytes,
                                          sizeof(RangeBody)),
               &range);
    std::byte* at = nullptr;
    if (std::uint64_t{request.payload_bytes} != sizeof(RangeBody) + std::uint64_t{range.length} ||
        service_.pool_.Locate(session_.id, range, &at) != Status::kOk) {
      return DirectWrite::kNotDone;  // refused by Write, the usual way
    }
    const std::size_t have = buffered - sizeof(RangeBody);
    std::memcpy(at, input_.data() + input_begin_ + kHeaderBytes + sizeof(RangeBody), have);
    input_begin_ = input_end_ = 0;  // everything buffered was this request's
    if (ReadFull(fd_, at + have, range.length - have) != 0) return DirectWrite::kBroken;
    Send(request, Status::kOk, 0);
    return RepliesFull() && !Flush() ? DirectWrite::kBroken : DirectWrite::kDone;
  }

  void ClearReplies() noexcept {
    replies_.Clear();
    pool_body_count_ = 0;
    pool_bytes_ = 0;
  }

  // Whether the queued replies should go out now: enough bytes, or as many READs sent from
  // the pool as one send takes.
  bool RepliesFull() const noexcept {
    return replies_.size() + pool_bytes_ >= kReplyFlushBytes || pool_body_count_ == kMaxPoolBodies;
  }

  // A borrower that sends one request at a time (low queue depth, latency bound) sends
  // its next within microseconds of our reply: wait that long awake before sleeping
  // (see ReceiveSome, which yields the CPU while it spins). So does one that reads: its
  // reader waits for our replies before it can answer its own client, whose next reads
  // come back to us soon after (on two CPUs, random reads at depth 32 through two lenders went
  // from 0.60-1.11 to 0.92-1.15 of nbdkit's IOPS, runs taken in turns). Between batches of
  // writes (evictions) spinning only takes CPU from the borrower: spinning after every batch
  // cost random writes at depth 32 about a fifth of their IOPS.
  static constexpr std::chrono::microseconds kRequestSpin{50};
  static constexpr unsigned kSpinBelowBatch = 3;

  // Compacts the input buffer and blocks until more bytes arrive. False on hang-up.
  bool Receive() noexcept {
    // Compacted only when the largest message might not fit behind what is buffered: a
    // large WRITE that comes in pieces is then never moved, piece after piece.
    if (input_begin_ > 0 &&
        (input_begin_ == input_end_ || input_.capacity() - input_end_ < kHeaderBytes + kMaxPayload)) {
      const std::size_t pending = input_end_ - input_begin_;
      std::memmove(input_.data(), input_.data() + input_begin_, pending);
      input_begin_ = 0;
      input_end_ = pending;
    }
    if (!hello_) {
      // A connection that has not said HELLO holds a thread only until its deadline.
      if (const int rc = WaitReadable(fd_, hello_deadline_); rc != 0) {
        LogDebug("peer session %llu: no HELLO in time, hanging up", Id());
        return false;
      }
    }
    const bool spin = hello_ && (served_since_receive_ < kSpinBelowBatch || read_since_receive_);
    served_since_receive_ = 0;
    read_since_receive_ = false;
    std::byte* const free_space = input_.data() + input_end_;
    const std::size_t free_bytes = input_.capacity() - input_end_;
    const std::chrono::microseconds spin_for = spin ? kRequestSpin : std::chrono::microseconds(0);
    long n;
    if (realtime_) {
      // Serve under SCHED_FIFO, wait under the ordinary policy (LenderOptions::realtime),
      // unless requests are already here.
      n = ::recv(fd_, free_space, free_bytes, MSG_DONTWAIT);
      if (n < 0) n = -errno;
      if (n == -EAGAIN || n == -EINTR) {
        UseOrdinaryScheduling();
        n = ReceiveSome(fd_, free_space, free_bytes, spin_for);
        EnterRealtime();
      }
    } else {
      n = ReceiveSome(fd_, free_space, free_bytes, spin_for);
    }
    if (n <= 0) return false;
    input_end_ += static_cast<std::size_t>(n);
    return true;
  }

  // Moves the thread to SCHED_FIFO; when the kernel refuses, serves as usual from then on
  // and warns (once per lender).
  void EnterRealtime() noexcept {
    const int error = UseRealtimeScheduling();
    if (error == 0) return;
    realtime_ = false;
    if (!service_.realtime_warned_.exchange(true)) {
      LogError("warning: lender: no real-time scheduling (%s; needs CAP_SYS_NICE): under memory "
               "pressure on this host, replies to borrowers may stall",
               std::strerror(error));
    }
  }

  // Sends a failed reply whose payload is the formatted error text.
  [[gnu::format(printf, 4, 5)]] bool Refuse(const Message& request, Status status,
                                            const char* format, ...) noexcept {
    char* text = reinterpret_cast<char*>(Body());
    va_list args;
    va_start(args, format);
    const int n = std::vsnprintf(text, kMaxErrorText + 1, format, args);
    va_end(args);
    const std::size_t length = n < 0 ? 0 : std::min<std::size_t>(n, kMaxErrorText);
    return Send(request, status, length);
  }

  // Refuses a request whose payload has the wrong size (see CheckPayload).
  bool RefuseLength(const Message& request, Status status, std::size_t expected) noexcept {
    return Refuse(request, status, "%s carries %u payload bytes, expected %zu",
                  RequestName(request.type), request.payload_bytes, expected);
  }

  // Handles one complete request. Returns false to hang up.
  bool Serve(const Message& request) noexcept {
    const MessageType type = request.type;
    if (!hello_ && type != MessageType::kHello) {
      return Refuse(request, Status::kProtocol, "send HELLO before %s", RequestName(type));
    }
    const std::uint32_t allowed_flags = type == MessageType::kPut     ? kPutEphemeral
                                        : type == MessageType::kHello ? kHelloResume | kHelloForget
                                                                      : 0;
    switch (type) {
      case MessageType::kHello:
      case MessageType::kQuery:
      case MessageType::kAllocSuperpage:
      case MessageType::kFreeSuperpage:
      case MessageType::kWrite:
      case MessageType::kRead:
      case MessageType::kPut:
      case MessageType::kGet:
      case MessageType::kFlush:
      case MessageType::kDestroyPool:
      case MessageType::kGoodbye:
        if ((request.flags & ~allowed_flags) != 0) {
          return Refuse(request, Status::kInvalid, "%s with unknown flags 0x%x",
                        RequestName(type), request.flags & ~allowed_flags);
        }
        break;
      default:
        return Refuse(request, Status::kUnsupported, "unknown request type %u",
                      static_cast<unsigned>(type));
    }
    switch (type) {
      case MessageType::kHello: return Hello(request);
      case MessageType::kQuery: return Query(request);
      case MessageType::kAllocSuperpage: return AllocSuperpage(request);
      case MessageType::kFreeSuperpage: return FreeSuperpage(request);
      case MessageType::kWrite: return Write(request);
      case MessageType::kRead: return Read(request);
      case MessageType::kPut: return Put(request);
      case MessageType::kGet: return Get(request);
      case MessageType::kFlush: return Flush(request);
      case MessageType::kDestroyPool: return DestroyPool(request);
      case MessageType::kGoodbye: return Goodbye(request);
      default: return true;  // handled above
    }
  }

  // HELLO: the first one greets (a new session with its secret, or a parked one resumed);
  // a later one is answered again, without RESUME.
  bool Goodbye(const Message& request) noexcept {
    if (const Status s = CheckPayload(request, 0); s != Status::kOk) {
      return RefuseLength(request, s, 0);
    }
    {
      std::lock_guard lock(service_.mu_);
      session_.leaving = true;
    }
    return Send(request, Status::kOk, 0);
  }

  bool Hello(const Message& request) noexcept {
    const bool forget = (request.flags & kHelloForget) != 0;
    if (forget && (request.flags & kHelloResume) != 0) {
      return Refuse(request, Status::kInvalid, "HELLO may not both resume and forget a session");
    }
    const bool resume = (request.flags & (kHelloResume | kHelloForget)) != 0;
    const std::size_t expected = sizeof(HelloBody) + (resume ? sizeof(ResumeBody) : 0);
    if (const Status s = CheckPayload(request, expected); s != Status::kOk) {
      return RefuseLength(request, s, expected);
    }
    if (resume && hello_) {
      return Refuse(request, Status::kInvalid,
                    "RESUME and FORGET are only for a connection's first HELLO");
    }
    HelloBody borrower;
    DecodeBody(Payload(request), &borrower);
    bool resumed = false;
    std::uint32_t superpages = 0;
    if (!hello_) {
      LogDebug("peer session %llu: borrower node %016llx", Id(),
               static_cast<unsigned long long>(borrower.node_id));
      std::array<std::uint8_t, kSecretBytes> secret{};
      if (resume) {
        ResumeBody body;
        DecodeBody(Payload(request).subspan(sizeof(HelloBody)), &body);
        std::memcpy(secret.data(), body.secret, kSecretBytes);
      }
      std::string refusal;
      try {
        resumed = service_.Greet(session_, borrower.node_id, resume ? &secret : nullptr, forget,
                                 &superpages, &refusal);
      } catch (const std::exception&) {  // std::bad_alloc
        refusal = "the lender has no memory for another session";
      }
      if (!refusal.empty()) {
        Refuse(request, Status::kTooManyBorrowers, "%s", refusal.c_str());
        return false;
      }
      if (!GrowBuffers()) {
        LogError("lender: no memory for the buffers of session %llu, hanging up", Id());
        Refuse(request, Status::kNoSpace, "the lender has no memory for another session");
        return false;
      }
    } else {
      superpages = service_.pool_.SuperpagesOf(session_.id.load(std::memory_order_relaxed));
    }
    if (!hello_ && service_.options_.realtime) {
      realtime_ = true;
      EnterRealtime();
    }
    hello_ = true;
    const HelloBody reply{service_.node_id_, service_.pool_.pool_bytes(), kSuperpageBytes,
                          kCapPassive | kCapActive};
    SessionTicket ticket{};
    {
      std::lock_guard lock(service_.mu_);
      if (session_.has_secret) {
        std::memcpy(ticket.secret, session_.secret.data(), kSecretBytes);
        ticket.grace_ms = static_cast<std::uint32_t>(std::min<std::int64_t>(
            service_.options_.borrower_grace.count(), UINT32_MAX));
      }
    }
    ticket.superpages = superpages;
    // A resumed session's superpages are listed after the ticket (the borrower may not know
    // of one granted as its connection broke). The reply buffer holds a superpage's worth.
    std::size_t listed_bytes = 0;
    if (resumed) {
      constexpr std::size_t kBefore = kHeaderBytes + sizeof(reply) + sizeof(ticket);
      const std::size_t free = replies_.capacity() - replies_.size();
      const std::size_t room =
          std::min<std::size_t>(std::size_t{kMaxListedSuperpages} * sizeof(std::uint32_t),
                                free > kBefore ? free - kBefore : 0);
      if (const std::optional<std::uint32_t> listed = service_.pool_.ListSuperpages(
              session_.id.load(std::memory_order_relaxed),
              std::span(Body() + sizeof(reply) + sizeof(ticket), room))) {
        ticket.superpages = *listed;
        listed_bytes = std::size_t{*listed} * sizeof(std::uint32_t);
      }
    }
    EncodeBody(reply, Body());
    EncodeBody(ticket, Body() + sizeof(reply));
    Send(request, Status::kOk, sizeof(reply) + sizeof(ticket) + listed_bytes,
         resumed ? kHelloResumed : 0);
    if (!resumed) return true;
    // RECLAIMs the session missed while parked are asked again, after the HELLO reply (which
    // goes out now), never before it.
    if (!Flush()) return false;
    service_.AskAgain(session_);
    return true;
  }

  bool Query(const Message& request) noexcept {
    if (const Status s = CheckPayload(request, 0); s != Status::kOk) {
      return RefuseLength(request, s, 0);
    }
    const LenderPoolStats stats = service_.pool_.Stats(session_.id.load(std::memory_order_relaxed));
    // Under a per-borrower limit the free pages the caller sees are what it may still take.
    std::uint64_t free_pages = stats.free_pages;
    if (const std::uint64_t limit = service_.options_.max_superpages_per_borrower) {
      const std::uint64_t held =
          service_.NodeSuperpages(session_.node_id.load(std::memory_order_relaxed));
      free_pages = std::min(free_pages, (limit > held ? limit - held : 0) * kPagesPerSuperpage);
    }
    const QueryReply reply{stats.total_pages, free_pages, stats.caller_pages, stats.borrowers,
                           kPagesPerSuperpage};
    EncodeBody(reply, Body());
    return Send(request, Status::kOk, sizeof(reply));
  }

  bool AllocSuperpage(const Message& request) noexcept {
    if (const Status s = CheckPayload(request, 0); s != Status::kOk) {
      return RefuseLength(request, s, 0);
    }
    if (service_.shutting_down_.load(std::memory_order_acquire)) {
      return Refuse(request, Status::kShuttingDown, "the lender is shutting down");
    }
    if (const std::uint64_t limit = service_.options_.max_superpages_per_borrower) {
      const std::uint64_t node = session_.node_id.load(std::memory_order_relaxed);
      // Two sessions of one node asking at once may both pass: the limit then holds within
      // a superpage per session, still bounded.
      if (service_.NodeSuperpages(node) >= limit) {
        return Refuse(request, Status::kNoSpace,
                      "borrower node %016llx holds its limit of %llu superpages "
                      "(--max-lend-per-borrower)",
                      static_cast<unsigned long long>(node),
                      static_cast<unsigned long long>(limit));
      }
    }
    SuperpageBody reply{};
    const Status status = service_.pool_.AllocSuperpage(session_.id, &reply.sid);
    if (status != Status::kOk) return Refuse(request, status, "no free superpage");
    EncodeBody(reply, Body());
    return Send(request, Status::kOk, sizeof(reply));
  }

  bool FreeSuperpage(const Message& request) noexcept {
    if (const Status s = CheckPayload(request, sizeof(SuperpageBody)); s != Status::kOk) {
      return RefuseLength(request, s, sizeof(SuperpageBody));
    }
    SuperpageBody body;
    DecodeBody(Payload(request), &body);
    const Status status = service_.pool_.FreeSuperpage(session_.id, body.sid);
    if (status != Status::kOk) {
      return Refuse(request, status, "superpage %u is not this session's", body.sid);
    }
    return Send(request, Status::kOk, 0);
  }

  // The refusal text for a failed WRITE or READ.
  bool RefuseRange(const Message& request, Status status, const RangeBody& range) noexcept {
    if (status == Status::kNotPermitted) {
      return Refuse(request, status, "superpage %u is not this session's", range.sid);
    }
    return Refuse(request, status,
                  "%s of %u bytes at offset %u: not whole 4 KiB pages inside the superpage",
                  RequestName(request.type), range.length, range.offset);
  }

  bool Write(const Message& request) noexcept {
    RangeBody range;
    if (!DecodeBody(Payload(request), &range) ||
        std::uint64_t{request.payload_bytes} != sizeof(RangeBody) + std::uint64_t{range.length}) {
      return Refuse(request, Status::kInvalid,
                    "WRITE carries %u payload bytes, expected 16 plus the range's length",
                    request.payload_bytes);
    }
    const Status status = service_.pool_.Write(
        session_.id, range, Payload(request).subspan(sizeof(RangeBody)));
    if (status != Status::kOk) return RefuseRange(request, status, range);
    return Send(request, Status::kOk, 0);
  }

  bool Read(const Message& request) noexcept {
    if (request.payload_bytes != sizeof(RangeBody)) {
      return RefuseLength(request, Status::kInvalid, sizeof(RangeBody));
    }
    RangeBody range;
    DecodeBody(Payload(request), &range);
    // The reply's body is sent from the pool itself (Flush), not copied here first.
    std::byte* at = nullptr;
    const Status status = service_.pool_.Locate(session_.id, range, &at);
    if (status != Status::kOk) return RefuseRange(request, status, range);
    std::byte* header = replies_.Extend(kHeaderBytes);
    EncodeHeader(request.type, true, 0, Status::kOk, request.tag, range.length,
                 HeaderSpan(header));
    pool_bodies_[pool_body_count_++] = {replies_.size(), at, range.length};
    pool_bytes_ += range.length;
    return true;
  }

  bool Put(const Message& request) noexcept {
    constexpr std::size_t kExpected = sizeof(HandleBody) + kPageBytes;
    if (const Status s = CheckPayload(request, kExpected); s != Status::kOk) {
      return RefuseLength(request, s, kExpected);
    }
    HandleBody handle;
    DecodeBody(Payload(request), &handle);
    if ((request.flags & kPutEphemeral) == 0) {
      // Pages that must not be dropped belong in granted superpages (the passive protocol).
      return Refuse(request, Status::kUnsupported,
                    "persistent pools are not served: PUT takes the EPHEMERAL flag; keep "
                    "pages that must come back in granted superpages");
    }
    const Status status = service_.pool_.Put(
        session_.id, handle,
        std::span<const std::byte, kPageBytes>(payload_ + sizeof(HandleBody), kPageBytes));
    if (status != Status::kOk) {
      return Refuse(request, status, "no room for the page (or the session has %zu pools, the "
                    "most a lender keeps for one borrower)", LenderPool::kMaxPoolsPerSession);
    }
    return Send(request, Status::kOk, 0);
  }

  bool Get(const Message& request) noexcept {
    if (const Status s = CheckPayload(request, sizeof(HandleBody)); s != Status::kOk) {
      return RefuseLength(request, s, sizeof(HandleBody));
    }
    HandleBody handle;
    DecodeBody(Payload(request), &handle);
    const Status status = service_.pool_.Get(
        session_.id, handle, std::span<std::byte, kPageBytes>(Body(), kPageBytes));
    // A miss is routine for ephemeral pools: no text.
    if (status != Status::kOk) return Send(request, status, 0);
    return Send(request, Status::kOk, kPageBytes);
  }

  bool Flush(const Message& request) noexcept {
    if (const Status s = CheckPayload(request, sizeof(HandleBody)); s != Status::kOk) {
      return RefuseLength(request, s, sizeof(HandleBody));
    }
    HandleBody handle;
    DecodeBody(Payload(request), &handle);
    return Send(request, service_.pool_.Flush(session_.id, handle), 0);
  }

  bool DestroyPool(const Message& request) noexcept {
    if (const Status s = CheckPayload(request, sizeof(HandleBody)); s != Status::kOk) {
      return RefuseLength(request, s, sizeof(HandleBody));
    }
    HandleBody handle;
    DecodeBody(Payload(request), &handle);
    return Send(request, service_.pool_.DestroyPool(session_.id, handle.pool), 0);
  }

  // Gives a session that said HELLO its full-size buffers, keeping what they hold. False
  // if there is no memory for them (nothing changed then).
  bool GrowBuffers() noexcept {
    try {
      ByteBuffer input(kInputBytes);
      const std::size_t pending = input_end_ - input_begin_;
      std::memcpy(input.data(), input_.data() + input_begin_, pending);
      replies_.Reserve(kReplyBytes);
      input_ = std::move(input);
      input_begin_ = 0;
      input_end_ = pending;
      return true;
    } catch (const std::bad_alloc&) {
      return false;
    }
  }

  LenderService& service_;
  Session& session_;
  const int fd_;
  const Deadline hello_deadline_;
  // Received bytes [input_begin_, input_end_) not yet served; holds a whole largest
  // message, so a request is always served from here.
  ByteBuffer input_;
  std::size_t input_begin_ = 0;
  std::size_t input_end_ = 0;
  // Whether requests are served under SCHED_FIFO: asked for by LenderOptions::realtime and
  // turned on at HELLO (a connection that has not said HELLO gets no real-time service).
  bool realtime_ = false;
  unsigned served_since_receive_ = 0;  // requests served since the last Receive
  bool read_since_receive_ = false;    // and whether a READ or GET was among them
  const std::byte* payload_ = nullptr;  // the current request's payload, inside input_
  ByteBuffer replies_;                  // replies built and not yet sent
  // READ replies whose body goes out straight from the pool: the body follows byte `at` of
  // replies_ (the end of its header). Sent by Flush before any other request is served.
  struct PoolBody {
    std::size_t at;
    const std::byte* data;
    std::size_t length;
  };
  static constexpr std::size_t kMaxPoolBodies = 256;
  std::array<PoolBody, kMaxPoolBodies> pool_bodies_{};
  std::size_t pool_body_count_ = 0;
  std::size_t pool_bytes_ = 0;  // their bodies' bytes
  bool hello_ = false;
};

LenderService::LenderService(const Endpoint& listen, std::uint64_t pool_bytes,
                             std::uint64_t node_id, const LenderOptions& options)
    : endpoint_(listen),
      node_id_(node_id),
      options_(options),
      pool_(pool_bytes),
      acceptor_(ListenOn(listen, options.access), "lender " + listen.ToString(),
                listen.kind == Endpoint::Kind::kTcp,
                [this](UniqueFd fd) { Accept(std::move(fd)); }) {
  pool_.SetEvictionHandler(
      [this](std::span<const Eviction> evictions) { NotifyEvicted(evictions); });
}

LenderService::~LenderService() { Stop(); }

void LenderService::Start() { acceptor_.Start(); }

void LenderService::Stop() {
  std::vector<std::shared_ptr<Session>> open;
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    shutting_down_.store(true, std::memory_order_release);
    open.reserve(sessions_.size());
    for (const auto& [id, session] : sessions_) open.push_back(session);
  }
  // Tell every borrower, without waiting long for anyone; then hang up: the threads see end
  // of stream.
  std::byte notice[kHeaderBytes + sizeof(ShutdownBody)];
  EncodeHeader(MessageType::kShutdown, false, 0, Status::kOk, 0, sizeof(ShutdownBody),
               HeaderSpan(notice));
  EncodeBody(ShutdownBody{0, 0}, notice + kHeaderBytes);
  NotifyAll(notice);
  for (const std::shared_ptr<Session>& session : open) {
    ::shutdown(session->fd.get(), SHUT_RDWR);
  }
  // Stop accepting; the listener closes, so new borrowers are refused, not left waiting.
  acceptor_.Stop();
  // No new sessions can appear now; wait for the ones winding down.
  {
    std::unique_lock lock(mu_);
    threads_done_.wait(lock, [this] { return threads_ == 0; });
  }
  if (endpoint_.kind == Endpoint::Kind::kUnix) ::unlink(endpoint_.path.c_str());
}

void LenderService::NotifyAll(std::span<const std::byte> notice) {
  std::vector<std::shared_ptr<Session>> open;
  {
    std::lock_guard lock(mu_);
    open.reserve(sessions_.size());
    for (const auto& [id, session] : sessions_) open.push_back(session);
  }
  for (const std::shared_ptr<Session>& session : open) {
    if (session->finished.load(std::memory_order_acquire)) continue;
    // Polls rather than std::timed_mutex: its timed lock (pthread_mutex_clocklock) is
    // invisible to ThreadSanitizer in GCC 12, which then reports every unlock.
    std::unique_lock lock(session->send_mu, std::try_to_lock);
    const auto give_up = std::chrono::steady_clock::now() + kShutdownNoticeWait;
    while (!lock.owns_lock() && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      lock.try_lock();
    }
    if (!lock.owns_lock()) continue;
    // After what is left of a notice half sent; what the socket does not take now stays
    // for whoever writes next, so the stream keeps whole messages.
    try {
      session->unsent_tail.insert(session->unsent_tail.end(), notice.begin(), notice.end());
    } catch (const std::bad_alloc&) {
      continue;
    }
    if (const int rc = SendTailLocked(*session, /*wait=*/false); rc == -EAGAIN) {
      session->notices_waiting.store(true, std::memory_order_release);  // SendPendingReclaims
    } else if (rc != 0) {
      ::shutdown(session->fd.get(), SHUT_RDWR);
    }
  }
}

std::uint64_t LenderService::Drain(std::chrono::steady_clock::time_point deadline) {
  shutting_down_.store(true, std::memory_order_release);
  drain_deadline_ns_.store(deadline.time_since_epoch().count(), std::memory_order_release);
  draining_.store(true, std::memory_order_release);
  const auto now = std::chrono::steady_clock::now();
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count();
  std::byte notice[kHeaderBytes + sizeof(ShutdownBody)];
  EncodeHeader(MessageType::kShutdown, false, 0, Status::kOk, 0, sizeof(ShutdownBody),
               HeaderSpan(notice));
  EncodeBody(ShutdownBody{static_cast<std::uint32_t>(std::clamp<long long>(left, 0, 1 << 30)), 0},
             notice + kHeaderBytes);
  NotifyAll(notice);
  // A borrower that connects meanwhile gets SHUTTING_DOWN for any ALLOC_SUPERPAGE.
  for (;;) {
    const std::uint64_t held = Stats().held_pages;
    if (held == 0 || std::chrono::steady_clock::now() >= deadline) return held;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

void LenderService::Resize(std::uint64_t bytes, std::chrono::milliseconds deadline) {
  const auto superpages =
      static_cast<std::uint32_t>(std::min<std::uint64_t>(bytes / kSuperpageBytes, UINT32_MAX));
  const auto until = std::chrono::steady_clock::now() + deadline;
  for (const ReclaimRequest& request : pool_.Resize(superpages)) {
    NotifyReclaim(request.owner, request.sids, until);
  }
}

void LenderService::NotifyReclaim(SessionId owner, std::span<const std::uint32_t> sids,
                                  std::chrono::steady_clock::time_point deadline) noexcept {
  std::shared_ptr<Session> session;
  {
    std::lock_guard lock(mu_);
    const auto it = sessions_.find(owner);
    if (it != sessions_.end()) session = it->second;
  }
  if (!session || session->finished.load(std::memory_order_acquire)) return;
  {
    // Bounded: the SIDs are of superpages granted to this session, each asked back once.
    std::lock_guard lock(session->reclaim_mu);
    try {
      session->reclaims_unsent.reserve(session->reclaims_unsent.size() + sids.size());
    } catch (const std::bad_alloc&) {
      // Asked back and never told: the pool stays over its size until the session ends.
      LogError("lender: out of memory queueing RECLAIM for %zu superpage(s) of a borrower",
               sids.size());
      return;
    }
    for (const std::uint32_t sid : sids) session->reclaims_unsent.push_back({sid, deadline});
    session->notices_waiting.store(true, std::memory_order_release);
  }
  SendReclaims(*session);
}

void LenderService::SendPendingReclaims() noexcept {
  std::vector<std::shared_ptr<Session>> waiting;
  try {
    std::lock_guard lock(mu_);
    for (const auto& [id, session] : sessions_) {
      if (session->notices_waiting.load(std::memory_order_acquire)) waiting.push_back(session);
    }
  } catch (const std::bad_alloc&) {
    return;  // again in a second
  }
  for (const std::shared_ptr<Session>& session : waiting) {
    if (!session->finished.load(std::memory_order_acquire)) SendReclaims(*session);
  }
}

int LenderService::SendTailLocked(Session& session, bool wait) noexcept {
  std::vector<std::byte>& tail = session.unsent_tail;
  if (tail.empty()) return 0;
  if (wait) {
    const int rc = WriteFull(session.fd.get(), tail.data(), tail.size());
    tail.clear();
    return rc;
  }
  std::size_t sent = 0;
  while (sent < tail.size()) {
    const ssize_t n =
        ::send(session.fd.get(), tail.data() + sent, tail.size() - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) return -errno;
      break;
    }
    sent += static_cast<std::size_t>(n);
  }
  tail.erase(tail.begin(), tail.begin() + static_cast<std::ptrdiff_t>(sent));
  return tail.empty() ? 0 : -EAGAIN;
}

void LenderService::SendReclaims(Session& session) noexcept {
  // A thread writing a reply may be stuck on a full socket: then so would this one be.
  std::unique_lock send_lock(session.send_mu, std::try_to_lock);
  if (!send_lock.owns_lock()) return;
  if (const int rc = SendTailLocked(session, /*wait=*/false); rc != 0) {
    if (rc != -EAGAIN) ::shutdown(session.fd.get(), SHUT_RDWR);
    return;  // still full: the notices wait
  }
  std::lock_guard lock(session.reclaim_mu);
  // A notice names at most kReclaimBatch superpages (4 KiB of SIDs), all asked back with
  // the same deadline.
  constexpr std::size_t kReclaimBatch = 1024;
  std::byte notice[kHeaderBytes + sizeof(ReclaimBody) + kReclaimBatch * sizeof(std::uint32_t)];
  std::vector<Session::AskedBack>& asked = session.reclaims_unsent;
  const auto now = std::chrono::steady_clock::now();
  std::size_t sent = 0;
  bool full = false;
  while (sent < asked.size() && !full) {
    const auto deadline = asked[sent].deadline;
    std::size_t count = 0;
    std::byte* const sids = notice + kHeaderBytes + sizeof(ReclaimBody);
    while (count < kReclaimBatch && sent + count < asked.size() &&
           asked[sent + count].deadline == deadline) {
      std::memcpy(sids + count * sizeof(std::uint32_t), &asked[sent + count].sid,
                  sizeof(std::uint32_t));
      ++count;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now);
    const auto deadline_ms =
        static_cast<std::uint32_t>(std::clamp<long long>(left.count(), 0, 1 << 30));
    const auto payload =
        static_cast<std::uint32_t>(sizeof(ReclaimBody) + count * sizeof(std::uint32_t));
    EncodeHeader(MessageType::kReclaim, false, 0, Status::kOk, 0, payload, HeaderSpan(notice));
    EncodeBody(ReclaimBody{deadline_ms, static_cast<std::uint32_t>(count)},
               notice + kHeaderBytes);
    const std::size_t length = kHeaderBytes + payload;
    const ssize_t n = ::send(session.fd.get(), notice, length, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) break;  // later
    if (n < 0) {
      ::shutdown(session.fd.get(), SHUT_RDWR);  // the stream broke: the session ends
      asked.clear();
      break;
    }
    if (static_cast<std::size_t>(n) < length) {
      // Half sent: the rest goes first next time (or with the next reply), so no other
      // message comes between.
      try {
        session.unsent_tail.assign(notice + n, notice + length);
      } catch (const std::bad_alloc&) {
        ::shutdown(session.fd.get(), SHUT_RDWR);  // out of step: end the session
        asked.clear();
        break;
      }
      full = true;
    }
    sent += count;
  }
  asked.erase(asked.begin(), asked.begin() + static_cast<std::ptrdiff_t>(std::min(sent, asked.size())));
  session.notices_waiting.store(!asked.empty() || !session.unsent_tail.empty(),
                                 std::memory_order_release);
}

std::uint64_t LenderService::NodeSuperpages(std::uint64_t node_id) const {
  // The pool's lock under mu_, as for Stats (the lock order: mu_, then the pool's).
  std::lock_guard lock(mu_);
  std::uint64_t superpages = 0;
  for (const auto& [id, session] : sessions_) {
    if (session->node_id.load(std::memory_order_relaxed) == node_id) {
      superpages += pool_.SuperpagesOf(session->id.load(std::memory_order_relaxed));
    }
  }
  for (const auto& [id, entry] : parked_) {
    if (entry.node_id == node_id) superpages += pool_.SuperpagesOf(id);
  }
  return superpages;
}

std::vector<BorrowerHolding> LenderService::Holdings() const {
  std::vector<std::shared_ptr<Session>> open;
  {
    std::lock_guard lock(mu_);
    for (const auto& [id, session] : sessions_) open.push_back(session);
  }
  std::vector<BorrowerHolding> holdings;
  for (const std::shared_ptr<Session>& session : open) {
    const std::uint64_t pages = pool_.Stats(session->id.load()).caller_pages;
    if (pages == 0) continue;
    holdings.push_back({session->node_id.load(std::memory_order_relaxed), pages});
  }
  for (const ParkedSession& parked : Parked()) {
    if (parked.pages > 0) holdings.push_back({parked.node_id, parked.pages});
  }
  return holdings;
}

std::vector<ParkedSession> LenderService::Parked() const {
  std::vector<std::pair<SessionId, ParkedSession>> parked;
  {
    std::lock_guard lock(mu_);
    const auto now = std::chrono::steady_clock::now();
    for (const auto& [id, entry] : parked_) {
      parked.push_back({id, ParkedSession{entry.node_id, 0,
                                          std::chrono::duration_cast<std::chrono::milliseconds>(
                                              std::max(entry.deadline - now,
                                                       std::chrono::steady_clock::duration{}))}});
    }
  }
  std::vector<ParkedSession> result;
  for (auto& [id, session] : parked) {
    session.pages = pool_.Stats(id).caller_pages;
    result.push_back(session);
  }
  return result;
}

std::size_t LenderService::ExpireParked() {
  std::vector<std::pair<SessionId, std::uint64_t>> expired;
  {
    std::lock_guard lock(mu_);
    const auto now = std::chrono::steady_clock::now();
    for (auto it = parked_.begin(); it != parked_.end();) {
      if (it->second.deadline > now) {
        ++it;
        continue;
      }
      expired.push_back({it->first, it->second.node_id});  // reserved: at most max_borrowers
      it = parked_.erase(it);
    }
  }
  for (const auto& [id, node_id] : expired) {
    const std::uint32_t superpages = pool_.SuperpagesOf(id);
    pool_.ReleaseSession(id, /*scrub=*/true);
    LogError("lender %s: borrower node %016llx did not come back within %lld s; freed its %u "
             "superpages (zeroed)",
             endpoint_.ToString().c_str(), static_cast<unsigned long long>(node_id),
             static_cast<long long>(options_.borrower_grace.count() / 1000), superpages);
  }
  return expired.size();
}

void LenderService::AskAgain(Session& session) noexcept {
  if (draining_.load(std::memory_order_acquire)) {
    // It missed SHUTDOWN while its link was down: tell it now, with the time left.
    const auto deadline = std::chrono::steady_clock::time_point(
        std::chrono::steady_clock::duration(drain_deadline_ns_.load(std::memory_order_acquire)));
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          deadline - std::chrono::steady_clock::now())
                          .count();
    std::byte notice[kHeaderBytes + sizeof(ShutdownBody)];
    EncodeHeader(MessageType::kShutdown, false, 0, Status::kOk, 0, sizeof(ShutdownBody),
                 HeaderSpan(notice));
    EncodeBody(ShutdownBody{static_cast<std::uint32_t>(std::clamp<long long>(left, 0, 1 << 30)), 0},
               notice + kHeaderBytes);
    std::lock_guard lock(session.send_mu);
    try {
      session.unsent_tail.insert(session.unsent_tail.end(), notice, notice + sizeof(notice));
    } catch (const std::bad_alloc&) {
      return;
    }
    if (SendTailLocked(session, /*wait=*/false) == -EAGAIN) {
      session.notices_waiting.store(true, std::memory_order_release);
    }
  }
  try {
    const std::vector<std::uint32_t> asked = pool_.ReclaimingOf(session.id.load());
    if (asked.empty()) return;
    const auto deadline = std::chrono::steady_clock::now() + kResumedReclaimDeadline;
    std::lock_guard reclaim_lock(session.reclaim_mu);
    for (const std::uint32_t sid : asked) session.reclaims_unsent.push_back({sid, deadline});
    session.notices_waiting.store(true, std::memory_order_release);
  } catch (const std::bad_alloc&) {
    // Not asked again: the lender keeps them until the session ends.
  }
}

bool LenderService::Greet(Session& session, std::uint64_t node_id,
                          const std::array<std::uint8_t, kSecretBytes>* resume, bool forget,
                          std::uint32_t* superpages, std::string* refusal) {
  *superpages = 0;
  std::unique_lock lock(mu_);
  session.node_id.store(node_id, std::memory_order_relaxed);
  session.said_hello = true;
  if (resume != nullptr && forget) {
    // The borrower gave that session up (it counted its pages there as lost): free it now
    // rather than at the end of its grace period. A live one is hung up and ends unparked.
    for (const auto& [id, other] : sessions_) {
      if (other.get() == &session || !other->said_hello || !other->has_secret ||
          other->node_id.load(std::memory_order_relaxed) != node_id ||
          !SameSecret(other->secret, *resume)) {
        continue;
      }
      const std::shared_ptr<Session> held = other;
      held->leaving = true;
      ::shutdown(held->fd.get(), SHUT_RDWR);
      parked_cv_.wait_for(lock, kTakeOverWait,
                          [&] { return held->finished.load(std::memory_order_acquire); });
      break;
    }
    SessionId doomed = kNoSession;
    for (auto it = parked_.begin(); it != parked_.end(); ++it) {
      if (it->second.node_id == node_id && SameSecret(it->second.secret, *resume)) {
        doomed = it->first;
        parked_.erase(it);
        break;
      }
    }
    if (doomed != kNoSession) {
      lock.unlock();
      pool_.ReleaseSession(doomed, /*scrub=*/true);
      lock.lock();
    }
  } else if (resume != nullptr) {
    // A live session with this secret: its borrower lost its side of the connection and is
    // back before the lender noticed. Hang it up and wait for its thread to park it.
    for (const auto& [id, other] : sessions_) {
      if (other.get() == &session || !other->said_hello || !other->has_secret ||
          other->node_id.load(std::memory_order_relaxed) != node_id ||
          !SameSecret(other->secret, *resume)) {
        continue;
      }
      const SessionId old = id;
      const std::shared_ptr<Session> held = other;
      held->taken_over = true;
      ::shutdown(held->fd.get(), SHUT_RDWR);
      parked_cv_.wait_for(lock, kTakeOverWait, [&] {
        return parked_.count(old) != 0 || held->finished.load(std::memory_order_acquire);
      });
      break;  // sessions_ may have changed meanwhile
    }
    const auto now = std::chrono::steady_clock::now();
    for (auto it = parked_.begin(); it != parked_.end(); ++it) {
      if (it->second.node_id != node_id || !SameSecret(it->second.secret, *resume) ||
          it->second.deadline <= now) {
        continue;
      }
      // Take it over: this connection becomes that session, with its id in the pool.
      const SessionId fresh = session.id.load(std::memory_order_relaxed);
      const SessionId parked = it->first;
      auto node = sessions_.extract(fresh);  // re-keyed in place: nothing to allocate
      assert(!node.empty());
      node.key() = parked;
      session.id.store(parked, std::memory_order_relaxed);
      session.secret = it->second.secret;
      session.has_secret = true;
      parked_.erase(it);
      sessions_.insert(std::move(node));
      lock.unlock();
      *superpages = pool_.SuperpagesOf(parked);
      LogError("lender %s: borrower node %016llx resumed its session (%u superpages)",
               endpoint_.ToString().c_str(), static_cast<unsigned long long>(node_id),
               *superpages);
      return true;
    }
  }
  // A new session. With sessions parked, Accept let this connection in in case it resumed.
  if (sessions_.size() + parked_.size() > options_.max_borrowers) {
    *refusal = "this lender serves at most " + std::to_string(options_.max_borrowers) +
               " borrowers, counting those it keeps memory for until they come back "
               "(--max-borrowers); try again later";
    return false;
  }
  session.has_secret = NewSecret(&session.secret);
  return false;
}

LendingStats LenderService::Stats() const {
  const LenderPoolStats stats = pool_.Stats();
  return LendingStats{.total_bytes = stats.total_pages * kPageBytes,
                      .target_bytes = stats.target_pages * kPageBytes,
                      .max_bytes = stats.max_pages * kPageBytes,
                      .reclaiming_bytes = stats.reclaiming_pages * kPageBytes,
                      .used_bytes = stats.used_bytes,
                      .ephemeral_bytes = stats.ephemeral_pages * kPageBytes,
                      .borrowers = stats.borrowers,
                      .held_pages = stats.total_pages - stats.free_pages,
                      .draining = draining_.load(std::memory_order_acquire)};
}

unsigned LenderService::sessions() const {
  std::lock_guard lock(mu_);
  return static_cast<unsigned>(sessions_.size());
}

void LenderService::Accept(UniqueFd fd) {
  const timeval send_timeout{static_cast<time_t>(kSendTimeout.count()), 0};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &send_timeout, sizeof(send_timeout));
  std::string refusal;
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    // Parked sessions count; with some parked, a connection that may resume one is let in
    // up to the live limit, and refused at HELLO if it does not resume (Greet).
    if (sessions_.size() >= options_.max_borrowers ||
        (parked_.empty() && sessions_.size() + parked_.size() >= options_.max_borrowers)) {
      refusal = "this lender serves at most " + std::to_string(options_.max_borrowers) +
                " borrower connections at once (--max-borrowers); try again later";
    } else {
      std::shared_ptr<Session> session;
      // Undoes whatever of the session was made, so that the borrower can be told.
      const auto undo = [&] {
        if (!session) return;
        fd = std::move(session->fd);
        sessions_.erase(session->id);
      };
      try {
        session = std::make_shared<Session>();
        session->id.store(next_session_++, std::memory_order_relaxed);
        session->fd = std::move(fd);
        sessions_.emplace(session->id, session);
        // The thread's only reference is ServeSession's own, so the descriptor closes
        // where ServeSession drops it, not later with the thread's closure.
        std::thread([this, session]() mutable { ServeSession(std::move(session)); }).detach();
        ++threads_;
      } catch (const std::system_error& e) {
        undo();
        refusal = std::string("the lender cannot start a thread for this connection: ") +
                  e.what();
      } catch (const std::exception&) {  // std::bad_alloc, from any of the steps
        undo();
        refusal = "the lender has no memory for another connection";
      }
    }
  }
  if (!refusal.empty()) Refuse(std::move(fd), refusal);
}

void LenderService::Refuse(UniqueFd fd, const std::string& why) noexcept {
  if (!fd.valid()) return;
  // The reply answers the HELLO the borrower sends first, with the tag it gives that HELLO,
  // so it needs nothing read. Never blocks: the socket's buffer is empty.
  std::byte message[kHeaderBytes + kMaxErrorText];
  const std::size_t text_bytes = std::min<std::size_t>(why.size(), kMaxErrorText);
  EncodeHeader(MessageType::kHello, true, 0, Status::kTooManyBorrowers, 0,
               static_cast<std::uint32_t>(text_bytes), HeaderSpan(message));
  std::memcpy(message + kHeaderBytes, why.data(), text_bytes);
  [[maybe_unused]] const ssize_t sent =
      ::send(fd.get(), message, kHeaderBytes + text_bytes, MSG_DONTWAIT | MSG_NOSIGNAL);
  // End the stream after the reply; what the borrower sent meanwhile is dropped unread.
  ::shutdown(fd.get(), SHUT_WR);
  std::uint64_t held_back = 0;
  bool log = false;
  {
    std::lock_guard lock(mu_);
    log = refusals_.Allow(&held_back);
  }
  if (log) {
    LogError("lender %s: refused a borrower: %s%s", endpoint_.ToString().c_str(), why.c_str(),
             held_back == 0 ? ""
                            : (" (and " + std::to_string(held_back) +
                               " more since the last such message)").c_str());
  }
}

void LenderService::ServeSession(std::shared_ptr<Session> session) {
  char name[16];
  std::snprintf(name, sizeof(name), "ml-lend-%llu",
                static_cast<unsigned long long>(session->id.load()));
  SetThreadName(name);
  LogDebug("lender: session %llu opened", static_cast<unsigned long long>(session->id.load()));
  try {
    Connection connection(this, session.get());
    connection.Run();
  } catch (const std::bad_alloc&) {
    LogError("lender: out of memory for session %llu's buffers, hanging up",
             static_cast<unsigned long long>(session->id.load()));
  }
  // Hang up now and free what the session held, or park it for its borrower to resume; the
  // descriptor itself is closed when the last reference goes, so neither Stop() nor a
  // notice touches a reused number.
  ::shutdown(session->fd.get(), SHUT_RDWR);
  const SessionId id = session->id.load(std::memory_order_relaxed);
  const bool holds = pool_.Stats(id).caller_pages > 0;
  bool parked = false;
  bool taken_over = false;
  {
    std::lock_guard lock(mu_);
    taken_over = session->taken_over;
    if (holds && !stopping_ && session->has_secret && !session->leaving &&
        (options_.borrower_grace.count() > 0 || taken_over)) {
      // Taken over with no grace period: only for the resume that waits for it.
      const auto grace = options_.borrower_grace.count() > 0
                             ? options_.borrower_grace
                             : std::chrono::duration_cast<std::chrono::milliseconds>(kTakeOverWait);
      try {
        parked_.emplace(id, ParkedEntry{session->node_id.load(std::memory_order_relaxed),
                                   session->secret, std::chrono::steady_clock::now() + grace});
        parked = true;
      } catch (const std::bad_alloc&) {
      }
    }
    if (parked) {
      // In the same hold as parking: a resume may re-key the id to its own session as soon
      // as mu_ is released.
      session->finished.store(true, std::memory_order_release);
      sessions_.erase(id);
      parked_cv_.notify_all();
    }
  }
  if (!parked) pool_.ReleaseSession(id);
  if (parked && !taken_over) {
    LogError("lender %s: borrower node %016llx hung up; keeping its memory for %lld s for it to "
             "come back",
             endpoint_.ToString().c_str(),
             static_cast<unsigned long long>(session->node_id.load(std::memory_order_relaxed)),
             static_cast<long long>(options_.borrower_grace.count() / 1000));
  }
  LogDebug("lender: session %llu closed", static_cast<unsigned long long>(id));
  session->finished.store(true, std::memory_order_release);
  std::lock_guard lock(mu_);
  if (!parked) sessions_.erase(id);
  parked_cv_.notify_all();
  session.reset();  // the descriptor closes here, unless a notice is being sent on it
  --threads_;
  // Notified under mu_, and nothing of the service is touched once mu_ is released: from
  // then on Stop() may return and the service be destroyed. (notify_all_at_thread_exit
  // releases the lock first and notifies after, on a condition variable that may be gone
  // by then: the notify wrote into whatever the memory held next.)
  threads_done_.notify_all();
}

void LenderService::NotifyEvicted(std::span<const Eviction> evictions) noexcept {
  constexpr std::size_t kNoticeBytes = kHeaderBytes + sizeof(HandleBody);
  constexpr std::size_t kBatch = 64;  // notices per write
  assert(evictions.size() <= kPagesPerSuperpage);
  std::array<bool, kPagesPerSuperpage> done{};
  std::byte batch[kBatch * kNoticeBytes];
  // One owner at a time, in the order they first appear: a reclaimed superpage holds the
  // pages of a few sessions, interleaved.
  for (std::size_t first = 0; first < evictions.size(); ++first) {
    if (done[first]) continue;
    const SessionId owner = evictions[first].owner;
    std::shared_ptr<Session> session;
    {
      std::lock_guard lock(mu_);
      const auto it = sessions_.find(owner);
      if (it != sessions_.end()) session = it->second;
    }
    bool live = session && !session->finished.load(std::memory_order_acquire);
    std::unique_lock<std::mutex> send_lock;
    std::size_t queued = 0;
    const auto send_queued = [&] {
      if (!send_lock.owns_lock()) send_lock = std::unique_lock(session->send_mu);
      if (SendTailLocked(*session, /*wait=*/true) != 0 ||
          WriteFull(session->fd.get(), batch, queued * kNoticeBytes) != 0) {
        // Maybe half a message went out: the stream is out of step, so end the session.
        ::shutdown(session->fd.get(), SHUT_RDWR);
        live = false;
      }
      queued = 0;
    };
    for (std::size_t i = first; i < evictions.size(); ++i) {
      if (done[i] || evictions[i].owner != owner) continue;
      done[i] = true;
      if (!live) continue;
      std::byte* notice = batch + queued * kNoticeBytes;
      EncodeHeader(MessageType::kEvicted, false, 0, Status::kOk, 0, sizeof(HandleBody),
                   HeaderSpan(notice));
      EncodeBody(evictions[i].handle, notice + kHeaderBytes);
      if (++queued == kBatch) send_queued();
    }
    if (live && queued > 0) send_queued();
  }
}

}  // namespace memlend::peer
