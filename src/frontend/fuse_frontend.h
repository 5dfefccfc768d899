// The FUSE frontend, for hosts (and containers) without the nbd or ublk modules: nbdfuse
// (libnbd-bin) connects to the daemon's own NBD server over a unix socket and exposes the
// device's export as a file on a FUSE mount; a loop device over that file is the block
// device. Costs: every request crosses user space twice more than with nbd or ublk (loop
// -> FUSE -> nbdfuse -> NBD socket -> daemon), and nbdfuse is a separate process that
// memlend cannot lock in memory, so a swap device on this frontend is only as safe under
// memory pressure as nbdfuse is. Prefer ublk or nbd where the kernel has them.
//
// Layout: MOUNT_ROOT/NAME is the FUSE mount point (a directory the daemon creates and
// removes), MOUNT_ROOT/NAME/NAME the file, MOUNT_ROOT/NAME.pid nbdfuse's pid file.
#pragma once

#include <memory>
#include <string>

#include "frontend/block_frontend.h"
#include "store/device.h"

namespace memlend {

struct FuseOptions {
  std::string nbd_socket;  // a unix socket where the daemon serves the device by its name
  std::string mount_root;  // an existing directory private to the daemon
};

// Returns "" when this host can attach through FUSE (root, /dev/fuse, /dev/loop-control,
// nbdfuse and fusermount3 installed), else why not, in a few words.
std::string FuseUnavailableReason();

// Exposes `device` as /dev/loopN. Throws std::runtime_error with a one-line reason and
// leaves nothing behind (no loop device, mount, process or directory) when it cannot
// attach. Runs on the control thread.
std::unique_ptr<BlockFrontend> AttachFuse(std::shared_ptr<Device> device,
                                          const FuseOptions& options);

}  // namespace memlend
