// A page's old room is freed only after its entry names the new one (docs/restart.md): the
// page tables outlive a crash, and a room freed first could go to another page before the
// entry changed, leaving two entries naming it. Every tier here stands behind a wrapper
// that, at each Discard, looks through the device's page table for an entry that still
// names the room being freed, while a random mix of writes, partial writes, trims,
// reads (promotions, fetches ahead), batched writes and demotions moves pages between the
// local store (lz4, so rewrites change chunk sizes), a remote tier and a backing file.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "memory_remote.h"
#include "store/device.h"
#include "store/disk_store.h"
#include "store/local_store.h"
#include "store/tiering.h"
#include "temp_dir.h"

namespace memlend {
namespace {

using Bytes = std::vector<std::byte>;

// A page table kept outside the device, as a state segment keeps it, that the test reads:
// each entry is the location's bits and the copy's slot (Device::PageEntry).
struct Table {
  explicit Table(std::uint64_t pages) : words(2 * pages, 0) {
    REQUIRE(Device::PageTableBytes(pages * kPageSize) == words.size() * sizeof(std::uint64_t));
  }
  // Whether some entry names room `slot` of `tier`, as its location or as its copy below.
  bool Names(Tier tier, Slot slot) const {
    for (std::size_t i = 0; i < words.size(); i += 2) {
      const Location where = Location::FromBits(words[i]);
      const Slot copy = words[i + 1];
      if (!where.reads_as_zero() && where.tier() == tier && where.slot() == slot) return true;
      if (copy == kNoCopy) continue;
      if (IsRemoteCopy(copy) ? tier == Tier::kRemote && RemoteCopySlot(copy) == slot
                             : tier == Tier::kDisk && copy == slot) {
        return true;
      }
    }
    return false;
  }
  std::vector<std::uint64_t> words;
};

// Passes everything through to the store it wraps, and counts discards of room that an
// entry of `table` still names.
class Watched final : public PageStore {
 public:
  Watched(std::unique_ptr<PageStore> inner, Tier tier, const Table* table, int* early)
      : inner_(std::move(inner)), tier_(tier), table_(table), early_(early) {}

  int Write(ConstPageSpan page, std::uint64_t hint, Slot* slot) noexcept override {
    return inner_->Write(page, hint, slot);
  }
  int Rewrite(Slot slot, ConstPageSpan page, std::uint64_t hint, Slot* placed,
              bool* keeps_old) noexcept override {
    return inner_->Rewrite(slot, page, hint, placed, keeps_old);
  }
  int Read(Slot slot, PageSpan out) noexcept override { return inner_->Read(slot, out); }
  void ReadBatch(std::span<const Slot> slots, std::span<std::byte* const> outs,
                 std::span<int> results) noexcept override {
    inner_->ReadBatch(slots, outs, results);
  }
  void WriteBatch(std::span<const std::byte* const> pages, std::span<const std::uint64_t> hints,
                  std::span<Slot> slots, std::span<int> results) noexcept override {
    inner_->WriteBatch(pages, hints, slots, results);
  }
  void Pin(Slot slot) noexcept override { inner_->Pin(slot); }
  void Unpin(Slot slot) noexcept override { inner_->Unpin(slot); }
  bool Holds(Slot slot) const noexcept override { return inner_->Holds(slot); }
  void Discard(Slot slot) noexcept override {
    if (table_->Names(tier_, slot)) ++*early_;
    ++discards;
    inner_->Discard(slot);
  }
  StoreStats Stats() const noexcept override { return inner_->Stats(); }

  int discards = 0;

