#include "ublk/queue.h"

#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>

#include "ublk/user_data.h"

namespace memlend::ublk {
namespace {

std::string Reason(const char* what, int err) {
  return std::string(what) + ": " + std::strerror(err);
}

}  // namespace

Queue::Queue(unsigned queue_id, unsigned depth, std::uint32_t max_io_bytes,
             std::uint64_t device_sectors, std::uint32_t fetch_op, std::uint32_t commit_op,
             Target& target)
    : queue_id_(queue_id),
      depth_(depth),
      max_io_bytes_(max_io_bytes),
      device_sectors_(device_sectors),
      fetch_op_(fetch_op),
      commit_op_(commit_op),
      target_(target) {}

Queue::~Queue() {
  Wake();
  Join();
  if (descriptors_ != nullptr) {
    ::munmap(const_cast<ublksrv_io_desc*>(descriptors_), descriptors_length_);
  }
  if (buffers_ != nullptr) ::munmap(buffers_, buffers_length_);
  if (wake_fd_ >= 0) ::close(wake_fd_);
  if (completed_fd_ >= 0) ::close(completed_fd_);
}

int Queue::Map(int char_fd, bool lock_memory, std::string* error) noexcept {
  char_fd_ = char_fd;
  const long page = ::sysconf(_SC_PAGESIZE);
  descriptors_length_ = DescriptorArrayLength(depth_, page);
  void* descriptors = ::mmap(nullptr, descriptors_length_, PROT_READ, MAP_SHARED | MAP_POPULATE,
                             char_fd, static_cast<off_t>(DescriptorArrayOffset(queue_id_, page)));
  if (descriptors == MAP_FAILED) {
    const int err = errno;
    *error = Reason("cannot map the I/O descriptors of queue", err);
    return -err;
  }
  descriptors_ = static_cast<const ublksrv_io_desc*>(descriptors);

  // One region holds every tag's buffer: tag t's is at t * max_io_bytes_.
  buffers_length_ = std::size_t{depth_} * max_io_bytes_;
  void* buffers =
      ::mmap(nullptr, buffers_length_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (buffers == MAP_FAILED) {
    const int err = errno;
    *error = Reason("cannot allocate the queue's I/O buffers", err);
    return -err;
  }
  buffers_ = static_cast<std::byte*>(buffers);
  if (lock_memory && ::mlock(buffers_, buffers_length_) != 0) {
    const int err = errno;
    *error = Reason("cannot lock the queue's I/O buffers in memory", err);
    return -err;
  }

  wake_fd_ = ::eventfd(0, EFD_CLOEXEC);
  completed_fd_ = ::eventfd(0, EFD_CLOEXEC);
  if (wake_fd_ < 0 || completed_fd_ < 0) {
    const int err = errno;
    *error = Reason("eventfd", err);
    return -err;
  }
  return 0;
}

int Queue::Start(const cpu_set_t* cpus, bool realtime, std::string* error) {
  realtime_ = realtime;
  std::promise<int> started;
  std::future<int> result = started.get_future();
  cpu_set_t set;
  CPU_ZERO(&set);
  const bool pin = cpus != nullptr && CPU_COUNT(cpus) > 0;
  if (pin) set = *cpus;
  thread_ = std::thread(&Queue::Run, this, set, pin, std::move(started));
  const int ret = result.get();
  if (ret < 0) {
    Join();
    *error = Reason("cannot start the queue's io_uring", -ret);
  }
  return ret;
}

bool Queue::UseRealtime(bool on) noexcept {
  if (!realtime_) return false;
  sched_param param{};
  param.sched_priority = on ? ::sched_get_priority_min(SCHED_FIFO) : 0;
  if (::pthread_setschedparam(::pthread_self(), on ? SCHED_FIFO : SCHED_OTHER, &param) == 0) {
    return true;
  }
  realtime_ = false;
  realtime_refused_.store(true, std::memory_order_release);
  return false;
}

void Queue::Wake() noexcept {
  if (wake_fd_ < 0) return;
  const std::uint64_t one = 1;
  [[maybe_unused]] const ssize_t n = ::write(wake_fd_, &one, sizeof(one));
}

void Queue::Join() noexcept {
  if (thread_.joinable()) thread_.join();
}

io_uring_sqe* Queue::NextSqe() noexcept {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (sqe == nullptr) {
    // Only if more commands were prepared than the ring has entries, which the sizing in
    // Run rules out; submitting frees the slots anyway.
    io_uring_submit(&ring_);
    sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) stats_.bad_events.fetch_add(1, std::memory_order_relaxed);
  }
  return sqe;
}

void Queue::PrepareCommand(unsigned tag, bool commit, int result) noexcept {
  io_uring_sqe* sqe = NextSqe();
  if (sqe == nullptr) return;
  std::memset(sqe, 0, sizeof(*sqe));
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = char_fd_;
  sqe->cmd_op = commit ? commit_op_ : fetch_op_;
  sqe->user_data =
      EncodeUserData({static_cast<std::uint16_t>(tag),
                      commit ? UserDataCommand::kCommitAndFetch : UserDataCommand::kFetch});
  ublksrv_io_cmd cmd;
  std::memset(&cmd, 0, sizeof(cmd));
  cmd.q_id = static_cast<__u16>(queue_id_);
  cmd.tag = static_cast<__u16>(tag);
  cmd.result = commit ? result : -1;
  cmd.addr = reinterpret_cast<std::uintptr_t>(buffers_ + std::size_t{tag} * max_io_bytes_);
  std::memcpy(sqe->cmd, &cmd, sizeof(cmd));
  ++outstanding_;
}

void Queue::ServeReady() noexcept {
  unsigned count = 0;
  for (unsigned i = 0; i < ready_count_; ++i) {
    const unsigned tag = ready_[i];
    // Read the shared descriptor once; only this copy is checked and used.
    ublksrv_io_desc desc;
    std::memcpy(&desc, &descriptors_[tag], sizeof(desc));
    DescriptorCheck check = CheckDescriptor(desc, {device_sectors_, max_io_bytes_});
    if (check.error != 0) {
      stats_.errors.fetch_add(1, std::memory_order_relaxed);
      PrepareCommand(tag, true, check.error);
      continue;
    }
    IoRequest& request = batch_[count];
    request = check.request;
    request.queue = queue_id_;
    request.tag = tag;
    request.completer = this;
    if (request.op == IoOp::kRead || request.op == IoOp::kWrite) {
      request.buffer = {buffers_ + std::size_t{tag} * max_io_bytes_,
                        std::size_t{request.sector_count} << kSectorShift};
    }
    batch_tags_[count++] = tag;
  }
  ready_count_ = 0;
  if (count == 0) return;
  target_.HandleBatch(std::span<const IoRequest>(batch_.get(), count),
                      std::span<int>(results_.get(), count));
  for (unsigned i = 0; i < count; ++i) {
    const IoRequest& request = batch_[i];
    const std::uint32_t bytes = static_cast<std::uint32_t>(request.buffer.size());
    if (results_[i] == kIoDeferred) {
      tag_state_[batch_tags_[i]] = {true, request.op, bytes};
      ++deferred_;
      stats_.deferred.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    const int result = CommitResult(request.op, bytes, results_[i]);
    stats_.requests.fetch_add(1, std::memory_order_relaxed);
    if (result < 0) stats_.errors.fetch_add(1, std::memory_order_relaxed);
    PrepareCommand(batch_tags_[i], true, result);
  }
}

void Queue::Complete(unsigned tag, int result) noexcept {
  bool first;
  {
    std::lock_guard lock(completed_mu_);
    if (completed_count_ == depth_) {  // more completions than tags: a target's bug
      stats_.bad_events.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    completed_[completed_count_++] = {static_cast<std::uint16_t>(tag), result};
    first = completed_count_ == 1;
  }
  if (first) {
    const std::uint64_t one = 1;
    [[maybe_unused]] const ssize_t n = ::write(completed_fd_, &one, sizeof(one));
  }
}

void Queue::CommitCompleted() noexcept {
  unsigned count;
  {
    std::lock_guard lock(completed_mu_);
    count = completed_count_;
    std::memcpy(taken_.get(), completed_.get(), count * sizeof(Completion));
    completed_count_ = 0;
  }
  for (unsigned i = 0; i < count; ++i) {
    const unsigned tag = taken_[i].tag;
    if (tag >= depth_ || !tag_state_[tag].deferred) {  // not a request the target holds
      stats_.bad_events.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    DeferredTag& state = tag_state_[tag];
    state.deferred = false;
    --deferred_;
    const int result = CommitResult(state.op, state.bytes, taken_[i].result);
    stats_.requests.fetch_add(1, std::memory_order_relaxed);
    if (result < 0) stats_.errors.fetch_add(1, std::memory_order_relaxed);
    PrepareCommand(tag, true, result);
  }
}

void Queue::PrepareEventRead(int fd, std::uint64_t* value, UserDataCommand command) noexcept {
  io_uring_sqe* sqe = NextSqe();
  if (sqe == nullptr) return;
  io_uring_prep_read(sqe, fd, value, sizeof(*value), 0);
  sqe->user_data = EncodeUserData({0, command});
}

void Queue::Run(cpu_set_t cpus, bool pin, std::promise<int> started) noexcept {
  // Signals go to the process's other threads (the daemon waits for SIGTERM there).
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
  if (pin) pthread_setaffinity_np(pthread_self(), sizeof(cpus), &cpus);
  pthread_setname_np(pthread_self(), ("ublk-queue" + std::to_string(queue_id_)).c_str());

  // One entry per tag plus the two eventfd reads: never more SQEs prepared at once.
  io_uring_params params;
  std::memset(&params, 0, sizeof(params));
  params.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN;
  int ret = io_uring_queue_init_params(depth_ + 2, &ring_, &params);
  if (ret == -EINVAL) {  // a kernel without SINGLE_ISSUER / COOP_TASKRUN
    std::memset(&params, 0, sizeof(params));
    ret = io_uring_queue_init_params(depth_ + 2, &ring_, &params);
  }
  if (ret < 0) {
    started.set_value(ret);
    return;
  }
  try {
    ready_ = std::make_unique<unsigned[]>(depth_);
    batch_ = std::make_unique<IoRequest[]>(depth_);
    batch_tags_ = std::make_unique<unsigned[]>(depth_);
    results_ = std::make_unique<int[]>(depth_);
    tag_state_ = std::make_unique<DeferredTag[]>(depth_);
    completed_ = std::make_unique<Completion[]>(depth_);
    taken_ = std::make_unique<Completion[]>(depth_);
  } catch (const std::bad_alloc&) {
    io_uring_queue_exit(&ring_);
    started.set_value(-ENOMEM);
    return;
  }
  // Tried once before the first wait, so that Start's caller knows whether it holds.
  if (UseRealtime(true)) UseRealtime(false);
  target_.QueueStarted(queue_id_);

  PrepareEventRead(wake_fd_, &wake_value_, UserDataCommand::kWake);
  PrepareEventRead(completed_fd_, &completed_value_, UserDataCommand::kCompleted);
  for (unsigned tag = 0; tag < depth_; ++tag) PrepareCommand(tag, false, 0);
  do {
    ret = io_uring_submit(&ring_);
  } while (ret == -EINTR);
  started.set_value(ret < 0 ? ret : 0);

  bool stopping = false;
  auto deadline = std::chrono::steady_clock::time_point::max();
  while (ret >= 0 && (outstanding_ > 0 || deferred_ > 0)) {
    if (stopping) {
      if (std::chrono::steady_clock::now() >= deadline) break;
      __kernel_timespec wait{0, 100 * 1000 * 1000};
      io_uring_cqe* first = nullptr;
      ret = io_uring_submit_and_wait_timeout(&ring_, &first, 1, &wait, nullptr);
      if (ret == -ETIME || ret == -EINTR || ret == -EAGAIN || ret == -EBUSY) ret = 0;
    } else if (realtime_ && io_uring_cq_ready(&ring_) == 0) {
      // Wait under the ordinary policy: a real-time thread woken by each request would
      // preempt the submitting task before it has queued the rest of its batch.
      UseRealtime(false);
      ret = io_uring_submit_and_wait(&ring_, 1);
      UseRealtime(true);
      if (ret == -EINTR || ret == -EAGAIN || ret == -EBUSY) ret = 0;
    } else {
      ret = io_uring_submit_and_wait(&ring_, 1);
      // Interrupted, or completions to reap before more can be submitted: reap them.
      if (ret == -EINTR || ret == -EAGAIN || ret == -EBUSY) ret = 0;
    }
    if (ret < 0) break;

    unsigned head;
    unsigned seen = 0;
    bool completions = false;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      ++seen;
      const std::optional<IoUserData> data = DecodeUserData(cqe->user_data);
      if (!data) {
        stats_.bad_events.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      if (data->command == UserDataCommand::kWake) {
        stopping = true;
        deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kStopGraceMs);
        continue;
      }
      if (data->command == UserDataCommand::kCompleted) {
        completions = true;
        continue;
      }
      const unsigned tag = data->tag;
      if (tag >= depth_) {
        stats_.bad_events.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      --outstanding_;
      if (cqe->res == UBLK_IO_RES_OK) {
        // A request is waiting in the tag: it is served with the others of this pass,
        // then committed, which also fetches the tag's next one.
        if (ready_count_ < depth_) {
          ready_[ready_count_++] = tag;
        } else {  // the same tag twice in one pass: the kernel would never do that
          stats_.bad_events.fetch_add(1, std::memory_order_relaxed);
        }
      } else if (cqe->res != UBLK_IO_RES_ABORT) {
        // The kernel refused the command (e.g. a queue being torn down): the tag is idle.
        stats_.bad_events.fetch_add(1, std::memory_order_relaxed);
      }
      // UBLK_IO_RES_ABORT: the device is stopping; the tag fetches nothing more.
    }
    io_uring_cq_advance(&ring_, seen);
    ServeReady();
    if (completions) {
      CommitCompleted();
      PrepareEventRead(completed_fd_, &completed_value_, UserDataCommand::kCompleted);
    }
  }

  target_.QueueStopped(queue_id_);
  // Closing the ring cancels any command still in the kernel.
  io_uring_queue_exit(&ring_);
}

}  // namespace memlend::ublk
