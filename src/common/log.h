// Minimal logging to stderr for the control path. The data path never logs per request.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
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

// Lets a repeated message through at most once per interval, for events a remote party
// can trigger at will (refused connections): the log says it happens, and how often,
// without one line per event. Not thread-safe: callers hold their own lock.
class LogThrottle {
 public:
  explicit LogThrottle(std::chrono::seconds interval) : interval_(interval) {}

  // True if a message may be logged now; then *held_back is how many were not since the
  // last one that was.
  bool Allow(std::uint64_t* held_back) {
    const auto now = std::chrono::steady_clock::now();
    if (logged_once_ && now - last_ < interval_) {
      ++held_back_;
      return false;
    }
    logged_once_ = true;
    last_ = now;
    *held_back = held_back_;
    held_back_ = 0;
    return true;
  }

 private:
  const std::chrono::seconds interval_;
  std::chrono::steady_clock::time_point last_{};
  bool logged_once_ = false;
  std::uint64_t held_back_ = 0;
};

}  // namespace memlend
