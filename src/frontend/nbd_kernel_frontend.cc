#include "frontend/nbd_kernel_frontend.h"

#include <fcntl.h>
#include <linux/nbd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "common/log.h"
#include "common/thread_name.h"
#include "common/unique_fd.h"
#include "frontend/host_tools.h"
#include "nbd/transmission.h"

namespace memlend {
namespace {

using frontend::CheckNotHeld;
using frontend::FindProgram;
using frontend::PathExists;
using frontend::RunProcess;
using frontend::WaitFor;
using frontend::WaitProcess;

// Transmission flags this server honours. NBD_FLAG_SEND_WRITE_ZEROES (bit 6) is newer
// than some kernel headers; kernels that do not know a flag ignore it.
constexpr unsigned long kSendWriteZeroes = 1u << 6;
constexpr unsigned long kTransmissionFlags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH |
                                             NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM |
                                             kSendWriteZeroes;
constexpr unsigned long kBlockSize = 4096;
constexpr int kMaxDevices = 1024;
constexpr int kStartTimeoutMs = 5000;
// Room for the kernel's largest WRITE at the default max_sectors_kb (1280), allocated when the
// device is attached rather than while it writes out swap.
constexpr std::size_t kLargestKernelWrite = 2 << 20;

std::string DevicePath(int index) { return "/dev/nbd" + std::to_string(index); }
std::string PidPath(int index) { return "/sys/block/nbd" + std::to_string(index) + "/pid"; }

class NbdKernelFrontend final : public BlockFrontend {
 public:
  NbdKernelFrontend(std::shared_ptr<Device> device, int index, UniqueFd nbd, UniqueFd server,
                    const NbdKernelOptions& options)
      : device_(std::move(device)),
        index_(index),
        path_(DevicePath(index)),
        nbd_(std::move(nbd)),
        server_(std::move(server)) {
    serve_ = std::thread([this, busy_poll = options.busy_poll] {
      SetThreadName("ml-nbd" + std::to_string(index_));
      nbd::RunTransmission(server_.get(), *device_, busy_poll, kLargestKernelWrite);
      // The kernel sees end of stream and NBD_DO_IT returns.
      ::shutdown(server_.get(), SHUT_RDWR);
    });
    do_it_ = std::thread([this] {
      SetThreadName("ml-nbd-doit");
      if (::ioctl(nbd_.get(), NBD_DO_IT) < 0 && errno != EPIPE && errno != ECONNRESET) {
        LogDebug("nbd: %s: NBD_DO_IT ended: %s", path_.c_str(), std::strerror(errno));
      }
      do_it_done_.store(true);
    });
  }

  ~NbdKernelFrontend() override {
    if (attached_ && Detach() == -EBUSY) {
      LogError("%s (%s) is still in use; disconnecting it anyway", path_.c_str(),
               device_->name().c_str());
      Teardown();
    }
  }

  std::string_view kind() const override { return "nbd"; }
  const std::string& path() const override { return path_; }

  int Detach() noexcept override {
    if (!attached_) return 0;
    const int held = CheckNotHeld(path_);
    if (held == -EBUSY) return -EBUSY;
    Teardown();
    return 0;
  }

  // Waits until the kernel reports the device started (its pid file appears).
  bool WaitStarted() {
    return WaitFor(kStartTimeoutMs, [&] { return PathExists(PidPath(index_)) || do_it_done_; }) &&
           !do_it_done_;
  }

  void Teardown() noexcept {
    if (!attached_) return;
    attached_ = false;
    // The kernel sends NBD_CMD_DISC down the socket; the loop answers it and ends.
    if (::ioctl(nbd_.get(), NBD_DISCONNECT) < 0) ::shutdown(server_.get(), SHUT_RDWR);
    if (!WaitFor(kStartTimeoutMs, [&] { return do_it_done_.load(); })) {
      ::shutdown(server_.get(), SHUT_RDWR);
    }
    if (serve_.joinable()) serve_.join();
    if (do_it_.joinable()) do_it_.join();
    ::ioctl(nbd_.get(), NBD_CLEAR_QUE);
    ::ioctl(nbd_.get(), NBD_CLEAR_SOCK);
    nbd_.Reset();
    server_.Reset();
    LogDebug("nbd: %s detached from %s", path_.c_str(), device_->name().c_str());
  }

