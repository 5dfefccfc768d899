// LenderPool: the memory a lender lends and every rule about who may touch which part of
// it. No sockets: LenderService (lender_service.h) decodes requests and calls in here, and
// the unit tests call in directly. docs/peer-protocol.md is the behaviour this implements.
//
// Design. The pool is one anonymous mapping, aligned to and cut into 2 MiB superpages
// (madvised for transparent huge pages). Each superpage is in one of three states:
//   free     on the free stack;
//   granted  to one session for the passive protocol (ALLOC_SUPERPAGE), named by a SID;
//   active   carved into 512 slots of 4 KiB for the active protocol (PUT/GET), shared by
//            every session's pools; it goes back to free when its last slot empties.
// SIDs are a counter: increasing, never reused while the pool lives, so a stale SID can
// never name someone else's superpage. A superpage is zeroed (MADV_DONTNEED) when it is
// granted, so a borrower never reads what an earlier borrower left there; active slots
// need no zeroing because a PUT overwrites the whole slot before anyone can GET it.
//
// Active pages are kept per (session, pool) in hash maps. Ephemeral pages also sit on one
// FIFO across all sessions, ordered by their last PUT; a PUT that finds no free slot and
// no free superpage evicts the front of that FIFO (at most one page: one freed slot is
// all a PUT needs) and reports it through the eviction handler so the owner can be told.
// A PUT to a handle that already holds a page rewrites its slot in place, so it never
// needs room; the protocol's "a failed PUT removes the old page" therefore applies to the
// refusals a rewrite can still meet (a PUT whose kind disagrees with the pool's).
//
// Locking. One mutex guards all metadata. Copies of page data happen outside it where
// that is safe: a passive WRITE or READ looks up the superpage's address under the lock
// and copies after releasing it, and so does a GET or PUT of a persistent page. That is
// safe because only the owning session can free a superpage or a persistent page, and a
// session's requests are served one at a time by its own thread (REQUIRES below), so
// nothing can free the memory while its own copy is in flight. Ephemeral pages can be
// evicted by any session's PUT at any moment, so their copies stay under the lock
// (4 KiB, well under a microsecond). Alternatives: sharding the metadata by superpage
// (the local store's approach) would let sessions allocate in parallel, but a lender
// serves a handful of borrowers and its per-request cost is dominated by the network, so
// one lock is kept until a benchmark shows contention. Known weaknesses: ALLOC_SUPERPAGE
// does not evict ephemeral pages to empty a superpage, so a lender whose pool is full of
// ephemeral pages refuses passive allocations until those superpages empty; a freed
// superpage keeps its old contents resident until it is granted again.
//
// Metadata: about 100 bytes per superpage, and per active page about 60 bytes (persistent)
// or 100 bytes (ephemeral: it is also on the FIFO).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <mutex>
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
  std::uint64_t total_pages = 0;
  std::uint64_t free_pages = 0;    // pages in free superpages and free active slots
  std::uint64_t caller_pages = 0;  // pages the session passed to Stats() holds
  std::uint32_t borrowers = 0;     // sessions holding any memory
  std::uint64_t used_bytes = 0;    // (total_pages - free_pages) * kPageBytes
};

class LenderPool {
 public:
  // Called after a PUT evicted an ephemeral page: `owner` lost the page `handle`. Runs on
  // the thread of the PUT that evicted it, with no pool lock held; it may call the pool,
  // must not throw, and may run after `owner` was released (then it should do nothing).
  using EvictionHandler = std::function<void(SessionId owner, const HandleBody& handle)>;

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

  // Grants a free superpage to `session` and sets *sid. Its contents read as zeros.
  // kNoSpace when no whole superpage is free (or SIDs ran out).
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

