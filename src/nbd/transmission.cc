#include "nbd/transmission.h"

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstring>
#include <span>
#include <vector>

#include "common/byte_buffer.h"
#include "common/log.h"
#include "common/realtime.h"
#include "nbd/codec.h"
#include "transport/socket.h"

namespace memlend::nbd {
namespace {

constexpr std::size_t kInputBytes = 1 << 20;     // holds many pipelined page writes
constexpr std::size_t kSendThreshold = 1 << 18;  // send replies early past this much
constexpr std::size_t kReplyBytes = 1 << 20;     // reply buffer allocated up front
constexpr std::size_t kMaxReadRun = 64;          // READs served by one Device::ReadMany
// A run of READs stops growing past this much data; a READ up to this long is served
// whole, its error known before its reply goes out. The kernel's NBD client reads up to
// its max_sectors_kb (1.25 MiB by default) at once.
constexpr std::size_t kMaxReadRunBytes = 4 << 20;
// A READ longer than kMaxReadRunBytes is served in pieces of this size (ServeLargeRead).
constexpr std::size_t kReadPieceBytes = 1 << 20;
// Replies grow past kReplyBytes only for a run of READs (ServeReadRun reserves it exactly),
// on top of those not yet sent, which are fewer than kSendThreshold bytes.
static_assert(kInputBytes + kSendThreshold + kMaxReadRunBytes +
                  kMaxReadRun * kSimpleReplySize + 4096 <=
              kMaxConnectionBufferBytes);

class Connection {
 public:
  Connection(int fd, Device& device, std::chrono::microseconds busy_poll, bool realtime)
      : fd_(fd),
        device_(device),
        busy_poll_(busy_poll),
        realtime_(realtime),
        input_(kInputBytes) {
    // Allocated up front, so that serving the usual requests allocates nothing: a daemon
    // that serves swap may be asked to write pages out precisely when memory is short.
    replies_.Reserve(kReplyBytes);
    batch_.reserve(kMaxReadRun);
    reads_.reserve(kMaxReadRun);
  }

  void Run() {
    if (realtime_ && !EnterRealtime()) realtime_ = false;
    for (;;) {
      if (!ServeBuffered()) return;
      if (!SendReplies()) return;
      // With every reply out and no request on its way, fetch ahead one window of what
      // this client's sequential reads asked for (Device::RunReadAhead).
      if (device_.ReadAheadWanted() && input_end_ == input_begin_ && !InputWaiting()) {
        device_.RunReadAhead();
      }
      if (!Receive()) return;
    }
  }

 private:
  // Serves every complete request in the input buffer. Returns false when the connection
  // must close.
  bool ServeBuffered() {
    while (input_end_ - input_begin_ >= kRequestSize) {
      const std::byte* at = input_.data() + input_begin_;
      Request request;
      if (!DecodeRequest(std::span<const std::byte, kRequestSize>(at, kRequestSize),
                         &request)) {
        LogDebug("nbd: bad request magic on %s, closing", device_.name().c_str());
        return false;
      }
      if (request.type == NBD_CMD_READ &&
          CheckRequest(request, device_.size_bytes()).error == 0) {
        if (request.length > kMaxReadRunBytes) {
          if (!ServeLargeRead(request)) return false;
          continue;
        }
        ServeReadRun();
        if (replies_.size() >= kSendThreshold && !SendReplies()) return false;
        continue;
      }
      std::span<const std::byte> payload;
      if (HasPayload(request)) {
        const std::size_t buffered = input_end_ - input_begin_ - kRequestSize;
        if (buffered >= request.length) {
          payload = std::span(at + kRequestSize, request.length);
          input_begin_ += kRequestSize + request.length;
        } else if (kRequestSize + request.length <= input_.capacity()) {
          return true;  // the rest of this request is still on its way
        } else {
          if (!ServeLargeWrite(request)) return false;
          if (replies_.size() >= kSendThreshold && !SendReplies()) return false;
          continue;
        }
      } else {
        input_begin_ += kRequestSize;
      }
      if (!Serve(request, payload)) return false;
      if (replies_.size() >= kSendThreshold && !SendReplies()) return false;
    }
    return true;
  }

