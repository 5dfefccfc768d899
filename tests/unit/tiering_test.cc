// The tiering policy: CLOCK eviction order, direct reclaim, the background evictor's
// watermarks, promotion of lower-tier pages on read, and failing tiers (a fault-injecting
// wrapper in front of one). Disk is the lower tier here;
// the remote tier follows the same paths and is exercised by the integration tests.
#include "store/tiering.h"

#include <doctest/doctest.h>
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <utility>
#include <random>
#include <thread>
#include <vector>

#include "store/device.h"
#include "temp_dir.h"

using namespace memlend;

namespace {

// A temporary directory holding the backing file.
struct TempFile {
  std::string Path() const { return dir.File("backing"); }
  memlend::testing::TempDir dir;
};

std::vector<std::byte> PageOf(std::uint64_t seed) {
  std::vector<std::byte> page(kPageSize);
  std::mt19937_64 rng(seed);
  for (auto& b : page) b = static_cast<std::byte>(rng() | 1);  // never an all-zero page
  return page;
}

std::unique_ptr<Tiering> MakeTiers(std::uint64_t local_pages, const TempFile& file,
                                   TieringOptions options = {}) {
  return std::make_unique<Tiering>(std::make_unique<LocalStore>(local_pages * kPageSize,
                                                                Compression::kNone),
                                   nullptr, std::make_unique<DiskStore>(file.Path(), 0),
                                   options);
}

bool ReadsBack(Device& device, std::uint64_t page, std::uint64_t seed) {
  std::vector<std::byte> got(kPageSize);
  if (device.Read(page * kPageSize, got) != 0) return false;
  return got == PageOf(seed);
}

// A remote tier in memory whose WriteBatch first runs `during_round_trip` (once): what
// other requests do while an eviction batch is on its way to a peer.
class SlowRemote final : public PageStore {
 public:
  std::function<void()> during_round_trip;

  int Write(ConstPageSpan page, std::uint64_t, Slot* slot) noexcept override {
    std::lock_guard lock(mu_);
    *slot = next_++;
    pages_[*slot].assign(page.begin(), page.end());
    return 0;
  }
  void WriteBatch(std::span<const std::byte* const> pages, std::span<const std::uint64_t> hints,
                  std::span<Slot> slots, std::span<int> results) noexcept override {
    if (during_round_trip) std::exchange(during_round_trip, nullptr)();
    PageStore::WriteBatch(pages, hints, slots, results);
  }
  int Read(Slot slot, PageSpan out) noexcept override {
    std::lock_guard lock(mu_);
    const auto it = pages_.find(slot);
    if (it == pages_.end()) return -EIO;
    std::copy(it->second.begin(), it->second.end(), out.begin());
    return 0;
  }
  void Discard(Slot slot) noexcept override {
    std::lock_guard lock(mu_);
    pages_.erase(slot);
  }
  StoreStats Stats() const noexcept override {
    std::lock_guard lock(mu_);
    StoreStats stats;
    stats.pages = pages_.size();
    return stats;
  }

 private:
  mutable std::mutex mu_;
  std::map<Slot, std::vector<std::byte>> pages_;  // guarded by mu_
  Slot next_ = 1;                                  // guarded by mu_
};

}  // namespace

TEST_CASE("Pages used while their eviction is in flight stay local, with what was written") {
  auto remote_store = std::make_unique<SlowRemote>();
  SlowRemote& remote = *remote_store;
  Tiering tiers(std::make_unique<LocalStore>(16 * kPageSize, Compression::kNone),
                std::move(remote_store), nullptr);
  Device device("inflight", 64 * kPageSize, tiers);
  for (std::uint64_t page = 0; page < 8; ++page) {
    REQUIRE(device.Write(page * kPageSize, PageOf(page)) == 0);
  }
  // While the batch of all eight is out (no page lock is held then, or these would
  // deadlock): page 2 is overwritten, page 3 trimmed and page 4 read.
  remote.during_round_trip = [&] {
    CHECK(device.Write(2 * kPageSize, PageOf(102)) == 0);
    CHECK(device.Trim(3 * kPageSize, kPageSize) == 0);
    CHECK(ReadsBack(device, 4, 4));
  };
  CHECK(device.DemoteColdPages(8) == 5);
  CHECK(device.TierOf(2) == Tier::kLocal);
  CHECK(device.TierOf(3) == Tier::kUnmapped);
  CHECK(device.TierOf(4) == Tier::kLocal);
  for (const std::uint64_t page : {0, 1, 5, 6, 7}) CHECK(device.TierOf(page) == Tier::kRemote);
  // The copies made for the pages that stayed were released again.
  CHECK(remote.Stats().pages == 5);
  CHECK(device.Counts().remote == 5);
  CHECK(device.Counts().local == 2);
  CHECK(tiers.local().Stats().pages == 2);
  CHECK(ReadsBack(device, 2, 102));
  for (const std::uint64_t page : {0, 1, 4, 5, 6, 7}) CHECK(ReadsBack(device, page, page));
}

