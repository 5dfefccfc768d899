// SlotAllocator: a session's superpages, their free slots, the reverse index (owners),
// superpages asked back, and pins.

#include <doctest/doctest.h>

#include <cstdint>
#include <set>
#include <utility>
#include <vector>

#include "peer/slot_allocator.h"

namespace memlend::peer {
namespace {

using Released = SlotAllocator::Released;

// Every taken slot as (sid, index) -> owner, through ForEachTaken.
std::vector<std::pair<std::uint64_t, std::uint32_t>> Taken(const SlotAllocator& slots,
                                                           bool reclaimed_only) {
  std::vector<std::pair<std::uint64_t, std::uint32_t>> all;
  slots.ForEachTaken(reclaimed_only, [&](std::uint32_t sid, std::uint32_t index,
                                         std::uint32_t owner, bool) {
    all.emplace_back(std::uint64_t{sid} << 9 | index, owner);
    return true;
  });
  return all;
}

TEST_CASE("slot allocator: a granted superpage gives 512 distinct slots, then asks for more") {
  SlotAllocator slots;
  std::uint32_t sid = 0;
  std::uint32_t index = 0;
  CHECK_FALSE(slots.Take(1, &sid, &index));  // nothing granted yet
  REQUIRE(slots.AddGranted(7, 100));
  CHECK(slots.free_slots() == kPagesPerSuperpage - 1);
  std::set<std::uint32_t> seen = {0};
  for (std::uint32_t i = 1; i < kPagesPerSuperpage; ++i) {
    REQUIRE(slots.Take(100 + i, &sid, &index));
    CHECK(sid == 7);
    CHECK(seen.insert(index).second);
  }
  CHECK(slots.free_slots() == 0);
  CHECK_FALSE(slots.Take(1, &sid, &index));
  CHECK_FALSE(slots.AddGranted(7, 1));  // one SID granted twice is refused
  // The reverse index names each slot's owner.
  const auto taken = Taken(slots, false);
  REQUIRE(taken.size() == kPagesPerSuperpage);
  for (const auto& [key, owner] : taken) CHECK(owner == 100 + (key & 511));

  // Freeing one slot makes it the next taken; freeing all gives the superpage back.
  CHECK(slots.Release(7, 42) == Released::kInUse);
  CHECK(slots.free_slots() == 1);
  REQUIRE(slots.Take(5, &sid, &index));
  CHECK((sid == 7 && index == 42));
  for (std::uint32_t i = 0; i < kPagesPerSuperpage - 1; ++i) {
    CHECK(slots.Release(7, i) == Released::kInUse);
  }
  CHECK(slots.Release(7, kPagesPerSuperpage - 1) == Released::kEmptied);
  CHECK(slots.superpages() == 0);
  CHECK(slots.free_slots() == 0);
  CHECK(slots.Release(7, 0) == Released::kNotHeld);
  CHECK(slots.idle());
}

TEST_CASE("slot allocator: a superpage asked back takes no new page and empties as reclaimed") {
  SlotAllocator slots;
  REQUIRE(slots.AddGranted(1, 10));
  REQUIRE(slots.AddGranted(2, 20));
  std::uint32_t sid = 0;
  std::uint32_t index = 0;
  REQUIRE(slots.Take(21, &sid, &index));
  CHECK(sid == 2);  // the newest superpage is filled first
  CHECK(slots.free_slots() == 2 * kPagesPerSuperpage - 3);

  const std::uint32_t asked[] = {2, 99};  // 99 was never granted
  CHECK(slots.MarkReclaimed(asked) == 1);
  CHECK(slots.MarkReclaimed(asked) == 0);  // once
  CHECK(slots.reclaimed() == 1);
  CHECK(slots.free_slots() == kPagesPerSuperpage - 1);  // only superpage 1's
  CHECK(Taken(slots, true).size() == 2);
  CHECK(Taken(slots, false).size() == 3);
  for (std::uint32_t i = 0; i < kPagesPerSuperpage - 1; ++i) {
    REQUIRE(slots.Take(30, &sid, &index));
    CHECK(sid == 1);
  }
  CHECK_FALSE(slots.Take(30, &sid, &index));
  CHECK(slots.Release(2, 0) == Released::kInUse);
  CHECK(slots.free_slots() == 0);  // a reclaimed superpage's slot is no room
  CHECK(slots.Release(2, 1) == Released::kEmptiedReclaimed);
  CHECK(slots.reclaimed() == 0);
  CHECK(slots.superpages() == 1);
}

TEST_CASE("slot allocator: a pinned slot released is released at its last unpin") {
  SlotAllocator slots;
  REQUIRE(slots.AddGranted(3, 1));
  CHECK_FALSE(slots.Defer(3, 0));  // not pinned: release now
  REQUIRE(slots.Pin(3, 0));
  REQUIRE(slots.Pin(3, 0));
  CHECK_FALSE(slots.idle());
  CHECK(slots.Defer(3, 0));
  CHECK_FALSE(slots.Unpin(3, 0));  // one reader left
  CHECK(slots.Unpin(3, 0));        // the last: release it now
  CHECK_FALSE(slots.Unpin(3, 0));  // no pin left
  REQUIRE(slots.Pin(3, 0));
  CHECK_FALSE(slots.Unpin(3, 0));  // pinned, never discarded: nothing to release
  slots.Clear();
  CHECK(slots.idle());
  CHECK(slots.free_slots() == 0);
}

}  // namespace
}  // namespace memlend::peer
