// DiskStore: the disk tier. Pages live in 4 KiB slots of a backing file.
//
// Slot n is the file range [n * kPageSize, (n + 1) * kPageSize). Free slots are reused
// lowest-first from a free list; the file grows by appending when none is free, and a
// discarded slot's blocks are released with FALLOC_FL_PUNCH_HOLE so the file's real size
// tracks what it holds. The file is truncated when the store opens it: a memlend device
// is volatile, so nothing from an earlier run is meaningful.
//
// I/O is pread/pwrite (thread-safe without a lock); only the slot allocator takes a
// mutex, for a few instructions. On request (`direct`) the file is opened with O_DIRECT where
// the file system allows it: the disk tier takes pages when memory is short, often from a
// swap device, and buffered writes need page-cache memory and dirty-page writeback at
// exactly that moment; under whole-system memory pressure a daemon was seen stalled in
// ext4's delayed allocation that way. The price is a synchronous write per page: the spill
// integration test takes about 15 s with O_DIRECT against 1.3 s buffered, hence opt-in.
// With O_DIRECT, pages not 4 KiB aligned in memory go through an aligned stack buffer.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "memlend/page_store.h"

namespace memlend {

class DiskStore final : public PageStore {
 public:
  // Opens (creating or truncating) `path`. `max_bytes` bounds the file (0: no bound beyond
  // the file system's); a write past it returns -ENOSPC. Throws std::system_error with the
  // path in the message if the file cannot be opened for reading and writing.
  // `direct`: use O_DIRECT if the file system supports it (see above).
  // `keep`: open the file as it is, for a daemon that recovers its pages after a restart
  // (docs/restart.md): its slots are all free until Adopt says otherwise.
  DiskStore(const std::string& path, std::uint64_t max_bytes, bool direct = false,
            bool keep = false);
  ~DiskStore() override;
  DiskStore(const DiskStore&) = delete;
  DiskStore& operator=(const DiskStore&) = delete;

  int Write(ConstPageSpan page, std::uint64_t hint, Slot* slot) noexcept override;
  // Rewrites the slot in place (a file block needs no new room).
  int Rewrite(Slot slot, ConstPageSpan page, std::uint64_t hint, Slot* placed,
              bool* keeps_old) noexcept override;
  int Read(Slot slot, PageSpan out) noexcept override;
  void Discard(Slot slot) noexcept override;
  // pages: live slots; used_bytes: pages * kPageSize; total_bytes: max_bytes (0 = unbounded).
  StoreStats Stats() const noexcept override;

  // Recovery, before any other call: Adopt marks a slot a page table names as live (false
  // if it is past the bound, or taken already); FinishAdopt makes the slots below the
  // highest adopted one that were not adopted free. Not thread-safe. May throw bad_alloc.
  bool Adopt(Slot slot);
  void FinishAdopt();

  const std::string& path() const { return path_; }
  // True when the file is accessed with O_DIRECT (asked for, and supported).
  bool direct() const { return direct_; }

 private:
  // Writes one page into `slot`'s file range. Returns 0 or -errno.
  int WriteAt(Slot slot, ConstPageSpan page) noexcept;

  // Constant after construction.
  const std::string path_;
  const std::uint64_t max_slots_;  // 0 = unbounded
  int fd_ = -1;
  bool direct_ = false;  // fd_ has O_DIRECT
  bool punch_holes_ = false;  // Discard frees the page's blocks (a regular file)

  mutable std::mutex mu_;
  std::vector<Slot> free_slots_;   // guarded by mu_; kept as a min-heap
  std::uint64_t next_slot_ = 0;    // guarded by mu_; first never-used slot
  std::uint64_t live_pages_ = 0;   // guarded by mu_
  std::vector<bool> adopted_;      // during recovery only
};

}  // namespace memlend