TEST_CASE("With peers and a disk, a write that finds the store full while eviction is stuck goes to disk") {
  TempFile file;
  auto remote_store = std::make_unique<SlowRemote>();
  SlowRemote& remote = *remote_store;
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  // The evictor's first batch waits until the test lets it go: a peer that does not answer.
  remote.during_round_trip = [released] { released.wait(); };
  Tiering tiers(std::make_unique<LocalStore>(16 * kPageSize, Compression::kNone),
                std::move(remote_store), std::make_unique<DiskStore>(file.Path(), 0));
  tiers.StartEvictor();
  {
    Device device("stuck", 64 * kPageSize, tiers);
    for (std::uint64_t page = 0; page < 16; ++page) {
      REQUIRE(device.Write(page * kPageSize, PageOf(page)) == 0);
    }
    // The store is full and the evictor waits on the peer: the next writes must not wait
    // for it (this test would hang), and land on disk.
    for (std::uint64_t page = 16; page < 20; ++page) {
      REQUIRE(device.Write(page * kPageSize, PageOf(page)) == 0);
      CHECK(device.TierOf(page) == Tier::kDisk);
    }
    release.set_value();
    for (std::uint64_t page = 0; page < 20; ++page) CHECK(ReadsBack(device, page, page));
  }
}

TEST_CASE("The CLOCK scan spares referenced pages and demotes the others") {
  TempFile file;
  auto tiers = MakeTiers(16, file);
  Device device("clock", 64 * kPageSize, *tiers);
  for (std::uint64_t page = 0; page < 16; ++page) {
    REQUIRE(device.Write(page * kPageSize, PageOf(page)) == 0);
  }
  // Every page was just written (referenced): the first sweep only clears the bits, the
  // second demotes in hand order.
  CHECK(device.DemoteColdPages(4) == 4);
  for (std::uint64_t page = 0; page < 4; ++page) CHECK(device.TierOf(page) == Tier::kDisk);
  // Touch pages 4..7; the next scan must pass over them and take 8..11.
  for (std::uint64_t page = 4; page < 8; ++page) CHECK(ReadsBack(device, page, page));
  CHECK(device.DemoteColdPages(4) == 4);
  for (std::uint64_t page = 4; page < 8; ++page) CHECK(device.TierOf(page) == Tier::kLocal);
  for (std::uint64_t page = 8; page < 12; ++page) CHECK(device.TierOf(page) == Tier::kDisk);
  // Everything still reads back.
  for (std::uint64_t page = 0; page < 16; ++page) CHECK(ReadsBack(device, page, page));
  const DevicePageCounts counts = device.Counts();
  CHECK(counts.local + counts.disk == 16);
}

TEST_CASE("A write into a full local store reclaims room instead of failing") {
  TempFile file;
  TieringOptions options;
  options.reclaim_batch = 2;
  auto tiers = MakeTiers(8, file, options);
  Device device("reclaim", 64 * kPageSize, *tiers);
  for (std::uint64_t page = 0; page < 40; ++page) {
    REQUIRE(device.Write(page * kPageSize, PageOf(page)) == 0);
    // The page just written is hot: it is always in the local store.
    CHECK(device.TierOf(page) == Tier::kLocal);
  }
  const DevicePageCounts counts = device.Counts();
  CHECK(counts.local <= 8);
  CHECK(counts.local + counts.disk == 40);
  CHECK(tiers->evicted_pages() >= 32);
  for (std::uint64_t page = 0; page < 40; ++page) CHECK(ReadsBack(device, page, page));
}

