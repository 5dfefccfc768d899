// Integration tests of lending and borrowing RAM between daemons: real `memlend daemon`
// lenders (--lend/--listen) and borrowers (--peer) on 127.0.0.1, driven through libnbd, with the
// placement of pages checked in `memlend status --json` of every daemon involved.
//
// Eviction to peers runs in a background thread and borrowers query their peers every 2 s, so
// placement is checked only after polling (WaitEvictionSettled, Eventually) with a bounded wait;
// data is checked at once, since a read must return the right bytes wherever the page is.
//
// The tests that speak the peer protocol raw use raw_peer_client.h, which restates the wire
// layout from docs/peer-protocol.md.

#include <arpa/inet.h>
#include <doctest/doctest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "harness.h"
#include "raw_peer_client.h"

namespace memlend::integration {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Status helpers

uint64_t U64(const json& object, const char* key) { return object.at(key).get<uint64_t>(); }

// The peers[] entry with the given address; throws if there is none.
const json& PeerEntry(const json& status, const std::string& address) {
  for (const json& peer : status.at("peers")) {
    if (peer.at("address") == address) return peer;
  }
  throw std::runtime_error("status has no peer " + address + ": " + status.at("peers").dump());
}

uint64_t SumOverPeers(const json& status, const char* key) {
  uint64_t sum = 0;
  for (const json& peer : status.at("peers")) sum += U64(peer, key);
  return sum;
}

uint64_t LendingUsed(const MemlendDaemon& lender) {
  return U64(lender.Status().at("lending"), "used_bytes");
}

// Waits (at most 10 s) until a borrower's evictor is done: its local store is at or under the
// high watermark and no page moved between two status snapshots 300 ms apart. CHECKs that it
// settled and returns the last status.
json WaitEvictionSettled(const MemlendDaemon& daemon, uint64_t high_watermark_pct = 90) {
  auto placement = [](const json& status) {
    json summary = json::array();
    for (const json& device : status.at("devices")) summary.push_back(device.at("pages"));
    summary.push_back(status.at("local_store").at("evicted_pages"));
    summary.push_back(status.at("remote_store"));
    return summary;
  };
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  json before = daemon.Status();
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    json after = daemon.Status();
    const json& local = after.at("local_store");
    const bool under_high =
        U64(local, "used_bytes") * 100 <= U64(local, "total_bytes") * high_watermark_pct;
    if (under_high && placement(before) == placement(after)) return after;
    if (Clock::now() >= deadline) {
      FAIL_CHECK("eviction did not settle within 10 s; status: " << after.dump());
      return after;
    }
    before = std::move(after);
  }
}

// ---------------------------------------------------------------------------------------------
// Data helpers

// Writes random data over [offset, offset + length) in chunks of chunk_size, then `unaligned`
// writes of 1 byte to 3 pages at random unaligned offsets inside the same range.
void WriteRandomRange(NbdClient& client, ShadowDevice& shadow, std::mt19937_64& rng,
                      uint64_t offset, uint64_t length, uint64_t chunk_size, int unaligned) {
  std::vector<uint8_t> data;
  for (uint64_t done = 0; done < length; done += data.size()) {
    data.resize(std::min(chunk_size, length - done));
    FillRandom(rng, data);
    client.Write(data, offset + done);
    shadow.Write(offset + done, data);
  }
  for (int i = 0; i < unaligned; ++i) {
    data.resize(RandomIn(rng, 1, 3 * kPageSize));
    FillRandom(rng, data);
    uint64_t at = offset + RandomIn(rng, 0, length - data.size());
    if (at % kPageSize == 0 && at + 1 + data.size() <= offset + length) ++at;
    client.Write(data, at);
    shadow.Write(at, data);
  }
}

// A fake lender that answers every HELLO with a reply header of another protocol version and
// hangs up. It listens on a free port of 127.0.0.1 and serves connections one after another on
// its own thread until destroyed.
class FakeLender {
 public:
  explicit FakeLender(uint16_t reply_version) : reply_version_(reply_version) {
    listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listen_fd_ < 0) throw std::runtime_error("socket: " + std::string(std::strerror(errno)));
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t length = sizeof address;
    if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
        listen(listen_fd_, 16) != 0 ||
        getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
      std::string error = std::strerror(errno);
      close(listen_fd_);
      throw std::runtime_error("fake lender: bind/listen: " + error);
    }
    port_ = ntohs(address.sin_port);
    thread_ = std::thread([this] { Serve(); });
  }
  ~FakeLender() {
    stop_ = true;
    thread_.join();
    close(listen_fd_);
  }
  FakeLender(const FakeLender&) = delete;
  FakeLender& operator=(const FakeLender&) = delete;

  std::string Address() const { return "127.0.0.1:" + std::to_string(port_); }
  // HELLO requests answered so far.
  int hellos() const { return hellos_.load(); }
  // Set if any request was not a version-1 HELLO with a 24-byte body.
  bool saw_unexpected_request() const { return unexpected_.load(); }

 private:
  void Serve() {
    while (!stop_) {
      pollfd listening{listen_fd_, POLLIN, 0};
      if (poll(&listening, 1, 100) <= 0) continue;
      int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      SetReceiveTimeout(fd, 2000);
      std::optional<PeerMessage> request = ReadPeerMessage(fd);
      if (request) {
        const PeerHeader& h = request->header;
        if (h.magic != kPeerMagic || h.version != kPeerVersion || h.type != kHello ||
            h.payload_bytes != sizeof(HelloBody)) {
          unexpected_ = true;
        }
        SendPeerMessage(fd, kHello | kReplyBit, h.tag, {}, {}, reply_version_);
        ++hellos_;
      }
      close(fd);
    }
  }

  const uint16_t reply_version_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_ = false;
  std::atomic<int> hellos_ = 0;
  std::atomic<bool> unexpected_ = false;
  std::thread thread_;
};

// ---------------------------------------------------------------------------------------------
// Daemon setups

// A lender that leaves at once on SIGTERM (--drain-deadline 0): tests stop lenders while
// borrowers that have nowhere else to put their pages still hold some. The drain test sets a
// deadline of its own.
DaemonOptions Lender(const std::string& size, int listen_port = 0) {
  DaemonOptions options;
  options.devices = {};
  options.lend = size;
  options.listen_port = listen_port;
  options.extra_args = {"--drain-deadline", "0"};
  return options;
}

DaemonOptions Borrower(const std::string& device, const std::string& local_store,
                       std::vector<std::string> peers) {
  DaemonOptions options;
  options.devices = {device};
  options.local_store = local_store;
  options.compress = "none";
  options.peers = std::move(peers);
  return options;
}

// `count` lenders of `size` in `dir`, named lender0, lender1...; `extra` replaces Lender()'s
// extra arguments when given.
std::vector<std::unique_ptr<MemlendDaemon>> StartLenders(const TempDir& dir, int count,
                                                         const std::string& size,
                                                         std::vector<std::string> extra = {}) {
  std::vector<std::unique_ptr<MemlendDaemon>> lenders;
  for (int i = 0; i < count; ++i) {
    DaemonOptions options = Lender(size);
    if (!extra.empty()) options.extra_args = extra;
    lenders.push_back(std::make_unique<MemlendDaemon>(dir, options, "lender" + std::to_string(i)));
  }
  return lenders;
}

std::vector<std::string> ListenAddresses(
    const std::vector<std::unique_ptr<MemlendDaemon>>& lenders) {
  std::vector<std::string> addresses;
  for (const auto& lender : lenders) addresses.push_back(lender->ListenAddress());
  return addresses;
}

// A number of status's remote_store.
uint64_t RemoteField(const json& status, const char* key) {
  return U64(status.at("remote_store"), key);
}

// Writes random data over [0, bytes) of `client`'s device (recorded in `shadow`), then waits
// for the borrower's eviction to settle; returns that status.
json WriteAndSettle(NbdClient& client, ShadowDevice& shadow, uint64_t seed, uint64_t bytes,
                    const MemlendDaemon& borrower) {
  std::mt19937_64 rng(seed);
  WriteRandomRange(client, shadow, rng, 0, bytes, 256 * kKiB, 0);
  return WaitEvictionSettled(borrower);
}

// `memlend drain --deadline 20` of `lender`.
CommandResult Drain(const MemlendDaemon& lender) {
  return RunCommand(
      {MemlendBinary(), "drain", "--deadline", "20", "--control", lender.control_path()});
}

// What reading [0, length) page by page gave: EIO, another error, or other bytes than written.
struct PageReads {
  uint64_t eio = 0;
  uint64_t other_errors = 0;
  uint64_t wrong = 0;
};
PageReads ReadPages(NbdClient& client, const ShadowDevice& shadow, uint64_t length) {
  PageReads reads;
  std::vector<uint8_t> page(kPageSize);
  for (uint64_t offset = 0; offset < length; offset += kPageSize) {
    const int rc = client.TryRead(page, offset);
    if (rc == EIO) {
      ++reads.eio;
    } else if (rc != 0) {
      ++reads.other_errors;
    } else if (!DescribeMismatch(shadow.Range(offset, kPageSize), page, offset).empty()) {
      ++reads.wrong;
    }
  }
  return reads;
}

// Checks that the remote accounting of a settled borrower agrees with itself and with its
// lenders: remote pages = remote_store.pages, remote_store.copies = sum of peers[].pages_stored
// (copies per page as the redundancy asks: remote_store.degraded_pages counts pages with
// fewer), and sum over lenders
// of lending.used_bytes = remote_store.used_bytes = sum of peers[].superpages_held * 2 MiB. The
// lenders' figures and the borrower's are separate snapshots, so this polls (at most 5 s) until
// they agree and CHECKs the last snapshots.
void CheckRemoteAccounting(const MemlendDaemon& borrower,
                           const std::vector<const MemlendDaemon*>& lenders) {
  json status;
  uint64_t lent = 0;
  auto agrees = [&] {
    status = borrower.Status();
    lent = 0;
    for (const MemlendDaemon* lender : lenders) lent += LendingUsed(*lender);
    const json& remote = status.at("remote_store");
    return U64(remote, "copies") == SumOverPeers(status, "pages_stored") &&
           U64(remote, "used_bytes") == lent &&
           U64(remote, "used_bytes") == SumOverPeers(status, "superpages_held") * kSuperpageBytes;
  };
  Eventually(agrees, 5000);
  INFO("borrower status: " << status.dump());
  CheckStatusInvariants(status);
  const json& remote = status.at("remote_store");
  uint64_t remote_pages = 0;
  for (const json& device : status.at("devices")) {
    // Pages fetched ahead into the local store keep their remote slots.
    remote_pages += U64(device.at("pages"), "remote") + U64(device.at("pages"), "remote_copies");
  }
  // No peer went down while holding pages, so none are lost and every remote page is stored.
  CHECK(remote.value("lost_pages", uint64_t{0}) == 0);
  CHECK(U64(remote, "pages") == remote_pages);
  CHECK(U64(remote, "copies") == SumOverPeers(status, "pages_stored"));
  CHECK(U64(remote, "copies") >= U64(remote, "pages"));
  CHECK(U64(remote, "used_bytes") == lent);
  CHECK(U64(remote, "used_bytes") == SumOverPeers(status, "superpages_held") * kSuperpageBytes);
  // Copies fit in the superpages held.
  CHECK(U64(remote, "copies") * kPageSize <= U64(remote, "used_bytes"));
}

}  // namespace

