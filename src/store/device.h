// Device: one memlend block device — a size, a page table and byte-range operations that
// frontends (NBD today, ublk next) translate their requests into.
//
// The page table has one 16-byte entry per 4 KiB page: its 64-bit Location and, for a
// clean page (see "Clean pages" in tiering.h), the slot of its disk copy. It is two-level
// so that a large, mostly empty device costs little: the top level has one pointer per
// kChunkPages pages (8 bytes per 2 MiB of device) and a chunk of entries is allocated on
// the first write into its range. Unmapped and all-zero pages take no room in any store.
//
// Per device, `cache_clean_pages` chooses what carries a clean page that is evicted: the
// peers' ephemeral pools (remote active protocol) when true, nothing (it is dropped back
// to its disk copy) when false. Dirty pages always go through the remote passive
// protocol. docs/placement.md explains the choice.
//
// Concurrency: any number of threads may call any method at once. Each page is guarded by
// one of kLockStripes mutexes chosen by page number, held while that page's entry and its
// stored copy change, so concurrent requests on different pages run in parallel and a
// read never sees a half-replaced page. Multi-page requests are not atomic as a whole
// (neither are a disk's). The per-tier page counts are atomics kept in step with the
// table under the same stripe locks.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "store/prefetch.h"
#include "store/tiering.h"

namespace memlend {

struct DevicePageCounts {
  std::uint64_t total = 0;  // size_bytes / kPageSize
  std::uint64_t zero = 0;
  std::uint64_t local = 0;
  std::uint64_t disk = 0;
  std::uint64_t remote = 0;
  std::uint64_t cached = 0;  // of the disk pages, those with a copy in a peer's cache
  std::uint64_t clean = 0;   // of the local pages, those with a valid disk copy
  // Of the local pages, those that keep their slot in the remote tier (fetched ahead of
  // reads): the remote tier holds remote + remote_copies of the device's pages.
  std::uint64_t remote_copies = 0;
  std::uint64_t mapped() const { return zero + local + disk + remote; }
};

// What a device's reads and writes cost in the remote tier since it was made. A trip is one
// request (or one batch of requests sent together) to the peers and the wait for its
// replies: a batch of 8 remote pages read together is 1 trip and 8 pages.
struct DeviceIoCounts {
  std::uint64_t remote_reads = 0;        // pages read from peers (prefetched ones included)
  std::uint64_t remote_read_trips = 0;
  std::uint64_t remote_writes = 0;       // pages written to peers (evictions, spills, write-around)
  std::uint64_t remote_write_trips = 0;
  std::uint64_t written_around = 0;      // of those, written straight from a request (WriteMany)
  std::uint64_t promotions = 0;          // pages read from below and kept in the local store
  std::uint64_t prefetched = 0;          // pages fetched ahead of reads into the local store
  std::uint64_t prefetch_hits = 0;       // of those, read before they left it
  std::uint64_t prefetch_wasted = 0;     // of those, dropped, rewritten or trimmed unread
  std::uint64_t read_ahead_trips = 0;    // trips that fetched ahead in the background
};

class Device final : public PageOwner {
 public:
  // REQUIRES: size_bytes is a positive multiple of kPageSize; `tiers` outlives the device.
  // The device registers itself with `tiers` for eviction scans until it is destroyed.
  // `redundancy`: what is kept of each of its pages that leave the host (see Redundancy).
  Device(std::string name, std::uint64_t size_bytes, Tiering& tiers,
         bool cache_clean_pages = true, Redundancy redundancy = {});
  // The same with its page table in `table`: PageTableBytes(size_bytes) bytes of memory the
  // caller owns and keeps for as long as the device lives (a state segment, which outlives
  // the process: docs/restart.md). `fresh`: the table is new (every page unmapped); else it
  // holds an earlier process's pages, and Recover must run before any other call.
  Device(std::string name, std::uint64_t size_bytes, Tiering& tiers, bool cache_clean_pages,
         Redundancy redundancy, void* table, bool fresh);
  ~Device() override;
  static std::uint64_t PageTableBytes(std::uint64_t size_bytes) {
    return size_bytes / kPageSize * sizeof(PageEntry);
  }

