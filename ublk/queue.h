// Queue: one ublk hardware queue — its thread, its io_uring, its tags' buffers and the
// descriptor array the kernel shares with it.
//
// The thread owns everything that changes on the I/O path: it creates the ring itself
// (SINGLE_ISSUER where the kernel has it) and submits FETCH_REQ for every tag. Then, each
// time it wakes, it takes every completion the ring holds, reads the descriptors of the
// tags that got a request, has the target serve those requests as one batch
// (Target::HandleBatch) into or out of the tags' buffers, and answers each with
// COMMIT_AND_FETCH_REQ, which both completes the request and fetches the tag's next one;
// the commits of a batch go to the kernel in one submit. Nothing is allocated and nothing
// is logged per request.
//
// Asynchronous serving: the target may defer a request (kIoDeferred) and complete it later
// from another thread through the queue's IoCompleter. Complete() puts (tag, result) on a
// short list under a leaf lock and, when the list was empty, writes an eventfd whose read
// the ring keeps posted; the thread wakes, takes the whole list and commits each request
// as above. Only the queue's thread talks to the ublk driver, as the driver requires.
//
// Teardown: STOP_DEV (sent by the control thread) makes the kernel complete each fetch
// with UBLK_IO_RES_ABORT; the loop ends when no tag has a command outstanding and no
// deferred request is left. Wake() is the fallback: after it, the loop waits at most
// kStopGraceMs more for aborts and completions and then ends anyway; closing the ring
// cancels whatever is left.
#pragma once

#include <liburing.h>
#include <sched.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "ublk/params.h"
#include "ublk/target.h"
#include "ublk/uapi.h"
#include "ublk/user_data.h"

namespace memlend::ublk {

class Queue final : private IoCompleter {
 public:
  static constexpr int kStopGraceMs = 2000;

  // Statistics, readable from any thread.
  struct Stats {
    std::atomic<std::uint64_t> requests{0};
    std::atomic<std::uint64_t> errors{0};      // requests completed with -errno
    std::atomic<std::uint64_t> bad_events{0};  // completions that made no sense
    std::atomic<std::uint64_t> deferred{0};    // requests the target completed later
  };

  Queue(unsigned queue_id, unsigned depth, std::uint32_t max_io_bytes, std::uint64_t device_sectors,
        std::uint32_t fetch_op, std::uint32_t commit_op, Target& target);
  ~Queue();
  Queue(const Queue&) = delete;
  Queue& operator=(const Queue&) = delete;

  // Control thread. Maps the descriptor array of /dev/ublkcN (`char_fd`, which must stay
  // open until Join returns) and the tags' buffers (mlocked if `lock_memory`). Returns 0 or
  // -errno with a reason in *error.
  int Map(int char_fd, bool lock_memory, std::string* error) noexcept;

  // Control thread. Starts the queue's thread, pinned to `cpus` when it is non-empty, and
  // waits until it has fetched every tag. With `realtime` the thread serves requests under
  // SCHED_FIFO (DeviceConfig::realtime); realtime_refused() then tells whether the kernel
  // refused it. Returns 0, or -errno with a reason in *error (the thread has then already
  // ended).
  int Start(const cpu_set_t* cpus, bool realtime, std::string* error);
  // After Start: whether real-time scheduling was asked for and refused (EPERM).
  bool realtime_refused() const { return realtime_refused_.load(std::memory_order_acquire); }

  // Any thread: asks the loop to end within kStopGraceMs (see above). Idempotent.
  void Wake() noexcept;
  // Control thread: waits for the thread to end. Idempotent.
  void Join() noexcept;

  const Stats& stats() const { return stats_; }

 private:
  void Run(cpu_set_t cpus, bool pin, std::promise<int> started) noexcept;
  // Queue thread: switches between SCHED_FIFO (serving) and SCHED_OTHER (waiting) when
  // realtime_ is on. Returns false (and turns realtime_ off) when the kernel refuses.
  bool UseRealtime(bool on) noexcept;
  // Queue thread: the ring's next free SQE (submitting what is prepared if none is free),
  // or nullptr, counted as a bad event.
  io_uring_sqe* NextSqe() noexcept;
  // Queue thread: adds a FETCH_REQ or COMMIT_AND_FETCH_REQ for `tag` to the ring.
  void PrepareCommand(unsigned tag, bool commit, int result) noexcept;
  // Queue thread: serves the requests now in the descriptors of ready_[0, ready_count_)
  // as one batch and prepares their commits (or notes them as deferred).
  void ServeReady() noexcept;
  // Queue thread: adds the read of `fd` into *value with `command` as its user_data.
  void PrepareEventRead(int fd, std::uint64_t* value, UserDataCommand command) noexcept;
  // Queue thread: prepares the commits of the deferred requests completed so far.
  void CommitCompleted() noexcept;
  // IoCompleter, any thread.
  void Complete(unsigned tag, int result) noexcept override;

  // Constant after construction.
  const unsigned queue_id_;
  const unsigned depth_;
  const std::uint32_t max_io_bytes_;
  const std::uint64_t device_sectors_;
  const std::uint32_t fetch_op_;
  const std::uint32_t commit_op_;
  Target& target_;

  // Set by Map (control thread) before the thread starts; then read by the queue thread.
  int char_fd_ = -1;
  const ublksrv_io_desc* descriptors_ = nullptr;
  std::size_t descriptors_length_ = 0;
  std::byte* buffers_ = nullptr;
  std::size_t buffers_length_ = 0;

  int wake_fd_ = -1;       // eventfd; written by Wake, read through the ring
  int completed_fd_ = -1;  // eventfd; written by Complete, read through the ring
  bool realtime_ = false;  // set by Start before the thread starts; then the thread's
  std::atomic<bool> realtime_refused_{false};
  std::thread thread_;
  Stats stats_;

  // Queue thread only.
  io_uring ring_{};
  unsigned outstanding_ = 0;      // tags with a command in the kernel
  // Tags whose request arrived in this pass over the completions, and the batch built from
  // them (depth_ entries each, allocated when the thread starts).
  std::unique_ptr<unsigned[]> ready_;
  unsigned ready_count_ = 0;
  std::unique_ptr<IoRequest[]> batch_;
  std::unique_ptr<unsigned[]> batch_tags_;
  std::unique_ptr<int[]> results_;
  std::uint64_t wake_value_ = 0;  // the eventfd read's buffer
  // What a deferred request needs at its commit, by tag.
  struct DeferredTag {
    bool deferred = false;
    IoOp op = IoOp::kRead;
    std::uint32_t bytes = 0;
  };
  std::unique_ptr<DeferredTag[]> tag_state_;
  unsigned deferred_ = 0;             // requests the target holds now
  std::uint64_t completed_value_ = 0;  // the completion eventfd read's buffer

  // Deferred requests completed and not yet committed (at most depth_: each tag once).
  struct Completion {
    std::uint16_t tag;
    int result;
  };
  std::mutex completed_mu_;  // a leaf lock
  std::unique_ptr<Completion[]> completed_;  // guarded by completed_mu_; depth_ entries
  unsigned completed_count_ = 0;             // guarded by completed_mu_
  // The queue thread's copy of the list, taken in one go.
  std::unique_ptr<Completion[]> taken_;
};

}  // namespace memlend::ublk
