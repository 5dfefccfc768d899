#include "frontend/fuse_frontend.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/loop.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <stdexcept>

#include "common/log.h"
#include "common/unique_fd.h"
#include "frontend/host_tools.h"

namespace memlend {
namespace {

using frontend::CheckNotHeld;
using frontend::FindProgram;
using frontend::PathExists;
using frontend::RunProcess;
using frontend::WaitFor;
using frontend::WaitProcess;

constexpr int kReadyTimeoutMs = 10000;
constexpr int kStopTimeoutMs = 10000;
constexpr int kMaxLoopAttempts = 16;

// Percent-encodes everything but unreserved characters and '/', for a path in an NBD URI.
std::string UriEscape(const std::string& text) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
        c == '.' || c == '_' || c == '~' || c == '/') {
      out += c;
    } else {
      out += '%';
      out += kHex[byte >> 4];
      out += kHex[byte & 0xf];
    }
  }
  return out;
}

bool LoopBound(int index) {
  return PathExists("/sys/block/loop" + std::to_string(index) + "/loop/backing_file");
}

// Everything an attach creates, torn down in reverse order by Release(). Each step is
// recorded as soon as it exists, so a failure at any point undoes exactly what was done.
struct FuseResources {
  std::string mount_dir;  // created by us
  std::string pid_file;
  pid_t nbdfuse = -1;   // running nbdfuse, mounted on mount_dir once ready
  int loop_index = -1;  // a loop device bound to the file

  void Release() noexcept {
    if (loop_index >= 0) {
      const std::string loop = "/dev/loop" + std::to_string(loop_index);
      UniqueFd fd(::open(loop.c_str(), O_RDWR | O_CLOEXEC));
      if (fd.valid() && ::ioctl(fd.get(), LOOP_CLR_FD) < 0 && errno != ENXIO) {
        LogError("fuse: cannot clear %s: %s", loop.c_str(), std::strerror(errno));
      }
      fd.Reset();  // the clearing finishes when the last opener closes
      if (!WaitFor(5000, [&] { return !LoopBound(loop_index); })) {
        LogError("fuse: %s still refers to its file", loop.c_str());
      }
      loop_index = -1;
    }
    if (nbdfuse > 0) {
      // fusermount3 -u makes nbdfuse exit cleanly; a lazy unmount and signals are the
      // fallbacks for a mount that is still busy or a process that does not answer.
      if (!RunProcess({"fusermount3", "-u", "-q", mount_dir}, kStopTimeoutMs)) {
        RunProcess({"fusermount3", "-u", "-q", "-z", mount_dir}, kStopTimeoutMs);
      }
      if (WaitProcess(nbdfuse, kStopTimeoutMs) == -ETIMEDOUT) {
        ::kill(nbdfuse, SIGTERM);
        if (WaitProcess(nbdfuse, 2000) == -ETIMEDOUT) {
          ::kill(nbdfuse, SIGKILL);
          WaitProcess(nbdfuse, 2000);
        }
      }
      nbdfuse = -1;
    }
    if (!pid_file.empty()) {
      ::unlink(pid_file.c_str());
      pid_file.clear();
    }
    if (!mount_dir.empty()) {
      if (::rmdir(mount_dir.c_str()) != 0 && errno != ENOENT) {
        LogError("fuse: cannot remove %s: %s", mount_dir.c_str(), std::strerror(errno));
      }
      mount_dir.clear();
    }
  }
};

class FuseFrontend final : public BlockFrontend {
 public:
  FuseFrontend(std::shared_ptr<Device> device, FuseResources resources)
      : device_(std::move(device)),
        path_("/dev/loop" + std::to_string(resources.loop_index)),
        resources_(std::move(resources)) {}

  ~FuseFrontend() override {
    if (attached_ && Detach() == -EBUSY) {
      LogError("%s (%s) is still in use; detaching it anyway", path_.c_str(),
               device_->name().c_str());
      resources_.Release();
    }
  }

  std::string_view kind() const override { return "fuse"; }
  const std::string& path() const override { return path_; }

  int Detach() noexcept override {
    if (!attached_) return 0;
    if (CheckNotHeld(path_) == -EBUSY) return -EBUSY;
    attached_ = false;
    resources_.Release();
    LogDebug("fuse: %s detached from %s", path_.c_str(), device_->name().c_str());
    return 0;
  }

 private:
  const std::shared_ptr<Device> device_;
  const std::string path_;
  FuseResources resources_;
  bool attached_ = true;  // control thread only
};

// Clears loop devices whose backing file is under `prefix` (left by a daemon that was
// killed; the kernel shows a vanished FUSE file's old path).
void ReleaseStaleLoops(const std::string& prefix) {
  DIR* dir = ::opendir("/sys/block");
  if (dir == nullptr) return;
  while (const dirent* entry = ::readdir(dir)) {
    const std::string block = entry->d_name;
    if (block.rfind("loop", 0) != 0) continue;
    std::ifstream file("/sys/block/" + block + "/loop/backing_file");
    std::string backing;
    if (!std::getline(file, backing) || backing.rfind(prefix, 0) != 0) continue;
    UniqueFd loop(::open(("/dev/" + block).c_str(), O_RDWR | O_CLOEXEC));
    if (loop.valid() && ::ioctl(loop.get(), LOOP_CLR_FD) == 0) {
      LogError("fuse: cleared /dev/%s, left over on %s", block.c_str(), backing.c_str());
    }
  }
  ::closedir(dir);
}

