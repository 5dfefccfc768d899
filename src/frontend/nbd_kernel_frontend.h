// The kernel-NBD frontend: serves a Device as /dev/nbdN through the kernel's NBD client,
// connected with the kernel's nbd netlink interface (frontend/nbd_netlink.h; no nbd-client
// needed).
//
// The daemon makes a socket pair, hands one end to the kernel (NBD_CMD_CONNECT, which picks a
// free device) and serves the other with the ordinary NBD transmission loop, so the kernel's
// requests meet the same validation and the same Device calls as any NBD client's; there is
// no handshake on this path (the connect message sets the size and flags). One thread per
// device runs the transmission loop; Detach sends NBD_CMD_DISCONNECT and joins it.
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
  // Serve the kernel's requests under SCHED_FIFO (see nbd::RunTransmission): the replies then
  // get socket buffers even when the whole system is out of memory and waiting for swap.
  bool realtime = false;
  // Let the device outlive this process (docs/restart.md): the kernel keeps it, and the
  // requests it holds, this long after the socket dies, for the next daemon to reconnect
  // (NBD_ATTR_DEAD_CONN_TIMEOUT); 0: the device fails with its daemon.
  unsigned keep_for_s = 0;
  // Reconnect /dev/nbd<reconnect_index>, left by a daemon that ended, instead of connecting
  // a free device; -1: connect a new one.
  int reconnect_index = -1;
};

// Returns "" when the kernel NBD client can be used (its netlink family exists, after trying
// `modprobe nbd` as root), else why not, in a few words.
std::string NbdKernelUnavailableReason() noexcept;

// Connects a free /dev/nbdN to `device`; the frontend keeps the device alive until it is
// destroyed. Throws std::runtime_error with a one-line reason (module missing, not root, ...)
// and leaves no device connected when it cannot attach.
// Runs on the control thread.
std::unique_ptr<BlockFrontend> AttachNbdKernel(std::shared_ptr<Device> device,
                                               const NbdKernelOptions& options);

}  // namespace memlend
