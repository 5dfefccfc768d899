// LenderPool: the memory a lender lends and every rule about who may touch which part of
// it. No sockets: LenderService (lender_service.h) decodes requests and calls in here, and
// the unit tests call in directly. docs/peer-protocol.md is the behaviour this implements.
//
// Design. The pool is one anonymous mapping, aligned to and cut into 2 MiB superpages
// (madvised for transparent huge pages). Each superpage is in one of four states:
//   free     on the free stack;
//   granted  to one session for the passive protocol (ALLOC_SUPERPAGE), named by a SID;
//   active   carved into 512 slots of 4 KiB for the active protocol (PUT/GET) of any
//            session, and back to free when its last slot empties;
//   retired  out of service while the pool is smaller than its mapping (see Resizing).
// SIDs are a counter: increasing, never reused while the pool lives, so a stale SID can
// never name someone else's superpage. A superpage is zeroed (ZeroMemory) when it is
// granted, so a borrower never reads what an earlier borrower left there; active slots
// need no zeroing because a PUT overwrites the whole slot before anyone can GET it.
//
// Two kinds of data, two protocols. Pages that are a borrower's only copy live in granted
// superpages: the lender never drops them (a shrink asks for them back and waits). The
// active protocol holds *ephemeral* pages only: a cache of clean pages that have a copy on
// the borrower's disk (PUT with the EPHEMERAL flag; a PUT without it is refused, see
// docs/placement.md for why there are no persistent active pools), and the memory always
// yields to granted superpages. An ALLOC_SUPERPAGE takes a free superpage, else *reclaims*
// an active one: the active superpage with the fewest used slots (the least cached data
// lost, the fewest notices to send), each of its pages evicted and reported, the superpage
// made free and then taken. A PUT takes a free slot of an active superpage, else a free
// superpage (ALLOC can take it back), else evicts the oldest page of any session (at most
// one page: one freed slot is all a PUT needs). Every eviction is reported through the
// eviction handler so each owner can be told. QUERY counts the pages of active superpages
// (used or not) as free: any allocation may evict them. Stats keeps the honest figure
// apart: used_bytes still includes cached pages, and ephemeral_pages says how many of
// them there are.
//
// Active pages are kept per (session, pool) in hash maps, and on one FIFO across all
// sessions, ordered by their last PUT; each slot of an active superpage keeps its page's
// FIFO position (8 bytes), which names the owner and handle, so a reclaim can find every
// page of a superpage without a search. A PUT to a handle that already holds a page
// rewrites its slot in place, so it never needs room.
//
// Locking. One mutex guards all metadata. Passive WRITE and READ look up the superpage's
// address under the lock and copy after releasing it. That is safe because only the owning
// session can free a superpage, and a session's requests are served one at a time by its
// own thread (REQUIRES below), so nothing can free the memory while its own copy is in
// flight. Active pages can be evicted by any session's request at any moment, so their
// copies stay under the lock (4 KiB, well under a microsecond). The eviction handler runs
// after the lock is released. Alternatives: sharding the metadata by superpage (the local
// store's approach) would let sessions allocate in parallel, but a lender serves a handful
// of borrowers and its per-request cost is dominated by the network, so one lock is kept
// until a benchmark shows contention. Choosing what to reclaim scans the active
// superpages (a bucket per used-slot count would make it O(1)); the scan is cheaper than
// the up to 512 evictions that follow it. Known weakness: a freed superpage keeps its old
// contents resident until it is granted again (or retired).
//
// Resizing (Resize: `memlend lend --size`, and the daemon's --reclaim-below watch). The
// mapping keeps the size the pool was made with, its most; the pool's *size* is how many of
// its superpages are in service, and the others are *retired*: their memory is handed back
// to the host (munlock, MADV_DONTNEED) and no one can be granted them. Shrinking retires
// free superpages at once, then empties active superpages (their cached pages are evicted
// and reported, as for an allocation) and retires those, and last asks borrowers for
// granted superpages back: Resize returns which, per session, for RECLAIM notices; each
// retires when its borrower frees it (or its session ends). A granted superpage is never
// taken from its borrower: what it holds comes back until the borrower gives it up.
// Growing puts retired superpages back in service (locked again when the pool's memory is
// locked: SetLockMemory). Resize takes the pool's lock for 32 superpages' work at a time
// (each an mlock, a munlock + madvise, or up to 512 evictions), so sessions are served
// between, however large the change.
//
// Metadata: about 100 bytes per superpage, plus 4 KiB (8 bytes a slot) for each
// superpage that has ever been active, kept for reuse; per active page about 110 bytes (a
// hash map node and a FIFO node).
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "peer/wire.h"