  // Serves the run of valid READ requests at the head of the input buffer with one
  // Device::ReadMany, so that pages on peers are fetched in one round trip. Replies keep
  // the requests' order; a failed read's reply carries no data.
  void ServeReadRun() {
    batch_.clear();
    std::size_t reply_bytes = 0;
    std::size_t at = input_begin_;
    while (batch_.size() < kMaxReadRun && input_end_ - at >= kRequestSize) {
      Request request;
      if (!DecodeRequest(std::span<const std::byte, kRequestSize>(input_.data() + at,
                                                                  kRequestSize),
                         &request) ||
          request.type != NBD_CMD_READ || request.length > kMaxReadRunBytes ||
          CheckRequest(request, device_.size_bytes()).error != 0) {
        break;  // the ordinary path deals with it
      }
      // The run's replies fit kMaxReadRunBytes of data, so the reply buffer stays bounded.
      if (!batch_.empty() && reply_bytes + request.length > kMaxReadRunBytes) break;
      batch_.push_back(request);
      reply_bytes += kSimpleReplySize + request.length;
      at += kRequestSize;
    }
    input_begin_ = at;

    // Reserve every reply first: the buffer must not move once data pointers are handed out.
    replies_.Reserve(replies_.size() + reply_bytes);
    const std::size_t first = replies_.size();
    reads_.resize(batch_.size());
    for (std::size_t i = 0; i < batch_.size(); ++i) {
      replies_.Extend(kSimpleReplySize);
      reads_[i].offset = batch_[i].offset;
      reads_[i].out = std::span(replies_.Extend(batch_[i].length), batch_[i].length);
    }
    device_.ReadMany(reads_);

    // Write the headers; close the gaps that failed reads leave.
    std::size_t from = first;
    std::size_t to = first;
    for (std::size_t i = 0; i < batch_.size(); ++i) {
      const std::size_t length = kSimpleReplySize + batch_[i].length;
      const int rc = reads_[i].result;
      if (rc == 0 && to != from) std::memmove(replies_.data() + to, replies_.data() + from, length);
      EncodeSimpleReply(ErrorFromErrno(rc), batch_[i].handle,
                        std::span<std::byte, kSimpleReplySize>(replies_.data() + to,
                                                               kSimpleReplySize));
      to += rc == 0 ? length : kSimpleReplySize;
      from += length;
    }
    replies_.Truncate(to);
  }

  // Serves one validated-or-rejected request. Returns false when the connection must close.
  bool Serve(const Request& request, std::span<const std::byte> payload) {
    const Verdict verdict = CheckRequest(request, device_.size_bytes());
    if (verdict.error != 0) {
      Reply(verdict.error, request.handle);
      if (!verdict.hang_up) return true;
      SendReplies();
      return false;
    }
    int rc = 0;
    switch (request.type) {
      // A valid READ never comes here: ServeBuffered serves it (ServeReadRun, ServeLargeRead).
      case NBD_CMD_WRITE:
        rc = device_.Write(request.offset, payload);
        break;
      case NBD_CMD_TRIM:
        rc = device_.Trim(request.offset, request.length);
        break;
      case NBD_CMD_WRITE_ZEROES:
        rc = device_.WriteZeroes(request.offset, request.length);
        break;
      case NBD_CMD_FLUSH:
        rc = device_.Flush();
        break;
      case NBD_CMD_DISC:
        SendReplies();
        return false;
    }
    // FUA needs nothing more: a write is in its store before it is acknowledged.
    Reply(ErrorFromErrno(rc), request.handle);
    return true;
  }

  void Reply(std::uint32_t error, std::uint64_t handle) {
    EncodeSimpleReply(error, handle,
                      std::span<std::byte, kSimpleReplySize>(replies_.Extend(kSimpleReplySize),
                                                             kSimpleReplySize));
  }

  // Serves a WRITE whose payload does not fit the input buffer (the request is at its
  // head) in pieces of whole pages as the payload arrives, so that a connection never holds
  // more than its input buffer, whatever the client sends: up to kMaxPayload (32 MiB) each,
  // on every connection. After a piece fails, the rest of the payload is read and dropped,
  // so that the stream stays in step, and the reply carries the error; what the range then
  // holds is unspecified, as the protocol allows for a failed write. Returns false when the
  // connection must close.
  bool ServeLargeWrite(const Request& request) {
    input_begin_ += kRequestSize;
    std::uint32_t error = CheckRequest(request, device_.size_bytes()).error;
    std::uint64_t done = 0;
    while (done < request.length) {
      const std::size_t have = input_end_ - input_begin_;
      const std::uint64_t want = request.length - done;
      std::uint64_t take = std::min<std::uint64_t>(have, want);
      // A refused write's payload is only dropped: no alignment (nor its arithmetic, which
      // could overflow for an offset past the device) is wanted then.
      if (take < want && error == 0) {
        // Wait for half a buffer at least, and end the piece on a page boundary of the
        // device, so that only the write's own ends are read-modify-write.
        const std::uint64_t end = (request.offset + done + take) / kPageSize * kPageSize;
        take = have < input_.capacity() / 2 || end <= request.offset + done
                   ? 0
                   : end - (request.offset + done);
      }
      if (take == 0) {
        if (!Receive()) return false;
        continue;
      }
      if (error == 0) {
        const int rc = device_.Write(request.offset + done,
                                     std::span(input_.data() + input_begin_, take));
        error = ErrorFromErrno(rc);
      }
      input_begin_ += take;
      done += take;
    }
    Reply(error, request.handle);
    return true;
  }

