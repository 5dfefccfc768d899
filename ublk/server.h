// UblkServer: one ublk block device (/dev/ublkbN) served by a Target, from ADD_DEV to
// DEL_DEV. A small library of its own: it knows the ublk driver and io_uring, and nothing
// of what the target stores.
//
// Start() runs, on the calling (control) thread:
//   ADD_DEV (ioctl-encoded; legacy opcodes on kernels before 6.3) -> SET_PARAMS ->
//   open /dev/ublkcN -> per queue: map descriptors and buffers, start its thread, which
//   FETCH_REQs every tag -> START_DEV, which adds the disk (the kernel's first reads, e.g.
//   the partition scan, are already served by the queue threads).
// Stop() runs STOP_DEV (the disk goes away after in-flight requests finish; outstanding
// fetches complete with UBLK_IO_RES_ABORT) -> queue threads end and are joined -> buffers
// unmapped, /dev/ublkcN closed -> DEL_DEV (waits until the kernel has released the
// device) -> /dev/ublk-control closed.
//
// A target serves a request on its queue's thread or defers it and completes it later from
// any thread (target.h, kIoDeferred), so a slow request need not delay the queue's others.
// User recovery (DeviceConfig::user_recovery): a device added with it outlives a server that
// dies — the kernel quiesces it and keeps (and, with _REISSUE, later reissues) its requests —
// and Recover() serves it from a new process: GET_DEV_INFO -> wait until it is quiesced ->
// START_USER_RECOVERY -> open /dev/ublkcN, map and FETCH_REQ every tag -> END_USER_RECOVERY.
//
// Thread safety: Start, Stop, the destructor and requests()/errors() run on one control
// thread at a time; the other accessors may be called from any thread once Start returned.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ublk/control.h"
#include "ublk/params.h"
#include "ublk/queue.h"
#include "ublk/target.h"

namespace memlend::ublk {

class UblkServer {
 public:
  // Creates, configures and starts a device served by `target`, which must outlive the
  // server. Returns the running server, or nullptr with a one-line reason in *error and
  // no ublk device left behind (the driver missing, not permitted, bad config, ...).
  static std::unique_ptr<UblkServer> Start(const DeviceConfig& config, Target& target,
                                           std::string* error);
  // Takes over device `config.dev_id`, added with user recovery by a server that died, and
  // serves it with `target`: the same disk, the requests it kept reissued. Waits up to
  // kRecoveryWait for the kernel to quiesce it. Returns nullptr with a one-line reason when
  // there is no such device, it was not added with user recovery, or a step fails (the
  // device is then left as it was, for another try or for `memlend detach`).
  static std::unique_ptr<UblkServer> Recover(const DeviceConfig& config, Target& target,
                                             std::string* error);
  static constexpr int kRecoveryWaitMs = 10000;
  // Removes device `dev_id` that no live server serves (one left by a daemon that died, or
  // kept with user recovery for a daemon that will not come): STOP_DEV, DEL_DEV. Returns 0,
  // or a negative errno with a one-line reason (-EBUSY: a live process serves it).
  static int RemoveOrphan(int dev_id, std::string* error);
  // How long Recover waited for the kernel to quiesce the device, in ms.
  std::uint64_t recovery_wait_ms() const { return recovery_wait_ms_; }
  // Stops the device if still running.
  ~UblkServer();
  UblkServer(const UblkServer&) = delete;
  UblkServer& operator=(const UblkServer&) = delete;

  // Removes the device: see the file comment. Returns 0, or the first negative errno a step
  // returned (the remaining steps still run, so nothing is left running). Idempotent: 0
  // once stopped. Does not check whether the block device is in use: the kernel tears it
  // down under its users, whose I/O then fails.
  int Stop() noexcept;

  bool running() const { return state_ != State::kStopped; }
  int dev_id() const { return static_cast<int>(info_.dev_id); }
  std::string block_path() const { return "/dev/ublkb" + std::to_string(info_.dev_id); }
  std::string char_path() const { return "/dev/ublkc" + std::to_string(info_.dev_id); }
  // The configuration in effect (queues resolved, limits as the kernel accepted them).
  const DeviceConfig& config() const { return config_; }
  // The UBLK_F_* flags the kernel granted.
  std::uint64_t features() const { return info_.flags; }
  bool legacy_encoding() const { return control_.legacy_encoding(); }

  // Requests served, and failed, by all queues so far. Control thread only (Stop frees
  // the queues).
  std::uint64_t requests() const;
  std::uint64_t errors() const;
  // Whether DeviceConfig::realtime was asked for and the kernel refused it (no
  // CAP_SYS_NICE): the queues then serve under the ordinary policy. Control thread only.
  bool realtime_refused() const;

 private:
  enum class State { kAdded, kStarted, kStopped };

  UblkServer(const DeviceConfig& config, Target& target) : config_(config), target_(target) {}
  int Setup(std::string* error);
  int SetupRecovery(std::string* error);
  // Opens /dev/ublkcN and starts every queue (each FETCH_REQs its tags).
  int StartQueues(std::string* error);

  DeviceConfig config_;
  Target& target_;
  ControlChannel control_;
  ublksrv_ctrl_dev_info info_{};
  int char_fd_ = -1;
  std::vector<std::unique_ptr<Queue>> queues_;
  State state_ = State::kStopped;
  std::uint64_t recovery_wait_ms_ = 0;
};

}  // namespace memlend::ublk