namespace memlend::peer {

// Names one borrower connection. LenderService assigns them, starting at 1.
using SessionId = std::uint64_t;
inline constexpr SessionId kNoSession = 0;

struct LenderPoolStats {
  std::uint64_t total_pages = 0;      // pages of the superpages in service (not retired)
  std::uint64_t target_pages = 0;     // what Resize asked for (total_pages once reached)
  std::uint64_t max_pages = 0;        // the mapping's: the most Resize can grow to
  std::uint64_t reclaiming_pages = 0; // pages of granted superpages asked back, not yet freed
  // What QUERY reports as free: pages in free and active superpages (any allocation may
  // evict active pages). That is, total_pages minus granted superpages' pages.
  std::uint64_t free_pages = 0;
  std::uint64_t caller_pages = 0;     // pages the session passed to Stats() holds
  std::uint32_t borrowers = 0;        // sessions holding any memory
  std::uint64_t ephemeral_pages = 0;  // ephemeral pages stored, of every session
  // Bytes holding data now: granted superpages and ephemeral pages. Equals
  // (total_pages - free_pages + ephemeral_pages) * kPageBytes.
  std::uint64_t used_bytes = 0;
};

// Granted superpages a borrower is asked to give back (a RECLAIM notice).
struct ReclaimRequest {
  SessionId owner;
  std::vector<std::uint32_t> sids;
};

// One page the pool dropped: `owner` lost the ephemeral page `handle`.
struct Eviction {
  SessionId owner;
  HandleBody handle;
};

class LenderPool {
 public:
  // The most pools (of the active protocol) one session may have at once: each costs
  // metadata whether it holds pages or not, and a borrower needs one or two.
  static constexpr std::size_t kMaxPoolsPerSession = 64;

  // Called after a request (PUT or ALLOC_SUPERPAGE) evicted ephemeral pages, once per
  // request with all of them (one page, or the up to 512 of a reclaimed superpage, of one
  // or more owners). Runs on the thread of that request, with no pool lock held, before
  // the request returns; it may call the pool, must not throw, and may name owners that
  // were released meanwhile (it should skip those). `evictions` is valid for the call only.
  using EvictionHandler = std::function<void(std::span<const Eviction> evictions)>;

  // Maps `pool_bytes` rounded down to whole superpages. Throws std::invalid_argument if
  // that is less than one superpage, std::system_error if the mapping fails.
  explicit LenderPool(std::uint64_t pool_bytes);
  ~LenderPool();
  LenderPool(const LenderPool&) = delete;
  LenderPool& operator=(const LenderPool&) = delete;

  // Sets the eviction handler. REQUIRES: no other call in progress (set it before use).
  void SetEvictionHandler(EvictionHandler handler);

  // All the calls below are thread-safe, noexcept, and return the protocol status the
  // reply should carry. REQUIRES: calls for one session are not concurrent with each
  // other (the service serves each session on one thread); calls for different sessions
  // may run in parallel.

  // Grants a superpage to `session` and sets *sid. Its contents read as zeros. Takes a
  // free superpage, else reclaims the active superpage with the fewest pages (evicting
  // and reporting them). kNoSpace when every superpage is granted (or SIDs ran out, or the
  // pool is shrinking).
  Status AllocSuperpage(SessionId session, std::uint32_t* sid) noexcept;
  // Returns superpage `sid` to the pool. kNotPermitted if it is unknown or not the
  // caller's.
  Status FreeSuperpage(SessionId session, std::uint32_t sid) noexcept;

  // Copies `data` into, or `out` from, the range of a granted superpage. Checks in the
  // protocol's order: kNotPermitted if range.sid is unknown or not the caller's; kInvalid
  // if offset or length is not a multiple of kPageBytes, length is 0, or offset + length
  // is past the superpage. REQUIRES: data.size() (out.size()) == range.length; the
  // service has checked the payload length.
  Status Write(SessionId session, const RangeBody& range,
               std::span<const std::byte> data) noexcept;
  Status Read(SessionId session, const RangeBody& range, std::span<std::byte> out) noexcept;
  // As Read and Write, without the copy: sets *at to the range's bytes in the pool, for a
  // reply sent from there or a WRITE received straight into it. They stay the session's, and
  // nobody else changes them, as long as the session's thread is on this request (only the
  // session frees or writes its superpages).
  Status Locate(SessionId session, const RangeBody& range, std::byte** at) noexcept {
    return ResolveRange(session, range, at);
  }

