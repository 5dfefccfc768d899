// Integration tests of what a remote party, or a careless operator, can make a daemon do:
// a lender must never let one borrower read another's bytes (with its memory locked, as
// root runs it), connections are bounded in number, time and memory and give that memory
// back, a thread that cannot be started refuses one connection instead of ending the daemon,
// sockets are created with the mode asked for whatever the umask, and reservations the host
// cannot hold are refused at startup.
//
// Memory is measured as the daemon's VmLck (/proc/PID/status): bounds on bytes, never on
// time, checked in the normal build. Waits are bounded polls on what the daemon reports.

#include <doctest/doctest.h>
#include <fcntl.h>
#include <grp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "harness.h"
#include "raw_nbd_client.h"
#include "raw_peer_client.h"

namespace memlend::integration {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

// What the daemon holds in memory that matters here: its locked memory (it locks it, as
// users run it as root).
uint64_t HeldKiB(pid_t pid) { return ProcStatusNumber(pid, "VmLck"); }

// Checks a bound on what the daemon holds. A sanitized build's daemons neither lock their
// memory nor allocate as the normal build's do (AddressSanitizer keeps freed memory in
// quarantine), so there the figures are shown, not checked.
void CheckHeldBelow(uint64_t held_kib, uint64_t bound_kib) {
  if (SanitizedBuild()) {
    MESSAGE("sanitized build: memory bound not checked (" << held_kib << " KiB held, bound "
                                                          << bound_kib << " KiB)");
    return;
  }
  CHECK(held_kib < bound_kib);
}

// How many times `marker` occurs in the writable memory of process `pid` (its maps read
// through /proc/PID/mem, 1 MiB at a time, with overlaps so no occurrence is cut in two).
// Mappings of more than 1 GiB are passed over: a sanitized build's shadow memory (terabytes
// reserved, nearly all of it never touched) would take hours; a daemon's pool and heap in
// these tests are far smaller.
size_t CountInMemory(pid_t pid, const std::vector<uint8_t>& marker) {
  std::ifstream maps("/proc/" + std::to_string(pid) + "/maps");
  const int fd = open(("/proc/" + std::to_string(pid) + "/mem").c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  size_t found = 0;
  std::string line;
  std::vector<uint8_t> buffer((1 << 20) + marker.size());
  while (std::getline(maps, line)) {
    unsigned long begin = 0;
    unsigned long end = 0;
    char perms[5] = {};
    if (std::sscanf(line.c_str(), "%lx-%lx %4s", &begin, &end, perms) != 3 || perms[1] != 'w' ||
        end - begin > (1ul << 30)) {
      continue;
    }
    for (unsigned long at = begin; at < end; at += 1 << 20) {
      const size_t want = std::min<unsigned long>(buffer.size(), end - at);
      const ssize_t got = pread(fd, buffer.data(), want, static_cast<off_t>(at));
      if (got < static_cast<ssize_t>(marker.size())) continue;
      const auto stop = buffer.begin() + got;
      for (auto it = std::search(buffer.begin(), stop, marker.begin(), marker.end()); it != stop;
           it = std::search(it + 1, stop, marker.begin(), marker.end())) {
        // Count an occurrence once: the overlap belongs to the next window.
        if (static_cast<size_t>(it - buffer.begin()) < (1u << 20)) ++found;
      }
    }
  }
  close(fd);
  return found;
}

size_t OpenFds(pid_t pid) {
  size_t count = 0;
  for ([[maybe_unused]] const auto& entry :
       std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd")) {
    ++count;
  }
  return count;
}

// True if a new connection to `endpoint` is closed by the server without a byte of greeting,
// well before the handshake deadline (10 s) could have closed it.
bool ClosedWithoutGreeting(const Endpoint& endpoint) {
  const int fd = ConnectSocket(endpoint);
  REQUIRE_MESSAGE(fd >= 0, "connect: " << std::strerror(errno));
  SetReceiveTimeout(fd, 5000);
  uint8_t byte = 0;
  ssize_t n;
  do {
    n = recv(fd, &byte, 1, 0);
  } while (n < 0 && errno == EINTR);
  const bool closed = n == 0 || (n < 0 && errno == ECONNRESET);
  close(fd);
  return closed;
}

bool Alive(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("State:", 0) == 0) return line.find('Z') == std::string::npos;
  }
  return false;
}

// A daemon that serves an 8 MiB device and lends 8 MiB.
DaemonOptions DeviceAndLender() {
  DaemonOptions options;
  options.devices = {"d0:8M"};
  options.lend = "8M";
  // Raw test clients hold superpages and never move them: leave at once on SIGTERM.
  options.extra_args = {"--drain-deadline", "0"};
  return options;
}