  // Serves a valid READ longer than kMaxReadRunBytes (up to 32 MiB) at the head of the
  // input buffer, a piece at a time through the reply buffer, so that no client can make a
  // connection hold more than a few MiB. A simple reply states its error before its data:
  // if the first piece fails, the reply carries the error; if a later one does, the
  // header has gone out saying success, and the protocol leaves no way but to hang up.
  // (No client of ours reads that much at once: the kernel's NBD client reads at most
  // max_sectors_kb, served whole.) Returns false when the connection must close.
  bool ServeLargeRead(const Request& request) {
    input_begin_ += kRequestSize;
    if (!SendReplies()) return false;  // replies keep the requests' order
    for (std::uint64_t done = 0; done < request.length;) {
      const std::size_t piece = std::min<std::uint64_t>(kReadPieceBytes, request.length - done);
      const bool first = done == 0;
      if (first) replies_.Extend(kSimpleReplySize);
      std::byte* data = replies_.Extend(piece);
      // ReadMany, so that a piece's pages on peers come in one round trip.
      Device::ReadRequest read{request.offset + done, std::span(data, piece), 0};
      device_.ReadMany(std::span(&read, 1));
      const int rc = read.result;
      if (rc != 0 && !first) {
        LogError("nbd: %s: a read failed after its reply had begun (%s); hanging up",
                 device_.name().c_str(), std::strerror(-rc));
        return false;
      }
      if (rc != 0) {
        replies_.Clear();
        Reply(ErrorFromErrno(rc), request.handle);
        return true;
      }
      if (first) {
        EncodeSimpleReply(0, request.handle,
                          std::span<std::byte, kSimpleReplySize>(replies_.data(),
                                                                 kSimpleReplySize));
      }
      if (!SendReplies()) return false;
      done += piece;
    }
    return true;
  }

  bool SendReplies() {
    if (replies_.empty()) return true;
    const int rc = WriteFull(fd_, replies_.data(), replies_.size());
    replies_.Clear();
    return rc == 0;
  }

  // Whether the client has sent bytes not yet received.
  bool InputWaiting() const noexcept {
    pollfd ready{fd_, POLLIN, 0};
    return ::poll(&ready, 1, 0) != 0;
  }

  // Compacts the input buffer and blocks until more bytes arrive.
  bool Receive() {
    if (input_begin_ > 0) {
      const std::size_t pending = input_end_ - input_begin_;
      std::memmove(input_.data(), input_.data() + input_begin_, pending);
      input_begin_ = 0;
      input_end_ = pending;
    }
    std::byte* const free_space = input_.data() + input_end_;
    const std::size_t free_bytes = input_.capacity() - input_end_;
    long n = -EAGAIN;
    if (realtime_) {
      // Wait under the ordinary policy (see RunTransmission), unless requests are already here.
      n = ::recv(fd_, free_space, free_bytes, MSG_DONTWAIT);
      if (n < 0) n = -errno;
      if (n == -EAGAIN || n == -EINTR) {
        UseOrdinaryScheduling();
        n = ReceiveSome(fd_, free_space, free_bytes, busy_poll_);
        EnterRealtime();
      }
    } else {
      // Busy-poll briefly before sleeping: a client at low queue depth usually sends its
      // next request within microseconds of our reply.
      n = ReceiveSome(fd_, free_space, free_bytes, busy_poll_);
    }
    if (n <= 0) return false;  // hung up, shut down, or failed
    input_end_ += static_cast<std::size_t>(n);
    return true;
  }

  // Returns whether the thread now runs under SCHED_FIFO; warns the first time it cannot.
  bool EnterRealtime() {
    const int error = UseRealtimeScheduling();
    if (error == 0) return true;
    LogError("warning: nbd: %s: no real-time scheduling (%s; needs CAP_SYS_NICE): under memory "
             "pressure, swap on it may stall",
             device_.name().c_str(), std::strerror(error));
    realtime_ = false;
    return false;
  }

  const int fd_;
  Device& device_;
  const std::chrono::microseconds busy_poll_;
  bool realtime_;
  ByteBuffer input_;  // bytes [input_begin_, input_end_) are received and not yet served
  std::size_t input_begin_ = 0;
  std::size_t input_end_ = 0;
  ByteBuffer replies_;
  std::vector<Request> batch_;               // ServeReadRun's requests
  std::vector<Device::ReadRequest> reads_;   // and their device reads
};

}  // namespace

void RunTransmission(int fd, Device& device, std::chrono::microseconds busy_poll,
                     bool realtime) {
  Connection(fd, device, busy_poll, realtime).Run();
}

}  // namespace memlend::nbd
