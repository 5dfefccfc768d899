// How the remote tier's slots name a page on a peer (docs/remote-tier.md).
//
// Passive slot: session generation (7) | peer index (8) | SID (32) | page index (9), 56
// bits. The generation makes a slot of a session that ended (a lender that restarted hands
// out the same SIDs again) read as lost, never as another page's bytes.
//
// Cache slot (the ephemeral cache): generation (7) | peer index (8) | key (41), the key
// taking the bits a passive slot gives to SID and page index.
#pragma once

#include <cstddef>
#include <cstdint>

#include "memlend/page_store.h"
#include "peer/wire.h"

namespace memlend::peer {

inline constexpr unsigned kSlotIndexBits = 9;  // 512 pages per superpage
inline constexpr unsigned kSlotSidBits = 32;
inline constexpr unsigned kSlotPeerBits = 8;
inline constexpr unsigned kGenerationShift = kSlotIndexBits + kSlotSidBits + kSlotPeerBits;
inline constexpr unsigned kGenerationMask = 0x7f;  // the 7 slot bits left
static_assert(1u << kSlotIndexBits == kPagesPerSuperpage);
static_assert(kGenerationShift + 7 == kSlotBits);

inline Slot MakeSlot(std::size_t peer, unsigned generation, std::uint32_t sid,
                     std::uint32_t index) {
  return Slot{generation & kGenerationMask} << kGenerationShift |
         Slot{peer} << (kSlotIndexBits + kSlotSidBits) | Slot{sid} << kSlotIndexBits | index;
}

struct SlotParts {
  std::size_t peer;
  std::uint32_t sid;
  std::uint32_t index;
};
inline SlotParts SplitSlot(Slot slot) {
  return {static_cast<std::size_t>((slot >> (kSlotIndexBits + kSlotSidBits)) & 0xff),
          static_cast<std::uint32_t>(slot >> kSlotIndexBits),
          static_cast<std::uint32_t>(slot & (kPagesPerSuperpage - 1))};
}

inline unsigned GenerationOf(Slot slot) {
  return static_cast<unsigned>(slot >> kGenerationShift) & kGenerationMask;
}

// The generation after `generation`, for a new session or one that ended.
inline unsigned NextGeneration(unsigned generation) { return (generation + 1) & kGenerationMask; }

inline constexpr unsigned kCacheKeyBits = kSlotIndexBits + kSlotSidBits;
inline constexpr std::uint64_t kCacheKeyMask = (std::uint64_t{1} << kCacheKeyBits) - 1;

inline Slot MakeCacheSlot(std::size_t peer, unsigned generation, std::uint64_t key) {
  return Slot{generation & kGenerationMask} << kGenerationShift | Slot{peer} << kCacheKeyBits |
         (key & kCacheKeyMask);
}
inline std::size_t CachePeerOf(Slot slot) {
  return static_cast<std::size_t>((slot >> kCacheKeyBits) & 0xff);
}

}  // namespace memlend::peer
