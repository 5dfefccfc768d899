#include "frontend/nbd_kernel_frontend.h"

#include <linux/nbd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <new>
#include <stdexcept>
#include <thread>

#include "common/log.h"
#include "common/thread_name.h"
#include "common/unique_fd.h"
#include "frontend/host_tools.h"
#include "frontend/nbd_netlink.h"
#include "nbd/transmission.h"

namespace memlend {
namespace {

using frontend::CheckNotHeld;
using frontend::RunProcess;
using frontend::WaitFor;

// Transmission flags this server honours. NBD_FLAG_SEND_WRITE_ZEROES (bit 6) is newer
// than some kernel headers; kernels that do not know a flag ignore it.
constexpr std::uint64_t kSendWriteZeroes = 1u << 6;
constexpr std::uint64_t kTransmissionFlags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH |
                                             NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM |
                                             kSendWriteZeroes;
constexpr std::uint64_t kBlockSize = 4096;
// How long Teardown waits for the transmission loop to see the kernel's disconnect.
constexpr int kDisconnectTimeoutMs = 5000;

std::string DevicePath(std::uint32_t index) { return "/dev/nbd" + std::to_string(index); }

class NbdKernelFrontend final : public BlockFrontend {
 public:
  // Starts serving `server`, our end of the socket pair, before the kernel has the other
  // end: the kernel reads the partition table as soon as the device starts.
  NbdKernelFrontend(std::shared_ptr<Device> device, UniqueFd server,
                    const NbdKernelOptions& options)
      : device_(std::move(device)), server_(std::move(server)) {
    serve_ = std::thread([this, options] {
      SetThreadName("ml-nbd-" + device_->name());
      try {
        nbd::RunTransmission(server_.get(), *device_, options.busy_poll, options.realtime);
      } catch (const std::bad_alloc&) {
        LogError("nbd %s: no memory for the connection's buffers", device_->name().c_str());
      }
      ::shutdown(server_.get(), SHUT_RDWR);
      serve_done_.store(true);
    });
  }

  ~NbdKernelFrontend() override {
    if (attached_ && Detach() == -EBUSY) {
      LogError("%s (%s) is still in use; disconnecting it anyway", path_.c_str(),
               device_->name().c_str());
      Teardown();
    }
    StopServing(0);  // never connected: nothing will end the loop but us
  }

  std::string_view kind() const override { return "nbd"; }
  const std::string& path() const override { return path_; }

  // Hands the kernel its end of the socket pair: a new device, or (reconnect >= 0) the one
  // an ended daemon left. Returns 0 or -errno.
  int Connect(nbd_netlink::NbdNetlink& netlink, const nbd_netlink::ConnectSpec& spec,
              int reconnect) {
    std::uint32_t index = 0;
    int ret = 0;
    if (reconnect >= 0) {
      index = static_cast<std::uint32_t>(reconnect);
      ret = netlink.Reconfigure(index, spec.socket_fd, spec.backend);
    } else {
      ret = netlink.Connect(spec, &index);
    }
    if (ret < 0) return ret;
    index_ = index;
    path_ = DevicePath(index);
    attached_ = true;
    if (const int error = frontend::UseNoIoScheduler(path_); error < 0) {
      LogDebug("nbd: %s: cannot turn off its I/O scheduler: %s", path_.c_str(),
               std::strerror(-error));
    }
    if (const int error = frontend::UseNoWritebackThrottling(path_); error < 0) {
      LogDebug("nbd: %s: cannot turn off writeback throttling: %s", path_.c_str(),
               std::strerror(-error));
    }
    return 0;
  }

  int Detach() noexcept override {
    if (!attached_) return 0;
    if (CheckNotHeld(path_) == -EBUSY) return -EBUSY;
    Teardown();
    return 0;
  }

