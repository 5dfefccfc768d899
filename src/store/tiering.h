// Tiering: the placement policy, and the only code that knows more than one tier.
//
// Tiers, fastest first: the local RAM store (always), the remote store (peers' pools,
// when the daemon borrows) and the disk store (when it has a backing file).
//
// Writes land in the local store. When its use crosses the high watermark (default 90%)
// a background evictor demotes the coldest local pages, in batches, to the remote store —
// or to the disk store when no peer has room — until use is back under the low watermark
// (default 80%). A write that finds the local store full does not fail: it evicts a batch
// itself ("direct reclaim", the backpressure) and retries; only when nothing can be
// demoted does it place its page in the remote or disk tier directly, and only when every
// tier is full does it fail with -ENOSPC. With both peers and a disk, a writer never
// reclaims through peers itself: it wakes the evictor and waits up to kScanPatience for
// room, then writes its page to disk. The kernel may be waiting for that very write to
// free memory (swap), a socket send to a peer needs memory, and the block layer keeps
// reserves for disk writes: this way a swap device always makes progress. A read of a remote or disk page promotes it back
// to the local store while use is under the low watermark.
//
// Coldness is CLOCK: each page-table entry has a referenced bit that accesses set; the
// eviction scan clears it and demotes pages it finds clear. The scan runs over the
// devices registered as PageOwners, each keeping its own clock hand.
//
// Clean pages. A page read back from the disk store into the local store keeps its disk
// slot as a *disk copy* while it stays unmodified (a write drops the copy), as long as the
// disk has room for every page the local store can hold besides (so keeping copies can
// never make a later spill fail). Evicting such a clean page writes nothing to disk: with
// a cache (peers' ephemeral pools, remote active protocol) and a device that allows it,
// the page is put there and becomes kCached; otherwise, or when no lender takes it, it is
// simply dropped from RAM and becomes kDisk again. A kCached page is read from the cache
// and, when the lender has dropped it meanwhile, from its disk copy.
//
// A page fetched from the remote tier ahead of the reads that are expected next (prefetch,
// see Device::ReadMany) keeps its remote slot the same way, as a *remote copy*
// (RemoteCopy). Dropping it from RAM costs nothing: it becomes kRemote again, with no round
// trip and nothing copied. (A page promoted by a read moves instead: its remote slot is
// released. In the swap benchmark promotions were rare, a few per thousand reads, since the
// store is seldom under its low watermark while pages are on peers.)
//
// Writes that find the local store at or above its low watermark while there is a remote
// tier may go around it (Device::WriteMany, used by the asynchronous ublk frontend): the
// pages go to the remote tier in one batch straight from the request's buffer, instead of
// into the local store and out again through the evictor. Swapped-out pages are cold by
// the kernel's own judgement, and the local store's room is worth more to pages fetched
// ahead of reads; the evictor still keeps the store under its high watermark.
//
// A Location is what a device's page table keeps for one page: a tier tag, the Slot that
// tier issued and the referenced bit, packed into 64 bits. A kCached page's disk slot,
// and a clean local page's, are kept beside it by the device.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <mutex>
#include <thread>
#include <vector>

#include "memlend/page_store.h"
#include "store/disk_store.h"
#include "store/local_store.h"

