// Unit tests for DiskStore: round trips, slot reuse, the size bound and open failures.
#include "temp_dir.h"
#include "store/disk_store.h"

#include <doctest/doctest.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace memlend {
namespace {

using Page = std::array<std::byte, kPageSize>;

using memlend::testing::TempDir;

// Fills `page` with random bytes derived from `seed`; different seeds give different pages.
void FillRandom(Page& page, std::uint64_t seed) {
  std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ULL + 7);
  for (std::size_t i = 0; i < kPageSize; i += 8) {
    const std::uint64_t v = rng();
    std::memcpy(page.data() + i, &v, 8);
  }
}

int WritePage(PageStore& store, const Page& page, Slot* slot) {
  return store.Write(ConstPageSpan(page), 0, slot);
}

// Returns true if `slot` reads back successfully and equals `expected`.
bool ReadsBack(PageStore& store, Slot slot, const Page& expected) {
  Page out;
  out.fill(std::byte{0x5a});
  if (store.Read(slot, PageSpan(out)) != 0) return false;
  return out == expected;
}

// Returns the size of the file at `path`, or -1.
off_t FileSize(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 ? st.st_size : -1;
}

// Returns the 512-byte blocks allocated to the file at `path`, or -1.
long long FileBlocks(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 ? static_cast<long long>(st.st_blocks) : -1;
}

}  // namespace

TEST_CASE("DiskStore round-trips many distinct pages") {
  TempDir dir;
  const std::string path = dir.File("pages");
  DiskStore store(path, 0);
  CHECK(store.path() == path);
  constexpr std::size_t kPages = 300;
  std::vector<Page> pages(kPages);
  std::vector<Slot> slots(kPages);
  for (std::size_t i = 0; i < kPages; ++i) {
    FillRandom(pages[i], i);
    REQUIRE(WritePage(store, pages[i], &slots[i]) == 0);
    CHECK(slots[i] == i);  // an empty store appends in order
  }
  for (std::size_t i = 0; i < kPages; ++i) REQUIRE(ReadsBack(store, slots[i], pages[i]));
  CHECK(FileSize(path) == static_cast<off_t>(kPages * kPageSize));

  const StoreStats stats = store.Stats();
  CHECK(stats.pages == kPages);
  CHECK(stats.used_bytes == kPages * kPageSize);
  CHECK(stats.total_bytes == 0);  // unbounded
}

TEST_CASE("DiskStore truncates an existing backing file") {
  TempDir dir;
  const std::string path = dir.File("old");
  {
    std::ofstream old(path, std::ios::binary);
    old << std::string(3 * kPageSize, 'x');
  }
  REQUIRE(FileSize(path) == static_cast<off_t>(3 * kPageSize));
  DiskStore store(path, 0);
  CHECK(FileSize(path) == 0);
  CHECK(store.Stats().pages == 0);
}

TEST_CASE("DiskStore reuses the lowest discarded slot first") {
  TempDir dir;
  DiskStore store(dir.File("reuse"), 0);
  std::vector<Page> pages(6);
  std::vector<Slot> slots(6);
  for (std::size_t i = 0; i < 5; ++i) {
    FillRandom(pages[i], 100 + i);
    REQUIRE(WritePage(store, pages[i], &slots[i]) == 0);
    REQUIRE(slots[i] == i);
  }
  store.Discard(3);
  store.Discard(1);
  CHECK(store.Stats().pages == 3);

  Page a, b, c;
  FillRandom(a, 200);
  FillRandom(b, 201);
  FillRandom(c, 202);
  Slot sa, sb, sc;
  REQUIRE(WritePage(store, a, &sa) == 0);
  REQUIRE(WritePage(store, b, &sb) == 0);
  REQUIRE(WritePage(store, c, &sc) == 0);
  CHECK(sa == 1);
  CHECK(sb == 3);
  CHECK(sc == 5);  // free list empty again: append
  CHECK(ReadsBack(store, 0, pages[0]));
  CHECK(ReadsBack(store, 1, a));
  CHECK(ReadsBack(store, 2, pages[2]));
  CHECK(ReadsBack(store, 3, b));
  CHECK(ReadsBack(store, 4, pages[4]));
  CHECK(ReadsBack(store, 5, c));
  CHECK(store.Stats().pages == 6);
}

TEST_CASE("DiskStore bounded by max_bytes returns ENOSPC when full") {
  TempDir dir;
  const std::string path = dir.File("bounded");
  // A bound that is not a page multiple rounds down: four slots.
  DiskStore store(path, 4 * kPageSize + 100);
  CHECK(store.Stats().total_bytes == 4 * kPageSize);
  std::vector<Page> pages(4);
  std::vector<Slot> slots(4);
  for (std::size_t i = 0; i < 4; ++i) {
    FillRandom(pages[i], 300 + i);
    REQUIRE(WritePage(store, pages[i], &slots[i]) == 0);
  }
  Page extra;
  FillRandom(extra, 400);
  Slot slot = 999;
  CHECK(WritePage(store, extra, &slot) == -ENOSPC);
  CHECK(slot == 999);
  CHECK(store.Stats().pages == 4);
  CHECK(store.Stats().used_bytes == 4 * kPageSize);
  CHECK(FileSize(path) == static_cast<off_t>(4 * kPageSize));
  for (std::size_t i = 0; i < 4; ++i) CHECK(ReadsBack(store, slots[i], pages[i]));

  store.Discard(slots[2]);
  REQUIRE(WritePage(store, extra, &slot) == 0);
  CHECK(slot == slots[2]);
  CHECK(ReadsBack(store, slot, extra));
  CHECK(WritePage(store, extra, &slot) == -ENOSPC);
}

