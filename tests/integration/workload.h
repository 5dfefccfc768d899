// Random workloads shared by several integration tests: random extents of every shape the
// daemon's request splitting distinguishes, random page contents, and a session of random
// requests checked against a ShadowDevice.

#ifndef MEMLEND_TESTS_INTEGRATION_WORKLOAD_H_
#define MEMLEND_TESTS_INTEGRATION_WORKLOAD_H_

#include <cstdint>
#include <ostream>
#include <random>
#include <string>

#include "harness.h"

namespace memlend::integration {

// One I/O extent, printed in failure messages.
struct Extent {
  uint64_t offset = 0;
  uint64_t length = 0;
};

std::ostream& operator<<(std::ostream& out, const Extent& e);

// Picks an extent inside [base, base + size) of one of four shapes, so that every path of the
// daemon's request splitting is taken: sub-page (possibly straddling two pages), whole aligned
// pages, unaligned multi-page, and a range that ends exactly at the end of the area.
// REQUIRES: size is a multiple of 4096 and at least 256 KiB.
Extent RandomExtent(std::mt19937_64& rng, uint64_t base, uint64_t size);

// Picks page content: mostly random, some compressible (text, one repeated byte), some zeros.
Content RandomContent(std::mt19937_64& rng);

// Runs `operations` random requests (40% writes, 40% reads, 10% WRITE_ZEROES, 5% TRIM, 5%
// FLUSH) against [base, base + size) of the device behind client, applies each to shadow and
// checks every read against it, then reads the whole area back. Returns "" on success or a
// description of the first failure (a mismatch or a failed request). Uses no doctest assertions,
// so several threads may run sessions at once with their own clients on disjoint areas of one
// shadow.
std::string RandomIoSession(NbdClient& client, ShadowDevice& shadow, uint64_t base, uint64_t size,
                            int operations, std::mt19937_64& rng);

}  // namespace memlend::integration

#endif  // MEMLEND_TESTS_INTEGRATION_WORKLOAD_H_