namespace memlend {

enum class Tier : std::uint8_t {
  kUnmapped = 0,  // never written, or trimmed: reads as zeros, counts as not mapped
  kZero = 1,      // written as all zeros: reads as zeros, takes no room anywhere
  kLocal = 2,
  kDisk = 3,
  kRemote = 4,
  kCached = 5,    // on disk, with a copy in a peer's ephemeral pool that may be gone
};
inline constexpr int kTierCount = 6;

// "No copy", for the copy slot a device keeps beside a page's Location.
inline constexpr Slot kNoCopy = ~Slot{0};
// A clean kLocal page's copy below is a disk slot, or a remote-tier slot marked with this
// bit (slots of every tier are under 2^56; see "Clean pages").
inline constexpr Slot kRemoteCopyBit = Slot{1} << 62;
constexpr Slot RemoteCopy(Slot remote_slot) { return remote_slot | kRemoteCopyBit; }
constexpr bool IsRemoteCopy(Slot copy) { return copy != kNoCopy && (copy & kRemoteCopyBit) != 0; }
// The remote-tier slot of a remote copy. REQUIRES: IsRemoteCopy(copy).
constexpr Slot RemoteCopySlot(Slot copy) { return copy & ~kRemoteCopyBit; }

// One page-table entry. Bits 0..55 hold the Slot, bits 56..59 the Tier, bit 60 the
// CLOCK referenced bit.
class Location {
 public:
  static constexpr std::uint64_t kReferencedBit = std::uint64_t{1} << 60;
  // On a kLocal page fetched ahead of any read (prefetch) and not read since.
  static constexpr std::uint64_t kPrefetchedBit = std::uint64_t{1} << 61;
  // On the first such page of a window fetched ahead: reading it has the next window
  // fetched (SequentialPrefetch::OnTrigger). Only with kPrefetchedBit.
  static constexpr std::uint64_t kTriggerBit = std::uint64_t{1} << 62;

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
  constexpr bool referenced() const { return (bits_ & kReferencedBit) != 0; }
  constexpr Location WithReferenced(bool on) const {
    return FromBits(on ? bits_ | kReferencedBit : bits_ & ~kReferencedBit);
  }
  constexpr bool prefetched() const { return (bits_ & kPrefetchedBit) != 0; }
  constexpr bool trigger() const { return (bits_ & kTriggerBit) != 0; }
  // Off, it takes the trigger with it.
  constexpr Location WithPrefetched(bool on, bool trigger = false) const {
    return FromBits(on ? bits_ | kPrefetchedBit | (trigger ? kTriggerBit : 0)
                       : bits_ & ~(kPrefetchedBit | kTriggerBit));
  }
  // True when the page has no stored bytes (unmapped or all-zero).
  constexpr bool reads_as_zero() const {
    return tier() == Tier::kUnmapped || tier() == Tier::kZero;
  }

 private:
  std::uint64_t bits_ = 0;
};

// What the evictor scans: something that holds pages in the local store (a Device).
class PageOwner {
 public:
  virtual ~PageOwner() = default;
  // Demotes up to `want` cold local pages through Tiering::Demote and returns how many
  // it moved. Must skip pages whose lock it cannot take at once (try_lock), so that a
  // writer doing direct reclaim never waits on itself or on another writer.
  virtual std::size_t DemoteColdPages(std::size_t want) noexcept = 0;
};

// What stands between Tiering and a tier, for tests (a fault-injecting wrapper, say): given
// the tier and its store, returns the store Tiering reads and writes through, which owns
// the one it was given. Tiering sees every tier only through PageStore.
using TierWrapper =
    std::function<std::unique_ptr<PageStore>(Tier tier, std::unique_ptr<PageStore> store)>;

struct TieringOptions {
  double high_watermark = 0.90;  // fraction of the local store that wakes the evictor
  double low_watermark = 0.80;   // the evictor stops below this
  std::size_t eviction_batch = 64;   // pages per background eviction round
  std::size_t reclaim_batch = 8;     // pages a writer evicts itself when the store is full
};

class Tiering {
 public:
  // `remote` and `disk` may be null (no peers, no backing file). `cache`, if not null,
  // holds clean pages and is owned by `remote` (it is used only with a disk store).
  // `wrap`, if set, is put in front of each tier (see TierWrapper).
  // REQUIRES: 0 < low_watermark <= high_watermark <= 1.
  Tiering(std::unique_ptr<LocalStore> local, std::unique_ptr<PageStore> remote,
          std::unique_ptr<DiskStore> disk, TieringOptions options = {},
          PageStore* cache = nullptr, const TierWrapper& wrap = {});
  // Without a remote tier.
  Tiering(std::unique_ptr<LocalStore> local, std::unique_ptr<DiskStore> disk)
      : Tiering(std::move(local), nullptr, std::move(disk)) {}
  // Stops the evictor. REQUIRES: every owner has been removed.
  ~Tiering();