  // What Recover found.
  struct Recovery {
    std::uint64_t mapped = 0;   // pages that read as something
    std::uint64_t local = 0;
    std::uint64_t disk = 0;
    std::uint64_t remote = 0;   // pages on peers whose placements are recovered
    // Pages on peers with no placements to recover (a state without them): Recover changes
    // nothing of them; the caller refuses to go on.
    std::uint64_t unrecoverable = 0;
    // Entries naming room their store refused (out of range, or named twice): corruption.
    std::uint64_t invalid = 0;
  };
  // Rebuilds from the page table what is not kept in it: the counts, the local-page bitmap,
  // and the room each page holds in the local and disk stores (Tiering::Adopt). A local
  // page's remote copy, and a kCached page's cache entry, are dropped (the peers' sessions
  // are not recovered yet): the page stays, local and dirty or on disk. Not thread-safe;
  // before the device is used.
  Recovery Recover() noexcept;
  // The page table stays as it is when the device goes (the next process recovers it): the
  // destructor releases no page's room. A device over an external table keeps its pages
  // unless ReleasePagesOnExit is called (a device detached for good): a daemon that fails
  // half way through its start must not free what the state it opened names.
  void KeepPagesOnExit() noexcept { keep_pages_ = true; }
  void ReleasePagesOnExit() noexcept { keep_pages_ = false; }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  // Allocates every chunk of the page table now, so that no later write allocates (a
  // device serving swap must not). False when memory ran out; the device still works.
  bool AllocatePageTable() noexcept;

  const std::string& name() const { return name_; }
  bool cache_clean_pages() const { return cache_clean_pages_; }
  Redundancy redundancy() const { return redundancy_; }
  std::uint64_t size_bytes() const { return size_bytes_; }

  // Every range operation below REQUIRES offset + length <= size_bytes(); the frontend
  // validates requests before calling. Each returns 0 or a negative errno: -ENOSPC when a
  // write finds every tier full, -EIO when a store's medium failed, -ENOMEM when a page
  // table chunk cannot be allocated. On failure the range's earlier pages may already hold
  // the new data (as with a disk); pages outside the range are never touched.

  // Copies [offset, offset + out.size()) into `out`.
  int Read(std::uint64_t offset, std::span<std::byte> out) noexcept;

  // Several reads at once: each request's `result` gets what Read would return. Pages in
  // the remote tier are pinned under their locks and then fetched together, so a batch
  // of remote reads costs about one round trip instead of one each.
  struct ReadRequest {
    std::uint64_t offset = 0;
    std::span<std::byte> out;
    int result = 0;
  };
  //
  // Prefetch: when some of the batch's pages were on peers and the reads continue a run
  // (SequentialPrefetch), the pages right after the run that are on peers come in the same
  // round trip and go into the local store as clean pages (their remote copies stay), as
  // far as it has room under its high watermark. A prefetched page that is read whole is
  // dropped from the local store again (the reader, the kernel's page or swap cache,
  // keeps it now); one never read is dropped at no cost when room is needed.
  void ReadMany(std::span<ReadRequest> requests) noexcept;
  // Fetches ahead the next window that reads of trigger pages asked for (see ReadMany): a
  // reader that keeps going finds it in RAM. One window per call, one round trip at most,
  // so that a caller with requests waiting serves them in between; a caller runs it after
  // completing the requests at hand. Returns whether more windows wait.
  bool RunReadAhead() noexcept;
  // Whether RunReadAhead has something to do (a hint, no lock).
  bool ReadAheadWanted() const noexcept {
    return ahead_count_.load(std::memory_order_relaxed) > 0;
  }
  // Whether reading [offset, offset + length) needs no lower tier right now: every page is
  // unmapped, zero or in the local store. A hint (no lock is taken): a page may move
  // before the read, which then still works, at a lower tier's speed.
  bool ReadIsAtHand(std::uint64_t offset, std::uint64_t length) const noexcept;

  // Several writes at once: each request's `result` gets what Write would return. While
  // the local store is at or above its low watermark and there is a remote tier
  // (Tiering::WritesGoAround), whole pages go to the remote tier together, straight from
  // the requests' buffers (one round trip for the batch); the others are written as Write
  // does. REQUIRES: every request's data stays valid until the call returns.
  struct WriteRequest {
    std::uint64_t offset = 0;
    std::span<const std::byte> data;
    int result = 0;
  };
  void WriteMany(std::span<WriteRequest> requests) noexcept;
  // Whether WriteMany would send whole pages around the local store now (a hint).
  bool WritesGoAround() const noexcept { return tiers_.WritesGoAround(); }
  // Writes `data` at `offset`; partial pages are read-modify-written.
  int Write(std::uint64_t offset, std::span<const std::byte> data) noexcept;
  // Make [offset, offset + length) read as zeros. Whole pages become unmapped (Trim) or
  // zero pages (WriteZeroes); partial pages are read-modify-written, and one that ends up
  // all zero is treated as a whole page. Neither ever maps a page that was unmapped.
  int Trim(std::uint64_t offset, std::uint64_t length) noexcept;
  int WriteZeroes(std::uint64_t offset, std::uint64_t length) noexcept;
  // Makes earlier writes durable. Pages are in their store once a write returns and the
  // device is volatile by design, so there is nothing further to wait for.
  int Flush() noexcept { return 0; }

