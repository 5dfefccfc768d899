// Tiering: the placement policy, and the only code that knows more than one tier.
//
// Today it owns two tiers: the local RAM store (always) and the disk store (when the
// daemon has a backing file). A page goes to the local store while it has room and to the
// disk store when it does not; without a disk store a page that finds no room is refused
// with -ENOSPC. Peers (remote pools) and the watermark-driven evictor slot in here later
// without the devices or frontends changing.
//
// A Location is what a device's page table keeps for one page: a tier tag and the Slot
// that tier issued, packed into 64 bits.
#pragma once

#include <cstdint>
#include <memory>

#include "memlend/page_store.h"
#include "store/disk_store.h"
#include "store/local_store.h"

namespace memlend {

enum class Tier : std::uint8_t {
  kUnmapped = 0,  // never written, or trimmed: reads as zeros, counts as not mapped
  kZero = 1,      // written as all zeros: reads as zeros, takes no room anywhere
  kLocal = 2,
  kDisk = 3,
  kRemote = 4,    // reserved for peer pools
};
inline constexpr int kTierCount = 5;

// One page-table entry. Bits 0..55 hold the Slot, bits 56..59 the Tier.
class Location {
 public:
  constexpr Location() = default;
  constexpr Location(Tier tier, Slot slot)
      : bits_(static_cast<std::uint64_t>(tier) << kSlotBits | (slot & kMaxSlot)) {}
  static constexpr Location FromBits(std::uint64_t bits) {
    Location location;
    location.bits_ = bits;
    return location;
  }

  constexpr Tier tier() const { return static_cast<Tier>((bits_ >> kSlotBits) & 0xf); }
  constexpr Slot slot() const { return bits_ & kMaxSlot; }
  constexpr std::uint64_t bits() const { return bits_; }
  // True when the page has no stored bytes (unmapped or all-zero).
  constexpr bool reads_as_zero() const {
    return tier() == Tier::kUnmapped || tier() == Tier::kZero;
  }

 private:
  std::uint64_t bits_ = 0;
};

class Tiering {
 public:
  // `disk` may be null (no backing file).
  Tiering(std::unique_ptr<LocalStore> local, std::unique_ptr<DiskStore> disk);

  // Stores `page` for a page currently at `old` (any tier, unmapped included), in the
  // fastest tier with room. When the local store is full and `old` lives there, the old
  // copy's room is reused rather than sending a hot page to disk. On success returns 0,
  // sets *placed and has released `old`. On failure (-ENOSPC when every tier is full,
  // -EIO) *placed tells where the old contents are now: normally `old` itself, but a
  // full store may have had to move them (or, in a race for the last room, drop them and
  // leave the page unmapped). Either way the caller records *placed in its page table.
  // `hint` spreads load over store shards.
  // REQUIRES: the caller holds the page's lock (no concurrent use of `old`).
  int Store(ConstPageSpan page, std::uint64_t hint, Location old, Location* placed) noexcept;

  // Copies the page at `location` into `out`; zero tiers fill zeros. Returns 0 or -errno.
  int Load(Location location, PageSpan out) noexcept;

  // Frees whatever room `location` holds (nothing for zero tiers).
  void Release(Location location) noexcept;

  LocalStore& local() { return *local_; }
  const LocalStore& local() const { return *local_; }
  const DiskStore* disk() const { return disk_.get(); }

 private:
  PageStore* StoreFor(Tier tier) noexcept;

  // Constant after construction.
  const std::unique_ptr<LocalStore> local_;
  const std::unique_ptr<DiskStore> disk_;
};

}  // namespace memlend