  // Starts the background evictor thread (only useful with a remote or disk tier).
  void StartEvictor();

  // Registers or removes a PageOwner for eviction scans. Thread-safe; RemoveOwner waits
  // until no scan is using the owner.
  void AddOwner(PageOwner* owner);
  void RemoveOwner(PageOwner* owner);

  // Stores `page` for a page currently at `old` (any tier, unmapped included): in the
  // local store, reclaiming room there if it is full; else in the remote or disk tier.
  // On success returns 0, sets *placed, and sets *stale to the room the page held before
  // and left (`old`), or to an unmapped Location when the page stayed in its own room
  // (rewritten in place; PageStore::Rewrite). Nothing is released here: the caller points
  // the page's entry at *placed first and then Releases *stale, so that a crash in between
  // cannot leave two entries naming one room (docs/restart.md). On failure (-ENOSPC when
  // every tier is full; -EIO) *placed is `old`, which keeps its contents unless an in-place
  // rewrite met a medium error.
  // REQUIRES: the caller holds the page's lock (no concurrent use of `old`).
  // A page that goes below keeps what the device's `redundancy` asks for (see DemoteBatch).
  int Store(ConstPageSpan page, std::uint64_t hint, Location old, Location* placed,
            Location* stale, Redundancy redundancy = {}) noexcept;

  // One page into the remote tier as RemoteRedundancy(redundancy) says; -ENOSPC without a
  // remote tier.
  int RemoteWrite(ConstPageSpan page, std::uint64_t hint, Redundancy redundancy,
                  Slot* slot) noexcept;
  // What the remote tier keeps of a page of a device with `redundancy`: as asked, except
  // that a `disk` page that could not go to disk gets one peer copy and stays short of
  // its disk copy (degraded) until the rebuild writes it.
  static Redundancy RemoteRedundancy(Redundancy redundancy) noexcept {
    return redundancy.copies == 0 ? Redundancy{1, true} : redundancy;
  }

  // The most pages DemoteBatch takes at once.
  static constexpr std::size_t kMaxDemoteBatch = 256;
  // Demote for a batch. Dirty pages (disk_copies[i] == kNoCopy): the remote tier takes as
  // many as it can in one overlapped round trip, with the copies `redundancy` asks for, and
  // the disk tier the rest. With `disk` redundancy alone ({0, true}) a dirty page is
  // written to the disk tier first and then treated as clean: disk_copies[i] is set to its
  // new disk slot (the remote tier takes it only when the disk cannot). Clean pages: into
  // the cache when `use_cache` and it takes them (kCached), else back to their disk copy
  // (kDisk); they never fail. results[i] is 0 with placed[i] set, or -ENOSPC. The caller
  // releases the local slots; a clean page's disk copy now belongs to placed[i].
  void DemoteBatch(std::span<const std::byte* const> pages, std::span<const std::uint64_t> hints,
                   std::span<Slot> disk_copies, bool use_cache, std::span<Location> placed,
                   std::span<int> results, Redundancy redundancy = {}) noexcept;

  // Moves a page that was read from `old` (remote, disk or cached) into the local store
  // when the store is under its low watermark. Returns true and sets *placed if it moved;
  // then *disk_copy is the page's disk slot when it keeps one (see "Clean pages"), else
  // kNoCopy. `old_copy` is the disk slot beside `old` (kCached only, else kNoCopy). The
  // caller records the move and then calls ReleaseReplaced(old, old_copy, *placed,
  // *disk_copy). False leaves the page where it is.
  bool MaybePromote(ConstPageSpan page, std::uint64_t hint, Location old, Slot old_copy,
                    Location* placed, Slot* disk_copy) noexcept;

