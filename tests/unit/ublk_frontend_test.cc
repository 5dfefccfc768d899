// Unit tests for the ublk adapter's mapping of requests onto a Device: sectors to byte
// offsets, each operation's Device call and result, and refusal of requests that do not
// fit. No kernel is involved (tests/vm/ublk_test.sh covers the real driver).
#include "frontend/ublk_frontend.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "frontend/deferred_io.h"

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

TEST_CASE("ServeUblkBatch serves reads and writes together with ServeUblkRequest's results") {
  Fixture f;
  Bytes first = Pattern(8192, 1);
  Bytes second = Pattern(4096, 2);
  Bytes refused(4096);
  std::vector<ublk::IoRequest> writes = {Request(ublk::IoOp::kWrite, 0, 16, &first),
                                         Request(ublk::IoOp::kWrite, 64, 8, &second),
                                         Request(ublk::IoOp::kWrite, kDeviceBytes / 512, 8,
                                                 &refused),
                                         Request(ublk::IoOp::kFlush, 0, 0)};
  std::vector<int> results(writes.size());
  ServeUblkBatch(f.device, writes, results);
  CHECK(results == std::vector<int>{8192, 4096, -EINVAL, 0});
  Bytes back_first(8192);
  Bytes back_second(4096);
  std::vector<ublk::IoRequest> reads = {Request(ublk::IoOp::kRead, 64, 8, &back_second),
                                        Request(ublk::IoOp::kRead, 0, 16, &back_first)};
  std::vector<int> read_results(reads.size());
  ServeUblkBatch(f.device, reads, read_results);
  CHECK(read_results == std::vector<int>{4096, 8192});
  CHECK(back_first == first);
  CHECK(back_second == second);
}

// Collects what DeferredIo completes, and lets a test wait for it.
class Completions final : public ublk::IoCompleter {
 public:
  void Complete(unsigned tag, int result) noexcept override {
    {
      std::lock_guard lock(mu_);
      results_[tag].push_back(result);
    }
    done_.notify_all();
  }
  // Waits (up to 10 s) until `count` completions came; returns them by tag.
  std::map<unsigned, std::vector<int>> WaitFor(std::size_t count) {
    std::unique_lock lock(mu_);
    done_.wait_for(lock, std::chrono::seconds(10), [&] {
      std::size_t n = 0;
      for (const auto& [tag, list] : results_) n += list.size();
      return n >= count;
    });
    return results_;
  }

 private:
  std::mutex mu_;
  std::condition_variable done_;
  std::map<unsigned, std::vector<int>> results_;
};

TEST_CASE("DeferredIo serves what it is handed on its own thread and completes each once") {
  Fixture f;
  Completions completions;
  Bytes data = Pattern(16384, 7);
  Bytes back(16384);
  {
    DeferredIo deferred(f.device, /*depth=*/8, /*realtime=*/false);
    ublk::IoRequest write = Request(ublk::IoOp::kWrite, 0, 32, &data);
    write.tag = 3;
    write.completer = &completions;
    deferred.Submit(std::span(&write, 1));
    REQUIRE(completions.WaitFor(1)[3] == std::vector<int>{16384});
    ublk::IoRequest requests[3] = {Request(ublk::IoOp::kRead, 0, 32, &back),
                                   Request(ublk::IoOp::kDiscard, 64, 8),
                                   Request(ublk::IoOp::kRead, kDeviceBytes / 512, 8, &back)};
    for (unsigned i = 0; i < 3; ++i) {
      requests[i].tag = i;
      requests[i].completer = &completions;
    }
    deferred.Submit(requests);
    deferred.Kick();  // nothing to fetch ahead: harmless
  }  // the destructor serves whatever is left before it returns
  const auto results = completions.WaitFor(4);
  CHECK(results.at(0) == std::vector<int>{16384});
  CHECK(results.at(1) == std::vector<int>{0});
  CHECK(results.at(2) == std::vector<int>{-EINVAL});
  CHECK(results.at(3) == std::vector<int>{16384});
  CHECK(back == data);
}

TEST_CASE("A device with only a local store never makes a ublk request wait") {
  Fixture f;
  Bytes data = Pattern(8192, 9);
  REQUIRE(ServeUblkRequest(f.device, Request(ublk::IoOp::kWrite, 0, 16, &data)) == 8192);
  CHECK_FALSE(UblkRequestMustWait(f.device, Request(ublk::IoOp::kRead, 0, 16, &data)));
  CHECK_FALSE(UblkRequestMustWait(f.device, Request(ublk::IoOp::kRead, 1000, 8, &data)));
  CHECK_FALSE(UblkRequestMustWait(f.device, Request(ublk::IoOp::kWrite, 0, 16, &data)));
  CHECK_FALSE(UblkRequestMustWait(f.device, Request(ublk::IoOp::kDiscard, 0, 16)));
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
