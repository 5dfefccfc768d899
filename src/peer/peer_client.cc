#include "peer/peer_client.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <poll.h>
#include <sched.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "common/log.h"
#include "common/thread_name.h"

namespace memlend::peer {
namespace {

void SetTimeout(int fd, int option, std::chrono::milliseconds timeout) {
  timeval tv{static_cast<time_t>(timeout.count() / 1000),
             static_cast<suseconds_t>((timeout.count() % 1000) * 1000)};
  ::setsockopt(fd, SOL_SOCKET, option, &tv, sizeof(tv));
}
void SetReceiveTimeout(int fd, std::chrono::milliseconds timeout) {
  SetTimeout(fd, SO_RCVTIMEO, timeout);
}

std::int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

// Reads a stream socket through a buffer, so that a burst of small replies costs one
// system call rather than two per reply. Large payloads (kDirectBytes) bypass the buffer.
class StreamReader {
 public:
  explicit StreamReader(int fd) : fd_(fd), buffer_(kCapacity) {}

  // Fills `out` with the next out.size() bytes, busy-polling up to `spin` before blocking
  // when the socket has none yet. Returns false at end of stream or on error.
  bool Read(std::span<std::byte> out, std::chrono::microseconds spin = {}) {
    // An empty payload (most replies, some notices) may come as an empty span whose data()
    // is null, which memcpy must never see, even for no bytes.
    if (out.empty()) return true;
    std::size_t have = std::min(out.size(), end_ - begin_);
    std::memcpy(out.data(), buffer_.data() + begin_, have);
    begin_ += have;
    if (have == out.size()) return true;
    begin_ = end_ = 0;  // the buffer is empty
    const std::span<std::byte> rest = out.subspan(have);
    if (rest.size() >= kDirectBytes) return ReadFull(fd_, rest.data(), rest.size()) == 0;
    while (end_ < rest.size()) {
      const long got = ReceiveSome(fd_, buffer_.data() + end_, kCapacity - end_, spin);
      if (got <= 0) return false;
      end_ += static_cast<std::size_t>(got);
    }
    std::memcpy(rest.data(), buffer_.data(), rest.size());
    begin_ = rest.size();
    return true;
  }

  // Whether bytes are buffered.
  bool Buffered() const { return begin_ < end_; }

  // When nothing is buffered, receives what the socket has, busy-polling up to `spin` and
  // then waiting until `deadline`. Returns 0 (bytes are buffered now), -ETIMEDOUT (none
  // came; nothing changed) or another -errno / -ECONNRESET (the stream is over).
  int Fill(std::chrono::microseconds spin, std::chrono::steady_clock::time_point deadline) {
    if (Buffered()) return 0;
    begin_ = end_ = 0;
    const auto spin_until = std::chrono::steady_clock::now() + spin;
    bool spinning = spin.count() > 0;
    for (;;) {
      const ssize_t n = ::recv(fd_, buffer_.data(), kCapacity, MSG_DONTWAIT);
      if (n > 0) {
        end_ = static_cast<std::size_t>(n);
        return 0;
      }
      if (n == 0) return -ECONNRESET;
      if (errno == EINTR) continue;
      if (errno != EAGAIN) return -errno;
      if (spinning && std::chrono::steady_clock::now() < spin_until) {
        // Let a thread that is ready to run on this CPU have it: it may be the very one
        // that is to send what we wait for.
        ::sched_yield();
        continue;
      }
      spinning = false;
      if (const int rc = WaitReadable(fd_, deadline); rc != 0) return rc;
    }
  }

  // Whether bytes are buffered, or the socket has some to read now.
  bool Ready() const {
    if (begin_ < end_) return true;
    pollfd ready{fd_, POLLIN, 0};
    return ::poll(&ready, 1, 0) > 0;
  }

  // Reads and drops `length` bytes.
  bool Skip(std::uint32_t length) {
    std::byte scratch[4096];
    while (length > 0) {
      const std::uint32_t chunk = std::min<std::uint32_t>(length, sizeof(scratch));
      if (!Read(std::span(scratch, chunk))) return false;
      length -= chunk;
    }
    return true;
  }