TEST_SUITE("peers") {
  // a. Two lenders and a borrower whose local store is a sixteenth of what is written: the data
  // reads back intact, most of it lives on the lenders, spread over both, and the borrower's and
  // lenders' books agree.
  TEST_CASE("borrower spreads cold pages over two lenders") {
    constexpr uint64_t kDeviceSize = 64 * kMiB;
    constexpr uint64_t kWritten = 40 * kMiB;  // ten times the local store
    const uint64_t seed = TestSeed();
    INFO("seed " << seed);
    TempDir dir;
    MemlendDaemon lender1(dir, Lender("32M"), "lender1");
    MemlendDaemon lender2(dir, Lender("32M"), "lender2");
    // One copy per page: what is measured here is where single pages go.
    DaemonOptions options =
        Borrower("d0:64M", "4M", {lender1.ListenAddress(), lender2.ListenAddress()});
    options.extra_args = {"--redundancy", "none"};
    MemlendDaemon borrower(dir, options, "borrower");
    {
      json status = borrower.Status();
      INFO("status at start: " << status.dump());
      REQUIRE(status.at("peers").size() == 2);
      for (const json& peer : status.at("peers")) {
        CHECK(peer.at("state") == "up");
        CHECK(U64(peer, "pool_total_bytes") == 32 * kMiB);
      }
      CHECK(U64(status.at("remote_store"), "total_bytes") == 64 * kMiB);
      CHECK(status.at("local_store").at("total_bytes") == 4 * kMiB);
    }
    {
      NbdClient client(borrower.endpoint(), "d0");
      ShadowDevice shadow(kDeviceSize);
      std::mt19937_64 rng(seed);
      WriteRandomRange(client, shadow, rng, 0, kWritten, 256 * kKiB, 200);
      CHECK(CompareWithShadow(client, shadow) == "");

      json status = WaitEvictionSettled(borrower);
      INFO("settled status: " << status.dump());
      DevicePages pages = GetDevicePages(status, "d0");
      CHECK(pages.mapped == kWritten / kPageSize);
      CHECK(pages.local + pages.remote + pages.disk + pages.zero == pages.mapped);
      CHECK(pages.disk == 0);
      CHECK(pages.remote > pages.local);
      CHECK(U64(status.at("local_store"), "evicted_pages") >= pages.remote);
      const json& local = status.at("local_store");
      CHECK(U64(local, "used_bytes") * 100 <= U64(local, "total_bytes") * 90);
      // Both lenders got pages.
      for (const MemlendDaemon* lender : {&lender1, &lender2}) {
        const json& peer = PeerEntry(status, lender->ListenAddress());
        INFO("peer " << peer.dump());
        CHECK(U64(peer, "pages_stored") > 0);
        CHECK(U64(peer, "superpages_held") > 0);
        json lender_status = lender->Status();
        CheckStatusInvariants(lender_status);
        CHECK(lender_status.at("local_store").is_null());
        CHECK(U64(lender_status.at("lending"), "total_bytes") == 32 * kMiB);
        CHECK(U64(lender_status.at("lending"), "used_bytes") > 0);
        CHECK(U64(lender_status.at("lending"), "borrowers") == 1);
        CHECK(lender_status.at("node_id") == peer.at("node_id"));
      }
      CheckRemoteAccounting(borrower, {&lender1, &lender2});

      // Within a query interval or two, the borrower's view of each pool matches the lender's.
      json view;
      bool pools_match = Eventually(
          [&] {
            view = borrower.Status();
            for (const MemlendDaemon* lender : {&lender1, &lender2}) {
              const json& peer = PeerEntry(view, lender->ListenAddress());
              if (U64(peer, "pool_free_bytes") != 32 * kMiB - LendingUsed(*lender)) return false;
            }
            return true;
          },
          6000);
      CHECK_MESSAGE(pools_match, "peers' pool_free_bytes never matched the lenders: "
                                     << view.at("peers").dump() << "; lenders used "
                                     << LendingUsed(lender1) << ", " << LendingUsed(lender2));

      // A fresh connection reads the same data.
      NbdClient second(borrower.endpoint(), "d0");
      CHECK(CompareWithShadow(second, shadow) == "");
    }
    CHECK_MESSAGE(borrower.Stop() == 0, borrower.StderrText());
    // The lenders free the borrower's superpages when its connections close.
    for (MemlendDaemon* lender : {&lender1, &lender2}) {
      CHECK(Eventually([&] { return LendingUsed(*lender) == 0; }, 5000));
      CHECK_MESSAGE(lender->Stop() == 0, lender->StderrText());
    }
  }

  // b. Lenders far too small: with a backing file the overflow goes to disk and every write
  // succeeds; without one, writes succeed until local store and lenders are full and then fail
  // with ENOSPC, and what was written before reads back intact.
  TEST_CASE("full lenders: overflow to the backing file, else ENOSPC") {
    const uint64_t seed = TestSeed();
    INFO("seed " << seed);
    TempDir dir;
    MemlendDaemon lender1(dir, Lender("4M"), "lender1");
    MemlendDaemon lender2(dir, Lender("4M"), "lender2");
    const std::vector<std::string> peers = {lender1.ListenAddress(), lender2.ListenAddress()};

    SUBCASE("with a backing file") {
      constexpr uint64_t kDeviceSize = 64 * kMiB;
      constexpr uint64_t kWritten = 40 * kMiB;  // local 4M + lenders 8M is far less
      DaemonOptions options = Borrower("d0:64M", "4M", peers);
      options.backing_file = dir.File("backing.img");
      options.extra_args = {"--redundancy", "none"};  // the lenders' capacity, one copy each
      MemlendDaemon borrower(dir, options, "borrower");
      {
        NbdClient client(borrower.endpoint(), "d0");
        ShadowDevice shadow(kDeviceSize);
        std::mt19937_64 rng(seed);
        WriteRandomRange(client, shadow, rng, 0, kWritten, 256 * kKiB, 100);

        json status = WaitEvictionSettled(borrower);
        {
          INFO("settled status: " << status.dump());
          DevicePages pages = GetDevicePages(status, "d0");
          CHECK(pages.mapped == kWritten / kPageSize);
          CHECK(pages.disk > 0);
          CHECK(pages.remote > 0);
          CHECK(pages.local + pages.remote + pages.disk == pages.mapped);
          CHECK(pages.remote <= 8 * kMiB / kPageSize);
        }
        // Both pools are full, and the borrower sees that: each peer is refusing, or up with no
        // free pool (its view lags by up to one 2 s query).
        for (MemlendDaemon* lender : {&lender1, &lender2}) {
          CHECK(LendingUsed(*lender) == 4 * kMiB);
        }
        json view;
        bool seen_full = Eventually(
            [&] {
              view = borrower.Status();
              for (const json& peer : view.at("peers")) {
                const bool refusing = peer.at("state") == "refusing";
                const bool up_and_full =
                    peer.at("state") == "up" && U64(peer, "pool_free_bytes") == 0;
                if (!refusing && !up_and_full) return false;
              }
              return true;
            },
            6000);
        CHECK_MESSAGE(seen_full, "peers not seen as full: " << view.at("peers").dump());
        CheckRemoteAccounting(borrower, {&lender1, &lender2});

        CHECK(CompareWithShadow(client, shadow) == "");
        CheckStatusInvariants(borrower.Status());
      }
      CHECK_MESSAGE(borrower.Stop() == 0, borrower.StderrText());
    }

    SUBCASE("without a backing file") {
      constexpr uint64_t kDeviceSize = 64 * kMiB;
      // Local store 4 MiB (1024 frames) + two pools of 4 MiB (2048 slots).
      constexpr uint64_t kCapacityPages = (4 * kMiB + 8 * kMiB) / kPageSize;
      DaemonOptions options = Borrower("d0:64M", "4M", peers);
      options.extra_args = {"--redundancy", "none"};  // the lenders' capacity, one copy each
      MemlendDaemon borrower(dir, options, "borrower");
      {
        NbdClient client(borrower.endpoint(), "d0");
        ShadowDevice shadow(kDeviceSize);
        std::mt19937_64 rng(seed);
        std::vector<uint8_t> page(kPageSize);
        int error = 0;
        uint64_t stored = 0;
        for (; stored < kDeviceSize / kPageSize; ++stored) {
          FillRandom(rng, page);
          error = client.TryWrite(page, stored * kPageSize);
          if (error != 0) break;
          shadow.Write(stored * kPageSize, page);
        }
        json status = borrower.Status();
        INFO("pages stored before the first failure: " << stored << "; status: " << status.dump());
        MESSAGE("without a backing file: " << stored << " pages written before errno " << error
                                           << " (capacity " << kCapacityPages << " pages)");
        CHECK(error == ENOSPC);
        // ENOSPC only once every tier is full: all of the local store and both pools.
        CHECK(stored == kCapacityPages);
        CHECK(U64(status.at("local_store"), "used_bytes") == 4 * kMiB);
        CHECK(GetDevicePages(status, "d0").remote == 8 * kMiB / kPageSize);
        CHECK(LendingUsed(lender1) == 4 * kMiB);
        CHECK(LendingUsed(lender2) == 4 * kMiB);
        CheckStatusInvariants(status);

        // Another write still fails the same way, and what was written reads back intact.
        FillRandom(rng, page);
        CHECK(client.TryWrite(page, (stored + 1) * kPageSize) == ENOSPC);
        CHECK(CompareWithShadow(client, shadow, 0, stored * kPageSize) == "");

        // TRIM frees room (wherever those pages were) and new writes succeed again, until that
        // room is used up. Four rounds: TRIM 1 MiB (256 pages) of the oldest data, then write
        // 192 new pages, which must all succeed.
        uint64_t next_page = stored;
        for (int round = 0; round < 4; ++round) {
          const uint64_t trim_offset = static_cast<uint64_t>(round) * kMiB;
          client.Trim(1 * kMiB, trim_offset);
          shadow.Zero(trim_offset, 1 * kMiB);
          const json after_trim = borrower.Status();
          INFO("round " << round << ", status after TRIM of [" << trim_offset
                        << ", +1 MiB): " << after_trim.dump());
          CHECK(GetDevicePages(after_trim, "d0").mapped == next_page - 256 * (round + 1));
          bool failed = false;
          for (uint64_t i = 0; i < 192 && !failed; ++i, ++next_page) {
            FillRandom(rng, page);
            const uint64_t offset = next_page * kPageSize;
            const int rc = client.TryWrite(page, offset);
            if (rc == 0) {
              shadow.Write(offset, page);
              continue;
            }
            // Tell a transient refusal from a lasting one in the failure message.
            const json at_failure = borrower.Status();
            std::this_thread::sleep_for(std::chrono::milliseconds(500));
            const int retry = client.TryWrite(page, offset);
            if (retry == 0) shadow.Write(offset, page);
            FAIL_CHECK("write of page " << next_page << " (write " << i + 1 << " after TRIM round "
                                        << round << ") failed with errno " << rc
                                        << "; the same write 0.5 s later returned " << retry
                                        << "; status at the failure: " << at_failure.dump());
            failed = true;
          }
          if (failed) break;
        }
        CHECK(CompareWithShadow(client, shadow) == "");
        CheckStatusInvariants(borrower.Status());
      }
      CHECK_MESSAGE(borrower.Stop() == 0, borrower.StderrText());
    }
    CHECK_MESSAGE(lender1.Stop() == 0, lender1.StderrText());
    CHECK_MESSAGE(lender2.Stop() == 0, lender2.StderrText());
  }

  // c. Overwriting remote pages frees their old slots (superpages in use do not grow with each
  // rewrite), and TRIM of everything gives every superpage back to its lender.
  TEST_CASE("overwrite and TRIM free remote slots and superpages") {
    constexpr uint64_t kDeviceSize = 64 * kMiB;
    constexpr uint64_t kWritten = 32 * kMiB;
    const uint64_t seed = TestSeed();
    INFO("seed " << seed);
    TempDir dir;
    MemlendDaemon lender1(dir, Lender("32M"), "lender1");
    MemlendDaemon lender2(dir, Lender("32M"), "lender2");
    MemlendDaemon borrower(
        dir, Borrower("d0:64M", "4M", {lender1.ListenAddress(), lender2.ListenAddress()}),
        "borrower");
    {
      NbdClient client(borrower.endpoint(), "d0");
      ShadowDevice shadow(kDeviceSize);
      std::mt19937_64 rng(seed);
      WriteRandomRange(client, shadow, rng, 0, kWritten, 256 * kKiB, 0);
      json status = WaitEvictionSettled(borrower);
      CHECK(GetDevicePages(status, "d0").remote > 0);
      CheckRemoteAccounting(borrower, {&lender1, &lender2});
      const uint64_t used_after_first = LendingUsed(lender1) + LendingUsed(lender2);
      MESSAGE("lent after the first write: " << used_after_first / kMiB << " MiB");
      CHECK(used_after_first > 0);

      for (int round = 1; round <= 5; ++round) {
        INFO("overwrite round " << round);
        WriteRandomRange(client, shadow, rng, 0, kWritten, 256 * kKiB, 20);
        status = WaitEvictionSettled(borrower);
        INFO("settled status: " << status.dump());
        CHECK(GetDevicePages(status, "d0").mapped == kWritten / kPageSize);
        CHECK(GetDevicePages(status, "d0").remote > 0);
        const uint64_t used1 = LendingUsed(lender1);
        const uint64_t used2 = LendingUsed(lender2);
        MESSAGE("round " << round << ": lent " << used1 / kMiB << " + " << used2 / kMiB << " MiB");
        // At most one more superpage per lender than after the first write.
        CHECK(used1 + used2 <= used_after_first + 2 * kSuperpageBytes);
      }
      CHECK(CompareWithShadow(client, shadow) == "");
      CheckRemoteAccounting(borrower, {&lender1, &lender2});

      // TRIM of the whole device: nothing is mapped, no page is remote, every superpage is back.
      client.Trim(kDeviceSize, 0);
      shadow.Zero(0, kDeviceSize);
      status = WaitForStatus(borrower, [](const json& s) {
        return U64(s.at("remote_store"), "pages") == 0 &&
               U64(s.at("remote_store"), "used_bytes") == 0;
      });
      {
        INFO("status after TRIM: " << status.dump());
        CheckStatusInvariants(status);
        DevicePages pages = GetDevicePages(status, "d0");
        CHECK(pages.mapped == 0);
        CHECK(pages.remote == 0);
        CHECK(U64(status.at("remote_store"), "pages") == 0);
        CHECK(U64(status.at("remote_store"), "used_bytes") == 0);
        CHECK(U64(status.at("local_store"), "used_bytes") == 0);
        CHECK(SumOverPeers(status, "pages_stored") == 0);
        CHECK(SumOverPeers(status, "superpages_held") == 0);
      }
      for (MemlendDaemon* lender : {&lender1, &lender2}) {
        json lender_status = WaitForStatus(
            *lender, [](const json& s) { return U64(s.at("lending"), "used_bytes") == 0; });
        INFO("lender status after TRIM: " << lender_status.dump());
        CHECK(U64(lender_status.at("lending"), "used_bytes") == 0);
        CHECK(U64(lender_status.at("lending"), "borrowers") == 0);
      }
      CHECK(CompareWithShadow(client, shadow) == "");
    }
    CHECK_MESSAGE(borrower.Stop() == 0, borrower.StderrText());
    CHECK_MESSAGE(lender1.Stop() == 0, lender1.StderrText());
    CHECK_MESSAGE(lender2.Stop() == 0, lender2.StderrText());
  }

  // d1. A lender that is not there at start is skipped and retried: the borrower uses the live
  // one, and picks the late one up within a few query intervals once it listens.
  TEST_CASE("an unreachable lender is skipped at start and used once it comes up") {
    constexpr uint64_t kDeviceSize = 32 * kMiB;
    const uint64_t seed = TestSeed();
    INFO("seed " << seed);
    TempDir dir;
    const int late_port = PickFreeTcpPort();  // nobody listens here yet
    const std::string late_address = "127.0.0.1:" + std::to_string(late_port);
    MemlendDaemon live(dir, Lender("32M"), "live");
    MemlendDaemon borrower(dir, Borrower("d0:32M", "4M", {live.ListenAddress(), late_address}),
                           "borrower");
    {
      json status = borrower.Status();
      INFO("status at start: " << status.dump());
      CHECK(PeerEntry(status, live.ListenAddress()).at("state") == "up");
      const json& late = PeerEntry(status, late_address);
      CHECK(late.at("state") == "down");
      CHECK(late.at("error").get<std::string>() != "");
      CHECK(late.at("node_id") == "-");
    }
    auto client_owner = std::make_unique<NbdClient>(borrower.endpoint(), "d0");
    NbdClient& client = *client_owner;
    ShadowDevice shadow(kDeviceSize);
    std::mt19937_64 rng(seed);
    WriteRandomRange(client, shadow, rng, 0, 16 * kMiB, 256 * kKiB, 50);
    CHECK(CompareWithShadow(client, shadow) == "");
    {
      json status = WaitEvictionSettled(borrower);
      INFO("settled status: " << status.dump());
      DevicePages pages = GetDevicePages(status, "d0");
      CHECK(pages.remote > 0);
      CHECK(U64(PeerEntry(status, live.ListenAddress()), "pages_stored") == pages.remote + pages.remote_copies);
      CHECK(U64(PeerEntry(status, late_address), "pages_stored") == 0);
      CHECK(PeerEntry(status, late_address).at("state") == "down");
      CheckRemoteAccounting(borrower, {&live});
    }

    // The late lender starts on the port the borrower keeps trying.
    MemlendDaemon late_lender(dir, Lender("32M", late_port), "late");
    const auto started = Clock::now();
    json status = WaitForStatus(
        borrower, [&](const json& s) { return PeerEntry(s, late_address).at("state") == "up"; },
        6000);
    const auto took_ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started).count();
    {
      INFO("status: " << status.dump());
      CHECK_MESSAGE(PeerEntry(status, late_address).at("state") == "up",
                    "the late lender was not up within 6 s");
      CHECK(PeerEntry(status, late_address).at("error") == "");
      CHECK(PeerEntry(status, late_address).at("node_id") == late_lender.Status().at("node_id"));
      MESSAGE("late lender seen up after " << took_ms << " ms");
    }

    // New cold pages now go to the late lender too (it is the emptier of the two).
    WriteRandomRange(client, shadow, rng, 16 * kMiB, 12 * kMiB, 256 * kKiB, 20);
    CHECK(CompareWithShadow(client, shadow) == "");
    status = WaitEvictionSettled(borrower);
    {
      INFO("settled status: " << status.dump());
      CHECK(U64(PeerEntry(status, late_address), "pages_stored") > 0);
      CHECK(LendingUsed(late_lender) > 0);
    }
    CheckRemoteAccounting(borrower, {&live, &late_lender});
    CHECK(CompareWithShadow(client, shadow) == "");
    client_owner.reset();  // the client disconnects before the daemons stop
    CHECK_MESSAGE(borrower.Stop() == 0, borrower.StderrText());
    CHECK_MESSAGE(live.Stop() == 0, live.StderrText());
    CHECK_MESSAGE(late_lender.Stop() == 0, late_lender.StderrText());
  }

  // d2. A lender that answers HELLO with protocol version 2 is refused with a message naming the
  // version, stays down, and the borrower serves its device from its other tiers.
  TEST_CASE("a lender speaking another protocol version is refused, the device still works") {
    constexpr uint64_t kDeviceSize = 16 * kMiB;
    const uint64_t seed = TestSeed();
    INFO("seed " << seed);
    TempDir dir;
    FakeLender fake(2);
    MemlendDaemon real(dir, Lender("16M"), "real");
    MemlendDaemon borrower(dir, Borrower("d0:16M", "2M", {fake.Address(), real.ListenAddress()}),
                           "borrower");
    {
      json status = borrower.Status();
      INFO("status at start: " << status.dump());
      const json& peer = PeerEntry(status, fake.Address());
      CHECK(peer.at("state") == "down");
      CHECK(peer.at("error").get<std::string>().find("version 2") != std::string::npos);
      CHECK(PeerEntry(status, real.ListenAddress()).at("state") == "up");
    }
    CHECK(fake.hellos() >= 1);
    CHECK_FALSE(fake.saw_unexpected_request());
    const std::string log = borrower.StderrText();
    INFO("borrower stderr: " << log);
    CHECK(log.find("speaks peer protocol version 2") != std::string::npos);

    {
      NbdClient client(borrower.endpoint(), "d0");
      ShadowDevice shadow(kDeviceSize);
      std::mt19937_64 rng(seed);
      WriteRandomRange(client, shadow, rng, 0, 12 * kMiB, 128 * kKiB, 50);
      CHECK(CompareWithShadow(client, shadow) == "");
      json status = WaitEvictionSettled(borrower);
      INFO("settled status: " << status.dump());
      DevicePages pages = GetDevicePages(status, "d0");
      CHECK(pages.mapped == 12 * kMiB / kPageSize);
      CHECK(pages.remote > 0);
      CHECK(U64(PeerEntry(status, real.ListenAddress()), "pages_stored") == pages.remote + pages.remote_copies);
      CHECK(U64(PeerEntry(status, fake.Address()), "pages_stored") == 0);
      CheckRemoteAccounting(borrower, {&real});
      CHECK(CompareWithShadow(client, shadow) == "");
    }
    // It is retried and refused again; it never comes up.
    CHECK(Eventually([&] { return fake.hellos() >= 2; }, 6000));
    json status = borrower.Status();
    INFO("status: " << status.dump());
    CHECK(PeerEntry(status, fake.Address()).at("state") == "down");
    CHECK(PeerEntry(status, fake.Address()).at("error").get<std::string>().find("version 2") !=
          std::string::npos);
    CHECK_FALSE(fake.saw_unexpected_request());
    CHECK_MESSAGE(borrower.Stop() == 0, borrower.StderrText());
    CHECK_MESSAGE(real.Stop() == 0, real.StderrText());
  }

  // d3. The other direction: a version-2 HELLO to a real lender gets status PROTOCOL with a text
  // naming both versions and the connection closes; the lender then serves a correct client.
  TEST_CASE("a lender refuses a HELLO of another version and still serves correct clients") {
    TempDir dir;
    MemlendDaemon lender(dir, Lender("16M"), "lender");
    const HelloBody hello{0x1234, 0, static_cast<uint32_t>(kSuperpageBytes), 1};
    {
      RawPeerClient client(lender.listen_port());
      std::optional<PeerMessage> reply = client.Call(kHello, BytesOf(hello), {}, 2);
      REQUIRE_MESSAGE(reply.has_value(), "no reply to a version-2 HELLO");
      INFO("reply text: " << reply->Text());
      CHECK(reply->header.magic == kPeerMagic);
      CHECK(reply->header.type == (kHello | kReplyBit));
      CHECK(reply->header.status == kStatusProtocol);
      CHECK(reply->Text().find("version 1") != std::string::npos);
      CHECK(reply->Text().find("version 2") != std::string::npos);
      CHECK(reply->payload.size() <= 256);
      CHECK(client.WaitClosed());
    }
    {
      RawPeerClient client(lender.listen_port());
      std::optional<PeerMessage> reply = client.Call(kHello, BytesOf(hello));
      REQUIRE(reply.has_value());
      CHECK(reply->header.version == kPeerVersion);
      CHECK(reply->header.type == (kHello | kReplyBit));
      REQUIRE(reply->header.status == 0);
      std::optional<HelloBody> body = reply->As<HelloBody>();
      REQUIRE(body.has_value());
      CHECK(body->pool_bytes == 16 * kMiB);
      CHECK(body->superpage_bytes == kSuperpageBytes);
      char node_id[17];
      std::snprintf(node_id, sizeof node_id, "%016llx",
                    static_cast<unsigned long long>(body->node_id));
      CHECK(lender.Status().at("node_id") == std::string(node_id));

      reply = client.Call(kQuery);
      REQUIRE(reply.has_value());
      REQUIRE(reply->header.status == 0);
      std::optional<QueryReply> query = reply->As<QueryReply>();
      REQUIRE(query.has_value());
      CHECK(query->total_pages == 16 * kMiB / kPageSize);
      CHECK(query->free_pages == 16 * kMiB / kPageSize);
      CHECK(query->caller_pages == 0);

      // A superpage, one page written and read back.
      reply = client.Call(kAllocSuperpage);
      REQUIRE(reply.has_value());
      REQUIRE(reply->header.status == 0);
      std::optional<uint32_t> sid = reply->As<uint32_t>();
      REQUIRE(sid.has_value());
      std::vector<uint8_t> page(kPageSize);
      std::mt19937_64 rng(TestSeed());
      FillRandom(rng, page);
      const RangeBody range{*sid, 8 * kPageSize, kPageSize, 0};
      reply = client.Call(kWrite, BytesOf(range), page);
      REQUIRE(reply.has_value());
      CHECK(reply->header.status == 0);
      reply = client.Call(kRead, BytesOf(range));
      REQUIRE(reply.has_value());
      CHECK(reply->header.status == 0);
      CHECK(reply->payload == page);
      json status = lender.Status();
      CHECK(U64(status.at("lending"), "used_bytes") == kSuperpageBytes);
      CHECK(U64(status.at("lending"), "borrowers") == 1);
      // Ending the session for good: the lender keeps nothing of it once it closes (without
      // GOODBYE it would keep it for --borrower-grace, for the borrower to resume).
      reply = client.Call(kGoodbye);
      REQUIRE(reply.has_value());
      CHECK(reply->header.status == 0);
    }
    // The session closed, so its superpage is free again.
    CHECK(Eventually([&] { return LendingUsed(lender) == 0; }, 5000));
    CHECK(lender.Status().at("lending").at("parked").empty());
    CHECK_MESSAGE(lender.Stop() == 0, lender.StderrText());
  }

  // e. Two daemons each lend to and borrow from the other, with I/O on both devices at once.
  TEST_CASE("two daemons lend to each other while both devices are busy") {
    constexpr uint64_t kDeviceSize = 32 * kMiB;
    constexpr uint64_t kWritten = 12 * kMiB;
    const uint64_t seed = TestSeed();
    INFO("seed " << seed);
    TempDir dir;
    const int port_x = PickFreeTcpPort();
    const int port_y = PickFreeTcpPort();
    auto options = [](int listen_port, int peer_port) {
      DaemonOptions o = Borrower("d0:32M", "2M", {"127.0.0.1:" + std::to_string(peer_port)});
      o.lend = "16M";
      o.listen_port = listen_port;
      o.extra_args = {"--drain-deadline", "0"};  // each holds pages the other cannot move
      return o;
    };
    MemlendDaemon x(dir, options(port_x, port_y), "x");  // y is not up yet: retried
    MemlendDaemon y(dir, options(port_y, port_x), "y");
    for (MemlendDaemon* d : {&x, &y}) {
      json status = WaitForStatus(
          *d, [](const json& s) { return s.at("peers").at(0).at("state") == "up"; }, 6000);
      INFO("status: " << status.dump());
      CHECK(status.at("peers").at(0).at("state") == "up");
    }

    ShadowDevice shadow_x(kDeviceSize);
    ShadowDevice shadow_y(kDeviceSize);
    std::string failures[2];
    {
      std::vector<std::thread> threads;
      MemlendDaemon* daemons[2] = {&x, &y};
      ShadowDevice* shadows[2] = {&shadow_x, &shadow_y};
      for (int i = 0; i < 2; ++i) {
        threads.emplace_back([&, i] {
          try {
            NbdClient client(daemons[i]->endpoint(), "d0");
            std::mt19937_64 rng(seed + static_cast<uint64_t>(i));
            WriteRandomRange(client, *shadows[i], rng, 0, kWritten, 128 * kKiB, 100);
            failures[i] = CompareWithShadow(client, *shadows[i]);
          } catch (const std::exception& error) {
            failures[i] = error.what();
          }
        });
      }
      for (std::thread& thread : threads) thread.join();
    }
    CHECK(failures[0] == "");
    CHECK(failures[1] == "");

    for (auto [borrower, lender] : {std::pair{&x, &y}, std::pair{&y, &x}}) {
      json status = WaitEvictionSettled(*borrower);
      INFO("settled status: " << status.dump());
      DevicePages pages = GetDevicePages(status, "d0");
      CHECK(pages.mapped == kWritten / kPageSize);
      CHECK(pages.remote > 0);
      CHECK(U64(lender->Status().at("lending"), "borrowers") == 1);
      CheckRemoteAccounting(*borrower, {lender});
    }
    {
      NbdClient client_x(x.endpoint(), "d0");
      NbdClient client_y(y.endpoint(), "d0");
      CHECK(CompareWithShadow(client_x, shadow_x) == "");
      CHECK(CompareWithShadow(client_y, shadow_y) == "");
    }
    CHECK_MESSAGE(x.Stop() == 0, x.StderrText());
    CHECK_MESSAGE(y.Stop() == 0, y.StderrText());
  }

  // f. The lender goes away under a borrower: the borrower keeps serving. Pages that were local
  // read back; pages that were on the lender fail with EIO (never wrong data); new writes go to
  // the local store and the backing file; the peer shows down.
  TEST_CASE("a borrower keeps serving after its lender goes away") {
    constexpr uint64_t kDeviceSize = 32 * kMiB;
    constexpr uint64_t kFirst = 16 * kMiB;      // [0, 16M): mostly evicted to the lender
    constexpr uint64_t kHotOffset = 20 * kMiB;  // 64 pages written last: local
    constexpr uint64_t kHotLength = 256 * kKiB;
    const uint64_t seed = TestSeed();
    INFO("seed " << seed);
    TempDir dir;
    MemlendDaemon lender(dir, Lender("32M"), "lender");
    DaemonOptions options = Borrower("d0:32M", "4M", {lender.ListenAddress()});
    options.backing_file = dir.File("backing.img");
    // none: evicted pages live on the lender alone (disk, the default with a backing file and
    // one peer, would keep a copy on disk too).
    options.extra_args = {"--redundancy", "none"};
    MemlendDaemon borrower(dir, options, "borrower");
    {
      NbdClient client(borrower.endpoint(), "d0");
      ShadowDevice shadow(kDeviceSize);
      std::mt19937_64 rng(seed);
      WriteRandomRange(client, shadow, rng, 0, kFirst, 256 * kKiB, 0);
      json before = WaitEvictionSettled(borrower);
      {
        INFO("settled status: " << before.dump());
        const DevicePages settled = GetDevicePages(before, "d0");
        CHECK(settled.remote > 0);
        // A writer that finds the store full waits at most 50 ms for the evictor, then puts
        // the page on disk: on a loaded machine a few may go there. Nothing below counts them.
      }
      // Write the hot pages; if that took the store over the high watermark, the evictor ran
      // and may have moved some of them, but then left the store under the low watermark, so a
      // rewrite fits. Once a write of them evicts nothing, all of them are local.
      json with_hot;
      bool hot_are_local = false;
      for (int attempt = 0; attempt < 3 && !hot_are_local; ++attempt) {
        WriteRandomRange(client, shadow, rng, kHotOffset, kHotLength, kHotLength, 0);
        with_hot = WaitEvictionSettled(borrower);
        hot_are_local = with_hot.at("local_store").at("evicted_pages") ==
                        before.at("local_store").at("evicted_pages");
        before = with_hot;
      }
      INFO("status with the hot pages: " << with_hot.dump());
      REQUIRE_MESSAGE(hot_are_local, "every write of the hot pages caused evictions");
      const DevicePages hot = GetDevicePages(with_hot, "d0");
      REQUIRE(hot.remote > 0);
      REQUIRE(hot.local >= kHotLength / kPageSize);

      // It dies (a lender told to leave would first let the borrower move its pages).
      CHECK_MESSAGE(lender.Stop(SIGKILL) == 128 + SIGKILL, lender.StderrText());
      // Down at once (the connection broke); the reason is filled in by the next query round.
      const json after_loss = WaitForStatus(
          borrower,
          [](const json& s) {
            const json& peer = s.at("peers").at(0);
            // ... and the pages that were only there are counted as lost.
            return peer.at("state") == "down" && peer.at("error") != "" &&
                   s.at("remote_store").value("lost_pages", uint64_t{0}) ==
                       peer.value("pages_lost", uint64_t{0});
          },
          6000);
      INFO("status after the lender left: " << after_loss.dump());
      CHECK(after_loss.at("peers").at(0).at("state") == "down");
      CHECK(after_loss.at("peers").at(0).at("error").get<std::string>() != "");
      // The peer's superpages are gone with it. The pages it held are lost: the device still
      // counts them as remote (until rewritten or trimmed), and the remote store and the peer
      // count them as lost (docs/control.md).
      CHECK(U64(after_loss.at("remote_store"), "pages") == 0);
      CHECK(U64(after_loss.at("remote_store"), "used_bytes") == 0);
      CHECK(U64(after_loss.at("peers").at(0), "pages_stored") == 0);
      CHECK(U64(after_loss.at("peers").at(0), "superpages_held") == 0);
      CHECK(GetDevicePages(after_loss, "d0").remote == hot.remote);
      CHECK_MESSAGE(after_loss.at("remote_store").value("lost_pages", uint64_t{0}) == hot.remote,
                    "remote_store.lost_pages should count the pages lost with the lender");
      CHECK_MESSAGE(after_loss.at("peers").at(0).value("pages_lost", uint64_t{0}) == hot.remote,
                    "peers[].pages_lost should count the pages lost with the lender");
      CheckStatusInvariants(after_loss);

      // Local pages read back.
      CHECK(CompareWithShadow(client, shadow, kHotOffset, kHotLength) == "");

      // Every page of the first range reads back intact or fails with EIO: as many EIOs as pages
      // were on the lender, and never wrong data.
      uint64_t intact = 0, eio = 0, other_errors = 0, wrong = 0;
      std::string first_wrong;
      std::vector<uint8_t> page(kPageSize);
      std::vector<bool> lost(kFirst / kPageSize);
      for (uint64_t offset = 0; offset < kFirst; offset += kPageSize) {
        const int rc = client.TryRead(page, offset);
        if (rc == EIO) {
          lost[offset / kPageSize] = true;
          ++eio;
        } else if (rc != 0) {
          ++other_errors;
        } else if (std::string m = DescribeMismatch(shadow.Range(offset, kPageSize), page, offset);
                   !m.empty()) {
          if (first_wrong.empty()) first_wrong = m;
          ++wrong;
        } else {
          ++intact;
        }
      }
      INFO("reads: " << intact << " intact, " << eio << " EIO, " << other_errors
                     << " other errors, " << wrong << " wrong (" << first_wrong << ")");
      CHECK(wrong == 0);
      CHECK(other_errors == 0);
      CHECK(eio == hot.remote);
      CHECK(intact == kFirst / kPageSize - hot.remote);
      // A READ as large as the kernel's NBD client sends (1.25 MiB at its default
      // max_sectors_kb, and more) over lost pages fails with EIO and leaves the connection
      // serving: it is answered whole, its error known before its reply goes out.
      if (std::count(lost.begin(), lost.begin() + 2 * kMiB / kPageSize, true) > 0) {
        std::vector<uint8_t> large(2 * kMiB);
        CHECK(client.TryRead(large, 0) == EIO);
        CHECK(CompareWithShadow(client, shadow, kHotOffset, kHotLength) == "");
      }

      // New writes succeed: far more than the local store, so they also spill to disk now.
      WriteRandomRange(client, shadow, rng, 22 * kMiB, 10 * kMiB, 256 * kKiB, 20);
      CHECK(CompareWithShadow(client, shadow, 22 * kMiB, 10 * kMiB) == "");
      CHECK(CompareWithShadow(client, shadow, kHotOffset, kHotLength) == "");
      // Rewriting whole lost pages makes them readable again, and so does trimming them (they
      // read zeros); either way they are no longer lost.
      WriteRandomRange(client, shadow, rng, 0, 1 * kMiB, 64 * kKiB, 0);
      client.Trim(1 * kMiB, 1 * kMiB);
      shadow.Zero(1 * kMiB, 1 * kMiB);
      CHECK(CompareWithShadow(client, shadow, 0, 2 * kMiB) == "");
      const uint64_t still_lost =
          static_cast<uint64_t>(std::count(lost.begin() + 2 * kMiB / kPageSize, lost.end(), true));

      const json final_status = WaitEvictionSettled(borrower);
      INFO("settled status after new writes: " << final_status.dump());
      CheckStatusInvariants(final_status);
      CHECK(GetDevicePages(final_status, "d0").disk > 0);
      CHECK(GetDevicePages(final_status, "d0").remote == still_lost);
      CHECK(final_status.at("remote_store").value("lost_pages", uint64_t{0}) == still_lost);
      CHECK(final_status.at("peers").at(0).at("state") == "down");
    }
    CHECK_MESSAGE(borrower.Stop() == 0, borrower.StderrText());
  }

  // replicas:2 over three lenders: every evicted page is on two of them. kill -9 of one loses
  // nothing (its pages are read from their other copies), the rebuilder copies the pages that
  // lost a copy to the third lender, and then kill -9 of a second one loses nothing either; with
  // one lender left the pages are degraded (one copy each) and still read back.
  TEST_CASE("replicas:2 over three lenders: two lenders killed one after the other lose nothing") {
    constexpr uint64_t kDeviceSize = 32 * kMiB;
    constexpr uint64_t kWritten = 16 * kMiB;
    const uint64_t seed = TestSeed();
    INFO("seed " << seed);
    TempDir dir;
    const auto lenders = StartLenders(dir, 3, "32M");
    DaemonOptions options = Borrower("d0:32M", "4M", ListenAddresses(lenders));
    options.extra_args = {"--redundancy", "replicas:2"};
    MemlendDaemon borrower(dir, options, "borrower");
    auto state = [](const json& s, int i) { return s.at("peers").at(i).at("state").get<std::string>(); };
    auto read_all = [&](NbdClient& client, const ShadowDevice& shadow, const char* when) {
      const PageReads reads = ReadPages(client, shadow, kWritten);
      INFO(when << ": " << reads.eio << " EIO, " << reads.other_errors << " other errors, "
                << reads.wrong << " wrong");
      CHECK(reads.eio == 0);
      CHECK(reads.other_errors == 0);
      CHECK(reads.wrong == 0);
    };
    {
      NbdClient client(borrower.endpoint(), "d0");
      ShadowDevice shadow(kDeviceSize);
      std::mt19937_64 rng(seed);
      WriteRandomRange(client, shadow, rng, 0, kWritten, 256 * kKiB, 0);
      const json settled = WaitEvictionSettled(borrower);
      INFO("settled status: " << settled.dump());
      const json& device = settled.at("devices").at(0);
      CHECK(device.at("redundancy") == "replicas:2");
      const uint64_t on_lenders = GetDevicePages(settled, "d0").remote;
      REQUIRE(on_lenders > kWritten / kPageSize / 2);
      CHECK(RemoteField(settled, "pages") == on_lenders);
      CHECK(RemoteField(settled, "copies") == 2 * on_lenders);
      CHECK(RemoteField(settled, "degraded_pages") == 0);
      CHECK(RemoteField(settled, "copies") == SumOverPeers(settled, "pages_stored"));

      // The first lender dies while holding about two thirds of the pages' copies.
      CHECK(lenders[0]->Stop(SIGKILL) == 128 + SIGKILL);
      read_all(client, shadow, "reads right after the first kill");
      const json rebuilt = WaitForStatus(
          borrower,
          [&](const json& s) {
            return state(s, 0) == "down" && U64(s.at("peers").at(0), "pages_stored") == 0 &&
                   RemoteField(s, "degraded_pages") == 0 &&
                   RemoteField(s, "copies") == SumOverPeers(s, "pages_stored");
          },
          15000);
      INFO("status after the rebuild: " << rebuilt.dump());
      CHECK(RemoteField(rebuilt, "lost_pages") == 0);
      // (Reads promote some pages back into the local store, and fetch others ahead, which
      // keep their remote copies, so count them again.)
      CHECK(RemoteField(rebuilt, "pages") == GetDevicePages(rebuilt, "d0").remote +
                                                 GetDevicePages(rebuilt, "d0").remote_copies);
      CHECK(RemoteField(rebuilt, "copies") == 2 * RemoteField(rebuilt, "pages"));
      CHECK(RemoteField(rebuilt, "rebuilt_copies") > 0);
      CHECK(U64(rebuilt.at("peers").at(0), "pages_stored") == 0);
      CheckStatusInvariants(rebuilt);
      read_all(client, shadow, "reads after the rebuild");

      // The second lender dies: every page still has its copy on the third.
      CHECK(lenders[1]->Stop(SIGKILL) == 128 + SIGKILL);
      read_all(client, shadow, "reads right after the second kill");
      const json degraded = WaitForStatus(
          borrower,
          [&](const json& s) {
            return state(s, 1) == "down" && U64(s.at("peers").at(1), "pages_stored") == 0 &&
                   RemoteField(s, "degraded_pages") == RemoteField(s, "pages");
          },
          15000);
      INFO("status with one lender left: " << degraded.dump());
      CHECK(RemoteField(degraded, "lost_pages") == 0);
      CHECK(RemoteField(degraded, "copies") == RemoteField(degraded, "pages"));
      CHECK(RemoteField(degraded, "pages") == GetDevicePages(degraded, "d0").remote +
                                                  GetDevicePages(degraded, "d0").remote_copies);
      CheckStatusInvariants(degraded);
      // No peer can take a second copy: the rebuild says it is waiting, not when it ends.
      CHECK(Eventually(
          [&] { return borrower.Status().at("remote_store").at("rebuild_eta_s") == -1; }, 5000));
      // Writes go on, with one copy each (degraded) while only one lender is up.
      WriteRandomRange(client, shadow, rng, kWritten, 8 * kMiB, 256 * kKiB, 0);
      CHECK(CompareWithShadow(client, shadow, 0, kDeviceSize) == "");
    }
    CHECK_MESSAGE(borrower.Stop() == 0, borrower.StderrText());
    CHECK(lenders[2]->Stop() == 0);
  }

  // replicas:2 with a lender frozen (kill -STOP) for longer than --peer-down-after: reads go to
  // the other copies and writes to the other lenders, so no request waits for the frozen one
  // (fio-style: the slowest read is reported, and must be shorter than the freeze); it shows
  // suspect, then down; once thawed it is connected again and used again, and nothing is lost.
  TEST_CASE("replicas:2: a frozen lender is routed around and used again once it thaws") {
    constexpr uint64_t kDeviceSize = 32 * kMiB;
    constexpr uint64_t kWritten = 16 * kMiB;
    constexpr auto kFreeze = std::chrono::seconds(8);  // --peer-down-after is 5 s (the default)
    const uint64_t seed = TestSeed();
    INFO("seed " << seed);
    TempDir dir;
    const auto lenders = StartLenders(dir, 3, "32M");
    struct Thaw {
      pid_t pid;
      ~Thaw() { ::kill(pid, SIGCONT); }
    } thaw{lenders[0]->pid()};
    MemlendDaemon borrower(dir, Borrower("d0:32M", "4M", ListenAddresses(lenders)), "borrower");
    auto state = [](const json& s) { return s.at("peers").at(0).at("state").get<std::string>(); };
    {
      NbdClient client(borrower.endpoint(), "d0");
      ShadowDevice shadow(kDeviceSize);
      std::mt19937_64 rng(seed);
      WriteRandomRange(client, shadow, rng, 0, kWritten, 256 * kKiB, 0);
      const json settled = WaitEvictionSettled(borrower);
      INFO("settled status: " << settled.dump());
      REQUIRE(settled.at("devices").at(0).at("redundancy") == "replicas:2");
      REQUIRE(U64(settled.at("peers").at(0), "pages_stored") > 0);

      REQUIRE(::kill(lenders[0]->pid(), SIGSTOP) == 0);
      const auto frozen_at = std::chrono::steady_clock::now();
      std::chrono::steady_clock::duration slowest{};
      uint64_t reads = 0, errors = 0, wrong = 0;
      std::set<std::string> states;
      std::vector<uint8_t> page(kPageSize);
      while (std::chrono::steady_clock::now() - frozen_at < kFreeze - std::chrono::seconds(1)) {
        // A pass of reads over the first range, and a write of new data beyond it.
        for (uint64_t offset = 0; offset < kWritten; offset += 16 * kPageSize) {
          const auto start = std::chrono::steady_clock::now();
          const int rc = client.TryRead(page, offset);
          slowest = std::max(slowest, std::chrono::steady_clock::now() - start);
          ++reads;
          if (rc != 0) {
            ++errors;
          } else if (!DescribeMismatch(shadow.Range(offset, kPageSize), page, offset).empty()) {
            ++wrong;
          }
        }
        WriteRandomRange(client, shadow, rng, kWritten, 4 * kMiB, 256 * kKiB, 0);
        states.insert(state(borrower.Status()));
      }
      std::this_thread::sleep_until(frozen_at + kFreeze);
      REQUIRE(::kill(lenders[0]->pid(), SIGCONT) == 0);
      const auto slowest_ms =
          std::chrono::duration_cast<std::chrono::milliseconds>(slowest).count();
      MESSAGE("while a lender was frozen for " << kFreeze.count() << " s: " << reads
                                               << " reads, the slowest took " << slowest_ms
                                               << " ms");
      std::string seen;
      for (const std::string& s : states) seen += s + " ";
      INFO("states of the frozen lender seen: " << seen);
      CHECK(errors == 0);
      CHECK(wrong == 0);
      CHECK(slowest < kFreeze);  // nobody waited for the lender to thaw
      CHECK((states.contains("suspect") || states.contains("down")));

      // Thawed: connected again, copies made again, and new pages placed there too.
      const json back = WaitForStatus(
          borrower,
          [&](const json& s) {
            return state(s) == "up" && RemoteField(s, "degraded_pages") == 0 &&
                   RemoteField(s, "copies") == SumOverPeers(s, "pages_stored");
          },
          20000);
      INFO("status after the thaw: " << back.dump());
      CHECK(RemoteField(back, "lost_pages") == 0);
      WriteRandomRange(client, shadow, rng, 0, kWritten, 256 * kKiB, 0);
      const json again = WaitEvictionSettled(borrower);
      INFO("status after writing again: " << again.dump());
      CHECK(U64(again.at("peers").at(0), "pages_stored") > 0);
      CheckStatusInvariants(again);
      CHECK(CompareWithShadow(client, shadow, 0, kDeviceSize) == "");
    }
    CHECK_MESSAGE(borrower.Stop() == 0, borrower.StderrText());
  }

  // Repatriation: a lender told to leave (`memlend drain`, or SIGTERM) sends SHUTDOWN with a
  // deadline; the borrower moves every copy it keeps there to another lender (or, when the
  // page's other copy already is on the only lender left, drops that one copy), the lender
  // exits 0 once it holds nothing, and no page is lost.
  TEST_CASE("memlend drain and SIGTERM of lenders holding pages: moved elsewhere, nothing lost") {
    constexpr uint64_t kDeviceSize = 32 * kMiB;
    constexpr uint64_t kWritten = 16 * kMiB;
    for (const char* redundancy : {"none", "replicas:2"}) {
      INFO("redundancy " << redundancy);
      const uint64_t seed = TestSeed();
      INFO("seed " << seed);
      TempDir dir;
      const auto lenders = StartLenders(dir, 3, "32M", {"--drain-deadline", "20"});
      DaemonOptions options = Borrower("d0:32M", "4M", ListenAddresses(lenders));
      options.extra_args = {"--redundancy", redundancy};
      MemlendDaemon borrower(dir, options, "borrower");
        {
        NbdClient client(borrower.endpoint(), "d0");
        ShadowDevice shadow(kDeviceSize);
        const json settled = WriteAndSettle(client, shadow, seed, kWritten, borrower);
        INFO("settled status: " << settled.dump());
        const uint64_t held = U64(settled.at("peers").at(0), "pages_stored");
        REQUIRE(held > 0);

        const CommandResult drain = Drain(*lenders[0]);
        INFO("memlend drain: " << drain.stdout_text << drain.stderr_text);
        CHECK(drain.exit_status == 0);
        CHECK(drain.stdout_text.find("drained") != std::string::npos);
        CHECK(lenders[0]->Stop() == 0);  // it has exited on its own, with status 0
        const json after = WaitForStatus(
            borrower,
            [&](const json& s) {
              return s.at("peers").at(0).at("state") == "down" &&
                     U64(s.at("peers").at(0), "pages_stored") == 0;
            },
            10000);
        INFO("status after the drain: " << after.dump());
        CHECK(RemoteField(after, "lost_pages") == 0);
        CHECK(RemoteField(after, "moved_copies") >= held);
        CHECK(RemoteField(after, "degraded_pages") == 0);
        CheckStatusInvariants(after);
        CHECK(CompareWithShadow(client, shadow, 0, kDeviceSize) == "");

        // SIGTERM drains the same way (its --drain-deadline, 30 s by default).
        CHECK(lenders[1]->Stop(SIGTERM) == 0);
        const json second = WaitForStatus(
            borrower,
            [&](const json& s) { return U64(s.at("peers").at(1), "pages_stored") == 0; }, 10000);
        INFO("status after SIGTERM of the second lender: " << second.dump());
        CHECK(RemoteField(second, "lost_pages") == 0);
        CheckStatusInvariants(second);
        CHECK(CompareWithShadow(client, shadow, 0, kDeviceSize) == "");
      }
      CHECK_MESSAGE(borrower.Stop() == 0, borrower.StderrText());
      CHECK(lenders[2]->Stop() == 0);
    }
  }

  // Repatriation onto disk: the only lender drains, no other lender has room, and the borrower
  // has a backing file: every page it kept there moves to the disk, the lender exits 0, and
  // nothing is lost. The pages stay short of the lender copy `none` asks for (degraded) until
  // a lender is back.
  TEST_CASE("memlend drain of the only lender: its pages move to the borrower's backing file") {
    constexpr uint64_t kDeviceSize = 32 * kMiB;
    constexpr uint64_t kWritten = 16 * kMiB;
    const uint64_t seed = TestSeed();
    INFO("seed " << seed);
    TempDir dir;
    const auto lenders = StartLenders(dir, 1, "32M", {"--drain-deadline", "20"});
    DaemonOptions options = Borrower("d0:32M", "4M", ListenAddresses(lenders));
    options.backing_file = dir.File("backing.img");
    options.extra_args = {"--redundancy", "none"};
    MemlendDaemon borrower(dir, options, "borrower");
    {
      NbdClient client(borrower.endpoint(), "d0");
      ShadowDevice shadow(kDeviceSize);
      const json settled = WriteAndSettle(client, shadow, seed, kWritten, borrower);
      INFO("settled status: " << settled.dump());
      const uint64_t held = U64(settled.at("peers").at(0), "pages_stored");
      REQUIRE(held > 0);
      CHECK(RemoteField(settled, "disk_copies") == 0);

      const CommandResult drain = Drain(*lenders[0]);
      INFO("memlend drain: " << drain.stdout_text << drain.stderr_text);
      CHECK(drain.exit_status == 0);
      CHECK(lenders[0]->Stop() == 0);
      const json after = WaitForStatus(
          borrower, [&](const json& s) { return s.at("peers").at(0).at("state") == "down"; },
          10000);
      INFO("status after the drain: " << after.dump());
      CHECK(RemoteField(after, "lost_pages") == 0);
      CHECK(RemoteField(after, "disk_copies") == held);
      CHECK(RemoteField(after, "moved_copies") == held);
      CHECK(RemoteField(after, "copies") == 0);
      CHECK(RemoteField(after, "degraded_pages") == held);
      CheckStatusInvariants(after);
      CHECK(CompareWithShadow(client, shadow, 0, kDeviceSize) == "");
    }
    CHECK_MESSAGE(borrower.Stop() == 0, borrower.StderrText());
  }

  // Reclaim: a lender's pool shrinks at run time (`memlend lend --size`, and --reclaim-below
  // as if the host were short of memory: set far above MemAvailable). The lender hands free
  // memory back at once and asks its borrower for granted superpages (RECLAIM); the borrower
  // moves those pages to the other lender or to other superpages of the same one, and frees
  // them; `memlend lend` exits 0 once the pool is down to its size. Nothing is lost, and the
  // pools grow back.
  TEST_CASE("memlend lend --size and --reclaim-below shrink a lender: pages move, nothing lost") {
    constexpr uint64_t kDeviceSize = 32 * kMiB;
    constexpr uint64_t kPagesPer2M = 512;
    constexpr uint64_t kWritten = 16 * kMiB;
    const uint64_t seed = TestSeed();
    INFO("seed " << seed);
    TempDir dir;
    const auto lenders = StartLenders(dir, 2, "32M");
    DaemonOptions options = Borrower("d0:32M", "4M", ListenAddresses(lenders));
    options.extra_args = {"--redundancy", "none"};
    MemlendDaemon borrower(dir, options, "borrower");
    auto lending = [](MemlendDaemon& d, const char* key) { return U64(d.Status().at("lending"), key); };
    auto lend = [&](MemlendDaemon& lender, std::vector<std::string> args) {
      std::vector<std::string> command = {MemlendBinary(), "lend"};
      command.insert(command.end(), args.begin(), args.end());
      command.insert(command.end(), {"--deadline", "20", "--control", lender.control_path()});
      return RunCommand(command);
    };
    {
      NbdClient client(borrower.endpoint(), "d0");
      ShadowDevice shadow(kDeviceSize);
      const json settled = WriteAndSettle(client, shadow, seed, kWritten, borrower);
      INFO("settled status: " << settled.dump());
      const uint64_t on_first = U64(settled.at("peers").at(0), "pages_stored");
      REQUIRE(on_first > kPagesPer2M);  // more than the one superpage it will keep

      // Down to one superpage; the memory goes back to the host.
      const uint64_t rss_before = ProcStatusNumber(lenders[0]->pid(), "VmRSS");
      // A lender that locks its memory has all of its pool resident; one that does not (the
      // sanitized build) only what it granted.
      const bool locked = ProcStatusNumber(lenders[0]->pid(), "VmLck") >= 32 * 1024;
      CommandResult result = lend(*lenders[0], {"--size", "2M"});
      INFO("memlend lend --size 2M: " << result.stdout_text << result.stderr_text);
      CHECK(result.exit_status == 0);
      CHECK(lending(*lenders[0], "total_bytes") == 2 * kMiB);
      CHECK(lending(*lenders[0], "target_bytes") == 2 * kMiB);
      CHECK(lending(*lenders[0], "max_bytes") == 32 * kMiB);
      // The 15 superpages retired when its memory is locked (hence resident); else at least
      // two of the three it held besides the one kept (the heap moves a little meanwhile).
      const uint64_t rss_after = ProcStatusNumber(lenders[0]->pid(), "VmRSS");
      CHECK(rss_before >= rss_after + (locked ? 24 * 1024 : 2 * 2048));
      MESSAGE("lender RSS " << rss_before << " KiB before the shrink to 2M, " << rss_after
                            << " KiB after");
      json after = WaitForStatus(
          borrower,
          [&](const json& s) { return U64(s.at("peers").at(0), "superpages_held") <= 1; }, 10000);
      INFO("status after the shrink: " << after.dump());
      CHECK(U64(after.at("peers").at(0), "pages_stored") <= kPagesPer2M);
      CHECK(U64(after.at("peers").at(0), "superpages_reclaimed") == 0);
      CHECK(RemoteField(after, "lost_pages") == 0);
      CHECK(RemoteField(after, "moved_copies") > 0);
      CheckStatusInvariants(after);
      CHECK(CompareWithShadow(client, shadow, 0, kDeviceSize) == "");

      // Past what it was made with: refused, naming the most.
      result = lend(*lenders[0], {"--size", "64M"});
      CHECK(result.exit_status == 1);
      CHECK(result.stderr_text.find("32.0 MiB at most") != std::string::npos);
      // Back to its whole size, at once.
      result = lend(*lenders[0], {"--size", "32M"});
      INFO("memlend lend --size 32M: " << result.stdout_text << result.stderr_text);
      CHECK(result.exit_status == 0);
      CHECK(lending(*lenders[0], "total_bytes") == 32 * kMiB);

      // "Memory pressure" on the second lender: everything it holds moves to the first.
      result = lend(*lenders[1], {"--reclaim-below", "1T"});
      INFO("memlend lend --reclaim-below 1T: " << result.stdout_text << result.stderr_text);
      CHECK(result.exit_status == 0);
      CHECK(lending(*lenders[1], "total_bytes") == 0);
      after = WaitForStatus(
          borrower, [&](const json& s) { return U64(s.at("peers").at(1), "pages_stored") == 0; },
          10000);
      INFO("status after the pressure: " << after.dump());
      CHECK(U64(after.at("peers").at(1), "pages_stored") == 0);
      CHECK(RemoteField(after, "lost_pages") == 0);
      CheckStatusInvariants(after);
      CHECK(CompareWithShadow(client, shadow, 0, kDeviceSize) == "");
      // The pressure is gone: the pool grows back.
      result = lend(*lenders[1], {"--reclaim-below", "off"});
      CHECK(result.exit_status == 0);
      CHECK(lending(*lenders[1], "total_bytes") == 32 * kMiB);
      CHECK(lending(*lenders[1], "reclaim_below_bytes") == 0);
    }
    CHECK_MESSAGE(borrower.Stop() == 0, borrower.StderrText());
    for (const auto& lender : lenders) CHECK(lender->Stop() == 0);
  }

  // Membership while serving: `memlend peer add` of a lender the daemon was not started with
  // (used for new pages at once), `memlend peer remove` of one holding pages (they move to the
  // others first, the lender ends up holding nothing, nothing is lost), adding it back, and the
  // refusals (a peer twice, one that is not a peer, a malformed address).
  TEST_CASE("memlend peer add and remove while serving: pages move off first, nothing lost") {
    constexpr uint64_t kDeviceSize = 32 * kMiB;
    constexpr uint64_t kWritten = 16 * kMiB;
    for (const char* redundancy : {"none", "replicas:2"}) {
      INFO("redundancy " << redundancy);
      const uint64_t seed = TestSeed();
      INFO("seed " << seed);
      TempDir dir;
      const auto lenders = StartLenders(dir, 3, "32M");
      const std::vector<std::string> addresses = ListenAddresses(lenders);
      DaemonOptions options = Borrower("d0:32M", "4M", {addresses[0], addresses[1]});
      options.extra_args = {"--redundancy", redundancy};
      MemlendDaemon borrower(dir, options, "borrower");
      auto peer_command = [&](std::vector<std::string> args) {
        std::vector<std::string> argv = {MemlendBinary(), "peer"};
        argv.insert(argv.end(), args.begin(), args.end());
        argv.insert(argv.end(), {"--control", borrower.control_path()});
        return RunCommand(argv);
      };
      auto peer_of = [](const json& s, const std::string& address) -> json {
        for (const json& p : s.at("peers")) {
          if (p.at("address") == address) return p;
        }
        return nullptr;
      };
      {
        NbdClient client(borrower.endpoint(), "d0");
        ShadowDevice shadow(kDeviceSize);
        std::mt19937_64 rng(seed);
        WriteRandomRange(client, shadow, rng, 0, kWritten / 2, 256 * kKiB, 0);

        const CommandResult add = peer_command({"add", addresses[2]});
        INFO("peer add: " << add.stdout_text << add.stderr_text);
        CHECK(add.exit_status == 0);
        CHECK(add.stdout_text.find("added: up") != std::string::npos);
        const CommandResult again = peer_command({"add", addresses[2]});
        CHECK(again.exit_status == 1);
        CHECK(again.stderr_text.find("is a peer already") != std::string::npos);
        const CommandResult bad = peer_command({"add", "no-port-here"});
        CHECK(bad.exit_status == 1);
        CHECK(bad.stderr_text.find("address") != std::string::npos);
        const CommandResult unknown = peer_command({"remove", "127.0.0.1:1"});
        CHECK(unknown.exit_status == 1);
        CHECK(unknown.stderr_text.find("is not a peer") != std::string::npos);

        // The new peer takes part of what is written next.
        WriteRandomRange(client, shadow, rng, kWritten / 2, kWritten, 256 * kKiB, 0);
        const json settled = WaitEvictionSettled(borrower);
        INFO("settled status: " << settled.dump());
        REQUIRE(settled.at("peers").size() == 3);
        CHECK(U64(peer_of(settled, addresses[2]), "pages_stored") > 0);
        const uint64_t held = U64(peer_of(settled, addresses[0]), "pages_stored");
        REQUIRE(held > 0);

        const CommandResult remove = peer_command({"remove", addresses[0], "--deadline", "30"});
        INFO("peer remove: " << remove.stdout_text << remove.stderr_text);
        CHECK(remove.exit_status == 0);
        CHECK(remove.stdout_text.find("removed") != std::string::npos);
        const json after = borrower.Status();
        INFO("status after the removal: " << after.dump());
        CHECK(peer_of(after, addresses[0]).is_null());
        CHECK(after.at("peers").size() == 2);
        CHECK(U64(after.at("remote_store"), "lost_pages") == 0);
        CHECK(U64(after.at("remote_store"), "degraded_pages") == 0);
        CHECK(U64(after.at("remote_store"), "moved_copies") >= held);
        // The session ended, so the lender gave back everything it granted us.
        CHECK(Eventually([&] { return LendingUsed(*lenders[0]) == 0; }, 5000));
        CHECK(CompareWithShadow(client, shadow, 0, kDeviceSize) == "");
        CheckRemoteAccounting(borrower, {lenders[1].get(), lenders[2].get()});

        // Back again: a new session, used for pages written from now on.
        const CommandResult readd = peer_command({"add", addresses[0]});
        INFO("peer add again: " << readd.stdout_text << readd.stderr_text);
        CHECK(readd.exit_status == 0);
        const json back = borrower.Status();
        CHECK(peer_of(back, addresses[0]).value("state", std::string()) == "up");
        CHECK(CompareWithShadow(client, shadow, 0, kDeviceSize) == "");
      }
      CHECK_MESSAGE(borrower.Stop() == 0, borrower.StderrText());
      for (const auto& lender : lenders) CHECK(lender->Stop() == 0);
    }
  }

  // kill -STOP of a lender: its requests miss their deadline, it turns suspect (no new pages),
  // then down after --peer-down-after (its pages are lost, and counted); no read or write waits
  // on it for longer than that, writes go on to the local store and the backing file, and once
  // it is thawed the borrower connects again and places pages there.
  TEST_CASE("a frozen lender turns suspect, then down; nothing waits on it, and it is used again") {
    constexpr uint64_t kDeviceSize = 32 * kMiB;
    constexpr uint64_t kFirst = 16 * kMiB;  // [0, 16M): written first, mostly on the lender
    const uint64_t seed = TestSeed();
    INFO("seed " << seed);
    TempDir dir;
    MemlendDaemon lender(dir, Lender("32M"), "lender");
    // Whatever happens below, the lender is thawed before it is stopped.
    struct Thaw {
      pid_t pid;
      ~Thaw() { ::kill(pid, SIGCONT); }
    } thaw{lender.pid()};
    DaemonOptions options = Borrower("d0:32M", "4M", {lender.ListenAddress()});
    options.backing_file = dir.File("backing.img");
    options.extra_args = {"--peer-timeout", "200", "--peer-down-after", "2000",
                          "--redundancy", "none"};  // pages on the lender alone
    MemlendDaemon borrower(dir, options, "borrower");
    auto peer_state = [](const json& s) { return s.at("peers").at(0).at("state").get<std::string>(); };
    {
      NbdClient client(borrower.endpoint(), "d0");
      ShadowDevice shadow(kDeviceSize);
      std::mt19937_64 rng(seed);
      WriteRandomRange(client, shadow, rng, 0, kFirst, 256 * kKiB, 0);
      const json settled = WaitEvictionSettled(borrower);
      INFO("settled status: " << settled.dump());
      const uint64_t on_lender = GetDevicePages(settled, "d0").remote;
      REQUIRE(on_lender > 0);
      REQUIRE(peer_state(settled) == "up");

      REQUIRE(::kill(lender.pid(), SIGSTOP) == 0);
      // A heartbeat misses its deadline: suspect (or down already, on a slow machine).
      const json suspect = WaitForStatus(
          borrower, [&](const json& s) { return peer_state(s) != "up"; }, 10000);
      INFO("status once frozen: " << suspect.dump());
      if (peer_state(suspect) == "suspect") {
        CHECK(suspect.at("peers").at(0).at("error").get<std::string>().find("no reply in time") !=
              std::string::npos);
      }
      // Writes go on meanwhile, to the local store and the backing file.
      WriteRandomRange(client, shadow, rng, kFirst, 8 * kMiB, 256 * kKiB, 0);
      const json down = WaitForStatus(
          borrower,
          [&](const json& s) {
            // ... and the pages that were only there are counted as lost.
            return peer_state(s) == "down" &&
                   s.at("remote_store").value("lost_pages", uint64_t{0}) ==
                       s.at("peers").at(0).value("pages_lost", uint64_t{0});
          },
          15000);
      INFO("status once down: " << down.dump());
      CHECK(down.at("peers").at(0).at("error").get<std::string>().find("no reply in time") !=
            std::string::npos);
      const uint64_t lost = down.at("remote_store").value("lost_pages", uint64_t{0});
      CHECK(lost > 0);
      CHECK(lost <= on_lender);
      CheckStatusInvariants(down);
      CHECK(CompareWithShadow(client, shadow, kFirst, 8 * kMiB) == "");
      // The first range: intact, or EIO for exactly the pages that were lost; never wrong data.
      const PageReads reads = ReadPages(client, shadow, kFirst);
      INFO("reads of the first range: " << reads.eio << " EIO, " << reads.other_errors
                                        << " other errors, " << reads.wrong << " wrong");
      CHECK(reads.wrong == 0);
      CHECK(reads.other_errors == 0);
      CHECK(reads.eio == lost);

      // Thawed: the borrower connects again (a new session) and places pages there.
      REQUIRE(::kill(lender.pid(), SIGCONT) == 0);
      WaitForStatus(borrower, [&](const json& s) { return peer_state(s) == "up"; }, 15000);
      WriteRandomRange(client, shadow, rng, 0, kFirst, 256 * kKiB, 0);  // the lost pages too
      const json again = WaitEvictionSettled(borrower);
      INFO("status after the lender came back: " << again.dump());
      CHECK(U64(again.at("peers").at(0), "pages_stored") > 0);
      CHECK(again.at("remote_store").value("lost_pages", uint64_t{0}) == 0);
      CheckStatusInvariants(again);
      CHECK(CompareWithShadow(client, shadow, 0, kDeviceSize) == "");
    }
    CHECK_MESSAGE(borrower.Stop() == 0, borrower.StderrText());
  }
}

