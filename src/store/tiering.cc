#include "store/tiering.h"

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cstring>

#include "common/thread_name.h"

namespace memlend {

namespace {

std::unique_ptr<PageStore> Wrapped(const TierWrapper& wrap, Tier tier,
                                   std::unique_ptr<PageStore> store) {
  if (!store || !wrap) return store;
  return wrap(tier, std::move(store));
}

}  // namespace

Tiering::Tiering(std::unique_ptr<LocalStore> local, std::unique_ptr<PageStore> remote,
                 std::unique_ptr<DiskStore> disk, TieringOptions options, PageStore* cache,
                 const TierWrapper& wrap)
    : local_store_(local.get()),
      disk_store_(disk.get()),
      local_(Wrapped(wrap, Tier::kLocal, std::move(local))),
      disk_(Wrapped(wrap, Tier::kDisk, std::move(disk))),
      remote_(Wrapped(wrap, Tier::kRemote, std::move(remote))),
      options_(options),
      cache_(cache) {
  assert(local_ != nullptr);
  assert(options_.low_watermark > 0 && options_.low_watermark <= options_.high_watermark &&
         options_.high_watermark <= 1);
}

Tiering::~Tiering() {
  {
    std::lock_guard lock(evictor_mu_);
    evictor_stop_ = true;
  }
  evictor_cv_.notify_all();
  if (evictor_.joinable()) evictor_.join();
}

void Tiering::StartEvictor() {
  if (!HasLowerTier() || evictor_.joinable()) return;
  evictor_ = std::thread([this] {
    SetThreadName("ml-evictor");
    EvictorLoop();
  });
}

void Tiering::AddOwner(PageOwner* owner) {
  std::lock_guard lock(owners_mu_);
  owners_.push_back(owner);
}

void Tiering::RemoveOwner(PageOwner* owner) {
  // The evictor lets go of the lock between batches while someone waits for it here: a
  // mutex is not fair, and an evictor that never runs out of work would keep it.
  owner_removals_.fetch_add(1, std::memory_order_acq_rel);
  std::lock_guard lock(owners_mu_);
  owner_removals_.fetch_sub(1, std::memory_order_acq_rel);
  owners_.erase(std::remove(owners_.begin(), owners_.end(), owner), owners_.end());
}

PageStore* Tiering::StoreFor(Tier tier) noexcept {
  switch (tier) {
    case Tier::kLocal: return local_.get();
    case Tier::kDisk: return disk_.get();
    case Tier::kRemote: return remote_.get();
    case Tier::kCached: return cache_;
    default: return nullptr;
  }
}

double Tiering::LocalUse() const noexcept {
  const StoreStats stats = local_->Stats();
  return stats.total_bytes == 0
             ? 1.0
             : static_cast<double>(stats.used_bytes) / static_cast<double>(stats.total_bytes);
}

void Tiering::WakeEvictorIfHigh() noexcept {
  if (!evictor_.joinable() || !evictor_idle_.load(std::memory_order_relaxed)) return;
  if (LocalUse() < options_.high_watermark) return;
  evictor_idle_.store(false, std::memory_order_relaxed);
  evictor_cv_.notify_one();
}

void Tiering::EvictorLoop() {
  std::unique_lock lock(evictor_mu_);
  for (;;) {
    evictor_idle_.store(true, std::memory_order_relaxed);
    // Wake on demand, and every 100 ms in case a wake-up raced with going idle.
    evictor_cv_.wait_for(lock, std::chrono::milliseconds(100), [this] {
      return evictor_stop_ || !evictor_idle_.load(std::memory_order_relaxed) ||
             room_wanted_.load(std::memory_order_relaxed);
    });
    if (evictor_stop_) return;
    const bool room_wanted = room_wanted_.exchange(false, std::memory_order_relaxed);
    if (LocalUse() < options_.high_watermark && !room_wanted) continue;
    lock.unlock();
    while (LocalUse() >= options_.low_watermark) {
      // Let a RemoveOwner waiting for the owners lock have it first.
      while (owner_removals_.load(std::memory_order_acquire) > 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      if (EvictSome(options_.eviction_batch) == 0) break;  // nothing cold, or nowhere to go
      std::lock_guard stop_check(evictor_mu_);
      if (evictor_stop_) return;
    }
    lock.lock();
  }
}

std::size_t Tiering::EvictSome(std::size_t want) noexcept {
  std::lock_guard lock(owners_mu_);
  return EvictSomeLocked(want);
}

std::size_t Tiering::EvictSomeLocked(std::size_t want) noexcept {
  scans_.fetch_add(1, std::memory_order_acq_rel);
  if (owners_.empty()) return 0;
  std::size_t done = 0;
  // Two rounds over the owners: the first may only clear referenced bits.
  for (std::size_t visited = 0; visited < 2 * owners_.size() && done < want; ++visited) {
    next_owner_ = (next_owner_ + 1) % owners_.size();
    done += owners_[next_owner_]->DemoteColdPages(want - done);
  }
  evicted_.fetch_add(done, std::memory_order_relaxed);
  if (done > 0) {
    {
      std::lock_guard lock(room_mu_);
      room_events_.fetch_add(1, std::memory_order_acq_rel);
    }
    room_cv_.notify_all();
  }
  return done;
}

int Tiering::WaitForRoom(ConstPageSpan page, std::uint64_t hint, Slot* slot) noexcept {
  // A scan already found stuck is not waited for again, so that a request of many pages
  // does not wait kScanPatience for each.
  if (ScanIsStuck()) return local_->Write(page, hint, slot);
  const auto deadline = std::chrono::steady_clock::now() + kScanPatience;
  for (;;) {
    const std::uint64_t seen = room_events_.load(std::memory_order_acquire);
    {
      std::lock_guard lock(evictor_mu_);
      evictor_idle_.store(false, std::memory_order_relaxed);
    }
    evictor_cv_.notify_one();
    const int rc = local_->Write(page, hint, slot);
    if (rc != -ENOSPC) return rc;
    std::unique_lock lock(room_mu_);
    if (!room_cv_.wait_until(lock, deadline, [&] {
          return room_events_.load(std::memory_order_acquire) != seen;
        })) {
      lock.unlock();
      // If a scan is running, it is the one that made no room in time.
      if (!owners_mu_.try_lock()) {
        stuck_scan_.store(scans_.load(std::memory_order_acquire), std::memory_order_release);
      } else {
        owners_mu_.unlock();
      }
      return local_->Write(page, hint, slot);  // a last try, then the caller goes below
    }
  }
}

bool Tiering::ScanIsStuck() noexcept {
  if (owners_mu_.try_lock()) {
    owners_mu_.unlock();
    return false;
  }
  return stuck_scan_.load(std::memory_order_acquire) == scans_.load(std::memory_order_acquire);
}

Tiering::ScanWait Tiering::WaitForScan() noexcept {
  if (!LockScans()) return ScanWait::kStuck;
  owners_mu_.unlock();
  return ScanWait::kEnded;
}

bool Tiering::LockScans() noexcept {
  if (owners_mu_.try_lock()) return true;
  // The scan that holds the lock now; one already found stuck is not waited for again,
  // so that a request of many pages does not wait kScanPatience for each.
  const std::uint64_t scan = scans_.load(std::memory_order_acquire);
  if (stuck_scan_.load(std::memory_order_acquire) == scan) return false;
  if (owners_mu_.try_lock_for(kScanPatience)) return true;
  stuck_scan_.store(scan, std::memory_order_release);
  return false;
}

bool Tiering::CanKeepDiskCopy() const noexcept {
  const StoreStats disk = disk_->Stats();
  if (disk.total_bytes == 0) return true;  // a file without a bound
  const std::uint64_t free = disk.total_bytes > disk.used_bytes ? disk.total_bytes - disk.used_bytes : 0;
  return free >= local_->Stats().total_bytes;
}

int Tiering::RemoteWrite(ConstPageSpan page, std::uint64_t hint, Redundancy redundancy,
                         Slot* slot) noexcept {
  if (!remote_) return -ENOSPC;
  const std::byte* pages[1] = {page.data()};
  int result = -ENOSPC;
  remote_->WriteBatchCopies(pages, std::span(&hint, 1), RemoteRedundancy(redundancy),
                            std::span(slot, 1), std::span(&result, 1));
  return result;
}

int Tiering::RemoteWriteOrWait(ConstPageSpan page, std::uint64_t hint, Redundancy redundancy,
                               Slot* slot) noexcept {
  const int rc = RemoteWrite(page, hint, redundancy, slot);
  // Without a disk, the page has nowhere else to go: if the room it lacks is a lender's
  // whose connection broke and is being resumed, it waits for that (bounded) and is tried
  // once more.
  if (rc == 0 || disk_ || !remote_ || !remote_->AwaitRoom()) return rc;
  return RemoteWrite(page, hint, redundancy, slot);
}

void Tiering::DemoteBatch(std::span<const std::byte* const> pages,
                          std::span<const std::uint64_t> hints, std::span<Slot> disk_copies,
                          bool use_cache, std::span<Location> placed,
                          std::span<int> results, Redundancy redundancy) noexcept {
  constexpr std::size_t kMaxBatch = kMaxDemoteBatch;
  assert(pages.size() <= kMaxBatch);
  // Split the batch: dirty pages need a new home, clean ones at most a cache entry.
  const std::byte* dirty_pages[kMaxBatch];
  std::uint64_t dirty_hints[kMaxBatch];
  std::size_t dirty_index[kMaxBatch];
  std::size_t dirty = 0;
  const std::byte* clean_pages[kMaxBatch];
  std::uint64_t clean_hints[kMaxBatch];
  std::size_t clean_index[kMaxBatch];
  std::size_t clean = 0;
  const bool disk_first = redundancy.copies == 0 && disk_;
  for (std::size_t i = 0; i < pages.size(); ++i) {
    if (disk_copies[i] == kNoCopy && disk_first) {
      // Disk redundancy: the page is clean once its disk copy is written.
      Slot slot = 0;
      if (disk_->Write(ConstPageSpan(pages[i], kPageSize), hints[i], &slot) == 0) {
        disk_copies[i] = slot;
      }
    }
    if (disk_copies[i] == kNoCopy) {
      dirty_pages[dirty] = pages[i];
      dirty_hints[dirty] = hints[i];
      dirty_index[dirty++] = i;
    } else {
      // Back to its disk copy unless the cache takes it below.
      placed[i] = Location(Tier::kDisk, disk_copies[i]);
      results[i] = 0;
      clean_pages[clean] = pages[i];
      clean_hints[clean] = hints[i];
      clean_index[clean++] = i;
    }
  }

  Slot slots[kMaxBatch];
  int dirty_results[kMaxBatch];
  for (std::size_t d = 0; d < dirty; ++d) dirty_results[d] = -ENOSPC;
  if (remote_ && dirty > 0) {
    remote_->WriteBatchCopies(std::span(dirty_pages, dirty), std::span(dirty_hints, dirty),
                              RemoteRedundancy(redundancy), std::span(slots, dirty),
                              std::span(dirty_results, dirty));
    for (std::size_t d = 0; d < dirty; ++d) {
      if (dirty_results[d] == 0) placed[dirty_index[d]] = Location(Tier::kRemote, slots[d]);
    }
  }
  for (std::size_t d = 0; d < dirty; ++d) {
    if (dirty_results[d] != 0 && disk_ && !disk_first) {
      dirty_results[d] =
          disk_->Write(ConstPageSpan(dirty_pages[d], kPageSize), dirty_hints[d], &slots[d]);
      if (dirty_results[d] == 0) placed[dirty_index[d]] = Location(Tier::kDisk, slots[d]);
    }
    results[dirty_index[d]] = dirty_results[d];
  }

  if (use_cache && has_cache() && clean > 0) {
    int cache_results[kMaxBatch];
    cache_->WriteBatch(std::span(clean_pages, clean), std::span(clean_hints, clean),
                       std::span(slots, clean), std::span(cache_results, clean));
    for (std::size_t c = 0; c < clean; ++c) {
      if (cache_results[c] == 0) placed[clean_index[c]] = Location(Tier::kCached, slots[c]);
    }
  }
}

int Tiering::Store(ConstPageSpan page, std::uint64_t hint, Location old, Location* placed,
                   Location* stale, Redundancy redundancy) noexcept {
  *placed = old;
  *stale = Location();
  Slot slot = 0;
  const bool was_local = old.tier() == Tier::kLocal;
  // A rewrite that needs a chunk of another size takes a new one and leaves the old live.
  bool keeps_old = true;
  int rc = was_local ? local_->Rewrite(old.slot(), page, hint, &slot, &keeps_old)
                     : local_->Write(page, hint, &slot);
  // Whether the page stays in the room it held (so that nothing is to be released).
  const bool own_room = rc == 0 && !keeps_old;
  // Set when an eviction scan has not ended within kScanPatience: it waits on a peer that
  // is slow or unreachable, or, under memory pressure, on socket memory that only our own
  // progress can free (the kernel may be waiting for this very write to reclaim it).
  bool scan_stuck = false;
  if (rc == -ENOSPC && remote_ && disk_ && evictor_.joinable()) {
    // With peers and a disk, a writer never sends to a peer itself: a socket send needs
    // memory, which the kernel may be waiting for this very write to free, while the block
    // layer keeps reserves for disk writes. It has the evictor make room (through peers)
    // and waits up to kScanPatience; if that is not enough, its page goes to disk below.
    rc = WaitForRoom(page, hint, &slot);
    scan_stuck = rc == -ENOSPC;
  } else if (rc == -ENOSPC && HasLowerTier()) {
    // A scan in progress (usually the evictor's) frees a batch when its round trip ends:
    // wait for it and try again. Only if that was not enough, reclaim directly, and try
    // again even if that moved nothing (the evictor may have made room meanwhile).
    scan_stuck = WaitForScan() == ScanWait::kStuck;
    if (!scan_stuck) rc = local_->Write(page, hint, &slot);
    if (rc == -ENOSPC && !scan_stuck) {
      if (LockScans()) {
        std::lock_guard lock(owners_mu_, std::adopt_lock);
        EvictSomeLocked(options_.reclaim_batch);
      } else {
        scan_stuck = true;
      }
      rc = local_->Write(page, hint, &slot);
    }
  }
  if (rc == 0) {
    *placed = Location(Tier::kLocal, slot);
    if (!own_room) *stale = old;
    WakeEvictorIfHigh();
    return 0;
  }
  if (rc != -ENOSPC) return rc;

  // Nothing could be demoted to make room locally: place the page below directly. A page
  // already on disk is rewritten in its own slot when it has to stay there, so a full
  // device can still rewrite the blocks it holds. While scans are stuck, the disk comes
  // first: a peer would be reached through the same stuck connection, while the block
  // layer keeps reserves for writes like this one. With disk redundancy alone the disk
  // comes first too: that is where such a device keeps its pages.
  const bool try_remote_first =
      remote_ && !(disk_ && (scan_stuck || redundancy.copies == 0));
  if (try_remote_first && RemoteWriteOrWait(page, hint, redundancy, &slot) == 0) {
    *placed = Location(Tier::kRemote, slot);
    *stale = old;
    return 0;
  }
  if (!disk_) return -ENOSPC;
  const bool was_disk = old.tier() == Tier::kDisk;
  keeps_old = true;
  rc = was_disk ? disk_->Rewrite(old.slot(), page, hint, &slot, &keeps_old)
                : disk_->Write(page, hint, &slot);
  if (rc == 0) {
    *placed = Location(Tier::kDisk, slot);
    if (keeps_old) *stale = old;
    return 0;
  }
  if (rc != -ENOSPC || try_remote_first || !remote_ ||
      RemoteWrite(page, hint, redundancy, &slot) != 0) {
    return rc;
  }
  *placed = Location(Tier::kRemote, slot);
  *stale = old;
  return 0;
}

bool Tiering::MaybePromote(ConstPageSpan page, std::uint64_t hint, Location old, Slot old_copy,
                           Location* placed, Slot* disk_copy) noexcept {
  assert(old.tier() == Tier::kRemote || old.tier() == Tier::kDisk ||
         old.tier() == Tier::kCached);
  // Only under the low watermark: between the watermarks neither promotion nor eviction
  // runs, so random reads over a working set larger than the store do not churn pages
  // up and back down.
  if (LocalUse() >= options_.low_watermark) return false;
  Slot slot = 0;
  if (local_->Write(page, hint, &slot) != 0) return false;
  *placed = Location(Tier::kLocal, slot);
  *disk_copy = kNoCopy;
  // A page from the disk, or the cache beside it, keeps its disk copy while there is room.
  if (old.tier() != Tier::kRemote && CanKeepDiskCopy()) {
    *disk_copy = old.tier() == Tier::kDisk ? old.slot() : old_copy;
  }
  return true;
}

bool Tiering::StorePrefetched(ConstPageSpan page, std::uint64_t hint, Location* placed) noexcept {
  Slot slot = 0;
  if (local_->Write(page, hint, &slot) != 0) return false;
  *placed = Location(Tier::kLocal, slot);
  return true;
}

bool Tiering::ReserveLocalFrame(std::uint64_t hint, Location* placed, std::byte** frame) noexcept {
  if (local_.get() != local_store_) return false;  // a wrapper sees every page it stores
  Slot slot = 0;
  if (local_store_->ReserveFrame(hint, &slot, frame) != 0) return false;
  *placed = Location(Tier::kLocal, slot);
  return true;
}

std::size_t Tiering::PrefetchRoom(std::size_t wanted) noexcept {
  if (remote_ == nullptr) return 0;
  const StoreStats stats = local_->Stats();
  const auto limit = static_cast<std::uint64_t>(static_cast<double>(stats.total_bytes) *
                                                options_.high_watermark);
  const std::size_t room = stats.used_bytes >= limit ? 0 : (limit - stats.used_bytes) / kPageSize;
  if (wanted > room) WantRoom();
  return room;
}

void Tiering::WantRoom() noexcept {
  if (!evictor_.joinable() || room_wanted_.exchange(true, std::memory_order_relaxed)) return;
  {
    std::lock_guard lock(evictor_mu_);
    evictor_idle_.store(false, std::memory_order_relaxed);
  }
  evictor_cv_.notify_one();
}

int Tiering::Load(Location location, PageSpan out) noexcept {
  if (location.reads_as_zero()) {
    std::memset(out.data(), 0, kPageSize);
    return 0;
  }
  PageStore* store = StoreFor(location.tier());
  assert(store != nullptr);
  return store->Read(location.slot(), out);
}

void Tiering::Release(Location location) noexcept {
  if (location.reads_as_zero()) return;
  PageStore* store = StoreFor(location.tier());
  assert(store != nullptr);
  store->Discard(location.slot());
}

namespace {

// Whether a page at `where` with copy `copy` names the room `slot` of `tier`.
bool Names(Location where, Slot copy, Tier tier, Slot slot) noexcept {
  if (!where.reads_as_zero() && where.tier() == tier && where.slot() == slot) return true;
  if (copy == kNoCopy) return false;
  if (IsRemoteCopy(copy)) return tier == Tier::kRemote && RemoteCopySlot(copy) == slot;
  return tier == Tier::kDisk && copy == slot;
}

}  // namespace

void Tiering::ReleaseReplaced(Location old, Slot old_copy, Location now,
                              Slot now_copy) noexcept {
  if (!old.reads_as_zero() && !Names(now, now_copy, old.tier(), old.slot())) Release(old);
  if (old_copy == kNoCopy) return;
  const bool remote = IsRemoteCopy(old_copy);
  const Tier tier = remote ? Tier::kRemote : Tier::kDisk;
  if (!Names(now, now_copy, tier, remote ? RemoteCopySlot(old_copy) : old_copy)) {
    ReleaseCopy(old_copy);
  }
}

bool Tiering::Adopt(Location location) {
  switch (location.tier()) {
    case Tier::kUnmapped:
    case Tier::kZero:
      return true;
    case Tier::kLocal:
      return local_store_->Adopt(location.slot());
    case Tier::kDisk:
      try {
        return disk_store_ != nullptr && disk_store_->Adopt(location.slot());
      } catch (const std::bad_alloc&) {
        return false;
      }
    case Tier::kRemote:
      return ReferenceRemote(location.slot());
    case Tier::kCached:
      return false;
  }
  return false;
}

bool Tiering::ReferenceRemote(Slot slot) {
  if (remote_references_ == nullptr || remote_ == nullptr) return false;
  const auto id = static_cast<std::uint32_t>(slot);
  if (slot > UINT32_MAX || id == 0) return false;
  if (remote_references_->size() <= id) {
    try {
      remote_references_->resize(std::size_t{id} + 1, false);
    } catch (const std::bad_alloc&) {
      return false;
    }
  }
  if ((*remote_references_)[id]) return false;  // named twice
  (*remote_references_)[id] = true;
  return true;
}

bool Tiering::AdoptCopy(Slot copy) {
  if (copy == kNoCopy) return true;
  if (IsRemoteCopy(copy)) return ReferenceRemote(RemoteCopySlot(copy));
  try {
    return disk_store_ != nullptr && disk_store_->Adopt(copy);
  } catch (const std::bad_alloc&) {
    return false;
  }
}

void Tiering::FinishAdopt() {
  local_store_->FinishAdopt();
  if (disk_store_ != nullptr) disk_store_->FinishAdopt();
}

}  // namespace memlend