TEST_CASE("Reading a disk page promotes it while the local store is under its watermark") {
  TempFile file;
  auto tiers = MakeTiers(16, file);
  Device device("promote", 64 * kPageSize, *tiers);
  for (std::uint64_t page = 0; page < 8; ++page) {
    REQUIRE(device.Write(page * kPageSize, PageOf(page)) == 0);
  }
  CHECK(device.DemoteColdPages(8) == 8);
  CHECK(device.Counts().disk == 8);
  CHECK(ReadsBack(device, 3, 3));
  CHECK(device.TierOf(3) == Tier::kLocal);
  CHECK(device.Counts().disk == 7);
  // The promoted page is clean: its disk slot stays as its copy.
  CHECK(device.Counts().clean == 1);
  CHECK(tiers->disk()->Stats().pages == 8);
}

TEST_CASE("A clean page is evicted without a disk write; a write makes it dirty again") {
  TempFile file;
  auto tiers = MakeTiers(16, file);
  Device device("clean", 64 * kPageSize, *tiers);
  for (std::uint64_t page = 0; page < 8; ++page) {
    REQUIRE(device.Write(page * kPageSize, PageOf(page)) == 0);
  }
  REQUIRE(device.DemoteColdPages(8) == 8);
  for (std::uint64_t page = 0; page < 4; ++page) REQUIRE(ReadsBack(device, page, page));
  CHECK(device.Counts().local == 4);
  CHECK(device.Counts().clean == 4);
  CHECK(tiers->disk()->Stats().pages == 8);  // 4 disk pages + 4 copies

  // Rewriting page 0 makes it dirty: its copy goes.
  REQUIRE(device.Write(0, PageOf(100)) == 0);
  CHECK(device.Counts().clean == 3);
  CHECK(tiers->disk()->Stats().pages == 7);

  // Evicting everything local: the three clean pages go back to their copies (no new
  // disk slots), the dirty one takes a new slot. Two sweeps: the reads set referenced bits.
  const std::uint64_t demoted = device.DemoteColdPages(16);
  CHECK(demoted == 4);
  CHECK(device.Counts().local == 0);
  CHECK(device.Counts().clean == 0);
  CHECK(device.Counts().disk == 8);
  CHECK(tiers->disk()->Stats().pages == 8);
  CHECK(ReadsBack(device, 0, 100));
  for (std::uint64_t page = 1; page < 8; ++page) CHECK(ReadsBack(device, page, page));

  // Trimming a clean page frees its copy too.
  REQUIRE(ReadsBack(device, 5, 5));
  REQUIRE(device.Counts().clean >= 1);
  const std::uint64_t disk_before = tiers->disk()->Stats().pages;
  REQUIRE(device.TierOf(5) == Tier::kLocal);
  REQUIRE(device.Trim(5 * kPageSize, kPageSize) == 0);
  CHECK(tiers->disk()->Stats().pages == disk_before - 1);
  CHECK(device.TierOf(5) == Tier::kUnmapped);
}

TEST_CASE("The background evictor brings the local store under the low watermark") {
  TempFile file;
  TieringOptions options;
  options.high_watermark = 0.5;
  options.low_watermark = 0.25;
  options.eviction_batch = 4;
  auto tiers = MakeTiers(64, file, options);
  tiers->StartEvictor();
  {
    Device device("evictor", 128 * kPageSize, *tiers);
    for (std::uint64_t page = 0; page < 48; ++page) {
      REQUIRE(device.Write(page * kPageSize, PageOf(page)) == 0);
    }
    // The evictor runs on its own thread: wait for it (bounded), then check the outcome.
    // Each time use reaches the high watermark (32 pages) it evicts until use is under the
    // low one (16); writes after that may leave use anywhere under the high watermark.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (tiers->local().Stats().pages >= 32 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    const DevicePageCounts counts = device.Counts();
    CHECK(counts.local < 32);
    CHECK(tiers->evicted_pages() >= 17);  // 48 written, fewer than 32 kept
    CHECK(counts.local + counts.disk == 48);
    CHECK(tiers->local().Stats().pages == counts.local);
    for (std::uint64_t page = 0; page < 48; ++page) CHECK(ReadsBack(device, page, page));
  }
}

namespace {

// A tier behind a switch: while `fail_writes` (or `fail_reads`) is not 0, writes (reads)
// return it instead of reaching the store. Everything else goes through.
class FaultyStore final : public PageStore {
 public:
  explicit FaultyStore(std::unique_ptr<PageStore> inner) : inner_(std::move(inner)) {}
  std::atomic<int> fail_writes{0};
  std::atomic<int> fail_reads{0};

