#include "ublk/server.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

namespace memlend::ublk {
namespace {

// How long to wait for /dev/ublkcN to appear after ADD_DEV (udev may create it late).
constexpr int kCharDeviceWaitMs = 3000;

std::string Describe(const char* step, int ret) {
  std::string text = std::string(step) + " failed: " + std::strerror(-ret);
  if (ret == -EPERM || ret == -EACCES) text += " (needs CAP_SYS_ADMIN)";
  return text;
}

std::uint32_t RoundDownToPowerOfTwo(std::uint32_t value) {
  std::uint32_t result = 1;
  while (result <= value / 2) result <<= 1;
  return result;
}

}  // namespace

std::unique_ptr<UblkServer> UblkServer::Start(const DeviceConfig& config, Target& target,
                                              std::string* error) {
  std::unique_ptr<UblkServer> server(new UblkServer(config, target));
  if (server->Setup(error) != 0) {
    server->Stop();
    return nullptr;
  }
  return server;
}

UblkServer::~UblkServer() { Stop(); }

int UblkServer::Setup(std::string* error) {
  const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  config_.queues = ResolveQueueCount(config_, cpus > 0 ? static_cast<unsigned>(cpus) : 1);
  if (std::string reason = ValidateConfig(config_); !reason.empty()) {
    *error = "ublk: " + reason;
    return -EINVAL;
  }
  int ret = control_.Open(error);
  if (ret < 0) {
    *error = "ublk: " + *error;
    return ret;
  }

  // ADD_DEV, ioctl-encoded; a kernel before 6.3 knows only the legacy opcodes.
  const std::uint64_t recovery =
      config_.user_recovery ? UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE : 0;
  info_ = BuildDevInfo(config_, UBLK_F_CMD_IOCTL_ENCODE | recovery);
  ret = control_.AddDevice(&info_);
  if (ret == -EOPNOTSUPP || ret == -EINVAL) {
    ublksrv_ctrl_dev_info legacy = BuildDevInfo(config_, recovery);
    control_.UseLegacyEncoding();
    if (control_.AddDevice(&legacy) == 0) {
      info_ = legacy;
      ret = 0;
    }
  }
  if (ret < 0) {
    *error = "ublk: " + Describe("ADD_DEV", ret);
    return ret;
  }
  state_ = State::kAdded;

  // The kernel may lower the queue count (to its CPU count) and the buffer size.
  config_.queues = info_.nr_hw_queues;
  config_.queue_depth = info_.queue_depth;
  if (info_.max_io_buf_bytes < config_.max_io_bytes) {
    config_.max_io_bytes = RoundDownToPowerOfTwo(info_.max_io_buf_bytes);
  }
  config_.dev_id = static_cast<int>(info_.dev_id);
  if (std::string reason = ValidateConfig(config_); !reason.empty()) {
    *error = "ublk: the kernel's limits leave no usable device: " + reason;
    return -EINVAL;
  }

  ublk_params params = BuildParams(config_);
  ret = control_.SetParams(info_.dev_id, &params);
  if (ret < 0) {
    *error = "ublk: " + Describe("SET_PARAMS", ret);
    return ret;
  }

  ret = StartQueues(error);
  if (ret < 0) return ret;

  ret = control_.StartDevice(info_.dev_id, static_cast<int>(::getpid()));
  if (ret < 0) {
    *error = "ublk: " + Describe("START_DEV", ret);
    return ret;
  }
  state_ = State::kStarted;
  return 0;
}

std::unique_ptr<UblkServer> UblkServer::Recover(const DeviceConfig& config, Target& target,
                                                std::string* error) {
  std::unique_ptr<UblkServer> server(new UblkServer(config, target));
  if (server->SetupRecovery(error) != 0) {
    // Leave the device as it is: stopping its queues must not remove it.
    server->state_ = State::kStopped;
    server->Stop();
    return nullptr;
  }
  return server;
}

int UblkServer::SetupRecovery(std::string* error) {
  int ret = control_.Open(error);
  if (ret < 0) {
    *error = "ublk: " + *error;
    return ret;
  }
  const auto dev_id = static_cast<std::uint32_t>(config_.dev_id);
  const auto began = std::chrono::steady_clock::now();
  const auto give_up = began + std::chrono::milliseconds(kRecoveryWaitMs);
  for (;;) {
    ret = control_.GetDeviceInfo(dev_id, &info_);
    if (ret == -EOPNOTSUPP || ret == -EINVAL) {
      control_.UseLegacyEncoding();
      ret = control_.GetDeviceInfo(dev_id, &info_);
    }
    if (ret < 0) {
      *error = "ublk: device " + std::to_string(dev_id) + ": " + Describe("GET_DEV_INFO", ret) +
               (ret == -ENODEV ? " (it is gone)" : "");
      return ret;
    }
    if ((info_.flags & UBLK_F_USER_RECOVERY) == 0) {
      *error = "ublk: device " + std::to_string(dev_id) + " was not added with user recovery";
      return -EINVAL;
    }
    // The device the state names, not another that got its number since: the same size.
    ublk_params params{};
    params.len = sizeof(params);
    if (control_.GetParams(dev_id, &params) == 0 &&
        std::uint64_t{params.basic.dev_sectors} << kSectorShift != config_.size_bytes) {
      *error = "ublk: /dev/ublkb" + std::to_string(dev_id) + " has " +
               std::to_string(std::uint64_t{params.basic.dev_sectors} << kSectorShift) +
               " bytes, not the " + std::to_string(config_.size_bytes) + " of the device it was";
      return -EINVAL;
    }
    if (info_.state == UBLK_S_DEV_QUIESCED) break;
    if (std::chrono::steady_clock::now() >= give_up) {
      *error = "ublk: device " + std::to_string(dev_id) + " is not waiting for a server (state " +
               std::to_string(info_.state) + ")";
      return -EBUSY;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  while ((ret = control_.StartUserRecovery(dev_id)) == -EBUSY &&
         std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));  // its old server lets go
  }
  if (ret < 0) {
    *error = "ublk: " + Describe("START_USER_RECOVERY", ret);
    return ret;
  }
  recovery_wait_ms_ = static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - began)
          .count());
  state_ = State::kAdded;
  // The device keeps what its first server set: queues, depth, buffer size.
  config_.queues = info_.nr_hw_queues;
  config_.queue_depth = info_.queue_depth;
  config_.max_io_bytes = RoundDownToPowerOfTwo(info_.max_io_buf_bytes);
  config_.dev_id = static_cast<int>(info_.dev_id);
  if (std::string reason = ValidateConfig(config_); !reason.empty()) {
    *error = "ublk: the recovered device is not usable: " + reason;
    return -EINVAL;
  }
  ret = StartQueues(error);
  if (ret < 0) return ret;
  ret = control_.EndUserRecovery(dev_id, static_cast<int>(::getpid()));
  if (ret < 0) {
    *error = "ublk: " + Describe("END_USER_RECOVERY", ret);
    return ret;
  }
  state_ = State::kStarted;
  return 0;
}

