// Unit tests for the ublk adapter's mapping of requests onto a Device: sectors to byte
// offsets, each operation's Device call and result, and refusal of requests that do not
// fit. No kernel is involved (tests/vm/ublk_test.sh covers the real driver).
#include "frontend/ublk_frontend.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "store/device.h"
#include "store/local_store.h"
#include "store/tiering.h"

namespace memlend {
namespace {

using Bytes = std::vector<std::byte>;

constexpr std::uint64_t kDeviceBytes = 1 << 20;

struct Fixture {
  std::unique_ptr<Tiering> tiers = std::make_unique<Tiering>(
      std::make_unique<LocalStore>(kDeviceBytes, Compression::kNone), nullptr);
  Device device{"ublk-unit", kDeviceBytes, *tiers};
};

ublk::IoRequest Request(ublk::IoOp op, std::uint64_t sector, std::uint32_t count,
                        Bytes* buffer = nullptr) {
  ublk::IoRequest request;
  request.op = op;
  request.start_sector = sector;
  request.sector_count = count;
  if (buffer != nullptr) request.buffer = {buffer->data(), buffer->size()};
  return request;
}

Bytes Pattern(std::size_t length, unsigned seed) {
  Bytes bytes(length);
  for (std::size_t i = 0; i < length; ++i) bytes[i] = static_cast<std::byte>((i * 131 + seed) | 1);
  return bytes;
}

TEST_CASE("SectorsToBytes maps 512-byte sectors and refuses what does not fit") {
  const auto range = SectorsToBytes(8, 16, kDeviceBytes);
  REQUIRE(range.has_value());
  CHECK(range->offset == 4096);
  CHECK(range->length == 8192);
  const std::uint64_t sectors = kDeviceBytes / 512;
  CHECK(SectorsToBytes(sectors - 8, 8, kDeviceBytes).has_value());
  CHECK_FALSE(SectorsToBytes(sectors - 8, 9, kDeviceBytes).has_value());
  CHECK_FALSE(SectorsToBytes(sectors, 1, kDeviceBytes).has_value());
  CHECK_FALSE(SectorsToBytes(0, 0, kDeviceBytes).has_value());
  CHECK_FALSE(SectorsToBytes(~std::uint64_t{0} - 1, 4, kDeviceBytes).has_value());
  CHECK(SectorsToBytes(0, 0xffffffffu, std::uint64_t{1} << 50).value().length ==
        std::uint64_t{0xffffffffu} * 512);
}

TEST_CASE("ServeUblkRequest writes and reads at sector offsets, sub-page too") {
  Fixture f;
  Bytes data = Pattern(8192, 7);
  CHECK(ServeUblkRequest(f.device, Request(ublk::IoOp::kWrite, 8, 16, &data)) == 8192);
  Bytes back(8192);
  CHECK(ServeUblkRequest(f.device, Request(ublk::IoOp::kRead, 8, 16, &back)) == 8192);
  CHECK(back == data);
  // The same bytes through the Device directly, at 8 * 512.
  Bytes direct(8192);
  REQUIRE(f.device.Read(4096, direct) == 0);
  CHECK(direct == data);

  // One 512-byte sector in the middle of a page.
  Bytes sector = Pattern(512, 99);
  CHECK(ServeUblkRequest(f.device, Request(ublk::IoOp::kWrite, 11, 1, &sector)) == 512);
  Bytes page(4096);
  CHECK(ServeUblkRequest(f.device, Request(ublk::IoOp::kRead, 8, 8, &page)) == 4096);
  CHECK(std::equal(page.begin() + 3 * 512, page.begin() + 4 * 512, sector.begin()));
  CHECK(std::equal(page.begin(), page.begin() + 3 * 512, data.begin()));
}

TEST_CASE("ServeUblkRequest discards and writes zeroes, and flushes") {
  Fixture f;
  Bytes data = Pattern(16384, 3);
  REQUIRE(ServeUblkRequest(f.device, Request(ublk::IoOp::kWrite, 0, 32, &data)) == 16384);
  CHECK(ServeUblkRequest(f.device, Request(ublk::IoOp::kDiscard, 0, 8)) == 0);
  CHECK(ServeUblkRequest(f.device, Request(ublk::IoOp::kWriteZeroes, 16, 8)) == 0);
  CHECK(ServeUblkRequest(f.device, Request(ublk::IoOp::kFlush, 0, 0)) == 0);
  Bytes back(16384);
  REQUIRE(ServeUblkRequest(f.device, Request(ublk::IoOp::kRead, 0, 32, &back)) == 16384);
  const Bytes zeros(4096, std::byte{0});
  CHECK(std::equal(back.begin(), back.begin() + 4096, zeros.begin()));
  CHECK(std::equal(back.begin() + 4096, back.begin() + 8192, data.begin() + 4096));
  CHECK(std::equal(back.begin() + 8192, back.begin() + 12288, zeros.begin()));
  CHECK(std::equal(back.begin() + 12288, back.end(), data.begin() + 12288));
  const DevicePageCounts counts = f.device.Counts();
  CHECK(counts.local == 2);
}

TEST_CASE("ServeUblkRequest refuses requests that do not fit, touching nothing") {
  Fixture f;
  const std::uint64_t sectors = kDeviceBytes / 512;
  Bytes buffer(4096);
  CHECK(ServeUblkRequest(f.device, Request(ublk::IoOp::kWrite, sectors - 4, 8, &buffer)) ==
        -EINVAL);
  CHECK(ServeUblkRequest(f.device, Request(ublk::IoOp::kRead, sectors, 8, &buffer)) == -EINVAL);
  CHECK(ServeUblkRequest(f.device, Request(ublk::IoOp::kDiscard, sectors - 4, 8)) == -EINVAL);
  // A buffer that does not match the sector count.
  CHECK(ServeUblkRequest(f.device, Request(ublk::IoOp::kWrite, 0, 4, &buffer)) == -EINVAL);
  CHECK(f.device.Counts().mapped() == 0);
}

TEST_CASE("ServeUblkRequest passes the Device's ENOSPC through") {
  // A local store of one page, no other tier: the second page cannot be stored.
  auto tiers =
      std::make_unique<Tiering>(std::make_unique<LocalStore>(4096, Compression::kNone), nullptr);
  Device device("tiny", kDeviceBytes, *tiers);
  Bytes data = Pattern(8192, 5);
  CHECK(ServeUblkRequest(device, Request(ublk::IoOp::kWrite, 0, 16, &data)) == -ENOSPC);
}

TEST_CASE("AttachUblk without the ublk driver throws one line and leaves nothing") {
  if (UblkAvailable()) {
    MESSAGE("this kernel has ublk: the missing-driver case is not tested here");
    return;
  }
  Fixture f;
  auto device = std::make_shared<Device>("no-ublk", kDeviceBytes, *f.tiers);
  try {
    AttachUblk(device, UblkOptions{});
    FAIL("AttachUblk succeeded without /dev/ublk-control");
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    CHECK(what.find("ublk") != std::string::npos);
    CHECK(what.find("/dev/ublk-control") != std::string::npos);
    CHECK(what.find('\n') == std::string::npos);
  }
  CHECK(device.use_count() == 1);  // the failed frontend let go of it
}

TEST_CASE("AttachUblk refuses bad options before it asks the kernel for anything") {
  Fixture f;
  auto device = std::make_shared<Device>("bad-options", kDeviceBytes, *f.tiers);
  UblkOptions options;
  options.queue_depth = 0;
  CHECK_THROWS_WITH_AS(AttachUblk(device, options), doctest::Contains("queue depth"),
                       std::runtime_error);
  options = UblkOptions{};
  options.max_io_bytes = 3000;
  CHECK_THROWS_WITH_AS(AttachUblk(device, options), doctest::Contains("max I/O size"),
                       std::runtime_error);
  CHECK_THROWS_AS(AttachUblk(nullptr, UblkOptions{}), std::runtime_error);
  CHECK(device.use_count() == 1);
}

}  // namespace
}  // namespace memlend