  // Puts a page fetched ahead of reads into the local store (the caller keeps its remote
  // slot beside it as its copy). False (nothing changed) when the store has no room.
  bool StorePrefetched(ConstPageSpan page, std::uint64_t hint, Location* placed) noexcept;
  // Room in the local store for a page fetched ahead, to be received straight into it: sets
  // *placed (kLocal) and *frame, which the caller fills, then keeps or Releases. False when
  // the store has no room, or stands behind a TierWrapper (then StorePrefetched copies).
  bool ReserveLocalFrame(std::uint64_t hint, Location* placed, std::byte** frame) noexcept;
  // How many pages may be fetched ahead into the local store now: its room under the high
  // watermark. 0 without a remote tier. With `wanted` more than that, the evictor is asked
  // to bring the store down to its low watermark (WantRoom), so that the next windows find
  // room: pages fetched ahead and never read, and other clean pages, go at no cost.
  std::size_t PrefetchRoom(std::size_t wanted = 0) noexcept;
  // Has the evictor bring the local store down to its low watermark now, even if it is not
  // over its high one.
  void WantRoom() noexcept;
  // Whether the remote tier still holds the page in `remote_slot` (PageStore::Holds).
  bool RemoteHolds(Slot remote_slot) const noexcept {
    return remote_ != nullptr && remote_->Holds(remote_slot);
  }
  // Whether a write should go around the local store (see the file comment): there is a
  // remote tier and the store is at or above its low watermark.
  bool WritesGoAround() const noexcept {
    return remote_ != nullptr && LocalUse() >= options_.low_watermark;
  }

  // Releases a copy below (the page was modified or discarded): a disk slot, or a remote
  // copy. kNoCopy does nothing.
  void ReleaseCopy(Slot copy) noexcept {
    if (copy == kNoCopy) return;
    if (IsRemoteCopy(copy)) {
      remote_->Discard(RemoteCopySlot(copy));
    } else {
      disk_->Discard(copy);
    }
  }
  // Whether devices may put clean pages into the cache (there is one, and a disk store).
  bool has_cache() const { return cache_ != nullptr && disk_ != nullptr; }

  // Copies the page at `location` into `out`; zero tiers fill zeros. Returns 0 or -errno.
  int Load(Location location, PageSpan out) noexcept;

  // Batched reads of remote pages, for a caller that looked them up under their locks,
  // pinned them, dropped the locks and now reads them together (see PageStore::Pin).
  // REQUIRES: every location is kRemote.
  void PinRemote(Location location) noexcept { remote_->Pin(location.slot()); }
  void UnpinRemote(Location location) noexcept { remote_->Unpin(location.slot()); }
  void LoadRemoteBatch(std::span<const Slot> slots, std::span<std::byte* const> outs,
                       std::span<int> results) noexcept {
    remote_->ReadBatch(slots, outs, results);
  }

  // Frees whatever room `location` holds (nothing for zero tiers).
  void Release(Location location) noexcept;
  // After a page's entry has changed from (`old`, `old_copy`) to (`now`, `now_copy`): frees
  // the room the old pair held that the new one does not name. Every path that moves a
  // page frees its old room only this way, after the entry names the new one: the page
  // tables outlive a crash (docs/restart.md), and a room freed first could be taken by
  // another page before the entry changed, leaving two entries naming it.
  void ReleaseReplaced(Location old, Slot old_copy, Location now, Slot now_copy) noexcept;

  // Recovery after a restart (docs/restart.md), before the stores are used: marks the room
  // that a recovered page table names as taken. False when it cannot be: a kRemote or
  // kCached location (not recoverable yet), or a slot its store refuses. FinishAdopt then
  // rebuilds the stores' free lists. Not thread-safe.
  bool Adopt(Location location);
  // The same for a clean local page's disk copy, or its remote copy.
  bool AdoptCopy(Slot copy);
  // With a remote tier whose placements are recovered too: Adopt and AdoptCopy accept kRemote
  // locations and remote copies, and note each placement id they name in `referenced`
  // (grown as needed), for PlacementStore::Recover.
  void SetRemoteReferences(std::vector<bool>* referenced) { remote_references_ = referenced; }
  bool remote_recoverable() const { return remote_references_ != nullptr && remote_ != nullptr; }
  void FinishAdopt();

  // The local and disk stores themselves (behind any wrapper), for their own figures.
  LocalStore& local() { return *local_store_; }
  const LocalStore& local() const { return *local_store_; }
  const DiskStore* disk() const { return disk_store_; }
  const PageStore* remote() const { return remote_.get(); }
  const PageStore* cache() const { return cache_; }
  const TieringOptions& options() const { return options_; }

