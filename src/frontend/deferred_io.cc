#include "frontend/deferred_io.h"

#include <cstring>

#include "common/realtime.h"
#include "common/thread_name.h"
#include "frontend/ublk_frontend.h"

namespace memlend {

DeferredIo::DeferredIo(Device& device, unsigned depth, bool realtime)
    : device_(device), depth_(depth), inbox_(std::make_unique<ublk::IoRequest[]>(depth)) {
  thread_ = std::thread(&DeferredIo::Run, this, realtime);
}

DeferredIo::~DeferredIo() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  wake_.notify_one();
  thread_.join();
}

void DeferredIo::Submit(std::span<const ublk::IoRequest> requests) noexcept {
  bool wake;
  {
    std::lock_guard lock(mu_);
    for (const ublk::IoRequest& request : requests) {
      if (inbox_count_ == depth_) {  // more than the queue has tags: the caller's bug
        request.completer->Complete(request.tag, -EIO);
        continue;
      }
      inbox_[inbox_count_++] = request;
    }
    wake = waiting_;
  }
  if (wake) wake_.notify_one();
}

void DeferredIo::Kick() noexcept {
  bool wake;
  {
    std::lock_guard lock(mu_);
    kicked_ = true;
    wake = waiting_;
  }
  if (wake) wake_.notify_one();
}

void DeferredIo::Run(bool realtime) noexcept {
  SetThreadName("ublk-wait");
  std::unique_ptr<ublk::IoRequest[]> batch;
  std::unique_ptr<int[]> results;
  try {
    batch = std::make_unique<ublk::IoRequest[]>(depth_);
    results = std::make_unique<int[]>(depth_);
  } catch (const std::bad_alloc&) {
    // Without room to take requests out, they are served in the inbox itself.
  }
  for (;;) {
    unsigned count;
    {
      std::unique_lock lock(mu_);
      if (inbox_count_ == 0 && !stop_ && !kicked_) {
        if (realtime) UseOrdinaryScheduling();
        waiting_ = true;
        wake_.wait(lock, [this] { return inbox_count_ > 0 || stop_ || kicked_; });
        waiting_ = false;
        if (realtime && UseRealtimeScheduling() != 0) realtime = false;
      }
      kicked_ = false;
      if (inbox_count_ == 0) {
        if (stop_) return;  // nothing left
        lock.unlock();
        // One window; then the inbox again before the next one.
        if (device_.RunReadAhead()) Kick();
        continue;
      }
      count = inbox_count_;
      if (!batch || !results) {
        // Serve them one at a time, under the lock (the queue thread waits meanwhile).
        for (unsigned i = 0; i < count; ++i) {
          int result;
          ServeUblkBatch(device_, std::span(&inbox_[i], 1), std::span(&result, 1));
          inbox_[i].completer->Complete(inbox_[i].tag, result);
        }
        inbox_count_ = 0;
        continue;
      }
      std::memcpy(static_cast<void*>(batch.get()), inbox_.get(), count * sizeof(ublk::IoRequest));
      inbox_count_ = 0;
    }
    ServeUblkBatch(device_, std::span<const ublk::IoRequest>(batch.get(), count),
                   std::span<int>(results.get(), count));
    for (unsigned i = 0; i < count; ++i) batch[i].completer->Complete(batch[i].tag, results[i]);
    if (device_.RunReadAhead()) Kick();
  }
}

}  // namespace memlend