 private:
  static constexpr std::size_t kCapacity = 256 * 1024;
  // A payload at least this long goes straight from the socket to its destination: one more
  // system call, one copy less (a READ of four pages and more: a readahead cluster, a
  // window fetched ahead).
  static constexpr std::size_t kDirectBytes = 16 * 1024;
  const int fd_;
  std::vector<std::byte> buffer_;
  std::size_t begin_ = 0;  // unread bytes are [begin_, end_)
  std::size_t end_ = 0;
};

PeerClient::PeerClient(const Endpoint& endpoint, std::uint64_t node_id, NoticeHandler on_notice,
                       const PeerClientOptions& options)
    : endpoint_(endpoint), on_notice_(std::move(on_notice)), options_(options) {
  const std::string name = "peer " + endpoint.ToString();
  const std::chrono::milliseconds timeout = options.connect_timeout;
  std::string reason;
  fd_ = ConnectTo(endpoint, &reason, std::chrono::steady_clock::now() + timeout);
  if (!fd_.valid()) {
    if (reason == std::strerror(ECONNREFUSED) || reason == std::strerror(ENOENT)) {
      throw NothingListening(name + " is unreachable: " + reason);
    }
    throw std::runtime_error(name + " is unreachable: " + reason);
  }

  // HELLO, synchronously, before the reader thread exists.
  SetReceiveTimeout(fd_.get(), timeout);
  SetTimeout(fd_.get(), SO_SNDTIMEO, timeout);
  std::byte request[sizeof(Header) + sizeof(HelloBody) + sizeof(ResumeBody)];
  const HelloBody hello{node_id, 0, kSuperpageBytes, kCapPassive | kCapActive};
  const std::optional<SessionSecret>& named = options.resume ? options.resume : options.forget;
  const std::uint32_t flags = options.resume ? kHelloResume : options.forget ? kHelloForget : 0;
  const std::size_t body_bytes = sizeof(HelloBody) + (named ? sizeof(ResumeBody) : 0);
  EncodeHeader(MessageType::kHello, false, flags, Status::kOk, 0,
               static_cast<std::uint32_t>(body_bytes),
               std::span<std::byte, sizeof(Header)>(request, sizeof(Header)));
  EncodeBody(hello, request + sizeof(Header));
  if (named) {
    ResumeBody resume{};
    std::memcpy(resume.secret, named->data(), kSecretBytes);
    EncodeBody(resume, request + sizeof(Header) + sizeof(HelloBody));
  }
  if (WriteFull(fd_.get(), request, sizeof(Header) + body_bytes) != 0) {
    throw std::runtime_error(name + " hung up during HELLO");
  }
  std::byte wire[sizeof(Header)];
  if (ReadFull(fd_.get(), wire, sizeof(wire)) != 0) {
    throw std::runtime_error(name + " did not answer HELLO (is it a memlend lender?)");
  }
  Message reply;
  switch (DecodeHeader(wire, &reply)) {
    case HeaderCheck::kOk:
      break;
    case HeaderCheck::kBadVersion:
      throw std::runtime_error(name + " speaks peer protocol version " +
                               std::to_string(reply.version) + ", this daemon speaks " +
                               std::to_string(kVersion));
    default:
      throw std::runtime_error(name + " is not a memlend lender (bad reply header)");
  }
  std::vector<std::byte> payload(reply.payload_bytes);
  if (!payload.empty() && ReadFull(fd_.get(), payload.data(), payload.size()) != 0) {
    throw std::runtime_error(name + " hung up during HELLO");
  }
  if (reply.status != Status::kOk) {
    const std::string text(reinterpret_cast<const char*>(payload.data()),
                           std::min<std::size_t>(payload.size(), kMaxErrorText));
    throw std::runtime_error(name + " refused HELLO: " + StatusText(reply.status) +
                             (text.empty() ? "" : " (" + text + ")"));
  }
  if (!reply.reply || reply.type != MessageType::kHello ||
      !DecodeBody(std::span<const std::byte>(payload), &lender_)) {
    throw std::runtime_error(name + " sent a malformed HELLO reply");
  }
  // A lender that keeps no session after a disconnect sends no ticket.
  if (SessionTicket ticket; DecodeBody(std::span<const std::byte>(payload).subspan(sizeof(HelloBody)),
                                       &ticket)) {
    std::memcpy(session_.secret.data(), ticket.secret, kSecretBytes);
    session_.grace = std::chrono::milliseconds(ticket.grace_ms);
    session_.resumed = options.resume && (reply.flags & kHelloResumed) != 0;
    session_.superpages = ticket.superpages;
    const std::span<const std::byte> list =
        std::span<const std::byte>(payload).subspan(sizeof(HelloBody) + sizeof(SessionTicket));
    if (session_.resumed && !list.empty()) {
      // Exactly one id per superpage, and never more than fit in a reply.
      if (ticket.superpages > kMaxListedSuperpages ||
          list.size() != std::size_t{ticket.superpages} * sizeof(std::uint32_t)) {
        throw std::runtime_error(name + " sent a malformed HELLO reply (superpage list of " +
                                 std::to_string(list.size()) + " bytes for " +
                                 std::to_string(ticket.superpages) + " superpages)");
      }
      session_.superpage_ids.resize(ticket.superpages);
      std::memcpy(session_.superpage_ids.data(), list.data(), list.size());
      std::vector<std::uint32_t> sorted = session_.superpage_ids;
      std::sort(sorted.begin(), sorted.end());
      if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
        throw std::runtime_error(name + " sent a malformed HELLO reply (a superpage listed twice)");
      }
      session_.listed = true;
    }
  }
  if (lender_.superpage_bytes != kSuperpageBytes) {
    throw std::runtime_error(name + " uses superpages of " +
                             std::to_string(lender_.superpage_bytes) + " bytes, expected " +
                             std::to_string(kSuperpageBytes));
  }
  // From now on a message that has begun must arrive in full, and a send must get room,
  // within the stall timeout; waits between messages are bounded by deadlines instead.
  SetReceiveTimeout(fd_.get(), options.stall_timeout);
  SetTimeout(fd_.get(), SO_SNDTIMEO, options.stall_timeout);
  if (endpoint.kind == Endpoint::Kind::kTcp) {
    const unsigned user_timeout = static_cast<unsigned>(options.stall_timeout.count());
    ::setsockopt(fd_.get(), IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, sizeof(user_timeout));
  }
  last_heard_ns_.store(NowNs(), std::memory_order_relaxed);
  stream_ = std::make_unique<StreamReader>(fd_.get());
  connected_.store(true, std::memory_order_release);
  idle_reader_ = std::thread([this] { IdleLoop(); });
}

PeerClient::~PeerClient() {
  {
    std::lock_guard lock(idle_mu_);
    stopping_.store(true, std::memory_order_release);
  }
  idle_wake_.notify_all();
  ::shutdown(fd_.get(), SHUT_RDWR);
  if (idle_reader_.joinable()) idle_reader_.join();
}

int PeerClient::Call(MessageType type, std::uint32_t flags, std::span<const std::byte> body,
                     std::span<const std::byte> data, std::span<std::byte> out) noexcept {
  Pending pending;
  pending.out = out;
  const int rc = Submit(type, flags, body, data, &pending);
  if (rc != 0) return rc;
  return Wait(&pending);
}

int PeerClient::SubmitRead(std::uint32_t sid, std::uint32_t offset, Pending* pending) noexcept {
  const RangeBody body{sid, offset, static_cast<std::uint32_t>(pending->out.size()), 0};
  return Submit(MessageType::kRead, 0, std::as_bytes(std::span<const RangeBody, 1>(&body, 1)),
                {}, pending);
}

int PeerClient::SubmitQuery(Pending* pending) noexcept {
  return Submit(MessageType::kQuery, 0, {}, {}, pending);
}

void PeerClient::Hangup() noexcept { ::shutdown(fd_.get(), SHUT_RDWR); }

int PeerClient::SubmitWrite(std::uint32_t sid, std::uint32_t offset,
                            std::span<const std::byte> data, Pending* pending) noexcept {
  const RangeBody body{sid, offset, static_cast<std::uint32_t>(data.size()), 0};
  return Submit(MessageType::kWrite, 0, std::as_bytes(std::span<const RangeBody, 1>(&body, 1)),
                data, pending);
}

std::uint64_t PeerClient::Register(Pending* pending) noexcept {
  auto fail = [pending](int error) {
    pending->result = error;
    pending->done.store(true, std::memory_order_release);
    return std::uint64_t{0};
  };
  const std::uint64_t tag = next_tag_.fetch_add(1, std::memory_order_relaxed);
  pending->tag = tag;
  if (options_.request_timeout.count() > 0) {
    pending->deadline = std::chrono::steady_clock::now() + options_.request_timeout;
  }
  std::lock_guard lock(pending_mu_);
  if (!connected()) return fail(-ENOTCONN);
  pending->transport = this;
  try {
    pending_.emplace(tag, pending);
  } catch (const std::bad_alloc&) {
    return fail(-ENOMEM);
  }
  return tag;
}

void PeerClient::SubmitBatch(std::span<const BatchedRequest> requests) noexcept {
  // Every request a batch carries has a 16-byte body (RangeBody or HandleBody).
  constexpr std::size_t kBodyBytes = 16;
  static_assert(sizeof(RangeBody) == kBodyBytes && sizeof(HandleBody) == kBodyBytes);
  struct Wire {
    std::byte header[sizeof(Header)];
    std::byte body[kBodyBytes];
  };
  static_assert(sizeof(Wire) == sizeof(Header) + kBodyBytes);
  assert(requests.size() <= RequestBatch::kMaxRequests);
  Wire wire[RequestBatch::kMaxRequests];
  iovec parts[2 * RequestBatch::kMaxRequests];
  int used = 0;
  for (std::size_t i = 0; i < requests.size(); ++i) {
    const BatchedRequest& request = requests[i];
    const std::uint64_t tag = Register(request.pending);
    if (tag == 0) continue;  // completed with the error already
    const bool range = request.type == MessageType::kRead || request.type == MessageType::kWrite;
    EncodeHeader(request.type, false, request.flags, Status::kOk, tag,
                 static_cast<std::uint32_t>(kBodyBytes + request.data.size()), wire[i].header);
    if (range) {
      std::memcpy(wire[i].body, &request.range, kBodyBytes);
    } else {
      std::memcpy(wire[i].body, &request.handle, kBodyBytes);
    }
    parts[used++] = {&wire[i], sizeof(Wire)};
    if (!request.data.empty()) {
      parts[used++] = {const_cast<std::byte*>(request.data.data()), request.data.size()};
    }
  }
  if (used == 0) return;
  int rc;
  {
    std::lock_guard lock(send_mu_);
    rc = WriteVectorFull(fd_.get(), parts, used);
  }
  // On failure the stream may hold half a message: hang up; the reader thread fails
  // every registered request, so each Wait still returns.
  if (rc != 0) ::shutdown(fd_.get(), SHUT_RDWR);
}

std::shared_ptr<PeerTransport> ConnectTcp(const TransportParams& params) {
  PeerClientOptions options;
  options.connect_timeout = params.connect_timeout;
  options.request_timeout = params.request_timeout;
  options.stall_timeout = params.stall_timeout;
  options.resume = params.resume;
  options.forget = params.forget;
  return std::make_shared<PeerClient>(params.endpoint, params.node_id, params.on_notice, options);
}

int PeerClient::Submit(MessageType type, std::uint32_t flags, std::span<const std::byte> body,
                       std::span<const std::byte> data, Pending* pending) noexcept {
  const std::uint64_t tag = Register(pending);
  if (tag == 0) return pending->result;

  std::byte header[sizeof(Header)];
  EncodeHeader(type, false, flags, Status::kOk, tag,
               static_cast<std::uint32_t>(body.size() + data.size()), header);
  iovec parts[3] = {{header, sizeof(header)},
                    {const_cast<std::byte*>(body.data()), body.size()},
                    {const_cast<std::byte*>(data.data()), data.size()}};
  int rc;
  {
    std::lock_guard lock(send_mu_);
    rc = WriteVectorFull(fd_.get(), parts, data.empty() ? (body.empty() ? 1 : 2) : 3);
  }
  if (rc != 0) {
    // The stream may hold half a message now: hang up; the reader fails everyone,
    // this request included, so the caller's Wait still returns.
    ::shutdown(fd_.get(), SHUT_RDWR);
  }
  return 0;
}

void PeerClient::AwaitReply(Pending* pending) noexcept {
  const auto deadline = pending->deadline;
  while (!pending->done.load(std::memory_order_acquire)) {
    // Another thread may be reading; it completes this request if its reply comes first.
    std::unique_lock lock(recv_mu_, std::defer_lock);
    if (deadline == std::chrono::steady_clock::time_point::max()) {
      lock.lock();
    } else if (!lock.try_lock_until(deadline)) {
      // Overdue while another thread reads. Unless that reader has taken the reply (it is
      // then completing it, within the stall timeout at worst), withdraw.
      {
        std::lock_guard pending_lock(pending_mu_);
        if (WithdrawLocked(pending, -ETIMEDOUT)) return;
      }
      while (!pending->done.load(std::memory_order_acquire)) pending->done.wait(false);
      return;
    }
    ReadOutcome outcome = ReadOutcome::kMessage;
    while (!pending->done.load(std::memory_order_acquire) && outcome == ReadOutcome::kMessage) {
      outcome = ended_ ? ReadOutcome::kEnd
                       : ReadMessageLocked(pending->spin ? kReplySpin : std::chrono::microseconds(0),
                                           deadline);
    }
    if (outcome == ReadOutcome::kEnd) {
      EndStreamLocked();  // fails every pending request, this one included
    } else if (outcome == ReadOutcome::kTimeout &&
               !pending->done.load(std::memory_order_acquire)) {
      std::lock_guard pending_lock(pending_mu_);
      WithdrawLocked(pending, -ETIMEDOUT);  // nobody else reads, so nobody has taken it
    }
  }
}

bool PeerClient::WithdrawLocked(Pending* pending, int error) noexcept {
  if (pending_.erase(pending->tag) == 0) return false;
  pending->result = error;
  pending->done.store(true, std::memory_order_release);
  if (error == -ETIMEDOUT) {
    std::int64_t none = 0;
    overdue_since_ns_.compare_exchange_strong(none, NowNs(), std::memory_order_relaxed);
  }
  return true;
}

void PeerClient::Complete(Pending* pending, int result) noexcept {
  pending->result = result;
  pending->done.store(true, std::memory_order_release);
  pending->done.notify_one();
}

std::chrono::steady_clock::time_point PeerClient::overdue_since() const noexcept {
  const std::int64_t ns = overdue_since_ns_.load(std::memory_order_relaxed);
  if (ns == 0) return std::chrono::steady_clock::time_point::min();
  return std::chrono::steady_clock::time_point(std::chrono::nanoseconds(ns));
}

std::chrono::steady_clock::time_point PeerClient::last_heard() const noexcept {
  return std::chrono::steady_clock::time_point(
      std::chrono::nanoseconds(last_heard_ns_.load(std::memory_order_relaxed)));
}

void PeerClient::IdleLoop() {
  SetThreadName("ml-peer-idle");
  // A few milliseconds of delay for notices that arrive while nothing waits is harmless;
  // a thread woken for every reply would cost a hand-off each time.
  constexpr auto kInterval = std::chrono::milliseconds(5);
  for (;;) {
    {
      // Waits rather than sleeps, so that the destructor does not wait out the interval.
      std::unique_lock lock(idle_mu_);
      if (idle_wake_.wait_for(lock, kInterval,
                              [this] { return stopping_.load(std::memory_order_acquire); })) {
        break;
      }
    }
    std::unique_lock lock(recv_mu_, std::try_to_lock);
    if (!lock.owns_lock() || ended_) continue;  // a waiting thread is reading
    while (stream_->Ready()) {
      if (ReadMessageLocked() == ReadOutcome::kEnd) {
        EndStreamLocked();
        break;
      }
    }
  }
  std::lock_guard lock(recv_mu_);
  EndStreamLocked();
}

void PeerClient::EndStreamLocked() noexcept {
  if (!ended_) {
    ended_ = true;
    ::shutdown(fd_.get(), SHUT_RDWR);
  }
  std::lock_guard lock(pending_mu_);
  connected_.store(false, std::memory_order_release);
  FailAllLocked(-ENOTCONN);
}

PeerClient::ReadOutcome PeerClient::ReadMessageLocked(
    std::chrono::microseconds spin, std::chrono::steady_clock::time_point deadline) noexcept {
  StreamReader& stream = *stream_;
  // Between messages: spin briefly, then wait until the deadline for the next one.
  if (const int rc = stream.Fill(spin, deadline); rc != 0) {
    return rc == -ETIMEDOUT ? ReadOutcome::kTimeout : ReadOutcome::kEnd;
  }
  std::byte wire[sizeof(Header)];
  if (!stream.Read(wire)) return ReadOutcome::kEnd;
  const auto arrived = std::chrono::steady_clock::now();
  last_heard_ns_.store(NowNs(), std::memory_order_relaxed);
  Message message;
  if (DecodeHeader(wire, &message) != HeaderCheck::kOk) {
    LogError("peer %s: malformed message, disconnecting", endpoint_.ToString().c_str());
    return ReadOutcome::kEnd;
  }
  if (!message.reply) {
    try {
      notice_.resize(message.payload_bytes);  // at most kMaxPayload (DecodeHeader checked)
    } catch (const std::bad_alloc&) {
      return ReadOutcome::kEnd;
    }
    if (!stream.Read(notice_)) return ReadOutcome::kEnd;
    if (on_notice_) on_notice_(message, notice_);
    return ReadOutcome::kMessage;
  }
  Pending* pending = nullptr;
  {
    std::lock_guard lock(pending_mu_);
    const auto it = pending_.find(message.tag);
    if (it != pending_.end()) {
      pending = it->second;
      pending_.erase(it);  // taken: from now on only this thread completes it
    }
  }
  if (pending == nullptr) {  // nobody waits for it (withdrawn, or a no-reply request)
    if (message.type == MessageType::kAllocSuperpage && message.tag != 0 &&
        message.status == Status::kOk && message.payload_bytes == sizeof(SuperpageBody)) {
      // A grant that came after its waiter gave up: the superpage is ours and unused.
      SuperpageBody body{};
      if (!stream.Read(std::as_writable_bytes(std::span<SuperpageBody, 1>(&body, 1)))) {
        return ReadOutcome::kEnd;
      }
      {
        std::lock_guard lock(late_mu_);
        if (late_grants_.size() < kMaxLateGrants) {
          try {
            late_grants_.push_back(body.sid);
          } catch (const std::bad_alloc&) {
            // It stays granted, and unused, until the session ends.
          }
        }
      }
      ReturnLateGrants(/*wait_to_send=*/false);
      return ReadOutcome::kMessage;
    }
    return stream.Skip(message.payload_bytes) ? ReadOutcome::kMessage : ReadOutcome::kEnd;
  }
  if (arrived <= pending->deadline) overdue_since_ns_.store(0, std::memory_order_relaxed);
  int result = StatusToErrno(message.status);
  bool stream_ok = true;
  if (result == 0 && message.payload_bytes == pending->out.size()) {
    stream_ok = stream.Read(pending->out);
    if (!stream_ok) result = -ENOTCONN;
  } else {
    if (result == 0) result = -EPROTO;  // the reply has the wrong size
    stream_ok = stream.Skip(message.payload_bytes);
  }
  Complete(pending, result);
  return stream_ok ? ReadOutcome::kMessage : ReadOutcome::kEnd;
}

void PeerClient::FailAllLocked(int error) {
  for (auto& [tag, pending] : pending_) {
    pending->result = error;
    pending->done.store(true, std::memory_order_release);
    pending->done.notify_one();
  }
  pending_.clear();
}

void PeerClient::ReturnLateGrants(bool wait_to_send) noexcept {
  std::vector<std::uint32_t> sids;
  {
    std::lock_guard lock(late_mu_);
    if (late_grants_.empty()) return;
    sids.swap(late_grants_);
  }
  std::size_t sent = 0;
  while (sent < sids.size() && FreeSuperpageNoReply(sids[sent], wait_to_send) == 0) ++sent;
  if (sent == sids.size()) return;
  std::lock_guard lock(late_mu_);  // the socket was busy: again later
  try {
    late_grants_.insert(late_grants_.end(), sids.begin() + static_cast<std::ptrdiff_t>(sent),
                        sids.end());
  } catch (const std::bad_alloc&) {
  }
}

int PeerClient::Query(QueryReply* reply) noexcept {
  ReturnLateGrants(/*wait_to_send=*/true);
  const auto start = std::chrono::steady_clock::now();
  const int rc = Call(MessageType::kQuery, 0, {}, {},
                      std::as_writable_bytes(std::span<QueryReply, 1>(reply, 1)));
  if (rc == 0) {
    const auto elapsed = std::chrono::steady_clock::now() - start;
    last_rtt_us_.store(static_cast<std::uint64_t>(
                           std::chrono::duration_cast<std::chrono::microseconds>(elapsed).count()),
                       std::memory_order_relaxed);
  }
  return rc;
}

int PeerClient::AllocSuperpage(std::uint32_t* sid) noexcept {
  SuperpageBody body{};
  const int rc = Call(MessageType::kAllocSuperpage, 0, {}, {},
                      std::as_writable_bytes(std::span<SuperpageBody, 1>(&body, 1)));
  if (rc == 0) *sid = body.sid;
  return rc;
}

int PeerClient::Write(std::uint32_t sid, std::uint32_t offset,
                      std::span<const std::byte> data) noexcept {
  const RangeBody body{sid, offset, static_cast<std::uint32_t>(data.size()), 0};
  return Call(MessageType::kWrite, 0, std::as_bytes(std::span<const RangeBody, 1>(&body, 1)),
              data, {});
}

int PeerClient::Read(std::uint32_t sid, std::uint32_t offset, std::span<std::byte> out) noexcept {
  const RangeBody body{sid, offset, static_cast<std::uint32_t>(out.size()), 0};
  return Call(MessageType::kRead, 0, std::as_bytes(std::span<const RangeBody, 1>(&body, 1)), {},
              out);
}

int PeerClient::Put(const HandleBody& handle, std::uint32_t flags,
                    std::span<const std::byte> page) noexcept {
  return Call(MessageType::kPut, flags, std::as_bytes(std::span<const HandleBody, 1>(&handle, 1)),
              page, {});
}

int PeerClient::Get(const HandleBody& handle, std::span<std::byte> out) noexcept {
  return Call(MessageType::kGet, 0, std::as_bytes(std::span<const HandleBody, 1>(&handle, 1)), {},
              out);
}

int PeerClient::SendNoReply(MessageType type, std::span<const std::byte> body,
                            bool wait_to_send) noexcept {
  if (!connected()) return -ENOTCONN;
  // Tag 0 is never registered, so the reader thread drops the reply.
  std::byte wire[sizeof(Header) + 16];
  assert(body.size() <= 16);
  EncodeHeader(type, false, 0, Status::kOk, 0, static_cast<std::uint32_t>(body.size()),
               std::span<std::byte, sizeof(Header)>(wire, sizeof(Header)));
  if (!body.empty()) std::memcpy(wire + sizeof(Header), body.data(), body.size());  // GOODBYE: none
  iovec part{wire, sizeof(Header) + body.size()};
  std::unique_lock lock(send_mu_, std::defer_lock);
  if (wait_to_send) {
    lock.lock();
  } else if (!lock.try_lock()) {
    return -EAGAIN;
  }
  const int rc = WriteVectorFull(fd_.get(), &part, 1);
  lock.unlock();
  if (rc != 0) ::shutdown(fd_.get(), SHUT_RDWR);
  return rc == 0 ? 0 : -ENOTCONN;
}

int PeerClient::FlushNoReply(const HandleBody& handle) noexcept {
  return SendNoReply(MessageType::kFlush,
                     std::as_bytes(std::span<const HandleBody, 1>(&handle, 1)), true);
}

int PeerClient::FreeSuperpageNoReply(std::uint32_t sid, bool wait_to_send) noexcept {
  const SuperpageBody body{sid};
  return SendNoReply(MessageType::kFreeSuperpage,
                     std::as_bytes(std::span<const SuperpageBody, 1>(&body, 1)), wait_to_send);
}

}  // namespace memlend::peer
