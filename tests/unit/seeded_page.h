// PageOf: a 4 KiB page whose every 8-byte word is derived from a seed and its position, so
// pages differ and one read from the wrong place or offset is caught.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "memlend/page_store.h"

namespace memlend::testing {

inline std::vector<std::byte> PageOf(std::uint64_t seed) {
  std::vector<std::byte> page(kPageSize);
  for (std::size_t i = 0; i < kPageSize; i += 8) {
    const std::uint64_t word = seed * 0x9e3779b97f4a7c15ULL + i;
    std::memcpy(page.data() + i, &word, 8);
  }
  return page;
}

}  // namespace memlend::testing