// Binds a free loop device to `file`; returns its index. Throws on failure.
int BindLoop(int file, const std::string& file_path) {
  UniqueFd control(::open("/dev/loop-control", O_RDWR | O_CLOEXEC));
  if (!control.valid()) {
    throw std::runtime_error(std::string("fuse: cannot open /dev/loop-control: ") +
                             std::strerror(errno));
  }
  for (int attempt = 0; attempt < kMaxLoopAttempts; ++attempt) {
    const int index = ::ioctl(control.get(), LOOP_CTL_GET_FREE);
    if (index < 0) {
      throw std::runtime_error(std::string("fuse: no free loop device: ") + std::strerror(errno));
    }
    const std::string path = "/dev/loop" + std::to_string(index);
    UniqueFd loop(::open(path.c_str(), O_RDWR | O_CLOEXEC));
    if (!loop.valid()) {
      throw std::runtime_error("fuse: cannot open " + path + ": " + std::strerror(errno));
    }
    loop_config config{};
    config.fd = static_cast<__u32>(file);
    config.block_size = 4096;
    config.info.lo_flags = 0;  // no direct I/O, no autoclear
    std::strncpy(reinterpret_cast<char*>(config.info.lo_file_name), file_path.c_str(),
                 LO_NAME_SIZE - 1);
    if (::ioctl(loop.get(), LOOP_CONFIGURE, &config) == 0) return index;
    if (errno == EBUSY) continue;  // someone took it first
    if (errno != EINVAL && errno != ENOTTY) {
      throw std::runtime_error("fuse: cannot bind " + path + ": " + std::strerror(errno));
    }
    // A kernel older than LOOP_CONFIGURE (5.8).
    if (::ioctl(loop.get(), LOOP_SET_FD, file) != 0) {
      if (errno == EBUSY) continue;
      throw std::runtime_error("fuse: cannot bind " + path + ": " + std::strerror(errno));
    }
    if (::ioctl(loop.get(), LOOP_SET_STATUS64, &config.info) != 0) {
      const int error = errno;
      ::ioctl(loop.get(), LOOP_CLR_FD);
      throw std::runtime_error("fuse: cannot configure " + path + ": " + std::strerror(error));
    }
    return index;
  }
  throw std::runtime_error("fuse: every free loop device was taken by someone else");
}

}  // namespace

std::string FuseUnavailableReason() {
  if (::geteuid() != 0) return "the daemon must run as root to set up a loop device";
  if (!PathExists("/dev/fuse")) return "/dev/fuse is missing (load the fuse module)";
  if (!PathExists("/dev/loop-control")) {
    RunProcess({"modprobe", "-q", "loop"}, 10000);
    if (!PathExists("/dev/loop-control")) {
      return "/dev/loop-control is missing (load the loop module)";
    }
  }
  if (FindProgram("nbdfuse").empty()) return "nbdfuse is not installed (Debian package libnbd-bin)";
  if (FindProgram("fusermount3").empty()) {
    return "fusermount3 is not installed (Debian package fuse3)";
  }
  return "";
}

std::unique_ptr<BlockFrontend> AttachFuse(std::shared_ptr<Device> device,
                                          const FuseOptions& options) {
  if (const std::string reason = FuseUnavailableReason(); !reason.empty()) {
    throw std::runtime_error("fuse: " + reason);
  }
  const std::string& name = device->name();
  FuseResources resources;
  try {
    const std::string mount_dir = options.mount_root + "/" + name;
    if (PathExists(mount_dir)) {
      // Left by a daemon that was killed: names are unique within a daemon, so no live
      // attach uses it. A dead nbdfuse mount answers ENOTCONN until unmounted.
      LogError("fuse: removing %s, left over from an earlier daemon", mount_dir.c_str());
      ReleaseStaleLoops(mount_dir + "/");
      RunProcess({"fusermount3", "-u", "-q", "-z", mount_dir}, kStopTimeoutMs);
      ::rmdir(mount_dir.c_str());
    }
    if (::mkdir(mount_dir.c_str(), 0700) != 0) {
      throw std::runtime_error("fuse: cannot create " + mount_dir + ": " + std::strerror(errno));
    }
    resources.mount_dir = mount_dir;
    resources.pid_file = options.mount_root + "/" + name + ".pid";
    ::unlink(resources.pid_file.c_str());
    const std::string file = mount_dir + "/" + name;
    const std::string uri = "nbd+unix:///" + name + "?socket=" + UriEscape(options.nbd_socket);
    resources.nbdfuse = frontend::SpawnProcess({"nbdfuse", "-P", resources.pid_file, file, uri});

    int status = -ETIMEDOUT;
    const bool ready = WaitFor(kReadyTimeoutMs, [&] {
      status = WaitProcess(resources.nbdfuse, 0);
      return status != -ETIMEDOUT || PathExists(resources.pid_file);
    });
    if (status != -ETIMEDOUT) {
      resources.nbdfuse = -1;  // already reaped
      throw std::runtime_error("fuse: nbdfuse failed to start (exit status " +
                               std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : -1) +
                               "; see the daemon's stderr)");
    }
    if (!ready) throw std::runtime_error("fuse: nbdfuse was not ready within 10 s");

    UniqueFd fd(::open(file.c_str(), O_RDWR | O_CLOEXEC));
    if (!fd.valid()) {
      throw std::runtime_error("fuse: cannot open " + file + ": " + std::strerror(errno));
    }
    resources.loop_index = BindLoop(fd.get(), file);
  } catch (...) {
    resources.Release();
    throw;
  }
  LogDebug("fuse: %s attached as /dev/loop%d", name.c_str(), resources.loop_index);
  return std::make_unique<FuseFrontend>(std::move(device), std::move(resources));
}

}  // namespace memlend
