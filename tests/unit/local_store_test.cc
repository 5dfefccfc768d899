// Unit tests for LocalStore: round trips, capacity limits, compression density and
// concurrent use.
#include "store/local_store.h"

#include <doctest/doctest.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

namespace memlend {
namespace {

using Page = std::array<std::byte, kPageSize>;

// Fills `page` with random bytes derived from `seed`; different seeds give different pages.
void FillRandom(Page& page, std::uint64_t seed) {
  std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ULL + 1);
  for (std::size_t i = 0; i < kPageSize; i += 8) {
    const std::uint64_t v = rng();
    std::memcpy(page.data() + i, &v, 8);
  }
}

// Fills `page` with a 16-byte header naming `id` followed by zeros: compresses very well.
void FillCompressible(Page& page, std::uint64_t id) {
  page.fill(std::byte{0});
  const std::uint64_t header[2] = {id, ~id};
  std::memcpy(page.data(), header, sizeof(header));
}

// Fills `page` with `random_bytes` random bytes derived from `seed`, then zeros. The
// compressed size grows with `random_bytes`, so this covers every size class.
void FillMixed(Page& page, std::uint64_t seed, std::size_t random_bytes) {
  FillRandom(page, seed);
  std::memset(page.data() + random_bytes, 0, kPageSize - random_bytes);
}

int WritePage(PageStore& store, const Page& page, std::uint64_t hint, Slot* slot) {
  return store.Write(ConstPageSpan(page), hint, slot);
}

// Returns true if `slot` reads back successfully and equals `expected`.
bool ReadsBack(PageStore& store, Slot slot, const Page& expected) {
  Page out;
  out.fill(std::byte{0xa5});
  if (store.Read(slot, PageSpan(out)) != 0) return false;
  return out == expected;
}

constexpr Compression kBothModes[] = {Compression::kNone, Compression::kLz4};

}  // namespace

TEST_CASE("LocalStore rejects a capacity below one page") {
  CHECK_THROWS_AS(LocalStore(0, Compression::kNone), std::invalid_argument);
  CHECK_THROWS_AS(LocalStore(kPageSize - 1, Compression::kLz4), std::invalid_argument);
}

TEST_CASE("LocalStore rounds capacity down to whole frames") {
  LocalStore store(2 * kPageSize + 1000, Compression::kNone);
  const StoreStats stats = store.Stats();
  CHECK(stats.total_bytes == 2 * kPageSize);
  CHECK(stats.pages == 0);
  CHECK(stats.used_bytes == 0);
  CHECK(store.compression() == Compression::kNone);
}

TEST_CASE("LocalStore with a single frame holds exactly one raw page") {
  LocalStore store(kPageSize, Compression::kNone);
  Page a, b;
  FillRandom(a, 1);
  FillRandom(b, 2);
  Slot sa = 0;
  REQUIRE(WritePage(store, a, 7, &sa) == 0);
  Slot sb = 12345;
  CHECK(WritePage(store, b, 8, &sb) == -ENOSPC);
  CHECK(sb == 12345);  // untouched on failure
  CHECK(ReadsBack(store, sa, a));
  store.Discard(sa);
  REQUIRE(WritePage(store, b, 9, &sb) == 0);
  CHECK(ReadsBack(store, sb, b));
}

TEST_CASE("LocalStore round-trips many distinct random pages") {
  for (Compression mode : kBothModes) {
    CAPTURE(static_cast<int>(mode));
    constexpr std::size_t kPages = 1000;
    LocalStore store(kPages * kPageSize, mode);
    std::vector<Page> pages(kPages);
    std::vector<Slot> slots(kPages);
    for (std::size_t i = 0; i < kPages; ++i) {
      FillRandom(pages[i], i);
      REQUIRE(WritePage(store, pages[i], i, &slots[i]) == 0);
    }
    for (std::size_t i = 0; i < kPages; ++i) {
      REQUIRE(ReadsBack(store, slots[i], pages[i]));
    }
    const StoreStats stats = store.Stats();
    CHECK(stats.pages == kPages);
    // Random pages do not compress, so lz4 stores them raw as well.
    CHECK(stats.used_bytes == kPages * kPageSize);
    CHECK(stats.total_bytes == kPages * kPageSize);
  }
}

