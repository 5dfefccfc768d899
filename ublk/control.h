// ControlChannel: /dev/ublk-control and the small SQE128 io_uring that carries control
// commands to it (ADD_DEV, SET_PARAMS, GET_QUEUE_AFFINITY, START_DEV, STOP_DEV, DEL_DEV).
// Each command is submitted alone and waited for; the kernel runs it in the submitting
// thread (START_DEV, STOP_DEV and DEL_DEV block there until the device is ready, stopped or
// released).
//
// Encoding: commands go out ioctl-encoded (UBLK_U_CMD_*) unless UseLegacyEncoding() was
// called, after a kernel older than 6.3 refused the ioctl form of ADD_DEV.
//
// Thread safety: none. One thread at a time (the control thread of UblkServer) uses it.
#pragma once

#include <liburing.h>

#include <cstdint>
#include <string>

#include "ublk/uapi.h"

namespace memlend::ublk {

class ControlChannel {
 public:
  ControlChannel() = default;
  ~ControlChannel() { Close(); }
  ControlChannel(const ControlChannel&) = delete;
  ControlChannel& operator=(const ControlChannel&) = delete;

  // Opens /dev/ublk-control and sets up the ring. Returns 0, or a negative errno with a
  // one-line reason in *error (-ENOENT: the ublk_drv module is not loaded).
  int Open(std::string* error) noexcept;
  void Close() noexcept;
  bool is_open() const { return fd_ >= 0; }

  void UseLegacyEncoding() { legacy_ = true; }
  bool legacy_encoding() const { return legacy_; }

  // ADD_DEV: `info` goes in and comes back as the kernel set it (dev_id, flags, limits).
  // Returns 0 or the kernel's negative errno.
  int AddDevice(ublksrv_ctrl_dev_info* info) noexcept;
  int SetParams(std::uint32_t dev_id, ublk_params* params) noexcept;
  // Fills `mask` (of `mask_bytes` bytes, a multiple of 8) with the CPUs mapped to `queue`.
  int GetQueueAffinity(std::uint32_t dev_id, unsigned queue, void* mask,
                       std::uint16_t mask_bytes) noexcept;
  // START_DEV blocks until every queue has fetched all its tags, then adds the disk.
  int StartDevice(std::uint32_t dev_id, int server_pid) noexcept;
  int StopDevice(std::uint32_t dev_id) noexcept;
  // GET_DEV_INFO: fills `info` (state, flags, queues, limits) of device `dev_id`.
  int GetDeviceInfo(std::uint32_t dev_id, ublksrv_ctrl_dev_info* info) noexcept;
  // GET_PARAMS: fills `params` (its len set by the caller) of device `dev_id`.
  int GetParams(std::uint32_t dev_id, ublk_params* params) noexcept;
  // User recovery of a device whose server died (UBLK_F_USER_RECOVERY): START once it is
  // quiesced (-EBUSY before), then the queues fetch every tag again, then END (which
  // blocks until they have) with the new server's pid.
  int StartUserRecovery(std::uint32_t dev_id) noexcept;
  int EndUserRecovery(std::uint32_t dev_id, int server_pid) noexcept;
  int DeleteDevice(std::uint32_t dev_id) noexcept;

 private:
  // Sends one command (ioctl-encoded `op`, or `legacy_op` in legacy mode) and returns the
  // completion's result; -EINTR is retried.
  int Send(std::uint32_t op, std::uint32_t legacy_op, const ublksrv_ctrl_cmd& cmd) noexcept;

  int fd_ = -1;
  bool ring_ready_ = false;
  bool legacy_ = false;
  io_uring ring_{};
};

}  // namespace memlend::ublk