  int Write(ConstPageSpan page, std::uint64_t hint, Slot* slot) noexcept override {
    if (const int rc = fail_writes.load()) return rc;
    return inner_->Write(page, hint, slot);
  }
  int Rewrite(Slot slot, ConstPageSpan page, std::uint64_t hint, Slot* placed,
              bool* keeps_old) noexcept override {
    if (const int rc = fail_writes.load()) return rc;
    return inner_->Rewrite(slot, page, hint, placed, keeps_old);
  }
  int Read(Slot slot, PageSpan out) noexcept override {
    if (const int rc = fail_reads.load()) return rc;
    return inner_->Read(slot, out);
  }
  void Discard(Slot slot) noexcept override { inner_->Discard(slot); }
  StoreStats Stats() const noexcept override { return inner_->Stats(); }

 private:
  const std::unique_ptr<PageStore> inner_;
};

// Tiers of `local_pages` pages of RAM and a backing file, with a FaultyStore in front of
// the tier `faulty`, which *faults is set to.
std::unique_ptr<Tiering> MakeFaultyTiers(std::uint64_t local_pages, const TempFile& file,
                                         Tier faulty, FaultyStore** faults) {
  TierWrapper wrap = [&](Tier tier, std::unique_ptr<PageStore> store) -> std::unique_ptr<PageStore> {
    if (tier != faulty) return store;
    auto wrapper = std::make_unique<FaultyStore>(std::move(store));
    *faults = wrapper.get();
    return wrapper;
  };
  return std::make_unique<Tiering>(
      std::make_unique<LocalStore>(local_pages * kPageSize, Compression::kNone), nullptr,
      std::make_unique<DiskStore>(file.Path(), 0), TieringOptions{}, nullptr, wrap);
}

}  // namespace

TEST_CASE("A disk tier that fails: the writer gets its error, and nothing else is touched") {
  TempFile file;
  FaultyStore* disk = nullptr;
  auto tiers = MakeFaultyTiers(4, file, Tier::kDisk, &disk);
  REQUIRE(disk != nullptr);
  {
    Device device("d", 16 * kPageSize, *tiers);
    for (std::uint64_t page = 0; page < 8; ++page) {
      REQUIRE(device.Write(page * kPageSize, PageOf(page)) == 0);
    }
    DevicePageCounts counts = device.Counts();
    REQUIRE(counts.disk == 4);  // four in RAM, four spilled
    // Writes to the disk fail: a new page finds RAM full and nowhere below to go.
    disk->fail_writes = -EIO;
    CHECK(device.Write(8 * kPageSize, PageOf(8)) == -EIO);
    // Reads of the disk fail: a page there gives EIO; pages in RAM read as ever.
    disk->fail_reads = -EIO;
    std::vector<std::byte> out(kPageSize);
    std::size_t failed = 0;
    for (std::uint64_t page = 0; page < 8; ++page) {
      if (device.TierOf(page) == Tier::kDisk) {
        CHECK(device.Read(page * kPageSize, out) == -EIO);
        ++failed;
      } else {
        CHECK(ReadsBack(device, page, page));
      }
    }
    CHECK(failed == 4);
    counts = device.Counts();
    CHECK(counts.local + counts.disk == 8);  // the failed write mapped nothing
    // The disk recovers: everything reads back, and the new page goes in.
    disk->fail_reads = 0;
    disk->fail_writes = 0;
    for (std::uint64_t page = 0; page < 8; ++page) CHECK(ReadsBack(device, page, page));
    REQUIRE(device.Write(8 * kPageSize, PageOf(8)) == 0);
    CHECK(ReadsBack(device, 8, 8));
  }
}

TEST_CASE("A local tier that fails reads: the reader gets EIO, the page is kept") {
  TempFile file;
  FaultyStore* local = nullptr;
  auto tiers = MakeFaultyTiers(8, file, Tier::kLocal, &local);
  REQUIRE(local != nullptr);
  {
    Device device("d", 16 * kPageSize, *tiers);
    REQUIRE(device.Write(0, PageOf(1)) == 0);
    local->fail_reads = -EIO;
    std::vector<std::byte> out(kPageSize);
    CHECK(device.Read(0, out) == -EIO);
    local->fail_reads = 0;
    CHECK(ReadsBack(device, 0, 1));
    CHECK(device.Counts().local == 1);
  }
}
