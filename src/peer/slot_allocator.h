// SlotAllocator: the superpages one session was granted, and which of their 4 KiB slots
// hold pages (docs/remote-tier.md, "Parts and what each owns").
//
// Per superpage: a bitmap of used slots and, for each used slot, the owner its writer gave
// it (the reverse index: the placement id using the slot, so that every page on a peer is a
// walk over its superpages). A superpage its lender asked back (RECLAIM) is *reclaimed*: no
// new slot is taken there, and its free slots are not counted as room. Pins keep a slot
// from being reused while a batched read may still fetch it.
//
// Not thread-safe: its peer's lock guards it (Membership::Member::mu). It holds no lock,
// sends nothing and never blocks; giving an emptied superpage back is the caller's job.
#pragma once

#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "peer/wire.h"

namespace memlend::peer {

class SlotAllocator {
 public:
  // Takes a free slot of a held superpage that is not reclaimed, for `owner`. Returns false
  // when there is none (the caller asks the lender for another superpage).
  bool Take(std::uint32_t owner, std::uint32_t* sid, std::uint32_t* index) noexcept;
  // Adds a superpage just granted and takes its first slot for `owner`. Returns false when
  // out of memory, or when `sid` is held already (a lender that granted it twice); the
  // superpage then stays granted and unused until the session ends.
  bool AddGranted(std::uint32_t sid, std::uint32_t owner) noexcept;
  // Recovery (docs/restart.md): marks slot `index` of superpage `sid` taken for `owner`,
  // adding the superpage if it is not held yet. False if the slot is taken already, or out
  // of memory.
  bool Adopt(std::uint32_t sid, std::uint32_t index, std::uint32_t owner) noexcept;

  enum class Released {
    kNotHeld,           // no such superpage (it went with a session that ended)
    kInUse,             // the superpage still holds pages
    kEmptied,           // the superpage is empty and forgotten: give it back
    kEmptiedReclaimed,  // the same, for one its lender asked back (no room comes of it)
  };
  // Frees a taken slot. REQUIRES: the slot is taken.
  Released Release(std::uint32_t sid, std::uint32_t index) noexcept;

  // Marks the held superpages among `sids` reclaimed; returns how many were newly marked.
  std::size_t MarkReclaimed(std::span<const std::uint32_t> sids) noexcept;

  // Calls fn(sid, index, owner, reclaimed) for every taken slot, or only for those of
  // reclaimed superpages; stops early when fn returns false.
  template <typename Fn>
  void ForEachTaken(bool reclaimed_only, Fn fn) const {
    for (const auto& [sid, superpage] : superpages_) {
      if (reclaimed_only && !superpage.reclaimed) continue;
      for (std::uint32_t page = 0; page < kPagesPerSuperpage; ++page) {
        if ((superpage.used_mask[page / 64] >> (page % 64) & 1) == 0) continue;
        if (!fn(sid, page, superpage.owner[page], superpage.reclaimed)) return;
      }
    }
  }

  // Pins: Pin counts one more reader of a taken slot. Defer(…) is Discard's question:
  // returns true (and remembers to release at the last Unpin) when the slot is pinned.
  // Unpin returns true when the slot is to be released now.
  bool Pin(std::uint32_t sid, std::uint32_t index) noexcept;
  bool Defer(std::uint32_t sid, std::uint32_t index) noexcept;
  bool Unpin(std::uint32_t sid, std::uint32_t index) noexcept;

  // Free slots of superpages that are not reclaimed: room without asking the lender.
  std::uint64_t free_slots() const noexcept { return free_slots_; }
  std::size_t superpages() const noexcept { return superpages_.size(); }
  bool Holds(std::uint32_t sid) const noexcept { return superpages_.contains(sid); }
  std::size_t reclaimed() const noexcept { return reclaimed_; }
  // Nothing held and nothing pinned.
  bool idle() const noexcept { return superpages_.empty() && pins_.empty(); }
  // Forgets everything (the session ended).
  void Clear() noexcept;

 private:
  struct Superpage {
    std::uint64_t used_mask[kPagesPerSuperpage / 64] = {};
    std::uint32_t used = 0;
    bool reclaimed = false;
    std::uint32_t owner[kPagesPerSuperpage] = {};
  };
  struct PinState {
    std::uint32_t count = 0;
    bool discarded = false;  // released while pinned: release at the last Unpin
  };
  static std::uint64_t PinKey(std::uint32_t sid, std::uint32_t index) {
    return std::uint64_t{sid} << 9 | index;
  }

  std::unordered_map<std::uint32_t, Superpage> superpages_;
  std::vector<std::uint32_t> partial_;  // SIDs that may have a free slot (may be stale)
  std::uint64_t free_slots_ = 0;
  std::size_t reclaimed_ = 0;
  std::unordered_map<std::uint64_t, PinState> pins_;
};

}  // namespace memlend::peer
