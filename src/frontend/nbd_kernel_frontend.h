// The kernel-NBD frontend: serves a Device as /dev/nbdN through the kernel's NBD client,
// configured with the classic ioctl interface of <linux/nbd.h> (no nbd-client needed).
//
// The daemon makes a socket pair, hands one end to the kernel (NBD_SET_SOCK) and serves
// the other with the ordinary NBD transmission loop, so the kernel's requests meet the
// same validation and the same Device calls as any NBD client's; there is no handshake
// on this path (the ioctls set the size and flags). Two threads per device: one blocks in
// NBD_DO_IT for as long as the device is connected, one runs the transmission loop.
//
// Alternatives: the netlink interface (NBD_CMD_CONNECT) can pick a free index itself and
// survives the configuring process, but needs generic-netlink plumbing for no gain here;
// the classic ioctls exist on every kernel with nbd.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "frontend/block_frontend.h"
#include "store/device.h"

namespace memlend {

struct NbdKernelOptions {
  // The kernel fails a request that has had no reply for this long (NBD_SET_TIMEOUT).
  unsigned timeout_s = 120;
  std::chrono::microseconds busy_poll{50};  // see nbd::RunTransmission
};

// Returns "" when the kernel NBD client can be used (/dev/nbd0 exists, after trying
// `modprobe nbd` as root), else why not, in a few words.
std::string NbdKernelUnavailableReason() noexcept;

// Connects a free /dev/nbdN to `device`; the frontend keeps the device alive until it is
// destroyed. Throws std::runtime_error with a one-line reason (module missing, not root,
// no free nbd device, ...) and leaves no device connected when it cannot attach.
// Runs on the control thread.
std::unique_ptr<BlockFrontend> AttachNbdKernel(std::shared_ptr<Device> device,
                                               const NbdKernelOptions& options);

}  // namespace memlend
