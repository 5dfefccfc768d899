// The daemon's life cycle at its edges: startup failures of `memlend daemon` and `memlend status`
// without a daemon (each must exit non-zero with a single `memlend: ` line on stderr and leave
// nothing listening), and clean shutdown on SIGTERM / SIGINT while clients are connected.

#include <doctest/doctest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "harness.h"
#include "raw_nbd_client.h"

namespace memlend::integration {
namespace {

// A TCP socket listening on 127.0.0.1:port for as long as it lives, to make the port busy.
class BusyPort {
 public:
  BusyPort() {
    fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd_ >= 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t length = sizeof address;
    REQUIRE(bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
    REQUIRE(listen(fd_, 1) == 0);
    REQUIRE(getsockname(fd_, reinterpret_cast<sockaddr*>(&address), &length) == 0);
    port_ = ntohs(address.sin_port);
  }
  ~BusyPort() { close(fd_); }
  int port() const { return port_; }

 private:
  int fd_ = -1;
  int port_ = 0;
};

// Checks that a finished command failed the way memlend promises: it exited by itself with a
// non-zero status and wrote exactly one non-empty line to stderr, starting with "memlend: " and
// containing `mentions` (the value at fault, so that the message is actionable).
void CheckCleanFailure(const CommandResult& result, const std::string& mentions) {
  INFO("stdout: " << result.stdout_text);
  INFO("stderr: " << result.stderr_text);
  REQUIRE_MESSAGE(!result.timed_out, "still running at the hang guard; it should have failed");
  CHECK(result.term_signal == 0);
  CHECK(result.exit_status > 0);
  std::vector<std::string> lines = NonEmptyLines(result.stderr_text);
  CHECK(lines.size() == 1);
  if (!lines.empty()) CHECK(lines[0].rfind("memlend: ", 0) == 0);
  CHECK(result.stderr_text.find(mentions) != std::string::npos);
}

// One daemon command line that must not start.
struct StartupCase {
  const char* what;
  std::vector<std::string> args;  // after "memlend daemon"; "NBD" becomes a free TCP address
  bool expect_status_one;         // the documented exit status 1 (not a CLI11 parse error)
  std::string mentions;           // the message must name the culprit: this text appears in it
};

}  // namespace

TEST_SUITE("startup_errors") {
  TEST_CASE("the daemon refuses to start on bad configuration") {
    BusyPort busy;
    const std::string busy_address = "127.0.0.1:" + std::to_string(busy.port());
    const std::vector<StartupCase> cases = {
        {"NBD port already in use",
         {"--device", "d0:16M", "--nbd", busy_address, "--local-store", "64M"},
         true,
         busy_address},
        {"device size with an unknown suffix",
         {"--device", "d0:12Q", "--nbd", "NBD", "--local-store", "64M"},
         false,
         "12Q"},
        {"device size not a multiple of 4096",
         {"--device", "d0:10000", "--nbd", "NBD", "--local-store", "64M"},
         false,
         "10000"},
        {"device without a size",
         {"--device", "d0", "--nbd", "NBD", "--local-store", "64M"},
         false,
         "--device"},
        {"local store size with an unknown suffix",
         {"--device", "d0:16M", "--nbd", "NBD", "--local-store", "12Q"},
         false,
         "12Q"},
        {"backing file in a directory that does not exist",
         {"--device", "d0:16M", "--nbd", "NBD", "--local-store", "1M", "--backing-file",
          "/nonexistent-memlend-dir/sub/backing.img"},
         true,
         "/nonexistent-memlend-dir/sub/backing.img"},
        {"unknown compression",
         {"--device", "d0:16M", "--nbd", "NBD", "--local-store", "64M", "--compress", "zstd"},
         false,
         "zstd"},
        {"--nbd without --device or --local-store", {"--nbd", "NBD"}, false, "--device"},
        {"unknown option",
         {"--device", "d0:16M", "--nbd", "NBD", "--local-store", "64M", "--no-such-option"},
         false,
         "--no-such-option"},
        {"malformed NBD address",
         {"--device", "d0:16M", "--nbd", "not-an-address", "--local-store", "64M"},
         false,
         "not-an-address"},
        // Sizes the host cannot hold: without the check the daemon started, and filling the
        // store ran the whole machine out of memory.
        {"a local store larger than the host",
         {"--device", "d0:16M", "--nbd", "NBD", "--local-store", "1T"},
         true,
         "more than this host can hold"},
        {"a lent pool larger than the host",
         {"--lend", "1T", "--listen", "NBD"},
         true,
         "--lend 1.0 TiB"},
        {"--socket-mode on a TCP socket",
         {"--device", "d0:16M", "--nbd", "NBD", "--local-store", "64M", "--socket-mode", "0660"},
         false,
         "--socket-mode"},
        {"--socket-mode that is not octal permission bits",
         {"--device", "d0:16M", "--nbd", "unix:/tmp/memlend-no.sock", "--local-store", "64M",
          "--socket-mode", "0999"},
         false,
         "0999"},
        {"--max-borrowers of 0",
         {"--lend", "4M", "--listen", "NBD", "--max-borrowers", "0"},
         false,
         "--max-borrowers"},
        {"--max-connections that is not a number",
         {"--device", "d0:16M", "--nbd", "NBD", "--local-store", "64M", "--max-connections",
          "many"},
         false,
         "many"},
    };

    for (const StartupCase& c : cases) {
      INFO("case: " << c.what);
      TempDir dir;
      const Endpoint nbd = PickFreeEndpoint(Transport::kTcp, dir);
      const std::string control = dir.File("control.sock");
      std::vector<std::string> argv = {MemlendBinary(), "daemon"};
      for (const std::string& arg : c.args) argv.push_back(arg == "NBD" ? nbd.NbdArgument() : arg);
      argv.insert(argv.end(), {"--control", control});
      std::string command_line;
      for (const std::string& arg : argv) command_line += arg + " ";
      INFO("command: " << command_line);

      CommandResult result = RunCommand(argv);
      CheckCleanFailure(result, c.mentions);
      if (c.expect_status_one) CHECK(result.exit_status == 1);
      // Nothing is left listening: neither the NBD port nor the control socket.
      CHECK_FALSE(AcceptsConnections(nbd));
      CHECK_FALSE(UnixSocketAcceptsConnections(control));
    }
  }
}

TEST_SUITE("startup_errors") {
  // Without CAP_IPC_LOCK a process may lock only RLIMIT_MEMLOCK; a swap-serving daemon that
  // locked less than it serves from could deadlock, so that is refused too, unless --force.
  TEST_CASE("reservations past RLIMIT_MEMLOCK are refused without CAP_IPC_LOCK, and --force "
            "starts anyway") {
    if (geteuid() != 0 || access("/usr/bin/setpriv", X_OK) != 0 ||
        access("/usr/bin/prlimit", X_OK) != 0) {
      MESSAGE("SKIPPED: needs root, /usr/bin/setpriv and /usr/bin/prlimit (util-linux) to run "
              "the daemon without CAP_IPC_LOCK under a small RLIMIT_MEMLOCK");
      return;
    }
    if (SanitizedBuild()) {
      MESSAGE("SKIPPED: a sanitized build runs with --no-mlock, which this test is not about");
      return;
    }
    TempDir dir;
    const std::vector<std::string> unprivileged = {
        "/usr/bin/prlimit", "--memlock=4194304:4194304", "/usr/bin/setpriv", "--bounding-set",
        "-ipc_lock", "--inh-caps", "-ipc_lock", "--"};
    std::vector<std::string> argv = unprivileged;
    const Endpoint nbd = PickFreeEndpoint(Transport::kUnix, dir);
    argv.insert(argv.end(), {MemlendBinary(), "daemon", "--device", "d0:16M", "--nbd",
                             nbd.NbdArgument(), "--local-store", "16M", "--control",
                             dir.File("control.sock")});
    const CommandResult refused = RunCommand(argv);
    CheckCleanFailure(refused, "RLIMIT_MEMLOCK");
    CHECK(refused.stderr_text.find("4.0 MiB") != std::string::npos);

    DaemonOptions options;
    options.devices = {"d0:16M"};
    options.local_store = "16M";
    options.command_prefix = unprivileged;
    options.extra_args = {"--force"};
    MemlendDaemon daemon(dir, options, "forced");
    CHECK(daemon.StderrText().find("mlockall failed") != std::string::npos);
    CHECK(daemon.Status().at("devices").size() == 1);
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }
}

TEST_SUITE("status_down") {
  TEST_CASE("status without a daemon fails with a clear message") {
    TempDir dir;

    SUBCASE("no control socket at all") {
      for (bool json : {false, true}) {
        INFO("--json " << json);
        std::vector<std::string> argv = {MemlendBinary(), "status", "--control",
                                         dir.File("missing.sock")};
        if (json) argv.push_back("--json");
        CheckCleanFailure(RunCommand(argv), dir.File("missing.sock"));
      }
    }

    SUBCASE("stale socket file that nobody listens on") {
      const std::string path = dir.File("stale.sock");
      int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      REQUIRE(fd >= 0);
      sockaddr_un address{};
      address.sun_family = AF_UNIX;
      std::strncpy(address.sun_path, path.c_str(), sizeof address.sun_path - 1);
      REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
      close(fd);  // the file stays, connecting to it is refused
      CheckCleanFailure(RunCommand({MemlendBinary(), "status", "--control", path, "--json"}), path);
    }

    SUBCASE("a daemon that has shut down") {
      std::string control;
      {
        MemlendDaemon daemon(dir, DaemonOptions{});
        control = daemon.control_path();
        CHECK(daemon.Status().at("devices").size() == 1);
        CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
      }
      CheckCleanFailure(RunCommand({MemlendBinary(), "status", "--control", control, "--json"}),
                        control);
    }
  }
}

TEST_SUITE("shutdown") {
  // SIGTERM and SIGINT stop the daemon with status 0 even while clients are connected: one in
  // transmission with nothing in flight, one that never finished its handshake. Afterwards
  // nothing accepts connections any more.
  TEST_CASE("SIGTERM and SIGINT shut down cleanly with clients connected") {
    for (int signal_number : {SIGTERM, SIGINT}) {
      for (Transport transport : {Transport::kUnix, Transport::kTcp}) {
        INFO("signal " << signal_number << ", transport " << std::string(TransportName(transport)));
        TempDir dir;
        DaemonOptions options;
        options.transport = transport;
        MemlendDaemon daemon(dir, options);
        NbdClient idle(daemon.endpoint(), "d0");
        std::vector<uint8_t> data(kPageSize, 0x11);
        idle.Write(data, 0);
        RawNbdClient half_open(daemon.endpoint());
        half_open.ReadGreeting();

        CHECK_MESSAGE(daemon.Stop(signal_number) == 0, daemon.StderrText());
        CHECK_FALSE(UnixSocketAcceptsConnections(daemon.control_path()));
        CHECK_FALSE(AcceptsConnections(daemon.endpoint()));
        // The daemon is gone, so the connected client's next request fails instead of hanging.
        CHECK(idle.TryWrite(data, 0) != 0);
      }
    }
  }

  // SIGTERM while four connections are busy writing and reading: the daemon still exits with
  // status 0 (and does not deadlock between its connection threads and its shutdown).
  TEST_CASE("SIGTERM during I/O shuts down cleanly") {
    constexpr int kThreads = 4;
    constexpr int kRequestsBeforeSignal = 50;
    TempDir dir;
    DaemonOptions options;
    options.devices = {"d0:32M"};
    MemlendDaemon daemon(dir, options);
    std::vector<std::atomic<int>> done(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        try {
          NbdClient client(daemon.endpoint(), "d0");
          std::mt19937_64 rng(TestSeed() + static_cast<uint64_t>(t));
          std::vector<uint8_t> data(64 * kKiB);
          FillRandom(rng, data);
          // Runs until the daemon goes away and a request fails.
          for (uint64_t i = 0;; ++i) {
            uint64_t offset = t * 8 * kMiB + (i % 128) * data.size();
            if (client.TryWrite(data, offset) != 0) break;
            if (nbd_pread(client.handle(), data.data(), data.size(), offset, 0) != 0) break;
            ++done[t];
          }
        } catch (const std::exception&) {
          // Connecting or disconnecting may fail once the daemon is gone; that is expected.
        }
        done[t] = kRequestsBeforeSignal;  // never leave the waiting loop below stuck
      });
    }
    // Wait until every connection is demonstrably busy, then pull the plug.
    for (int t = 0; t < kThreads; ++t) {
      while (done[t].load() < kRequestsBeforeSignal) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
    }
    CHECK_MESSAGE(daemon.Stop(SIGTERM) == 0, daemon.StderrText());
    for (std::thread& thread : threads) thread.join();
  }
}

}  // namespace memlend::integration
