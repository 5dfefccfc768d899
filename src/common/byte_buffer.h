// ByteBuffer: a growable byte array whose new bytes are left uninitialised, for a
// connection's I/O buffers that are about to be overwritten (std::vector would zero them).
//
// The bytes live in their own anonymous mapping, not on the heap, so that the memory goes
// back to the system the moment the buffer is destroyed. A daemon that serves swap keeps
// one malloc arena that never trims (daemon.cc: PrepareForSwap), so megabyte buffers
// taken from the heap by connections that come and go would stay resident, and locked,
// for good. A mapping costs two system calls per buffer, once per connection; a daemon
// that locks its memory (mlockall MCL_FUTURE) gets the pages populated and locked when
// the buffer is made, so serving never faults on them.
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <new>
#include <utility>

namespace memlend {

class ByteBuffer {
 public:
  // Reserves `capacity` bytes (rounded up to whole 4 KiB pages). Throws std::bad_alloc
  // when the mapping fails.
  explicit ByteBuffer(std::size_t capacity = 0) { Reserve(capacity); }
  ~ByteBuffer() { Unmap(); }
  ByteBuffer(ByteBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)),
        size_(std::exchange(other.size_, 0)),
        capacity_(std::exchange(other.capacity_, 0)) {}
  ByteBuffer& operator=(ByteBuffer&& other) noexcept {
    if (this != &other) {
      Unmap();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
      capacity_ = std::exchange(other.capacity_, 0);
    }
    return *this;
  }
  ByteBuffer(const ByteBuffer&) = delete;
  ByteBuffer& operator=(const ByteBuffer&) = delete;

  std::byte* data() { return data_; }
  const std::byte* data() const { return data_; }
  std::size_t size() const { return size_; }
  std::size_t capacity() const { return capacity_; }
  bool empty() const { return size_ == 0; }

  // Appends `count` uninitialised bytes and returns a pointer to them, growing the buffer
  // to at least twice its size if it must grow (so that a run of small Extends stays
  // cheap). Throws std::bad_alloc when the buffer must grow and cannot.
  std::byte* Extend(std::size_t count) {
    if (size_ + count > capacity_) Reserve(std::max(size_ + count, 2 * capacity_));
    std::byte* at = data_ + size_;
    size_ += count;
    return at;
  }
  void Append(const void* bytes, std::size_t count) {
    if (count == 0) return;  // `bytes` may be null then, which memcpy must never see
    std::memcpy(Extend(count), bytes, count);
  }
  // Drops bytes past `size`. REQUIRES: size <= size().
  void Truncate(std::size_t size) { size_ = size; }
  void Clear() { size_ = 0; }

  // Makes room for `capacity` bytes in all, exactly (in whole pages), keeping the
  // contents: a caller that reserves knows how much it will need, and what a connection
  // holds stays what it asked for. Throws std::bad_alloc when the mapping fails.
  void Reserve(std::size_t capacity) {
    if (capacity <= capacity_) return;
    const std::size_t grown = (capacity + kPage - 1) & ~(kPage - 1);
    void* fresh = ::mmap(nullptr, grown, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                         -1, 0);
    if (fresh == MAP_FAILED) throw std::bad_alloc();
    if (size_ > 0) std::memcpy(fresh, data_, size_);
    Unmap();
    data_ = static_cast<std::byte*>(fresh);
    capacity_ = grown;
  }

 private:
  static constexpr std::size_t kPage = 4096;

  void Unmap() noexcept {
    if (data_ != nullptr) ::munmap(data_, capacity_);
    data_ = nullptr;
  }

  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

}  // namespace memlend
