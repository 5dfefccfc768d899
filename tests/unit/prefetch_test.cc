// Unit tests for reads that fetch ahead and writes that go around the local store: the run
// detection of SequentialPrefetch, and Device over a Tiering whose remote tier is a page
// store in memory that counts its batches (ReadMany with prefetch, RunReadAhead, WriteMany,
// dropping clean pages at no cost, keeping a page whose remote copy was lost).
#include "store/prefetch.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <vector>

#include "memory_remote.h"
#include "store/device.h"
#include "store/local_store.h"
#include "store/tiering.h"

namespace memlend {
namespace {

using Bytes = std::vector<std::byte>;
using testing::MemoryRemote;

// The contents of device page `page`: its number in every word, so that a page read from the
// wrong place shows.
Bytes PageOf(std::uint64_t page, std::uint64_t version = 0) {
  Bytes bytes(kPageSize);
  for (std::size_t i = 0; i < kPageSize; i += 8) {
    const std::uint64_t word = (page + 1) * 1000003 + version * 7 + i;
    std::memcpy(bytes.data() + i, &word, 8);
  }
  return bytes;
}

// A device of `device_pages` over a local store of `local_pages` and a MemoryRemote.
struct Fixture {
  explicit Fixture(std::uint64_t local_pages, std::uint64_t device_pages = 4096) {
    auto remote_store = std::make_unique<MemoryRemote>();
    remote = remote_store.get();
    tiers = std::make_unique<Tiering>(
        std::make_unique<LocalStore>(local_pages * kPageSize, Compression::kNone),
        std::move(remote_store), nullptr);
    device = std::make_unique<Device>("prefetch", device_pages * kPageSize, *tiers);
  }
  // Writes pages [first, first + count) one at a time, then moves every local page to the
  // remote tier.
  void WriteAndEvict(std::uint64_t first, std::uint64_t count) {
    for (std::uint64_t page = first; page < first + count; ++page) {
      REQUIRE(device->Write(page * kPageSize, PageOf(page)) == 0);
    }
    while (device->Counts().local > 0) {
      if (device->DemoteColdPages(1024) == 0) break;
    }
    REQUIRE(device->Counts().local == 0);
  }
  // ReadMany of pages [first, first + count) as one request; checks the bytes.
  void ReadRun(std::uint64_t first, std::uint64_t count) {
    Bytes out(count * kPageSize);
    Device::ReadRequest request{first * kPageSize, out, 0};
    device->ReadMany(std::span(&request, 1));
    REQUIRE(request.result == 0);
    for (std::uint64_t i = 0; i < count; ++i) {
      const Bytes want = PageOf(first + i);
      REQUIRE(std::equal(want.begin(), want.end(), out.begin() + i * kPageSize));
    }
  }
  // Reads the whole page `page` as the kernel would (one page, Device::Read).
  void ReadPage(std::uint64_t page, std::uint64_t version = 0) {
    Bytes out(kPageSize);
    REQUIRE(device->Read(page * kPageSize, out) == 0);
    REQUIRE(out == PageOf(page, version));
  }

