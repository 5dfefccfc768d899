// SequentialPrefetch: decides how many pages a device fetches ahead of a read that missed
// the local store (its pages were on a peer), from the reads that missed before it.
//
// Swap-ins of a process that walks its memory, and reads of a file system on the device,
// come in runs: the kernel's own readahead asks for a cluster (8 pages for swap), then the
// next one. A miss that lands where an earlier run is heading continues that run, and the
// run's window grows (doubling from kMinPages to kMaxPages, as the kernel's file readahead
// does); a miss anywhere else starts a new run with no window, so random reads fetch
// nothing extra. kStreams runs are followed at once (several processes swapping in
// together), the least recently continued one giving way to a new run. A miss within
// kSlackPages of where a run is heading, either side, continues it: readahead clusters of
// several processes interleave, and the kernel skips pages it still holds.
//
// Fetching ahead runs ahead of the reader, as the kernel's asynchronous readahead does: the
// first page fetched of each window carries a trigger (Location::kTriggerBit, set by the
// device); when the reader reaches it, the run's next window is fetched in the background
// (OnTrigger), so a reader that keeps going finds its pages in RAM instead of waiting a
// round trip at the start of each window.
//
// Fetching ahead stops while it does not pay: pages fetched ahead and never read (wasted)
// are counted against those read (NoteRead, NoteWasted, from the device); while more than
// half of them, and at least kMinEvidence, were wasted, runs are still followed (and their
// windows still grow) but only one continuation in kProbeEvery fetches its window and no
// trigger fetches the next, so that a reader that turns sequential again shows it soon.
// What counts is the history since two baselines, which move halfway up whenever it
// reaches kHistory pages, so old history fades. (Measured:
// random reads at depth 32 through peers matched a run by chance often enough to fetch
// thousands of windows, 90% of their pages never read, and each window's request for room
// made the evictor write pages out that reads then promoted back: 0.4x nbdkit's IOPS
// against 0.8x without it.)
//
// Alternatives: Leap (ATC '20) finds a majority stride over a window of recent faults and
// prefetches along it; the kernel keeps per-VMA hints. Strides other than +1 page are rare
// in swap slots (the kernel allocates them in runs), so runs are what is followed here.
//
// Thread-safe: one short lock per call (one call per batch of reads, not per page).
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>

namespace memlend {

class SequentialPrefetch {
 public:
  static constexpr std::uint64_t kMinPages = 8;
  static constexpr std::uint64_t kMaxPages = 128;
  static constexpr std::uint64_t kSlackPages = 32;
  static constexpr unsigned kStreams = 8;
  static constexpr std::uint64_t kMinEvidence = 64;
  static constexpr unsigned kProbeEvery = 16;
  static constexpr std::uint64_t kHistory = 4096;

  // Pages [first, first + count) were read and some of them missed. Returns how many
  // pages right after them to fetch ahead (0: none), and notes the run.
  std::uint64_t OnMiss(std::uint64_t first, std::uint64_t count) noexcept;

  // A page range to fetch ahead.
  struct Range {
    std::uint64_t first = 0;
    std::uint64_t count = 0;
  };
  // The reader reached trigger page `page` of a window fetched ahead. Returns the run's
  // next window (count 0: none, the page belongs to no run followed now) and notes it.
  Range OnTrigger(std::uint64_t page) noexcept;

  // A page fetched ahead was read / was dropped unread (the device's prefetch_hits and
  // prefetch_wasted). Any thread, no lock.
  void NoteRead() noexcept { read_.fetch_add(1, std::memory_order_relaxed); }
  void NoteWasted() noexcept { wasted_.fetch_add(1, std::memory_order_relaxed); }
  std::uint64_t pages_read() const noexcept { return read_.load(std::memory_order_relaxed); }
  std::uint64_t pages_wasted() const noexcept {
    return wasted_.load(std::memory_order_relaxed);
  }
  // Whether windows are fetched now.
  bool Paying() noexcept;

 private:
  // Ages the recent history (one call of OnMiss or OnTrigger); whether fetching ahead
  // pays. REQUIRES: mu_ held.
  bool AgeAndCheck() noexcept;

  struct Stream {
    std::uint64_t start = 0;   // the first page of the window fetched ahead last
    std::uint64_t next = 0;    // where the run is heading: the end of that window
    std::uint64_t window = 0;  // its size
    std::uint64_t used = 0;    // when it last continued (a call counter); 0: empty
  };

  std::mutex mu_;
  std::array<Stream, kStreams> streams_{};  // guarded by mu_
  std::uint64_t clock_ = 0;                 // guarded by mu_
  unsigned probe_ = 0;                      // guarded by mu_
  // Pages fetched ahead that were read, and that were dropped unread, since the start.
  std::atomic<std::uint64_t> read_{0};
  std::atomic<std::uint64_t> wasted_{0};
  // The recent history is what came after these.
  std::uint64_t read_base_ = 0;    // guarded by mu_
  std::uint64_t wasted_base_ = 0;  // guarded by mu_
};

}  // namespace memlend