int UblkServer::RemoveOrphan(int dev_id, std::string* error) {
  ControlChannel control;
  int ret = control.Open(error);
  if (ret < 0) {
    *error = "ublk: " + *error;
    return ret;
  }
  ublksrv_ctrl_dev_info info{};
  const auto id = static_cast<std::uint32_t>(dev_id);
  ret = control.GetDeviceInfo(id, &info);
  if (ret == -EOPNOTSUPP || ret == -EINVAL) {
    control.UseLegacyEncoding();
    ret = control.GetDeviceInfo(id, &info);
  }
  if (ret < 0) {
    *error = "ublk: device " + std::to_string(dev_id) + ": " + Describe("GET_DEV_INFO", ret);
    return ret;
  }
  if (info.state == UBLK_S_DEV_LIVE && info.ublksrv_pid > 0 && ::kill(info.ublksrv_pid, 0) == 0) {
    *error = "ublk: /dev/ublkb" + std::to_string(dev_id) + " is served by process " +
             std::to_string(info.ublksrv_pid);
    return -EBUSY;
  }
  ret = control.StopDevice(id);
  const int deleted = control.DeleteDevice(id);
  if (deleted < 0) {
    *error = "ublk: " + Describe("DEL_DEV", deleted);
    return deleted;
  }
  (void)ret;  // a device never started (or already stopped) refuses STOP_DEV; DEL_DEV decides
  return 0;
}