 private:
  // Disconnects the device: the kernel sends NBD_CMD_DISC down the socket, the transmission
  // loop answers it and ends.
  void Teardown() noexcept {
    if (!attached_) return;
    attached_ = false;
    nbd_netlink::NbdNetlink netlink;
    int ret = netlink.Open();
    if (ret == 0) ret = netlink.Disconnect(index_);
    if (ret < 0) {
      LogError("nbd: disconnecting %s: %s", path_.c_str(), std::strerror(-ret));
    }
    StopServing(kDisconnectTimeoutMs);
    LogDebug("nbd: %s detached from %s", path_.c_str(), device_->name().c_str());
  }

  // Waits up to `wait_ms` for the transmission loop to end, ends it if it has not, and joins it.
  void StopServing(int wait_ms) noexcept {
    if (!serve_.joinable()) return;
    if (!WaitFor(wait_ms, [&] { return serve_done_.load(); })) {
      ::shutdown(server_.get(), SHUT_RDWR);
    }
    serve_.join();
    server_.Reset();
  }

  const std::shared_ptr<Device> device_;
  UniqueFd server_;
  std::atomic<bool> serve_done_{false};
  std::thread serve_;
  // Control thread only.
  std::uint32_t index_ = 0;
  std::string path_;
  bool attached_ = false;
};

// Opens the nbd netlink family, loading the module first if need be (root only). Returns 0
// or -errno; -ENOENT when the kernel has no nbd.
int OpenNetlink(nbd_netlink::NbdNetlink* netlink) {
  int ret = netlink->Open();
  if (ret != -ENOENT || ::geteuid() != 0) return ret;
  RunProcess({"modprobe", "-q", "nbd"}, 10000);
  return netlink->Open();
}

// Why OpenNetlink failed with `error`, in a few words.
std::string UnavailableReason(int error) {
  if (error != -ENOENT) {
    return std::string("cannot reach the kernel's nbd netlink interface: ") +
           std::strerror(-error);
  }
  if (::geteuid() != 0) return "the nbd module is not loaded and only root can load it";
  return "the kernel has no nbd module (`modprobe nbd` failed)";
}

}  // namespace

std::string NbdKernelUnavailableReason() noexcept {
  nbd_netlink::NbdNetlink netlink;
  const int ret = OpenNetlink(&netlink);
  return ret == 0 ? "" : UnavailableReason(ret);
}

std::unique_ptr<BlockFrontend> AttachNbdKernel(std::shared_ptr<Device> device,
                                               const NbdKernelOptions& options) {
  nbd_netlink::NbdNetlink netlink;
  if (const int ret = OpenNetlink(&netlink); ret < 0) {
    throw std::runtime_error("nbd: " + UnavailableReason(ret));
  }
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
    throw std::runtime_error(std::string("nbd: socketpair: ") + std::strerror(errno));
  }
  UniqueFd kernel_end(pair[0]);
  nbd_netlink::ConnectSpec spec;
  spec.size_bytes = device->size_bytes();
  spec.block_size_bytes = kBlockSize;
  spec.server_flags = kTransmissionFlags;
  spec.timeout_s = options.timeout_s;
  spec.dead_conn_timeout_s = options.keep_for_s;
  spec.socket_fd = kernel_end.get();
  spec.backend = "memlend:" + device->name();
  auto frontend = std::make_unique<NbdKernelFrontend>(device, UniqueFd(pair[1]), options);
  // The kernel holds its own reference to its end once connected; ours closes on return.
  if (const int ret = frontend->Connect(netlink, spec, options.reconnect_index); ret < 0) {
    if (options.reconnect_index >= 0) {
      throw std::runtime_error("nbd: cannot reconnect /dev/nbd" +
                               std::to_string(options.reconnect_index) + ": " +
                               std::strerror(-ret) + " (its kernel side gave up waiting?)");
    }
    if (ret == -EPERM || ret == -EACCES) {
      throw std::runtime_error("nbd: the kernel refused to connect a device: " +
                               std::string(std::strerror(-ret)) +
                               " (the daemon must run as root)");
    }
    throw std::runtime_error("nbd: cannot connect a device: " + std::string(std::strerror(-ret)));
  }
  return frontend;
}

}  // namespace memlend
