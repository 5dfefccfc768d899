// Minimal logging to stderr for the control path. The data path never logs per request.
#pragma once

#include <atomic>
#include <cstdio>
#include <utility>

namespace memlend {

// Set once from --verbose before threads start; read by any thread.
inline std::atomic<bool> g_verbose{false};

// Prints "memlend: <message>" on one line.
template <typename... Args>
void LogError(const char* format, Args&&... args) {
  std::fprintf(stderr, "memlend: ");
  if constexpr (sizeof...(Args) == 0) {
    std::fputs(format, stderr);
  } else {
    std::fprintf(stderr, format, std::forward<Args>(args)...);
  }
  std::fputc('\n', stderr);
}

// As LogError, but only with --verbose.
template <typename... Args>
void LogDebug(const char* format, Args&&... args) {
  if (g_verbose.load(std::memory_order_relaxed)) LogError(format, std::forward<Args>(args)...);
}

}  // namespace memlend
