#include "store/device.h"

#include <algorithm>
#include <bit>
#include <cassert>
#include <cerrno>
#include <cstring>
#include <new>

namespace memlend {
namespace {

void Count(std::atomic<std::uint64_t>& counter, std::uint64_t n = 1) noexcept {
  counter.fetch_add(n, std::memory_order_relaxed);
}

bool IsAllZero(const std::byte* data, std::size_t length) noexcept {
  // Word-at-a-time scan; memcpy keeps it free of alignment assumptions and compiles to
  // plain loads.
  std::size_t i = 0;
  for (; i + 32 <= length; i += 32) {
    std::uint64_t words[4];
    std::memcpy(words, data + i, sizeof(words));
    if ((words[0] | words[1] | words[2] | words[3]) != 0) return false;
  }
  for (; i < length; ++i) {
    if (data[i] != std::byte{0}) return false;
  }
  return true;
}

// The stripe lock this thread holds, if any (a thread holds at most one at a time).
thread_local const std::mutex* t_held_stripe = nullptr;

// Marks a page as recently used for the CLOCK scan, without dirtying the cache line
// when it already is.
void Touch(std::atomic<std::uint64_t>* entry) noexcept {  // the entry's `where`
  const std::uint64_t bits = entry->load(std::memory_order_relaxed);
  if ((bits & Location::kReferencedBit) == 0) {
    entry->store(bits | Location::kReferencedBit, std::memory_order_relaxed);
  }
}

}  // namespace

class Device::PageLock {
 public:
  explicit PageLock(std::mutex& mu) : mu_(mu) {
    mu_.lock();
    t_held_stripe = &mu_;
  }
  ~PageLock() {
    t_held_stripe = nullptr;
    mu_.unlock();
  }
  PageLock(const PageLock&) = delete;
  PageLock& operator=(const PageLock&) = delete;

