// Test harness for memlend's integration tests: temporary directories, child processes, a
// fixture that runs a real `memlend daemon`, a libnbd client wrapper and a byte-exact shadow
// copy of a device to check reads against.
//
// Everything here is control-plane test code: failures throw std::runtime_error with a message
// that names the operation and its arguments, and doctest reports the message as the test's
// failure. Nothing here asserts on time: deadlines only guard against hangs so that a stuck
// daemon fails one test with a readable message instead of the whole CTest run timing out.

#ifndef MEMLEND_TESTS_INTEGRATION_HARNESS_H_
#define MEMLEND_TESTS_INTEGRATION_HARNESS_H_

#include <libnbd.h>
#include <sys/types.h>

#include <csignal>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace memlend::integration {

inline constexpr uint64_t kPageSize = 4096;
inline constexpr uint64_t kKiB = 1024;
inline constexpr uint64_t kMiB = 1024 * 1024;

// How long any single wait (daemon readiness, a reply, a child's exit) may take before the
// harness gives up and fails the test. A hang guard, not a performance threshold.
inline constexpr int kHangGuardMs = 20'000;

// A fresh directory under $TMPDIR (or /tmp), removed with its contents on destruction. Every
// test puts its daemon's sockets, logs and backing files in one of these.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  // Returns path()/name.
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Returns the memlend binary under test: $MEMLEND_BINARY if set, else the path CMake compiled
// in (MEMLEND_BINARY_PATH).
std::string MemlendBinary();

// The outcome of a child process run to completion by RunCommand.
struct CommandResult {
  int exit_status = -1;    // exit code, or -1 if the process was killed by a signal
  int term_signal = 0;     // the signal that killed it, 0 if it exited
  bool timed_out = false;  // true if RunCommand had to SIGKILL it at the hang guard
  std::string stdout_text;
  std::string stderr_text;
};

// Runs argv[0] (a path, no $PATH search) with the given arguments, captures stdout and stderr,
// and waits for it to exit. If it is still running after timeout_ms it is SIGKILLed and the
// result has timed_out set. Throws if the process cannot be started.
CommandResult RunCommand(const std::vector<std::string>& argv, int timeout_ms = kHangGuardMs);

// Returns the non-empty lines of text.
std::vector<std::string> NonEmptyLines(const std::string& text);

// Where a daemon serves NBD: TCP on 127.0.0.1 or [::1], or a unix socket.
enum class Transport { kTcp, kTcp6, kUnix };

const char* TransportName(Transport transport);

struct Endpoint {
  Transport transport = Transport::kUnix;
  int port = 0;             // kTcp and kTcp6
  std::string socket_path;  // kUnix

  // Returns the daemon's --nbd argument: "127.0.0.1:PORT", "[::1]:PORT" or "unix:PATH".
  std::string NbdArgument() const;
  // Returns the loopback host for TCP endpoints: "127.0.0.1" or "::1".
  std::string Host() const;
  // Returns a human-readable description for failure messages.
  std::string Describe() const { return NbdArgument(); }
};

// Returns an endpoint on the given transport: for TCP a loopback port that was free when this
// was called (bound to port 0 and released; another process could take it before the daemon
// binds, which would show up as a clear "address in use" startup failure), for unix a socket
// path in dir.
Endpoint PickFreeEndpoint(Transport transport, const TempDir& dir);

// Returns true if this host can bind TCP sockets on the IPv6 loopback [::1].
bool Ipv6LoopbackAvailable();

// Returns a connected stream socket (close it yourself), or -1 with errno set.
int ConnectSocket(const Endpoint& endpoint);

// Returns true if something accepts connections at endpoint.
bool AcceptsConnections(const Endpoint& endpoint);

// Returns true if something accepts connections on the unix socket at path.
bool UnixSocketAcceptsConnections(const std::string& path);

// Returns a TCP port on 127.0.0.1 that was free when this was called (see PickFreeEndpoint for
// the race this implies). For a lender's --listen that must be known before the daemon starts
// (daemons that borrow from each other) or a port nobody listens on.
int PickFreeTcpPort();

