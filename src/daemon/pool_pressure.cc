#include "daemon/pool_pressure.h"

#include <algorithm>
#include <cstdio>

#include "common/size.h"
#include "peer/wire.h"

namespace memlend {
namespace {

// Growth waits for this much room above --reclaim-below, so that the pool does not shrink
// and grow by turns around it.
constexpr std::uint64_t kSlack = 64ull << 20;
constexpr std::uint64_t kSuperpage = peer::kSuperpageBytes;
constexpr auto kPressureStep = std::chrono::seconds(10);

std::uint64_t RoundUp(std::uint64_t bytes) { return (bytes + kSuperpage - 1) / kSuperpage * kSuperpage; }
std::uint64_t RoundDown(std::uint64_t bytes) { return bytes / kSuperpage * kSuperpage; }

}  // namespace

std::string PoolPressure::Update(const PoolReading& r, std::uint64_t size_bytes) {
  const bool memory_on = r.reclaim_below_bytes > 0;
  const bool pressure_on = r.reclaim_pressure > 0;
  if (!memory_on && !pressure_on) {
    allowed_bytes_ = r.max_bytes;
    shrunk_ = false;
    return "";
  }
  const bool step_due = r.now - psi_step_at_ >= kPressureStep;
  const bool short_of_memory =
      memory_on && r.available_bytes && *r.available_bytes < r.reclaim_below_bytes;
  const bool under_pressure = pressure_on && r.pressure && *r.pressure >= r.reclaim_pressure;
  char line[256] = "";
  if (short_of_memory || under_pressure) {
    if (r.total_bytes > r.target_bytes) return "";  // the last shrink is not done yet
    std::uint64_t short_by = 0;
    if (short_of_memory) short_by = RoundUp(r.reclaim_below_bytes - *r.available_bytes);
    if (under_pressure && step_due) {
      short_by = std::max({short_by, kSuperpage, RoundDown(r.total_bytes / 4)});
      psi_step_at_ = r.now;
    }
    const std::uint64_t allowed = r.total_bytes > short_by ? r.total_bytes - short_by : 0;
    if (short_by == 0 || allowed >= allowed_bytes_) return "";
    allowed_bytes_ = allowed;
    const std::string to = FormatSize(std::min(size_bytes, allowed));
    if (short_of_memory) {
      std::snprintf(line, sizeof(line),
                    "lender: MemAvailable %s is under --reclaim-below %s: shrinking the pool to %s",
                    FormatSize(*r.available_bytes).c_str(),
                    FormatSize(r.reclaim_below_bytes).c_str(), to.c_str());
    } else {
      std::snprintf(line, sizeof(line),
                    "lender: memory pressure %.2f%% is at least --reclaim-pressure %.2f%%: "
                    "shrinking the pool to %s",
                    *r.pressure, r.reclaim_pressure, to.c_str());
    }
    shrunk_ = true;
    return line;
  }
  if (allowed_bytes_ >= r.max_bytes) return "";
  // Room comes back as what is in use plus what the host can spare now: superpages put back
  // in service do not lower MemAvailable until borrowers fill them, so growing by the spare
  // room every second would overshoot. A host without a reading counts as calm.
  const bool memory_calm =
      !memory_on || (r.available_bytes && *r.available_bytes >= r.reclaim_below_bytes + kSlack);
  const bool pressure_calm = !pressure_on || !r.pressure || *r.pressure < r.reclaim_pressure / 2;
  if (!memory_calm || !pressure_calm || (pressure_on && !step_due)) return "";
  std::uint64_t grown = r.max_bytes;
  if (memory_on) {
    const std::uint64_t spare = RoundDown(*r.available_bytes - r.reclaim_below_bytes - kSlack);
    grown = std::max(allowed_bytes_, r.used_bytes + spare);
  }
  if (pressure_on) {
    grown = std::min(grown, allowed_bytes_ + std::max(kSuperpage, RoundDown(r.max_bytes / 8)));
    psi_step_at_ = r.now;
  }
  allowed_bytes_ = std::min(r.max_bytes, grown);
  if (shrunk_ && allowed_bytes_ >= size_bytes) {
    shrunk_ = false;
    std::snprintf(line, sizeof(line), "lender: memory is no longer short: the pool grows back to %s",
                  FormatSize(size_bytes).c_str());
  }
  return line;
}

}  // namespace memlend
