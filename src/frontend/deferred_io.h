// DeferredIo: serves the requests that a ublk device's queues hand over because they must
// wait for a lower tier (a read of a page on a peer or on disk, a write that goes around a
// full local store), so that each queue's thread goes on serving its other tags meanwhile.
//
// One thread per device ("ublk-wait"), for all its queues. A queue thread appends the
// requests it defers to an inbox (a short lock, no allocation: the inbox holds as many as
// the queues have tags) and wakes the thread if it sleeps; the thread takes everything in
// the inbox at once and serves it as one batch (ServeUblkBatch: every read through one
// Device::ReadMany, every write through one Device::WriteMany), then completes each request
// through its queue's IoCompleter. Requests that arrive while a batch is out wait for the
// next one, so under load a round trip to the peers carries many requests' pages. One
// thread, not one per queue: a page being fetched ahead is then never asked for again by
// a second thread while it is on its way (measured in the VM swap benchmark: with a thread
// per queue, twice as many pages were read on demand and the runs' windows kept shrinking).
//
// After each batch, and when the queue thread asks (Kick), the thread also fetches ahead
// what reads of the device's trigger pages asked for (Device::RunReadAhead): those round
// trips run here, in the background, while the reader goes on with pages already in RAM.
//
// Alternatives: serving deferred requests on the queue thread itself (as before: one slow
// request held up every tag of its queue, and swap-out writes ran out of tags), or driving
// the peer sockets from the queue's io_uring (no thread hop, but the transport is shared by
// every queue and every device, and is not io_uring-based). The hop costs one wakeup per
// batch, not per request.
//
// With `realtime`, the thread serves under SCHED_FIFO and waits under the ordinary policy,
// as the queue threads do (ublk::DeviceConfig::realtime): under memory pressure the socket
// buffers of a swap-out must still be allocated.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <span>
#include <thread>

#include "store/device.h"
#include "ublk/target.h"

namespace memlend {

class DeferredIo {
 public:
  // Starts the thread. `depth` is the most requests the queues can defer at once (their
  // tags). Throws std::system_error when the thread cannot start, std::bad_alloc.
  DeferredIo(Device& device, unsigned depth, bool realtime);
  // Serves whatever is still in the inbox, then joins the thread.
  ~DeferredIo();
  DeferredIo(const DeferredIo&) = delete;
  DeferredIo& operator=(const DeferredIo&) = delete;

  // Queue threads. Hands `requests` over; each is completed later through its completer.
  // REQUIRES: at most `depth` requests handed over and not yet completed at any time.
  void Submit(std::span<const ublk::IoRequest> requests) noexcept;
  // Queue threads. Has the thread run the device's read-ahead (Device::RunReadAhead) soon.
  void Kick() noexcept;

 private:
  void Run(bool realtime) noexcept;

  Device& device_;
  const unsigned depth_;

  std::mutex mu_;
  std::condition_variable wake_;
  std::unique_ptr<ublk::IoRequest[]> inbox_;  // depth_ entries; guarded by mu_
  unsigned inbox_count_ = 0;                  // guarded by mu_
  bool waiting_ = false;                      // the thread sleeps on wake_; guarded by mu_
  bool kicked_ = false;                       // guarded by mu_
  bool stop_ = false;                         // guarded by mu_
  std::thread thread_;
};

}  // namespace memlend
