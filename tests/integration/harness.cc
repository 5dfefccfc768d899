#include "harness.h"

#include <arpa/inet.h>
#include <doctest/doctest.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#ifndef MEMLEND_BINARY_PATH
#error "MEMLEND_BINARY_PATH must be defined by the build (path of the memlend binary)"
#endif

namespace memlend::integration {
namespace {

using Clock = std::chrono::steady_clock;

std::runtime_error SystemError(const std::string& what) {
  return std::runtime_error(what + ": " + std::strerror(errno));
}

// Builds the NULL-terminated char* array execv wants. The strings must outlive the result.
std::vector<char*> ExecArgv(const std::vector<std::string>& argv) {
  std::vector<char*> result;
  for (const std::string& arg : argv) result.push_back(const_cast<char*>(arg.c_str()));
  result.push_back(nullptr);
  return result;
}

std::string JoinArgv(const std::vector<std::string>& argv) {
  std::string joined;
  for (const std::string& arg : argv) {
    if (!joined.empty()) joined += ' ';
    joined += arg;
  }
  return joined;
}

// Converts a waitpid status into the convention of MemlendDaemon::Stop().
int DecodeWaitStatus(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// Waits up to timeout_ms for pid to exit. Returns true and sets *status if it did.
bool WaitForExit(pid_t pid, int timeout_ms, int* status) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    pid_t r = waitpid(pid, status, WNOHANG);
    if (r == pid) return true;
    if (r < 0 && errno != EINTR) return false;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// TempDir

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string pattern = std::string(base && *base ? base : "/tmp") + "/memlend-it.XXXXXX";
  // Unix socket paths are limited to 107 bytes; keep well under that.
  if (pattern.size() > 60) pattern = "/tmp/memlend-it.XXXXXX";
  std::vector<char> buffer(pattern.begin(), pattern.end());
  buffer.push_back('\0');
  if (mkdtemp(buffer.data()) == nullptr) throw SystemError("mkdtemp " + pattern);
  path_ = buffer.data();
}

TempDir::~TempDir() {
  std::error_code ignored;
  std::filesystem::remove_all(path_, ignored);
}

// ---------------------------------------------------------------------------------------------
// Processes and sockets

std::string MemlendBinary() {
  const char* from_env = std::getenv("MEMLEND_BINARY");
  if (from_env && *from_env) return from_env;
  return MEMLEND_BINARY_PATH;
}

namespace {

// Fills *address for a TCP endpoint; returns its length.
socklen_t TcpAddress(const Endpoint& endpoint, sockaddr_storage* address) {
  *address = {};
  if (endpoint.transport == Transport::kTcp6) {
    auto* in6 = reinterpret_cast<sockaddr_in6*>(address);
    in6->sin6_family = AF_INET6;
    in6->sin6_addr = in6addr_loopback;
    in6->sin6_port = htons(static_cast<uint16_t>(endpoint.port));
    return sizeof *in6;
  }
  auto* in = reinterpret_cast<sockaddr_in*>(address);
  in->sin_family = AF_INET;
  in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  in->sin_port = htons(static_cast<uint16_t>(endpoint.port));
  return sizeof *in;
}

// Binds a TCP socket to port 0 on the endpoint's loopback and returns the port it got, or -1.
int BindEphemeralPort(Transport transport) {
  Endpoint endpoint;
  endpoint.transport = transport;
  sockaddr_storage address;
  socklen_t length = TcpAddress(endpoint, &address);
  int fd = socket(address.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  int port = -1;
  if (bind(fd, reinterpret_cast<sockaddr*>(&address), length) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0) {
    port =
        ntohs(address.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&address)->sin6_port
                                            : reinterpret_cast<sockaddr_in*>(&address)->sin_port);
  }
  close(fd);
  return port;
}

}  // namespace

Endpoint PickFreeEndpoint(Transport transport, const TempDir& dir) {
  Endpoint endpoint;
  endpoint.transport = transport;
  if (transport == Transport::kUnix) {
    endpoint.socket_path = dir.File("nbd.sock");
    return endpoint;
  }
  endpoint.port = BindEphemeralPort(transport);
  if (endpoint.port < 0) throw SystemError(std::string("bind to port 0 on ") + endpoint.Host());
  return endpoint;
}

bool Ipv6LoopbackAvailable() { return BindEphemeralPort(Transport::kTcp6) > 0; }

int PickFreeTcpPort() {
  int port = BindEphemeralPort(Transport::kTcp);
  if (port < 0) throw SystemError("bind to port 0 on 127.0.0.1");
  return port;
}

int ConnectSocket(const Endpoint& endpoint) {
  sockaddr_storage address{};
  socklen_t length;
  if (endpoint.transport == Transport::kUnix) {
    auto* un = reinterpret_cast<sockaddr_un*>(&address);
    un->sun_family = AF_UNIX;
    if (endpoint.socket_path.size() >= sizeof un->sun_path) {
      errno = ENAMETOOLONG;
      return -1;
    }
    std::memcpy(un->sun_path, endpoint.socket_path.c_str(), endpoint.socket_path.size() + 1);
    length = sizeof *un;
  } else {
    length = TcpAddress(endpoint, &address);
  }
  int fd = socket(address.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), length) != 0) {
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
  }
  return fd;
}