 private:
  std::mutex& mu_;
};

Device::Device(std::string name, std::uint64_t size_bytes, Tiering& tiers,
               bool cache_clean_pages, Redundancy redundancy)
    : name_(std::move(name)),
      size_bytes_(size_bytes),
      page_count_(size_bytes / kPageSize),
      tiers_(tiers),
      cache_clean_pages_(cache_clean_pages),
      redundancy_(redundancy.copies == 0 && !redundancy.disk ? Redundancy{} : redundancy) {
  assert(size_bytes > 0 && size_bytes % kPageSize == 0);
  const std::uint64_t chunk_count = (page_count_ + kChunkPages - 1) >> kChunkShift;
  chunks_ = std::make_unique<std::atomic<PageEntry*>[]>(chunk_count);
  for (std::uint64_t i = 0; i < chunk_count; ++i) chunks_[i].store(nullptr);
  const std::uint64_t words = (page_count_ + 63) / 64;
  local_bits_ = std::make_unique<std::atomic<std::uint64_t>[]>(words);
  for (std::uint64_t i = 0; i < words; ++i) local_bits_[i].store(0, std::memory_order_relaxed);
  tiers_.AddOwner(this);
}

Device::Device(std::string name, std::uint64_t size_bytes, Tiering& tiers,
               bool cache_clean_pages, Redundancy redundancy, void* table, bool fresh)
    : name_(std::move(name)),
      size_bytes_(size_bytes),
      page_count_(size_bytes / kPageSize),
      tiers_(tiers),
      cache_clean_pages_(cache_clean_pages),
      redundancy_(redundancy.copies == 0 && !redundancy.disk ? Redundancy{} : redundancy),
      external_table_(true),
      keep_pages_(true) {
  assert(size_bytes > 0 && size_bytes % kPageSize == 0);
  static_assert(sizeof(PageEntry) == 16 && std::atomic<std::uint64_t>::is_always_lock_free);
  auto* entries = static_cast<PageEntry*>(table);
  if (fresh) {
    for (std::uint64_t page = 0; page < page_count_; ++page) new (&entries[page]) PageEntry;
  }
  const std::uint64_t chunk_count = (page_count_ + kChunkPages - 1) >> kChunkShift;
  chunks_ = std::make_unique<std::atomic<PageEntry*>[]>(chunk_count);
  // The last chunk may be short: Entry never indexes past page_count_.
  for (std::uint64_t i = 0; i < chunk_count; ++i) chunks_[i].store(entries + i * kChunkPages);
  const std::uint64_t words = (page_count_ + 63) / 64;
  local_bits_ = std::make_unique<std::atomic<std::uint64_t>[]>(words);
  for (std::uint64_t i = 0; i < words; ++i) local_bits_[i].store(0, std::memory_order_relaxed);
  tiers_.AddOwner(this);
}

Device::~Device() {
  tiers_.RemoveOwner(this);  // waits for any eviction scan of this device to end
  const std::uint64_t chunk_count = (page_count_ + kChunkPages - 1) >> kChunkShift;
  for (std::uint64_t c = 0; c < chunk_count; ++c) {
    PageEntry* chunk = chunks_[c].load();
    if (chunk == nullptr) continue;
    const std::uint64_t entries = std::min(kChunkPages, page_count_ - c * kChunkPages);
    if (!keep_pages_) {
      for (std::uint64_t i = 0; i < entries; ++i) {
        tiers_.Release(Location::FromBits(chunk[i].where.load(std::memory_order_relaxed)));
        tiers_.ReleaseCopy(chunk[i].disk_copy);
      }
    }
    if (!external_table_) delete[] chunk;
  }
}

Device::Recovery Device::Recover() noexcept {
  Recovery found;
  for (std::uint64_t page = 0; page < page_count_; ++page) {
    PageEntry* entry = Entry(page, /*create=*/false);
    Location where = Location::FromBits(entry->where.load(std::memory_order_relaxed));
    // Fetched-ahead marks and CLOCK bits are of the process that set them.
    where = where.WithPrefetched(false).WithReferenced(false);
    Slot copy = entry->disk_copy;
    if (where.tier() == Tier::kCached) {  // the peer's cache entry is not recovered
      where = Location(Tier::kDisk, copy);
      copy = kNoCopy;
    }
    if (where.tier() == Tier::kRemote && !tiers_.remote_recoverable()) {
      ++found.unrecoverable;
      continue;
    }
    // A local page's remote copy stays only if the placements are recovered too.
    if (where.tier() == Tier::kLocal && IsRemoteCopy(copy) && !tiers_.remote_recoverable()) {
      copy = kNoCopy;
    }
    if (where.tier() != Tier::kLocal && copy != kNoCopy) copy = kNoCopy;  // not kept there
    const bool ok = tiers_.Adopt(where) && (copy == kNoCopy || tiers_.AdoptCopy(copy));
    if (!ok) {
      ++found.invalid;
      where = Location();  // reads as zeros rather than as someone else's room
      copy = kNoCopy;
    }
    entry->where.store(where.bits(), std::memory_order_relaxed);
    entry->disk_copy = kNoCopy;
    SetLocation(page, entry, Location(), where, copy);
    if (where.tier() != Tier::kUnmapped) ++found.mapped;
    if (where.tier() == Tier::kLocal) ++found.local;
    if (where.tier() == Tier::kDisk) ++found.disk;
    if (where.tier() == Tier::kRemote) ++found.remote;
  }
  return found;
}

Device::PageEntry* Device::Entry(std::uint64_t page, bool create) noexcept {
  assert(page < page_count_);
  std::atomic<PageEntry*>& slot = chunks_[page >> kChunkShift];
  PageEntry* chunk = slot.load(std::memory_order_acquire);
  if (chunk == nullptr) {
    if (!create) return nullptr;
    auto* fresh = new (std::nothrow) PageEntry[kChunkPages];  // all unmapped, no copies
    if (fresh == nullptr) return nullptr;
    if (slot.compare_exchange_strong(chunk, fresh, std::memory_order_acq_rel)) {
      chunk = fresh;
    } else {
      delete[] fresh;  // another thread installed one first; `chunk` now holds it
    }
  }
  return &chunk[page & (kChunkPages - 1)];
}

bool Device::AllocatePageTable() noexcept {
  for (std::uint64_t page = 0; page < page_count_; page += kChunkPages) {
    if (Entry(page, /*create=*/true) == nullptr) return false;
  }
  return true;
}

void Device::SetLocation(std::uint64_t page, PageEntry* entry, Location from, Location to,
                         Slot disk_copy) noexcept {
  entry->where.store(to.bits(), std::memory_order_relaxed);
  const bool was_local = from.tier() == Tier::kLocal;
  const bool is_local = to.tier() == Tier::kLocal;
  const bool was_clean = was_local && entry->disk_copy != kNoCopy && !IsRemoteCopy(entry->disk_copy);
  const bool is_clean = is_local && disk_copy != kNoCopy && !IsRemoteCopy(disk_copy);
  const bool was_copy = was_local && IsRemoteCopy(entry->disk_copy);
  const bool is_copy = is_local && IsRemoteCopy(disk_copy);
  entry->disk_copy = disk_copy;
  if (was_clean != is_clean) clean_pages_.fetch_add(is_clean ? 1 : -1, std::memory_order_relaxed);
  if (was_copy != is_copy) {
    remote_copy_pages_.fetch_add(is_copy ? 1 : -1, std::memory_order_relaxed);
  }
  if (from.tier() == to.tier()) return;
  if (from.tier() == Tier::kLocal || to.tier() == Tier::kLocal) {
    const std::uint64_t bit = std::uint64_t{1} << (page & 63);
    if (to.tier() == Tier::kLocal) {
      local_bits_[page >> 6].fetch_or(bit, std::memory_order_release);  // after the chunk exists
    } else {
      local_bits_[page >> 6].fetch_and(~bit, std::memory_order_relaxed);
    }
  }
  tier_pages_[static_cast<int>(from.tier())].fetch_sub(1, std::memory_order_relaxed);
  tier_pages_[static_cast<int>(to.tier())].fetch_add(1, std::memory_order_relaxed);
}

void Device::ReleaseAndSet(std::uint64_t page, PageEntry* entry, Location to,
                           Slot copy) noexcept {
  const Location old = Location::FromBits(entry->where.load(std::memory_order_relaxed));
  const Slot old_copy = entry->disk_copy;
  NoteUnreadPrefetch(old);
  SetLocation(page, entry, old, to, copy);
  tiers_.ReleaseReplaced(old, old_copy, to, copy);
}

void Device::NoteUnreadPrefetch(Location where) noexcept {
  if (where.tier() == Tier::kLocal && where.prefetched()) prefetch_.NoteWasted();
}

bool Device::DropLocalCopy(std::uint64_t page, PageEntry* entry, Location where) noexcept {
  assert(where.tier() == Tier::kLocal && IsRemoteCopy(entry->disk_copy));
  const Slot copy = entry->disk_copy;
  const Slot remote = RemoteCopySlot(copy);
  if (!tiers_.RemoteHolds(remote)) {
    // Its lenders are gone: the copy in RAM is the page now.
    SetLocation(page, entry, where, where.WithPrefetched(false));
    tiers_.ReleaseCopy(copy);
    return false;
  }
  SetLocation(page, entry, where, Location(Tier::kRemote, remote));
  tiers_.Release(where);
  return true;
}

void Device::MakeDirty(std::uint64_t page, PageEntry* entry) noexcept {
  if (entry == nullptr || entry->disk_copy == kNoCopy) return;
  const Location where = Location::FromBits(entry->where.load(std::memory_order_relaxed));
  const Slot copy = entry->disk_copy;
  if (where.tier() == Tier::kCached) {
    SetLocation(page, entry, where, Location(Tier::kDisk, copy));
    tiers_.Release(where);  // the cache entry; the disk copy is now the page
  } else {
    NoteUnreadPrefetch(where);
    SetLocation(page, entry, where, where.WithPrefetched(false));
    tiers_.ReleaseCopy(copy);
  }
}

int Device::LoadLocked(std::uint64_t page, PageEntry* entry, PageSpan out,
                       Location* where) noexcept {
  *where = entry ? Location::FromBits(entry->where.load(std::memory_order_relaxed)) : Location();
  const int rc = tiers_.Load(*where, out);
  if (rc == 0 || where->tier() != Tier::kCached) return rc;
  // The lender dropped the cached copy (or is gone): the disk copy is the page.
  MakeDirty(page, entry);
  *where = Location::FromBits(entry->where.load(std::memory_order_relaxed));
  return tiers_.Load(*where, out);
}

int Device::StorePageLocked(std::uint64_t page, ConstPageSpan contents) noexcept {
  PageEntry* entry = Entry(page, /*create=*/true);
  if (entry == nullptr) return -ENOMEM;
  MakeDirty(page, entry);
  const Location old = Location::FromBits(entry->where.load(std::memory_order_relaxed));
  if (IsAllZero(contents.data(), kPageSize)) {
    ReleaseAndSet(page, entry, Location(Tier::kZero, 0));
    return 0;
  }
  Location placed;
  Location stale;
  const int rc = tiers_.Store(contents, page, old, &placed, &stale, redundancy_);
  if (rc == 0) {
    if (placed.tier() == Tier::kRemote) {
      Count(io_.remote_writes);
      Count(io_.remote_write_trips);
    }
    SetLocation(page, entry, old, placed.WithReferenced(true));
    tiers_.Release(stale);  // only now that the entry names the new room
    return 0;
  }
  // Every tier is full (for a local page: and its new contents fit neither a new chunk nor
  // its old one). The page keeps its old contents; freeing its room first to make some
  // would open a window in which a crash loses them (docs/restart.md).
  return rc;
}


int Device::Read(std::uint64_t offset, std::span<std::byte> out) noexcept {
  assert(offset + out.size() <= size_bytes_);
  std::size_t done = 0;
  while (done < out.size()) {
    const std::uint64_t position = offset + done;
    const std::uint64_t page = position >> kPageShift;
    const std::size_t in_page = position & (kPageSize - 1);
    const std::size_t count = std::min(kPageSize - in_page, out.size() - done);
    std::byte* dest = out.data() + done;

    PageLock lock(LockFor(page));
    PageEntry* entry = Entry(page, /*create=*/false);
    const int rc = ReadPageLocked(page, entry, in_page, count, dest);
    if (rc != 0) return rc;
    done += count;
  }
  return 0;
}

int Device::ReadPageLocked(std::uint64_t page, PageEntry* entry, std::size_t in_page,
                           std::size_t count, std::byte* dest) noexcept {
  if (entry == nullptr ||
      Location::FromBits(entry->where.load(std::memory_order_relaxed)).reads_as_zero()) {
    std::memset(dest, 0, count);
    return 0;
  }
  // A whole page is read straight into the caller's buffer, a partial one via a copy.
  alignas(64) std::byte buffer[kPageSize];
  std::byte* contents = count == kPageSize ? dest : buffer;
  Location where;
  const int rc = LoadLocked(page, entry, PageSpan(contents, kPageSize), &where);
  if (where.tier() == Tier::kRemote) {
    Count(io_.remote_reads);
    Count(io_.remote_read_trips);
  }
  if (rc != 0) return rc;
  if (contents == buffer) std::memcpy(dest, buffer + in_page, count);
  if (where.tier() == Tier::kLocal && where.prefetched()) {
    // Fetched ahead for this read. Read whole, it is the reader's to keep now.
    prefetch_.NoteRead();
    if (where.trigger()) QueueReadAhead(prefetch_.OnTrigger(page));
    if (count == kPageSize && IsRemoteCopy(entry->disk_copy)) {
      DropLocalCopy(page, entry, where);
    } else {
      SetLocation(page, entry, where, where.WithPrefetched(false).WithReferenced(true),
                  entry->disk_copy);
    }
    return 0;
  }
  FinishRead(page, entry, where, contents);
  return 0;
}

void Device::FinishRead(std::uint64_t page, PageEntry* entry, Location where,
                        const std::byte* contents) noexcept {
  if (where.tier() == Tier::kRemote || where.tier() == Tier::kDisk ||
      where.tier() == Tier::kCached) {
    Location promoted;
    Slot disk_copy = kNoCopy;
    const Slot old_copy = entry->disk_copy;
    if (tiers_.MaybePromote(ConstPageSpan(contents, kPageSize), page, where, old_copy,
                            &promoted, &disk_copy)) {
      SetLocation(page, entry, where, promoted, disk_copy);
      tiers_.ReleaseReplaced(where, old_copy, promoted, disk_copy);
      Count(io_.promotions);
    }
  }
  Touch(&entry->where);
}

namespace {

// Per-thread scratch of ReadMany and RunReadAhead, which keeps its capacity between calls.
struct ReadScratch {
  std::vector<Slot> slots;
  std::vector<std::byte*> outs;
  std::vector<Location> frames;  // local frames taken for pages fetched ahead
  std::vector<int> results;
  std::unique_ptr<std::byte[]> pages;  // scratch pages, not zeroed
  std::size_t page_capacity = 0;
  // Runs of pages (first, end) of requests that missed, for the prefetch decision.
  std::vector<std::pair<std::uint64_t, std::uint64_t>> missed;

