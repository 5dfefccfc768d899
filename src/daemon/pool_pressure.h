// PoolPressure: how large a lender's pool may be while its host is short of memory, from the
// readings the daemon's reclaim watch takes every second (docs/remote-tier.md, step 7).
//
// Two signals, each off at 0: MemAvailable under `--reclaim-below` (the pool gives back
// what the host lacks) and PSI memory pressure ("some avg10") at `--reclaim-pressure` or
// more (the pool gives back a quarter of itself). A shrink waits until the last one is done
// (the pool is down to its target), since a shrink under way frees memory that neither
// signal shows yet. The pool grows back once MemAvailable is 64 MiB above the threshold (to
// what is in use plus what the host can spare) and pressure is under half its threshold (by
// an eighth of the pool's most). PSI is an average over 10 s, so its steps, either way, are
// 10 s apart: each sees what the last one did. Not thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

namespace memlend {

struct PoolReading {
  // The pool, as LenderService::Stats shows it.
  std::uint64_t total_bytes = 0;
  std::uint64_t target_bytes = 0;
  std::uint64_t max_bytes = 0;
  std::uint64_t used_bytes = 0;
  // The signals: thresholds (0: off) and what was read (nullopt: could not be read).
  std::uint64_t reclaim_below_bytes = 0;
  std::optional<std::uint64_t> available_bytes;
  double reclaim_pressure = 0;
  std::optional<double> pressure;
  std::chrono::steady_clock::time_point now{};
};

class PoolPressure {
 public:
  explicit PoolPressure(std::uint64_t max_bytes) : allowed_bytes_(max_bytes) {}

  // Takes one reading; `size_bytes` is the size asked for (--lend, `memlend lend --size`).
  // Returns a line to log when the pool starts to shrink for a signal or is let back to
  // its size, else "".
  std::string Update(const PoolReading& reading, std::uint64_t size_bytes);
  // The most the host's memory allows the pool now (whole superpages).
  std::uint64_t allowed_bytes() const { return allowed_bytes_; }

 private:
  std::uint64_t allowed_bytes_;
  bool shrunk_ = false;  // a shrink was logged and the pool is not back to its size yet
  std::chrono::steady_clock::time_point psi_step_at_{};  // the last PSI step, either way
};

}  // namespace memlend