  // Stores `page` under `handle` in the caller's pool handle.pool. The first PUT into a
  // pool fixes its kind (`ephemeral` or persistent); a PUT of the other kind gets kInvalid
  // and removes any page the handle held. A handle that holds a page is rewritten in
  // place. A new page takes a free slot, else a free superpage, else the oldest ephemeral
  // page of any session is evicted (and reported); if none can be, kNoSpace.
  Status Put(SessionId session, const HandleBody& handle, bool ephemeral,
             std::span<const std::byte, kPageBytes> page) noexcept;
  // Copies the page under `handle` into `out`; kNotFound if there is none.
  Status Get(SessionId session, const HandleBody& handle,
             std::span<std::byte, kPageBytes> out) noexcept;
  // Removes the page under `handle`, if any. Always kOk.
  Status Flush(SessionId session, const HandleBody& handle) noexcept;
  // Removes the caller's pool `pool` and all its pages; its kind is forgotten. Always kOk.
  Status DestroyPool(SessionId session, std::uint32_t pool) noexcept;

  // Frees everything `session` holds: its superpages, pools and pages. Call when its
  // connection ends.
  void ReleaseSession(SessionId session) noexcept;

  // A consistent snapshot; caller_pages counts what `caller` holds (0 for kNoSession).
  LenderPoolStats Stats(SessionId caller = kNoSession) const noexcept;

  std::uint64_t total_pages() const { return std::uint64_t{superpage_count_} * kPagesPerSuperpage; }
  std::uint64_t pool_bytes() const { return std::uint64_t{superpage_count_} * kSuperpageBytes; }

 private:
  static constexpr std::uint32_t kNone = ~std::uint32_t{0};
  static constexpr std::size_t kMaskWords = kPagesPerSuperpage / 64;

  enum class State : std::uint8_t { kFree, kGranted, kActive };
  struct SuperpageMeta {
    SessionId owner = kNoSession;  // kGranted
    // kActive: bit i set when slot i is free; its place in partial_ while any bit is set.
    std::array<std::uint64_t, kMaskWords> free_mask{};
    std::uint32_t sid = 0;  // kGranted
    std::uint32_t used_slots = 0;
    std::uint32_t partial_pos = kNone;
    State state = State::kFree;
  };

  // An ephemeral page's place on the eviction FIFO.
  struct FifoEntry {
    SessionId owner;
    HandleBody handle;
  };
  using FifoIterator = std::list<FifoEntry>::iterator;

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
  struct ActivePage {
    std::uint32_t slot;
    FifoIterator fifo;  // ephemeral pools only
  };
  struct Pool {
    bool ephemeral = false;
    std::unordered_map<PageKey, ActivePage, PageKeyHash> pages;
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
  // Takes a free slot, turning a free superpage active if needed; kNone if there is none.
  std::uint32_t TakeSlotLocked() noexcept;
  void ReleaseSlotLocked(std::uint32_t slot) noexcept;
  void RemovePartialLocked(std::uint32_t superpage) noexcept;
  void ReleaseSuperpageLocked(std::uint32_t superpage) noexcept;
  // Removes one page of `pool`, freeing its slot.
  void RemovePageLocked(Session& session, Pool& pool,
                        std::unordered_map<PageKey, ActivePage, PageKeyHash>::iterator page) noexcept;
  // Evicts the oldest ephemeral page. Returns false if there is none; else sets *evicted.
  bool EvictOldestLocked(FifoEntry* evicted) noexcept;

  // Constant after construction.
  std::byte* arena_ = nullptr;
  std::size_t mapping_bytes_ = 0;
  std::uint32_t superpage_count_ = 0;
  EvictionHandler on_evicted_;  // set before use

  mutable std::mutex mu_;
  // Everything below is guarded by mu_.
  std::vector<SuperpageMeta> superpages_;
  std::vector<std::uint32_t> free_superpages_;  // a stack; lowest index on top at first
  std::vector<std::uint32_t> partial_;          // active superpages with a free slot
  std::uint64_t active_free_slots_ = 0;         // free slots in active superpages
  std::unordered_map<std::uint32_t, std::uint32_t> grants_;  // SID -> superpage
  std::uint64_t next_sid_ = 1;
  std::unordered_map<SessionId, Session> sessions_;
  std::list<FifoEntry> fifo_;  // ephemeral pages, oldest PUT first
};

}  // namespace memlend::peer