// The command line of one daemon. Empty strings leave the option out.
struct DaemonOptions {
  // NAME:SIZE, one --device each. Empty: the daemon serves no devices, so it gets no --nbd,
  // --local-store, --compress or backing file either (a lender only; set `lend`).
  std::vector<std::string> devices = {"d0:16M"};
  Transport transport = Transport::kUnix;
  std::string local_store = "64M";
  std::string compress;      // "none", "lz4" or empty for the daemon's default
  std::string backing_file;  // path, or empty for no disk fallback
  std::string backing_size;
  // --lend SIZE, or empty to lend nothing. With it the daemon gets --listen 127.0.0.1:PORT,
  // where PORT is listen_port, or a free port picked at start when listen_port is 0.
  std::string lend;
  int listen_port = 0;
  std::vector<std::string> peers;  // HOST:PORT, one --peer each
  std::string high_watermark;      // --high-watermark PCT, empty for the default
  std::string low_watermark;       // --low-watermark PCT, empty for the default
  // With `lend`: listen on this unix socket path instead of a TCP port.
  std::string listen_unix;
  std::vector<std::string> extra_args;      // appended to the daemon's command line
  // Run the daemon through this command, e.g. {"/usr/bin/prlimit", "--memlock=1048576"}.
  std::vector<std::string> command_prefix;
};

// True when the tests run a sanitized build (MEMLEND_TEST_SANITIZED=1 in the environment):
// daemons then get --no-mlock (AddressSanitizer's shadow memory cannot be locked), and tests
// that need locked memory or address-space limits say they cannot run.
bool SanitizedBuild();

// A `memlend daemon` child process. The constructor starts it in the given directory (NBD
// socket, control socket and stderr log all live there) and returns once the NBD endpoint (if it
// serves devices) and the control socket accept connections and, if it lends, it has printed its
// "memlend: ready:" line (which comes after its --listen socket is up); it throws, with the
// daemon's stderr in the message, if the daemon exits first or does not become ready within the
// hang guard. Several daemons may share one directory if each has its own `name`.
//
// Call Stop() at the end of a test and check that it returns 0. If a test fails before that, the
// destructor SIGKILLs the daemon so nothing outlives the test. The child also gets
// PR_SET_PDEATHSIG so it dies if the test binary itself is killed (e.g. by CTest's TIMEOUT).
class MemlendDaemon {
 public:
  MemlendDaemon(const TempDir& dir, DaemonOptions options, const std::string& name = "memlend");
  ~MemlendDaemon();
  MemlendDaemon(const MemlendDaemon&) = delete;
  MemlendDaemon& operator=(const MemlendDaemon&) = delete;

  // The NBD endpoint; meaningless for a daemon without devices.
  const Endpoint& endpoint() const { return endpoint_; }
  const std::string& control_path() const { return control_path_; }
  pid_t pid() const { return pid_; }
  // The --listen port of a lending daemon, 0 if it lends nothing.
  int listen_port() const { return listen_port_; }
  // "127.0.0.1:PORT" of a lending daemon: what borrowers pass to --peer.
  std::string ListenAddress() const { return "127.0.0.1:" + std::to_string(listen_port_); }

  // Runs `memlend status --control PATH --json` and returns the parsed output. Throws with the
  // command's stderr if it fails or prints something that is not JSON.
  nlohmann::json Status() const;

  // Sends signal_number (SIGTERM by default) and waits for the daemon to exit. Returns its exit
  // status, or 128 + signal if a signal killed it, or -1 if it had to be SIGKILLed at the hang
  // guard. Idempotent.
  int Stop(int signal_number = SIGTERM);

  // Returns everything the daemon wrote to stderr so far.
  std::string StderrText() const;

 private:
  std::string stderr_path_;
  std::string control_path_;
  Endpoint endpoint_;
  int listen_port_ = 0;
  pid_t pid_ = -1;
  int exit_status_ = -1;
};

// The "pages" object of one device in a status document.
struct DevicePages {
  uint64_t size_bytes = 0;
  uint64_t total = 0;
  uint64_t mapped = 0;
  uint64_t zero = 0;
  uint64_t local = 0;
  uint64_t disk = 0;
  uint64_t remote = 0;
  uint64_t cached = 0;  // of the disk pages, those also cached on a peer
  uint64_t clean = 0;   // of the local pages, those with a disk copy
  uint64_t remote_copies = 0;  // of the local pages, those fetched ahead (a remote copy kept)
};

// A number of /proc/PID/status: in KiB for "VmLck", "VmRSS", "VmSize", a count for
// "Threads"; throws if absent.
uint64_t ProcStatusNumber(pid_t pid, const std::string& field);

// Returns the pages of the device called name in status; throws if there is no such device.
DevicePages GetDevicePages(const nlohmann::json& status, const std::string& name);