  // Stores the ephemeral `page` under `handle` in the caller's pool handle.pool. A handle
  // that holds a page is rewritten in place. A new page takes a free slot of an active
  // superpage, else a free superpage, else evicts the oldest page of any session
  // (reported); kNoSpace when there is nothing to evict. A PUT that would make the
  // session's kMaxPoolsPerSession + 1st pool gets kNoSpace too, and a failed PUT never
  // leaves a new pool behind. (The service refuses PUTs without the EPHEMERAL flag.)
  Status Put(SessionId session, const HandleBody& handle,
             std::span<const std::byte, kPageBytes> page) noexcept;
  // Copies the page under `handle` into `out`; kNotFound if there is none.
  Status Get(SessionId session, const HandleBody& handle,
             std::span<std::byte, kPageBytes> out) noexcept;
  // Removes the page under `handle`, if any. Always kOk.
  Status Flush(SessionId session, const HandleBody& handle) noexcept;
  // Removes the caller's pool `pool` and all its pages; its kind is forgotten. Always kOk.
  Status DestroyPool(SessionId session, std::uint32_t pool) noexcept;

  // Frees everything `session` holds: its superpages, pools and pages. Call when its
  // connection ends, or when a parked session's grace period does. With `scrub`, its
  // granted superpages are zeroed now rather than when next granted, so that what a borrower
  // that is gone kept does not stay in memory. REQUIRES: no request of `session` in progress.
  void ReleaseSession(SessionId session, bool scrub = false) noexcept;
  // The superpages `session` holds, and those of them asked back (RECLAIM) and not yet
  // freed (for a session resumed after its notices could not reach it).
  std::uint32_t SuperpagesOf(SessionId session) const noexcept;
  // Writes the ids of the superpages `session` holds into `out`, as little-endian u32s, and
  // returns how many, or nullopt (nothing written) when they do not all fit.
  std::optional<std::uint32_t> ListSuperpages(SessionId session,
                                              std::span<std::byte> out) const noexcept;
  std::vector<std::uint32_t> ReclaimingOf(SessionId session) const;

  // A consistent snapshot; caller_pages counts what `caller` holds (0 for kNoSession).
  LenderPoolStats Stats(SessionId caller = kNoSession) const noexcept;

  // Sets the pool's size to `superpages` (at most the mapping's) and does what it can at
  // once (see "Resizing" above): evictions go to the eviction handler, and the granted
  // superpages to ask back are returned, each named once across calls. May throw
  // std::bad_alloc (nothing is changed then... except what was already retired).
  std::vector<ReclaimRequest> Resize(std::uint32_t superpages);
  // Whether superpages put back in service are locked in memory (mlock), as the rest of a
  // locked daemon's memory is. REQUIRES: no other call in progress.
  void SetLockMemory(bool lock) { lock_memory_ = lock; }

  // Pages and bytes of the superpages in service now (Resize changes them).
  std::uint64_t total_pages() const {
    return std::uint64_t{live_superpages_.load(std::memory_order_relaxed)} * kPagesPerSuperpage;
  }
  std::uint64_t pool_bytes() const { return total_pages() * kPageBytes; }
  // The mapping's size: what the pool was made with.
  std::uint64_t max_bytes() const { return std::uint64_t{superpage_count_} * kSuperpageBytes; }

 private:
  static constexpr std::uint32_t kNone = ~std::uint32_t{0};
  static constexpr std::size_t kMaskWords = kPagesPerSuperpage / 64;

  // An active page's place on the eviction FIFO names its owner and handle.
  using FifoIterator = std::list<Eviction>::iterator;

  enum class State : std::uint8_t { kFree, kGranted, kActive, kRetired };
  struct SuperpageMeta {
    SessionId owner = kNoSession;  // kGranted
    // kActive: bit i set when slot i is free; its place in partial_ while any bit is set.
    std::array<std::uint64_t, kMaskWords> free_mask{};
    // kActive: entry i is the FIFO position of the page in slot i (valid while slot i is
    // used). Allocated the first time the superpage turns active and kept for reuse.
    std::unique_ptr<FifoIterator[]> fifo_of_slot;
    std::uint32_t sid = 0;  // kGranted
    std::uint32_t used_slots = 0;
    std::uint32_t partial_pos = kNone;
    std::uint32_t active_pos = kNone;  // kActive: its place in active_
    State state = State::kFree;
    bool reclaiming = false; // kGranted: its borrower was asked to give it back
    // Its memory may hold bytes of a borrower (it was granted or active since it was last
    // zeroed), so it is zeroed before it is granted. A fresh anonymous mapping, and memory
    // handed back to the host with MADV_DONTNEED, read as zeros already: granting such a
    // superpage costs no clearing (in the VM swap benchmark, clearing every superpage on
    // grant was a tenth of the lender's CPU).
    bool dirty = false;
  };

  struct PageKey {
    std::uint64_t object;
    std::uint32_t index;
    bool operator==(const PageKey&) const = default;
  };
  struct PageKeyHash {
    std::size_t operator()(const PageKey& key) const noexcept {
      return std::hash<std::uint64_t>()(key.object * 0x9e3779b97f4a7c15ULL ^ key.index);
    }
  };
  // A page's slot: superpage * kPagesPerSuperpage + slot within it. A page's
  // FIFO position is in its superpage's fifo_of_slot.
  using SlotNumber = std::uint32_t;
  using PageMap = std::unordered_map<PageKey, SlotNumber, PageKeyHash>;
  struct Pool {
    PageMap pages;
  };
  struct Session {
    std::unordered_set<std::uint32_t> sids;
    std::unordered_map<std::uint32_t, Pool> pools;
    std::uint64_t active_pages = 0;
    bool holds_memory() const { return !sids.empty() || active_pages > 0; }
  };

