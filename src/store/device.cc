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

Device::~Device() {
  tiers_.RemoveOwner(this);  // waits for any eviction scan of this device to end
  const std::uint64_t chunk_count = (page_count_ + kChunkPages - 1) >> kChunkShift;
  for (std::uint64_t c = 0; c < chunk_count; ++c) {
    PageEntry* chunk = chunks_[c].load();
    if (chunk == nullptr) continue;
    for (std::uint64_t i = 0; i < kChunkPages; ++i) {
      tiers_.Release(Location::FromBits(chunk[i].where.load(std::memory_order_relaxed)));
      tiers_.ReleaseCopy(chunk[i].disk_copy);
    }
    delete[] chunk;
  }
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
  const bool was_clean = from.tier() == Tier::kLocal && entry->disk_copy != kNoCopy;
  const bool is_clean = to.tier() == Tier::kLocal && disk_copy != kNoCopy;
  entry->disk_copy = disk_copy;
  if (was_clean != is_clean) clean_pages_.fetch_add(is_clean ? 1 : -1, std::memory_order_relaxed);
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

void Device::ReleaseAndSet(std::uint64_t page, PageEntry* entry, Location to) noexcept {
  const Location old = Location::FromBits(entry->where.load(std::memory_order_relaxed));
  tiers_.Release(old);
  tiers_.ReleaseCopy(entry->disk_copy);
  SetLocation(page, entry, old, to);
}

void Device::MakeDirty(std::uint64_t page, PageEntry* entry) noexcept {
  if (entry == nullptr || entry->disk_copy == kNoCopy) return;
  const Location where = Location::FromBits(entry->where.load(std::memory_order_relaxed));
  if (where.tier() == Tier::kCached) {
    tiers_.Release(where);  // the cache entry; the disk copy is now the page
    SetLocation(page, entry, where, Location(Tier::kDisk, entry->disk_copy));
  } else {
    tiers_.ReleaseCopy(entry->disk_copy);
    SetLocation(page, entry, where, where);
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
  const int rc = tiers_.Store(contents, page, old, &placed, redundancy_);
  if (rc == 0 && placed.tier() == Tier::kRemote) {
    Count(io_.remote_writes);
    Count(io_.remote_write_trips);
  }
  SetLocation(page, entry, old, rc == 0 ? placed.WithReferenced(true) : placed);
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
  FinishRead(page, entry, where, contents);
  if (contents == buffer) std::memcpy(dest, buffer + in_page, count);
  return 0;
}

void Device::FinishRead(std::uint64_t page, PageEntry* entry, Location where,
                        const std::byte* contents) noexcept {
  if (where.tier() == Tier::kRemote || where.tier() == Tier::kDisk ||
      where.tier() == Tier::kCached) {
    Location promoted;
    Slot disk_copy = kNoCopy;
    if (tiers_.MaybePromote(ConstPageSpan(contents, kPageSize), page, where, entry->disk_copy,
                            &promoted, &disk_copy)) {
      SetLocation(page, entry, where, promoted, disk_copy);
      Count(io_.promotions);
    }
  }
  Touch(&entry->where);
}

void Device::ReadMany(std::span<ReadRequest> requests) noexcept {
  // A page of a request whose remote read was put off until the whole batch is known.
  struct Deferred {
    std::size_t request;
    std::uint64_t page;
    Location where;
    std::byte* dest;
    std::size_t in_page;
    std::size_t count;
  };
  // Per-thread scratch that keeps its capacity between calls.
  thread_local std::vector<Deferred> deferred;
  thread_local std::vector<Slot> slots;
  thread_local std::vector<std::byte*> outs;
  thread_local std::vector<int> results;
  thread_local std::vector<std::byte> partial_pages;
  deferred.clear();

  // Phase 1: under each page's lock, serve what is at hand and pin the remote pages.
  std::size_t partial_count = 0;
  for (std::size_t r = 0; r < requests.size(); ++r) {
    ReadRequest& request = requests[r];
    assert(request.offset + request.out.size() <= size_bytes_);
    request.result = 0;
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
          deferred.push_back({r, page, where, dest, in_page, count});
        } catch (const std::bad_alloc&) {
          request.result = -ENOMEM;
          break;
        }
        tiers_.PinRemote(where);
        if (count != kPageSize) ++partial_count;
      } else {
        request.result = ReadPageLocked(page, entry, in_page, count, dest);
      }
      done += count;
    }
  }
  if (deferred.empty()) return;

  // Phase 2: fetch every pinned page in one batch; partial pages land in scratch pages.
  try {
    slots.resize(deferred.size());
    outs.resize(deferred.size());
    results.resize(deferred.size());
    partial_pages.resize(partial_count * kPageSize);
  } catch (const std::bad_alloc&) {
    for (const Deferred& d : deferred) {
      tiers_.UnpinRemote(d.where);
      requests[d.request].result = -ENOMEM;
    }
    return;
  }
  std::size_t next_partial = 0;
  for (std::size_t i = 0; i < deferred.size(); ++i) {
    slots[i] = deferred[i].where.slot();
    outs[i] = deferred[i].count == kPageSize ? deferred[i].dest
                                             : partial_pages.data() + kPageSize * next_partial++;
  }
  tiers_.LoadRemoteBatch(slots, outs, results);
  Count(io_.remote_read_trips);
  Count(io_.remote_reads, deferred.size());

  // Phase 3: copy partial pages out, unpin, and mark (or promote) pages still in place.
  for (std::size_t i = 0; i < deferred.size(); ++i) {
    const Deferred& d = deferred[i];
    ReadRequest& request = requests[d.request];
    tiers_.UnpinRemote(d.where);
    if (results[i] != 0) {
      if (request.result == 0) request.result = results[i];
      continue;
    }
    if (d.count != kPageSize) std::memcpy(d.dest, outs[i] + d.in_page, d.count);
    PageLock lock(LockFor(d.page));
    PageEntry* entry = Entry(d.page, /*create=*/false);
    const Location now = Location::FromBits(entry->where.load(std::memory_order_relaxed));
    if (now.WithReferenced(false).bits() == d.where.WithReferenced(false).bits()) {
      FinishRead(d.page, entry, now, outs[i]);
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
    const std::size_t batch_want = std::min(kBatch, want - demoted);
    std::size_t count = 0;
    while (scanned < limit && count < batch_want) {
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
      tiers_.Release(c.where);
      // A clean page's disk copy goes with it (kDisk names it, kCached keeps it beside).
      SetLocation(hints[i], c.entry, c.where, placed[i],
                  placed[i].tier() == Tier::kCached ? disk_copies[i] : kNoCopy);
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
  return {get(io_.remote_reads), get(io_.remote_read_trips), get(io_.remote_writes),
          get(io_.remote_write_trips), get(io_.promotions)};
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
  return counts;
}

}  // namespace memlend
