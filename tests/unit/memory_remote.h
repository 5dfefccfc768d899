// A remote tier in memory for unit tests of Device and Tiering.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <set>
#include <vector>

#include "memlend/page_store.h"

namespace memlend::testing {

// A remote tier in memory: keeps pages by slot, honours pins (a discard of a pinned slot
// takes effect at the last unpin), can mark a slot lost, and counts its batches.
class MemoryRemote final : public PageStore {
 public:
  int Write(ConstPageSpan page, std::uint64_t, Slot* slot) noexcept override {
    std::lock_guard lock(mu_);
    *slot = next_++;
    pages_[*slot].assign(page.begin(), page.end());
    ++pages_written;
    return 0;
  }
  void WriteBatch(std::span<const std::byte* const> pages, std::span<const std::uint64_t> hints,
                  std::span<Slot> slots, std::span<int> results) noexcept override {
    {
      std::lock_guard lock(mu_);
      ++write_batches;
    }
    PageStore::WriteBatch(pages, hints, slots, results);
  }
  int Read(Slot slot, PageSpan out) noexcept override {
    std::lock_guard lock(mu_);
    ++pages_read;
    const auto it = pages_.find(slot);
    if (it == pages_.end() || lost_.count(slot) != 0) return -EIO;
    std::copy(it->second.begin(), it->second.end(), out.begin());
    return 0;
  }
  void ReadBatch(std::span<const Slot> slots, std::span<std::byte* const> outs,
                 std::span<int> results) noexcept override {
    {
      std::lock_guard lock(mu_);
      ++read_batches;
    }
    PageStore::ReadBatch(slots, outs, results);
  }
  void Pin(Slot slot) noexcept override {
    std::lock_guard lock(mu_);
    ++pins_[slot];
  }
  void Unpin(Slot slot) noexcept override {
    std::lock_guard lock(mu_);
    if (--pins_[slot] > 0) return;
    pins_.erase(slot);
    if (discarded_.erase(slot) != 0) pages_.erase(slot);
  }
  bool Holds(Slot slot) const noexcept override {
    std::lock_guard lock(mu_);
    return pages_.count(slot) != 0 && lost_.count(slot) == 0;
  }
  void Discard(Slot slot) noexcept override {
    std::lock_guard lock(mu_);
    REQUIRE(pages_.count(slot) == 1);
    if (pins_.count(slot) != 0) {
      discarded_.insert(slot);
      return;
    }
    pages_.erase(slot);
    lost_.erase(slot);
  }
  StoreStats Stats() const noexcept override {
    std::lock_guard lock(mu_);
    StoreStats stats;
    stats.pages = pages_.size() - discarded_.size();
    return stats;
  }
  // Marks every page held now as lost (its lender died).
  void LoseAll() {
    std::lock_guard lock(mu_);
    for (const auto& [slot, bytes] : pages_) lost_.insert(slot);
  }
  std::size_t live() const { return Stats().pages; }

  // Counters, read by the test while nothing else runs.
  int read_batches = 0;
  int write_batches = 0;
  std::uint64_t pages_read = 0;
  std::uint64_t pages_written = 0;

 private:
  mutable std::mutex mu_;
  std::map<Slot, std::vector<std::byte>> pages_;
  std::map<Slot, int> pins_;
  std::set<Slot> discarded_;
  std::set<Slot> lost_;
  Slot next_ = 1;
};

}  // namespace memlend::testing