  DevicePageCounts Counts() const noexcept;
  DeviceIoCounts IoCounts() const noexcept;
  // The tier holding `page` now. REQUIRES: page < size_bytes() / kPageSize.
  Tier TierOf(std::uint64_t page) noexcept;

  // PageOwner: a CLOCK scan from this device's hand over its local pages; a page whose
  // referenced bit is set gets it cleared, one found clear is demoted. Skips pages whose
  // lock is busy (including the one the calling thread holds).
  std::size_t DemoteColdPages(std::size_t want) noexcept override;

 private:
  static constexpr unsigned kChunkShift = 9;  // 512 entries = one 4 KiB chunk
  static constexpr std::uint64_t kChunkPages = std::uint64_t{1} << kChunkShift;
  static constexpr std::size_t kLockStripes = 1024;

  struct alignas(64) Stripe {
    std::mutex mu;
  };

  // One page-table entry. `where` is atomic so that the eviction scan may look at it
  // before taking the page's lock; both fields change only under that lock.
  struct PageEntry {
    std::atomic<std::uint64_t> where{0};
    Slot disk_copy = kNoCopy;  // a clean kLocal page's, or a kCached page's, disk slot
  };

  // Returns the entry for `page`, allocating its chunk if `create`; nullptr if the chunk
  // does not exist (and !create) or cannot be allocated.
  PageEntry* Entry(std::uint64_t page, bool create) noexcept;
  std::mutex& LockFor(std::uint64_t page) noexcept {
    return stripes_[page & (kLockStripes - 1)].mu;
  }
  // Locks a page's stripe and records it as held by this thread, so that an eviction
  // scan this thread runs (direct reclaim) never try-locks it again.
  class PageLock;
  // Replaces the page's location and disk copy under its lock, keeping the counts in step.
  void SetLocation(std::uint64_t page, PageEntry* entry, Location from, Location to,
                   Slot disk_copy = kNoCopy) noexcept;
  // Makes the page `to`, with `copy` beside it, and then releases what it held before (its
  // location's room and its copy below) that the new pair does not name.
  // REQUIRES: the page's lock is held.
  void ReleaseAndSet(std::uint64_t page, PageEntry* entry, Location to,
                     Slot copy = kNoCopy) noexcept;
  // A clean kLocal page `where` whose copy below is a remote copy leaves the local store:
  // it becomes kRemote again (nothing is copied). If the remote tier has lost that copy,
  // the page stays local (and dirty) instead; returns whether it left.
  // REQUIRES: the page's lock is held and its entry holds `where`.
  bool DropLocalCopy(std::uint64_t page, PageEntry* entry, Location where) noexcept;
  // Counts a prefetched page that goes unread (its kPrefetchedBit is set).
  void NoteUnreadPrefetch(Location where) noexcept;
  // A page of a ReadMany batch that is read from the remote tier after phase 1: of a
  // request (request < kPrefetch), or fetched ahead (request == kPrefetch).
  static constexpr std::size_t kPrefetch = ~std::size_t{0};
  struct RemoteRead {
    std::size_t request;
    std::uint64_t page;
    Location where;  // as pinned
    std::byte* dest;
    std::size_t in_page;
    std::size_t count;
    bool trigger = false;  // a prefetch that is to carry kTriggerBit
  };
  // Pins the pages of [from, from + count) that are on peers now and adds them to `reads`
  // as prefetches, the first one with the trigger. Returns how many were added.
  std::size_t AddPrefetch(std::uint64_t from, std::uint64_t count,
                          std::vector<RemoteRead>& reads) noexcept;
  // ReadMany's phases 2 and 3: fetches every page of `reads` (pinned) in one batch, gives
  // the requests' pages to their requests and puts the prefetched ones in the local store.
  // `scratch_count`: how many of them need a scratch page (partial and prefetched pages).
  void FetchPinned(std::span<ReadRequest> requests, std::vector<RemoteRead>& reads,
                   std::size_t scratch_count) noexcept;
  // Notes a window to fetch in the background (RunReadAhead).
  void QueueReadAhead(SequentialPrefetch::Range range) noexcept;
  // Copies the whole page into `out` from whatever tier holds it. A kCached page whose
  // cache entry is gone is read from its disk copy, and becomes kDisk. Sets *where to
  // where the page was read from. REQUIRES: the page's lock is held; entry may be null.
  int LoadLocked(std::uint64_t page, PageEntry* entry, PageSpan out, Location* where) noexcept;
  // Before a page's contents change: a clean page becomes dirty (its disk copy goes), and
  // a kCached page becomes plain kDisk (its cache entry goes). REQUIRES: the lock is held.
  void MakeDirty(std::uint64_t page, PageEntry* entry) noexcept;
  // The first page at or after `from` whose local bit is set, or page_count_ if none.
  std::uint64_t NextLocalPage(std::uint64_t from) const noexcept;
  // Reads [in_page, in_page + count) of one page into `dest`, from whatever tier holds
  // it, then marks it used (and may promote it). REQUIRES: the page's lock is held.
  int ReadPageLocked(std::uint64_t page, PageEntry* entry, std::size_t in_page,
                     std::size_t count, std::byte* dest) noexcept;
  // After a read of the whole page `contents` from `where`: promotes a lower-tier page
  // when the local store has room, and sets the referenced bit.
  // REQUIRES: the page's lock is held and its entry still holds `where`.
  void FinishRead(std::uint64_t page, PageEntry* entry, Location where,
                  const std::byte* contents) noexcept;
  // Writes one page whose full new contents are in `page`.
  // REQUIRES: the page's stripe lock is held.
  int StorePageLocked(std::uint64_t page, ConstPageSpan contents) noexcept;
  // Makes one whole page read as zeros, as `zero_state` (kUnmapped or kZero).
  int ZeroPage(std::uint64_t page, Tier zero_state) noexcept;
  // Zeroes [in_page, in_page + count) of one page, keeping its other bytes. A page that
  // already reads as zeros is left as it is; one that becomes all zeros takes
  // `zero_state`.
  int ZeroPartialPage(std::uint64_t page, std::size_t in_page, std::size_t count,
                      Tier zero_state) noexcept;
  int ZeroRange(std::uint64_t offset, std::uint64_t length, Tier zero_state) noexcept;

