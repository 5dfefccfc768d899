#include "ublk/control.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace memlend::ublk {
namespace {

constexpr const char* kControlPath = "/dev/ublk-control";
constexpr unsigned kControlRingEntries = 4;

ublksrv_ctrl_cmd Header(std::uint32_t dev_id) {
  ublksrv_ctrl_cmd cmd;
  std::memset(&cmd, 0, sizeof(cmd));
  cmd.dev_id = dev_id;
  cmd.queue_id = static_cast<__u16>(-1);
  return cmd;
}

}  // namespace

int ControlChannel::Open(std::string* error) noexcept {
  Close();
  fd_ = ::open(kControlPath, O_RDWR | O_CLOEXEC);
  if (fd_ < 0) {
    const int err = errno;
    *error = std::string("cannot open ") + kControlPath + ": " + std::strerror(err) +
             (err == ENOENT ? " (is the ublk_drv module loaded?)" : "");
    return -err;
  }
  io_uring_params params;
  std::memset(&params, 0, sizeof(params));
  params.flags = IORING_SETUP_SQE128;
  const int ret = io_uring_queue_init_params(kControlRingEntries, &ring_, &params);
  if (ret < 0) {
    *error = std::string("cannot set up the control io_uring (SQE128): ") + std::strerror(-ret);
    ::close(fd_);
    fd_ = -1;
    return ret;
  }
  ring_ready_ = true;
  return 0;
}

void ControlChannel::Close() noexcept {
  if (ring_ready_) io_uring_queue_exit(&ring_);
  ring_ready_ = false;
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

int ControlChannel::Send(std::uint32_t op, std::uint32_t legacy_op,
                         const ublksrv_ctrl_cmd& cmd) noexcept {
  if (!ring_ready_) return -EBADF;
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (sqe == nullptr) return -EBUSY;              // never: one command at a time
  std::memset(sqe, 0, 2 * sizeof(io_uring_sqe));  // an SQE128 slot
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = fd_;
  sqe->cmd_op = legacy_ ? legacy_op : op;
  sqe->user_data = op;
  std::memcpy(sqe->cmd, &cmd, sizeof(cmd));
  int ret;
  do {
    ret = io_uring_submit(&ring_);
  } while (ret == -EINTR);
  if (ret < 0) return ret;
  io_uring_cqe* cqe = nullptr;
  do {
    ret = io_uring_wait_cqe(&ring_, &cqe);
  } while (ret == -EINTR);
  if (ret < 0) return ret;
  const int result = cqe->res;
  io_uring_cqe_seen(&ring_, cqe);
  return result;
}

int ControlChannel::AddDevice(ublksrv_ctrl_dev_info* info) noexcept {
  ublksrv_ctrl_cmd cmd = Header(info->dev_id);
  cmd.addr = reinterpret_cast<std::uintptr_t>(info);
  cmd.len = sizeof(*info);
  return Send(UBLK_U_CMD_ADD_DEV, UBLK_CMD_ADD_DEV, cmd);
}

int ControlChannel::SetParams(std::uint32_t dev_id, ublk_params* params) noexcept {
  ublksrv_ctrl_cmd cmd = Header(dev_id);
  cmd.addr = reinterpret_cast<std::uintptr_t>(params);
  cmd.len = static_cast<__u16>(params->len);
  return Send(UBLK_U_CMD_SET_PARAMS, UBLK_CMD_SET_PARAMS, cmd);
}

int ControlChannel::GetQueueAffinity(std::uint32_t dev_id, unsigned queue, void* mask,
                                     std::uint16_t mask_bytes) noexcept {
  ublksrv_ctrl_cmd cmd = Header(dev_id);
  cmd.addr = reinterpret_cast<std::uintptr_t>(mask);
  cmd.len = mask_bytes;
  cmd.data[0] = queue;
  return Send(UBLK_U_CMD_GET_QUEUE_AFFINITY, UBLK_CMD_GET_QUEUE_AFFINITY, cmd);
}

int ControlChannel::StartDevice(std::uint32_t dev_id, int server_pid) noexcept {
  ublksrv_ctrl_cmd cmd = Header(dev_id);
  cmd.data[0] = static_cast<__u64>(server_pid);
  return Send(UBLK_U_CMD_START_DEV, UBLK_CMD_START_DEV, cmd);
}

int ControlChannel::GetDeviceInfo(std::uint32_t dev_id, ublksrv_ctrl_dev_info* info) noexcept {
  ublksrv_ctrl_cmd cmd = Header(dev_id);
  cmd.addr = reinterpret_cast<std::uintptr_t>(info);
  cmd.len = sizeof(*info);
  return Send(UBLK_U_CMD_GET_DEV_INFO, UBLK_CMD_GET_DEV_INFO, cmd);
}

int ControlChannel::GetParams(std::uint32_t dev_id, ublk_params* params) noexcept {
  ublksrv_ctrl_cmd cmd = Header(dev_id);
  cmd.addr = reinterpret_cast<std::uintptr_t>(params);
  cmd.len = static_cast<__u16>(params->len);
  return Send(UBLK_U_CMD_GET_PARAMS, UBLK_CMD_GET_PARAMS, cmd);
}

int ControlChannel::StartUserRecovery(std::uint32_t dev_id) noexcept {
  return Send(UBLK_U_CMD_START_USER_RECOVERY, UBLK_CMD_START_USER_RECOVERY, Header(dev_id));
}

int ControlChannel::EndUserRecovery(std::uint32_t dev_id, int server_pid) noexcept {
  ublksrv_ctrl_cmd cmd = Header(dev_id);
  cmd.data[0] = static_cast<__u64>(server_pid);
  return Send(UBLK_U_CMD_END_USER_RECOVERY, UBLK_CMD_END_USER_RECOVERY, cmd);
}

int ControlChannel::StopDevice(std::uint32_t dev_id) noexcept {
  return Send(UBLK_U_CMD_STOP_DEV, UBLK_CMD_STOP_DEV, Header(dev_id));
}

int ControlChannel::DeleteDevice(std::uint32_t dev_id) noexcept {
  return Send(UBLK_U_CMD_DEL_DEV, UBLK_CMD_DEL_DEV, Header(dev_id));
}

}  // namespace memlend::ublk
