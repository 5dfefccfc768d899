// ByteBuffer: a growable byte array whose new bytes are left uninitialised, for I/O
// buffers that are about to be overwritten (std::vector would zero them first).
#pragma once

#include <cstddef>
#include <cstring>
#include <memory>

namespace memlend {

class ByteBuffer {
 public:
  explicit ByteBuffer(std::size_t capacity = 0) { Reserve(capacity); }

  std::byte* data() { return data_.get(); }
  const std::byte* data() const { return data_.get(); }
  std::size_t size() const { return size_; }
  std::size_t capacity() const { return capacity_; }
  bool empty() const { return size_ == 0; }

  // Appends `count` uninitialised bytes and returns a pointer to them.
  std::byte* Extend(std::size_t count) {
    Reserve(size_ + count);
    std::byte* at = data_.get() + size_;
    size_ += count;
    return at;
  }
  void Append(const void* bytes, std::size_t count) { std::memcpy(Extend(count), bytes, count); }
  // Drops bytes past `size`. REQUIRES: size <= size().
  void Truncate(std::size_t size) { size_ = size; }
  void Clear() { size_ = 0; }

  void Reserve(std::size_t capacity) {
    if (capacity <= capacity_) return;
    std::size_t grown = capacity_ < 4096 ? 4096 : capacity_;
    while (grown < capacity) grown *= 2;
    auto fresh = std::make_unique_for_overwrite<std::byte[]>(grown);
    if (size_ > 0) std::memcpy(fresh.get(), data_.get(), size_);
    data_ = std::move(fresh);
    capacity_ = grown;
  }

 private:
  std::unique_ptr<std::byte[]> data_;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

}  // namespace memlend