  // Constant after construction.
  const std::string name_;
  const std::uint64_t size_bytes_;
  const std::uint64_t page_count_;
  Tiering& tiers_;
  const bool cache_clean_pages_;
  const Redundancy redundancy_;
  // Top level; a null pointer is a chunk whose pages are all unmapped. Chunks are created
  // with a compare-and-swap and live until the device is destroyed.
  std::unique_ptr<std::atomic<PageEntry*>[]> chunks_;
  const bool external_table_ = false;  // chunks_ point into memory the caller owns
  bool keep_pages_ = false;            // KeepPagesOnExit

  std::array<Stripe, kLockStripes> stripes_;
  std::atomic<std::uint64_t> clock_hand_{0};
  std::array<std::atomic<std::int64_t>, kTierCount> tier_pages_{};
  std::atomic<std::int64_t> clean_pages_{0};  // kLocal pages with a disk copy
  std::atomic<std::int64_t> remote_copy_pages_{0};  // kLocal pages with a remote copy
  // DeviceIoCounts, as atomics (relaxed: figures for status, not for synchronisation).
  struct IoCounters {
    std::atomic<std::uint64_t> remote_reads{0};
    std::atomic<std::uint64_t> remote_read_trips{0};
    std::atomic<std::uint64_t> remote_writes{0};
    std::atomic<std::uint64_t> remote_write_trips{0};
    std::atomic<std::uint64_t> written_around{0};
    std::atomic<std::uint64_t> promotions{0};
    std::atomic<std::uint64_t> prefetched{0};
    std::atomic<std::uint64_t> read_ahead_trips{0};
  };
  IoCounters io_;
  SequentialPrefetch prefetch_;
  // Windows to fetch in the background. A leaf lock; when full, the oldest is forgotten.
  static constexpr std::size_t kMaxReadAhead = 8;
  std::mutex ahead_mu_;
  std::array<SequentialPrefetch::Range, kMaxReadAhead> ahead_{};  // guarded by ahead_mu_
  std::atomic<unsigned> ahead_count_{0};  // changed under ahead_mu_
  // One bit per page, set while the page is kLocal (changed under the page's lock), so
  // the eviction scan skips 64 pages that are elsewhere with one load: on a big device
  // whose pages are mostly remote, local pages are rare.
  std::unique_ptr<std::atomic<std::uint64_t>[]> local_bits_;
};

}  // namespace memlend
