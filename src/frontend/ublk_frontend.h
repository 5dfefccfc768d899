// The ublk frontend: serves a Device as /dev/ublkbN through the kernel's ublk driver,
// using the target-agnostic server in ublk/. This file is the adapter: it maps ublk
// requests (sector ranges and operations) onto Device calls.
#pragma once

#include <memory>

#include "frontend/block_frontend.h"
#include "store/device.h"

namespace memlend {

struct UblkOptions {
  unsigned queues = 0;         // hardware queues, each with its own thread; 0: one per CPU
  unsigned queue_depth = 128;  // requests in flight per queue
};

// True when this host's kernel offers ublk (/dev/ublk-control exists).
bool UblkAvailable() noexcept;

// Creates and starts a ublk block device for `device`; the frontend keeps the device
// alive until it is destroyed. Throws std::runtime_error with a one-line reason (driver
// missing, not permitted, ...) and leaves no ublk device behind when it cannot attach.
std::unique_ptr<BlockFrontend> AttachUblk(std::shared_ptr<Device> device,
                                          const UblkOptions& options);

}  // namespace memlend