DaemonOptions LenderOptions(const std::string& size, std::vector<std::string> extra = {}) {
  DaemonOptions options;
  options.devices = {};
  options.lend = size;
  // Raw test clients hold superpages and never move them: leave at once on SIGTERM.
  options.extra_args = {"--drain-deadline", "0"};
  options.extra_args.insert(options.extra_args.end(), extra.begin(), extra.end());
  return options;
}

uint64_t U64(const json& object, const char* key) { return object.at(key).get<uint64_t>(); }

// NBD connections open now, per the daemon's status.
uint64_t NbdConnections(const MemlendDaemon& daemon) {
  return U64(daemon.Status().at("nbd"), "connections");
}

// Waits until the connection of the harness's readiness probe is gone. (A daemon without
// "nbd" in its status is waited for a moment instead.)
void WaitNbdIdle(const MemlendDaemon& daemon) {
  const json status = daemon.Status();
  if (!status.contains("nbd") || status.at("nbd").is_null()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    return;
  }
  REQUIRE(Eventually([&] { return NbdConnections(daemon) == 0; }));
}

// A connected TCP socket to 127.0.0.1:port, with reads timing out after timeout_ms.
int ConnectTcp(int port, int timeout_ms = 5000) {
  Endpoint endpoint;
  endpoint.transport = Transport::kTcp;
  endpoint.port = port;
  const int fd = ConnectSocket(endpoint);
  REQUIRE_MESSAGE(fd >= 0, "connect to port " << port << ": " << std::strerror(errno));
  SetReceiveTimeout(fd, timeout_ms);
  return fd;
}

// Reads until end of stream (true) or an error or timeout (false), dropping what comes.
bool ReadsToEnd(int fd) {
  uint8_t scratch[4096];
  for (;;) {
    const ssize_t n = recv(fd, scratch, sizeof scratch, 0);
    if (n == 0) return true;
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno == ECONNRESET;
  }
}

// Checks that `fd` carries the lender's refusal of a borrower: a HELLO reply with tag 0 and
// status TOO_MANY_BORROWERS whose text contains `mentions`, then the end of the stream.
void CheckRefusedBorrower(int fd, const std::string& mentions) {
  std::optional<PeerMessage> refusal = ReadPeerMessage(fd);
  REQUIRE_MESSAGE(refusal.has_value(), "no refusal message from the lender");
  INFO("refusal text: " << refusal->Text());
  CHECK(refusal->header.magic == kPeerMagic);
  CHECK(refusal->header.type == (kHello | kReplyBit));
  CHECK(refusal->header.tag == 0);
  CHECK(refusal->header.status == kStatusTooManyBorrowers);
  CHECK(refusal->Text().find(mentions) != std::string::npos);
  CHECK(ReadsToEnd(fd));
}

constexpr uint32_t kPagesPerSuperpage = kSuperpageBytes / kPageSize;

std::vector<uint8_t> SecretPage(uint32_t index) {
  std::vector<uint8_t> page(kPageSize);
  const std::string secret = "SECRET-OF-A page " + std::to_string(index) + " ";
  for (size_t i = 0; i < page.size(); ++i) page[i] = static_cast<uint8_t>(secret[i % secret.size()]);
  return page;
}

uint32_t AllocSuperpage(RawPeerClient& client) {
  const std::optional<PeerMessage> reply = client.Call(kAllocSuperpage);
  REQUIRE(reply.has_value());
  REQUIRE_MESSAGE(reply->header.status == 0, "ALLOC_SUPERPAGE failed: " << reply->Text());
  const std::optional<uint32_t> sid = reply->As<uint32_t>();
  REQUIRE(sid.has_value());
  return *sid;
}

