// Unit tests for Device over a Tiering of a LocalStore and an optional DiskStore: byte-range
// reads and writes against a shadow copy, per-tier page counts, zero and unmapped pages,
// running out of room, spilling to disk, releasing room and concurrent use.
#include "temp_dir.h"
#include "store/device.h"

#include <doctest/doctest.h>
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "store/disk_store.h"
#include "store/local_store.h"
#include "store/tiering.h"

namespace memlend {
namespace {

using Bytes = std::vector<std::byte>;

constexpr Compression kBothModes[] = {Compression::kNone, Compression::kLz4};

using memlend::testing::TempDir;

// Returns a Tiering over a local store of `local_pages` frames and, unless `disk_path` is
// empty, a disk store at `disk_path` holding at most `disk_pages` pages (0: unbounded).
std::unique_ptr<Tiering> MakeTiering(std::uint64_t local_pages, Compression mode,
                                     const std::string& disk_path = "",
                                     std::uint64_t disk_pages = 0) {
  auto local = std::make_unique<LocalStore>(local_pages * kPageSize, mode);
  std::unique_ptr<DiskStore> disk;
  if (!disk_path.empty()) disk = std::make_unique<DiskStore>(disk_path, disk_pages * kPageSize);
  return std::make_unique<Tiering>(std::move(local), std::move(disk));
}

// Returns `length` random bytes; no 4 KiB page of them is all zero in practice.
Bytes RandomBytes(std::size_t length, std::mt19937_64& rng) {
  Bytes bytes(length);
  for (std::size_t i = 0; i < length; ++i) bytes[i] = static_cast<std::byte>(rng() | 1);
  return bytes;
}

// Returns `length` bytes that compress well: a few random bytes every 512, zeros between.
Bytes CompressibleBytes(std::size_t length, std::mt19937_64& rng) {
  Bytes bytes(length, std::byte{0});
  for (std::size_t i = 0; i < length; i += 512) bytes[i] = static_cast<std::byte>(rng() | 1);
  return bytes;
}

// Returns the page-aligned byte offset of page `page`.
constexpr std::uint64_t PageOffset(std::uint64_t page) { return page * kPageSize; }

// Reads [offset, offset + length) from `device`; the buffer starts as a pattern so bytes the
// device fails to fill show up as a mismatch.
Bytes ReadBack(Device& device, std::uint64_t offset, std::size_t length) {
  Bytes out(length, std::byte{0xa5});
  REQUIRE(device.Read(offset, out) == 0);
  return out;
}

bool AllZero(std::span<const std::byte> bytes) {
  return std::all_of(bytes.begin(), bytes.end(), [](std::byte b) { return b == std::byte{0}; });
}

// A device and a shadow copy of what it must hold. The shadow changes only when the
// device reports success.
class ShadowedDevice {
 public:
  ShadowedDevice(std::string name, std::uint64_t size_bytes, Tiering& tiers)
      : device_(std::move(name), size_bytes, tiers), shadow_(size_bytes, std::byte{0}) {}

  Device& device() { return device_; }
  const Bytes& shadow() const { return shadow_; }

  int Write(std::uint64_t offset, std::span<const std::byte> data) {
    const int rc = device_.Write(offset, data);
    if (rc == 0) std::copy(data.begin(), data.end(), shadow_.begin() + offset);
    return rc;
  }
  int Trim(std::uint64_t offset, std::uint64_t length) {
    const int rc = device_.Trim(offset, length);
    if (rc == 0) std::fill_n(shadow_.begin() + offset, length, std::byte{0});
    return rc;
  }
  int WriteZeroes(std::uint64_t offset, std::uint64_t length) {
    const int rc = device_.WriteZeroes(offset, length);
    if (rc == 0) std::fill_n(shadow_.begin() + offset, length, std::byte{0});
    return rc;
  }

  // True when [offset, offset + length) reads back exactly as the shadow says.
  bool Matches(std::uint64_t offset, std::size_t length) {
    const Bytes got = ReadBack(device_, offset, length);
    return std::equal(got.begin(), got.end(), shadow_.begin() + offset);
  }
  bool MatchesAll() { return Matches(0, shadow_.size()); }

  // True when every page reads back as the shadow says, read one page at a time.
  bool MatchesPageByPage() {
    for (std::uint64_t offset = 0; offset < shadow_.size(); offset += kPageSize) {
      if (!Matches(offset, kPageSize)) return false;
    }
    return true;
  }

  // Pages of the shadow holding at least one non-zero byte: the pages that must occupy
  // room in some store.
  std::uint64_t NonZeroPages() const {
    std::uint64_t count = 0;
    for (std::size_t at = 0; at < shadow_.size(); at += kPageSize) {
      if (!AllZero(std::span(shadow_).subspan(at, kPageSize))) ++count;
    }
    return count;
  }