TEST_CASE("LocalStore full of raw pages returns ENOSPC and keeps every page") {
  for (Compression mode : kBothModes) {
    CAPTURE(static_cast<int>(mode));
    constexpr std::size_t kFrames = 64;  // more frames than shards, not a multiple of 16
    LocalStore store(kFrames * kPageSize + 3 * kPageSize, mode);
    constexpr std::size_t kCapacity = kFrames + 3;
    std::vector<Page> pages;
    std::vector<Slot> slots;
    Page page;
    for (std::size_t i = 0;; ++i) {
      FillRandom(page, 1000 + i);
      Slot slot = 0;
      const int rc = WritePage(store, page, i * 7, &slot);
      if (rc == -ENOSPC) break;
      REQUIRE(rc == 0);
      pages.push_back(page);
      slots.push_back(slot);
      REQUIRE(pages.size() <= kCapacity);
    }
    CHECK(pages.size() == kCapacity);
    const StoreStats full = store.Stats();
    CHECK(full.pages == kCapacity);
    CHECK(full.used_bytes == full.total_bytes);

    // A failed write changed nothing.
    Slot unused = 0;
    FillRandom(page, 99);
    CHECK(WritePage(store, page, 3, &unused) == -ENOSPC);
    CHECK(store.Stats().pages == full.pages);
    CHECK(store.Stats().used_bytes == full.used_bytes);
    for (std::size_t i = 0; i < pages.size(); ++i) REQUIRE(ReadsBack(store, slots[i], pages[i]));

    // Discarding makes room again, for any hint.
    store.Discard(slots[10]);
    CHECK(store.Stats().pages == kCapacity - 1);
    FillRandom(pages[10], 5000);
    REQUIRE(WritePage(store, pages[10], 123456789, &slots[10]) == 0);
    CHECK(WritePage(store, page, 0, &unused) == -ENOSPC);
    for (std::size_t i = 0; i < pages.size(); ++i) REQUIRE(ReadsBack(store, slots[i], pages[i]));

    // Emptying the store frees every frame, and it fills to the same count again.
    for (Slot slot : slots) store.Discard(slot);
    CHECK(store.Stats().pages == 0);
    CHECK(store.Stats().used_bytes == 0);
    std::size_t refilled = 0;
    while (WritePage(store, page, refilled, &unused) == 0) ++refilled;
    CHECK(refilled == kCapacity);
  }
}

TEST_CASE("LocalStore with lz4 packs compressible pages densely") {
  constexpr std::size_t kPages = 512;
  LocalStore packed(kPages * kPageSize, Compression::kLz4);
  LocalStore plain(kPages * kPageSize, Compression::kNone);
  std::vector<Page> pages(kPages);
  std::vector<Slot> slots(kPages);
  Slot plain_slot;
  for (std::size_t i = 0; i < kPages; ++i) {
    FillCompressible(pages[i], i);
    REQUIRE(WritePage(packed, pages[i], i, &slots[i]) == 0);
    REQUIRE(WritePage(plain, pages[i], i, &plain_slot) == 0);
  }
  for (std::size_t i = 0; i < kPages; ++i) REQUIRE(ReadsBack(packed, slots[i], pages[i]));

  const StoreStats lz4_stats = packed.Stats();
  const StoreStats plain_stats = plain.Stats();
  CHECK(lz4_stats.pages == kPages);
  CHECK(plain_stats.used_bytes == kPages * kPageSize);
  CHECK(lz4_stats.used_bytes < kPages * kPageSize / 4);
  // Such pages fit the smallest class, 16 to a frame.
  CHECK(lz4_stats.used_bytes <= (kPages / 16 + 16) * kPageSize);

  // Discarding every chunk of the frames returns them all.
  for (Slot slot : slots) packed.Discard(slot);
  CHECK(packed.Stats().pages == 0);
  CHECK(packed.Stats().used_bytes == 0);
}

TEST_CASE("LocalStore with lz4 holds far more compressible pages than frames") {
  constexpr std::size_t kFrames = 64;
  LocalStore store(kFrames * kPageSize, Compression::kLz4);
  std::vector<Page> pages;
  std::vector<Slot> slots;
  Page page;
  for (std::size_t i = 0;; ++i) {
    FillCompressible(page, i);
    Slot slot;
    const int rc = WritePage(store, page, i, &slot);
    if (rc == -ENOSPC) break;
    REQUIRE(rc == 0);
    pages.push_back(page);
    slots.push_back(slot);
    REQUIRE(pages.size() <= kFrames * 16);
  }
  CHECK(pages.size() > 4 * kFrames);
  CHECK(pages.size() == kFrames * 16);  // every frame packed with 16 chunks
  CHECK(store.Stats().used_bytes == kFrames * kPageSize);
  for (std::size_t i = 0; i < pages.size(); ++i) REQUIRE(ReadsBack(store, slots[i], pages[i]));

  // A raw page needs a whole frame: none is free until every chunk of one is discarded.
  Page raw;
  FillRandom(raw, 77);
  Slot raw_slot;
  CHECK(WritePage(store, raw, 0, &raw_slot) == -ENOSPC);
  store.Discard(slots[0]);
  FillCompressible(pages[0], 1u << 30);
  REQUIRE(WritePage(store, pages[0], 0, &slots[0]) == 0);  // reuses the freed chunk
  CHECK(store.Stats().used_bytes == kFrames * kPageSize);
  for (std::size_t i = 0; i < pages.size(); ++i) REQUIRE(ReadsBack(store, slots[i], pages[i]));
}

