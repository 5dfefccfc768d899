// Unit tests for the rule every reservation is checked against (src/daemon/host_memory.h).
#include "daemon/host_memory.h"

#include <doctest/doctest.h>

#include <string>

namespace memlend {
namespace {

constexpr std::uint64_t kMiB = 1 << 20;
constexpr std::uint64_t kGiB = std::uint64_t{1} << 30;

bool Contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

TEST_CASE("the margin is the larger of 1 GiB and a tenth of MemTotal, at most a quarter") {
  CHECK(HostMargin(HostMemory{4 * kGiB, kNoLimit}) == kGiB);
  CHECK(HostMargin(HostMemory{24 * kGiB, kNoLimit}) == 24 * kGiB / 10);
  // A 1 GiB VM keeps a quarter, and can still lend 256 MiB.
  CHECK(HostMargin(HostMemory{965 * kMiB, kNoLimit}) == 965 * kMiB / 4);
  CHECK(CheckReservation(HostMemory{965 * kMiB, kNoLimit}, true,
                         {{"--lend", 256 * kMiB}, {"heap", 32 * kMiB}})
            .empty());
  CHECK(HostMargin(HostMemory{kNoLimit, kNoLimit}) == 0);  // MemTotal unknown
}

TEST_CASE("reservations up to MemTotal less the margin pass; more is refused, saying what fits") {
  const HostMemory host{24 * kGiB, kNoLimit};
  const std::uint64_t room = 24 * kGiB - 24 * kGiB / 10;
  CHECK(CheckReservation(host, true, {{"--local-store", room}}).empty());
  CHECK(CheckReservation(host, true, {{"--local-store", room / 2}, {"--lend", room / 2}}).empty());
  const std::string error =
      CheckReservation(host, true, {{"--local-store", std::uint64_t{1} << 40}, {"--lend", 0}});
  CAPTURE(error);
  CHECK(Contains(error, "--local-store 1.0 TiB"));
  CHECK_FALSE(Contains(error, "--lend"));  // parts of 0 bytes are not named
  CHECK(Contains(error, "more than this host can hold"));
  CHECK(Contains(error, "at most 21.6 GiB"));
  CHECK(Contains(error, "--force"));
  CHECK(error.find('\n') == std::string::npos);
  // The sum of parts, not each alone.
  CHECK_FALSE(CheckReservation(host, true, {{"--local-store", room}, {"--lend", 2 * kMiB}}).empty());
  // A sum that overflows is refused, not wrapped around.
  CHECK_FALSE(CheckReservation(host, false, {{"a", kNoLimit - 1}, {"b", kNoLimit - 1}}).empty());
}

TEST_CASE("without CAP_IPC_LOCK, memory to be locked must fit RLIMIT_MEMLOCK") {
  const HostMemory host{24 * kGiB, 64 * kMiB};
  CHECK(CheckReservation(host, true, {{"--local-store", 64 * kMiB}}).empty());
  const std::string error = CheckReservation(host, true, {{"--local-store", 65 * kMiB}});
  CAPTURE(error);
  CHECK(Contains(error, "RLIMIT_MEMLOCK"));
  CHECK(Contains(error, "64.0 MiB"));
  CHECK(Contains(error, "--no-mlock"));
  // Memory that is not locked is bound by the host only.
  CHECK(CheckReservation(host, false, {{"--local-store", kGiB}}).empty());
}

TEST_CASE("ReadHostMemory reads this host's MemTotal") {
  const HostMemory host = ReadHostMemory();
  CHECK(host.total_bytes > 64 * kMiB);
  CHECK(host.total_bytes != kNoLimit);
}

TEST_CASE("memory pressure is the 'some avg10' of /proc/pressure/memory, checked") {
  CHECK(ParseMemoryPressure("some avg10=12.50 avg60=3.00 avg300=0.70 total=81234\n"
                            "full avg10=1.00 avg60=0.00 avg300=0.00 total=1000\n") == 12.5);
  CHECK(ParseMemoryPressure("full avg10=9.00 avg60=0.00 avg300=0.00 total=1\n"
                            "some avg10=0.00 avg60=0.00 avg300=0.00 total=0") == 0.0);
  CHECK_FALSE(ParseMemoryPressure("").has_value());
  CHECK_FALSE(ParseMemoryPressure("full avg10=1.00 avg60=0 avg300=0 total=0\n").has_value());
  CHECK_FALSE(ParseMemoryPressure("some avg60=1.00 total=0\n").has_value());
  CHECK_FALSE(ParseMemoryPressure("some avg10=abc avg60=0\n").has_value());
  CHECK_FALSE(ParseMemoryPressure("some avg10=1.5x avg60=0\n").has_value());
  CHECK_FALSE(ParseMemoryPressure("some avg10=-1 avg60=0\n").has_value());
  CHECK_FALSE(ParseMemoryPressure("some avg10=101 avg60=0\n").has_value());
  CHECK_FALSE(ParseMemoryPressure("some avg10=nan avg60=0\n").has_value());
  // This host's, when it has PSI: a share of time.
  if (const std::optional<double> here = ReadMemoryPressure()) {
    CHECK(*here >= 0);
    CHECK(*here <= 100);
  }
}

}  // namespace
}  // namespace memlend