TEST_CASE("DiskStore rejects a bound smaller than one page") {
  TempDir dir;
  CHECK_THROWS_AS(DiskStore(dir.File("tiny"), kPageSize - 1), std::invalid_argument);
}

TEST_CASE("DiskStore names the path when it cannot open the backing file") {
  TempDir dir;
  const std::string path = dir.File("no/such/dir/backing");
  try {
    DiskStore store(path, 0);
    FAIL("opening a file in a missing directory succeeded");
  } catch (const std::system_error& e) {
    CHECK(std::string(e.what()).find(path) != std::string::npos);
    CHECK(e.code().value() == ENOENT);
  }
}

TEST_CASE("DiskStore releases a discarded slot's blocks") {
  TempDir dir;
  // Skip where the file system cannot punch holes; the store then only loses space.
  {
    const std::string probe = dir.File("probe");
    const int fd = open(probe.c_str(), O_RDWR | O_CREAT, 0600);
    REQUIRE(fd >= 0);
    const bool can_punch =
        ftruncate(fd, kPageSize) == 0 &&
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, kPageSize) == 0;
    close(fd);
    if (!can_punch) {
      MESSAGE("skipped: the temporary directory's file system cannot punch holes");
      return;
    }
  }
  const std::string path = dir.File("holes");
  DiskStore store(path, 0);
  constexpr std::size_t kPages = 64;
  std::vector<Slot> slots(kPages);
  Page page;
  for (std::size_t i = 0; i < kPages; ++i) {
    FillRandom(page, i);
    REQUIRE(WritePage(store, page, &slots[i]) == 0);
  }
  const long long full_blocks = FileBlocks(path);
  REQUIRE(full_blocks >= static_cast<long long>(kPages * kPageSize / 512));
  for (std::size_t i = 0; i < kPages; i += 2) store.Discard(slots[i]);
  const long long half_blocks = FileBlocks(path);
  // Half the data blocks are gone; the file system may spend a block or two (8 sectors each
  // on ext4) on an extent tree now that the file has 32 holes.
  constexpr long long kMetadataAllowance = 2 * kPageSize / 512;
  CHECK(half_blocks <= full_blocks - static_cast<long long>(kPages / 2 * kPageSize / 512) +
                           kMetadataAllowance);
  CHECK(FileSize(path) == static_cast<off_t>(kPages * kPageSize));  // size is kept
  // The surviving pages are intact next to the holes.
  for (std::size_t i = 1; i < kPages; i += 2) {
    FillRandom(page, i);
    CHECK(ReadsBack(store, slots[i], page));
  }
}

TEST_CASE("DiskStore survives concurrent writers, readers and discarders") {
  TempDir dir;
  constexpr int kThreads = 4;
  constexpr int kIterations = 2000;
  constexpr std::size_t kLivePerThread = 16;
  DiskStore store(dir.File("concurrent"), kThreads * kLivePerThread * kPageSize);
  std::atomic<int> failures{0};

  auto worker = [&](int thread_index) {
    std::mt19937_64 rng(thread_index + 10);
    std::vector<Page> pages(kLivePerThread);
    std::vector<Slot> slots(kLivePerThread);
    std::vector<bool> live(kLivePerThread, false);
    Page out;
    for (int it = 0; it < kIterations; ++it) {
      const std::size_t i = rng() % kLivePerThread;
      if (live[i]) {
        if (store.Read(slots[i], PageSpan(out)) != 0 || out != pages[i]) ++failures;
        store.Discard(slots[i]);
        live[i] = false;
      } else {
        FillRandom(pages[i], rng());
        if (WritePage(store, pages[i], &slots[i]) != 0) {
          ++failures;
        } else {
          live[i] = true;
        }
      }
    }
    for (std::size_t i = 0; i < kLivePerThread; ++i) {
      if (!live[i]) continue;
      if (store.Read(slots[i], PageSpan(out)) != 0 || out != pages[i]) ++failures;
      store.Discard(slots[i]);
    }
  };

  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (auto& thread : threads) thread.join();
  CHECK(failures.load() == 0);
  CHECK(store.Stats().pages == 0);
  CHECK(store.Stats().used_bytes == 0);
}

TEST_CASE("DiskStore moves pages that are not aligned in memory, with or without O_DIRECT") {
  for (const bool direct : {false, true}) {
    CAPTURE(direct);
    TempDir dir;
    DiskStore store(dir.File("unaligned"), 0, direct);
    if (!direct) CHECK_FALSE(store.direct());
    MESSAGE("backing file opened " << std::string(store.direct() ? "with" : "without")
                                   << " O_DIRECT");
    // Pages at odd addresses, as they arrive in a network buffer.
    std::vector<std::byte> buffer(3 * kPageSize + 64);
    std::vector<Slot> slots;
    Page page;
    for (std::size_t offset : {std::size_t{1}, std::size_t{8}, std::size_t{512}}) {
      FillRandom(page, offset);
      std::memcpy(buffer.data() + offset, page.data(), kPageSize);
      Slot slot = 0;
      REQUIRE(store.Write(ConstPageSpan(buffer.data() + offset, kPageSize), 0, &slot) == 0);
      slots.push_back(slot);
    }
    std::size_t i = 0;
    for (std::size_t offset : {std::size_t{1}, std::size_t{8}, std::size_t{512}}) {
      FillRandom(page, offset);
      std::fill(buffer.begin(), buffer.end(), std::byte{0x5a});
      REQUIRE(store.Read(slots[i++], PageSpan(buffer.data() + offset + 3, kPageSize)) == 0);
      CHECK(std::memcmp(buffer.data() + offset + 3, page.data(), kPageSize) == 0);
      CHECK(buffer[offset + 2] == std::byte{0x5a});  // nothing written before the page
    }
  }
}

}  // namespace memlend