 private:
  const std::shared_ptr<Device> device_;
  const int index_;
  const std::string path_;
  UniqueFd nbd_;
  UniqueFd server_;
  std::atomic<bool> do_it_done_{false};
  bool attached_ = true;  // control thread only
  std::thread serve_;
  std::thread do_it_;
};

// Tries to configure /dev/nbd`index` for `device`. Returns the kernel's end's partner (our
// end) and the open device, or sets *error (EBUSY: someone else has it).
bool Configure(int index, const Device& device, const NbdKernelOptions& options, UniqueFd* nbd,
               UniqueFd* ours, int* error) {
  UniqueFd fd(::open(DevicePath(index).c_str(), O_RDWR | O_CLOEXEC));
  if (!fd.valid()) {
    *error = errno;
    return false;
  }
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
    *error = errno;
    return false;
  }
  UniqueFd kernel_end(pair[0]);
  UniqueFd our_end(pair[1]);
  const unsigned long blocks = device.size_bytes() / kBlockSize;
  if (::ioctl(fd.get(), NBD_SET_BLKSIZE, kBlockSize) < 0 ||
      ::ioctl(fd.get(), NBD_SET_SIZE_BLOCKS, blocks) < 0 ||
      ::ioctl(fd.get(), NBD_SET_FLAGS, kTransmissionFlags) < 0 ||
      ::ioctl(fd.get(), NBD_SET_TIMEOUT, static_cast<unsigned long>(options.timeout_s)) < 0 ||
      ::ioctl(fd.get(), NBD_SET_SOCK, static_cast<unsigned long>(kernel_end.get())) < 0) {
    *error = errno;
    if (*error != EBUSY) ::ioctl(fd.get(), NBD_CLEAR_SOCK);  // forget the size we set
    return false;
  }
  // The kernel holds its own reference to its end now.
  *nbd = std::move(fd);
  *ours = std::move(our_end);
  return true;
}

}  // namespace

std::string NbdKernelUnavailableReason() noexcept {
  if (PathExists("/dev/nbd0")) return "";
  if (::geteuid() != 0) return "/dev/nbd0 is missing and only root can load the nbd module";
  if (!PathExists("/sys/module/nbd")) RunProcess({"modprobe", "-q", "nbd"}, 10000);
  if (WaitFor(1000, [] { return PathExists("/dev/nbd0"); })) return "";
  return "the kernel has no nbd module (/dev/nbd0 is missing and `modprobe nbd` failed)";
}

std::unique_ptr<BlockFrontend> AttachNbdKernel(std::shared_ptr<Device> device,
                                               const NbdKernelOptions& options) {
  if (const std::string reason = NbdKernelUnavailableReason(); !reason.empty()) {
    throw std::runtime_error("nbd: " + reason);
  }
  for (int index = 0; index < kMaxDevices && PathExists(DevicePath(index)); ++index) {
    if (PathExists(PidPath(index))) continue;  // connected by someone
    UniqueFd nbd;
    UniqueFd ours;
    int error = 0;
    if (!Configure(index, *device, options, &nbd, &ours, &error)) {
      if (error == EBUSY) continue;  // raced with another configurer
      if (error == EACCES || error == EPERM) {
        throw std::runtime_error("nbd: cannot use " + DevicePath(index) + ": " +
                                 std::strerror(error) + " (the daemon must run as root)");
      }
      throw std::runtime_error("nbd: cannot configure " + DevicePath(index) + ": " +
                               std::strerror(error));
    }
    auto frontend = std::make_unique<NbdKernelFrontend>(device, index, std::move(nbd),
                                                        std::move(ours), options);
    if (!frontend->WaitStarted()) {
      frontend->Teardown();
      throw std::runtime_error("nbd: " + DevicePath(index) + " did not start within 5 s");
    }
    return frontend;
  }
  throw std::runtime_error(
      "nbd: no free /dev/nbdN device (load the module with more: "
      "modprobe nbd nbds_max=N)");
}

}  // namespace memlend
