// Unit tests for the daemon's command-line configuration (device specs, option validation)
// and for socket endpoints: parsing, formatting, and listening on unix sockets and on the
// loopback address.
#include "temp_dir.h"
#include "daemon/config.h"

#include <doctest/doctest.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "transport/socket.h"

namespace memlend {
namespace {

using memlend::testing::TempDir;

// Arguments that BuildDaemonConfig accepts; each failure test breaks one of them.
DaemonArgs GoodArgs() {
  DaemonArgs args;
  args.devices = {"swap0:4G", "scratch:64M"};
  args.nbd = "127.0.0.1:10809";
  args.local_store = "2G";
  args.backing_file = "/var/tmp/memlend.backing";
  args.backing_size = "16G";
  args.compress = "lz4";
  args.control = "/tmp/memlend-test.sock";
  args.busy_poll_us = 100;
  return args;
}

// Runs BuildDaemonConfig on `args`, expects failure, and returns the error.
std::string BuildError(const DaemonArgs& args) {
  DaemonConfig config;
  std::string error;
  CHECK_FALSE(BuildDaemonConfig(args, &config, &error));
  CHECK_FALSE(error.empty());
  CHECK(error.find('\n') == std::string::npos);
  return error;
}

bool Contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// Returns the TCP port a listening socket is bound to.
std::uint16_t BoundPort(int fd) {
  sockaddr_storage address{};
  socklen_t length = sizeof(address);
  REQUIRE(getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0);
  REQUIRE(address.ss_family == AF_INET);
  return ntohs(reinterpret_cast<sockaddr_in*>(&address)->sin_port);
}

// Accepts one pending connection on `listener`, waiting at most 5 s so that a missing
// connection fails the test instead of hanging it. Returns an invalid UniqueFd on timeout.
UniqueFd AcceptPending(int listener) {
  pollfd ready{listener, POLLIN, 0};
  if (poll(&ready, 1, 5000) != 1) return UniqueFd();
  return UniqueFd(accept(listener, nullptr, nullptr));
}

// Accepts one connection on `listener` and checks bytes flow both ways with `client`.
void CheckConnected(int listener, int client) {
  UniqueFd server = AcceptPending(listener);
  REQUIRE(server.valid());
  const char hello[] = "hello";
  REQUIRE(WriteFull(client, hello, sizeof(hello)) == 0);
  char got[sizeof(hello)] = {};
  REQUIRE(ReadFull(server.get(), got, sizeof(got)) == 0);
  CHECK(std::memcmp(got, hello, sizeof(hello)) == 0);
  REQUIRE(WriteFull(server.get(), "ok", 2) == 0);
  char reply[2] = {};
  REQUIRE(ReadFull(client, reply, 2) == 0);
  CHECK(std::string(reply, 2) == "ok");
}

}  // namespace

TEST_CASE("ParseDeviceSpec accepts NAME:SIZE") {
  std::string error;
  const std::optional<DeviceSpec> swap = ParseDeviceSpec("swap0:4G", &error);
  REQUIRE(swap.has_value());
  CHECK(swap->name == "swap0");
  CHECK(swap->size_bytes == 4ull << 30);

  const std::optional<DeviceSpec> dotted = ParseDeviceSpec("a.b-c_d:4096", &error);
  REQUIRE(dotted.has_value());
  CHECK(dotted->name == "a.b-c_d");
  CHECK(dotted->size_bytes == 4096);

  const std::string longest(64, 'x');
  const std::optional<DeviceSpec> at_limit = ParseDeviceSpec(longest + ":8K", &error);
  REQUIRE(at_limit.has_value());
  CHECK(at_limit->name == longest);
  CHECK(at_limit->size_bytes == 8192);

  const std::optional<DeviceSpec> digits = ParseDeviceSpec("0:1T", &error);
  REQUIRE(digits.has_value());
  CHECK(digits->name == "0");
  CHECK(digits->size_bytes == 1ull << 40);
}

TEST_CASE("ParseDeviceSpec rejects malformed specs and says why") {
  struct Case {
    const char* text;
    const char* mentions;  // a phrase the error must contain
  };
  const std::string too_long = std::string(65, 'x') + ":4G";
  const Case cases[] = {
      {"swap0", "NAME:SIZE"},       // no colon
      {"swap04G", "NAME:SIZE"},     // no colon
      {"", "NAME:SIZE"},            // nothing at all
      {":4G", "name"},              // empty name
      {"swap 0:4G", "name"},        // space
      {"swap/0:4G", "name"},        // slash
      {"a:b:4G", "protocol"},       // NAME:SIZE:PROTOCOL with size "b" and protocol "4G"
      {"a:4G:active", "protocol"},  // not a protocol a device can choose
      {"a:4G:", "protocol"},        // an empty protocol
      {"sw\xc3\xa4p:4G", "name"},   // non-ASCII letter
      {too_long.c_str(), "name"},   // 65 characters
      {"swap0:12Q", "not a size"},  // unknown suffix
      {"swap0:", "not a size"},     // no size
      {"swap0:-4G", "not a size"},  // a sign
      {"swap0:0", "multiple of 4 KiB"},
      {"swap0:4095", "multiple of 4 KiB"},
      {"swap0:4097", "multiple of 4 KiB"},
      {"swap0:1001K", "multiple of 4 KiB"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.text);
    std::string error;
    CHECK_FALSE(ParseDeviceSpec(c.text, &error).has_value());
    CAPTURE(error);
    CHECK(Contains(error, c.mentions));
    CHECK(Contains(error, "--device"));
    CHECK(error.find('\n') == std::string::npos);
  }
}

TEST_CASE("BuildDaemonConfig fills every field of a good configuration") {
  DaemonConfig config;
  std::string error;
  REQUIRE(BuildDaemonConfig(GoodArgs(), &config, &error));
  REQUIRE(config.devices.size() == 2);
  CHECK(config.devices[0].name == "swap0");
  CHECK(config.devices[0].size_bytes == 4ull << 30);
  CHECK(config.devices[1].name == "scratch");
  CHECK(config.devices[1].size_bytes == 64ull << 20);
  CHECK(config.nbd.kind == Endpoint::Kind::kTcp);
  CHECK(config.nbd.host == "127.0.0.1");
  CHECK(config.nbd.port == 10809);
  CHECK(config.local_store_bytes == 2ull << 30);
  CHECK(config.backing_file == "/var/tmp/memlend.backing");
  CHECK(config.backing_size_bytes == 16ull << 30);
  CHECK(config.compression == Compression::kLz4);
  CHECK(config.control_path == "/tmp/memlend-test.sock");
  CHECK(config.busy_poll_us == 100);

  // The optional parts left out: no disk tier, no compression, a unix NBD socket.
  DaemonArgs minimal;
  minimal.devices = {"d:4K"};
  minimal.nbd = "unix:/tmp/memlend-nbd.sock";
  minimal.local_store = "4K";
  minimal.control = "/tmp/c.sock";
  DaemonConfig small;
  REQUIRE(BuildDaemonConfig(minimal, &small, &error));
  REQUIRE(small.devices.size() == 1);
  CHECK(small.devices[0].size_bytes == 4096);
  CHECK(small.nbd.kind == Endpoint::Kind::kUnix);
  CHECK(small.nbd.path == "/tmp/memlend-nbd.sock");
  CHECK(small.local_store_bytes == 4096);
  CHECK(small.backing_file.empty());
  CHECK(small.backing_size_bytes == 0);
  CHECK(small.compression == Compression::kNone);
  CHECK(small.control_path == "/tmp/c.sock");
  CHECK(small.busy_poll_us == DaemonArgs().busy_poll_us);

  // A backing file without a bound is fine.
  minimal.backing_file = "/var/tmp/b";
  DaemonConfig unbounded;
  REQUIRE(BuildDaemonConfig(minimal, &unbounded, &error));
  CHECK(unbounded.backing_file == "/var/tmp/b");
  CHECK(unbounded.backing_size_bytes == 0);
}

TEST_CASE("BuildDaemonConfig takes the control path from MEMLEND_CONTROL when not given") {
  const char* saved = std::getenv("MEMLEND_CONTROL");
  const std::optional<std::string> previous =
      saved != nullptr ? std::optional<std::string>(saved) : std::nullopt;
  REQUIRE(setenv("MEMLEND_CONTROL", "/tmp/from-env.sock", 1) == 0);
  DaemonArgs args = GoodArgs();
  args.control.clear();
  DaemonConfig config;
  std::string error;
  const bool built = BuildDaemonConfig(args, &config, &error);
  CHECK(DefaultControlPath() == "/tmp/from-env.sock");
  if (previous) {
    setenv("MEMLEND_CONTROL", previous->c_str(), 1);
  } else {
    unsetenv("MEMLEND_CONTROL");
  }
  REQUIRE(built);
  CHECK(config.control_path == "/tmp/from-env.sock");
}

TEST_CASE("BuildDaemonConfig rejects bad options with a one-line error naming the option") {
  SUBCASE("no devices and no local store") {
    DaemonArgs args = GoodArgs();
    args.devices.clear();
    args.local_store.clear();
    CHECK(Contains(BuildError(args), "--device"));
  }
  SUBCASE("a bad device spec") {
    DaemonArgs args = GoodArgs();
    args.devices.push_back("bad name:4G");
    const std::string error = BuildError(args);
    CHECK(Contains(error, "--device"));
    CHECK(Contains(error, "bad name:4G"));
  }
  SUBCASE("duplicate device names") {
    DaemonArgs args = GoodArgs();
    args.devices = {"swap0:4G", "other:4K", "swap0:8G"};
    const std::string error = BuildError(args);
    CHECK(Contains(error, "--device"));
    CHECK(Contains(error, "swap0"));
    CHECK(Contains(error, "twice"));
  }
  SUBCASE("bad --nbd") {
    for (const char* nbd :
         {"", "10809", "localhost", "host:0", "host:70000", "::1:10809", "unix:"}) {
      CAPTURE(nbd);
      DaemonArgs args = GoodArgs();
      args.nbd = nbd;
      CHECK(Contains(BuildError(args), "--nbd"));
    }
  }
  SUBCASE("bad --local-store") {
    for (const char* size : {"", "lots", "4095", "0", "-1G", "1.5G"}) {
      CAPTURE(size);
      DaemonArgs args = GoodArgs();
      args.local_store = size;
      CHECK(Contains(BuildError(args), "--local-store"));
    }
  }
  SUBCASE("bad --backing-size") {
    for (const char* size : {"huge", "100", "0"}) {
      CAPTURE(size);
      DaemonArgs args = GoodArgs();
      args.backing_size = size;
      CHECK(Contains(BuildError(args), "--backing-size"));
    }
  }
  SUBCASE("--backing-size without --backing-file") {
    DaemonArgs args = GoodArgs();
    args.backing_file.clear();
    const std::string error = BuildError(args);
    CHECK(Contains(error, "--backing-size"));
    CHECK(Contains(error, "--backing-file"));
  }
  SUBCASE("--backing-direct without --backing-file") {
    DaemonArgs args = GoodArgs();
    args.backing_file.clear();
    args.backing_size.clear();
    args.backing_direct = true;
    const std::string error = BuildError(args);
    CHECK(Contains(error, "--backing-direct"));
    CHECK(Contains(error, "--backing-file"));
  }
  SUBCASE("bad --compress") {
    for (const char* compress : {"", "zstd", "LZ4", "lz4 "}) {
      CAPTURE(compress);
      DaemonArgs args = GoodArgs();
      args.compress = compress;
      CHECK(Contains(BuildError(args), "--compress"));
    }
  }
  SUBCASE("bad --busy-poll") {
    DaemonArgs args = GoodArgs();
    args.busy_poll_us = 1000001;
    CHECK(Contains(BuildError(args), "--busy-poll"));
    args.busy_poll_us = 1000000;  // the largest allowed
    DaemonConfig config;
    std::string error;
    CHECK(BuildDaemonConfig(args, &config, &error));
    CHECK(config.busy_poll_us == 1000000);
  }
  SUBCASE("bad --control") {
    DaemonArgs args = GoodArgs();
    args.control = "/tmp/" + std::string(200, 'c') + ".sock";
    CHECK(Contains(BuildError(args), "--control"));
  }
}

// Regression: errors quoted arguments as given, so an argument holding a newline (from a
// config file or a unit's ExecStart, say) made a multi-line error.
TEST_CASE("BuildDaemonConfig keeps its error on one line when an argument holds a newline") {
  DaemonArgs device = GoodArgs();
  device.devices = {"a\nb:4G"};
  CHECK(BuildError(device).find('\n') == std::string::npos);
  DaemonArgs compress = GoodArgs();
  compress.compress = "lz4\n";
  CHECK(BuildError(compress).find('\n') == std::string::npos);
}

TEST_CASE("ParseEndpoint refuses a host with characters no host name has") {
  std::string error;
  CHECK_FALSE(ParseEndpoint("ho\nst:80", &error).has_value());
  CHECK(error.find("host") != std::string::npos);
  CHECK_FALSE(ParseEndpoint("a b:80", &error).has_value());
  CHECK(ParseEndpoint("fe80::1%eth0", &error) == std::nullopt);  // v6 needs brackets
  CHECK(ParseEndpoint("[fe80::1%eth0]:80", &error).has_value());
}

TEST_CASE("ParseEndpoint accepts host:port, [v6]:port and unix:path") {
  std::string error;
  std::optional<Endpoint> e = ParseEndpoint("127.0.0.1:10809", &error);
  REQUIRE(e.has_value());
  CHECK(e->kind == Endpoint::Kind::kTcp);
  CHECK(e->host == "127.0.0.1");
  CHECK(e->port == 10809);

  e = ParseEndpoint("localhost:1", &error);
  REQUIRE(e.has_value());
  CHECK(e->host == "localhost");
  CHECK(e->port == 1);

  e = ParseEndpoint("example.org:65535", &error);
  REQUIRE(e.has_value());
  CHECK(e->port == 65535);

  e = ParseEndpoint("[::1]:10809", &error);
  REQUIRE(e.has_value());
  CHECK(e->kind == Endpoint::Kind::kTcp);
  CHECK(e->host == "::1");
  CHECK(e->port == 10809);

  e = ParseEndpoint("unix:/tmp/x.sock", &error);
  REQUIRE(e.has_value());
  CHECK(e->kind == Endpoint::Kind::kUnix);
  CHECK(e->path == "/tmp/x.sock");
  CHECK(e->host.empty());

  // The longest path a sockaddr_un holds with its terminating NUL: 107 bytes.
  const std::string longest = "/" + std::string(106, 'p');
  e = ParseEndpoint("unix:" + longest, &error);
  REQUIRE(e.has_value());
  CHECK(e->path == longest);
}

TEST_CASE("ParseEndpoint rejects malformed endpoints") {
  const std::string too_long = "unix:/" + std::string(107, 'p');  // 108 bytes: no room for NUL
  for (const std::string& text :
       {std::string(":80"), std::string("host:"), std::string("host:0"), std::string("host:65536"),
        std::string("host:99999999999"), std::string("host:12ab"), std::string("host:-1"),
        std::string("host:+80"), std::string("host: 80"), std::string("host"), std::string(""),
        std::string("::1:80"), std::string("[::1]"), std::string("[::1]80"), std::string("[::1:80"),
        std::string("[]:80"), std::string("unix:"), too_long}) {
    CAPTURE(text);
    std::string error;
    CHECK_FALSE(ParseEndpoint(text, &error).has_value());
    CHECK_FALSE(error.empty());
  }
}

TEST_CASE("Endpoint::ToString formats what ParseEndpoint reads") {
  for (const char* text : {"127.0.0.1:10809", "localhost:1", "[::1]:10809", "[fe80::1%eth0]:80",
                           "unix:/tmp/x.sock", "unix:relative.sock"}) {
    CAPTURE(text);
    std::string error;
    const std::optional<Endpoint> parsed = ParseEndpoint(text, &error);
    REQUIRE(parsed.has_value());
    CHECK(parsed->ToString() == text);
    const std::optional<Endpoint> again = ParseEndpoint(parsed->ToString(), &error);
    REQUIRE(again.has_value());
    CHECK(again->kind == parsed->kind);
    CHECK(again->host == parsed->host);
    CHECK(again->port == parsed->port);
    CHECK(again->path == parsed->path);
  }
}

TEST_CASE("ListenOn and ConnectTo work over a unix socket") {
  TempDir dir;
  std::string error;
  const std::optional<Endpoint> endpoint = ParseEndpoint("unix:" + dir.File("s.sock"), &error);
  REQUIRE(endpoint.has_value());
  const UniqueFd listener = ListenOn(*endpoint);
  REQUIRE(listener.valid());
  const UniqueFd client = ConnectTo(*endpoint, &error);
  REQUIRE(client.valid());
  CheckConnected(listener.get(), client.get());

  // Nothing listens on another path in the directory.
  Endpoint missing = *endpoint;
  missing.path = dir.File("missing.sock");
  error.clear();
  CHECK_FALSE(ConnectTo(missing, &error).valid());
  CHECK_FALSE(error.empty());
}

TEST_CASE("ListenOn refuses a unix socket that is in use and replaces a stale one") {
  TempDir dir;
  Endpoint endpoint;
  endpoint.kind = Endpoint::Kind::kUnix;
  endpoint.path = dir.File("s.sock");
  {
    const UniqueFd live = ListenOn(endpoint);
    REQUIRE(live.valid());
    CHECK_THROWS_WITH_AS(ListenOn(endpoint), doctest::Contains("in use"), std::runtime_error);
    CHECK_THROWS_WITH_AS(ListenOn(endpoint), doctest::Contains(endpoint.path.c_str()),
                         std::runtime_error);
    // ListenOn tells a live socket by connecting to it, so each refused attempt left one
    // connection in the live listener's queue, already closed by the prober.
    for (int probe = 0; probe < 2; ++probe) {
      CAPTURE(probe);
      UniqueFd probed = AcceptPending(live.get());
      REQUIRE(probed.valid());
      char byte;
      CHECK(ReadFull(probed.get(), &byte, 1) == -ECONNRESET);
    }
    // The refused attempts left the live socket working.
    std::string error;
    const UniqueFd client = ConnectTo(endpoint, &error);
    REQUIRE(client.valid());
    CheckConnected(live.get(), client.get());
  }
  // The listener is closed but its file remains: stale, so it is replaced.
  REQUIRE(std::filesystem::is_socket(endpoint.path));
  const UniqueFd fresh = ListenOn(endpoint);
  REQUIRE(fresh.valid());
  std::string error;
  const UniqueFd client = ConnectTo(endpoint, &error);
  REQUIRE(client.valid());
  CheckConnected(fresh.get(), client.get());
}

TEST_CASE("ListenOn refuses to replace a file that is not a socket") {
  TempDir dir;
  Endpoint endpoint;
  endpoint.kind = Endpoint::Kind::kUnix;
  endpoint.path = dir.File("regular");
  std::ofstream(endpoint.path) << "keep me";
  CHECK_THROWS_WITH_AS(ListenOn(endpoint), doctest::Contains("not a socket"), std::runtime_error);
  CHECK(std::filesystem::is_regular_file(endpoint.path));
  CHECK(std::filesystem::file_size(endpoint.path) == 7);
}

TEST_CASE("ListenOn on the loopback address works and refuses a port already bound") {
  Endpoint any_port;
  any_port.host = "127.0.0.1";
  any_port.port = 0;  // the kernel picks a free port
  const UniqueFd first = ListenOn(any_port);
  REQUIRE(first.valid());
  const std::uint16_t port = BoundPort(first.get());
  REQUIRE(port != 0);

  Endpoint taken;
  taken.host = "127.0.0.1";
  taken.port = port;
  CHECK_THROWS_WITH_AS(ListenOn(taken), doctest::Contains(taken.ToString().c_str()),
                       std::runtime_error);

  std::string error;
  const UniqueFd client = ConnectTo(taken, &error);
  REQUIRE(client.valid());
  CheckConnected(first.get(), client.get());
}

TEST_CASE("ReadFull reports a stream closed early as ECONNRESET") {
  int fds[2];
  REQUIRE(socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0);
  UniqueFd reader(fds[0]);
  UniqueFd writer(fds[1]);
  REQUIRE(WriteFull(writer.get(), "abc", 3) == 0);
  writer.Reset();
  char buffer[8];
  CHECK(ReadFull(reader.get(), buffer, sizeof(buffer)) == -ECONNRESET);
  // Writing to a closed peer fails with an errno, without SIGPIPE.
  int pair[2];
  REQUIRE(socketpair(AF_UNIX, SOCK_STREAM, 0, pair) == 0);
  UniqueFd keep(pair[0]);
  ::close(pair[1]);
  CHECK(WriteFull(keep.get(), "abc", 3) == -EPIPE);
}

TEST_CASE("BuildDaemonConfig accepts a daemon for attached devices only (--local-store, no --device)") {
  DaemonArgs args;
  args.local_store = "64M";
  args.peers = {"127.0.0.1:7710"};
  args.backing_file = "/var/tmp/memlend.spill";
  args.control = "/tmp/memlend-test.sock";
  DaemonConfig config;
  std::string error;
  REQUIRE(BuildDaemonConfig(args, &config, &error));
  CHECK(config.devices.empty());
  CHECK_FALSE(config.serve_nbd);
  CHECK(config.local_store_bytes == 64u << 20);
  CHECK(config.peers.size() == 1);
  CHECK(config.lock_memory);

  args.no_mlock = true;
  args.nbd = "unix:/tmp/memlend-nbd.sock";
  DaemonConfig with_nbd;
  REQUIRE(BuildDaemonConfig(args, &with_nbd, &error));
  CHECK(with_nbd.serve_nbd);
  CHECK_FALSE(with_nbd.lock_memory);

  DaemonArgs device_without_nbd = args;
  device_without_nbd.nbd.clear();
  device_without_nbd.devices = {"d0:16M"};
  CHECK(Contains(BuildError(device_without_nbd), "--nbd"));
}

TEST_CASE("BuildDaemonConfig reads the connection bounds, socket access and --force") {
  DaemonArgs args = GoodArgs();
  DaemonConfig config;
  std::string error;
  REQUIRE(BuildDaemonConfig(args, &config, &error));
  CHECK(config.max_connections == 64);
  CHECK(config.max_borrowers == 32);
  CHECK(config.max_lend_per_borrower_bytes == 0);
  CHECK(config.nbd_access.mode == 0600);
  CHECK(config.nbd_access.group == static_cast<gid_t>(-1));
  CHECK_FALSE(config.force);

  args.nbd = "unix:/tmp/memlend-test-nbd.sock";
  args.max_connections = "200";
  args.socket_mode = "660";
  args.socket_group = "0";
  args.lend = "4M";
  args.listen = "127.0.0.1:7710";
  args.max_borrowers = "5";
  args.max_lend_per_borrower = "5M";  // whole superpages: 4 MiB
  args.force = true;
  config = DaemonConfig{};
  REQUIRE_MESSAGE(BuildDaemonConfig(args, &config, &error), error);
  CHECK(config.max_connections == 200);
  CHECK(config.max_borrowers == 5);
  CHECK(config.max_lend_per_borrower_bytes == 4 << 20);
  CHECK(config.nbd_access.mode == 0660);
  CHECK(config.nbd_access.group == 0);
  CHECK(config.force);
  args.socket_group = "root";  // by name
  REQUIRE(BuildDaemonConfig(args, &config, &error));
  CHECK(config.nbd_access.group == 0);
}

TEST_CASE("redundancy: replicas:2 with two peers, else disk with a backing file, else none") {
  DaemonConfig config;
  std::string error;
  DaemonArgs args = GoodArgs();
  args.backing_file.clear();
  args.backing_size.clear();
  args.peers = {"127.0.0.1:7710"};
  config = DaemonConfig{};
  REQUIRE(BuildDaemonConfig(args, &config, &error));
  CHECK(config.redundancy == Redundancy{1, false});
  CHECK_FALSE(config.redundancy_given);
  args.backing_file = "/tmp/memlend-config-test";
  args.backing_size = "1G";
  config = DaemonConfig{};
  REQUIRE(BuildDaemonConfig(args, &config, &error));
  CHECK(config.redundancy == Redundancy{0, true});
  CHECK(RedundancyName(config.redundancy) == "disk");
  args.peers.push_back("127.0.0.1:7711");
  config = DaemonConfig{};
  REQUIRE(BuildDaemonConfig(args, &config, &error));
  CHECK(config.redundancy == Redundancy{2, false});
  CHECK(RedundancyName(config.redundancy) == "replicas:2");
  args.redundancy = "none";
  config = DaemonConfig{};
  REQUIRE(BuildDaemonConfig(args, &config, &error));
  CHECK(config.redundancy == Redundancy{1, false});
  CHECK(config.redundancy_given);
  CHECK(RedundancyName(config.redundancy) == "none");
  args.redundancy = "replicas:2+disk";
  config = DaemonConfig{};
  REQUIRE(BuildDaemonConfig(args, &config, &error));
  CHECK(config.redundancy == Redundancy{2, true});
  CHECK(RedundancyName(config.redundancy) == "replicas:2+disk");
  args.redundancy = "disk";
  config = DaemonConfig{};
  REQUIRE(BuildDaemonConfig(args, &config, &error));
  CHECK(config.redundancy == Redundancy{0, true});
  args.redundancy = "replicas:3";
  CHECK(Contains(BuildError(args), "--redundancy replicas:3: redundancy replicas:3 needs at least 3 peers (--peer), and this daemon has 2"));
  args.redundancy = "replicas:1+disk";
  args.backing_file.clear();
  args.backing_size.clear();
  CHECK(Contains(BuildError(args), "there is none (start the daemon with --backing-file)"));
  args.redundancy = "disk";
  CHECK(Contains(BuildError(args), "there is none"));
  for (const char* bad : {"replicas:0", "replicas:4", "replicas:", "replicas:2x", "two",
                          "+disk", "disk+disk", "replicas:2+", "replicas:4+disk"}) {
    args.redundancy = bad;
    CHECK(Contains(BuildError(args), "expected none, disk, replicas:N or replicas:N+disk"));
  }
}

TEST_CASE("peer deadlines: defaults, chosen values, and bounds") {
  DaemonConfig config;
  std::string error;
  DaemonArgs args = GoodArgs();
  REQUIRE(BuildDaemonConfig(args, &config, &error));
  CHECK(config.peer_timeout_ms == 500);
  CHECK(config.peer_down_after_ms == 5000);
  args.peer_timeout = "200";
  args.peer_down_after = "2000";
  REQUIRE(BuildDaemonConfig(args, &config, &error));
  CHECK(config.peer_timeout_ms == 200);
  CHECK(config.peer_down_after_ms == 2000);
  args.peer_timeout = "5";
  CHECK(Contains(BuildError(args), "--peer-timeout '5'"));
  args.peer_timeout = "1s";
  CHECK(Contains(BuildError(args), "--peer-timeout '1s'"));
  args.peer_timeout = "3000";
  CHECK(Contains(BuildError(args), "--peer-down-after 2000 is shorter than --peer-timeout 3000"));
  args.peer_timeout.clear();
  args.peer_down_after = "700000";
  CHECK(Contains(BuildError(args), "--peer-down-after '700000'"));
}

TEST_CASE("BuildDaemonConfig refuses bad bounds and socket options, naming them") {
  DaemonArgs args = GoodArgs();
  args.max_connections = "0";
  CHECK(Contains(BuildError(args), "--max-connections '0'"));
  args.max_connections = "4097";
  CHECK(Contains(BuildError(args), "1 to 4096"));
  args.max_connections = "12x";
  CHECK(Contains(BuildError(args), "'12x'"));

  args = GoodArgs();
  args.max_borrowers = "3";
  CHECK(Contains(BuildError(args), "--max-borrowers applies to lent memory"));
  args = GoodArgs();
  args.seal_pages = true;  // no --peer: nothing leaves the host
  CHECK(Contains(BuildError(args), "--seal-pages seals the pages that go to lenders"));
  args = GoodArgs();
  args.max_lend_per_borrower = "4M";
  CHECK(Contains(BuildError(args), "--max-lend-per-borrower applies to lent memory"));
  for (const char* limit : {"1M", "12x", "-2M"}) {
    DaemonArgs lender;
    lender.lend = "4M";
    lender.listen = "127.0.0.1:7710";
    lender.max_lend_per_borrower = limit;
    CHECK(Contains(BuildError(lender), "--max-lend-per-borrower '"));
  }

  args = GoodArgs();  // a TCP --nbd
  args.socket_mode = "0660";
  CHECK(Contains(BuildError(args), "--socket-mode applies to a unix socket"));
  args.socket_mode.clear();
  args.socket_group = "root";
  CHECK(Contains(BuildError(args), "--socket-group applies to a unix socket"));

  args = GoodArgs();
  args.nbd = "unix:/tmp/memlend-test-nbd.sock";
  for (const char* mode : {"0999", "17777", "", "rw"}) {
    if (*mode == '\0') continue;
    args.socket_mode = mode;
    CHECK(Contains(BuildError(args), "--socket-mode"));
  }
  args.socket_mode.clear();
  args.socket_group = "no-such-group-memlend";
  CHECK(Contains(BuildError(args), "no such group"));

  DaemonArgs lend_only;
  lend_only.lend = "4M";
  lend_only.listen = "127.0.0.1:7710";
  lend_only.socket_mode = "0660";
  CHECK(Contains(BuildError(lend_only), "--socket-mode"));
}

TEST_CASE("ParseSocketMode takes octal permission bits up to 0777") {
  CHECK(ParseSocketMode("0600") == 0600);
  CHECK(ParseSocketMode("660") == 0660);
  CHECK(ParseSocketMode("0") == 0);
  CHECK_FALSE(ParseSocketMode("1777"));
  CHECK_FALSE(ParseSocketMode("08"));
  CHECK_FALSE(ParseSocketMode(""));
  CHECK_FALSE(ParseSocketMode("00600"));
}

TEST_CASE("CheckDeviceSize: positive multiples of 4 KiB up to 16 TiB") {
  CHECK(CheckDeviceSize(4096).empty());
  CHECK(CheckDeviceSize(kMaxDeviceBytes).empty());
  CHECK(Contains(CheckDeviceSize(0), "4 KiB"));
  CHECK(Contains(CheckDeviceSize(4097), "4 KiB"));
  CHECK(Contains(CheckDeviceSize(kMaxDeviceBytes + 4096), "16.0 TiB"));
}

TEST_CASE("unix sockets get exactly the mode asked for, whatever the umask") {
  TempDir dir;
  struct Umask {
    explicit Umask(mode_t mask) : old(umask(mask)) {}
    ~Umask() { umask(old); }
    mode_t old;
  };
  const auto mode_of = [](const std::string& path) {
    struct stat st {};
    REQUIRE(lstat(path.c_str(), &st) == 0);
    return st.st_mode & 07777;
  };
  Endpoint endpoint;
  endpoint.kind = Endpoint::Kind::kUnix;
  {
    Umask open_mask(0);
    endpoint.path = dir.File("default.sock");
    const UniqueFd listener = ListenOn(endpoint);
    CHECK(mode_of(endpoint.path) == 0600);
  }
  {
    Umask closed_mask(077);
    endpoint.path = dir.File("group.sock");
    const UniqueFd listener = ListenOn(endpoint, UnixSocketAccess{0660, getegid()});
    CHECK(mode_of(endpoint.path) == 0660);
    struct stat st {};
    REQUIRE(lstat(endpoint.path.c_str(), &st) == 0);
    CHECK(st.st_gid == getegid());
  }
}

TEST_CASE("ReadFullBefore and WaitReadable give up at the deadline, with none or part of the "
          "bytes come") {
  int fds[2];
  REQUIRE(socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0);
  UniqueFd reader(fds[0]);
  UniqueFd writer(fds[1]);
  const auto soon = [] { return std::chrono::steady_clock::now() + std::chrono::milliseconds(50); };
  char buffer[8];
  CHECK(WaitReadable(reader.get(), soon()) == -ETIMEDOUT);
  CHECK(ReadFullBefore(reader.get(), buffer, sizeof(buffer), soon()) == -ETIMEDOUT);
  REQUIRE(WriteFull(writer.get(), "abc", 3) == 0);
  CHECK(WaitReadable(reader.get(), soon()) == 0);
  CHECK(ReadFullBefore(reader.get(), buffer, sizeof(buffer), soon()) == -ETIMEDOUT);  // 3 of 8
  REQUIRE(WriteFull(writer.get(), "abcdefgh", 8) == 0);
  CHECK(ReadFullBefore(reader.get(), buffer, sizeof(buffer), soon()) == 0);
  CHECK(std::memcmp(buffer, "abcdefgh", 8) == 0);
  CHECK(WriteFullBefore(writer.get(), "xy", 2, soon()) == 0);
  writer.Reset();
  CHECK(ReadFullBefore(reader.get(), buffer, sizeof(buffer), soon()) == -ECONNRESET);
}

TEST_CASE("ValidDeviceName takes 1 to 64 of [A-Za-z0-9._-]") {
  CHECK(ValidDeviceName("swap0"));
  CHECK(ValidDeviceName("a.b_c-D9"));
  CHECK(ValidDeviceName(std::string(64, 'x')));
  CHECK_FALSE(ValidDeviceName(""));
  CHECK_FALSE(ValidDeviceName(std::string(65, 'x')));
  CHECK_FALSE(ValidDeviceName("a/b"));
  CHECK_FALSE(ValidDeviceName("a b"));
  CHECK_FALSE(ValidDeviceName("a?socket=x"));
}

}  // namespace memlend
