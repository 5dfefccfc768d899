// The ublk frontend: serves a Device as /dev/ublkbN through the kernel's ublk driver,
// using the target-agnostic server in ublk/. This file is the adapter: it maps ublk
// requests (sector ranges and operations) onto Device calls.
//
// Threads: AttachUblk and Detach run on the control thread; each of the device's ublk
// queues has a thread of its own (started by the ublk library) that serves at once the
// requests the local store can serve (ServeUblkRequest), and hands the others, those that
// must wait for a peer or the disk (UblkRequestMustWait), to a second thread of the queue
// (DeferredIo, deferred_io.h), which serves them in batches (ServeUblkBatch) and completes
// them through the library. The Device sees concurrent calls from all these threads.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>

#include "frontend/block_frontend.h"
#include "store/device.h"
#include "ublk/target.h"

namespace memlend {

struct UblkOptions {
  unsigned queues = 0;         // hardware queues, each with its own thread; 0: one per CPU
  unsigned queue_depth = 128;  // requests in flight per queue
  // Largest request in bytes, and the size of each tag's preallocated buffer (a power of
  // two, 4 KiB..1 MiB): queue_depth * max_io_bytes of buffers per queue.
  std::uint32_t max_io_bytes = 256 * 1024;
  // mlock the queues' buffers (recommended when the device is used for swap).
  bool lock_memory = false;
  // Pin each queue's thread to its CPUs (ublk::DeviceConfig::pin_queues). Off by default: in
  // the VM benchmark (2 vCPUs, fio at depth 32) a queue per CPU with pinned threads had half
  // the IOPS of unpinned ones, whose IOPS matched a single queue's; a pinned thread competes
  // with the submitting process for its CPU while the other CPU idles.
  bool pin_queues = false;
  // Serve requests under SCHED_FIFO, wait under the ordinary policy (recommended for swap;
  // see ublk::DeviceConfig::realtime and docs/attach.md).
  bool realtime = false;
  // Add the device with user recovery, so that it outlives this process (docs/restart.md).
  bool user_recovery = false;
  // Take over the ublk device with this number, left by a server that died, instead of
  // adding one (ublk::UblkServer::Recover); -1: add a new device.
  int recover_dev_id = -1;
};

// True when this host's kernel offers ublk (/dev/ublk-control exists).
bool UblkAvailable() noexcept;

// Removes /dev/ublkb<dev_id> when no live process serves it (a device a daemon that died
// left for a next one that will not come: docs/restart.md). 0, or a negative errno with a
// one-line reason in *error.
int RemoveOrphanUblk(int dev_id, std::string* error);

// Creates and starts a ublk block device for `device`; the frontend keeps the device
// alive until it is destroyed. Throws std::runtime_error with a one-line reason (driver
// missing, not permitted, ...) and leaves no ublk device behind when it cannot attach.
// The frontend's kind() is "ublk" and path() "/dev/ublkbN"; its Detach() returns -EBUSY,
// changing nothing, while the block device is held exclusively (mounted, swapped on, or
// opened with O_EXCL), else stops and deletes the ublk device.
std::unique_ptr<BlockFrontend> AttachUblk(std::shared_ptr<Device> device,
                                          const UblkOptions& options);

// The byte range [offset, offset + length) of `sector_count` 512-byte sectors from
// `start_sector`, or nothing when it is empty or does not end inside a device of
// `device_size_bytes` (no overflow for any input).
struct ByteRange {
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
};
std::optional<ByteRange> SectorsToBytes(std::uint64_t start_sector, std::uint32_t sector_count,
                                        std::uint64_t device_size_bytes) noexcept;

// Serves one ublk request against `device`: READ/WRITE return the bytes transferred
// (request.buffer.size()), FLUSH/DISCARD/WRITE_ZEROES return 0; a failure returns the
// Device's negative errno (-EIO, -ENOSPC, -ENOMEM), and a request whose range does not fit
// the device or whose buffer does not match its sectors returns -EINVAL without touching
// the device. Runs on a ublk queue thread; never throws.
int ServeUblkRequest(Device& device, const ublk::IoRequest& request) noexcept;

// Serves requests together: results[i] is what ServeUblkRequest would return for
// requests[i]. Every read among them goes to one Device::ReadMany and every write to one
// Device::WriteMany, so their pages on peers (swap readahead clusters, swap-out writes)
// cost one round trip for the batch instead of one each; the other requests are served
// first, one at a time. Never throws. REQUIRES: results.size() == requests.size().
void ServeUblkBatch(Device& device, std::span<const ublk::IoRequest> requests,
                    std::span<int> results) noexcept;

// Whether `request` would wait for a lower tier: a read of a page that is not in the local
// store (Device::ReadIsAtHand), or a write while writes go around the local store
// (Device::WritesGoAround). A hint, read without locks.
bool UblkRequestMustWait(const Device& device, const ublk::IoRequest& request) noexcept;

}  // namespace memlend
