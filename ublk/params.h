// Pure logic shared by the control and data paths, kept apart so that it is unit-tested
// without a kernel: the device-add arguments (DeviceConfig) and their validation, the
// structures sent with ADD_DEV and SET_PARAMS, and the check of each I/O descriptor the
// kernel hands over before a target sees it.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>

#include "ublk/target.h"
#include "ublk/uapi.h"

namespace memlend::ublk {

// The arguments of one device add; every target's caller fills the same struct.
struct DeviceConfig {
  std::uint64_t size_bytes = 0;  // a positive multiple of 4096
  unsigned queues = 0;           // hardware queues (one thread each); 0: one per online CPU
  unsigned queue_depth = 128;    // requests in flight per queue, 1..UBLK_MAX_QUEUE_DEPTH
  // Largest request, and the size of each tag's buffer: a power of two, 4 KiB..1 MiB. Each
  // queue preallocates queue_depth buffers of this size.
  std::uint32_t max_io_bytes = 256 * 1024;
  // Largest DISCARD / WRITE_ZEROES, in bytes (a multiple of 4096); 0 turns the op off.
  std::uint64_t max_discard_bytes = std::uint64_t{1} << 30;
  std::uint64_t max_write_zeroes_bytes = std::uint64_t{1} << 30;
  // Whether completed writes may sit in a volatile cache (the kernel then sends FLUSH).
  bool volatile_cache = false;
  // Lock each queue's I/O buffers in memory (mlock), e.g. for a swap device.
  bool lock_memory = false;
  // Pin each queue's thread to the CPUs whose requests it receives (the kernel's queue
  // affinity); otherwise the scheduler may run it on any CPU.
  bool pin_queues = true;
  // Serve requests under SCHED_FIFO (lowest priority), waiting for them under the ordinary
  // policy: a real-time thread may allocate a little below the kernel's min watermark, so
  // the socket sends a request makes (to a peer holding its page) do not loop in reclaim
  // when the whole host is out of memory and waits for this device's swap I/O. Needs
  // CAP_SYS_NICE; without it the queues serve under the ordinary policy
  // (UblkServer::realtime_refused()).
  bool realtime = false;
  // The device number to ask for (N in /dev/ublkbN), or -1: the kernel picks one.
  int dev_id = -1;
  // Add the device with user recovery (UBLK_F_USER_RECOVERY | _REISSUE): when its server
  // dies the kernel keeps the disk and its requests for the next server (UblkServer::Recover)
  // instead of removing it.
  bool user_recovery = false;
};

// Returns "" when `config` is acceptable (after queues == 0 has been resolved to a count),
// else a one-line reason.
std::string ValidateConfig(const DeviceConfig& config);

// The number of queues to use for `config` on a host with `online_cpus` CPUs.
unsigned ResolveQueueCount(const DeviceConfig& config, unsigned online_cpus) noexcept;

// The ADD_DEV payload for `config` (queues already resolved). `flags` are the UBLK_F_*
// feature flags to ask for.
ublksrv_ctrl_dev_info BuildDevInfo(const DeviceConfig& config, std::uint64_t flags) noexcept;

// The SET_PARAMS payload: 512-byte logical blocks, 4096-byte physical blocks and io_min,
// io_opt and max_sectors of max_io_bytes, discard and write-zeroes limits with 4096-byte
// granularity (types DISCARD only when either is enabled).
ublk_params BuildParams(const DeviceConfig& config) noexcept;

// Returns the base-2 logarithm of `value`. REQUIRES: value is a power of two.
unsigned Log2(std::uint64_t value) noexcept;

// Checks one descriptor from the kernel against the device's limits and returns the
// request the target is to see (buffer empty; the caller sets it for READ/WRITE), or a
// negative errno to complete the tag with: -EOPNOTSUPP for an op this library does not
// serve, -EINVAL for a range past the end of the device or a size over the buffer.
struct DescriptorLimits {
  std::uint64_t device_sectors = 0;
  std::uint32_t max_io_bytes = 0;
};
struct DescriptorCheck {
  int error = 0;  // 0 or -errno
  IoRequest request;
};
DescriptorCheck CheckDescriptor(const ublksrv_io_desc& desc,
                                const DescriptorLimits& limits) noexcept;

// The value to commit for a request the target answered with `result`: READ/WRITE results
// are clamped to the request's bytes, and 0 (which would make the kernel reissue the same
// request forever) becomes -EIO; positive results of other ops become 0.
int CommitResult(IoOp op, std::uint32_t request_bytes, int result) noexcept;

// The offset of queue `queue`'s descriptor array in /dev/ublkcN, and that array's mapped
// length for `queue_depth` tags (both page-rounded as the kernel requires).
std::uint64_t DescriptorArrayOffset(unsigned queue, std::uint64_t page_size) noexcept;
std::uint64_t DescriptorArrayLength(unsigned queue_depth, std::uint64_t page_size) noexcept;

}  // namespace memlend::ublk
