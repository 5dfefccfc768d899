#include "peer/lender_pool.h"

#include <sys/mman.h>

#include <algorithm>
#include <bit>
#include <cassert>
#include <cerrno>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <system_error>

#include "common/zero_memory.h"

namespace memlend::peer {

LenderPool::LenderPool(std::uint64_t pool_bytes) {
  const std::uint64_t count = pool_bytes / kSuperpageBytes;
  if (count == 0) {
    throw std::invalid_argument("the lending pool must hold at least one 2 MiB superpage");
  }
  // Slots are numbered with 32 bits: superpage * 512 + slot.
  if (count > std::numeric_limits<std::uint32_t>::max() / kPagesPerSuperpage) {
    throw std::invalid_argument("the lending pool exceeds the supported maximum of 8 TiB");
  }
  superpage_count_ = static_cast<std::uint32_t>(count);

  // Everything that can throw bad_alloc comes before the mapping, so nothing leaks.
  superpages_.resize(superpage_count_);
  free_superpages_.reserve(superpage_count_);
  for (std::uint32_t i = superpage_count_; i > 0; --i) free_superpages_.push_back(i - 1);
  partial_.reserve(superpage_count_);
  active_.reserve(superpage_count_);
  retired_.reserve(superpage_count_);
  target_superpages_ = superpage_count_;
  live_superpages_.store(superpage_count_, std::memory_order_relaxed);

  // Map one superpage more than needed and trim, so the arena starts on a 2 MiB boundary
  // and each superpage can be one transparent huge page.
  const std::size_t arena_bytes = static_cast<std::size_t>(count) * kSuperpageBytes;
  const std::size_t mapped = arena_bytes + kSuperpageBytes;
  void* raw = ::mmap(nullptr, mapped, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) {
    throw std::system_error(errno, std::generic_category(), "mmap of the lending pool");
  }
  const auto base = reinterpret_cast<std::uintptr_t>(raw);
  const std::uintptr_t aligned = (base + kSuperpageBytes - 1) & ~std::uintptr_t{kSuperpageBytes - 1};
  const std::size_t head = aligned - base;
  const std::size_t tail = mapped - head - arena_bytes;
  if (head > 0) ::munmap(raw, head);
  if (tail > 0) ::munmap(reinterpret_cast<void*>(aligned + arena_bytes), tail);
  arena_ = reinterpret_cast<std::byte*>(aligned);
  mapping_bytes_ = arena_bytes;
  // Harmless where THP is off.
  ::madvise(arena_, mapping_bytes_, MADV_HUGEPAGE);
}

LenderPool::~LenderPool() { ::munmap(arena_, mapping_bytes_); }

void LenderPool::SetEvictionHandler(EvictionHandler handler) { on_evicted_ = std::move(handler); }

// ---- Passive protocol ----

Status LenderPool::AllocSuperpage(SessionId session, std::uint32_t* sid) noexcept {
  std::array<Eviction, kPagesPerSuperpage> evicted;
  std::size_t evicted_count = 0;
  Status status = Status::kOk;
  std::uint32_t superpage = kNone;
  std::uint32_t granted = 0;
  bool must_zero = false;
  {
    std::lock_guard lock(mu_);
    if (next_sid_ > std::numeric_limits<std::uint32_t>::max()) {
      status = Status::kNoSpace;
    } else {
      // Nothing new while a shrink has superpages to retire (between its lock holds).
      if (ShrinkingLocked()) status = Status::kNoSpace;
      // Cached (ephemeral) pages yield to passive superpages.
      if (status == Status::kOk && free_superpages_.empty()) {
        evicted_count = ReclaimActiveLocked(evicted);
      }
      if (free_superpages_.empty()) status = Status::kNoSpace;
    }
    if (status == Status::kOk) {
      granted = static_cast<std::uint32_t>(next_sid_);
      superpage = free_superpages_.back();
      try {
        Session& state = sessions_[session];
        try {
          state.sids.insert(granted);
          grants_.emplace(granted, superpage);
        } catch (const std::bad_alloc&) {
          state.sids.erase(granted);
          throw;
        }
      } catch (const std::bad_alloc&) {
        status = Status::kNoSpace;  // a reclaimed superpage stays free for the next try
      }
    }
    if (status == Status::kOk) {
      free_superpages_.pop_back();
      ++next_sid_;
      SuperpageMeta& meta = superpages_[superpage];
      assert(meta.state == State::kFree);
      meta.state = State::kGranted;
      meta.owner = session;
      meta.sid = granted;
      must_zero = meta.dirty;
      meta.dirty = true;
    }
  }
  Report(std::span<const Eviction>(evicted.data(), evicted_count));
  if (status != Status::kOk) return status;
  // Outside the lock: the superpage is the caller's now, and the caller does not know its
  // SID yet, so nothing else can touch it.
  if (must_zero) ZeroMemory(SuperpageAddress(superpage), kSuperpageBytes);
  *sid = granted;
  return Status::kOk;
}

Status LenderPool::FreeSuperpage(SessionId session, std::uint32_t sid) noexcept {
  std::lock_guard lock(mu_);
  const auto grant = grants_.find(sid);
  if (grant == grants_.end() || superpages_[grant->second].owner != session) {
    return Status::kNotPermitted;
  }
  const std::uint32_t superpage = grant->second;
  grants_.erase(grant);
  const auto state = sessions_.find(session);
  assert(state != sessions_.end());
  state->second.sids.erase(sid);
  ReleaseSuperpageLocked(superpage);
  return Status::kOk;
}

Status LenderPool::ResolveRange(SessionId session, const RangeBody& range,
                                std::byte** at) noexcept {
  std::uint32_t superpage;
  {
    std::lock_guard lock(mu_);
    const auto grant = grants_.find(range.sid);
    if (grant == grants_.end() || superpages_[grant->second].owner != session) {
      return Status::kNotPermitted;
    }
    superpage = grant->second;
  }
  if (range.offset % kPageBytes != 0 || range.length % kPageBytes != 0 || range.length == 0 ||
      std::uint64_t{range.offset} + range.length > kSuperpageBytes) {
    return Status::kInvalid;
  }
  *at = SuperpageAddress(superpage) + range.offset;
  return Status::kOk;
}

Status LenderPool::Write(SessionId session, const RangeBody& range,
                         std::span<const std::byte> data) noexcept {
  std::byte* at = nullptr;
  const Status status = ResolveRange(session, range, &at);
  if (status != Status::kOk) return status;
  assert(data.size() == range.length);
  // No lock: only this session can free the superpage, and it is busy with this request.
  std::memcpy(at, data.data(), range.length);
  return Status::kOk;
}

Status LenderPool::Read(SessionId session, const RangeBody& range,
                        std::span<std::byte> out) noexcept {
  std::byte* at = nullptr;
  const Status status = ResolveRange(session, range, &at);
  if (status != Status::kOk) return status;
  assert(out.size() == range.length);
  std::memcpy(out.data(), at, range.length);
  return Status::kOk;
}

// ---- Active protocol ----

Status LenderPool::Put(SessionId session, const HandleBody& handle,
                       std::span<const std::byte, kPageBytes> page) noexcept {
  const PageKey key{handle.object, handle.index};
  Eviction evicted;
  bool did_evict = false;
  bool stored = false;
  {
    std::lock_guard lock(mu_);
    Pool* pool;
    Session* state;
    bool created = false;
    try {
      state = &sessions_[session];
      auto it = state->pools.find(handle.pool);
      if (it == state->pools.end()) {
        // Every pool costs metadata, whatever it holds: a borrower gets a few.
        if (state->pools.size() >= kMaxPoolsPerSession) return Status::kNoSpace;
        it = state->pools.try_emplace(handle.pool).first;
        created = true;
      }
      pool = &it->second;
    } catch (const std::bad_alloc&) {
      return Status::kNoSpace;
    }
    std::byte* at = nullptr;
    auto found = pool->pages.find(key);
    if (found != pool->pages.end()) {
      // Rewrite in place; the page becomes the newest.
      fifo_.splice(fifo_.end(), fifo_, FifoOfSlotLocked(found->second));
      at = SlotAddress(found->second);
    } else {
      SlotNumber slot = TakeSlotLocked();
      // Make room among the cached pages: one slot is all this needs. (An emptied
      // superpage may be retired instead, while the pool shrinks.)
      if (slot == kNone && EvictOldestLocked(&evicted)) {
        did_evict = true;
        slot = TakeSlotLocked();
      }
      // Evictions (RemovePageLocked) never erase a session or pool: `state` and `pool`
      // still stand.
      if (slot != kNone) {
        try {
          const FifoIterator fifo = fifo_.insert(fifo_.end(), Eviction{session, handle});
          try {
            pool->pages.emplace(key, slot);
          } catch (const std::bad_alloc&) {
            fifo_.erase(fifo);
            throw;
          }
          FifoOfSlotLocked(slot) = fifo;
          ++state->active_pages;
          at = SlotAddress(slot);
        } catch (const std::bad_alloc&) {
          ReleaseSlotLocked(slot);
        }
      }
    }
    // Any session's request may evict the page, so its copy stays under the lock.
    if (at != nullptr) std::memcpy(at, page.data(), kPageBytes);
    stored = at != nullptr;
    // A PUT that found no room leaves no pool behind.
    if (!stored && created) state->pools.erase(handle.pool);
  }
  if (did_evict) Report(std::span<const Eviction>(&evicted, 1));
  return stored ? Status::kOk : Status::kNoSpace;
}

Status LenderPool::Get(SessionId session, const HandleBody& handle,
                       std::span<std::byte, kPageBytes> out) noexcept {
  {
    std::lock_guard lock(mu_);
    const auto state = sessions_.find(session);
    if (state == sessions_.end()) return Status::kNotFound;
    const auto pool = state->second.pools.find(handle.pool);
    if (pool == state->second.pools.end()) return Status::kNotFound;
    const auto found = pool->second.pages.find(PageKey{handle.object, handle.index});
    if (found == pool->second.pages.end()) return Status::kNotFound;
    // Any session's request may evict it: copied under the lock.
    std::memcpy(out.data(), SlotAddress(found->second), kPageBytes);
  }
  return Status::kOk;
}

Status LenderPool::Flush(SessionId session, const HandleBody& handle) noexcept {
  std::lock_guard lock(mu_);
  const auto state = sessions_.find(session);
  if (state == sessions_.end()) return Status::kOk;
  const auto pool = state->second.pools.find(handle.pool);
  if (pool == state->second.pools.end()) return Status::kOk;
  const auto found = pool->second.pages.find(PageKey{handle.object, handle.index});
  if (found != pool->second.pages.end()) RemovePageLocked(state->second, pool->second, found);
  return Status::kOk;
}

Status LenderPool::DestroyPool(SessionId session, std::uint32_t pool) noexcept {
  std::lock_guard lock(mu_);
  const auto state = sessions_.find(session);
  if (state == sessions_.end()) return Status::kOk;
  const auto found = state->second.pools.find(pool);
  if (found == state->second.pools.end()) return Status::kOk;
  Pool& doomed = found->second;
  while (!doomed.pages.empty()) RemovePageLocked(state->second, doomed, doomed.pages.begin());
  state->second.pools.erase(found);
  return Status::kOk;
}

// ---- Sessions and accounting ----

void LenderPool::ReleaseSession(SessionId session, bool scrub) noexcept {
  if (scrub) {
    // Zeroed outside the lock: nobody but the session (which makes no request now) uses
    // its superpages until they are released below. Without memory for the list, they are
    // zeroed when next granted, as any released superpage is.
    std::vector<std::uint32_t> held;
    try {
      std::lock_guard lock(mu_);
      const auto state = sessions_.find(session);
      if (state != sessions_.end()) {
        for (const std::uint32_t sid : state->second.sids) held.push_back(grants_.at(sid));
      }
    } catch (const std::exception&) {
      held.clear();
    }
    for (const std::uint32_t superpage : held) {
      ZeroMemory(SuperpageAddress(superpage), kSuperpageBytes);
    }
    std::lock_guard lock(mu_);
    for (const std::uint32_t superpage : held) superpages_[superpage].dirty = false;
  }
  std::lock_guard lock(mu_);
  const auto state = sessions_.find(session);
  if (state == sessions_.end()) return;
  Session& doomed = state->second;
  for (const std::uint32_t sid : doomed.sids) {
    const auto grant = grants_.find(sid);
    assert(grant != grants_.end());
    const std::uint32_t superpage = grant->second;
    grants_.erase(grant);
    ReleaseSuperpageLocked(superpage);
  }
  for (auto& [id, pool] : doomed.pools) {
    while (!pool.pages.empty()) RemovePageLocked(doomed, pool, pool.pages.begin());
  }
  assert(doomed.active_pages == 0);
  sessions_.erase(state);
}

std::uint32_t LenderPool::SuperpagesOf(SessionId session) const noexcept {
  std::lock_guard lock(mu_);
  const auto state = sessions_.find(session);
  return state == sessions_.end() ? 0 : static_cast<std::uint32_t>(state->second.sids.size());
}

std::optional<std::uint32_t> LenderPool::ListSuperpages(
    SessionId session, std::span<std::byte> out) const noexcept {
  std::lock_guard lock(mu_);
  const auto state = sessions_.find(session);
  if (state == sessions_.end()) return 0;
  if (state->second.sids.size() > out.size() / sizeof(std::uint32_t)) return std::nullopt;
  std::byte* at = out.data();
  for (const std::uint32_t sid : state->second.sids) {  // little-endian hosts only (codec.h)
    std::memcpy(at, &sid, sizeof(sid));
    at += sizeof(sid);
  }
  return static_cast<std::uint32_t>(state->second.sids.size());
}

std::vector<std::uint32_t> LenderPool::ReclaimingOf(SessionId session) const {
  std::vector<std::uint32_t> sids;
  std::lock_guard lock(mu_);
  const auto state = sessions_.find(session);
  if (state == sessions_.end()) return sids;
  for (const std::uint32_t sid : state->second.sids) {
    if (superpages_[grants_.at(sid)].reclaiming) sids.push_back(sid);
  }
  return sids;
}

LenderPoolStats LenderPool::Stats(SessionId caller) const noexcept {
  std::lock_guard lock(mu_);
  LenderPoolStats stats;
  stats.total_pages = std::uint64_t{LiveLocked()} * kPagesPerSuperpage;
  stats.target_pages = std::uint64_t{target_superpages_} * kPagesPerSuperpage;
  stats.max_pages = std::uint64_t{superpage_count_} * kPagesPerSuperpage;
  stats.reclaiming_pages = std::uint64_t{reclaiming_} * kPagesPerSuperpage;
  // Slots holding nothing at all; ephemeral pages count as free for QUERY only.
  const std::uint64_t empty_pages =
      std::uint64_t{free_superpages_.size()} * kPagesPerSuperpage + active_free_slots_;
  stats.free_pages = empty_pages + ephemeral_pages_;
  stats.ephemeral_pages = ephemeral_pages_;
  stats.used_bytes = (stats.total_pages - empty_pages) * kPageBytes;
  for (const auto& [id, state] : sessions_) {
    if (state.holds_memory()) ++stats.borrowers;
    if (id == caller && caller != kNoSession) {
      stats.caller_pages =
          std::uint64_t{state.sids.size()} * kPagesPerSuperpage + state.active_pages;
    }
  }
  return stats;
}

// ---- Slots ----

LenderPool::SlotNumber LenderPool::TakeSlotLocked() noexcept {
  std::vector<std::uint32_t>& partial = partial_;
  if (partial.empty()) {
    if (free_superpages_.empty() || ShrinkingLocked()) return kNone;
    const std::uint32_t superpage = free_superpages_.back();
    SuperpageMeta& meta = superpages_[superpage];
    assert(meta.state == State::kFree);
    if (!meta.fifo_of_slot) {
      meta.fifo_of_slot.reset(new (std::nothrow) FifoIterator[kPagesPerSuperpage]);
      if (!meta.fifo_of_slot) return kNone;
    }
    free_superpages_.pop_back();
    meta.state = State::kActive;
    meta.dirty = true;
    meta.free_mask.fill(~std::uint64_t{0});
    meta.used_slots = 0;
    meta.partial_pos = static_cast<std::uint32_t>(partial.size());
    partial.push_back(superpage);  // capacity reserved for every superpage
    active_free_slots_ += kPagesPerSuperpage;
    meta.active_pos = static_cast<std::uint32_t>(active_.size());
    active_.push_back(superpage);  // capacity reserved for every superpage
  }
  // Fill the most recently opened superpage first, so older ones can empty out.
  const std::uint32_t superpage = partial.back();
  SuperpageMeta& meta = superpages_[superpage];
  assert(meta.state == State::kActive);
  std::uint32_t slot = kNone;
  for (std::size_t word = 0; word < kMaskWords; ++word) {
    if (meta.free_mask[word] != 0) {
      const unsigned bit = static_cast<unsigned>(std::countr_zero(meta.free_mask[word]));
      meta.free_mask[word] &= ~(std::uint64_t{1} << bit);
      slot = static_cast<std::uint32_t>(word * 64 + bit);
      break;
    }
  }
  assert(slot != kNone);
  ++meta.used_slots;
  --active_free_slots_;
  ++ephemeral_pages_;
  if (meta.used_slots == kPagesPerSuperpage) RemovePartialLocked(superpage);
  return superpage * kPagesPerSuperpage + slot;
}

void LenderPool::ReleaseSlotLocked(SlotNumber slot) noexcept {
  const std::uint32_t superpage = slot / kPagesPerSuperpage;
  const std::uint32_t index = slot % kPagesPerSuperpage;
  SuperpageMeta& meta = superpages_[superpage];
  assert(meta.state == State::kActive);
  assert((meta.free_mask[index / 64] & (std::uint64_t{1} << (index % 64))) == 0);
  meta.free_mask[index / 64] |= std::uint64_t{1} << (index % 64);
  ++active_free_slots_;
  --ephemeral_pages_;
  if (meta.used_slots-- == kPagesPerSuperpage) {
    meta.partial_pos = static_cast<std::uint32_t>(partial_.size());
    partial_.push_back(superpage);
  }
  if (meta.used_slots == 0) {
    // Empty: hand the whole superpage back, so passive allocations can have it.
    RemovePartialLocked(superpage);
    RemoveActiveLocked(superpage);
    active_free_slots_ -= kPagesPerSuperpage;
    ReleaseSuperpageLocked(superpage);
  }
}

void LenderPool::RemovePartialLocked(std::uint32_t superpage) noexcept {
  SuperpageMeta& meta = superpages_[superpage];
  std::vector<std::uint32_t>& partial = partial_;
  assert(meta.partial_pos != kNone && partial[meta.partial_pos] == superpage);
  const std::uint32_t last = partial.back();
  partial[meta.partial_pos] = last;
  superpages_[last].partial_pos = meta.partial_pos;
  partial.pop_back();
  meta.partial_pos = kNone;
}

void LenderPool::RemoveActiveLocked(std::uint32_t superpage) noexcept {
  SuperpageMeta& meta = superpages_[superpage];
  assert(meta.active_pos != kNone && active_[meta.active_pos] == superpage);
  const std::uint32_t last = active_.back();
  active_[meta.active_pos] = last;
  superpages_[last].active_pos = meta.active_pos;
  active_.pop_back();
  meta.active_pos = kNone;
}

void LenderPool::ReleaseSuperpageLocked(std::uint32_t superpage) noexcept {
  SuperpageMeta& meta = superpages_[superpage];
  const bool asked = meta.reclaiming;
  if (asked) --reclaiming_;
  meta.reclaiming = false;
  meta.state = State::kFree;
  meta.owner = kNoSession;
  meta.sid = 0;
  meta.used_slots = 0;
  meta.partial_pos = kNone;
  meta.active_pos = kNone;
  // The pool is shrinking: retire it, unless the superpages asked back (which will come)
  // bring it down to its size without this one.
  if (LiveLocked() > target_superpages_ + (asked ? 0 : reclaiming_)) {
    RetireLocked(superpage);
    return;
  }
  free_superpages_.push_back(superpage);  // capacity reserved for every superpage
}

void LenderPool::RetireLocked(std::uint32_t superpage) noexcept {
  superpages_[superpage].state = State::kRetired;
  retired_.push_back(superpage);  // capacity reserved for every superpage
  live_superpages_.store(LiveLocked(), std::memory_order_relaxed);
  // Back to the host: unlocked first, since locked pages cannot be dropped.
  std::byte* const address = SuperpageAddress(superpage);
  ::munlock(address, kSuperpageBytes);
  superpages_[superpage].dirty = ::madvise(address, kSuperpageBytes, MADV_DONTNEED) != 0;
}

std::vector<ReclaimRequest> LenderPool::Resize(std::uint32_t superpages) {
  // Superpages mlocked, retired or emptied per hold of the pool's lock: each costs a system
  // call or up to 512 evictions, and sessions wait on the lock meanwhile (a shrink of tens
  // of GiB in one hold would stall them for seconds).
  constexpr std::uint32_t kPerHold = 32;
  std::vector<Eviction> evicted;
  std::vector<ReclaimRequest> requests;
  bool first = true;
  for (bool more = true; more;) {
    std::unique_lock lock(mu_);
    if (first) target_superpages_ = std::min(superpages, superpage_count_);
    first = false;
    std::uint32_t done = 0;
    // Growing: retired superpages go back into service.
    while (LiveLocked() < target_superpages_ && !retired_.empty() && done < kPerHold) {
      const std::uint32_t superpage = retired_.back();
      retired_.pop_back();
      // Best effort, as the daemon's mlockall is: a page that is not locked still works.
      if (lock_memory_) ::mlock(SuperpageAddress(superpage), kSuperpageBytes);
      superpages_[superpage].state = State::kFree;
      free_superpages_.push_back(superpage);
      live_superpages_.store(LiveLocked(), std::memory_order_relaxed);
      ++done;
    }
    // Shrinking, by what the superpages already asked back will not cover: free superpages
    // first, then ephemeral ones (cached copies, which their owners have elsewhere;
    // ReleaseSuperpageLocked retires each as it empties).
    const auto excess = [this] {
      const std::uint32_t covered = target_superpages_ + reclaiming_;
      return LiveLocked() > covered ? LiveLocked() - covered : 0;
    };
    while (excess() > 0 && !free_superpages_.empty() && done < kPerHold) {
      const std::uint32_t superpage = free_superpages_.back();
      free_superpages_.pop_back();
      RetireLocked(superpage);
      ++done;
    }
    std::array<Eviction, kPagesPerSuperpage> batch;
    while (excess() > 0 && !active_.empty() && done < kPerHold) {
      const std::size_t count = ReclaimActiveLocked(batch);
      evicted.insert(evicted.end(), batch.begin(), batch.begin() + static_cast<long>(count));
      ++done;
    }
    if (done < kPerHold) {
      more = false;
      // Last, granted superpages: their borrowers move the pages off and free them.
      std::uint32_t wanted = excess();
      for (auto it = grants_.begin(); it != grants_.end() && wanted > 0; ++it) {
        SuperpageMeta& meta = superpages_[it->second];
        if (meta.reclaiming) continue;
        auto request = std::find_if(requests.begin(), requests.end(),
                                    [&](const ReclaimRequest& r) { return r.owner == meta.owner; });
        if (request == requests.end()) {
          requests.push_back({meta.owner, {}});
          request = requests.end() - 1;
        }
        request->sids.push_back(it->first);
        meta.reclaiming = true;
        ++reclaiming_;
        --wanted;
      }
    }
    lock.unlock();
    // This hold's evictions, with no lock held (the handler may call the pool).
    for (std::size_t base = 0; base < evicted.size(); base += kPagesPerSuperpage) {
      Report(std::span<const Eviction>(evicted).subspan(
          base, std::min<std::size_t>(kPagesPerSuperpage, evicted.size() - base)));
    }
    evicted.clear();
  }
  return requests;
}

void LenderPool::RemovePageLocked(Session& session, Pool& pool, PageMap::iterator page) noexcept {
  const SlotNumber slot = page->second;
  fifo_.erase(FifoOfSlotLocked(slot));
  ReleaseSlotLocked(slot);
  pool.pages.erase(page);
  --session.active_pages;
}

Eviction LenderPool::EvictLocked(FifoIterator fifo) noexcept {
  const Eviction evicted = *fifo;
  // Every FIFO entry names a live page; a page leaves the FIFO when it is removed.
  const auto owner = sessions_.find(evicted.owner);
  assert(owner != sessions_.end());
  const auto pool = owner->second.pools.find(evicted.handle.pool);
  assert(pool != owner->second.pools.end());
  const auto page = pool->second.pages.find(PageKey{evicted.handle.object, evicted.handle.index});
  assert(page != pool->second.pages.end());
  assert(FifoOfSlotLocked(page->second) == fifo);
  RemovePageLocked(owner->second, pool->second, page);
  return evicted;
}

bool LenderPool::EvictOldestLocked(Eviction* evicted) noexcept {
  if (fifo_.empty()) return false;
  *evicted = EvictLocked(fifo_.begin());
  return true;
}

std::size_t LenderPool::ReclaimActiveLocked(
    std::span<Eviction, kPagesPerSuperpage> evicted) noexcept {
  if (active_.empty()) return 0;
  // The fewest pages: the least cached data lost and the fewest notices to send.
  std::uint32_t victim = active_.front();
  for (const std::uint32_t superpage : active_) {
    if (superpages_[superpage].used_slots < superpages_[victim].used_slots) victim = superpage;
  }
  SuperpageMeta& meta = superpages_[victim];
  std::size_t count = 0;
  for (std::size_t word = 0; word < kMaskWords; ++word) {
    // A copy: each eviction sets its bit in meta.free_mask.
    std::uint64_t used = ~meta.free_mask[word];
    while (used != 0) {
      const std::size_t index = word * 64 + static_cast<std::size_t>(std::countr_zero(used));
      used &= used - 1;
      evicted[count++] = EvictLocked(meta.fifo_of_slot[index]);
    }
  }
  // Its last page gone, the superpage went back to the free stack, on top (or was retired,
  // the pool being over its size).
  assert(count > 0);
  assert(meta.state == State::kRetired ||
         (meta.state == State::kFree && free_superpages_.back() == victim));
  return count;
}

void LenderPool::Report(std::span<const Eviction> evictions) const noexcept {
  if (!evictions.empty() && on_evicted_) on_evicted_(evictions);
}

}  // namespace memlend::peer