bool AcceptsConnections(const Endpoint& endpoint) {
  int fd = ConnectSocket(endpoint);
  if (fd < 0) return false;
  close(fd);
  return true;
}

bool UnixSocketAcceptsConnections(const std::string& path) {
  Endpoint endpoint;
  endpoint.socket_path = path;
  return AcceptsConnections(endpoint);
}

CommandResult RunCommand(const std::vector<std::string>& argv, int timeout_ms) {
  int out_pipe[2];
  int err_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) != 0) throw SystemError("pipe2");
  if (pipe2(err_pipe, O_CLOEXEC) != 0) {
    close(out_pipe[0]);
    close(out_pipe[1]);
    throw SystemError("pipe2");
  }
  std::vector<char*> exec_argv = ExecArgv(argv);
  pid_t pid = fork();
  if (pid < 0) throw SystemError("fork");
  if (pid == 0) {
    // Child: only async-signal-safe calls until execv.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    int null_fd = open("/dev/null", O_RDONLY);
    if (null_fd >= 0) dup2(null_fd, STDIN_FILENO);
    dup2(out_pipe[1], STDOUT_FILENO);
    dup2(err_pipe[1], STDERR_FILENO);
    execv(exec_argv[0], exec_argv.data());
    _exit(127);
  }
  close(out_pipe[1]);
  close(err_pipe[1]);

  CommandResult result;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  std::string* sinks[2] = {&result.stdout_text, &result.stderr_text};
  int open_pipes = 2;
  while (open_pipes > 0) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      result.timed_out = true;
      kill(pid, SIGKILL);
      break;
    }
    int n = poll(fds, 2, static_cast<int>(left.count()));
    if (n < 0 && errno == EINTR) continue;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      char chunk[4096];
      ssize_t got = read(fds[i].fd, chunk, sizeof chunk);
      if (got > 0) {
        sinks[i]->append(chunk, static_cast<size_t>(got));
      } else if (got == 0 || errno != EINTR) {
        close(fds[i].fd);
        fds[i].fd = -1;
        --open_pipes;
      }
    }
  }
  for (pollfd& fd : fds) {
    if (fd.fd >= 0) close(fd.fd);
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status)) {
    result.exit_status = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    result.term_signal = WTERMSIG(status);
  }
  return result;
}

std::vector<std::string> NonEmptyLines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) lines.push_back(line);
  }
  return lines;
}

// ---------------------------------------------------------------------------------------------
// Endpoint

std::string Endpoint::NbdArgument() const {
  switch (transport) {
    case Transport::kTcp:
      return "127.0.0.1:" + std::to_string(port);
    case Transport::kTcp6:
      return "[::1]:" + std::to_string(port);
    case Transport::kUnix:
      break;
  }
  return "unix:" + socket_path;
}

