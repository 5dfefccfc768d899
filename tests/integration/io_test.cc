// Data-path integration tests through libnbd: random I/O against a shadow copy, TRIM and
// WRITE_ZEROES with their effect on the status page counts, and several connections at once.

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "harness.h"
#include "workload.h"

namespace memlend::integration {
namespace {

void RandomIoAgainstShadow(Transport transport, const std::string& compress) {
  constexpr uint64_t kDeviceSize = 16 * kMiB;
  constexpr int kOperations = 2500;
  const uint64_t seed = TestSeed();
  INFO("seed " << seed << ", transport " << std::string(TransportName(transport)) << ", compress "
               << compress);

  TempDir dir;
  DaemonOptions options;
  options.devices = {"d0:16M"};
  options.transport = transport;
  options.compress = compress;
  MemlendDaemon daemon(dir, options);
  {
    std::mt19937_64 rng(seed);
    ShadowDevice shadow(kDeviceSize);
    {
      NbdClient client(daemon.endpoint(), "d0");
      REQUIRE(client.Size() == kDeviceSize);
      // A new device reads as zeros everywhere.
      CHECK(CompareWithShadow(client, shadow) == "");
      CHECK(RandomIoSession(client, shadow, 0, kDeviceSize, kOperations, rng) == "");
    }
    // A second, fresh connection sees the same contents.
    {
      NbdClient client(daemon.endpoint(), "d0");
      CHECK(CompareWithShadow(client, shadow) == "");
    }
    CheckStatusInvariants(daemon.Status());
  }  // Clients disconnect before the daemon is stopped.
  CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
}

}  // namespace

TEST_SUITE("random_io") {
  TEST_CASE("random reads and writes over unix, compress none") {
    RandomIoAgainstShadow(Transport::kUnix, "none");
  }
  TEST_CASE("random reads and writes over unix, compress lz4") {
    RandomIoAgainstShadow(Transport::kUnix, "lz4");
  }
  TEST_CASE("random reads and writes over tcp, compress none") {
    RandomIoAgainstShadow(Transport::kTcp, "none");
  }
  TEST_CASE("random reads and writes over tcp, compress lz4") {
    RandomIoAgainstShadow(Transport::kTcp, "lz4");
  }
  TEST_CASE("random reads and writes over tcp on the IPv6 loopback [::1]") {
    if (!Ipv6LoopbackAvailable()) {
      MESSAGE("skipped: this host has no IPv6 loopback");
      return;
    }
    RandomIoAgainstShadow(Transport::kTcp6, "none");
  }

  // Two devices on one daemon: exports are selected by name, have their own sizes, and what is
  // done to one never shows in the other.
  TEST_CASE("two devices are independent") {
    constexpr uint64_t kSizeA = 4 * kMiB;
    constexpr uint64_t kSizeB = 8 * kMiB;
    TempDir dir;
    DaemonOptions options;
    options.devices = {"a:4M", "b:8M"};
    MemlendDaemon daemon(dir, options);
    {
      NbdClient a(daemon.endpoint(), "a");
      NbdClient b(daemon.endpoint(), "b");
      CHECK(a.Size() == kSizeA);
      CHECK(b.Size() == kSizeB);
      ShadowDevice shadow_a(kSizeA);
      ShadowDevice shadow_b(kSizeB);
      std::mt19937_64 rng(TestSeed());

      std::vector<uint8_t> data(kSizeA);
      FillContent(rng, data, Content::kRandom);
      a.Write(data, 0);
      shadow_a.Write(0, data);
      FillContent(rng, data, Content::kText);
      b.Write(data, 0);
      shadow_b.Write(0, data);
      CHECK(CompareWithShadow(a, shadow_a) == "");
      CHECK(CompareWithShadow(b, shadow_b) == "");

      a.Trim(kSizeA, 0);
      shadow_a.Zero(0, kSizeA);
      b.Zero(1 * kMiB, 0);
      shadow_b.Zero(0, 1 * kMiB);
      CHECK(CompareWithShadow(a, shadow_a) == "");
      CHECK(CompareWithShadow(b, shadow_b) == "");

      nlohmann::json status = daemon.Status();
      INFO("status: " << status.dump());
      CheckStatusInvariants(status);
      CHECK(status.at("devices").size() == 2);
      DevicePages pages_a = GetDevicePages(status, "a");
      DevicePages pages_b = GetDevicePages(status, "b");
      CHECK(pages_a.size_bytes == kSizeA);
      CHECK(pages_a.mapped == 0);
      CHECK(pages_b.size_bytes == kSizeB);
      CHECK(pages_b.mapped == kSizeA / kPageSize);
      CHECK(pages_b.zero == 1 * kMiB / kPageSize);
      CHECK(pages_b.local == (kSizeA - 1 * kMiB) / kPageSize);
    }  // Clients disconnect before the daemon is stopped.
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }
}

TEST_SUITE("trim_zero") {
  // Walks a 256-page device through writes, WRITE_ZEROES and TRIM, aligned and not, checking
  // after each step that the data reads back as expected (zeros in the range, neighbours intact)
  // and that `memlend status` counts the pages as the step implies.
  TEST_CASE("trim and write zeroes read back zeros and update page counts") {
    constexpr uint64_t kPages = 256;
    constexpr uint64_t kDeviceSize = kPages * kPageSize;
    TempDir dir;
    DaemonOptions options;
    options.devices = {"d0:1M"};
    options.compress = "none";
    MemlendDaemon daemon(dir, options);
    {
      NbdClient client(daemon.endpoint(), "d0");
      ShadowDevice shadow(kDeviceSize);
      std::mt19937_64 rng(TestSeed());

      // The page counts the daemon should report, kept up to date by each step.
      DevicePages expected;
      auto check_step = [&](const char* step) {
        INFO("after: " << step);
        CHECK(CompareWithShadow(client, shadow) == "");
        nlohmann::json status = daemon.Status();
        CheckStatusInvariants(status);
        DevicePages pages = GetDevicePages(status, "d0");
        INFO("status: " << status.dump());
        CHECK(pages.total == kPages);
        CHECK(pages.mapped == expected.mapped);
        CHECK(pages.zero == expected.zero);
        CHECK(pages.local == expected.local);
        CHECK(pages.disk == 0);
      };
      auto page = [](uint64_t index) { return index * kPageSize; };

      check_step("nothing written");

      // Fill the whole device with random data: every page is local.
      std::vector<uint8_t> data(kDeviceSize);
      FillRandom(rng, data);
      client.Write(data, 0);
      shadow.Write(0, data);
      expected = {.mapped = kPages, .local = kPages};
      check_step("random data written everywhere");

      // Aligned WRITE_ZEROES of pages 16..31: they become zero pages.
      client.Zero(16 * kPageSize, page(16));
      shadow.Zero(page(16), 16 * kPageSize);
      expected.zero += 16;
      expected.local -= 16;
      check_step("aligned WRITE_ZEROES of pages 16..31");

      // Aligned TRIM of pages 64..79: they are no longer mapped.
      client.Trim(16 * kPageSize, page(64));
      shadow.Zero(page(64), 16 * kPageSize);
      expected.mapped -= 16;
      expected.local -= 16;
      check_step("aligned TRIM of pages 64..79");

      // Unaligned WRITE_ZEROES (with FUA) from 100 bytes into page 100 to 100 bytes into page 103:
      // pages 101 and 102 are wholly zero, pages 100 and 103 keep their other bytes.
      client.Zero(3 * kPageSize, page(100) + 100, LIBNBD_CMD_FLAG_FUA);
      shadow.Zero(page(100) + 100, 3 * kPageSize);
      expected.zero += 2;
      expected.local -= 2;
      check_step("unaligned WRITE_ZEROES over pages 100..103");

      // Unaligned TRIM from 2000 bytes into page 150 to 2000 bytes into page 154: pages 151..153
      // are unmapped, the partial pages at both ends read zeros in the range and keep the rest.
      client.Trim(4 * kPageSize, page(150) + 2000);
      shadow.Zero(page(150) + 2000, 4 * kPageSize);
      expected.mapped -= 3;
      expected.local -= 3;
      check_step("unaligned TRIM over pages 150..154");

      // Sub-page WRITE_ZEROES and TRIM inside single pages: the pages keep their other data.
      client.Zero(100, page(200) + 10);
      shadow.Zero(page(200) + 10, 100);
      client.Trim(1, page(201) + 4095);
      shadow.Zero(page(201) + 4095, 1);
      check_step("sub-page WRITE_ZEROES in page 200 and TRIM of the last byte of page 201");

      // A WRITE whose data is all zeros makes a zero page too.
      std::vector<uint8_t> zeros(kPageSize, 0);
      client.Write(zeros, page(210));
      shadow.Write(page(210), zeros);
      expected.zero += 1;
      expected.local -= 1;
      check_step("WRITE of an all-zero page 210");

      // A sub-page write into a trimmed page maps it again as a local page.
      std::vector<uint8_t> bytes(10);
      FillContent(rng, bytes, Content::kRepeatedByte);
      client.Write(bytes, page(70) + 5);
      shadow.Write(page(70) + 5, bytes);
      expected.mapped += 1;
      expected.local += 1;
      check_step("sub-page WRITE into trimmed page 70");

      // Overwriting a zero page with data makes it local again.
      FillRandom(rng, std::span<uint8_t>(data.data(), kPageSize));
      client.Write(std::span<const uint8_t>(data.data(), kPageSize), page(20));
      shadow.Write(page(20), std::span<const uint8_t>(data.data(), kPageSize));
      expected.zero -= 1;
      expected.local += 1;
      check_step("WRITE of random data over zero page 20");

      // TRIM of the whole device unmaps everything and frees the local store.
      client.Trim(kDeviceSize, 0);
      shadow.Zero(0, kDeviceSize);
      expected = {};
      check_step("TRIM of the whole device");
      nlohmann::json status = daemon.Status();
      INFO("status: " << status.dump());
      CHECK(status.at("local_store").at("pages") == 0);
      CHECK(status.at("local_store").at("used_bytes") == 0);

    }  // Clients disconnect before the daemon is stopped.
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }
}

TEST_SUITE("multi_conn") {
  // Four threads, each with its own connection, run random I/O on disjoint quarters of the
  // device at the same time; afterwards a fifth connection checks the whole device.
  TEST_CASE("parallel connections on disjoint regions") {
    constexpr uint64_t kDeviceSize = 32 * kMiB;
    constexpr int kThreads = 4;
    constexpr uint64_t kRegionSize = kDeviceSize / kThreads;
    TempDir dir;
    DaemonOptions options;
    options.devices = {"d0:32M"};
    options.transport = Transport::kTcp;
    MemlendDaemon daemon(dir, options);
    {
      NbdClient checker(daemon.endpoint(), "d0");
      CHECK(nbd_can_multi_conn(checker.handle()) == 1);
      CHECK(nbd_can_flush(checker.handle()) == 1);
      CHECK(nbd_can_fua(checker.handle()) == 1);
      CHECK(nbd_can_trim(checker.handle()) == 1);
      CHECK(nbd_can_zero(checker.handle()) == 1);
      CHECK(nbd_is_read_only(checker.handle()) == 0);
      CHECK(nbd_get_block_size(checker.handle(), LIBNBD_SIZE_MINIMUM) == 1);
      CHECK(nbd_get_block_size(checker.handle(), LIBNBD_SIZE_PREFERRED) == 4096);
      CHECK(nbd_get_block_size(checker.handle(), LIBNBD_SIZE_MAXIMUM) == 32 * kMiB);

      // Every thread records into the one shadow, but only inside its own region.
      ShadowDevice shadow(kDeviceSize);
      std::vector<std::string> failures(kThreads);
      std::atomic<int> finished = 0;
      std::vector<std::thread> threads;
      const uint64_t seed = TestSeed();
      INFO("seed " << seed);
      for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, t] {
          try {
            NbdClient client(daemon.endpoint(), "d0");
            std::mt19937_64 rng(seed + static_cast<uint64_t>(t));
            failures[t] = RandomIoSession(client, shadow, t * kRegionSize, kRegionSize, 600, rng);
          } catch (const std::exception& error) {
            failures[t] = error.what();
          }
          ++finished;
        });
      }
      // Meanwhile `memlend status` answers with sane numbers. (The exact invariants are checked
      // once the I/O is over: a snapshot taken mid-flight need not be atomic.)
      int statuses = 0;
      while (finished.load() < kThreads) {
        nlohmann::json status = daemon.Status();
        ++statuses;
        DevicePages pages = GetDevicePages(status, "d0");
        INFO("status during I/O: " << status.dump());
        CHECK(pages.mapped <= pages.total);
        CHECK(status.at("local_store").at("used_bytes").get<uint64_t>() <=
              status.at("local_store").at("total_bytes").get<uint64_t>());
      }
      MESSAGE("status queries answered during the parallel I/O: " << statuses);
      for (std::thread& thread : threads) thread.join();
      for (int t = 0; t < kThreads; ++t) {
        INFO("thread " << t);
        CHECK(failures[t] == "");
      }
      CHECK(CompareWithShadow(checker, shadow) == "");

