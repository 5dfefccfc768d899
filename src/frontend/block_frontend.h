// BlockFrontend: one memlend Device exposed to the kernel as a block device.
//
// `memlend attach` asks the daemon for a device of a given size and a frontend kind; the
// daemon creates the Device and one BlockFrontend for it, and `memlend detach` destroys
// both. Three kinds exist, tried in this order by `--frontend auto`:
//   - ublk: the kernel's ublk driver (/dev/ublk-control); the daemon serves the device's
//     queues itself through io_uring (src/frontend/ublk_frontend.h over the ublk/ library).
//   - nbd:  the kernel's NBD client (/dev/nbdN), connected to the daemon by a socket pair
//     that the daemon serves with its NBD transmission loop.
//   - fuse: nbdfuse exposes the device's NBD export as a file, and a loop device over that
//     file is the block device; for hosts and containers without nbd or ublk.
//
// Lifetime: a frontend is created attached (its factory throws std::runtime_error with a
// one-line reason and leaves nothing behind when it cannot attach) and stays attached
// until Detach() succeeds or it is destroyed. Frontends are created and detached on the
// control thread; their I/O runs on threads of their own.
#pragma once

#include <string>
#include <string_view>

namespace memlend {

class BlockFrontend {
 public:
  // Detaches (see Detach) if still attached; a detach that fails here is forced.
  virtual ~BlockFrontend() = default;

  // The kind: "ublk", "nbd" or "fuse".
  virtual std::string_view kind() const = 0;
  // The block device's path, e.g. /dev/ublkb0, /dev/nbd0, /dev/loop3.
  virtual const std::string& path() const = 0;

  // Removes the block device once the kernel has let go of it. Returns 0, or -EBUSY
  // (nothing changed) when it is still open (mounted, swapped on), or another -errno.
  // Idempotent: returns 0 when already detached.
  virtual int Detach() noexcept = 0;
};

}  // namespace memlend
