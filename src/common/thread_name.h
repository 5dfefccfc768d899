// Names the calling thread, so that top -H, perf and /proc/PID/task/*/comm tell a daemon's
// threads apart. Linux keeps at most 15 characters; longer names are cut.
#pragma once

#include <pthread.h>

#include <algorithm>
#include <cstring>
#include <string_view>

namespace memlend {

// Allocates nothing, so a thread may call it first thing, before it can handle exceptions.
inline void SetThreadName(std::string_view name) noexcept {
  char cut[16];
  const std::size_t length = std::min<std::size_t>(name.size(), sizeof(cut) - 1);
  std::memcpy(cut, name.data(), length);
  cut[length] = '\0';
  ::pthread_setname_np(::pthread_self(), cut);
}

}  // namespace memlend