  // Pages demoted by the evictor and by direct reclaim since start.
  std::uint64_t evicted_pages() const { return evicted_.load(std::memory_order_relaxed); }

 private:
  // RemoteWrite for a writer's own page (Store). Without a disk tier, a page that found no
  // room is tried once more after PageStore::AwaitRoom says it may have come back (a
  // lender's session being resumed). Eviction and writes around the local store do not
  // wait: their pages can stay where they are.
  int RemoteWriteOrWait(ConstPageSpan page, std::uint64_t hint, Redundancy redundancy,
                        Slot* slot) noexcept;
  PageStore* StoreFor(Tier tier) noexcept;
  double LocalUse() const noexcept;
  bool HasLowerTier() const noexcept { return remote_ != nullptr || disk_ != nullptr; }
  // Whether a page promoted from disk may keep its disk slot (see "Clean pages").
  bool CanKeepDiskCopy() const noexcept;
  // How long a writer that found the local store full waits for an eviction scan before
  // it takes the scan for stuck and places its page below itself.
  static constexpr std::chrono::milliseconds kScanPatience{50};
  enum class ScanWait { kEnded, kStuck };
  // Waits up to kScanPatience for an eviction scan in progress to end.
  ScanWait WaitForScan() noexcept;
  // Wakes the evictor and retries the local write each time it has made room, for up to
  // kScanPatience. Returns 0 (written, *slot set) or the last local error (-ENOSPC).
  int WaitForRoom(ConstPageSpan page, std::uint64_t hint, Slot* slot) noexcept;
  // Whether a scan is running that was already found stuck (made no room in time).
  bool ScanIsStuck() noexcept;
  // Takes owners_mu_, waiting up to kScanPatience for the scan that holds it, and not at
  // all for one already found stuck. False: not taken, the scan is stuck.
  bool LockScans() noexcept;
  // EvictSome. REQUIRES: owners_mu_ held.
  std::size_t EvictSomeLocked(std::size_t want) noexcept;
  // Asks the owners for up to `want` cold pages, round robin. Returns pages demoted.
  std::size_t EvictSome(std::size_t want) noexcept;
  void EvictorLoop();
  void WakeEvictorIfHigh() noexcept;

  // Constant after construction.
  LocalStore* const local_store_;
  DiskStore* const disk_store_;  // or null
  // What Tiering reads and writes each tier through: the stores, or wrappers owning them.
  const std::unique_ptr<PageStore> local_;
  // The disk store outlives the remote one, which may keep disk copies in it.
  const std::unique_ptr<PageStore> disk_;
  const std::unique_ptr<PageStore> remote_;
  const TieringOptions options_;
  PageStore* const cache_;  // owned by remote_, or null

  std::timed_mutex owners_mu_;  // held during scans, so RemoveOwner waits for them
  std::vector<PageOwner*> owners_;  // guarded by owners_mu_
  std::size_t next_owner_ = 0;      // guarded by owners_mu_
  // Scans that made room, counted for writers waiting in WaitForRoom.
  std::mutex room_mu_;
  std::condition_variable room_cv_;
  std::atomic<std::uint64_t> room_events_{0};
  std::atomic<int> owner_removals_{0};        // RemoveOwner calls waiting for owners_mu_
  std::atomic<std::uint64_t> scans_{0};       // scans started (changed under owners_mu_)
  std::atomic<std::uint64_t> stuck_scan_{~std::uint64_t{0}};  // the last scan found stuck

  std::mutex evictor_mu_;
  std::condition_variable evictor_cv_;
  bool evictor_stop_ = false;       // guarded by evictor_mu_
  std::atomic<bool> evictor_idle_{true};
  std::atomic<bool> room_wanted_{false};  // WantRoom asked; the evictor takes it
  std::thread evictor_;
  std::atomic<std::uint64_t> evicted_{0};
  std::vector<bool>* remote_references_ = nullptr;  // during recovery only
  bool ReferenceRemote(Slot slot);
};

}  // namespace memlend
