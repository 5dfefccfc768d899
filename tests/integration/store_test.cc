// Integration tests of where pages go: spilling to the backing file when the local store is
// small, ENOSPC when there is no backing file, and lz4 compression in the local store.

#include <doctest/doctest.h>

#include <cerrno>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "harness.h"
#include "workload.h"

namespace memlend::integration {
namespace {

// Writes length bytes of the given content at offset in chunks of chunk_size, through client and
// into shadow.
void WriteContent(NbdClient& client, ShadowDevice& shadow, std::mt19937_64& rng, uint64_t offset,
                  uint64_t length, uint64_t chunk_size, Content content) {
  std::vector<uint8_t> chunk;
  for (uint64_t done = 0; done < length; done += chunk.size()) {
    chunk.resize(std::min(chunk_size, length - done));
    FillContent(rng, chunk, content);
    client.Write(chunk, offset + done);
    shadow.Write(offset + done, chunk);
  }
}

// 8 MiB of random data through a 1 MiB local store: most pages must land in the backing file,
// and all of them must read back intact, also after overwrites and TRIMs.
void SpillToBackingFile(const std::string& compress) {
  constexpr uint64_t kDeviceSize = 16 * kMiB;
  constexpr uint64_t kWritten = 8 * kMiB;
  INFO("compress " << compress);
  TempDir dir;
  DaemonOptions options;
  options.devices = {"d0:16M"};
  options.local_store = "1M";
  options.compress = compress;
  options.backing_file = dir.File("backing.img");
  MemlendDaemon daemon(dir, options);
  {
    NbdClient client(daemon.endpoint(), "d0");
    ShadowDevice shadow(kDeviceSize);
    std::mt19937_64 rng(TestSeed());

    WriteContent(client, shadow, rng, 0, kWritten, 256 * kKiB, Content::kRandom);
    CHECK(CompareWithShadow(client, shadow) == "");

    nlohmann::json status = daemon.Status();
    INFO("status: " << status.dump());
    CheckStatusInvariants(status);
    DevicePages pages = GetDevicePages(status, "d0");
    CHECK(pages.mapped == kWritten / kPageSize);
    CHECK(pages.disk > 0);
    CHECK(pages.local + pages.disk + pages.zero == pages.mapped);
    const nlohmann::json& local_store = status.at("local_store");
    CHECK(local_store.at("total_bytes") == 1 * kMiB);
    CHECK(local_store.at("used_bytes").get<uint64_t>() <= 1 * kMiB);
    REQUIRE(status.at("disk_store").is_object());
    CHECK(status.at("disk_store").at("path") == options.backing_file);
    // Disk pages, and the disk copies of clean local pages, each take a 4 KiB slot of the
    // backing file.
    CHECK(status.at("disk_store").at("pages") == pages.disk + pages.clean);
    CHECK(std::filesystem::file_size(options.backing_file) >= (pages.disk + pages.clean) * kPageSize);

    // Sub-page and unaligned overwrites of pages that were (most likely) spilled.
    for (int i = 0; i < 100; ++i) {
      std::vector<uint8_t> data(RandomIn(rng, 1, 3 * kPageSize));
      FillRandom(rng, data);
      uint64_t offset = RandomIn(rng, 0, kWritten - data.size());
      client.Write(data, offset);
      shadow.Write(offset, data);
    }
    CHECK(CompareWithShadow(client, shadow) == "");

    // TRIM the first half; the second half stays intact; then write new data past the old end.
    client.Trim(kWritten / 2, 0);
    shadow.Zero(0, kWritten / 2);
    WriteContent(client, shadow, rng, kWritten, 4 * kMiB, 64 * kKiB, Content::kRandom);
    CHECK(CompareWithShadow(client, shadow) == "");

    status = daemon.Status();
    CheckStatusInvariants(status);
    pages = GetDevicePages(status, "d0");
    CHECK(pages.mapped == (kWritten / 2 + 4 * kMiB) / kPageSize);

    // A fresh connection sees the same data.
    NbdClient second(daemon.endpoint(), "d0");
    CHECK(CompareWithShadow(second, shadow) == "");
  }  // Clients disconnect before the daemon is stopped.
  CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
}

// Writes the same compressible data with the given --compress and returns the status after.
nlohmann::json StoreCompressibleData(const std::string& compress) {
  constexpr uint64_t kDeviceSize = 16 * kMiB;
  constexpr uint64_t kWritten = 8 * kMiB;
  TempDir dir;
  DaemonOptions options;
  options.devices = {"d0:16M"};
  options.local_store = "64M";
  options.compress = compress;
  MemlendDaemon daemon(dir, options);
  nlohmann::json status;
  {
    NbdClient client(daemon.endpoint(), "d0");
    ShadowDevice shadow(kDeviceSize);
    std::mt19937_64 rng(TestSeed());

    WriteContent(client, shadow, rng, 0, kWritten, 1 * kMiB, Content::kText);
    // Some incompressible data too, which must round-trip just the same.
    WriteContent(client, shadow, rng, kWritten, 1 * kMiB, 128 * kKiB, Content::kRandom);
    CHECK(CompareWithShadow(client, shadow) == "");
    // Remove the incompressible part again so that the status reflects only the text.
    client.Trim(1 * kMiB, kWritten);
    shadow.Zero(kWritten, 1 * kMiB);
    CHECK(CompareWithShadow(client, shadow) == "");

    status = daemon.Status();
    CheckStatusInvariants(status);
    CHECK(GetDevicePages(status, "d0").local == kWritten / kPageSize);
  }  // Clients disconnect before the daemon is stopped.
  CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  return status;
}

// Writes one page of the given content after another from page 0 until a write fails or
// max_pages are written. Returns the number of pages stored; *error is the errno of the failed
// write, or 0 if none failed.
uint64_t WritePagesUntilFailure(NbdClient& client, ShadowDevice& shadow, std::mt19937_64& rng,
                                Content content, uint64_t max_pages, int* error) {
  std::vector<uint8_t> page(kPageSize);
  *error = 0;
  for (uint64_t stored = 0; stored < max_pages; ++stored) {
    FillContent(rng, page, content);
    *error = client.TryWrite(page, stored * kPageSize);
    if (*error != 0) return stored;
    shadow.Write(stored * kPageSize, page);
  }
  return max_pages;
}

// Several connections run random I/O on disjoint regions of a device whose local store is far
// too small, so pages are evicted to the backing file while other threads read and write them.
void ParallelIoWhileSpilling(const std::string& compress) {
  constexpr uint64_t kDeviceSize = 32 * kMiB;
  constexpr int kThreads = 4;
  constexpr uint64_t kRegionSize = kDeviceSize / kThreads;
  INFO("compress " << compress);
  TempDir dir;
  DaemonOptions options;
  options.devices = {"d0:32M"};
  options.local_store = "2M";
  options.compress = compress;
  options.backing_file = dir.File("backing.img");
  MemlendDaemon daemon(dir, options);
  {
    ShadowDevice shadow(kDeviceSize);
    std::vector<std::string> failures(kThreads);
    std::vector<std::thread> threads;
    const uint64_t seed = TestSeed();
    INFO("seed " << seed);
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        try {
          NbdClient client(daemon.endpoint(), "d0");
          std::mt19937_64 rng(seed + static_cast<uint64_t>(t));
          const uint64_t base = t * kRegionSize;
          // 2 MiB of random data per thread first: together far more than the local store.
          std::vector<uint8_t> data(2 * kMiB);
          FillRandom(rng, data);
          client.Write(data, base);
          shadow.Write(base, data);
          failures[t] = RandomIoSession(client, shadow, base, kRegionSize, 500, rng);
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
    nlohmann::json status = daemon.Status();
    INFO("status: " << status.dump());
    CheckStatusInvariants(status);
    CHECK(GetDevicePages(status, "d0").disk > 0);
  }  // Clients disconnect before the daemon is stopped.
  CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
}

}  // namespace

TEST_SUITE("spill") {
  TEST_CASE("pages spill to the backing file, compress none") { SpillToBackingFile("none"); }
  TEST_CASE("pages spill to the backing file, compress lz4") { SpillToBackingFile("lz4"); }

  // Random requests of every shape and mixed content (random, text, one byte, zeros) on a
  // device that keeps spilling: compressed pages change size on every overwrite and move between
  // the local store and the backing file.
  TEST_CASE("random I/O with mixed content while spilling, lz4") {
    constexpr uint64_t kDeviceSize = 16 * kMiB;
    TempDir dir;
    DaemonOptions options;
    options.devices = {"d0:16M"};
    options.local_store = "1M";
    options.compress = "lz4";
    options.backing_file = dir.File("backing.img");
    MemlendDaemon daemon(dir, options);
    {
      NbdClient client(daemon.endpoint(), "d0");
      ShadowDevice shadow(kDeviceSize);
      const uint64_t seed = TestSeed();
      INFO("seed " << seed);
      std::mt19937_64 rng(seed);
      WriteContent(client, shadow, rng, 0, 6 * kMiB, 256 * kKiB, Content::kRandom);
      CHECK(RandomIoSession(client, shadow, 0, kDeviceSize, 2500, rng) == "");
      nlohmann::json status = daemon.Status();
      INFO("status: " << status.dump());
      CheckStatusInvariants(status);
      CHECK(GetDevicePages(status, "d0").disk > 0);
    }  // Clients disconnect before the daemon is stopped.
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }

  TEST_CASE("parallel connections while spilling, compress none") {
    ParallelIoWhileSpilling("none");
  }
  TEST_CASE("parallel connections while spilling, compress lz4") { ParallelIoWhileSpilling("lz4"); }
}

TEST_SUITE("enospc") {
  // Without a backing file, a 1 MiB local store holds at most 256 pages of random data. Writing
  // page after page must end in ENOSPC, leave every stored page intact, and succeed again once a
  // TRIM made room.
  TEST_CASE("a full local store without backing file fails writes with ENOSPC") {
    constexpr uint64_t kDevicePages = 2048;  // 8 MiB, far more than the store holds
    TempDir dir;
    DaemonOptions options;
    options.devices = {"d0:8M"};
    options.local_store = "1M";
    options.compress = "none";
    MemlendDaemon daemon(dir, options);
    {
      NbdClient client(daemon.endpoint(), "d0");
      ShadowDevice shadow(kDevicePages * kPageSize);
      std::mt19937_64 rng(TestSeed());

      int error = 0;
      const uint64_t stored_pages =
          WritePagesUntilFailure(client, shadow, rng, Content::kRandom, kDevicePages, &error);
      std::vector<uint8_t> page(kPageSize);
      INFO("pages stored before the first failure: " << stored_pages);
      REQUIRE_MESSAGE(stored_pages < kDevicePages, "a 1 MiB local store took 8 MiB of random data");
      CHECK(error == ENOSPC);
      CHECK(stored_pages > 0);
      CHECK(stored_pages <= 1 * kMiB / kPageSize);

      // The store stays full: another new page fails the same way.
      FillRandom(rng, page);
      CHECK(client.TryWrite(page, (stored_pages + 1) * kPageSize) == ENOSPC);

      // Zero pages take no room, so WRITE_ZEROES still succeeds on a full store.
      CHECK(client.TryZero(4 * kPageSize, (stored_pages + 10) * kPageSize) == 0);

      // Everything stored reads back intact, and the failed writes left nothing behind.
      CHECK(CompareWithShadow(client, shadow) == "");
      nlohmann::json status = daemon.Status();
      INFO("status: " << status.dump());
      CheckStatusInvariants(status);
      CHECK(GetDevicePages(status, "d0").local == stored_pages);
      CHECK(status.at("disk_store").is_null());

      // TRIM eight stored pages; then new data fits again.
      client.Trim(8 * kPageSize, 0);
      shadow.Zero(0, 8 * kPageSize);
      for (uint64_t i = 0; i < 8; ++i) {
        FillRandom(rng, page);
        uint64_t offset = (stored_pages + 20 + i) * kPageSize;
        INFO("write after TRIM at " << offset);
        REQUIRE(client.TryWrite(page, offset) == 0);
        shadow.Write(offset, page);
      }
      CHECK(CompareWithShadow(client, shadow) == "");
      CheckStatusInvariants(daemon.Status());
    }  // Clients disconnect before the daemon is stopped.
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }

  // With lz4, a full store of compressible pages has no room for the same pages as random data:
  // such overwrites must fail with ENOSPC and leave the page's old contents in place (or succeed
  // and store the new ones); nothing else may change.
  TEST_CASE("lz4: overwrites that no longer fit fail with ENOSPC and keep the old data") {
    constexpr uint64_t kDevicePages = 4096;  // 16 MiB
    TempDir dir;
    DaemonOptions options;
    options.devices = {"d0:16M"};
    options.local_store = "1M";
    options.compress = "lz4";
    MemlendDaemon daemon(dir, options);
    {
      NbdClient client(daemon.endpoint(), "d0");
      ShadowDevice shadow(kDevicePages * kPageSize);
      std::mt19937_64 rng(TestSeed());
      int error = 0;
      const uint64_t stored_pages =
          WritePagesUntilFailure(client, shadow, rng, Content::kText, kDevicePages, &error);
      INFO("compressible pages stored before the first failure: " << stored_pages);
      REQUIRE_MESSAGE(stored_pages < kDevicePages, "a 1 MiB store took 16 MiB of text");
      CHECK(error == ENOSPC);
      // Compression let more than 1 MiB worth of pages fit.
      CHECK(stored_pages > 1 * kMiB / kPageSize);

      std::vector<uint8_t> page(kPageSize);
      int refused = 0;
      for (int i = 0; i < 200; ++i) {
        uint64_t offset = RandomIn(rng, 0, stored_pages - 1) * kPageSize;
        FillRandom(rng, page);
        int result = client.TryWrite(page, offset);
        INFO("overwrite " << i << " at " << offset);
        if (result == 0) {
          shadow.Write(offset, page);
        } else {
          CHECK(result == ENOSPC);
          ++refused;
        }
      }
      MESSAGE("incompressible overwrites refused with ENOSPC: " << refused << " of 200");
      CHECK(refused > 0);
      CHECK(CompareWithShadow(client, shadow) == "");
      nlohmann::json status = daemon.Status();
      INFO("status: " << status.dump());
      CheckStatusInvariants(status);
      CHECK(GetDevicePages(status, "d0").mapped == stored_pages);
    }  // Clients disconnect before the daemon is stopped.
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }

  // With a backing file limited by --backing-size, ENOSPC comes once both tiers are full.
  TEST_CASE("local store and a bounded backing file both full") {
    constexpr uint64_t kDevicePages = 2048;  // 8 MiB
    constexpr uint64_t kLocalPages = 1 * kMiB / kPageSize;
    constexpr uint64_t kDiskPages = 2 * kMiB / kPageSize;
    TempDir dir;
    DaemonOptions options;
    options.devices = {"d0:8M"};
    options.local_store = "1M";
    options.compress = "none";
    options.backing_file = dir.File("backing.img");
    options.backing_size = "2M";
    MemlendDaemon daemon(dir, options);
    {
      NbdClient client(daemon.endpoint(), "d0");
      ShadowDevice shadow(kDevicePages * kPageSize);
      std::mt19937_64 rng(TestSeed());
      int error = 0;
      const uint64_t stored_pages =
          WritePagesUntilFailure(client, shadow, rng, Content::kRandom, kDevicePages, &error);
      INFO("pages stored before the first failure: " << stored_pages);
      REQUIRE_MESSAGE(stored_pages < kDevicePages, "1 MiB + 2 MiB of stores took 8 MiB");
      CHECK(error == ENOSPC);
      CHECK(stored_pages > kLocalPages);
      CHECK(stored_pages <= kLocalPages + kDiskPages);
      CHECK(CompareWithShadow(client, shadow) == "");

      nlohmann::json status = daemon.Status();
      INFO("status: " << status.dump());
      CheckStatusInvariants(status);
      DevicePages pages = GetDevicePages(status, "d0");
      CHECK(pages.local + pages.disk == stored_pages);
      CHECK(pages.disk > 0);
      REQUIRE(status.at("disk_store").is_object());
      CHECK(status.at("disk_store").at("total_bytes") == 2 * kMiB);
      CHECK(status.at("disk_store").at("used_bytes").get<uint64_t>() <= 2 * kMiB);

      // TRIM frees room again, wherever the trimmed pages were.
      client.Trim(16 * kPageSize, 0);
      shadow.Zero(0, 16 * kPageSize);
      std::vector<uint8_t> page(kPageSize);
      for (uint64_t i = 0; i < 16; ++i) {
        FillRandom(rng, page);
        uint64_t offset = (stored_pages + 10 + i) * kPageSize;
        INFO("write after TRIM at " << offset);
        REQUIRE(client.TryWrite(page, offset) == 0);
        shadow.Write(offset, page);
      }
      CHECK(CompareWithShadow(client, shadow) == "");
      CheckStatusInvariants(daemon.Status());
    }  // Clients disconnect before the daemon is stopped.
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }
}

TEST_SUITE("compression") {
  TEST_CASE("lz4 stores compressible pages in less memory") {
    nlohmann::json status = StoreCompressibleData("lz4");
    INFO("status: " << status.dump());
    const nlohmann::json& local_store = status.at("local_store");
    uint64_t pages = local_store.at("pages").get<uint64_t>();
    CHECK(pages == 8 * kMiB / kPageSize);
    CHECK(local_store.at("compression") == "lz4");
    // Clearly below the uncompressed size: at most half of it.
    CHECK(local_store.at("used_bytes").get<uint64_t>() <= pages * kPageSize / 2);
    CHECK(local_store.at("compression_ratio").get<double>() > 2.0);
  }

  TEST_CASE("compress none stores pages at full size") {
    nlohmann::json status = StoreCompressibleData("none");
    INFO("status: " << status.dump());
    const nlohmann::json& local_store = status.at("local_store");
    uint64_t pages = local_store.at("pages").get<uint64_t>();
    CHECK(local_store.at("compression") == "none");
    CHECK(local_store.at("used_bytes").get<uint64_t>() >= pages * kPageSize);
  }
}

}  // namespace memlend::integration
