// DiskStore implementation. See disk_store.h for the design.
//
// Allocation without allocating: free_slots_ never holds more entries than next_slot_, so
// Write reserves room for every slot it appends before it appends it (growing the vector
// geometrically, the only allocation here). Discard and Write's error path then push onto
// the heap without reallocating.
#include "store/disk_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <new>
#include <stdexcept>
#include <system_error>

namespace memlend {
namespace {

// The most slots a file can hold before a slot's byte offset overflows off_t.
constexpr std::uint64_t kMaxFileSlots =
    static_cast<std::uint64_t>(std::numeric_limits<off_t>::max()) / kPageSize;

// O_DIRECT wants memory aligned to the logical block size; a page boundary always is.
bool IsAligned(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % kPageSize == 0; }

// Returns the byte offset of `slot` in the backing file.
off_t SlotOffset(Slot slot) { return static_cast<off_t>(slot * kPageSize); }

}  // namespace

DiskStore::DiskStore(const std::string& path, std::uint64_t max_bytes, bool direct, bool keep)
    : path_(path), max_slots_(max_bytes / kPageSize) {
  if (max_bytes != 0 && max_slots_ == 0) {
    throw std::invalid_argument("disk store bound for " + path + " is smaller than one page");
  }
  const int kFlags = O_RDWR | O_CREAT | O_CLOEXEC | (keep ? 0 : O_TRUNC);
  if (direct) {
    fd_ = open(path.c_str(), kFlags | O_DIRECT, 0600);
    direct_ = fd_ >= 0;
  }
  if (!direct_ && (!direct || errno == EINVAL)) fd_ = open(path.c_str(), kFlags, 0600);
  if (fd_ < 0) {
    throw std::system_error(errno, std::generic_category(), "backing file " + path);
  }
  // Holes give space back only in a file. On a block device a punch is a synchronous
  // discard or zero-out per page, which made freeing a device of many spilled pages take
  // minutes, and the device's size does not change anyway.
  struct stat st {};
  punch_holes_ = fstat(fd_, &st) == 0 && S_ISREG(st.st_mode);
}

DiskStore::~DiskStore() {
  if (fd_ >= 0) close(fd_);
}

bool DiskStore::Adopt(Slot slot) {
  std::uint64_t limit = max_slots_ != 0 ? std::min(max_slots_, kMaxFileSlots) : kMaxFileSlots;
  // A slot past the file's end never held a page (a corrupt table names it).
  struct stat st {};
  if (punch_holes_ && fstat(fd_, &st) == 0) {
    limit = std::min<std::uint64_t>(limit, static_cast<std::uint64_t>(st.st_size) / kPageSize);
  }
  if (slot >= limit) return false;
  if (adopted_.size() <= slot) adopted_.resize(slot + 1, false);
  if (adopted_[slot]) return false;
  adopted_[slot] = true;
  ++live_pages_;
  next_slot_ = std::max<std::uint64_t>(next_slot_, slot + 1);
  return true;
}

void DiskStore::FinishAdopt() {
  free_slots_.clear();
  free_slots_.reserve(std::max<std::size_t>(64, next_slot_));
  for (Slot slot = 0; slot < next_slot_; ++slot) {
    if (!adopted_[slot]) free_slots_.push_back(slot);
  }
  std::make_heap(free_slots_.begin(), free_slots_.end(), std::greater<Slot>());
  adopted_ = {};
}

int DiskStore::Write(ConstPageSpan page, std::uint64_t /*hint*/, Slot* slot) noexcept {
  assert(slot != nullptr);
  Slot s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!free_slots_.empty()) {
      std::pop_heap(free_slots_.begin(), free_slots_.end(), std::greater<Slot>());
      s = free_slots_.back();
      free_slots_.pop_back();
    } else {
      const std::uint64_t limit =
          max_slots_ != 0 ? std::min(max_slots_, kMaxFileSlots) : kMaxFileSlots;
      if (next_slot_ >= limit) return -ENOSPC;
      if (free_slots_.capacity() <= next_slot_) {
        try {
          free_slots_.reserve(std::max<std::size_t>(64, 2 * free_slots_.capacity()));
        } catch (const std::bad_alloc&) {
          return -ENOMEM;
        }
      }
      s = next_slot_++;
    }
    ++live_pages_;
  }

  const int rc = WriteAt(s, page);
  if (rc != 0) {
    std::lock_guard<std::mutex> lock(mu_);
    free_slots_.push_back(s);  // within capacity: see the comment at the top of the file
    std::push_heap(free_slots_.begin(), free_slots_.end(), std::greater<Slot>());
    --live_pages_;
    return rc;
  }
  *slot = s;
  return 0;
}

int DiskStore::Rewrite(Slot slot, ConstPageSpan page, std::uint64_t /*hint*/, Slot* placed,
                       bool* keeps_old) noexcept {
  *placed = slot;
  *keeps_old = false;
  return WriteAt(slot, page);
}

int DiskStore::WriteAt(Slot slot, ConstPageSpan page) noexcept {
  const char* src = reinterpret_cast<const char*>(page.data());
  alignas(kPageSize) char bounce[kPageSize];
  if (direct_ && !IsAligned(src)) {
    std::memcpy(bounce, src, kPageSize);
    src = bounce;
  }
  std::size_t done = 0;
  while (done < kPageSize) {
    const ssize_t n = pwrite(fd_, src + done, kPageSize - done, SlotOffset(slot) + done);
    if (n > 0) {
      done += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    return n < 0 ? -errno : -ENOSPC;  // no progress at all: report a full medium
  }
  return 0;
}

int DiskStore::Read(Slot slot, PageSpan out) noexcept {
  char* dst = reinterpret_cast<char*>(out.data());
  alignas(kPageSize) char bounce[kPageSize];
  const bool via_bounce = direct_ && !IsAligned(dst);
  if (via_bounce) dst = bounce;
  std::size_t done = 0;
  while (done < kPageSize) {
    const ssize_t n = pread(fd_, dst + done, kPageSize - done, SlotOffset(slot) + done);
    if (n > 0) {
      done += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    return n < 0 ? -errno : -EIO;  // EOF inside a live slot means the file was cut short
  }
  if (via_bounce) std::memcpy(out.data(), bounce, kPageSize);
  return 0;
}

void DiskStore::Discard(Slot slot) noexcept {
  // Release the blocks before the slot can be handed out again, or the punch could land
  // on a newer page. Failure only costs space (EOPNOTSUPP on file systems without holes).
  if (punch_holes_) {
    (void)fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, SlotOffset(slot),
                    static_cast<off_t>(kPageSize));
  }
  std::lock_guard<std::mutex> lock(mu_);
  assert(slot < next_slot_);
  assert(live_pages_ > 0);
  free_slots_.push_back(slot);  // within capacity: see the comment at the top of the file
  std::push_heap(free_slots_.begin(), free_slots_.end(), std::greater<Slot>());
  --live_pages_;
}

StoreStats DiskStore::Stats() const noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  StoreStats stats;
  stats.pages = live_pages_;
  stats.used_bytes = live_pages_ * kPageSize;
  stats.total_bytes = max_slots_ * kPageSize;
  return stats;
}

}  // namespace memlend
