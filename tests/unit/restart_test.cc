// A device's pages outlive the process that wrote them (docs/restart.md): the local store's
// arena and the page table live in state segments; a new store and device over the same
// segments, and the backing file kept as it is, serve the same pages after Recover.

#include <doctest/doctest.h>
#include <sys/shm.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "store/device.h"
#include "store/disk_store.h"
#include "store/local_store.h"
#include "store/state_segment.h"
#include "store/tiering.h"
#include "temp_dir.h"

namespace memlend {
namespace {

using Bytes = std::vector<std::byte>;
using memlend::testing::TempDir;

constexpr std::uint64_t kInstance = 0x1234567890abcdefULL;

// Segments made for one test, removed when it ends.
struct Segments {
  std::vector<int> ids;
  ~Segments() {
    for (const int id : ids) ::shmctl(id, IPC_RMID, nullptr);
  }
};

Bytes PageOf(std::uint64_t seed, bool compressible) {
  Bytes page(kPageSize, std::byte{0});
  std::mt19937_64 rng(seed);
  for (std::size_t i = 0; i < kPageSize; ++i) {
    page[i] = static_cast<std::byte>(compressible ? (i % 64 == 0 ? rng() : 0) : rng());
  }
  return page;
}

// One "process": a store over the arena segment, a disk store and a device over its table.
struct Incarnation {
  Incarnation(std::byte* arena, std::uint64_t local_bytes, Compression mode,
              const std::string& backing, void* table, std::uint64_t device_bytes, bool fresh) {
    auto local = std::make_unique<LocalStore>(arena, local_bytes, mode);
    auto disk = std::make_unique<DiskStore>(backing, 0, false, /*keep=*/!fresh);
    tiers = std::make_unique<Tiering>(std::move(local), std::move(disk));
    device = std::make_unique<Device>("d0", device_bytes, *tiers, false, Redundancy{}, table,
                                      fresh);
  }
  // As a process that dies: nothing is released.
  void Die() {
    device->KeepPagesOnExit();
    device.reset();
    tiers.reset();
  }
  std::unique_ptr<Tiering> tiers;
  std::unique_ptr<Device> device;
};

TEST_SUITE("restart") {

TEST_CASE("pages in the local store and on disk are read back after a restart") {
  for (const Compression mode : {Compression::kNone, Compression::kLz4}) {
    CAPTURE(static_cast<int>(mode));
    TempDir dir;
    Segments made;
    constexpr std::uint64_t kLocalBytes = 64 * kPageSize;
    constexpr std::uint64_t kDevicePages = 256;
    constexpr std::uint64_t kDeviceBytes = kDevicePages * kPageSize;
    auto arena = StateSegment::Create(LocalStore::ArenaBytes(kLocalBytes), kInstance, false);
    auto table = StateSegment::Create(Device::PageTableBytes(kDeviceBytes), kInstance, false);
    made.ids = {arena->id(), table->id()};

    // What each page should read as: written pages (more than the local store holds, so many
    // go to disk), zeros, trimmed ones, and partial writes.
    std::vector<Bytes> expected(kDevicePages, Bytes(kPageSize, std::byte{0}));
    {
      Incarnation first(arena->data(), kLocalBytes, mode, dir.File("backing"), table->data(),
                        kDeviceBytes, /*fresh=*/true);
      for (std::uint64_t page = 0; page < kDevicePages; ++page) {
        if (page % 7 == 3) continue;  // never written
        expected[page] = PageOf(page, page % 2 == 0);
        REQUIRE(first.device->Write(page * kPageSize, expected[page]) == 0);
      }
      REQUIRE(first.device->WriteZeroes(10 * kPageSize, 2 * kPageSize) == 0);
      expected[10] = expected[11] = Bytes(kPageSize, std::byte{0});
      REQUIRE(first.device->Trim(20 * kPageSize, kPageSize) == 0);
      expected[20] = Bytes(kPageSize, std::byte{0});
      const Bytes part(100, std::byte{0x5a});
      REQUIRE(first.device->Write(30 * kPageSize + 7, part) == 0);
      std::memcpy(expected[30].data() + 7, part.data(), part.size());
      const DevicePageCounts counts = first.device->Counts();
      REQUIRE(counts.local > 0);
      REQUIRE(counts.disk > 0);
      first.Die();
    }
    // The next process: the same segments, attached by id once this one let go.
    arena.reset();
    table.reset();
    std::string error;
    arena = StateSegment::Attach(made.ids[0], LocalStore::ArenaBytes(kLocalBytes), kInstance,
                                 false, &error);
    REQUIRE_MESSAGE(arena, error);
    table = StateSegment::Attach(made.ids[1], Device::PageTableBytes(kDeviceBytes), kInstance,
                                 false, &error);
    REQUIRE_MESSAGE(table, error);
    Incarnation second(arena->data(), kLocalBytes, mode, dir.File("backing"), table->data(),
                       kDeviceBytes, /*fresh=*/false);
    const Device::Recovery found = second.device->Recover();
    second.tiers->FinishAdopt();
    CHECK(found.remote == 0);
    CHECK(found.invalid == 0);
    const DevicePageCounts counts = second.device->Counts();
    CHECK(found.local == counts.local);
    CHECK(found.disk == counts.disk);
    CHECK(counts.local + counts.disk == second.tiers->local().Stats().pages +
                                            second.tiers->disk()->Stats().pages);
    for (std::uint64_t page = 0; page < kDevicePages; ++page) {
      Bytes out(kPageSize);
      REQUIRE(second.device->Read(page * kPageSize, out) == 0);
      CHECK_MESSAGE(out == expected[page], "page " << page);
    }
    // The stores' free room was rebuilt right: new writes take none of the kept pages' room.
    for (std::uint64_t page = 0; page < kDevicePages; page += 3) {
      expected[page] = PageOf(1000 + page, page % 4 == 0);
      REQUIRE(second.device->Write(page * kPageSize, expected[page]) == 0);
    }
    for (std::uint64_t page = 0; page < kDevicePages; ++page) {
      Bytes out(kPageSize);
      REQUIRE(second.device->Read(page * kPageSize, out) == 0);
      CHECK_MESSAGE(out == expected[page], "page " << page << " after more writes");
    }
  }
}

TEST_CASE("a state segment is attached only with its instance and size") {
  Segments made;
  auto segment = StateSegment::Create(8192, kInstance, false);
  made.ids = {segment->id()};
  std::memset(segment->data(), 0x77, 8192);
  const int id = segment->id();
  std::string error;
  // While a process has it attached, nobody else takes it.
  CHECK_FALSE(StateSegment::Attach(id, 8192, kInstance, false, &error));
  CHECK(error.find("in use") != std::string::npos);
  segment.reset();
  CHECK_FALSE(StateSegment::Attach(id, 8192, kInstance + 1, false, &error));
  CHECK(error.find("not the one") != std::string::npos);
  CHECK_FALSE(StateSegment::Attach(id, 4096, kInstance, false, &error));
  CHECK(error.find("bytes") != std::string::npos);
  auto again = StateSegment::Attach(id, 8192, kInstance, false, &error);
  REQUIRE_MESSAGE(again, error);
  CHECK(again->data()[8191] == std::byte{0x77});
  // Removed, it goes once the last process lets go.
  again->Remove();
  again.reset();
  CHECK_FALSE(StateSegment::Attach(id, 8192, kInstance, false, &error));
  CHECK(error.find("gone") != std::string::npos);
  made.ids.clear();
}

TEST_CASE("recovery refuses room named twice or out of range") {
  auto local = std::make_unique<LocalStore>(16 * kPageSize, Compression::kLz4);
  Slot slot = 0;
  const Bytes page = PageOf(1, true);
  REQUIRE(local->Write(ConstPageSpan(page.data(), kPageSize), 0, &slot) == 0);
  LocalStore fresh(16 * kPageSize, Compression::kLz4);
  CHECK(fresh.Adopt(slot));
  CHECK_FALSE(fresh.Adopt(slot));                 // twice
  CHECK_FALSE(fresh.Adopt(Slot{100} << 8));       // past the arena
  fresh.FinishAdopt();
  CHECK(fresh.Stats().pages == 1);
  Slot next = 0;
  REQUIRE(fresh.Write(ConstPageSpan(page.data(), kPageSize), 0, &next) == 0);
  CHECK(next != slot);

  TempDir dir;
  {
    DiskStore sized(dir.File("backing"), 0);  // a file of 8 pages, as an earlier process left
    for (int i = 0; i < 8; ++i) {
      Slot written = 0;
      REQUIRE(sized.Write(ConstPageSpan(page.data(), kPageSize), 0, &written) == 0);
    }
  }
  DiskStore disk(dir.File("backing"), 8 * kPageSize, false, /*keep=*/true);
  CHECK(disk.Adopt(5));
  CHECK_FALSE(disk.Adopt(5));
  CHECK_FALSE(disk.Adopt(8));  // past the bound
  disk.FinishAdopt();
  CHECK(disk.Stats().pages == 1);
  // Free slots below the highest adopted one come first, lowest first; 5 is never given.
  for (const Slot want : {0, 1, 2, 3, 4, 6}) {
    Slot got = 99;
    REQUIRE(disk.Write(ConstPageSpan(page.data(), kPageSize), 0, &got) == 0);
    CHECK(got == want);
  }
}

}  // TEST_SUITE("restart")

}  // namespace
}  // namespace memlend