std::string Endpoint::Host() const { return transport == Transport::kTcp6 ? "::1" : "127.0.0.1"; }

const char* TransportName(Transport transport) {
  switch (transport) {
    case Transport::kTcp:
      return "tcp";
    case Transport::kTcp6:
      return "tcp6";
    case Transport::kUnix:
      break;
  }
  return "unix";
}

bool Eventually(const std::function<bool()>& condition, int timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    if (condition()) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

bool SanitizedBuild() {
  const char* value = std::getenv("MEMLEND_TEST_SANITIZED");
  return value != nullptr && std::string(value) == "1";
}

// ---------------------------------------------------------------------------------------------
// MemlendDaemon

MemlendDaemon::MemlendDaemon(const TempDir& dir, DaemonOptions options, const std::string& name)
    // The first daemon of a directory keeps the historical file names.
    : stderr_path_(dir.File(name + ".stderr")),
      control_path_(dir.File(name == "memlend" ? "control.sock" : name + ".control.sock")) {
  const bool serves_devices = !options.devices.empty();
  const bool lends = !options.lend.empty();
  std::vector<std::string> argv = {MemlendBinary(), "daemon"};
  if (serves_devices) {
    endpoint_ = PickFreeEndpoint(options.transport, dir);
    if (endpoint_.transport == Transport::kUnix && name != "memlend") {
      endpoint_.socket_path = dir.File(name + ".nbd.sock");
    }
    for (const std::string& device : options.devices) {
      argv.push_back("--device");
      argv.push_back(device);
    }
    argv.insert(argv.end(),
                {"--nbd", endpoint_.NbdArgument(), "--local-store", options.local_store});
    if (!options.compress.empty()) argv.insert(argv.end(), {"--compress", options.compress});
    if (!options.backing_file.empty()) {
      argv.insert(argv.end(), {"--backing-file", options.backing_file});
    }
    if (!options.backing_size.empty()) {
      argv.insert(argv.end(), {"--backing-size", options.backing_size});
    }
  }
  argv.insert(argv.end(), {"--control", control_path_});
  if (lends && !options.listen_unix.empty()) {
    argv.insert(argv.end(), {"--lend", options.lend, "--listen", "unix:" + options.listen_unix});
  } else if (lends) {
    listen_port_ = options.listen_port != 0 ? options.listen_port : PickFreeTcpPort();
    argv.insert(argv.end(), {"--lend", options.lend, "--listen", ListenAddress()});
  }
  for (const std::string& peer : options.peers) argv.insert(argv.end(), {"--peer", peer});
  if (!options.high_watermark.empty()) {
    argv.insert(argv.end(), {"--high-watermark", options.high_watermark});
  }
  if (!options.low_watermark.empty()) {
    argv.insert(argv.end(), {"--low-watermark", options.low_watermark});
  }
  argv.insert(argv.end(), options.extra_args.begin(), options.extra_args.end());
  if (SanitizedBuild()) argv.push_back("--no-mlock");
  argv.insert(argv.begin(), options.command_prefix.begin(), options.command_prefix.end());
  MESSAGE("starting: " << JoinArgv(argv));

  std::vector<char*> exec_argv = ExecArgv(argv);
  const char* stderr_path = stderr_path_.c_str();
  pid_ = fork();
  if (pid_ < 0) throw SystemError("fork");
  if (pid_ == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    int null_fd = open("/dev/null", O_RDWR);
    int log_fd = open(stderr_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (null_fd >= 0) {
      dup2(null_fd, STDIN_FILENO);
      dup2(null_fd, STDOUT_FILENO);
    }
    if (log_fd >= 0) dup2(log_fd, STDERR_FILENO);
    execv(exec_argv[0], exec_argv.data());
    _exit(127);
  }

  // Poll until both sockets accept connections, the daemon dies, or the hang guard expires.
  const auto deadline = Clock::now() + std::chrono::milliseconds(kHangGuardMs);
  for (;;) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      exit_status_ = DecodeWaitStatus(status);
      pid_ = -1;
      throw std::runtime_error("memlend daemon exited with status " + std::to_string(exit_status_) +
                               " before it was ready; stderr:\n" + StderrText());
    }
    // A lender is not probed on its --listen port (that would open a session there); the ready
    // line is printed once every socket of the daemon listens.
    if ((!serves_devices || AcceptsConnections(endpoint_)) &&
        UnixSocketAcceptsConnections(control_path_) &&
        (!lends || StderrText().find("memlend: ready:") != std::string::npos)) {
      return;
    }
    if (Clock::now() >= deadline) {
      kill(pid_, SIGKILL);
      WaitForExit(pid_, kHangGuardMs, &status);
      pid_ = -1;
      throw std::runtime_error("memlend daemon did not become ready (" +
                               (serves_devices ? endpoint_.Describe() + ", " : std::string()) +
                               control_path_ + (lends ? ", ready line" : "") +
                               ") within the hang guard; stderr:\n" + StderrText());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

MemlendDaemon::~MemlendDaemon() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    int status = 0;
    WaitForExit(pid_, kHangGuardMs, &status);
  }
}

nlohmann::json MemlendDaemon::Status() const {
  CommandResult result =
      RunCommand({MemlendBinary(), "status", "--control", control_path_, "--json"});
  if (result.exit_status != 0) {
    throw std::runtime_error("memlend status failed (exit " + std::to_string(result.exit_status) +
                             "): " + result.stderr_text);
  }
  try {
    return nlohmann::json::parse(result.stdout_text);
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(std::string("memlend status --json printed invalid JSON (") +
                             e.what() + "):\n" + result.stdout_text);
  }
}

int MemlendDaemon::Stop(int signal_number) {
  if (pid_ <= 0) return exit_status_;
  kill(pid_, signal_number);
  int status = 0;
  if (WaitForExit(pid_, kHangGuardMs, &status)) {
    exit_status_ = DecodeWaitStatus(status);
  } else {
    MESSAGE("memlend daemon did not exit on signal " << signal_number << "; killing it");
    kill(pid_, SIGKILL);
    WaitForExit(pid_, kHangGuardMs, &status);
    exit_status_ = -1;
  }
  pid_ = -1;
  return exit_status_;
}

std::string MemlendDaemon::StderrText() const { return ReadWholeFile(stderr_path_); }

// ---------------------------------------------------------------------------------------------
// Status documents

DevicePages GetDevicePages(const nlohmann::json& status, const std::string& name) {
  for (const nlohmann::json& device : status.at("devices")) {
    if (device.at("name") != name) continue;
    const nlohmann::json& pages = device.at("pages");
    DevicePages result;
    result.size_bytes = device.at("size_bytes").get<uint64_t>();
    result.total = pages.at("total").get<uint64_t>();
    result.mapped = pages.at("mapped").get<uint64_t>();
    result.zero = pages.at("zero").get<uint64_t>();
    result.local = pages.at("local").get<uint64_t>();
    result.disk = pages.at("disk").get<uint64_t>();
    result.remote = pages.at("remote").get<uint64_t>();
    result.cached = pages.at("cached").get<uint64_t>();
    result.clean = pages.at("clean").get<uint64_t>();
    result.remote_copies = pages.at("remote_copies").get<uint64_t>();
    return result;
  }
  throw std::runtime_error("status has no device named " + name + ": " + status.dump());
}

void CheckStatusInvariants(const nlohmann::json& status) {
  INFO("status: " << status.dump());
  uint64_t local_sum = 0;
  uint64_t disk_sum = 0;
  uint64_t remote_sum = 0;
  uint64_t cached_sum = 0;
  for (const nlohmann::json& device : status.at("devices")) {
    DevicePages pages = GetDevicePages(status, device.at("name").get<std::string>());
    CHECK(pages.mapped == pages.zero + pages.local + pages.disk + pages.remote);
    CHECK(pages.total == pages.size_bytes / kPageSize);
    CHECK(pages.mapped <= pages.total);
    CHECK(pages.cached <= pages.disk);
    CHECK(pages.clean + pages.remote_copies <= pages.local);
    local_sum += pages.local;
    // Disk slots hold disk pages and the copies of clean local pages.
    disk_sum += pages.disk + pages.clean;
    // The remote tier holds remote pages and those fetched ahead into the local store.
    remote_sum += pages.remote + pages.remote_copies;
    cached_sum += pages.cached;
  }
  const nlohmann::json& remote_store = status.at("remote_store");
  if (remote_store.is_null()) {
    CHECK(remote_sum == 0);
  } else {
    // Pages lost with a peer that went down still count as remote until rewritten or trimmed.
    const uint64_t lost = remote_store.value("lost_pages", uint64_t{0});
    CHECK(remote_store.at("pages").get<uint64_t>() + lost == remote_sum);
    uint64_t peers_lost = 0;
    for (const nlohmann::json& peer : status.at("peers")) {
      peers_lost += peer.value("pages_lost", uint64_t{0});
    }
    CHECK(peers_lost == lost);
    // The rebuild's estimate is there exactly while pages are short of a copy.
    const uint64_t degraded = remote_store.value("degraded_pages", uint64_t{0});
    CHECK(remote_store.at("rebuild_eta_s").is_number() == (degraded > 0));
    CHECK(remote_store.at("rebuild_copies_per_s").get<double>() >= 0);
    // Cache entries the lenders dropped are still named by devices until read or rewritten,
    // so the cache holds at most what the devices name.
    const uint64_t cached = remote_store.at("cached_pages").get<uint64_t>();
    CHECK(cached <= cached_sum);
    uint64_t peers_cached = 0;
    for (const nlohmann::json& peer : status.at("peers")) {
      peers_cached += peer.at("pages_cached").get<uint64_t>();
    }
    CHECK(peers_cached == cached);
  }
  const nlohmann::json& local_store = status.at("local_store");
  if (local_store.is_null()) {
    // A daemon that only lends.
    CHECK(status.at("devices").empty());
    return;
  }
  CHECK(local_store.at("pages").get<uint64_t>() == local_sum);
  CHECK(local_store.at("used_bytes").get<uint64_t>() <=
        local_store.at("total_bytes").get<uint64_t>());
  const nlohmann::json& disk_store = status.at("disk_store");
  if (disk_store.is_null()) {
    CHECK(disk_sum == 0);
  } else {
    // Besides the devices' disk pages, the disk copies of remote pages (replicas:N+disk,
    // or moved there off a leaving lender).
    const nlohmann::json& remote_store = status.at("remote_store");
    const uint64_t disk_copies =
        remote_store.is_null() ? 0 : remote_store.at("disk_copies").get<uint64_t>();
    CHECK(disk_store.at("pages").get<uint64_t>() == disk_sum + disk_copies);
  }
}

uint64_t ProcStatusNumber(pid_t pid, const std::string& field) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoull(line.substr(field.size() + 1));
  }
  throw std::runtime_error("no " + field + " in /proc/" + std::to_string(pid) + "/status");
}