  MemoryRemote* remote;
  std::unique_ptr<Tiering> tiers;
  std::unique_ptr<Device> device;
};

}  // namespace

TEST_CASE("SequentialPrefetch follows runs and ignores scattered misses") {
  SequentialPrefetch prefetch;
  // A first miss starts a run and fetches nothing.
  CHECK(prefetch.OnMiss(1000, 8) == 0);
  // Its continuation fetches kMinPages, then twice as many each time, up to kMaxPages.
  std::uint64_t next = 1008;
  std::uint64_t want = SequentialPrefetch::kMinPages;
  for (int i = 0; i < 8; ++i) {
    const std::uint64_t window = prefetch.OnMiss(next, 8);
    CHECK(window == want);
    next += 8 + window;
    want = std::min(want * 2, SequentialPrefetch::kMaxPages);
  }
  // Misses far from every run fetch nothing.
  CHECK(prefetch.OnMiss(50000, 8) == 0);
  CHECK(prefetch.OnMiss(90000, 1) == 0);
  // The first run is still followed.
  CHECK(prefetch.OnMiss(next, 8) == SequentialPrefetch::kMaxPages);
}

TEST_CASE("SequentialPrefetch: a trigger in the last window fetches the next one") {
  SequentialPrefetch prefetch;
  CHECK(prefetch.OnMiss(0, 8) == 0);
  const std::uint64_t window = prefetch.OnMiss(8, 8);  // fetches [16, 16 + window)
  REQUIRE(window == SequentialPrefetch::kMinPages);
  const SequentialPrefetch::Range next = prefetch.OnTrigger(16);
  CHECK(next.first == 16 + window);
  CHECK(next.count == 2 * window);
  // The one after that starts where it ends.
  const SequentialPrefetch::Range after = prefetch.OnTrigger(next.first);
  CHECK(after.first == next.first + next.count);
  // A page of no run triggers nothing.
  CHECK(prefetch.OnTrigger(100000).count == 0);
}

TEST_CASE("SequentialPrefetch stops fetching while most of what it fetched goes unread") {
  SequentialPrefetch prefetch;
  CHECK(prefetch.Paying());
  // Too little evidence yet: wasted pages alone do not stop it.
  for (std::uint64_t i = 0; i + 1 < SequentialPrefetch::kMinEvidence; ++i) prefetch.NoteWasted();
  CHECK(prefetch.Paying());
  prefetch.NoteWasted();
  CHECK_FALSE(prefetch.Paying());
  // A run is still followed, but its continuations fetch nothing, except one probe in
  // kProbeEvery; triggers fetch nothing.
  CHECK(prefetch.OnMiss(1000, 8) == 0);
  std::uint64_t next = 1008;
  unsigned fetched = 0;
  for (unsigned i = 0; i < SequentialPrefetch::kProbeEvery; ++i) {
    const std::uint64_t window = prefetch.OnMiss(next, 8);
    CHECK((window == 0 || window == SequentialPrefetch::kMinPages));
    fetched += window != 0;
    next += 8 + window;
  }
  CHECK(fetched == 1);
  CHECK(prefetch.OnTrigger(next - SequentialPrefetch::kMinPages).count == 0);
  // Reads of fetched pages outweigh the waste: windows again.
  for (std::uint64_t i = 0; i < SequentialPrefetch::kMinEvidence; ++i) prefetch.NoteRead();
  CHECK(prefetch.Paying());
  CHECK(prefetch.OnMiss(next, 8) != 0);
}

TEST_CASE("SequentialPrefetch forgets old waste") {
  SequentialPrefetch prefetch;
  for (std::uint64_t i = 0; i < 4 * SequentialPrefetch::kMinEvidence; ++i) prefetch.NoteWasted();
  REQUIRE_FALSE(prefetch.Paying());
  // Pages read since then outweigh it once the old counts have been halved.
  for (std::uint64_t i = 0; i < SequentialPrefetch::kHistory; ++i) {
    prefetch.NoteRead();
    prefetch.OnMiss(1000000 + 1000 * i, 1);
  }
  CHECK(prefetch.Paying());
  for (std::uint64_t i = 0; i < 2 * SequentialPrefetch::kHistory; ++i) {
    prefetch.NoteWasted();
    prefetch.OnMiss(1000, 1);
  }
  CHECK_FALSE(prefetch.Paying());
}

TEST_CASE("SequentialPrefetch follows several runs at once") {
  SequentialPrefetch prefetch;
  const std::uint64_t starts[] = {0, 100000, 200000, 300000};
  for (const std::uint64_t start : starts) CHECK(prefetch.OnMiss(start, 8) == 0);
  for (const std::uint64_t start : starts) {
    CHECK(prefetch.OnMiss(start + 8, 8) == SequentialPrefetch::kMinPages);
  }
}

TEST_CASE("A sequential read fetches ahead; the pages read are dropped again at no cost") {
  Fixture f(/*local_pages=*/2048);
  f.WriteAndEvict(0, 1024);
  const std::uint64_t remote_pages = f.remote->live();
  CHECK(remote_pages == 1024);
  // Other pages keep the store over its low watermark, as on a host that swaps: then no
  // read promotes a page (that would move it, and write it back later).
  for (std::uint64_t page = 2000; page < 3700; ++page) {
    REQUIRE(f.device->Write(page * kPageSize, PageOf(page)) == 0);
  }
  const std::uint64_t dirty = f.device->Counts().local;
  const int batches_before = f.remote->read_batches;
  // As the kernel reads: clusters of 8 pages, one after another.
  for (std::uint64_t page = 0; page < 512; page += 8) f.ReadRun(page, 8);
  const DeviceIoCounts io = f.device->IoCounts();
  INFO("prefetched " << io.prefetched << ", hits " << io.prefetch_hits << ", trips "
                     << f.remote->read_batches - batches_before);
  CHECK(io.prefetched > 0);
  // Far fewer round trips than the 64 reads.
  CHECK(f.remote->read_batches - batches_before < 64 / 4);
  // Every page fetched ahead and read was dropped from RAM, its remote copy kept: nothing
  // was written back and the remote tier still holds every page.
  CHECK(io.prefetch_hits > 0);
  CHECK(f.remote->live() == remote_pages);
  CHECK(f.remote->pages_written == remote_pages);
  CHECK(io.promotions == 0);
  const DevicePageCounts counts = f.device->Counts();
  CHECK(counts.local == dirty + counts.remote_copies);
  CHECK(counts.remote + counts.remote_copies == remote_pages);
  CHECK(counts.remote_copies == io.prefetched - io.prefetch_hits);
  // Dropping what is left costs no write either: an eviction scan drops those pages first
  // (the dirty ones were read by nobody and cost a write each).
  const std::uint64_t copies = counts.remote_copies;
  const std::uint64_t written = f.remote->pages_written;
  std::uint64_t demoted = 0;
  for (int i = 0; i < 100 && f.device->Counts().remote_copies > 0; ++i) {
    demoted += f.device->DemoteColdPages(64);
  }
  CHECK(f.device->Counts().remote_copies == 0);
  CHECK(f.remote->pages_written - written == demoted - copies);
  CHECK(f.device->IoCounts().prefetch_wasted == io.prefetched - io.prefetch_hits);
  // The data is all there.
  for (std::uint64_t page = 0; page < 1024; page += 8) f.ReadRun(page, 8);
}

TEST_CASE("Scattered reads fetch nothing ahead") {
  Fixture f(/*local_pages=*/512, /*device_pages=*/1 << 18);
  constexpr std::uint64_t kStride = 2003;  // far beyond any run's slack
  for (std::uint64_t i = 0; i < 100; ++i) {
    REQUIRE(f.device->Write(i * kStride * kPageSize, PageOf(i * kStride)) == 0);
  }
  while (f.device->Counts().local > 0) {
    if (f.device->DemoteColdPages(1024) == 0) break;
  }
  for (std::uint64_t i = 0; i < 100; ++i) f.ReadRun(((i * 37) % 100) * kStride, 1);
  CHECK(f.device->IoCounts().remote_reads == 100);
  CHECK(f.device->IoCounts().prefetched == 0);
}

TEST_CASE("Reading a window's first page asks for the next window, fetched by RunReadAhead") {
  Fixture f(/*local_pages=*/1024);
  f.WriteAndEvict(0, 2048);
  f.ReadRun(0, 8);   // starts a run
  f.ReadRun(8, 8);   // continues it: [16, 24) fetched ahead, 16 carries the trigger
  REQUIRE(f.device->IoCounts().prefetched == SequentialPrefetch::kMinPages);
  CHECK_FALSE(f.device->ReadAheadWanted());
  f.ReadPage(16);
  CHECK(f.device->ReadAheadWanted());
  const std::uint64_t before = f.device->IoCounts().prefetched;
  CHECK_FALSE(f.device->RunReadAhead());  // one window asked for, none left
  CHECK_FALSE(f.device->ReadAheadWanted());
  CHECK(f.device->IoCounts().read_ahead_trips == 1);
  CHECK(f.device->IoCounts().prefetched == before + 2 * SequentialPrefetch::kMinPages);
  // The reader goes on and finds every page in RAM: no read of its own goes to a peer.
  const std::uint64_t trips = f.device->IoCounts().remote_read_trips;
  for (std::uint64_t page = 17; page < 64; ++page) {
    f.ReadPage(page);
    while (f.device->RunReadAhead()) {
    }
  }
  CHECK(f.device->IoCounts().remote_read_trips - trips ==
        f.device->IoCounts().read_ahead_trips - 1);
}

TEST_CASE("A page fetched ahead and then written keeps the new data and frees its remote copy") {
  Fixture f(/*local_pages=*/512);
  f.WriteAndEvict(0, 256);
  f.ReadRun(0, 8);
  f.ReadRun(8, 8);  // fetches [16, 24) ahead
  REQUIRE(f.device->Counts().remote_copies == SequentialPrefetch::kMinPages);
  const std::size_t live = f.remote->live();
  REQUIRE(f.device->Write(20 * kPageSize, PageOf(20, 1)) == 0);
  CHECK(f.remote->live() == live - 1);
  CHECK(f.device->Counts().remote_copies == SequentialPrefetch::kMinPages - 1);
  CHECK(f.device->IoCounts().prefetch_wasted == 1);
  f.ReadPage(20, 1);
  // Trimmed: the same.
  REQUIRE(f.device->Trim(21 * kPageSize, kPageSize) == 0);
  CHECK(f.remote->live() == live - 2);
  Bytes out(kPageSize);
  REQUIRE(f.device->Read(21 * kPageSize, out) == 0);
  CHECK(std::all_of(out.begin(), out.end(), [](std::byte b) { return b == std::byte{0}; }));
}

TEST_CASE("A page fetched ahead whose remote copy is lost stays in RAM when dropped") {
  Fixture f(/*local_pages=*/512);
  f.WriteAndEvict(0, 256);
  f.ReadRun(0, 8);
  f.ReadRun(8, 8);  // fetches [16, 24) ahead
  REQUIRE(f.device->Counts().remote_copies == SequentialPrefetch::kMinPages);
  f.remote->LoseAll();
  // An eviction scan would drop them for nothing; their copies are gone, so each is kept as
  // a page of its own and written out again like any other.
  const std::uint64_t written = f.remote->pages_written;
  for (int i = 0; i < 4; ++i) f.device->DemoteColdPages(1024);
  CHECK(f.device->Counts().remote_copies == 0);
  // (The pages read on demand before were moved into RAM, and go out again too.)
  CHECK(f.remote->pages_written ==
        written + SequentialPrefetch::kMinPages + f.device->IoCounts().promotions);
  for (std::uint64_t page = 16; page < 24; ++page) f.ReadPage(page);
}

TEST_CASE("WriteMany sends whole pages around a full local store in one batch") {
  Fixture f(/*local_pages=*/64);
  // Fill the store to its low watermark.
  std::uint64_t page = 0;
  while (!f.device->WritesGoAround()) {
    REQUIRE(f.device->Write(page * kPageSize, PageOf(page)) == 0);
    ++page;
  }
  const std::uint64_t local = f.device->Counts().local;
  const int batches = f.remote->write_batches;
  // Three requests of 32 pages each: more than the store could take.
  Bytes data(96 * kPageSize);
  for (std::uint64_t i = 0; i < 96; ++i) {
    const Bytes p = PageOf(1000 + i);
    std::copy(p.begin(), p.end(), data.begin() + i * kPageSize);
  }
  Device::WriteRequest requests[3];
  for (int r = 0; r < 3; ++r) {
    requests[r].offset = (1000 + 32 * r) * kPageSize;
    requests[r].data = std::span<const std::byte>(data).subspan(32 * r * kPageSize, 32 * kPageSize);
  }
  f.device->WriteMany(requests);
  for (const auto& request : requests) CHECK(request.result == 0);
  CHECK(f.remote->write_batches == batches + 1);
  CHECK(f.device->IoCounts().written_around == 96);
  CHECK(f.device->Counts().local == local);
  CHECK(f.device->Counts().remote == 96);
  for (std::uint64_t i = 0; i < 96; ++i) f.ReadPage(1000 + i);
  // Writing them again replaces the remote copies; nothing leaks.
  f.device->WriteMany(requests);
  CHECK(f.remote->live() == f.device->Counts().remote + f.device->Counts().remote_copies);
}

TEST_CASE("WriteMany under the low watermark writes into the local store") {
  Fixture f(/*local_pages=*/256);
  Bytes data(8 * kPageSize);
  for (std::uint64_t i = 0; i < 8; ++i) {
    const Bytes p = PageOf(i);
    std::copy(p.begin(), p.end(), data.begin() + i * kPageSize);
  }
  Device::WriteRequest request{0, data, 0};
  f.device->WriteMany(std::span(&request, 1));
  CHECK(request.result == 0);
  CHECK(f.device->Counts().local == 8);
  CHECK(f.device->IoCounts().written_around == 0);
}

}  // namespace memlend