namespace {

// Clean pages: a borrower with a backing file and a lender that is not up yet spills most of
// device d0 to disk; once a lender is up, reading d0 back promotes pages into the local store
// as clean pages (their disk copies stay), and dirty writes to device d1 then push them out
// again. With protocol auto they go to the lender's ephemeral pool (cached) and read back from
// there; with protocol passive they are dropped back to their disk copies. Then d1 fills the
// lender with dirty pages, which must take the room of the cached pages (the lender evicts them
// and tells the borrower). Data reads back intact throughout.
void CleanPagesScenario(bool passive) {
  const uint64_t seed = TestSeed();
  const std::string protocol = passive ? "passive" : "auto";
  INFO("seed " << seed << ", protocol " << protocol);
  TempDir dir;
  const int lender_port = PickFreeTcpPort();  // nobody listens here yet
  const std::string lender_address = "127.0.0.1:" + std::to_string(lender_port);
  DaemonOptions options =
      Borrower(passive ? "d0:16M:passive" : "d0:16M", "4M", {lender_address});
  options.devices.push_back("d1:16M");
  options.backing_file = dir.File("backing.img");
  // none: d1's dirty pages go to the lender through the passive protocol, not to disk.
  options.extra_args = {"--redundancy", "none"};
  MemlendDaemon borrower(dir, options, "borrower");
  std::optional<MemlendDaemon> lender;
  {
    NbdClient d0(borrower.endpoint(), "d0");
    NbdClient d1(borrower.endpoint(), "d1");
    ShadowDevice shadow0(16 * kMiB);
    ShadowDevice shadow1(16 * kMiB);
    std::mt19937_64 rng(seed);

    // d0 mostly on disk; d1 then takes the local store and is trimmed away, which leaves the
    // local store under its low watermark so that reads promote pages.
    WriteRandomRange(d0, shadow0, rng, 0, 12 * kMiB, 256 * kKiB, 20);
    WriteRandomRange(d1, shadow1, rng, 0, 4 * kMiB, 256 * kKiB, 0);
    WaitEvictionSettled(borrower);
    d1.Trim(16 * kMiB, 0);
    shadow1.Zero(0, 16 * kMiB);

    lender.emplace(dir, Lender("8M", lender_port), "lender");
    json status = WaitForStatus(
        borrower, [&](const json& s) { return PeerEntry(s, lender_address).at("state") == "up"; },
        6000);
    REQUIRE_MESSAGE(PeerEntry(status, lender_address).at("state") == "up",
                    "the lender was not up within 6 s: " << status.dump());

    CHECK(CompareWithShadow(d0, shadow0) == "");
    status = borrower.Status();
    const DevicePages promoted = GetDevicePages(status, "d0");
    {
      INFO("status after reading d0: " << status.dump());
      CheckStatusInvariants(status);
      CHECK(promoted.clean > 0);
      CHECK(promoted.cached == 0);
    }

    // Dirty pages of d1 push d0's clean pages out of the local store.
    WriteRandomRange(d1, shadow1, rng, 0, 6 * kMiB, 256 * kKiB, 0);
    status = WaitEvictionSettled(borrower);
    const DevicePages evicted = GetDevicePages(status, "d0");
    const uint64_t cached_pages = U64(status.at("remote_store"), "cached_pages");
    {
      INFO("settled status after writing d1: " << status.dump());
      CheckStatusInvariants(status);
      CHECK(evicted.clean < promoted.clean);
      if (passive) {
        CHECK(evicted.cached == 0);
        CHECK(cached_pages == 0);
        CHECK(U64(PeerEntry(status, lender_address), "pages_cached") == 0);
      } else {
        CHECK(evicted.cached > 0);
        CHECK(cached_pages > 0);
        CHECK(cached_pages <= evicted.cached);
        CHECK(U64(PeerEntry(status, lender_address), "pages_cached") == cached_pages);
        // The lender counts the cached pages as used, beside the borrower's superpages.
        CHECK(LendingUsed(*lender) >=
              U64(status.at("remote_store"), "used_bytes") + cached_pages * kPageSize);
      }
    }
    CHECK(CompareWithShadow(d0, shadow0) == "");
    CHECK(CompareWithShadow(d1, shadow1) == "");

    // d1 now wants more than the lender has: the dirty pages take the room of the cached ones.
    const uint64_t cached_before = U64(borrower.Status().at("remote_store"), "cached_pages");
    WriteRandomRange(d1, shadow1, rng, 6 * kMiB, 10 * kMiB, 256 * kKiB, 0);
    status = WaitEvictionSettled(borrower);
    {
      INFO("settled status after filling d1: " << status.dump());
      CheckStatusInvariants(status);
      const uint64_t cached_after = U64(status.at("remote_store"), "cached_pages");
      if (!passive && cached_before > 0) {
        CHECK_MESSAGE(cached_after < cached_before,
                      "the lender never gave up cached pages for dirty ones");
      }
      CHECK(GetDevicePages(status, "d1").remote > 0);
      MESSAGE(protocol << ": d0 clean pages after reads " << promoted.clean << ", cached after d1 "
                       << evicted.cached << " (lender holds " << cached_before
                       << "), cached after d1 filled the lender " << cached_after);
    }
    CHECK(CompareWithShadow(d0, shadow0) == "");
    CHECK(CompareWithShadow(d1, shadow1) == "");
    CheckStatusInvariants(borrower.Status());
  }
  CHECK_MESSAGE(borrower.Stop() == 0, borrower.StderrText());
  CHECK_MESSAGE(lender->Stop() == 0, lender->StderrText());
}

}  // namespace

TEST_SUITE("cache") {
  TEST_CASE("clean pages are cached in a lender's ephemeral pool (protocol auto)") {
    CleanPagesScenario(/*passive=*/false);
  }
  TEST_CASE("clean pages are dropped back to disk, never cached (protocol passive)") {
    CleanPagesScenario(/*passive=*/true);
  }
}

}  // namespace memlend::integration
