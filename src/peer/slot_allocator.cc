#include "peer/slot_allocator.h"

#include <bit>
#include <cassert>
#include <new>

namespace memlend::peer {

bool SlotAllocator::Take(std::uint32_t owner, std::uint32_t* sid, std::uint32_t* index) noexcept {
  while (!partial_.empty()) {
    const std::uint32_t candidate = partial_.back();
    const auto it = superpages_.find(candidate);
    if (it == superpages_.end() || it->second.used == kPagesPerSuperpage ||
        it->second.reclaimed) {
      partial_.pop_back();  // stale entry, or a superpage its lender wants back
      continue;
    }
    Superpage& superpage = it->second;
    for (std::uint32_t word = 0; word < kPagesPerSuperpage / 64; ++word) {
      if (superpage.used_mask[word] == ~std::uint64_t{0}) continue;
      const auto bit = static_cast<std::uint32_t>(std::countr_one(superpage.used_mask[word]));
      superpage.used_mask[word] |= std::uint64_t{1} << bit;
      ++superpage.used;
      --free_slots_;
      if (superpage.used == kPagesPerSuperpage) partial_.pop_back();
      *sid = candidate;
      *index = word * 64 + bit;
      superpage.owner[*index] = owner;
      return true;
    }
  }
  return false;
}

bool SlotAllocator::AddGranted(std::uint32_t sid, std::uint32_t owner) noexcept {
  try {
    const auto [it, added] = superpages_.try_emplace(sid);
    if (!added) return false;  // a lender that grants one SID twice: use neither twice
    partial_.push_back(sid);
    Superpage& superpage = it->second;
    superpage.used_mask[0] = 1;
    superpage.used = 1;
    superpage.owner[0] = owner;
    free_slots_ += kPagesPerSuperpage - 1;
    return true;
  } catch (const std::bad_alloc&) {
    superpages_.erase(sid);
    return false;
  }
}

bool SlotAllocator::Adopt(std::uint32_t sid, std::uint32_t index, std::uint32_t owner) noexcept {
  if (index >= kPagesPerSuperpage) return false;
  try {
    const auto [it, added] = superpages_.try_emplace(sid);
    Superpage& superpage = it->second;
    if (added) {
      partial_.push_back(sid);
      free_slots_ += kPagesPerSuperpage;
    }
    const std::uint64_t bit = std::uint64_t{1} << (index % 64);
    if (superpage.used_mask[index / 64] & bit) return false;
    superpage.used_mask[index / 64] |= bit;
    ++superpage.used;
    --free_slots_;
    superpage.owner[index] = owner;
    return true;
  } catch (const std::bad_alloc&) {
    return false;
  }
}

SlotAllocator::Released SlotAllocator::Release(std::uint32_t sid, std::uint32_t index) noexcept {
  const auto it = superpages_.find(sid);
  if (it == superpages_.end()) return Released::kNotHeld;
  Superpage& superpage = it->second;
  const std::uint64_t bit = std::uint64_t{1} << (index % 64);
  assert(superpage.used_mask[index / 64] & bit);
  superpage.used_mask[index / 64] &= ~bit;
  // A reclaimed superpage's slots are not free for new pages: it goes back once empty.
  if (!superpage.reclaimed) ++free_slots_;
  if (--superpage.used > 0) {
    if (superpage.used == kPagesPerSuperpage - 1 && !superpage.reclaimed) {
      try {
        partial_.push_back(sid);
      } catch (const std::bad_alloc&) {
        // Its free slot is used once another entry leads Take here, or never: no harm.
      }
    }
    return Released::kInUse;
  }
  const bool reclaimed = superpage.reclaimed;
  if (reclaimed) {
    --reclaimed_;
  } else {
    free_slots_ -= kPagesPerSuperpage;
  }
  superpages_.erase(it);
  return reclaimed ? Released::kEmptiedReclaimed : Released::kEmptied;
}

std::size_t SlotAllocator::MarkReclaimed(std::span<const std::uint32_t> sids) noexcept {
  std::size_t marked = 0;
  for (const std::uint32_t sid : sids) {
    const auto it = superpages_.find(sid);
    if (it == superpages_.end() || it->second.reclaimed) continue;  // freed already, say
    it->second.reclaimed = true;
    ++reclaimed_;
    free_slots_ -= kPagesPerSuperpage - it->second.used;
    ++marked;
  }
  return marked;
}

bool SlotAllocator::Pin(std::uint32_t sid, std::uint32_t index) noexcept {
  try {
    ++pins_[PinKey(sid, index)].count;
    return true;
  } catch (const std::bad_alloc&) {
    return false;
  }
}

bool SlotAllocator::Defer(std::uint32_t sid, std::uint32_t index) noexcept {
  const auto it = pins_.find(PinKey(sid, index));
  if (it == pins_.end()) return false;
  it->second.discarded = true;
  return true;
}

bool SlotAllocator::Unpin(std::uint32_t sid, std::uint32_t index) noexcept {
  const auto it = pins_.find(PinKey(sid, index));
  if (it == pins_.end()) return false;
  if (--it->second.count > 0) return false;
  const bool release = it->second.discarded;
  pins_.erase(it);
  return release;
}

void SlotAllocator::Clear() noexcept {
  superpages_.clear();
  partial_.clear();
  free_slots_ = 0;
  reclaimed_ = 0;
  pins_.clear();
}

}  // namespace memlend::peer