int UblkServer::StartQueues(std::string* error) {
  int ret = 0;
  const std::string path = char_path();
  const auto give_up =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(kCharDeviceWaitMs);
  while ((char_fd_ = ::open(path.c_str(), O_RDWR | O_CLOEXEC)) < 0 && errno == ENOENT &&
         std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (char_fd_ < 0) {
    ret = -errno;
    *error = "ublk: cannot open " + path + ": " + std::strerror(-ret);
    return ret;
  }

  const std::uint64_t fetch_op =
      control_.legacy_encoding() ? UBLK_IO_FETCH_REQ : UBLK_U_IO_FETCH_REQ;
  const std::uint64_t commit_op =
      control_.legacy_encoding() ? UBLK_IO_COMMIT_AND_FETCH_REQ : UBLK_U_IO_COMMIT_AND_FETCH_REQ;
  const std::uint64_t device_sectors = config_.size_bytes >> kSectorShift;
  for (unsigned q = 0; q < config_.queues; ++q) {
    // Pin each queue's thread to the CPUs whose requests it receives, when the kernel says.
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    const bool have_affinity =
        config_.pin_queues &&
        control_.GetQueueAffinity(info_.dev_id, q, &cpus, sizeof(cpus)) >= 0;
    auto queue = std::make_unique<Queue>(q, config_.queue_depth, config_.max_io_bytes,
                                         device_sectors, static_cast<std::uint32_t>(fetch_op),
                                         static_cast<std::uint32_t>(commit_op), target_);
    std::string reason;
    ret = queue->Map(char_fd_, config_.lock_memory, &reason);
    if (ret == 0) ret = queue->Start(have_affinity ? &cpus : nullptr, config_.realtime, &reason);
    queues_.push_back(std::move(queue));
    if (ret < 0) {
      *error = "ublk: queue " + std::to_string(q) + ": " + reason;
      return ret;
    }
  }
  return 0;
}

int UblkServer::Stop() noexcept {
  int first_error = 0;
  auto note = [&first_error](int ret) {
    if (ret < 0 && first_error == 0) first_error = ret;
  };
  if (state_ != State::kStopped) {
    // Also for a device that was added but never started: STOP_DEV then aborts the
    // fetches the queues have outstanding.
    note(control_.StopDevice(info_.dev_id));
  }
  for (auto& queue : queues_) queue->Wake();
  for (auto& queue : queues_) queue->Join();
  // Unmapping the descriptors and closing the character device drop the last references
  // that DEL_DEV waits for.
  queues_.clear();
  if (char_fd_ >= 0) ::close(char_fd_);
  char_fd_ = -1;
  if (state_ != State::kStopped) note(control_.DeleteDevice(info_.dev_id));
  control_.Close();
  state_ = State::kStopped;
  return first_error;
}

std::uint64_t UblkServer::requests() const {
  std::uint64_t total = 0;
  for (const auto& queue : queues_)
    total += queue->stats().requests.load(std::memory_order_relaxed);
  return total;
}

std::uint64_t UblkServer::errors() const {
  std::uint64_t total = 0;
  for (const auto& queue : queues_) total += queue->stats().errors.load(std::memory_order_relaxed);
  return total;
}

bool UblkServer::realtime_refused() const {
  for (const auto& queue : queues_) {
    if (queue->realtime_refused()) return true;
  }
  return false;
}

}  // namespace memlend::ublk