  // Room for `count` scratch pages. False when it cannot be had.
  bool ReservePages(std::size_t count) noexcept {
    if (count <= page_capacity) return true;
    std::byte* fresh = new (std::nothrow) std::byte[count * kPageSize];
    if (fresh == nullptr) return false;
    pages.reset(fresh);
    page_capacity = count;
    return true;
  }
};
thread_local ReadScratch t_read;

}  // namespace

void Device::ReadMany(std::span<ReadRequest> requests) noexcept {
  thread_local std::vector<RemoteRead> reads;
  reads.clear();
  auto& missed = t_read.missed;
  missed.clear();

  // Phase 1: under each page's lock, serve what is at hand and pin the remote pages.
  std::size_t scratch_count = 0;
  for (std::size_t r = 0; r < requests.size(); ++r) {
    ReadRequest& request = requests[r];
    assert(request.offset + request.out.size() <= size_bytes_);
    request.result = 0;
    const std::size_t deferred_before = reads.size();
    for (std::size_t done = 0; done < request.out.size() && request.result == 0;) {
      const std::uint64_t position = request.offset + done;
      const std::uint64_t page = position >> kPageShift;
      const std::size_t in_page = position & (kPageSize - 1);
      const std::size_t count = std::min(kPageSize - in_page, request.out.size() - done);
      std::byte* dest = request.out.data() + done;
      PageLock lock(LockFor(page));
      PageEntry* entry = Entry(page, /*create=*/false);
      const Location where =
          entry ? Location::FromBits(entry->where.load(std::memory_order_relaxed)) : Location();
      if (where.tier() == Tier::kRemote) {
        try {
          reads.push_back({r, page, where, dest, in_page, count});
        } catch (const std::bad_alloc&) {
          request.result = -ENOMEM;
          break;
        }
        tiers_.PinRemote(where);
        if (count != kPageSize) ++scratch_count;
      } else {
        request.result = ReadPageLocked(page, entry, in_page, count, dest);
      }
      done += count;
    }
    if (reads.size() != deferred_before && !request.out.empty()) {
      try {
        missed.emplace_back(request.offset >> kPageShift,
                            ((request.offset + request.out.size() - 1) >> kPageShift) + 1);
      } catch (const std::bad_alloc&) {
      }
    }
  }
  if (reads.empty()) return;

  // Prefetch: after each run of missed pages that continues an earlier run, the pages that
  // follow it, as far as the local store has room for them.
  // The room is asked for only once a run wants a window: scattered misses must not make
  // the evictor bring the store down (and write pages out) for nothing.
  constexpr std::size_t kUnknown = ~std::size_t{0};
  std::size_t room = kUnknown;
  std::sort(missed.begin(), missed.end());
  for (std::size_t m = 0; m < missed.size() && room > 0;) {
    // Merge the runs that touch.
    const std::uint64_t first = missed[m].first;
    std::uint64_t end = missed[m].second;
    for (++m; m < missed.size() && missed[m].first <= end; ++m) {
      end = std::max(end, missed[m].second);
    }
    std::uint64_t ahead = prefetch_.OnMiss(first, end - first);
    if (ahead == 0) continue;
    if (room == kUnknown) room = tiers_.PrefetchRoom(SequentialPrefetch::kMaxPages);
    // Not into the next run of this batch (read anyway) nor past the device.
    const std::uint64_t limit = m < missed.size() ? missed[m].first : page_count_;
    ahead = std::min<std::uint64_t>({ahead, room, limit > end ? limit - end : 0});
    if (ahead == 0) continue;
    const std::size_t added = AddPrefetch(end, ahead, reads);
    scratch_count += added;
    room -= std::min(room, added);
  }
  FetchPinned(requests, reads, scratch_count);
}

void Device::FetchPinned(std::span<ReadRequest> requests, std::vector<RemoteRead>& reads,
                         std::size_t scratch_count) noexcept {
  // Phase 2: fetch every pinned page in one batch; partial pages and prefetched ones land
  // in scratch pages.
  ReadScratch& scratch = t_read;
  bool ok = scratch.ReservePages(scratch_count);
  if (ok) {
    try {
      scratch.slots.resize(reads.size());
      scratch.outs.resize(reads.size());
      scratch.frames.resize(reads.size());
      scratch.results.resize(reads.size());
    } catch (const std::bad_alloc&) {
      ok = false;
    }
  }
  if (!ok) {
    for (const RemoteRead& d : reads) {
      tiers_.UnpinRemote(d.where);
      if (d.request != kPrefetch) requests[d.request].result = -ENOMEM;
    }
    return;
  }
  // A page fetched ahead goes straight into a frame of the local store taken for it
  // (frames_[i]: its place; kLocal, or unmapped when it goes through a scratch page).
  std::size_t next_scratch = 0;
  for (std::size_t i = 0; i < reads.size(); ++i) {
    RemoteRead& d = reads[i];
    scratch.slots[i] = d.where.slot();
    scratch.frames[i] = Location();
    if (d.request != kPrefetch && d.count == kPageSize) {
      scratch.outs[i] = d.dest;
    } else if (d.request == kPrefetch &&
               tiers_.ReserveLocalFrame(d.page, &scratch.frames[i], &scratch.outs[i])) {
      // received into the frame
    } else {
      scratch.outs[i] = scratch.pages.get() + kPageSize * next_scratch++;
    }
  }
  tiers_.LoadRemoteBatch(scratch.slots, scratch.outs, scratch.results);
  Count(io_.remote_read_trips);
  Count(io_.remote_reads, reads.size());

  // Phase 3: copy partial pages out; mark (or promote) pages still in place, and put the
  // prefetched ones in the local store; unpin. The entry is compared under the page's lock
  // before the pin goes, so the slot it names cannot have been reused meanwhile.
  for (std::size_t i = 0; i < reads.size(); ++i) {
    const RemoteRead& d = reads[i];
    const bool prefetch = d.request == kPrefetch;
    std::byte* const out = scratch.outs[i];
    const Location frame = scratch.frames[i];
    if (scratch.results[i] != 0) {
      tiers_.UnpinRemote(d.where);
      tiers_.Release(frame);
      if (!prefetch && requests[d.request].result == 0) {
        requests[d.request].result = scratch.results[i];
      }
      continue;
    }
    if (!prefetch && d.count != kPageSize) std::memcpy(d.dest, out + d.in_page, d.count);
    PageLock lock(LockFor(d.page));
    PageEntry* entry = Entry(d.page, /*create=*/false);
    const Location now = Location::FromBits(entry->where.load(std::memory_order_relaxed));
    if (now.WithReferenced(false).bits() == d.where.WithReferenced(false).bits()) {
      if (!prefetch) {
        FinishRead(d.page, entry, now, out);
      } else {
        Location placed = frame;
        if (placed.tier() == Tier::kLocal ||
            tiers_.StorePrefetched(ConstPageSpan(out, kPageSize), d.page, &placed)) {
          SetLocation(d.page, entry, now,
                      placed.WithPrefetched(true, d.trigger).WithReferenced(true),
                      RemoteCopy(now.slot()));
          Count(io_.prefetched);
          tiers_.UnpinRemote(d.where);
          continue;
        }
      }
    }
    tiers_.Release(frame);  // the page changed meanwhile: its frame goes unused
    tiers_.UnpinRemote(d.where);
  }
}

void Device::QueueReadAhead(SequentialPrefetch::Range range) noexcept {
  if (range.count == 0) return;
  std::lock_guard lock(ahead_mu_);
  unsigned count = ahead_count_.load(std::memory_order_relaxed);
  if (count == kMaxReadAhead) {  // forget the oldest
    std::move(ahead_.begin() + 1, ahead_.end(), ahead_.begin());
    --count;
  }
  ahead_[count++] = range;
  ahead_count_.store(count, std::memory_order_relaxed);
}

bool Device::RunReadAhead() noexcept {
  thread_local std::vector<RemoteRead> reads;
  for (;;) {
    SequentialPrefetch::Range range;
    {
      std::lock_guard lock(ahead_mu_);
      const unsigned count = ahead_count_.load(std::memory_order_relaxed);
      if (count == 0) return false;
      range = ahead_[0];
      std::move(ahead_.begin() + 1, ahead_.begin() + count, ahead_.begin());
      ahead_count_.store(count - 1, std::memory_order_relaxed);
    }
    const std::size_t room = tiers_.PrefetchRoom(range.count);
    if (room == 0) continue;
    reads.clear();
    const std::size_t added =
        AddPrefetch(range.first, std::min<std::uint64_t>(range.count, room), reads);
    if (added == 0) continue;  // nothing of it is on a peer: the next one, without a trip
    Count(io_.read_ahead_trips);
    FetchPinned({}, reads, added);
    return ReadAheadWanted();
  }
}

std::size_t Device::AddPrefetch(std::uint64_t from, std::uint64_t count,
                                std::vector<RemoteRead>& reads) noexcept {
  std::size_t added = 0;
  const std::uint64_t end = std::min(page_count_, from + count);
  for (std::uint64_t page = from; page < end; ++page) {
    PageLock lock(LockFor(page));
    PageEntry* entry = Entry(page, /*create=*/false);
    if (entry == nullptr) {  // a chunk never written: skip it whole
      page |= kChunkPages - 1;
      continue;
    }
    const Location where = Location::FromBits(entry->where.load(std::memory_order_relaxed));
    if (where.tier() != Tier::kRemote) continue;
    try {
      reads.push_back({kPrefetch, page, where, nullptr, 0, kPageSize, added == 0});
    } catch (const std::bad_alloc&) {
      break;
    }
    tiers_.PinRemote(where);
    ++added;
  }
  return added;
}

bool Device::ReadIsAtHand(std::uint64_t offset, std::uint64_t length) const noexcept {
  if (length == 0) return true;
  const std::uint64_t last = (offset + length - 1) >> kPageShift;
  for (std::uint64_t page = offset >> kPageShift; page <= last; ++page) {
    const PageEntry* chunk = chunks_[page >> kChunkShift].load(std::memory_order_acquire);
    if (chunk == nullptr) {
      page |= kChunkPages - 1;  // unmapped, all of it
      continue;
    }
    const Tier tier =
        Location::FromBits(chunk[page & (kChunkPages - 1)].where.load(std::memory_order_relaxed))
            .tier();
    if (tier != Tier::kUnmapped && tier != Tier::kZero && tier != Tier::kLocal) return false;
  }
  return true;
}

void Device::WriteMany(std::span<WriteRequest> requests) noexcept {
  // Pages that go around the local store, gathered from all requests.
  struct Around {
    std::size_t request;
    std::uint64_t page;
    const std::byte* data;
  };
  constexpr std::size_t kBatch = Tiering::kMaxDemoteBatch;
  thread_local std::vector<Around> around;
  around.clear();
  for (std::size_t r = 0; r < requests.size(); ++r) {
    WriteRequest& request = requests[r];
    assert(request.offset + request.data.size() <= size_bytes_);
    request.result = 0;
    const bool go_around = tiers_.WritesGoAround();
    std::size_t done = 0;
    while (done < request.data.size() && request.result == 0) {
      const std::uint64_t position = request.offset + done;
      const std::size_t in_page = position & (kPageSize - 1);
      const std::size_t count = std::min(kPageSize - in_page, request.data.size() - done);
      const std::byte* source = request.data.data() + done;
      if (go_around && count == kPageSize && !IsAllZero(source, kPageSize)) {
        try {
          around.push_back({r, position >> kPageShift, source});
          done += count;
          continue;
        } catch (const std::bad_alloc&) {
        }
      }
      request.result = Write(position, std::span(source, count));
      done += count;
    }
  }

  for (std::size_t base = 0; base < around.size(); base += kBatch) {
    const std::size_t count = std::min(kBatch, around.size() - base);
    const std::byte* pages[kBatch];
    std::uint64_t hints[kBatch];
    Slot copies[kBatch];
    Location placed[kBatch];
    int results[kBatch];
    for (std::size_t i = 0; i < count; ++i) {
      pages[i] = around[base + i].data;
      hints[i] = around[base + i].page;
      copies[i] = kNoCopy;
    }
    tiers_.DemoteBatch(std::span(pages, count), std::span(hints, count), std::span(copies, count),
                       cache_clean_pages_, std::span(placed, count), std::span(results, count),
                       redundancy_);
    std::uint64_t remote = 0;
    for (std::size_t i = 0; i < count; ++i) {
      const Around& a = around[base + i];
      WriteRequest& request = requests[a.request];
      if (results[i] != 0) {
        // No tier below has room: the page is written as Write would, into the local
        // store if anything can make room there.
        if (request.result == 0) {
          request.result = Write(a.page << kPageShift, std::span(a.data, kPageSize));
        }
        continue;
      }
      if (placed[i].tier() == Tier::kRemote) ++remote;
      PageLock lock(LockFor(a.page));
      PageEntry* entry = Entry(a.page, /*create=*/true);
      if (entry == nullptr) {
        tiers_.Release(placed[i]);
        if (placed[i].tier() == Tier::kCached) tiers_.ReleaseCopy(copies[i]);
        if (request.result == 0) request.result = -ENOMEM;
        continue;
      }
      // Whatever the page held before goes; a clean page's new disk copy stays beside a
      // kCached placement (kDisk names it).
      ReleaseAndSet(a.page, entry, placed[i],
                    placed[i].tier() == Tier::kCached ? copies[i] : kNoCopy);
    }
    if (remote > 0) {
      Count(io_.remote_write_trips);
      Count(io_.remote_writes, remote);
      Count(io_.written_around, remote);
    }
  }
}

int Device::Write(std::uint64_t offset, std::span<const std::byte> data) noexcept {
  assert(offset + data.size() <= size_bytes_);
  std::size_t done = 0;
  while (done < data.size()) {
    const std::uint64_t position = offset + done;
    const std::uint64_t page = position >> kPageShift;
    const std::size_t in_page = position & (kPageSize - 1);
    const std::size_t count = std::min(kPageSize - in_page, data.size() - done);
    const std::byte* source = data.data() + done;

    PageLock lock(LockFor(page));
    int rc;
    if (count == kPageSize) {
      rc = StorePageLocked(page, ConstPageSpan(source, kPageSize));
    } else {
      alignas(64) std::byte buffer[kPageSize];
      Location where;
      rc = LoadLocked(page, Entry(page, /*create=*/false), PageSpan(buffer), &where);
      if (rc == 0) {
        std::memcpy(buffer + in_page, source, count);
        rc = StorePageLocked(page, ConstPageSpan(buffer));
      }
    }
    if (rc != 0) return rc;
    done += count;
  }
  return 0;
}

int Device::ZeroPage(std::uint64_t page, Tier zero_state) noexcept {
  PageLock lock(LockFor(page));
  PageEntry* entry = Entry(page, /*create=*/zero_state != Tier::kUnmapped);
  if (entry == nullptr) return zero_state == Tier::kUnmapped ? 0 : -ENOMEM;
  ReleaseAndSet(page, entry, Location(zero_state, 0));
  return 0;
}

int Device::ZeroPartialPage(std::uint64_t page, std::size_t in_page, std::size_t count,
                            Tier zero_state) noexcept {
  PageLock lock(LockFor(page));
  PageEntry* entry = Entry(page, /*create=*/false);
  if (entry == nullptr ||
      Location::FromBits(entry->where.load(std::memory_order_relaxed)).reads_as_zero()) {
    return 0;  // already reads as zeros; leave it as it is
  }
  alignas(64) std::byte buffer[kPageSize];
  Location where;
  const int rc = LoadLocked(page, entry, PageSpan(buffer), &where);
  if (rc != 0) return rc;
  std::memset(buffer + in_page, 0, count);
  if (IsAllZero(buffer, kPageSize)) {
    ReleaseAndSet(page, entry, Location(zero_state, 0));
    return 0;
  }
  return StorePageLocked(page, ConstPageSpan(buffer));
}

int Device::ZeroRange(std::uint64_t offset, std::uint64_t length, Tier zero_state) noexcept {
  assert(offset + length <= size_bytes_);
  std::uint64_t done = 0;
  while (done < length) {
    const std::uint64_t position = offset + done;
    const std::uint64_t page = position >> kPageShift;
    const std::size_t in_page = position & (kPageSize - 1);
    const std::uint64_t count = std::min<std::uint64_t>(kPageSize - in_page, length - done);
    const int rc = count == kPageSize ? ZeroPage(page, zero_state)
                                      : ZeroPartialPage(page, in_page, count, zero_state);
    if (rc != 0) return rc;
    done += count;
  }
  return 0;
}

int Device::Trim(std::uint64_t offset, std::uint64_t length) noexcept {
  return ZeroRange(offset, length, Tier::kUnmapped);
}

int Device::WriteZeroes(std::uint64_t offset, std::uint64_t length) noexcept {
  return ZeroRange(offset, length, Tier::kZero);
}

Tier Device::TierOf(std::uint64_t page) noexcept {
  PageLock lock(LockFor(page));
  PageEntry* entry = Entry(page, /*create=*/false);
  return entry ? Location::FromBits(entry->where.load(std::memory_order_relaxed)).tier()
               : Tier::kUnmapped;
}

std::size_t Device::DemoteColdPages(std::size_t want) noexcept {
  // Each cold page is copied out under its lock, which is released at once: the batch goes
  // down without holding any page lock, so a writer or reader of those pages (or of pages
  // sharing their lock stripes) never waits for the round trip to a peer. When the batch
  // is placed, each page is locked again (try_lock: a writer doing direct reclaim holds a
  // stripe, and waiting here could close a cycle) and re-pointed only if its entry is
  // exactly what was copied. Any access in between sets the referenced bit, which the copy
  // had clear, so a page written, trimmed or read meanwhile keeps its local copy and the
  // new lower copy is released instead. Scans run one at a time (Tiering holds its owners
  // lock), so no other scan clears a referenced bit while the batch is out.
  constexpr std::size_t kBatch = 64;  // Tiering::DemoteBatch's largest batch
  struct Candidate {
    PageEntry* entry;
    Location where;
    std::mutex* mu;
  };
  thread_local std::vector<std::byte> buffer(kBatch * kPageSize);
  Candidate candidates[kBatch];
  const std::byte* pages[kBatch];
  std::uint64_t hints[kBatch];
  Slot disk_copies[kBatch];
  bool dirty[kBatch];
  Location placed[kBatch];
  int results[kBatch];

  std::size_t demoted = 0;
  // At most two sweeps: the first may only clear referenced bits. The scan is linear in
  // the device's mapped chunks; chunks never written are skipped whole. The hand is
  // advanced locally and published when the scan ends.
  const std::uint64_t limit = 2 * page_count_;
  std::uint64_t scanned = 0;
  std::uint64_t hand = clock_hand_.load(std::memory_order_relaxed) % page_count_;
  while (demoted < want && scanned < limit) {
    std::size_t count = 0;
    while (scanned < limit && count < kBatch && demoted + count < want) {
      const std::uint64_t page = NextLocalPage(hand);
      if (page == page_count_) {  // none up to the end: wrap around
        scanned += page_count_ - hand;
        hand = 0;
        continue;
      }
      scanned += page - hand + 1;
      hand = page + 1 == page_count_ ? 0 : page + 1;
      // A set bit means the chunk exists (chunks live as long as the device).
      PageEntry* chunk = chunks_[page >> kChunkShift].load(std::memory_order_acquire);
      if (chunk == nullptr) continue;
      // After a wrap-around on a small device the hand can come back to a page already
      // in this batch.
      if (std::find(hints, hints + count, page) != hints + count) continue;
      PageEntry* entry = &chunk[page & (kChunkPages - 1)];
      std::mutex* mu = &LockFor(page);
      if (mu == t_held_stripe || !mu->try_lock()) continue;
      const Location where = Location::FromBits(entry->where.load(std::memory_order_relaxed));
      if (where.tier() == Tier::kLocal && !where.referenced() && IsRemoteCopy(entry->disk_copy)) {
        // A clean page whose remote copy stays: dropping it costs nothing.
        NoteUnreadPrefetch(where);
        if (DropLocalCopy(page, entry, where)) ++demoted;
        mu->unlock();
        continue;
      }
      std::byte* copy = buffer.data() + count * kPageSize;
      if (where.tier() != Tier::kLocal || where.referenced() ||
          tiers_.Load(where, PageSpan(copy, kPageSize)) != 0) {
        if (where.tier() == Tier::kLocal && where.referenced()) {
          entry->where.store(where.WithReferenced(false).bits(), std::memory_order_relaxed);
        }
        mu->unlock();
        continue;
      }
      candidates[count] = {entry, where, mu};
      pages[count] = copy;
      hints[count] = page;
      disk_copies[count] = entry->disk_copy;
      dirty[count] = entry->disk_copy == kNoCopy;
      mu->unlock();
      ++count;
    }
    if (count == 0) break;

    tiers_.DemoteBatch(std::span(pages, count), std::span(hints, count),
                       std::span(disk_copies, count), cache_clean_pages_,
                       std::span(placed, count), std::span(results, count), redundancy_);
    std::uint64_t remote = 0;
    for (std::size_t i = 0; i < count; ++i) {
      if (results[i] == 0 && placed[i].tier() == Tier::kRemote) ++remote;
    }
    if (remote > 0) {
      Count(io_.remote_write_trips);
      Count(io_.remote_writes, remote);
    }
    bool out_of_room = false;
    for (std::size_t i = 0; i < count; ++i) {
      if (results[i] != 0) {
        out_of_room = true;
        continue;
      }
      const Candidate& c = candidates[i];
      // Only what this batch created may be released on a change: a clean page's disk
      // copy (placed kDisk) still belongs to the entry, or to the writer who dropped it; a
      // dirty page's new disk copy (disk redundancy) is this batch's.
      const bool created = dirty[i] || placed[i].tier() == Tier::kCached;
      auto undo = [&] {
        if (created) tiers_.Release(placed[i]);
        if (dirty[i] && placed[i].tier() == Tier::kCached) tiers_.ReleaseCopy(disk_copies[i]);
      };
      if (!c.mu->try_lock()) {
        undo();
        continue;
      }
      if (c.entry->where.load(std::memory_order_relaxed) != c.where.bits()) {
        c.mu->unlock();
        undo();
        continue;
      }
      // A clean page's disk copy goes with it (kDisk names it, kCached keeps it beside).
      SetLocation(hints[i], c.entry, c.where, placed[i],
                  placed[i].tier() == Tier::kCached ? disk_copies[i] : kNoCopy);
      tiers_.Release(c.where);  // only now that no entry names it (ReleaseReplaced)
      c.mu->unlock();
      ++demoted;
    }
    if (out_of_room) break;  // no tier below has room
  }
  clock_hand_.store(hand, std::memory_order_relaxed);
  return demoted;
}

std::uint64_t Device::NextLocalPage(std::uint64_t from) const noexcept {
  const std::uint64_t words = (page_count_ + 63) / 64;
  std::uint64_t word = from / 64;
  if (word >= words) return page_count_;
  std::uint64_t bits =
      local_bits_[word].load(std::memory_order_acquire) & (~std::uint64_t{0} << (from % 64));
  while (bits == 0) {
    if (++word == words) return page_count_;
    bits = local_bits_[word].load(std::memory_order_acquire);
  }
  return std::min(page_count_, word * 64 + static_cast<std::uint64_t>(std::countr_zero(bits)));
}

DeviceIoCounts Device::IoCounts() const noexcept {
  auto get = [](const std::atomic<std::uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  DeviceIoCounts counts;
  counts.remote_reads = get(io_.remote_reads);
  counts.remote_read_trips = get(io_.remote_read_trips);
  counts.remote_writes = get(io_.remote_writes);
  counts.remote_write_trips = get(io_.remote_write_trips);
  counts.written_around = get(io_.written_around);
  counts.promotions = get(io_.promotions);
  counts.prefetched = get(io_.prefetched);
  counts.prefetch_hits = prefetch_.pages_read();
  counts.prefetch_wasted = prefetch_.pages_wasted();
  counts.read_ahead_trips = get(io_.read_ahead_trips);
  return counts;
}

DevicePageCounts Device::Counts() const noexcept {
  auto count = [this](Tier tier) {
    const std::int64_t n = tier_pages_[static_cast<int>(tier)].load(std::memory_order_relaxed);
    return static_cast<std::uint64_t>(std::max<std::int64_t>(n, 0));
  };
  DevicePageCounts counts;
  counts.total = page_count_;
  counts.zero = count(Tier::kZero);
  counts.local = count(Tier::kLocal);
  counts.disk = count(Tier::kDisk);
  counts.remote = count(Tier::kRemote);
  counts.cached = count(Tier::kCached);
  counts.disk += counts.cached;  // a cached page's one sure copy is on disk
  counts.clean = static_cast<std::uint64_t>(
      std::max<std::int64_t>(clean_pages_.load(std::memory_order_relaxed), 0));
  counts.remote_copies = static_cast<std::uint64_t>(
      std::max<std::int64_t>(remote_copy_pages_.load(std::memory_order_relaxed), 0));
  return counts;
}

}  // namespace memlend
