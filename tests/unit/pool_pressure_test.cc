// PoolPressure: how far a lender's pool shrinks, and when it grows back, for MemAvailable
// (--reclaim-below) and PSI (--reclaim-pressure) readings.
#include "daemon/pool_pressure.h"

#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <string>

#include "common/size.h"

namespace memlend {
namespace {

constexpr std::uint64_t kMiB = 1 << 20;
constexpr std::uint64_t kSuperpage = 2 * kMiB;
using std::chrono::seconds;

// A pool of `max` in service at `total`, at its target, with `used` held.
PoolReading Pool(std::uint64_t total, std::uint64_t max, std::uint64_t used, seconds at) {
  PoolReading r;
  r.total_bytes = total;
  r.target_bytes = total;
  r.max_bytes = max;
  r.used_bytes = used;
  r.now = std::chrono::steady_clock::time_point{} + std::chrono::hours(1) + at;
  return r;
}

TEST_CASE("no signal: the pool may be its whole size") {
  PoolPressure pressure(256 * kMiB);
  CHECK(pressure.Update(Pool(256 * kMiB, 256 * kMiB, 0, seconds(0)), 256 * kMiB).empty());
  CHECK(pressure.allowed_bytes() == 256 * kMiB);
}

TEST_CASE("MemAvailable under the threshold: the pool gives back what the host lacks") {
  PoolPressure pressure(256 * kMiB);
  PoolReading r = Pool(256 * kMiB, 256 * kMiB, 100 * kMiB, seconds(0));
  r.reclaim_below_bytes = 1024 * kMiB;
  r.available_bytes = 1024 * kMiB - 3 * kMiB;  // short by 3 MiB: two superpages
  const std::string line = pressure.Update(r, 256 * kMiB);
  CHECK(line.find("--reclaim-below") != std::string::npos);
  CHECK(pressure.allowed_bytes() == 256 * kMiB - 2 * kSuperpage);
  // While that shrink is under way, nothing more, whatever the reading.
  r.target_bytes = pressure.allowed_bytes();
  r.available_bytes = 512 * kMiB;
  CHECK(pressure.Update(r, 256 * kMiB).empty());
  CHECK(pressure.allowed_bytes() == 256 * kMiB - 2 * kSuperpage);
  // Between the threshold and 64 MiB above it: no change either way.
  r = Pool(252 * kMiB, 256 * kMiB, 100 * kMiB, seconds(1));
  r.reclaim_below_bytes = 1024 * kMiB;
  r.available_bytes = 1024 * kMiB + 10 * kMiB;
  CHECK(pressure.Update(r, 256 * kMiB).empty());
  CHECK(pressure.allowed_bytes() == 252 * kMiB);
  // Room again: what is in use plus what the host can spare (here all of it).
  r.available_bytes = 1024 * kMiB + 64 * kMiB + 200 * kMiB;
  const std::string back = pressure.Update(r, 256 * kMiB);
  CHECK(back.find("grows back") != std::string::npos);
  CHECK(pressure.allowed_bytes() == 256 * kMiB);
}

TEST_CASE("PSI at the threshold: a quarter at a time, 10 s apart; back by an eighth once calm") {
  PoolPressure pressure(256 * kMiB);
  PoolReading r = Pool(256 * kMiB, 256 * kMiB, 50 * kMiB, seconds(0));
  r.reclaim_pressure = 20;
  r.pressure = 25.0;
  CHECK(pressure.Update(r, 256 * kMiB).find("--reclaim-pressure") != std::string::npos);
  CHECK(pressure.allowed_bytes() == 192 * kMiB);
  // Done shrinking, pressure still high, but only 5 s later: wait for the average.
  r = Pool(192 * kMiB, 256 * kMiB, 50 * kMiB, seconds(5));
  r.reclaim_pressure = 20;
  r.pressure = 30.0;
  CHECK(pressure.Update(r, 256 * kMiB).empty());
  CHECK(pressure.allowed_bytes() == 192 * kMiB);
  r.now += seconds(5);
  pressure.Update(r, 256 * kMiB);
  CHECK(pressure.allowed_bytes() == 144 * kMiB);
  // Under the threshold but not under half of it: stays.
  r = Pool(144 * kMiB, 256 * kMiB, 50 * kMiB, seconds(30));
  r.reclaim_pressure = 20;
  r.pressure = 15.0;
  CHECK(pressure.Update(r, 256 * kMiB).empty());
  CHECK(pressure.allowed_bytes() == 144 * kMiB);
  // Calm: an eighth of the most (32 MiB) per step, 10 s apart, up to the size asked for.
  r.pressure = 2.0;
  pressure.Update(r, 256 * kMiB);
  CHECK(pressure.allowed_bytes() == 176 * kMiB);
  r.now += seconds(3);
  pressure.Update(r, 256 * kMiB);
  CHECK(pressure.allowed_bytes() == 176 * kMiB);
  std::string last;
  for (int step = 1; step <= 3; ++step) {
    r.now += seconds(10);
    last = pressure.Update(r, 256 * kMiB);
  }
  CHECK(pressure.allowed_bytes() == 256 * kMiB);
  CHECK(last.find("grows back") != std::string::npos);
  // A host whose PSI cannot be read counts as calm, and a small pool still gives a
  // superpage back.
  PoolPressure small(4 * kMiB);
  PoolReading tiny = Pool(4 * kMiB, 4 * kMiB, 0, seconds(0));
  tiny.reclaim_pressure = 10;
  tiny.pressure = 50.0;
  small.Update(tiny, 4 * kMiB);
  CHECK(small.allowed_bytes() == 2 * kMiB);
  tiny = Pool(2 * kMiB, 4 * kMiB, 0, seconds(20));
  tiny.reclaim_pressure = 10;
  small.Update(tiny, 4 * kMiB);  // no reading
  CHECK(small.allowed_bytes() == 4 * kMiB);
}

TEST_CASE("both signals: the larger shrink wins") {
  PoolPressure pressure(256 * kMiB);
  PoolReading r = Pool(256 * kMiB, 256 * kMiB, 0, seconds(0));
  r.reclaim_below_bytes = 1024 * kMiB;
  r.available_bytes = 1024 * kMiB - 100 * kMiB;  // short by 100 MiB: more than a quarter
  r.reclaim_pressure = 10;
  r.pressure = 40.0;
  pressure.Update(r, 256 * kMiB);
  CHECK(pressure.allowed_bytes() == 156 * kMiB);
  // The size asked for below what pressure allows: the line names the smaller.
  PoolPressure other(256 * kMiB);
  r.available_bytes = 1024 * kMiB - 1;
  r.pressure = 0.0;
  const std::string line = other.Update(r, 64 * kMiB);
  CHECK(line.find("shrinking the pool to " + FormatSize(64 * kMiB)) != std::string::npos);
}

}  // namespace
}  // namespace memlend