nlohmann::json WaitForStatus(const MemlendDaemon& daemon,
                             const std::function<bool(const nlohmann::json&)>& done,
                             int timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    nlohmann::json status = daemon.Status();
    if (done(status) || Clock::now() >= deadline) return status;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

// ---------------------------------------------------------------------------------------------
// NbdClient

namespace {

std::runtime_error NbdError(const std::string& what) {
  return std::runtime_error(what + ": " + (nbd_get_error() ? nbd_get_error() : "(no message)") +
                            " (errno " + std::to_string(nbd_get_errno()) + ")");
}

std::string Range(uint64_t offset, uint64_t length) {
  return "[" + std::to_string(offset) + ", +" + std::to_string(length) + ")";
}

}  // namespace

NbdClient::NbdClient(const Endpoint& endpoint, const std::string& export_name) {
  handle_ = nbd_create();
  if (handle_ == nullptr) throw NbdError("nbd_create");
  if (nbd_set_export_name(handle_, export_name.c_str()) != 0) {
    auto error = NbdError("nbd_set_export_name");
    nbd_close(handle_);
    throw error;
  }
  int r = endpoint.transport == Transport::kUnix
              ? nbd_connect_unix(handle_, endpoint.socket_path.c_str())
              : nbd_connect_tcp(handle_, endpoint.Host().c_str(),
                                std::to_string(endpoint.port).c_str());
  if (r != 0) {
    auto error = NbdError("connecting to " + endpoint.Describe() + " export " + export_name);
    nbd_close(handle_);
    throw error;
  }
}

NbdClient::~NbdClient() {
  // A polite NBD_CMD_DISC first; nbd_close alone would just drop the connection.
  nbd_shutdown(handle_, 0);
  nbd_close(handle_);
}

uint64_t NbdClient::Size() {
  int64_t size = nbd_get_size(handle_);
  if (size < 0) throw NbdError("nbd_get_size");
  return static_cast<uint64_t>(size);
}

void NbdClient::Read(std::span<uint8_t> buffer, uint64_t offset) {
  if (nbd_pread(handle_, buffer.data(), buffer.size(), offset, 0) != 0) {
    throw NbdError("read " + Range(offset, buffer.size()));
  }
}

void NbdClient::Write(std::span<const uint8_t> data, uint64_t offset, uint32_t flags) {
  if (nbd_pwrite(handle_, data.data(), data.size(), offset, flags) != 0) {
    throw NbdError("write " + Range(offset, data.size()));
  }
}

void NbdClient::Zero(uint64_t length, uint64_t offset, uint32_t flags) {
  if (nbd_zero(handle_, length, offset, flags) != 0) {
    throw NbdError("write_zeroes " + Range(offset, length));
  }
}

void NbdClient::Trim(uint64_t length, uint64_t offset, uint32_t flags) {
  if (nbd_trim(handle_, length, offset, flags) != 0) {
    throw NbdError("trim " + Range(offset, length));
  }
}

void NbdClient::Flush() {
  if (nbd_flush(handle_, 0) != 0) throw NbdError("flush");
}

int NbdClient::TryRead(std::span<uint8_t> buffer, uint64_t offset) {
  if (nbd_pread(handle_, buffer.data(), buffer.size(), offset, 0) == 0) return 0;
  return nbd_get_errno();
}

int NbdClient::TryWrite(std::span<const uint8_t> data, uint64_t offset, uint32_t flags) {
  if (nbd_pwrite(handle_, data.data(), data.size(), offset, flags) == 0) return 0;
  return nbd_get_errno();
}

int NbdClient::TryZero(uint64_t length, uint64_t offset, uint32_t flags) {
  if (nbd_zero(handle_, length, offset, flags) == 0) return 0;
  return nbd_get_errno();
}

// ---------------------------------------------------------------------------------------------
// Data

uint64_t TestSeed() {
  const char* from_env = std::getenv("MEMLEND_TEST_SEED");
  if (from_env && *from_env) return std::strtoull(from_env, nullptr, 0);
  return 0x6d656d6c656e64;  // "memlend"
}

uint64_t RandomIn(std::mt19937_64& rng, uint64_t lo, uint64_t hi) {
  return std::uniform_int_distribution<uint64_t>(lo, hi)(rng);
}

void FillRandom(std::mt19937_64& rng, std::span<uint8_t> buffer) {
  size_t i = 0;
  for (; i + 8 <= buffer.size(); i += 8) {
    uint64_t word = rng();
    std::memcpy(buffer.data() + i, &word, 8);
  }
  uint64_t word = rng();
  for (; i < buffer.size(); ++i, word >>= 8) buffer[i] = static_cast<uint8_t>(word);
}

void FillContent(std::mt19937_64& rng, std::span<uint8_t> buffer, Content content) {
  switch (content) {
    case Content::kRandom:
      FillRandom(rng, buffer);
      return;
    case Content::kRepeatedByte:
      // Never 0, so that it is distinguishable from a zeroed range.
      std::fill(buffer.begin(), buffer.end(), static_cast<uint8_t>(RandomIn(rng, 1, 255)));
      return;
    case Content::kText: {
      // Log-like lines with a varying counter: compresses well but is not one repeated byte.
      uint64_t counter = rng() % 1'000'000;
      std::string text;
      while (text.size() < buffer.size()) {
        text += "memlend integration test line " + std::to_string(counter++) + " lorem ipsum\n";
      }
      std::memcpy(buffer.data(), text.data(), buffer.size());
      return;
    }
    case Content::kZeros:
      std::fill(buffer.begin(), buffer.end(), 0);
      return;
  }
}

void ShadowDevice::CheckRange(uint64_t offset, uint64_t length) const {
  if (offset > bytes_.size() || length > bytes_.size() - offset) {
    throw std::out_of_range("ShadowDevice: range " + std::to_string(offset) + "+" +
                            std::to_string(length) + " outside a device of " +
                            std::to_string(bytes_.size()) + " bytes");
  }
}

void ShadowDevice::Write(uint64_t offset, std::span<const uint8_t> data) {
  CheckRange(offset, data.size());
  std::copy(data.begin(), data.end(), bytes_.begin() + static_cast<ptrdiff_t>(offset));
}

void ShadowDevice::Zero(uint64_t offset, uint64_t length) {
  CheckRange(offset, length);
  std::fill_n(bytes_.begin() + static_cast<ptrdiff_t>(offset), length, 0);
}

std::span<const uint8_t> ShadowDevice::Range(uint64_t offset, uint64_t length) const {
  CheckRange(offset, length);
  return std::span<const uint8_t>(bytes_).subspan(offset, length);
}

std::string DescribeMismatch(std::span<const uint8_t> expected, std::span<const uint8_t> actual,
                             uint64_t offset) {
  if (expected.size() != actual.size()) {
    return "length mismatch: expected " + std::to_string(expected.size()) + " bytes, got " +
           std::to_string(actual.size());
  }
  auto [e, a] = std::mismatch(expected.begin(), expected.end(), actual.begin());
  if (e == expected.end()) return "";
  size_t first = static_cast<size_t>(e - expected.begin());
  size_t differing = 0;
  for (size_t i = first; i < expected.size(); ++i) differing += expected[i] != actual[i];
  std::ostringstream text;
  uint64_t at = offset + first;
  text << "data mismatch at device offset " << at << " (page " << at / kPageSize << " + "
       << at % kPageSize << "): expected 0x" << std::hex << int{*e} << ", got 0x" << int{*a}
       << std::dec << "; " << differing << " of " << expected.size()
       << " bytes differ in the range read at offset " << offset;
  return text.str();
}

std::string CompareWithShadow(NbdClient& client, const ShadowDevice& shadow, uint64_t offset,
                              uint64_t length) {
  std::vector<uint8_t> buffer(std::min<uint64_t>(length, kMiB));
  for (uint64_t done = 0; done < length;) {
    uint64_t chunk = std::min<uint64_t>(length - done, buffer.size());
    std::span<uint8_t> actual(buffer.data(), chunk);
    client.Read(actual, offset + done);
    std::string mismatch =
        DescribeMismatch(shadow.Range(offset + done, chunk), actual, offset + done);
    if (!mismatch.empty()) return mismatch;
    done += chunk;
  }
  return "";
}

std::string CompareWithShadow(NbdClient& client, const ShadowDevice& shadow) {
  return CompareWithShadow(client, shadow, 0, shadow.size());
}

}  // namespace memlend::integration
