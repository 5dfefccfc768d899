// The one interface every storage tier implements.
//
// A tier (local RAM, disk file, and later a peer's pool) keeps whole 4 KiB pages. The
// caller writes a page and gets back a Slot that names where the tier put it; reading or
// discarding the page later takes that Slot. Only the tier that issued a Slot interprets
// it. The device's page table stores Slots next to a tier tag, which is why a Slot fits in
// kSlotBits bits.
//
// Data-plane rules: every method is noexcept, allocates nothing on its error paths and
// reports failure as a negative errno. Callers validate ranges before they get here; a
// store only asserts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace memlend {

inline constexpr std::size_t kPageSize = 4096;
inline constexpr unsigned kPageShift = 12;
static_assert(std::size_t{1} << kPageShift == kPageSize);

using PageSpan = std::span<std::byte, kPageSize>;
using ConstPageSpan = std::span<const std::byte, kPageSize>;

// A Slot names one stored page inside the store that issued it.
using Slot = std::uint64_t;
inline constexpr unsigned kSlotBits = 56;
inline constexpr Slot kMaxSlot = (Slot{1} << kSlotBits) - 1;

// What is kept of a page that leaves the host (a device's redundancy, docs/remote-tier.md):
// `copies` copies on distinct peers and, with `disk`, one in the backing file as well.
// none is {1, false}, replicas:N {N, false}, disk {0, true}, replicas:N+disk {N, true}.
struct Redundancy {
  unsigned copies = 1;
  bool disk = false;
  friend bool operator==(const Redundancy&, const Redundancy&) = default;
};

// A snapshot of a store's occupancy. All figures are bytes unless the name says pages.
struct StoreStats {
  std::uint64_t pages = 0;        // pages currently stored
  std::uint64_t used_bytes = 0;   // bytes of the store's capacity those pages occupy
  std::uint64_t total_bytes = 0;  // capacity; 0 means "grows as needed" (a file)
};

class PageStore {
 public:
  virtual ~PageStore() = default;

  // Stores a copy of `page` in a new slot. On success returns 0 and sets *slot. Returns
  // -ENOSPC when the store has no room (nothing is changed), or another -errno (-EIO) when
  // the medium failed. `hint` is any number that spreads concurrent callers over the
  // store's internal shards (the device passes the page number). Thread-safe.
  virtual int Write(ConstPageSpan page, std::uint64_t hint, Slot* slot) noexcept = 0;

  // Replaces the contents of live `slot` with `page`. On success returns 0, sets *placed
  // to the slot that now holds the page, and *keeps_old to whether `slot` stays live
  // beside it with its old contents (the page went to a new slot): the caller then
  // discards `slot` once nothing names it any more. Otherwise the page took `slot`'s room
  // (rewritten in place, *placed == slot, or the store moved it within its own room), and
  // `slot` is not to be discarded. On -ENOSPC `slot` keeps its old contents; after a medium
  // error (-EIO) an in-place rewrite may have left them damaged. The default writes a new
  // slot; stores that can overwrite in place do better.
  // REQUIRES: as for Discard.
  virtual int Rewrite(Slot /*slot*/, ConstPageSpan page, std::uint64_t hint, Slot* placed,
                      bool* keeps_old) noexcept {
    *keeps_old = true;
    return Write(page, hint, placed);
  }

  // Copies the page held in `slot` into `out`. Returns 0, or -errno if the medium failed.
  // REQUIRES: `slot` was returned by this store's Write and not discarded since.
  // Thread-safe, including against writes and discards of other slots.
  virtual int Read(Slot slot, PageSpan out) noexcept = 0;

  // Reads several pages: results[i] gets 0 or -errno for slots[i], whose page goes to
  // outs[i] (kPageSize bytes). The default reads one at a time; a remote store overlaps
  // the round trips. Thread-safe as Read.
  virtual void ReadBatch(std::span<const Slot> slots, std::span<std::byte* const> outs,
                         std::span<int> results) noexcept {
    for (std::size_t i = 0; i < slots.size(); ++i) {
      results[i] = Read(slots[i], PageSpan(outs[i], kPageSize));
    }
  }

  // Writes several pages, each to a new slot: results[i] gets 0 (and slots[i] is set) or
  // -errno for pages[i] (kPageSize bytes each); hints[i] as for Write. The default writes
  // one at a time; a remote store overlaps the round trips. Thread-safe as Write.
  virtual void WriteBatch(std::span<const std::byte* const> pages,
                          std::span<const std::uint64_t> hints, std::span<Slot> slots,
                          std::span<int> results) noexcept {
    for (std::size_t i = 0; i < pages.size(); ++i) {
      results[i] = Write(ConstPageSpan(pages[i], kPageSize), hints[i], &slots[i]);
    }
  }

  // As WriteBatch, keeping the copies `redundancy` asks for where the store can keep
  // several (the remote tier keeps them on distinct peers and, with `disk`, in the backing
  // file: docs/remote-tier.md). A page stored with fewer copies than asked (too few peers
  // up) still succeeds; the store adds the missing ones later. Stores with one copy per
  // page ignore `redundancy`.
  virtual void WriteBatchCopies(std::span<const std::byte* const> pages,
                                std::span<const std::uint64_t> hints, Redundancy /*redundancy*/,
                                std::span<Slot> slots, std::span<int> results) noexcept {
    WriteBatch(pages, hints, slots, results);
  }

  // Pin keeps `slot` readable until the matching Unpin even if it is discarded meanwhile
  // (the discard then takes effect at Unpin). It lets a caller look a page up under the
  // page's lock, drop the lock, and read it later in a batch. Stores that are only read
  // under the page lock need not implement it.
  virtual void Pin(Slot /*slot*/) noexcept {}
  virtual void Unpin(Slot /*slot*/) noexcept {}

  // Whether the page in live `slot` can still be read: false once the store knows that
  // every copy of it is lost (a remote page whose lenders died). A caller that holds the
  // page's contents elsewhere (a clean copy in RAM) then keeps them. Thread-safe.
  virtual bool Holds(Slot /*slot*/) const noexcept { return true; }

  // After a write found no room: waits, for a bounded time, while room may come back
  // without anything being freed (a remote store whose connection to a lender broke and is
  // being resumed), and returns whether a write is worth trying again. The default: false,
  // at once. Thread-safe.
  virtual bool AwaitRoom() noexcept { return false; }

  // Releases `slot`; its room can be reused at once. Never fails.
  // REQUIRES: `slot` is live, and no other thread reads or discards it concurrently.
  virtual void Discard(Slot slot) noexcept = 0;

  // Returns current occupancy. Thread-safe; figures may be slightly stale under load.
  virtual StoreStats Stats() const noexcept = 0;
};

}  // namespace memlend