// Checks (with doctest CHECKs) the invariants every status document must satisfy: per device
// mapped = zero + local + disk + remote and total = size_bytes / 4096; local_store.pages = sum of
// local pages; local_store.used_bytes <= total_bytes; disk_store.pages = sum of disk pages plus remote_store.disk_copies;
// remote_store.pages + remote_store.lost_pages = sum of remote pages (0 without a remote store)
// and lost_pages = sum of peers[].pages_lost. A daemon that only lends has no devices and
// local_store null.
void CheckStatusInvariants(const nlohmann::json& status);

// Returns true as soon as condition() does, polling every 100 ms, or false after timeout_ms.
// For effects that happen in the background; a hang guard, not a performance threshold.
bool Eventually(const std::function<bool()>& condition, int timeout_ms = 10'000);

// Polls daemon.Status() about every 100 ms until done(status) returns true or timeout_ms has
// passed, and returns the last status either way (the caller CHECKs what it expected on it, so a
// timeout shows as a failed check with the status in the message). For effects that happen in
// the background: eviction, peer reconnection, superpages going back to a lender.
nlohmann::json WaitForStatus(const MemlendDaemon& daemon,
                             const std::function<bool(const nlohmann::json&)>& done,
                             int timeout_ms = 10'000);

// A connected libnbd handle. Every method throws std::runtime_error with libnbd's message on
// failure, except the Try* forms, which return 0 or the errno libnbd reports.
class NbdClient {
 public:
  NbdClient(const Endpoint& endpoint, const std::string& export_name);
  ~NbdClient();
  NbdClient(const NbdClient&) = delete;
  NbdClient& operator=(const NbdClient&) = delete;

  nbd_handle* handle() { return handle_; }
  uint64_t Size();

  void Read(std::span<uint8_t> buffer, uint64_t offset);
  void Write(std::span<const uint8_t> data, uint64_t offset, uint32_t flags = 0);
  void Zero(uint64_t length, uint64_t offset, uint32_t flags = 0);
  void Trim(uint64_t length, uint64_t offset, uint32_t flags = 0);
  void Flush();

  int TryRead(std::span<uint8_t> buffer, uint64_t offset);
  int TryWrite(std::span<const uint8_t> data, uint64_t offset, uint32_t flags = 0);
  int TryZero(uint64_t length, uint64_t offset, uint32_t flags = 0);

 private:
  nbd_handle* handle_ = nullptr;
};

// Returns the random seed for this run: $MEMLEND_TEST_SEED if set, else a fixed default, so a
// failure can be reproduced. Tests log it with INFO().
uint64_t TestSeed();

// Kinds of page content. Random data does not compress; the others compress well.
enum class Content { kRandom, kRepeatedByte, kText, kZeros };

// Fills buffer with content of the given kind drawn from rng.
void FillContent(std::mt19937_64& rng, std::span<uint8_t> buffer, Content content);

// Fills buffer with random bytes.
void FillRandom(std::mt19937_64& rng, std::span<uint8_t> buffer);

// Returns a uniformly random integer in [lo, hi].
uint64_t RandomIn(std::mt19937_64& rng, uint64_t lo, uint64_t hi);

// What a device should contain: every write and zeroing the test does is applied here too, and
// reads are compared against it. A new device reads as zeros. Ranges outside the device throw
// std::out_of_range (a bug in the test). Threads may use disjoint ranges at the same time.
class ShadowDevice {
 public:
  explicit ShadowDevice(uint64_t size_bytes) : bytes_(size_bytes, 0) {}

  uint64_t size() const { return bytes_.size(); }
  void Write(uint64_t offset, std::span<const uint8_t> data);
  void Zero(uint64_t offset, uint64_t length);
  std::span<const uint8_t> Range(uint64_t offset, uint64_t length) const;

 private:
  void CheckRange(uint64_t offset, uint64_t length) const;

  std::vector<uint8_t> bytes_;
};

// Compares actual (read from the device at offset) with expected. Returns "" if equal, else a
// description of the first differing byte and the number of differing bytes.
std::string DescribeMismatch(std::span<const uint8_t> expected, std::span<const uint8_t> actual,
                             uint64_t offset);

// Reads [offset, offset + length) through client in chunks of at most 1 MiB and compares it with
// shadow. Returns "" if everything matches, else the first mismatch.
std::string CompareWithShadow(NbdClient& client, const ShadowDevice& shadow, uint64_t offset,
                              uint64_t length);

// Same over the whole device.
std::string CompareWithShadow(NbdClient& client, const ShadowDevice& shadow);

}  // namespace memlend::integration

#endif  // MEMLEND_TESTS_INTEGRATION_HARNESS_H_
