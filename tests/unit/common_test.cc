// Unit tests for the small helpers of src/common: ByteBuffer, ZeroMemory, LogThrottle, Quote.
#include <sys/mman.h>

#include <doctest/doctest.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>

#include "common/byte_buffer.h"
#include "common/log.h"
#include "common/quote.h"
#include "common/zero_memory.h"

namespace memlend {
namespace {

TEST_CASE("ByteBuffer: appending nothing to an empty buffer is fine, even from null") {
  // This memcpy'd from a null source before, which UndefinedBehaviorSanitizer stops at.
  ByteBuffer buffer;
  buffer.Append(nullptr, 0);
  CHECK(buffer.size() == 0);
  CHECK(buffer.empty());
  buffer.Append("abc", 3);
  buffer.Append(nullptr, 0);
  REQUIRE(buffer.size() == 3);
  CHECK(std::memcmp(buffer.data(), "abc", 3) == 0);
}

TEST_CASE("ByteBuffer: the first reservation is exact in pages, growth keeps the contents") {
  ByteBuffer buffer(4096 + 1);
  CHECK(buffer.capacity() == 8192);
  for (int i = 0; i < 3000; ++i) buffer.Append(&i, sizeof(i));
  REQUIRE(buffer.size() == 3000 * sizeof(int));
  CHECK(buffer.capacity() >= buffer.size());
  for (int i = 0; i < 3000; ++i) {
    int value = 0;
    std::memcpy(&value, buffer.data() + i * sizeof(int), sizeof(int));
    REQUIRE(value == i);
  }
  ByteBuffer moved = std::move(buffer);
  CHECK(moved.size() == 3000 * sizeof(int));
  CHECK(buffer.data() == nullptr);  // NOLINT(bugprone-use-after-move): moved-from is empty
  moved.Truncate(4);
  moved.Clear();
  CHECK(moved.empty());
}

// VmLck of this process, in KiB.
std::uint64_t LockedKiB() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmLck:", 0) == 0) return std::stoull(line.substr(6));
  }
  return 0;
}

TEST_CASE("ZeroMemory clears a range, locked or not") {
  constexpr std::size_t kBytes = 2 << 20;
  void* mapping = mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  REQUIRE(mapping != MAP_FAILED);
  auto* bytes = static_cast<std::byte*>(mapping);
  const auto fill_and_zero = [&] {
    std::memset(bytes, 0x5a, kBytes);
    ZeroMemory(bytes + 4096, kBytes - 8192);
    CHECK(bytes[0] == std::byte{0x5a});
    CHECK(bytes[4095] == std::byte{0x5a});
    std::size_t nonzero = 0;
    for (std::size_t i = 4096; i < kBytes - 4096; ++i) nonzero += bytes[i] != std::byte{0};
    CHECK(nonzero == 0);
    CHECK(bytes[kBytes - 4096] == std::byte{0x5a});
  };
  SUBCASE("unlocked: the pages are dropped") { fill_and_zero(); }
  SUBCASE("locked: MADV_DONTNEED fails, the bytes are cleared by hand") {
    // Locked memory is what a lender runs with (mlockall); this is where data leaked.
    const std::uint64_t locked_before = LockedKiB();
    if (mlock(mapping, kBytes) != 0) {
      MESSAGE("SKIPPED: cannot lock 2 MiB here (" << std::strerror(errno)
                                                  << "); the integration test covers it as root");
    } else if (LockedKiB() < locked_before + kBytes / 1024) {
      // AddressSanitizer makes mlock a no-op: its shadow memory cannot be locked.
      MESSAGE("SKIPPED: mlock succeeded but locked nothing (a sanitized build); the normal "
              "build runs this");
      munlock(mapping, kBytes);
    } else {
      CHECK(madvise(bytes, kBytes, MADV_DONTNEED) != 0);  // the reason ZeroMemory exists
      fill_and_zero();
      munlock(mapping, kBytes);
    }
  }
  munmap(mapping, kBytes);
}

TEST_CASE("LogThrottle lets one message an interval through and counts the rest") {
  LogThrottle throttle(std::chrono::seconds(1));
  std::uint64_t held_back = 99;
  CHECK(throttle.Allow(&held_back));
  CHECK(held_back == 0);
  for (int i = 0; i < 5; ++i) CHECK_FALSE(throttle.Allow(&held_back));
  // Once the interval has passed, the next one goes through and says how many did not.
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  CHECK(throttle.Allow(&held_back));
  CHECK(held_back == 5);
  CHECK_FALSE(throttle.Allow(&held_back));
}

TEST_CASE("Quote keeps a message on one line") {
  CHECK(Quote("plain") == "'plain'");
  CHECK(Quote(std::string("a\nb\x7f", 4)) == "'a\\x0ab\\x7f'");
}

}  // namespace
}  // namespace memlend
