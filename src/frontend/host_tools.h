// Small control-path helpers the kernel frontends share: running helper programs
// (modprobe, nbdfuse, fusermount3) and asking whether a block device is in use.
// None of this is on the data path.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

namespace memlend::frontend {

// Starts `argv` (argv[0] looked up in PATH) in a session of its own, with stdin on
// /dev/null, stdout on the daemon's stderr, default signal dispositions and nothing
// blocked. Returns its pid. Throws std::runtime_error naming the program on failure.
pid_t SpawnProcess(const std::vector<std::string>& argv);

// Waits up to `timeout_ms` for child `pid` to end. Returns its wait status (>= 0), or
// -ETIMEDOUT while it still runs, or another -errno.
int WaitProcess(pid_t pid, int timeout_ms) noexcept;

// Runs `argv` to completion (at most `timeout_ms`; killed past that). Returns true when it
// exited with status 0.
bool RunProcess(const std::vector<std::string>& argv, int timeout_ms) noexcept;

// The full path of `program` found in PATH (or the usual sbin directories), or "".
std::string FindProgram(const std::string& program);

// Returns 0 when nobody holds the block device at `path` exclusively, -EBUSY when someone
// does (a mounted file system, swapon, another exclusive opener), or another -errno.
int CheckNotHeld(const std::string& path) noexcept;

// Turns off the kernel's I/O scheduler for the block device at `path` (/dev/NAME): for a
// device served from RAM, sorting and merging requests costs more than it saves (in the VM
// benchmark mq-deadline, the kernel's choice for single-queue devices, cost ublk 10-20% and
// kernel NBD 25% of their IOPS at depth 32). Returns 0 or -errno.
int UseNoIoScheduler(const std::string& path) noexcept;

// Turns off the block layer's writeback throttling (wbt_lat_usec = 0) for the block device at
// `path`. It holds writes back while reads take longer than its target (2 ms on a device that
// does not rotate); a page read from a peer can take that long, and then swap-out writes,
// which free the memory everyone waits for, are throttled: in the VM swap benchmark a process
// spent a fifth of its time in wbt_wait. zram and brd have no such throttle. Returns 0 (also
// on a kernel without it) or -errno.
int UseNoWritebackThrottling(const std::string& path) noexcept;

// True when `path` exists.
bool PathExists(const std::string& path) noexcept;

// Polls `ready` every 10 ms for up to `timeout_ms`; returns whether it became true.
template <typename Predicate>
bool WaitFor(int timeout_ms, Predicate ready);

}  // namespace memlend::frontend

#include <time.h>

namespace memlend::frontend {

template <typename Predicate>
bool WaitFor(int timeout_ms, Predicate ready) {
  for (int waited = 0;; waited += 10) {
    if (ready()) return true;
    if (waited >= timeout_ms) return false;
    const timespec pause{0, 10 * 1000 * 1000};
    ::nanosleep(&pause, nullptr);
  }
}

}  // namespace memlend::frontend