 private:
  const std::unique_ptr<PageStore> inner_;
  const Tier tier_;
  const Table* const table_;
  int* const early_;
};

Bytes RandomPage(std::mt19937_64& rng) {
  Bytes page(kPageSize, std::byte{0});
  // Half the pages compress well (a word in 64 set), half not at all.
  const bool compressible = rng() % 2 == 0;
  for (std::size_t i = 0; i < kPageSize; i += 8) {
    if (compressible && i % 512 != 0) continue;
    const std::uint64_t word = rng();
    std::memcpy(page.data() + i, &word, 8);
  }
  return page;
}

}  // namespace

TEST_CASE("a page's old room is freed only after its entry names the new one") {
  constexpr std::uint64_t kDevicePages = 256;
  constexpr std::uint64_t kLocalPages = 24;
  struct Setup {
    bool remote;  // a remote tier below the local store, else the backing file alone
    Redundancy redundancy;
  };
  for (const Setup setup : {Setup{true, {1, false}}, Setup{true, {0, true}},
                            Setup{true, {1, true}}, Setup{false, {1, false}}}) {
    const Redundancy redundancy = setup.redundancy;
    CAPTURE(setup.remote);
    CAPTURE(redundancy.copies);
    CAPTURE(redundancy.disk);
    testing::TempDir dir;
    Table table(kDevicePages);
    int early = 0;
    Watched* watched[3] = {};
    TierWrapper wrap = [&](Tier tier, std::unique_ptr<PageStore> store) {
      auto wrapper = std::make_unique<Watched>(std::move(store), tier, &table, &early);
      watched[tier == Tier::kLocal ? 0 : tier == Tier::kRemote ? 1 : 2] = wrapper.get();
      return std::unique_ptr<PageStore>(std::move(wrapper));
    };
    Tiering tiers(std::make_unique<LocalStore>(kLocalPages * kPageSize, Compression::kLz4),
                  setup.remote ? std::make_unique<testing::MemoryRemote>() : nullptr,
                  std::make_unique<DiskStore>(dir.File("backing"), 0), TieringOptions{}, nullptr,
                  wrap);
    Device device("d", kDevicePages * kPageSize, tiers, false, redundancy, table.words.data(),
                  /*fresh=*/true);
    std::vector<Bytes> shadow(kDevicePages, Bytes(kPageSize, std::byte{0}));
    std::mt19937_64 rng(42 + redundancy.copies * 4 + redundancy.disk * 2 + setup.remote);

    for (int step = 0; step < 6000; ++step) {
      const std::uint64_t page = rng() % kDevicePages;
      const std::uint64_t offset = page * kPageSize;
      switch (rng() % 8) {
        case 0:
        case 1: {  // a whole page
          const Bytes data = RandomPage(rng);
          REQUIRE(device.Write(offset, data) == 0);
          shadow[page] = data;
          break;
        }
        case 2: {  // part of a page
          const std::size_t at = rng() % kPageSize;
          const std::size_t count = 1 + rng() % (kPageSize - at);
          const Bytes data = RandomPage(rng);
          REQUIRE(device.Write(offset + at, std::span(data.data(), count)) == 0);
          std::memcpy(shadow[page].data() + at, data.data(), count);
          break;
        }
        case 3: {  // trimmed or zeroed, whole or in part
          const std::size_t at = rng() % 2 == 0 ? 0 : rng() % kPageSize;
          const std::size_t count = at == 0 ? kPageSize : kPageSize - at;
          REQUIRE((rng() % 2 == 0 ? device.Trim(offset + at, count)
                                  : device.WriteZeroes(offset + at, count)) == 0);
          std::memset(shadow[page].data() + at, 0, count);
          break;
        }
        case 4: {  // read back
          Bytes out(kPageSize);
          REQUIRE(device.Read(offset, out) == 0);
          REQUIRE(out == shadow[page]);
          break;
        }
        case 5: {  // a run of reads, as the kernel reads (fetches ahead)
          const std::uint64_t first = page & ~std::uint64_t{7};
          Bytes out(8 * kPageSize);
          Device::ReadRequest request{first * kPageSize, out, 0};
          device.ReadMany(std::span(&request, 1));
          REQUIRE(request.result == 0);
          for (std::uint64_t i = 0; i < 8; ++i) {
            REQUIRE(std::memcmp(out.data() + i * kPageSize, shadow[first + i].data(),
                                kPageSize) == 0);
          }
          device.RunReadAhead();
          break;
        }
        case 6: {  // a batch of whole pages (around the local store when it is full)
          const std::uint64_t first = page & ~std::uint64_t{3};
          Bytes data[4];
          Device::WriteRequest requests[4];
          for (std::uint64_t i = 0; i < 4; ++i) {
            data[i] = RandomPage(rng);
            requests[i] = {(first + i) * kPageSize, data[i], 0};
          }
          device.WriteMany(requests);
          for (std::uint64_t i = 0; i < 4; ++i) {
            REQUIRE(requests[i].result == 0);
            shadow[first + i] = data[i];
          }
          break;
        }
        default:
          device.DemoteColdPages(1 + rng() % 16);
          break;
      }
    }
    for (std::uint64_t page = 0; page < kDevicePages; ++page) {
      Bytes out(kPageSize);
      REQUIRE(device.Read(page * kPageSize, out) == 0);
      REQUIRE(out == shadow[page]);
    }
    // Pages moved through every tier, and not one room was freed while an entry named it.
    const int remote_discards = setup.remote ? watched[1]->discards : 0;
    INFO("discards: local " << watched[0]->discards << ", remote " << remote_discards
                            << ", disk " << watched[2]->discards);
    CHECK(watched[0]->discards > 1000);
    CHECK(remote_discards + watched[2]->discards > 1000);
    const DeviceIoCounts io = device.IoCounts();
    CHECK(io.promotions > 0);
    if (remote_discards > 0) CHECK(io.prefetched > 0);
    CHECK(early == 0);
  }
}

TEST_CASE("LocalStore::Rewrite into a chunk of another size leaves the old chunk live") {
  LocalStore store(16 * kPageSize, Compression::kLz4);
  Bytes small(kPageSize, std::byte{0});
  small[0] = std::byte{1};
  std::mt19937_64 rng(7);
  Bytes large(kPageSize);
  for (std::byte& b : large) b = static_cast<std::byte>(rng());
  Slot old_slot = 0;
  REQUIRE(store.Write(ConstPageSpan(small.data(), kPageSize), 0, &old_slot) == 0);
  Slot placed = 0;
  bool keeps_old = false;
  REQUIRE(store.Rewrite(old_slot, ConstPageSpan(large.data(), kPageSize), 0, &placed,
                        &keeps_old) == 0);
  CHECK(placed != old_slot);
  CHECK(keeps_old);
  CHECK(store.Stats().pages == 2);
  Bytes out(kPageSize);
  REQUIRE(store.Read(old_slot, PageSpan(out.data(), kPageSize)) == 0);
  CHECK(out == small);
  REQUIRE(store.Read(placed, PageSpan(out.data(), kPageSize)) == 0);
  CHECK(out == large);
  // The same size class is rewritten in place.
  Slot again = 0;
  REQUIRE(store.Rewrite(placed, ConstPageSpan(large.data(), kPageSize), 0, &again, &keeps_old) ==
          0);
  CHECK(again == placed);
  CHECK_FALSE(keeps_old);
  store.Discard(old_slot);
  CHECK(store.Stats().pages == 1);
}

TEST_CASE("LocalStore::Rewrite in a full store keeps a page in its own room, or refuses") {
  // Two frames: a packed page in one, a raw page filling the other. No frame is free.
  std::mt19937_64 rng(9);
  const auto page_of = [&](std::size_t random_bytes) {  // compresses to about that much
    Bytes page(kPageSize, std::byte{0});
    for (std::size_t i = 0; i < random_bytes; ++i) page[i] = static_cast<std::byte>(rng());
    return page;
  };
  LocalStore store(2 * kPageSize, Compression::kLz4);
  Bytes out(kPageSize);
  Slot placed = 0;
  bool keeps_old = true;
  const Bytes raw = page_of(kPageSize);

  SUBCASE("a page that shrinks is rewritten in its larger chunk") {
    const Bytes medium = page_of(600);
    Slot slot = 0;
    REQUIRE(store.Write(ConstPageSpan(medium.data(), kPageSize), 0, &slot) == 0);
    Slot other = 0;
    REQUIRE(store.Write(ConstPageSpan(raw.data(), kPageSize), 1, &other) == 0);
    const Bytes smaller = page_of(8);
    REQUIRE(store.Rewrite(slot, ConstPageSpan(smaller.data(), kPageSize), 0, &placed,
                          &keeps_old) == 0);
    CHECK(placed == slot);
    CHECK_FALSE(keeps_old);
    REQUIRE(store.Read(slot, PageSpan(out.data(), kPageSize)) == 0);
    CHECK(out == smaller);
    CHECK(store.Stats().pages == 2);
  }
  SUBCASE("a page alone in its frame that no longer compresses takes the frame raw") {
    const Bytes small = page_of(8);
    Slot slot = 0;
    REQUIRE(store.Write(ConstPageSpan(small.data(), kPageSize), 0, &slot) == 0);
    Slot other = 0;
    REQUIRE(store.Write(ConstPageSpan(raw.data(), kPageSize), 1, &other) == 0);
    const Bytes incompressible = page_of(kPageSize);
    REQUIRE(store.Rewrite(slot, ConstPageSpan(incompressible.data(), kPageSize), 0, &placed,
                          &keeps_old) == 0);
    CHECK(placed != slot);
    CHECK((placed >> 8) == (slot >> 8));  // the same frame
    CHECK_FALSE(keeps_old);
    REQUIRE(store.Read(placed, PageSpan(out.data(), kPageSize)) == 0);
    CHECK(out == incompressible);
    CHECK(store.Stats().pages == 2);
    // The frame is the page's alone: nothing small fits beside it now.
    Slot none = 0;
    CHECK(store.Write(ConstPageSpan(small.data(), kPageSize), 0, &none) == -ENOSPC);
    store.Discard(placed);
    CHECK(store.Stats().used_bytes == kPageSize);
  }
  SUBCASE("a page that shares its frame and no longer compresses is refused, and kept") {
    const Bytes small = page_of(8);
    Slot slot = 0;
    Slot beside = 0;
    REQUIRE(store.Write(ConstPageSpan(small.data(), kPageSize), 0, &slot) == 0);
    REQUIRE(store.Write(ConstPageSpan(small.data(), kPageSize), 0, &beside) == 0);
    REQUIRE((beside >> 8) == (slot >> 8));
    Slot other = 0;
    REQUIRE(store.Write(ConstPageSpan(raw.data(), kPageSize), 1, &other) == 0);
    const Bytes incompressible = page_of(kPageSize);
    CHECK(store.Rewrite(slot, ConstPageSpan(incompressible.data(), kPageSize), 0, &placed,
                        &keeps_old) == -ENOSPC);
    REQUIRE(store.Read(slot, PageSpan(out.data(), kPageSize)) == 0);
    CHECK(out == small);
    REQUIRE(store.Read(beside, PageSpan(out.data(), kPageSize)) == 0);
    CHECK(out == small);
    CHECK(store.Stats().pages == 3);
  }
}

}  // namespace memlend