  std::byte* SlotAddress(std::uint32_t slot) const {
    return arena_ + std::uint64_t{slot} * kPageBytes;
  }
  std::byte* SuperpageAddress(std::uint32_t superpage) const {
    return arena_ + std::uint64_t{superpage} * kSuperpageBytes;
  }
  // Checks a passive request: the SID is the caller's and the range lies inside a
  // superpage. On kOk sets *at to the first byte of the range. REQUIRES: mu_ not held.
  Status ResolveRange(SessionId session, const RangeBody& range, std::byte** at) noexcept;

  // The rest REQUIRE: mu_ held.
  // Takes a free slot of an active superpage, turning a free superpage active if needed;
  // kNone if there is none (or, for the first use of
  // a superpage, no memory for its fifo_of_slot).
  SlotNumber TakeSlotLocked() noexcept;
  void ReleaseSlotLocked(SlotNumber slot) noexcept;
  FifoIterator& FifoOfSlotLocked(SlotNumber slot) noexcept {
    return superpages_[slot / kPagesPerSuperpage].fifo_of_slot[slot % kPagesPerSuperpage];
  }
  void RemovePartialLocked(std::uint32_t superpage) noexcept;
  void RemoveActiveLocked(std::uint32_t superpage) noexcept;
  // Makes an emptied superpage free, or retires it while the pool is over its size.
  void ReleaseSuperpageLocked(std::uint32_t superpage) noexcept;
  // Hands a superpage's memory back to the host and marks it retired. REQUIRES: it is
  // free and off the free stack.
  void RetireLocked(std::uint32_t superpage) noexcept;
  std::uint32_t LiveLocked() const noexcept {
    return superpage_count_ - static_cast<std::uint32_t>(retired_.size());
  }
  // Whether superpages in service exceed the size plus those asked back: a shrink has more
  // to retire, so no free superpage may be granted or filled meanwhile.
  bool ShrinkingLocked() const noexcept {
    return LiveLocked() > target_superpages_ + reclaiming_;
  }
  // Removes one page of `pool`, freeing its slot.
  void RemovePageLocked(Session& session, Pool& pool, PageMap::iterator page) noexcept;
  // Evicts the page at `fifo` and returns whom it belonged to.
  Eviction EvictLocked(FifoIterator fifo) noexcept;
  // Evicts the oldest active page. Returns false if there is none; else sets *evicted.
  bool EvictOldestLocked(Eviction* evicted) noexcept;
  // Empties the active superpage with the fewest used slots, evicting its pages into
  // evicted[0..n), and returns n; the superpage is then on the free stack (on top). 0 if
  // there is no active superpage.
  std::size_t ReclaimActiveLocked(std::span<Eviction, kPagesPerSuperpage> evicted) noexcept;
  // Reports evictions to the handler. REQUIRES: mu_ not held.
  void Report(std::span<const Eviction> evictions) const noexcept;

  // Constant after construction.
  std::byte* arena_ = nullptr;
  std::size_t mapping_bytes_ = 0;
  std::uint32_t superpage_count_ = 0;
  EvictionHandler on_evicted_;  // set before use
  bool lock_memory_ = false;    // set before use

  mutable std::mutex mu_;
  // Everything below is guarded by mu_.
  std::vector<SuperpageMeta> superpages_;
  std::vector<std::uint32_t> free_superpages_;  // a stack; lowest index on top at first
  std::vector<std::uint32_t> partial_;    // active superpages with a free slot
  std::vector<std::uint32_t> active_;     // every active superpage
  std::uint64_t active_free_slots_ = 0;   // free slots in active superpages
  std::uint64_t ephemeral_pages_ = 0;     // used slots of active superpages
  std::unordered_map<std::uint32_t, std::uint32_t> grants_;  // SID -> superpage
  std::uint64_t next_sid_ = 1;
  std::unordered_map<SessionId, Session> sessions_;
  std::list<Eviction> fifo_;  // active pages, oldest PUT first
  std::uint32_t target_superpages_ = 0;    // the size Resize asked for
  std::vector<std::uint32_t> retired_;     // superpages out of service (capacity reserved)
  std::uint32_t reclaiming_ = 0;           // granted superpages with `reclaiming` set
  std::atomic<std::uint32_t> live_superpages_{0};  // superpage_count_ - retired_.size()
};

}  // namespace memlend::peer