      // What one connection writes and flushes, another sees (the promise of CAN_MULTI_CONN).
      NbdClient writer(daemon.endpoint(), "d0");
      std::mt19937_64 rng(seed);
      std::vector<uint8_t> data(3 * kPageSize + 123);
      FillRandom(rng, data);
      writer.Write(data, 5 * kMiB + 77);
      writer.Flush();
      shadow.Write(5 * kMiB + 77, data);
      CHECK(CompareWithShadow(checker, shadow, 5 * kMiB, 4 * kPageSize + 200) == "");

      CheckStatusInvariants(daemon.Status());
    }  // Clients disconnect before the daemon is stopped.
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }

  // Four connections write byte ranges that share pages: thread t owns bytes [t*1024, t*1024+1024)
  // of every page. Each sub-page write is a read-modify-write inside the daemon, so without
  // per-page serialization one thread's update would be lost under another's.
  TEST_CASE("parallel sub-page writes to shared pages are not lost") {
    constexpr uint64_t kPages = 64;
    constexpr int kThreads = 4;
    constexpr uint64_t kSlice = kPageSize / kThreads;
    constexpr int kRounds = 20;
    TempDir dir;
    DaemonOptions options;
    options.devices = {"d0:1M"};
    MemlendDaemon daemon(dir, options);
    {
      ShadowDevice shadow(kPages * kPageSize);
      std::vector<std::string> failures(kThreads);
      std::vector<std::thread> threads;
      const uint64_t seed = TestSeed();
      INFO("seed " << seed);
      for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, t] {
          try {
            NbdClient client(daemon.endpoint(), "d0");
            std::mt19937_64 rng(seed * 31 + static_cast<uint64_t>(t));
            std::vector<uint8_t> slice(kSlice);
            for (int round = 0; round < kRounds; ++round) {
              for (uint64_t p = 0; p < kPages; ++p) {
                FillRandom(rng, slice);
                uint64_t offset = p * kPageSize + static_cast<uint64_t>(t) * kSlice;
                client.Write(slice, offset);
                shadow.Write(offset, slice);  // disjoint bytes per thread: no race on the shadow
              }
            }
          } catch (const std::exception& error) {
            failures[t] = error.what();
          }
        });
      }
      for (std::thread& thread : threads) thread.join();
      for (int t = 0; t < kThreads; ++t) {
        INFO("thread " << t);
        CHECK(failures[t] == "");
      }
      NbdClient checker(daemon.endpoint(), "d0");
      CHECK(CompareWithShadow(checker, shadow) == "");
    }  // Clients disconnect before the daemon is stopped.
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }

  // 48 connections open at the same time, each writing its own page and reading its neighbour's.
  TEST_CASE("many simultaneous connections") {
    constexpr int kConnections = 48;
    TempDir dir;
    DaemonOptions options;
    options.devices = {"d0:1M"};
    MemlendDaemon daemon(dir, options);
    {
      std::vector<std::unique_ptr<NbdClient>> clients;
      for (int i = 0; i < kConnections; ++i) {
        clients.push_back(std::make_unique<NbdClient>(daemon.endpoint(), "d0"));
      }
      std::mt19937_64 rng(TestSeed());
      ShadowDevice shadow(1 * kMiB);
      std::vector<uint8_t> page(kPageSize);
      for (int i = 0; i < kConnections; ++i) {
        FillRandom(rng, page);
        clients[i]->Write(page, i * kPageSize);
        shadow.Write(i * kPageSize, page);
      }
      for (int i = 0; i < kConnections; ++i) {
        uint64_t neighbour = static_cast<uint64_t>((i + 1) % kConnections) * kPageSize;
        clients[i]->Read(page, neighbour);
        INFO("connection " << i);
        CHECK(DescribeMismatch(shadow.Range(neighbour, kPageSize), page, neighbour) == "");
      }
    }  // Clients disconnect before the daemon is stopped.
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }

  // One connection with many requests in flight at once through libnbd's asynchronous API:
  // 512 writes to disjoint slots (so their order does not matter), then 512 reads.
  TEST_CASE("pipelined requests on one connection") {
    constexpr uint64_t kSlots = 512;
    constexpr uint64_t kSlotSize = 64 * kKiB;
    constexpr int kMaxInFlight = 64;
    TempDir dir;
    DaemonOptions options;
    options.devices = {"d0:32M"};
    MemlendDaemon daemon(dir, options);
    {
      NbdClient client(daemon.endpoint(), "d0");
      nbd_handle* h = client.handle();
      std::mt19937_64 rng(TestSeed());

      // Each slot gets one write of random length at a random offset inside the slot.
      struct Request {
        uint64_t offset;
        std::vector<uint8_t> data;
        std::vector<uint8_t> read_back;
        int64_t cookie = -1;
      };
      std::vector<Request> requests(kSlots);
      for (uint64_t i = 0; i < kSlots; ++i) {
        uint64_t length = RandomIn(rng, 1, kSlotSize);
        requests[i].offset = i * kSlotSize + RandomIn(rng, 0, kSlotSize - length);
        requests[i].data.resize(length);
        FillContent(rng, requests[i].data, RandomContent(rng));
        requests[i].read_back.resize(length);
      }

      // Keeps at most kMaxInFlight commands outstanding; returns false if the daemon stops
      // answering (hang guard) or the connection fails.
      auto wait_until_below = [&](int limit) {
        while (nbd_aio_in_flight(h) > limit) {
          if (nbd_poll(h, kHangGuardMs) <= 0) return false;
        }
        return true;
      };
      auto collect = [&](const char* what) {
        for (uint64_t i = 0; i < kSlots; ++i) {
          INFO(what << " " << i << " at " << requests[i].offset << " +" << requests[i].data.size());
          CHECK(nbd_aio_command_completed(h, static_cast<uint64_t>(requests[i].cookie)) == 1);
        }
      };

      int max_seen_in_flight = 0;
      for (Request& r : requests) {
        REQUIRE(wait_until_below(kMaxInFlight - 1));
        r.cookie =
            nbd_aio_pwrite(h, r.data.data(), r.data.size(), r.offset, nbd_completion_callback{}, 0);
        REQUIRE_MESSAGE(r.cookie > 0, nbd_get_error());
        max_seen_in_flight = std::max(max_seen_in_flight, nbd_aio_in_flight(h));
      }
      REQUIRE(wait_until_below(0));
      collect("write");
      // Requests really were pipelined, not sent one at a time.
      CHECK(max_seen_in_flight > 1);

      for (Request& r : requests) {
        REQUIRE(wait_until_below(kMaxInFlight - 1));
        r.cookie = nbd_aio_pread(h, r.read_back.data(), r.read_back.size(), r.offset,
                                 nbd_completion_callback{}, 0);
        REQUIRE_MESSAGE(r.cookie > 0, nbd_get_error());
      }
      REQUIRE(wait_until_below(0));
      collect("read");
      for (uint64_t i = 0; i < kSlots; ++i) {
        INFO("slot " << i);
        CHECK(DescribeMismatch(requests[i].data, requests[i].read_back, requests[i].offset) == "");
      }
    }  // Clients disconnect before the daemon is stopped.
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }
}

}  // namespace memlend::integration
