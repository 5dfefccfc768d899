#include "frontend/host_tools.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <stdexcept>

extern char** environ;

namespace memlend::frontend {

std::string FindProgram(const std::string& program) {
  std::string dirs = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
  if (const char* path = std::getenv("PATH"); path != nullptr && *path != '\0') {
    dirs = std::string(path) + ":" + dirs;
  }
  std::size_t begin = 0;
  while (begin <= dirs.size()) {
    std::size_t end = dirs.find(':', begin);
    if (end == std::string::npos) end = dirs.size();
    if (end > begin) {
      const std::string candidate = dirs.substr(begin, end - begin) + "/" + program;
      if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    }
    begin = end + 1;
  }
  return "";
}

pid_t SpawnProcess(const std::vector<std::string>& argv) {
  const std::string program = FindProgram(argv.at(0));
  if (program.empty()) throw std::runtime_error(argv[0] + " is not installed (not found in PATH)");
  std::vector<char*> args;
  for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);

  posix_spawnattr_t attr;
  posix_spawn_file_actions_t actions;
  posix_spawnattr_init(&attr);
  posix_spawn_file_actions_init(&actions);
  sigset_t none;
  sigemptyset(&none);
  sigset_t defaults;
  sigemptyset(&defaults);
  sigaddset(&defaults, SIGPIPE);
  sigaddset(&defaults, SIGTERM);
  sigaddset(&defaults, SIGINT);
  sigaddset(&defaults, SIGHUP);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  posix_spawnattr_setflags(&attr,
                           POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSID);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, 2, 1);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, program.c_str(), &actions, &attr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) throw std::runtime_error("cannot start " + program + ": " + std::strerror(rc));
  return pid;
}

int WaitProcess(pid_t pid, int timeout_ms) noexcept {
  int status = 0;
  int result = -ETIMEDOUT;
  WaitFor(timeout_ms, [&] {
    const pid_t done = ::waitpid(pid, &status, WNOHANG);
    if (done == pid) {
      result = status;
      return true;
    }
    if (done < 0 && errno != EINTR) {
      result = -errno;
      return true;
    }
    return false;
  });
  return result;
}

bool RunProcess(const std::vector<std::string>& argv, int timeout_ms) noexcept {
  pid_t pid = -1;
  try {
    pid = SpawnProcess(argv);
  } catch (const std::exception&) {
    return false;
  }
  int status = WaitProcess(pid, timeout_ms);
  if (status == -ETIMEDOUT) {
    ::kill(pid, SIGKILL);
    status = WaitProcess(pid, 5000);
    return false;
  }
  return status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

int CheckNotHeld(const std::string& path) noexcept {
  const int fd = ::open(path.c_str(), O_RDONLY | O_EXCL | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return -errno;
  ::close(fd);
  return 0;
}

bool PathExists(const std::string& path) noexcept {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

namespace {

// Writes `value` to /sys/block/NAME/queue/KNOB for the block device at `path` (/dev/NAME).
int WriteQueueKnob(const std::string& path, const char* knob, std::string_view value) noexcept {
  const std::size_t slash = path.rfind('/');
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  const std::string file = "/sys/block/" + name + "/queue/" + knob;
  const int fd = ::open(file.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return -errno;
  const ssize_t n = ::write(fd, value.data(), value.size());
  const int ret = n == static_cast<ssize_t>(value.size()) ? 0 : (n < 0 ? -errno : -EIO);
  ::close(fd);
  return ret;
}

}  // namespace

int UseNoIoScheduler(const std::string& path) noexcept {
  return WriteQueueKnob(path, "scheduler", "none");
}

int UseNoWritebackThrottling(const std::string& path) noexcept {
  const int ret = WriteQueueKnob(path, "wbt_lat_usec", "0");
  return ret == -ENOENT ? 0 : ret;  // a kernel built without writeback throttling
}

}  // namespace memlend::frontend