TEST_CASE("LocalStore with lz4 round-trips pages of every compressed size") {
  constexpr std::size_t kPages = 2000;
  LocalStore store(kPages * kPageSize, Compression::kLz4);
  std::mt19937_64 rng(42);
  std::vector<Page> pages(kPages);
  std::vector<Slot> slots(kPages);
  std::vector<bool> live(kPages, false);
  auto fill = [&](std::size_t i, std::uint64_t seed) {
    FillMixed(pages[i], seed, static_cast<std::size_t>(rng() % (kPageSize + 1)));
  };
  for (std::size_t i = 0; i < kPages; ++i) {
    fill(i, i);
    REQUIRE(WritePage(store, pages[i], i, &slots[i]) == 0);
    live[i] = true;
  }
  for (std::size_t i = 0; i < kPages; ++i) REQUIRE(ReadsBack(store, slots[i], pages[i]));

  // Mixed sizes still save room: on average half of each page is zeros.
  CHECK(store.Stats().used_bytes < kPages * kPageSize * 4 / 5);

  // Discard a random half, write new pages into the holes, verify everything.
  for (std::size_t i = 0; i < kPages; ++i) {
    if (rng() % 2) {
      store.Discard(slots[i]);
      live[i] = false;
    }
  }
  for (std::size_t i = 0; i < kPages; ++i) {
    if (!live[i]) {
      fill(i, kPages + i);
      REQUIRE(WritePage(store, pages[i], i, &slots[i]) == 0);
      live[i] = true;
    }
  }
  for (std::size_t i = 0; i < kPages; ++i) REQUIRE(ReadsBack(store, slots[i], pages[i]));
  CHECK(store.Stats().pages == kPages);

  for (Slot slot : slots) store.Discard(slot);
  CHECK(store.Stats().pages == 0);
  CHECK(store.Stats().used_bytes == 0);
}

TEST_CASE("LocalStore stats count pages and frames") {
  LocalStore store(100 * kPageSize, Compression::kLz4);
  Page page;
  std::vector<Slot> raw_slots(10), small_slots(32);
  for (std::size_t i = 0; i < raw_slots.size(); ++i) {
    FillRandom(page, i);
    REQUIRE(WritePage(store, page, 0, &raw_slots[i]) == 0);
  }
  // Same hint: all small pages land in one shard, packed 16 to a frame.
  for (std::size_t i = 0; i < small_slots.size(); ++i) {
    FillCompressible(page, i);
    REQUIRE(WritePage(store, page, 0, &small_slots[i]) == 0);
  }
  StoreStats stats = store.Stats();
  CHECK(stats.pages == 42);
  CHECK(stats.used_bytes == (10 + 2) * kPageSize);
  CHECK(stats.total_bytes == 100 * kPageSize);

  for (std::size_t i = 0; i < 16; ++i) store.Discard(small_slots[i]);
  stats = store.Stats();
  CHECK(stats.pages == 26);
  CHECK(stats.used_bytes == (10 + 1) * kPageSize);

  for (Slot slot : raw_slots) store.Discard(slot);
  stats = store.Stats();
  CHECK(stats.pages == 16);
  CHECK(stats.used_bytes == kPageSize);
}

TEST_CASE("LocalStore survives concurrent writers, readers and discarders") {
  for (Compression mode : kBothModes) {
    CAPTURE(static_cast<int>(mode));
    constexpr int kThreads = 4;
    constexpr int kIterations = 3000;
    constexpr std::size_t kLivePerThread = 32;
    // Tight on purpose: the threads' live pages nearly fill the store, so writes spill
    // over into other threads' shards.
    LocalStore store((kThreads * kLivePerThread + 8) * kPageSize, mode);
    std::atomic<int> failures{0};

    auto worker = [&](int thread_index) {
      std::mt19937_64 rng(thread_index);
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
          const std::uint64_t seed = rng();
          switch (seed % 3) {
            case 0:
              FillRandom(pages[i], seed);
              break;
            case 1:
              FillCompressible(pages[i], seed);
              break;
            default:
              FillMixed(pages[i], seed, (seed >> 8) % kPageSize);
              break;
          }
          if (WritePage(store, pages[i], rng(), &slots[i]) != 0) {
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
}

}  // namespace memlend