 private:
  Device device_;
  Bytes shadow_;
};

// Checks that the device's counts agree with its shadow and with the stores' own figures.
// REQUIRES: the device is the only user of `tiers`.
void CheckCounts(ShadowedDevice& shadowed, const Tiering& tiers) {
  const DevicePageCounts counts = shadowed.device().Counts();
  CHECK(counts.total == shadowed.shadow().size() / kPageSize);
  CHECK(counts.remote == 0);
  CHECK(counts.local + counts.disk == shadowed.NonZeroPages());
  CHECK(counts.mapped() <= counts.total);
  CHECK(tiers.local().Stats().pages == counts.local);
  CHECK(counts.clean <= counts.local);
  CHECK(counts.cached == 0);  // no cache without peers
  if (tiers.disk() != nullptr) {
    // Disk slots hold the disk pages and the copies of clean local pages.
    CHECK(tiers.disk()->Stats().pages == counts.disk + counts.clean);
  } else {
    CHECK(counts.disk == 0);
    CHECK(counts.clean == 0);
  }
}

// Contents of version `version` of page `page` for the concurrency test: the first word
// names both and every other word is derived from them, so a page mixing two versions
// fails IsCompleteVersion.
std::uint64_t MixWord(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// REQUIRES: out.size() == kPageSize. Safe to call from any thread (no assertions).
void FillVersion(std::span<std::byte> out, std::uint64_t page, std::uint32_t version) {
  const std::uint64_t head = page << 32 | version;
  std::memcpy(out.data(), &head, 8);
  for (std::size_t i = 1; i < kPageSize / 8; ++i) {
    const std::uint64_t word = MixWord(head * 4099 + i);
    std::memcpy(out.data() + 8 * i, &word, 8);
  }
}

// Returns true when `in` is all zeros or one complete version of page `page`.
bool IsCompleteVersion(std::span<const std::byte> in, std::uint64_t page) {
  if (AllZero(in)) return true;
  std::uint64_t head;
  std::memcpy(&head, in.data(), 8);
  if (head >> 32 != page || (head & 0xffffffff) == 0) return false;
  for (std::size_t i = 1; i < kPageSize / 8; ++i) {
    std::uint64_t word;
    std::memcpy(&word, in.data() + 8 * i, 8);
    if (word != MixWord(head * 4099 + i)) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("Device reads unwritten space as zeros and starts with nothing mapped") {
  auto tiers = MakeTiering(16, Compression::kNone);
  Device device("d", PageOffset(8), *tiers);
  CHECK(device.name() == "d");
  CHECK(device.size_bytes() == PageOffset(8));
  CHECK(AllZero(ReadBack(device, 0, PageOffset(8))));
  CHECK(AllZero(ReadBack(device, 4095, 2)));
  CHECK(AllZero(ReadBack(device, PageOffset(7) + 17, kPageSize - 17)));
  CHECK(device.Read(PageOffset(3), {}) == 0);
  const DevicePageCounts counts = device.Counts();
  CHECK(counts.total == 8);
  CHECK(counts.mapped() == 0);
  CHECK(counts.zero == 0);
  CHECK(counts.local == 0);
  CHECK(counts.disk == 0);
  CHECK(tiers->local().Stats().pages == 0);
  CHECK(device.Flush() == 0);
}

TEST_CASE("Device random reads and writes match a shadow copy") {
  for (Compression mode : kBothModes) {
    for (bool with_disk : {false, true}) {
      CAPTURE(static_cast<int>(mode));
      CAPTURE(with_disk);
      TempDir dir;
      constexpr std::uint64_t kDevicePages = 40;
      // Without a disk the local store holds every page; with one it holds under half of
      // them, so the random writes also spill to disk and come back.
      auto tiers = with_disk ? MakeTiering(16, mode, dir.File("backing"))
                             : MakeTiering(kDevicePages + 8, mode);
      ShadowedDevice shadowed("random", PageOffset(kDevicePages), *tiers);
      const std::uint64_t size = PageOffset(kDevicePages);
      std::mt19937_64 rng(static_cast<std::uint64_t>(mode) * 2 + with_disk);

      // Picks a range of one of four shapes: whole aligned pages, sub-page, unaligned and
      // spanning pages, or a single byte at a page edge.
      auto pick_range = [&](std::uint64_t* offset, std::size_t* length) {
        switch (rng() % 4) {
          case 0: {
            const std::uint64_t pages = 1 + rng() % 4;
            *offset = PageOffset(rng() % (kDevicePages - pages + 1));
            *length = pages * kPageSize;
            break;
          }
          case 1: {
            const std::uint64_t page = rng() % kDevicePages;
            const std::size_t in_page = rng() % kPageSize;
            *offset = PageOffset(page) + in_page;
            *length = 1 + rng() % (kPageSize - in_page);
            break;
          }
          case 2:
            *length = 1 + rng() % (5 * kPageSize);
            *offset = rng() % (size - *length + 1);
            break;
          default:
            *offset = PageOffset(1 + rng() % (kDevicePages - 1)) - (rng() % 2);
            *length = 1;
            break;
        }
        REQUIRE(*offset + *length <= size);
      };

      for (int op = 0; op < 3000; ++op) {
        std::uint64_t offset;
        std::size_t length;
        pick_range(&offset, &length);
        CAPTURE(op);
        CAPTURE(offset);
        CAPTURE(length);
        const auto kind = rng() % 10;
        if (kind < 3) {
          REQUIRE(shadowed.Write(offset, RandomBytes(length, rng)) == 0);
        } else if (kind < 5) {
          REQUIRE(shadowed.Write(offset, CompressibleBytes(length, rng)) == 0);
        } else if (kind < 6) {
          REQUIRE(shadowed.Write(offset, Bytes(length, std::byte{0})) == 0);
        } else if (kind < 7) {
          REQUIRE(shadowed.Trim(offset, length) == 0);
        } else if (kind < 8) {
          REQUIRE(shadowed.WriteZeroes(offset, length) == 0);
        } else {
          REQUIRE(shadowed.Matches(offset, length));
        }
        if (op % 250 == 0) {
          REQUIRE(shadowed.MatchesAll());
          CheckCounts(shadowed, *tiers);
        }
      }
      CHECK(shadowed.MatchesAll());
      CHECK(shadowed.MatchesPageByPage());
      CheckCounts(shadowed, *tiers);
      if (with_disk) CHECK(tiers->disk()->Stats().pages > 0);
    }
  }
}

TEST_CASE("Device handles page-table chunk boundaries and the last page of a large device") {
  auto tiers = MakeTiering(32, Compression::kLz4);
  std::mt19937_64 rng(5);
  // 1200 pages: three chunks of 512 entries, the last one partly beyond the end.
  ShadowedDevice shadowed("chunks", PageOffset(1200), *tiers);
  for (const std::uint64_t offset :
       {PageOffset(511), PageOffset(512) - 3, PageOffset(1024) - 100, PageOffset(1199)}) {
    CAPTURE(offset);
    const std::size_t length = std::min<std::uint64_t>(kPageSize + 7, PageOffset(1200) - offset);
    REQUIRE(shadowed.Write(offset, RandomBytes(length, rng)) == 0);
  }
  CHECK(shadowed.MatchesAll());
  CheckCounts(shadowed, *tiers);
  REQUIRE(shadowed.Trim(PageOffset(512), PageOffset(1)) == 0);
  CHECK(shadowed.MatchesAll());
  CheckCounts(shadowed, *tiers);

  // A 1 TiB device costs only its top-level table until written; its last byte works.
  constexpr std::uint64_t kHuge = std::uint64_t{1} << 40;
  Device huge("huge", kHuge, *tiers);
  CHECK(huge.Counts().total == kHuge / kPageSize);
  const std::byte tail[3] = {std::byte{1}, std::byte{2}, std::byte{3}};
  REQUIRE(huge.Write(kHuge - 3, tail) == 0);
  const Bytes got = ReadBack(huge, kHuge - kPageSize, kPageSize);
  CHECK(AllZero(std::span(got).first(kPageSize - 3)));
  CHECK(got[kPageSize - 3] == std::byte{1});
  CHECK(got[kPageSize - 1] == std::byte{3});
  CHECK(huge.Counts().local == 1);
  CHECK(AllZero(ReadBack(huge, kHuge / 2, 3 * kPageSize)));
  REQUIRE(huge.Trim(kHuge - kPageSize, kPageSize) == 0);
  CHECK(huge.Counts().mapped() == 0);
}

TEST_CASE("Device counts non-zero pages as local and all-zero pages as zero") {
  for (Compression mode : kBothModes) {
    CAPTURE(static_cast<int>(mode));
    auto tiers = MakeTiering(16, mode);
    ShadowedDevice shadowed("counts", PageOffset(8), *tiers);
    std::mt19937_64 rng(11);

    REQUIRE(shadowed.Write(PageOffset(0), RandomBytes(kPageSize, rng)) == 0);
    CHECK(shadowed.device().Counts().local == 1);
    CHECK(shadowed.device().Counts().zero == 0);
    CHECK(tiers->local().Stats().pages == 1);

    // A whole page of zeros is a zero page and takes no room.
    REQUIRE(shadowed.Write(PageOffset(1), Bytes(kPageSize, std::byte{0})) == 0);
    CHECK(shadowed.device().Counts().zero == 1);
    CHECK(shadowed.device().Counts().local == 1);
    CHECK(shadowed.device().Counts().mapped() == 2);
    CHECK(tiers->local().Stats().pages == 1);

    // So is a sub-page write of zeros into an unmapped page: the page is still all zero.
    REQUIRE(shadowed.Write(PageOffset(2) + 100, Bytes(50, std::byte{0})) == 0);
    CHECK(shadowed.device().Counts().zero == 2);
    CHECK(tiers->local().Stats().pages == 1);

    // A sub-page write of data makes a local page.
    REQUIRE(shadowed.Write(PageOffset(3) + 4000, RandomBytes(96, rng)) == 0);
    CHECK(shadowed.device().Counts().local == 2);
    CHECK(tiers->local().Stats().pages == 2);

    // Overwriting a local page with zeros frees its room.
    REQUIRE(shadowed.Write(PageOffset(0), Bytes(kPageSize, std::byte{0})) == 0);
    CHECK(shadowed.device().Counts().local == 1);
    CHECK(shadowed.device().Counts().zero == 3);
    CHECK(tiers->local().Stats().pages == 1);

    // Zeroing the only non-zero bytes of a page by a sub-page write makes it a zero page.
    REQUIRE(shadowed.Write(PageOffset(3) + 4000, Bytes(96, std::byte{0})) == 0);
    CHECK(shadowed.device().Counts().local == 0);
    CHECK(shadowed.device().Counts().zero == 4);
    CHECK(tiers->local().Stats().pages == 0);
    CHECK(tiers->local().Stats().used_bytes == 0);

    CHECK(shadowed.MatchesAll());
    CheckCounts(shadowed, *tiers);
  }
}

TEST_CASE("Device WriteZeroes makes zero pages and Trim unmaps them") {
  for (Compression mode : kBothModes) {
    CAPTURE(static_cast<int>(mode));
    auto tiers = MakeTiering(16, mode);
    ShadowedDevice shadowed("zeroes", PageOffset(8), *tiers);
    std::mt19937_64 rng(12);
    REQUIRE(shadowed.Write(0, RandomBytes(PageOffset(8), rng)) == 0);
    CHECK(shadowed.device().Counts().local == 8);
    CHECK(tiers->local().Stats().pages == 8);

    REQUIRE(shadowed.WriteZeroes(PageOffset(1), PageOffset(2)) == 0);
    DevicePageCounts counts = shadowed.device().Counts();
    CHECK(counts.zero == 2);
    CHECK(counts.local == 6);
    CHECK(counts.mapped() == 8);
    CHECK(tiers->local().Stats().pages == 6);
    CHECK(shadowed.MatchesAll());

    REQUIRE(shadowed.Trim(PageOffset(3), PageOffset(3)) == 0);
    counts = shadowed.device().Counts();
    CHECK(counts.zero == 2);
    CHECK(counts.local == 3);
    CHECK(counts.mapped() == 5);
    CHECK(tiers->local().Stats().pages == 3);
    CHECK(shadowed.MatchesAll());

    // Trimming zero pages unmaps them too; WriteZeroes on unmapped pages maps them.
    REQUIRE(shadowed.Trim(PageOffset(1), PageOffset(2)) == 0);
    CHECK(shadowed.device().Counts().zero == 0);
    CHECK(shadowed.device().Counts().mapped() == 3);
    REQUIRE(shadowed.WriteZeroes(PageOffset(4), PageOffset(1)) == 0);
    CHECK(shadowed.device().Counts().zero == 1);
    CHECK(shadowed.device().Counts().mapped() == 4);

    // Trimming never-written space changes nothing.
    Device fresh("fresh", PageOffset(1024), *tiers);
    REQUIRE(fresh.Trim(0, PageOffset(1024)) == 0);
    CHECK(fresh.Counts().mapped() == 0);

    // The whole device at once.
    REQUIRE(shadowed.Trim(0, PageOffset(8)) == 0);
    CHECK(shadowed.device().Counts().mapped() == 0);
    CHECK(tiers->local().Stats().pages == 0);
    CHECK(shadowed.MatchesAll());
  }
}

TEST_CASE("Device partial-page Trim and WriteZeroes zero only their range") {
  for (Compression mode : kBothModes) {
    CAPTURE(static_cast<int>(mode));
    auto tiers = MakeTiering(16, mode);
    ShadowedDevice shadowed("partial", PageOffset(8), *tiers);
    std::mt19937_64 rng(13);
    REQUIRE(shadowed.Write(0, RandomBytes(PageOffset(8), rng)) == 0);

    // Inside one page.
    REQUIRE(shadowed.Trim(PageOffset(0) + 100, 200) == 0);
    REQUIRE(shadowed.WriteZeroes(PageOffset(1) + 1, kPageSize - 2) == 0);
    CHECK(shadowed.MatchesAll());
    CHECK(shadowed.device().Counts().local == 8);

    // Spanning pages: a partial head, whole middle pages and a partial tail.
    REQUIRE(shadowed.WriteZeroes(PageOffset(2) + 100, PageOffset(2)) == 0);
    CHECK(shadowed.MatchesAll());
    DevicePageCounts counts = shadowed.device().Counts();
    CHECK(counts.zero == 1);   // page 3
    CHECK(counts.local == 7);  // pages 2 and 4 keep bytes outside the range
    REQUIRE(shadowed.Trim(PageOffset(5) + 4095, PageOffset(1) + 2) == 0);
    CHECK(shadowed.MatchesAll());
    counts = shadowed.device().Counts();
    CHECK(counts.mapped() == 7);  // page 6 unmapped
    CHECK(counts.local == 6);
    CHECK(tiers->local().Stats().pages == 6);

    // Zeroing a page in two partial halves leaves an all-zero page that takes no room.
    REQUIRE(shadowed.Trim(PageOffset(7), 2000) == 0);
    REQUIRE(shadowed.WriteZeroes(PageOffset(7) + 2000, kPageSize - 2000) == 0);
    CHECK(shadowed.MatchesAll());
    CHECK(shadowed.device().Counts().local == 5);
    CHECK(tiers->local().Stats().pages == 5);
    CheckCounts(shadowed, *tiers);
  }
}

// Regression: a partial-page Trim on a page that was never written went through the
// write path and mapped it as a zero page; a partial Trim that left a page all zero made
// it a zero page instead of unmapping it.
TEST_CASE("Device partial-page Trim never maps a page and unmaps one it empties") {
  auto tiers = MakeTiering(16, Compression::kNone);
  ShadowedDevice shadowed("trim", PageOffset(4), *tiers);
  std::mt19937_64 rng(29);

  REQUIRE(shadowed.Trim(PageOffset(0) + 100, 200) == 0);
  REQUIRE(shadowed.WriteZeroes(PageOffset(1) + 7, 9) == 0);
  CHECK(shadowed.device().Counts().mapped() == 0);
  CHECK(shadowed.MatchesAll());

  // Page 2 holds data only in its first 1000 bytes; trimming those empties it.
  Bytes head = RandomBytes(1000, rng);
  REQUIRE(shadowed.Write(PageOffset(2), head) == 0);
  CHECK(shadowed.device().Counts().local == 1);
  REQUIRE(shadowed.Trim(PageOffset(2), 1000) == 0);
  const DevicePageCounts counts = shadowed.device().Counts();
  CHECK(counts.mapped() == 0);
  CHECK(counts.zero == 0);
  CHECK(tiers->local().Stats().pages == 0);
  CHECK(shadowed.MatchesAll());
}

TEST_CASE("Device overwrites do not leak store room") {
  for (Compression mode : kBothModes) {
    CAPTURE(static_cast<int>(mode));
    auto tiers = MakeTiering(64, mode);
    ShadowedDevice shadowed("overwrite", PageOffset(16), *tiers);
    std::mt19937_64 rng(14);
    for (int round = 0; round < 200; ++round) {
      CAPTURE(round);
      const std::uint64_t page = rng() % 13;  // leaves room for 3 pages and 7 bytes
      const std::size_t length = PageOffset(1 + rng() % 3);
      const Bytes data = round % 2 ? RandomBytes(length, rng) : CompressibleBytes(length, rng);
      REQUIRE(shadowed.Write(PageOffset(page) + (round % 3 == 0 ? 0 : 7), data) == 0);
      REQUIRE(tiers->local().Stats().pages == shadowed.device().Counts().local);
    }
    CHECK(shadowed.MatchesAll());
    CheckCounts(shadowed, *tiers);
    const std::uint64_t frames = tiers->local().Stats().used_bytes / kPageSize;
    CHECK(frames <= shadowed.device().Counts().local);
  }
}

TEST_CASE("Device spills to the disk store when the local store is full") {
  for (Compression mode : kBothModes) {
    CAPTURE(static_cast<int>(mode));
    TempDir dir;
    constexpr std::uint64_t kLocalPages = 24;
    auto tiers = MakeTiering(kLocalPages, mode, dir.File("backing"));
    ShadowedDevice shadowed("spill", PageOffset(3 * kLocalPages + 8), *tiers);
    std::mt19937_64 rng(15);
    // Random pages do not compress, so lz4 stores them raw as well: kLocalPages fit.
    for (std::uint64_t page = 0; page < 3 * kLocalPages; ++page) {
      REQUIRE(shadowed.Write(PageOffset(page), RandomBytes(kPageSize, rng)) == 0);
    }
    DevicePageCounts counts = shadowed.device().Counts();
    CHECK(counts.local == kLocalPages);
    CHECK(counts.disk == 2 * kLocalPages);
    CHECK(counts.disk > 0);
    CHECK(counts.local + counts.disk + counts.zero == counts.mapped());
    CHECK(counts.mapped() == 3 * kLocalPages);
    CHECK(tiers->local().Stats().used_bytes == tiers->local().Stats().total_bytes);
    CHECK(shadowed.MatchesAll());
    CHECK(shadowed.MatchesPageByPage());
    CheckCounts(shadowed, *tiers);

    // Overwriting every page while local is full: the written pages are the hot ones, so
    // they land locally and colder pages are demoted to disk; nothing is lost or leaked.
    REQUIRE(shadowed.Write(PageOffset(0) + 10,
                           RandomBytes(PageOffset(3 * kLocalPages) - 20, rng)) == 0);
    CHECK(shadowed.MatchesAll());
    CheckCounts(shadowed, *tiers);
    CHECK(shadowed.device().Counts().local == kLocalPages);
    CHECK(shadowed.device().Counts().mapped() == 3 * kLocalPages);

    // Trimming frees room in whichever tier held the pages.
    const DevicePageCounts before_trim = shadowed.device().Counts();
    REQUIRE(shadowed.Trim(0, PageOffset(4)) == 0);
    const DevicePageCounts after_trim = shadowed.device().Counts();
    CHECK(after_trim.mapped() == before_trim.mapped() - 4);
    CHECK(after_trim.local + after_trim.disk == before_trim.local + before_trim.disk - 4);
    CHECK(tiers->local().Stats().pages == after_trim.local);
    CHECK(tiers->disk()->Stats().pages == after_trim.disk);
    // A rewritten page is hot: it ends up in the local store.
    REQUIRE(shadowed.Write(PageOffset(3 * kLocalPages - 1), RandomBytes(kPageSize, rng)) == 0);
    CHECK(shadowed.device().Counts().local >= 1);
    CHECK(shadowed.device().Counts().mapped() == after_trim.mapped());
    CHECK(shadowed.MatchesAll());
    CheckCounts(shadowed, *tiers);

    // The pages past the written range were never touched.
    CHECK(AllZero(ReadBack(shadowed.device(), PageOffset(3 * kLocalPages), PageOffset(8))));
  }
}

TEST_CASE("Device without a disk store returns ENOSPC when full and keeps earlier pages") {
  for (Compression mode : kBothModes) {
    CAPTURE(static_cast<int>(mode));
    constexpr std::uint64_t kLocalPages = 20;
    auto tiers = MakeTiering(kLocalPages, mode);
    ShadowedDevice shadowed("full", PageOffset(3 * kLocalPages), *tiers);
    std::mt19937_64 rng(16);

    std::uint64_t written = 0;
    int rc = 0;
    for (std::uint64_t page = 0; page < 3 * kLocalPages; ++page) {
      rc = shadowed.Write(PageOffset(page), RandomBytes(kPageSize, rng));
      if (rc != 0) break;
      ++written;
    }
    CHECK(rc == -ENOSPC);
    CHECK(written == kLocalPages);
    CHECK(shadowed.MatchesAll());  // every earlier page intact; the refused one reads zeros
    CheckCounts(shadowed, *tiers);
    CHECK(shadowed.device().Counts().mapped() == kLocalPages);

    // More writes of new data are refused, whole-page or partial, and change nothing.
    CHECK(shadowed.Write(PageOffset(kLocalPages + 1), RandomBytes(kPageSize, rng)) == -ENOSPC);
    CHECK(shadowed.Write(PageOffset(kLocalPages + 2) + 5, RandomBytes(10, rng)) == -ENOSPC);
    CHECK(shadowed.MatchesAll());
    CheckCounts(shadowed, *tiers);

    // A write that runs from the last stored page into a new one fails at the new one and
    // leaves the pages beyond its range alone.
    const Bytes across = RandomBytes(PageOffset(2), rng);
    CHECK(shadowed.device().Write(PageOffset(kLocalPages - 1), across) == -ENOSPC);
    const Bytes last = ReadBack(shadowed.device(), PageOffset(kLocalPages - 1), kPageSize);
    const bool old_or_new = std::equal(last.begin(), last.end(),
                                       shadowed.shadow().begin() + PageOffset(kLocalPages - 1)) ||
                            std::equal(last.begin(), last.end(), across.begin());
    CHECK(old_or_new);
    CHECK(AllZero(ReadBack(shadowed.device(), PageOffset(kLocalPages), PageOffset(2))));
    REQUIRE(shadowed.Write(PageOffset(kLocalPages - 1), last) == 0);  // resync the shadow

    // Overwriting stored pages while full succeeds: their old room is reused.
    for (std::uint64_t page = 0; page < kLocalPages; page += 3) {
      CAPTURE(page);
      REQUIRE(shadowed.Write(PageOffset(page), RandomBytes(kPageSize, rng)) == 0);
    }
    REQUIRE(shadowed.Write(PageOffset(5) + 1000, RandomBytes(3000, rng)) == 0);
    REQUIRE(shadowed.Write(PageOffset(6) + 4000, RandomBytes(PageOffset(2), rng)) == 0);
    CHECK(shadowed.MatchesAll());
    CheckCounts(shadowed, *tiers);

    // Zeros need no room: zero pages and WRITE_ZEROES succeed while full.
    REQUIRE(shadowed.Write(PageOffset(kLocalPages + 3), Bytes(kPageSize, std::byte{0})) == 0);
    REQUIRE(shadowed.WriteZeroes(PageOffset(kLocalPages + 4), PageOffset(2)) == 0);
    REQUIRE(shadowed.Trim(PageOffset(kLocalPages + 6) + 10, 100) == 0);
    CHECK(shadowed.MatchesAll());
    CheckCounts(shadowed, *tiers);

    // After Trim frees room, writes of new pages succeed again, exactly as many as freed.
    REQUIRE(shadowed.Trim(PageOffset(2), PageOffset(2)) == 0);
    CHECK(tiers->local().Stats().pages == kLocalPages - 2);
    REQUIRE(shadowed.Write(PageOffset(2 * kLocalPages), RandomBytes(kPageSize, rng)) == 0);
    REQUIRE(shadowed.Write(PageOffset(2 * kLocalPages + 1) + 9, RandomBytes(9, rng)) == 0);
    CHECK(shadowed.Write(PageOffset(2 * kLocalPages + 2), RandomBytes(kPageSize, rng)) == -ENOSPC);
    // WRITE_ZEROES frees room too.
    REQUIRE(shadowed.WriteZeroes(PageOffset(7), PageOffset(1)) == 0);
    REQUIRE(shadowed.Write(PageOffset(2 * kLocalPages + 2), RandomBytes(kPageSize, rng)) == 0);
    CHECK(shadowed.MatchesAll());
    CheckCounts(shadowed, *tiers);
  }
}

TEST_CASE("Device with lz4 keeps a page's old contents when its overwrite finds no room") {
  // Compressible pages pack 16 to a frame; once every frame is full, a page that does not
  // compress needs a whole frame, which freeing the old chunk does not provide. With a
  // disk, cold pages go there to make room; without, the write is refused.
  TempDir dir;
  for (bool with_disk : {false, true}) {
    CAPTURE(with_disk);
    constexpr std::uint64_t kFrames = 4;
    auto tiers =
        MakeTiering(kFrames, Compression::kLz4, with_disk ? dir.File("backing") : std::string());
    ShadowedDevice shadowed("lz4", PageOffset(kFrames * 16 + 16), *tiers);
    std::mt19937_64 rng(17);
    for (std::uint64_t page = 0; page < kFrames * 16; ++page) {
      Bytes data(kPageSize, std::byte{0});
      const std::uint64_t id = page + 1;
      std::memcpy(data.data(), &id, sizeof(id));
      REQUIRE(shadowed.Write(PageOffset(page), data) == 0);
    }
    REQUIRE(tiers->local().Stats().used_bytes == tiers->local().Stats().total_bytes);
    REQUIRE(tiers->local().Stats().pages == kFrames * 16);
    REQUIRE(shadowed.device().Counts().disk == 0);

    const int rc = shadowed.Write(PageOffset(3), RandomBytes(kPageSize, rng));
    if (with_disk) {
      CHECK(rc == 0);
      CHECK(shadowed.device().Counts().disk >= 1);
      CHECK(shadowed.device().Counts().local + shadowed.device().Counts().disk == kFrames * 16);
    } else {
      CHECK(rc == -ENOSPC);
      CHECK(shadowed.device().Counts().local == kFrames * 16);
    }
    CHECK(shadowed.MatchesAll());  // page 3 holds its old contents when refused
    CheckCounts(shadowed, *tiers);
  }
}

TEST_CASE("Device with lz4 reuses a page's own frame when its overwrite no longer compresses") {
  // Every frame is in use, one of them by a single compressed page. Overwriting that page
  // with data that does not compress needs a whole frame: the page's own, once its old
  // chunk is released. It must stay local rather than fail or go to disk.
  TempDir dir;
  for (bool with_disk : {false, true}) {
    CAPTURE(with_disk);
    constexpr std::uint64_t kFrames = 4;
    auto tiers =
        MakeTiering(kFrames, Compression::kLz4, with_disk ? dir.File("backing") : std::string());
    ShadowedDevice shadowed("lz4", PageOffset(8), *tiers);
    std::mt19937_64 rng(20);
    for (std::uint64_t page = 0; page < kFrames - 1; ++page) {
      REQUIRE(shadowed.Write(PageOffset(page), RandomBytes(kPageSize, rng)) == 0);
    }
    REQUIRE(shadowed.Write(PageOffset(kFrames - 1), CompressibleBytes(kPageSize, rng)) == 0);
    REQUIRE(tiers->local().Stats().used_bytes == tiers->local().Stats().total_bytes);
    // A new page that does not compress finds no frame.
    CHECK(shadowed.Write(PageOffset(kFrames), RandomBytes(kPageSize, rng)) ==
          (with_disk ? 0 : -ENOSPC));

    REQUIRE(shadowed.Write(PageOffset(kFrames - 1), RandomBytes(kPageSize, rng)) == 0);
    const DevicePageCounts counts = shadowed.device().Counts();
    if (with_disk) {
      // The new page made room by demoting cold pages to disk; all five pages are kept.
      CHECK(counts.local + counts.disk == kFrames + 1);
      CHECK(counts.local >= 1);
    } else {
      CHECK(counts.local == kFrames);
      CHECK(counts.disk == 0);
    }
    CHECK(shadowed.MatchesAll());
    CheckCounts(shadowed, *tiers);
  }
}

TEST_CASE("Device with a bounded disk store returns ENOSPC once both tiers are full") {
  TempDir dir;
  constexpr std::uint64_t kLocalPages = 8;
  constexpr std::uint64_t kDiskPages = 8;
  auto tiers = MakeTiering(kLocalPages, Compression::kNone, dir.File("backing"), kDiskPages);
  ShadowedDevice shadowed("bounded", PageOffset(32), *tiers);
  std::mt19937_64 rng(21);
  for (std::uint64_t page = 0; page < kLocalPages + kDiskPages; ++page) {
    REQUIRE(shadowed.Write(PageOffset(page), RandomBytes(kPageSize, rng)) == 0);
  }
  CHECK(shadowed.device().Counts().local == kLocalPages);
  CHECK(shadowed.device().Counts().disk == kDiskPages);
  const std::uint64_t next = kLocalPages + kDiskPages;
  CHECK(shadowed.Write(PageOffset(next), RandomBytes(kPageSize, rng)) == -ENOSPC);
  CHECK(shadowed.Write(PageOffset(next) + 1, RandomBytes(1, rng)) == -ENOSPC);
  // Overwriting a local page still works: it is rewritten in its own room.
  REQUIRE(shadowed.Write(PageOffset(2), RandomBytes(kPageSize, rng)) == 0);
  REQUIRE(shadowed.Write(PageOffset(3) + 9, RandomBytes(99, rng)) == 0);
  // Zeros need no room.
  REQUIRE(shadowed.WriteZeroes(PageOffset(next + 1), PageOffset(2)) == 0);
  CHECK(shadowed.MatchesAll());
  CheckCounts(shadowed, *tiers);
  // Freeing disk room lets a new page in.
  REQUIRE(shadowed.Trim(PageOffset(kLocalPages), PageOffset(1)) == 0);
  REQUIRE(shadowed.Write(PageOffset(next), RandomBytes(kPageSize, rng)) == 0);
  CHECK(shadowed.device().Counts().disk == kDiskPages);
  CHECK(shadowed.MatchesAll());
  CheckCounts(shadowed, *tiers);
}

// Regression: when the local store and a bounded disk store were both full, overwriting a
// page that lives on disk failed with -ENOSPC although its own disk slot could take the
// new contents, so a full device refused rewrites of blocks it already held.
TEST_CASE("Device overwrites a disk page in its own room when every tier is full") {
  TempDir dir;
  constexpr std::uint64_t kLocalPages = 8;
  constexpr std::uint64_t kDiskPages = 8;
  auto tiers = MakeTiering(kLocalPages, Compression::kNone, dir.File("backing"), kDiskPages);
  ShadowedDevice shadowed("bounded", PageOffset(32), *tiers);
  std::mt19937_64 rng(22);
  for (std::uint64_t page = 0; page < kLocalPages + kDiskPages; ++page) {
    REQUIRE(shadowed.Write(PageOffset(page), RandomBytes(kPageSize, rng)) == 0);
  }
  REQUIRE(shadowed.Write(PageOffset(kLocalPages + kDiskPages), RandomBytes(kPageSize, rng)) ==
          -ENOSPC);
  const std::uint64_t disk_page = kLocalPages + 3;
  CHECK(shadowed.Write(PageOffset(disk_page), RandomBytes(kPageSize, rng)) == 0);
  CHECK(shadowed.Write(PageOffset(disk_page + 1) + 5, RandomBytes(10, rng)) == 0);
  CHECK(shadowed.MatchesAll());
  CheckCounts(shadowed, *tiers);
}

TEST_CASE("Destroying a device releases all of its store room") {
  for (Compression mode : kBothModes) {
    CAPTURE(static_cast<int>(mode));
    TempDir dir;
    auto tiers = MakeTiering(16, mode, dir.File("backing"));
    {
      Device device("gone", PageOffset(2048), *tiers);
      std::mt19937_64 rng(18);
      for (std::uint64_t page = 0; page < 2048; page += 37) {
        const Bytes data =
            page % 2 ? RandomBytes(kPageSize, rng) : CompressibleBytes(kPageSize, rng);
        REQUIRE(device.Write(PageOffset(page), data) == 0);
      }
      REQUIRE(device.WriteZeroes(PageOffset(1), PageOffset(1)) == 0);
      CHECK(tiers->local().Stats().pages > 0);
      CHECK(tiers->disk()->Stats().pages > 0);
      CHECK(tiers->local().Stats().pages == device.Counts().local);
      CHECK(tiers->disk()->Stats().pages == device.Counts().disk);
    }
    CHECK(tiers->local().Stats().pages == 0);
    CHECK(tiers->local().Stats().used_bytes == 0);
    CHECK(tiers->disk()->Stats().pages == 0);
  }
}

TEST_CASE("Two devices sharing one tiering keep separate data") {
  for (Compression mode : kBothModes) {
    CAPTURE(static_cast<int>(mode));
    auto tiers = MakeTiering(64, mode);
    std::mt19937_64 rng(19);
    ShadowedDevice a("a", PageOffset(16), *tiers);
    {
      ShadowedDevice b("b", PageOffset(8), *tiers);
      REQUIRE(a.Write(0, RandomBytes(PageOffset(8), rng)) == 0);
      REQUIRE(b.Write(0, RandomBytes(PageOffset(8), rng)) == 0);
      REQUIRE(a.Write(100, CompressibleBytes(PageOffset(3), rng)) == 0);
      REQUIRE(b.Write(PageOffset(2) + 5, RandomBytes(77, rng)) == 0);
      REQUIRE(b.Trim(PageOffset(4), PageOffset(2)) == 0);
      REQUIRE(a.WriteZeroes(PageOffset(6), PageOffset(1)) == 0);
      CHECK(a.MatchesAll());
      CHECK(b.MatchesAll());
      CHECK(a.device().Counts().local + b.device().Counts().local == tiers->local().Stats().pages);
      CHECK(a.device().Counts().local == a.NonZeroPages());
      CHECK(b.device().Counts().local == b.NonZeroPages());
    }
    // Destroying one releases only its own pages.
    CHECK(a.MatchesAll());
    CheckCounts(a, *tiers);
  }
}

TEST_CASE("Device under concurrent writers and readers never shows a torn page") {
  struct Setup {
    Compression mode;
    std::uint64_t local_pages;
    bool with_disk;
  };
  // A roomy compressed store, and a tight one that makes writers race for the last room
  // and spill to disk.
  for (const Setup setup :
       {Setup{Compression::kLz4, 128, false}, Setup{Compression::kNone, 16, true}}) {
    CAPTURE(static_cast<int>(setup.mode));
    CAPTURE(setup.with_disk);
    TempDir dir;
    auto tiers = MakeTiering(setup.local_pages, setup.mode,
                             setup.with_disk ? dir.File("backing") : std::string());
    constexpr std::uint64_t kPages = 64;
    constexpr int kThreads = 4;
    constexpr std::uint64_t kSpan = 28;    // pages per thread
    constexpr std::uint64_t kStride = 12;  // thread t covers [t * 12, t * 12 + 28): overlapping
    static_assert((kThreads - 1) * kStride + kSpan <= kPages);
    Device device("concurrent", PageOffset(kPages), *tiers);
    std::vector<std::atomic<bool>> touched(kPages);
    std::atomic<int> failures{0};
    std::atomic<int> torn{0};

    auto worker = [&](int thread_index) {
      std::mt19937_64 rng(100 + thread_index);
      const std::uint64_t first = thread_index * kStride;
      Bytes buffer(PageOffset(4));
      std::uint32_t sequence = 0;
      for (int op = 0; op < 1500; ++op) {
        const std::uint64_t run = 1 + rng() % 4;
        const std::uint64_t page = first + rng() % (kSpan - run + 1);
        const auto kind = rng() % 10;
        if (kind < 5) {
          for (std::uint64_t i = 0; i < run; ++i) {
            ++sequence;
            const std::uint32_t version =
                sequence << 3 | static_cast<std::uint32_t>(thread_index + 1);
            FillVersion(std::span(buffer).subspan(PageOffset(i), kPageSize), page + i, version);
            touched[page + i].store(true);
          }
          if (device.Write(PageOffset(page), std::span(buffer).first(PageOffset(run))) != 0) {
            ++failures;
          }
        } else if (kind < 6) {
          for (std::uint64_t i = 0; i < run; ++i) touched[page + i].store(true);
          if (device.WriteZeroes(PageOffset(page), PageOffset(run)) != 0) ++failures;
        } else {
          std::span<std::byte> out = std::span(buffer).first(PageOffset(run));
          if (device.Read(PageOffset(page), out) != 0) {
            ++failures;
            continue;
          }
          for (std::uint64_t i = 0; i < run; ++i) {
            if (!IsCompleteVersion(out.subspan(PageOffset(i), kPageSize), page + i)) ++torn;
          }
        }
      }
    };
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
    for (std::thread& thread : threads) thread.join();

    CHECK(failures.load() == 0);
    CHECK(torn.load() == 0);

    // Every page is a complete version; the counts add up to what the pages hold.
    std::uint64_t touched_pages = 0;
    std::uint64_t zero_pages = 0;
    std::uint64_t data_pages = 0;
    for (std::uint64_t page = 0; page < kPages; ++page) {
      CAPTURE(page);
      const Bytes got = ReadBack(device, PageOffset(page), kPageSize);
      CHECK(IsCompleteVersion(got, page));
      if (touched[page].load()) {
        ++touched_pages;
        if (AllZero(got)) {
          ++zero_pages;
        } else {
          ++data_pages;
        }
      } else {
        CHECK(AllZero(got));
      }
    }
    const DevicePageCounts counts = device.Counts();
    CHECK(counts.mapped() == touched_pages);
    CHECK(counts.zero == zero_pages);
    CHECK(counts.local + counts.disk == data_pages);
    CHECK(tiers->local().Stats().pages == counts.local);
    if (setup.with_disk) {
      CHECK(tiers->disk()->Stats().pages == counts.disk + counts.clean);
      CHECK(counts.disk > 0);
    } else {
      CHECK(counts.disk == 0);
    }
  }
}

}  // namespace memlend