TEST_SUITE("security") {
  // The lender's memory is locked (mlockall) as root runs it; MADV_DONTNEED cannot drop
  // locked pages, and a lender that trusted it handed A's bytes to B.
  TEST_CASE("a superpage granted to the next borrower reads as zeros on a locked lender") {
    TempDir dir;
    // One superpage: whatever A held is what B is granted. A borrower whose connection dies
    // has its memory kept for --borrower-grace (1 s here), then zeroed and freed.
    MemlendDaemon lender(dir, LenderOptions("2M", {"--borrower-grace", "1"}), "lender");
    if (SanitizedBuild()) {
      MESSAGE("sanitized build: the lender runs unlocked (the locked case runs in the normal "
              "build)");
    } else {
      REQUIRE_MESSAGE(ProcStatusNumber(lender.pid(), "VmLck") >= kSuperpageBytes / 1024,
                      "the lender did not lock its memory (run the tests as root); stderr: "
                          << lender.StderrText());
    }
    std::string how;
    SUBCASE("A frees its superpage") { how = "free"; }
    SUBCASE("A's connection dies") { how = "die"; }
    SUBCASE("A cached pages in an ephemeral pool") { how = "ephemeral"; }
    INFO("A " << how);
    {
      RawPeerClient a(lender.listen_port());
      REQUIRE(a.Hello(0xa));
      if (how == "ephemeral") {
        for (uint32_t i = 0; i < kPagesPerSuperpage; ++i) {
          const HandleBody handle{1, i, 7};
          const std::optional<PeerMessage> reply =
              a.Call(kPut, BytesOf(handle), SecretPage(i), kPeerVersion, kPutEphemeral);
          REQUIRE(reply.has_value());
          REQUIRE(reply->header.status == 0);
        }
      } else {
        const uint32_t sid = AllocSuperpage(a);
        for (uint32_t i = 0; i < kPagesPerSuperpage; ++i) {
          const RangeBody range{sid, i * static_cast<uint32_t>(kPageSize),
                                static_cast<uint32_t>(kPageSize), 0};
          const std::optional<PeerMessage> reply = a.Call(kWrite, BytesOf(range), SecretPage(i));
          REQUIRE(reply.has_value());
          REQUIRE(reply->header.status == 0);
        }
        if (how == "free") {
          const std::optional<PeerMessage> reply = a.Call(kFreeSuperpage, BytesOf(sid));
          REQUIRE(reply.has_value());
          REQUIRE(reply->header.status == 0);
        }
      }
    }
    REQUIRE(Eventually([&] { return U64(lender.Status().at("lending"), "used_bytes") == 0; }));

    RawPeerClient b(lender.listen_port());
    REQUIRE(b.Hello(0xb));
    if (how == "ephemeral") {
      // B names A's handle in its own pool: there is nothing of A's to find.
      const HandleBody handle{1, 0, 7};
      const std::optional<PeerMessage> reply = b.Call(kGet, BytesOf(handle));
      REQUIRE(reply.has_value());
      CHECK(reply->header.status == kStatusNotFound);
      CHECK(reply->payload.empty());
    }
    const uint32_t sid = AllocSuperpage(b);
    const RangeBody whole{sid, 0, static_cast<uint32_t>(kSuperpageBytes), 0};
    const std::optional<PeerMessage> read = b.Call(kRead, BytesOf(whole));
    REQUIRE(read.has_value());
    REQUIRE(read->header.status == 0);
    REQUIRE(read->payload.size() == kSuperpageBytes);
    const size_t nonzero = static_cast<size_t>(
        std::count_if(read->payload.begin(), read->payload.end(), [](uint8_t b) { return b != 0; }));
    const std::string text(read->payload.begin(), read->payload.begin() + 32);
    CHECK_MESSAGE(nonzero == 0, nonzero << " bytes of the new superpage are not zero; it starts "
                                        << "with '" << text << "'");
    CHECK_MESSAGE(lender.Stop() == 0, lender.StderrText());
  }

  TEST_CASE("connections that never say HELLO cost little and end at the deadline; those past "
            "--max-borrowers are told why") {
    TempDir dir;
    MemlendDaemon lender(dir, LenderOptions("16M"), "lender");
    const uint64_t before_kib = HeldKiB(lender.pid());
    constexpr int kConnections = 300;
    constexpr int kMaxBorrowers = 32;  // the default
    std::vector<int> fds;
    for (int i = 0; i < kConnections; ++i) fds.push_back(ConnectTcp(lender.listen_port(), 15'000));
    // Every connection is accepted: the first ones as sessions, the rest refused at once.
    REQUIRE(Eventually([&] {
      return U64(lender.Status().at("lending"), "sessions") == kMaxBorrowers;
    }));
    const uint64_t during_kib = HeldKiB(lender.pid());
    INFO("held before: " << before_kib << " KiB, with " << kConnections
                         << " silent connections: " << during_kib << " KiB");
    // A thread's stack and 8 KiB of buffers each, not the 6.3 MiB of a session after HELLO.
    CheckHeldBelow(during_kib, before_kib + kMaxBorrowers * 1536 + 16 * 1024);

    // The connections past the limit were answered with the reason and closed; the sessions
    // are closed by the lender at the HELLO deadline (5 s).
    int refused = 0;
    int timed_out = 0;
    for (int fd : fds) {
      std::optional<PeerMessage> message = ReadPeerMessage(fd);
      if (message) {
        ++refused;
        CHECK(message->header.tag == 0);
        CHECK(message->header.status == kStatusTooManyBorrowers);
        CHECK(message->Text().find("--max-borrowers") != std::string::npos);
        CHECK(ReadsToEnd(fd));
      } else {
        ++timed_out;  // closed without a word: a session that never said HELLO
      }
      close(fd);
    }
    CHECK(refused == kConnections - kMaxBorrowers);
    CHECK(timed_out == kMaxBorrowers);
    CHECK(Eventually([&] { return U64(lender.Status().at("lending"), "sessions") == 0; }));
    CHECK(lender.StderrText().find("--max-borrowers") != std::string::npos);

    // And the lender serves the next borrower as ever.
    RawPeerClient client(lender.listen_port());
    CHECK(client.Hello());
    CHECK_MESSAGE(lender.Stop() == 0, lender.StderrText());
  }

  TEST_CASE("a request bigger than the small buffer before HELLO is refused and hung up") {
    TempDir dir;
    MemlendDaemon lender(dir, LenderOptions("4M"), "lender");
    const int fd = ConnectTcp(lender.listen_port());
    const RangeBody range{1, 0, static_cast<uint32_t>(kSuperpageBytes), 0};
    const std::vector<uint8_t> data(kSuperpageBytes, 0xab);
    SendPeerMessage(fd, kWrite, 9, BytesOf(range), data);
    std::optional<PeerMessage> reply = ReadPeerMessage(fd);
    REQUIRE(reply.has_value());
    CHECK(reply->header.tag == 9);
    CHECK(reply->header.status == kStatusProtocol);
    CHECK(reply->Text().find("HELLO") != std::string::npos);
    CHECK(ReadsToEnd(fd));
    close(fd);
    CHECK_MESSAGE(lender.Stop() == 0, lender.StderrText());
  }

  TEST_CASE("--max-lend-per-borrower: a client that grabs superpages gets its share only, and "
            "the real borrower still places its pages there") {
    TempDir dir;
    MemlendDaemon lender(dir, LenderOptions("16M", {"--max-lend-per-borrower", "4M"}), "lender");
    RawPeerClient grabber(lender.listen_port());
    REQUIRE(grabber.Hello(0x1234));
    int granted = 0;
    for (int i = 0; i < 8; ++i) {
      const std::optional<PeerMessage> reply = grabber.Call(kAllocSuperpage);
      REQUIRE(reply);
      if (reply->header.status != 0) {
        CHECK(reply->Text().find("--max-lend-per-borrower") != std::string::npos);
        break;
      }
      ++granted;
    }
    CHECK(granted == 2);  // 4 MiB in 2 MiB superpages

    DaemonOptions options;
    options.devices = {"d0:8M"};
    options.local_store = "2M";
    options.backing_file = dir.File("backing.img");
    options.peers = {lender.ListenAddress()};
    options.extra_args = {"--redundancy", "none"};  // pages to the lender first, then the file
    MemlendDaemon borrower(dir, options, "borrower");
    {
      NbdClient client(borrower.endpoint(), "d0");
      std::mt19937_64 rng(3);
      std::vector<uint8_t> data(8 << 20);
      for (uint8_t& byte : data) byte = static_cast<uint8_t>(rng());
      client.Write(data, 0);
      std::vector<uint8_t> back(data.size());
      client.Read(back, 0);
      CHECK(back == data);
    }
    const uint64_t on_lender = U64(borrower.Status().at("peers").at(0), "pages_stored");
    INFO("pages the borrower keeps on the lender: " << on_lender);
    CHECK(on_lender > 0);
    CHECK(on_lender <= 1024);  // its own 4 MiB at most
    // The lender accounts for each borrower node.
    const json by_borrower = lender.Status().at("lending").at("by_borrower");
    INFO("by_borrower: " << by_borrower.dump());
    REQUIRE(by_borrower.size() == 2);
    for (const json& node : by_borrower) {
      CHECK(U64(node, "sessions") == 1);
      // The grabber holds its two superpages; the borrower its pages there (its clean pages
      // cached in the ephemeral pool count too: they are evicted for anyone's allocation).
      if (node.at("node_id") == "0000000000001234") CHECK(U64(node, "pages") == 1024);
      else CHECK(U64(node, "pages") >= on_lender);
    }
    CHECK(U64(lender.Status().at("lending"), "max_lend_per_borrower_bytes") == (4u << 20));
    CHECK_MESSAGE(borrower.Stop() == 0, borrower.StderrText());
    CHECK_MESSAGE(lender.Stop() == 0, lender.StderrText());
  }

  TEST_CASE("--seal-pages: a lender's memory holds no page a sealed borrower wrote, while an "
            "unsealed borrower's pages are there to be found") {
    TempDir dir;
    MemlendDaemon lender(dir, LenderOptions("32M"), "lender");
    // Pages that do not compress, each with its borrower's 16-byte marker at a few places.
    const auto write_marked = [&](MemlendDaemon& borrower, uint8_t tag) {
      std::mt19937_64 rng(tag);
      std::vector<uint8_t> marker(16);  // random: no marker is part of the other's
      for (uint8_t& byte : marker) byte = static_cast<uint8_t>(rng());
      std::vector<uint8_t> data(6 << 20);
      for (uint8_t& byte : data) byte = static_cast<uint8_t>(rng());
      for (size_t page = 0; page < data.size(); page += 4096) {
        for (size_t at : {0, 1000, 3000}) std::copy(marker.begin(), marker.end(), &data[page + at]);
      }
      NbdClient client(borrower.endpoint(), "d0");
      client.Write(data, 0);
      std::vector<uint8_t> back(data.size());
      client.Read(back, 0);
      CHECK(back == data);
      return marker;
    };
    DaemonOptions options;
    options.devices = {"d0:8M"};
    options.local_store = "2M";
    options.peers = {lender.ListenAddress()};
    options.extra_args = {"--redundancy", "none", "--seal-pages"};
    MemlendDaemon sealed(dir, options, "sealed");
    options.extra_args = {"--redundancy", "none"};
    MemlendDaemon plain(dir, options, "plain");
    const std::vector<uint8_t> sealed_marker = write_marked(sealed, 1);
    const std::vector<uint8_t> plain_marker = write_marked(plain, 2);
    const json remote = sealed.Status().at("remote_store");
    INFO("sealed borrower's remote store: " << remote.dump());
    CHECK(remote.at("sealed") == true);
    CHECK(U64(sealed.Status().at("peers").at(0), "pages_stored") > 1000);
    CHECK(U64(plain.Status().at("peers").at(0), "pages_stored") > 1000);
    const size_t plain_found = CountInMemory(lender.pid(), plain_marker);
    const size_t sealed_found = CountInMemory(lender.pid(), sealed_marker);
    MESSAGE("in the lender's memory: the unsealed borrower's marker " << plain_found
                                                                      << " times, the sealed one's "
                                                                      << sealed_found);
    CHECK(plain_found > 1000);  // the scan finds what is there
    CHECK(sealed_found == 0);
    CHECK(U64(remote, "integrity_failures") == 0);
    CHECK_MESSAGE(sealed.Stop() == 0, sealed.StderrText());
    CHECK_MESSAGE(plain.Stop() == 0, plain.StderrText());
    CHECK_MESSAGE(lender.Stop() == 0, lender.StderrText());
  }

  TEST_CASE("a borrower that a full lender refuses shows why, and gets in once there is room") {
    TempDir dir;
    MemlendDaemon lender(dir, LenderOptions("16M", {"--max-borrowers", "1"}), "lender");
    auto holder = std::make_unique<RawPeerClient>(lender.listen_port());
    REQUIRE(holder->Hello());

    DaemonOptions options;
    options.devices = {"d0:8M"};
    options.local_store = "4M";
    options.peers = {lender.ListenAddress()};
    MemlendDaemon borrower(dir, options, "borrower");
    json peer = borrower.Status().at("peers").at(0);
    INFO("peer: " << peer.dump());
    CHECK(peer.at("state") == "down");
    CHECK(peer.at("error").get<std::string>().find("too many borrowers") != std::string::npos);
    CHECK(peer.at("error").get<std::string>().find("--max-borrowers") != std::string::npos);

    holder.reset();  // room for one
    CHECK(Eventually([&] {
      peer = borrower.Status().at("peers").at(0);
      return peer.at("state") == "up";
    }));
    CHECK_MESSAGE(borrower.Stop() == 0, borrower.StderrText());
    CHECK_MESSAGE(lender.Stop() == 0, lender.StderrText());
  }

  TEST_CASE("finished sessions and NBD connections are reaped when they end") {
    TempDir dir;
    MemlendDaemon daemon(dir, DeviceAndLender());
    // Let the readiness probe's connection go first.
    WaitNbdIdle(daemon);
    const size_t fds_before = OpenFds(daemon.pid());
    {
      std::vector<std::unique_ptr<RawPeerClient>> borrowers;
      std::vector<std::unique_ptr<NbdClient>> clients;
      for (int i = 0; i < 20; ++i) {
        borrowers.push_back(std::make_unique<RawPeerClient>(daemon.listen_port()));
        REQUIRE(borrowers.back()->Hello());
        clients.push_back(std::make_unique<NbdClient>(daemon.endpoint(), "d0"));
      }
      const json status = daemon.Status();
      CHECK(U64(status.at("lending"), "sessions") == 20);
      CHECK(U64(status.at("nbd"), "connections") == 20);
      CHECK(OpenFds(daemon.pid()) >= fds_before + 40);
    }
    // No new connection comes to reap them: they go by themselves.
    CHECK(Eventually([&] {
      const json status = daemon.Status();
      return U64(status.at("lending"), "sessions") == 0 &&
             U64(status.at("nbd"), "connections") == 0 && OpenFds(daemon.pid()) == fds_before;
    }));
    CHECK(OpenFds(daemon.pid()) == fds_before);
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }

  TEST_CASE("NBD connections past --max-connections are closed at once; a silent or slow "
            "handshake ends at its deadline") {
    TempDir dir;
    DaemonOptions options;
    options.devices = {"d0:8M"};
    options.extra_args = {"--max-connections", "4"};
    MemlendDaemon daemon(dir, options);
    WaitNbdIdle(daemon);
    CHECK(U64(daemon.Status().at("nbd"), "max_connections") == 4);
    std::vector<std::unique_ptr<RawNbdClient>> silent;
    for (int i = 0; i < 3; ++i) {
      silent.push_back(std::make_unique<RawNbdClient>(daemon.endpoint()));
      silent.back()->ReadGreeting();
    }
    // The fourth dribbles a valid handshake a byte at a time, too slowly to finish in 10 s.
    std::atomic<bool> dribbler_cut_off = false;
    std::thread dribbler([&] {
      RawNbdClient slow(daemon.endpoint());
      slow.ReadGreeting();
      std::vector<uint8_t> bytes = {0, 0, 0, 3};  // client flags
      const uint8_t option[] = {'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T', 0, 0, 0, 7, 0, 0, 0, 100};
      bytes.insert(bytes.end(), std::begin(option), std::end(option));
      bytes.resize(bytes.size() + 100, 0);
      const int fd_limit_s = 40;
      const auto give_up = Clock::now() + std::chrono::seconds(fd_limit_s);
      for (size_t i = 0; i < bytes.size() && Clock::now() < give_up; ++i) {
        try {
          slow.SendBytes(std::span(&bytes[i], 1));
        } catch (const std::exception&) {
          dribbler_cut_off = true;  // the server hung up
          return;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(400));
      }
    });
    REQUIRE(Eventually([&] { return U64(daemon.Status().at("nbd"), "connections") == 4; }));
    CHECK_MESSAGE(ClosedWithoutGreeting(daemon.endpoint()), "a fifth connection was served");
    CHECK(U64(daemon.Status().at("nbd"), "connections") == 4);
    CHECK(daemon.StderrText().find("--max-connections") != std::string::npos);

    // The silent ones are hung up at the handshake deadline (10 s), the slow one as well.
    for (auto& client : silent) CHECK(client->WaitForClose());
    dribbler.join();
    CHECK(dribbler_cut_off);
    CHECK(Eventually([&] { return U64(daemon.Status().at("nbd"), "connections") == 0; }));
    NbdClient client(daemon.endpoint(), "d0");
    CHECK(client.Size() == 8 * kMiB);
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }

  TEST_CASE("a flood of NBD connections held in the handshake takes at most 64 threads") {
    TempDir dir;
    DaemonOptions options;
    options.devices = {"d0:8M"};
    MemlendDaemon daemon(dir, options);
    WaitNbdIdle(daemon);
    const uint64_t before_kib = HeldKiB(daemon.pid());
    const uint64_t threads_before = ProcStatusNumber(daemon.pid(), "Threads");
    constexpr int kConnections = 300;
    constexpr int kMaxConnections = 64;  // the default
    std::vector<std::unique_ptr<RawNbdClient>> clients;
    for (int i = 0; i < kConnections; ++i) {
      clients.push_back(std::make_unique<RawNbdClient>(daemon.endpoint()));
    }
    REQUIRE(Eventually([&] { return NbdConnections(daemon) == kMaxConnections; }));
    const uint64_t during_kib = HeldKiB(daemon.pid());
    INFO("held before: " << before_kib << " KiB, with " << kConnections
                         << " connections in the handshake: " << during_kib << " KiB");
    CHECK(ProcStatusNumber(daemon.pid(), "Threads") == threads_before + kMaxConnections);
    CheckHeldBelow(during_kib, before_kib + kMaxConnections * 1536 + 16 * 1024);
    // The ones past the limit were closed at once, without a greeting.
    int greeted = 0;
    for (auto& client : clients) {
      try {
        client->ReadGreeting();
        ++greeted;
      } catch (const std::exception&) {
      }
    }
    CHECK(greeted == kMaxConnections);
    clients.clear();
    CHECK(Eventually([&] { return NbdConnections(daemon) == 0; }));
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }

  TEST_CASE("the memory of ended NBD connections goes back to the system") {
    TempDir dir;
    DaemonOptions options;
    options.devices = {"d0:8M"};
    options.extra_args = {"--max-connections", "200"};
    MemlendDaemon daemon(dir, options);
    WaitNbdIdle(daemon);
    const uint64_t before_kib = HeldKiB(daemon.pid());
    constexpr int kConnections = 150;
    {
      std::vector<std::unique_ptr<NbdClient>> clients;
      for (int i = 0; i < kConnections; ++i) {
        clients.push_back(std::make_unique<NbdClient>(daemon.endpoint(), "d0"));
      }
      REQUIRE(U64(daemon.Status().at("nbd"), "connections") == kConnections);
      if (!SanitizedBuild()) {
        // Each took its 1 MiB input and 1 MiB reply buffers (and a stack), locked.
        CHECK(HeldKiB(daemon.pid()) >= before_kib + kConnections * 2048);
      }
    }
    WaitNbdIdle(daemon);
    const uint64_t after_kib = HeldKiB(daemon.pid());
    INFO("held before: " << before_kib << " KiB, after " << kConnections
                         << " connections came and went: " << after_kib << " KiB");
    // What stays is the C library's cache of thread stacks (at most 40 MiB) and small change.
    CheckHeldBelow(after_kib, before_kib + 48 * 1024);
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }

  TEST_CASE("32 MiB WRITEs and READs are served in pieces: data round-trips, memory stays small") {
    TempDir dir;
    DaemonOptions options;
    options.devices = {"big:64M", "small:64M"};
    options.local_store = "48M";
    MemlendDaemon daemon(dir, options);
    WaitNbdIdle(daemon);
    RawNbdClient client(daemon.endpoint());
    client.HandshakeWithGo("big");
    const uint64_t before_kib = HeldKiB(daemon.pid());
    std::mt19937_64 rng(TestSeed());
    constexpr uint32_t kLength = 32 * kMiB;  // the largest request the server takes
    std::vector<uint8_t> data(kLength);
    FillRandom(rng, data);
    const uint64_t offset = 4 * kMiB + 1;  // pieces that do not start on a page
    CHECK(client.Write(offset, data, 1) == 0);
    CHECK(client.Read(offset, kLength, 2) == data);
    const std::vector<uint8_t> middle(data.begin() + 3 * kMiB, data.begin() + 6 * kMiB + 5);
    CHECK(client.Read(offset + 3 * kMiB, static_cast<uint32_t>(middle.size()), 3) == middle);
    // Past the end: refused, the payload read and dropped, the stream still in step; also
    // where offset + length wraps around 2^64.
    CHECK(client.Write(60 * kMiB, std::span(data).first(8 * kMiB), 4) == nbd_wire::NBD_ENOSPC);
    CHECK(client.Write(0xfffffffffffff000ULL, std::span(data).first(2 * kMiB), 40) ==
          nbd_wire::NBD_ENOSPC);
    CHECK(client.Write(0xffffffffffffff9bULL, std::span(data).first(2 * kMiB), 41) ==
          nbd_wire::NBD_ENOSPC);
    CHECK(client.Read(offset, 4096, 5) == std::vector<uint8_t>(data.begin(), data.begin() + 4096));
    const uint64_t after_kib = HeldKiB(daemon.pid());
    INFO("held before: " << before_kib << " KiB, after: " << after_kib << " KiB");
    // The connection took no room for the 32 MiB requests (the store's pages were locked,
    // and so resident, from the start).
    CheckHeldBelow(after_kib, before_kib + 16 * 1024);

    // A large write that fails part way (the local store is full, and there is no disk)
    // gets its error, and the stream stays in step.
    RawNbdClient second(daemon.endpoint());
    second.HandshakeWithGo("small");
    FillRandom(rng, data);
    CHECK(second.Write(0, data, 6) == nbd_wire::NBD_ENOSPC);
    CHECK(second.Read(0, 4096, 7).size() == 4096);
    CHECK(client.Read(offset, kLength, 8).size() == kLength);
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }

  TEST_CASE("a thread that cannot be started refuses that one connection; the daemon goes on") {
    if (SanitizedBuild()) {
      MESSAGE("SKIPPED: a sanitized build reserves terabytes of address space, so it cannot run "
              "under the address-space limit this test sets");
      return;
    }
    if (access("/usr/bin/prlimit", X_OK) != 0) {
      MESSAGE("SKIPPED: /usr/bin/prlimit (util-linux) is missing");
      return;
    }
    TempDir dir;
    MemlendDaemon daemon(dir, DeviceAndLender());
    WaitNbdIdle(daemon);
    // Connections that take every thread stack the C library keeps for reuse, so that the
    // next thread needs a new mapping.
    std::vector<std::unique_ptr<NbdClient>> holders;
    for (int i = 0; i < 48; ++i) {
      holders.push_back(std::make_unique<NbdClient>(daemon.endpoint(), "d0"));
    }
    const std::string pid = std::to_string(daemon.pid());
    const uint64_t vm_kib = ProcStatusNumber(daemon.pid(), "VmSize");
    // Room for small mappings, not for a thread's stack.
    const std::string limit = std::to_string((vm_kib + 256) * 1024);
    CommandResult set = RunCommand({"/usr/bin/prlimit", "--pid", pid, "--as=" + limit + ":"});
    REQUIRE_MESSAGE(set.exit_status == 0, set.stderr_text);

    CHECK_MESSAGE(ClosedWithoutGreeting(daemon.endpoint()),
                  "an NBD connection was served without a thread to serve it");
    {
      const int fd = ConnectTcp(daemon.listen_port());
      CheckRefusedBorrower(fd, "thread");
      close(fd);
    }
    CHECK(Alive(daemon.pid()));

    CommandResult reset = RunCommand({"/usr/bin/prlimit", "--pid", pid, "--as=unlimited:"});
    REQUIRE_MESSAGE(reset.exit_status == 0, reset.stderr_text);
    holders.clear();
    NbdClient client(daemon.endpoint(), "d0");
    CHECK(client.Size() == 8 * kMiB);
    RawPeerClient borrower(daemon.listen_port());
    CHECK(borrower.Hello());
    const std::string log = daemon.StderrText();
    CHECK(log.find("refused a connection: cannot start a thread for it") != std::string::npos);
    CHECK(log.find("refused a borrower: the lender cannot start a thread") != std::string::npos);
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }

  TEST_CASE("unix sockets get the mode asked for, whatever the umask") {
    TempDir dir;
    const auto mode_of = [](const std::string& path) {
      struct stat st {};
      REQUIRE_MESSAGE(lstat(path.c_str(), &st) == 0, path << ": " << std::strerror(errno));
      CHECK(S_ISSOCK(st.st_mode));
      return st.st_mode & 07777;
    };
    const auto group_of = [](const std::string& path) {
      struct stat st {};
      REQUIRE(lstat(path.c_str(), &st) == 0);
      return st.st_gid;
    };
    struct Umask {
      explicit Umask(mode_t mask) : old(umask(mask)) {}
      ~Umask() { umask(old); }
      mode_t old;
    };
    SUBCASE("umask 000: every socket is 0600") {
      Umask open_mask(0);
      DaemonOptions options;
      options.devices = {"d0:8M"};
      options.lend = "8M";
      options.listen_unix = dir.File("lender.sock");
      MemlendDaemon daemon(dir, options);
      CHECK(mode_of(daemon.endpoint().socket_path) == 0600);
      CHECK(mode_of(daemon.control_path()) == 0600);
      CHECK(mode_of(options.listen_unix) == 0600);
      CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
    }
    SUBCASE("umask 077: --socket-mode 0660 --socket-group widen the NBD socket") {
      Umask closed_mask(077);
      // A group the socket may be given: as root any; otherwise one of ours.
      const gid_t group = geteuid() == 0 ? 6 : getegid();
      DaemonOptions options;
      options.devices = {"d0:8M"};
      options.extra_args = {"--socket-mode", "0660", "--socket-group", std::to_string(group)};
      MemlendDaemon daemon(dir, options);
      CHECK(mode_of(daemon.endpoint().socket_path) == 0660);
      CHECK(group_of(daemon.endpoint().socket_path) == group);
      CHECK(mode_of(daemon.control_path()) == 0600);
      CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
    }
  }

  TEST_CASE("a device larger than the host can hold a page table for is refused at attach") {
    TempDir dir;
    DaemonOptions options;
    options.devices = {};
    options.local_store = "8M";
    // A daemon for attached devices only: --local-store and no --device.
    options.extra_args = {"--local-store", "8M"};
    MemlendDaemon daemon(dir, options);
    // 16 TiB: a 64 GiB page table, more than any machine these tests run on.
    const CommandResult result = RunCommand({MemlendBinary(), "attach", "huge", "--size", "16T",
                                             "--control", daemon.control_path()});
    INFO("stderr: " << result.stderr_text);
    CHECK(result.exit_status == 1);
    CHECK(result.stderr_text.find("page table") != std::string::npos);
    CHECK(result.stderr_text.find("can hold") != std::string::npos);
    CHECK(daemon.Status().at("devices").empty());
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }
}

}  // namespace
}  // namespace memlend::integration
