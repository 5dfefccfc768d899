// Unit tests for the lender: LenderPool's rules (grants, ranges, active pages, eviction,
// accounting) called directly, and LenderService over real loopback TCP driven by
// PeerTestClient.
#include <netinet/in.h>
#include <sys/socket.h>

#include <doctest/doctest.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "peer/lender_pool.h"
#include "peer/lender_service.h"
#include "peer/peer_test_client.h"

namespace memlend::peer {
namespace {

constexpr std::uint64_t kMiB = 1024 * 1024;
using Page = std::array<std::byte, kPageBytes>;

// A page whose every 8 bytes say `seed` and their position, so pages differ and a page
// read from the wrong place or offset is caught.
Page MakePage(std::uint64_t seed) {
  Page page;
  for (std::size_t i = 0; i < kPageBytes; i += 8) {
    const std::uint64_t v = seed * 0x9e3779b97f4a7c15ULL + i;
    std::memcpy(page.data() + i, &v, 8);
  }
  return page;
}

std::vector<std::byte> MakeBytes(std::size_t length, std::uint64_t seed) {
  std::vector<std::byte> bytes(length);
  std::mt19937_64 rng(seed);
  for (std::size_t i = 0; i < length; i += 8) {
    const std::uint64_t v = rng();
    std::memcpy(bytes.data() + i, &v, std::min<std::size_t>(8, length - i));
  }
  return bytes;
}

bool AllZero(std::span<const std::byte> bytes) {
  for (const std::byte b : bytes) {
    if (b != std::byte{0}) return false;
  }
  return true;
}

HandleBody Handle(std::uint32_t pool, std::uint64_t object, std::uint32_t index) {
  return HandleBody{pool, index, object};
}

Status PutPage(LenderPool& pool, SessionId session, const HandleBody& handle, bool ephemeral,
               const Page& page) {
  return pool.Put(session, handle, ephemeral, std::span<const std::byte, kPageBytes>(page));
}

// Gets a page; nullopt on any status but kOk.
std::optional<Page> GetPage(LenderPool& pool, SessionId session, const HandleBody& handle) {
  Page out;
  if (pool.Get(session, handle, std::span<std::byte, kPageBytes>(out)) != Status::kOk) {
    return std::nullopt;
  }
  return out;
}

Status WriteRange(LenderPool& pool, SessionId session, std::uint32_t sid, std::uint32_t offset,
                  std::span<const std::byte> data) {
  return pool.Write(session, RangeBody{sid, offset, static_cast<std::uint32_t>(data.size()), 0},
                    data);
}

Status ReadRange(LenderPool& pool, SessionId session, std::uint32_t sid, std::uint32_t offset,
                 std::span<std::byte> out) {
  return pool.Read(session, RangeBody{sid, offset, static_cast<std::uint32_t>(out.size()), 0},
                   out);
}

// Records every eviction the pool reports.
struct EvictionLog {
  struct Entry {
    SessionId owner;
    HandleBody handle;
  };
  std::vector<Entry> entries;
  void Attach(LenderPool& pool) {
    pool.SetEvictionHandler([this](SessionId owner, const HandleBody& handle) {
      entries.push_back({owner, handle});
    });
  }
};

}  // namespace

TEST_SUITE("lender_pool") {

TEST_CASE("the pool is whole superpages and needs at least one") {
  CHECK_THROWS_AS(LenderPool(0), std::invalid_argument);
  CHECK_THROWS_AS(LenderPool(kSuperpageBytes - 1), std::invalid_argument);
  LenderPool pool(5 * kMiB);  // two superpages and a half
  CHECK(pool.pool_bytes() == 4 * kMiB);
  CHECK(pool.total_pages() == 2 * kPagesPerSuperpage);
  const LenderPoolStats stats = pool.Stats();
  CHECK(stats.free_pages == stats.total_pages);
  CHECK(stats.used_bytes == 0);
  CHECK(stats.borrowers == 0);
}

TEST_CASE("superpages are granted until none is left; a free makes room; SIDs never repeat") {
  LenderPool pool(4 * kSuperpageBytes);
  std::vector<std::uint32_t> sids;
  std::set<std::uint32_t> seen;
  for (int i = 0; i < 4; ++i) {
    std::uint32_t sid = 0;
    REQUIRE(pool.AllocSuperpage(1, &sid) == Status::kOk);
    if (!sids.empty()) CHECK(sid > sids.back());
    sids.push_back(sid);
    seen.insert(sid);
  }
  std::uint32_t sid = 0;
  CHECK(pool.AllocSuperpage(1, &sid) == Status::kNoSpace);
  CHECK(pool.AllocSuperpage(2, &sid) == Status::kNoSpace);
  CHECK(pool.Stats().free_pages == 0);

  CHECK(pool.FreeSuperpage(1, sids[1]) == Status::kOk);
  CHECK(pool.Stats().free_pages == kPagesPerSuperpage);
  REQUIRE(pool.AllocSuperpage(2, &sid) == Status::kOk);
  CHECK(seen.count(sid) == 0);  // a new SID for the same superpage
  CHECK(sid > sids.back());
  CHECK(pool.AllocSuperpage(2, &sid) == Status::kNoSpace);
  // The freed SID is dead: nobody may use it, not even its old owner.
  CHECK(pool.FreeSuperpage(1, sids[1]) == Status::kNotPermitted);
  Page page = MakePage(1);
  CHECK(WriteRange(pool, 1, sids[1], 0, page) == Status::kNotPermitted);
}

TEST_CASE("writes and reads round-trip at several offsets and lengths") {
  LenderPool pool(2 * kSuperpageBytes);
  std::uint32_t a = 0;
  std::uint32_t b = 0;
  REQUIRE(pool.AllocSuperpage(1, &a) == Status::kOk);
  REQUIRE(pool.AllocSuperpage(1, &b) == Status::kOk);

  // A fresh superpage reads as zeros.
  std::vector<std::byte> whole(kSuperpageBytes, std::byte{0x5a});
  REQUIRE(ReadRange(pool, 1, a, 0, whole) == Status::kOk);
  CHECK(AllZero(whole));

  struct Case {
    std::uint32_t offset;
    std::uint32_t length;
  };
  const Case cases[] = {{0, kPageBytes},
                        {kPageBytes, 3 * kPageBytes},
                        {kSuperpageBytes - kPageBytes, kPageBytes},
                        {256 * kPageBytes, 64 * kPageBytes}};
  std::uint64_t seed = 10;
  for (const Case& c : cases) {
    CAPTURE(c.offset);
    CAPTURE(c.length);
    const std::vector<std::byte> data = MakeBytes(c.length, ++seed);
    REQUIRE(WriteRange(pool, 1, a, c.offset, data) == Status::kOk);
    std::vector<std::byte> out(c.length);
    REQUIRE(ReadRange(pool, 1, a, c.offset, out) == Status::kOk);
    CHECK(out == data);
  }
  // The whole superpage at once, into the other one; the first is untouched by it.
  const std::vector<std::byte> big = MakeBytes(kSuperpageBytes, 99);
  REQUIRE(WriteRange(pool, 1, b, 0, big) == Status::kOk);
  REQUIRE(ReadRange(pool, 1, b, 0, whole) == Status::kOk);
  CHECK(whole == big);
  std::vector<std::byte> out(kPageBytes);
  REQUIRE(ReadRange(pool, 1, a, kSuperpageBytes - kPageBytes, out) == Status::kOk);
  CHECK(out == MakeBytes(kPageBytes, 13));
}

TEST_CASE("a superpage granted again reads as zeros, not the last borrower's data") {
  LenderPool pool(kSuperpageBytes);
  std::uint32_t sid = 0;
  REQUIRE(pool.AllocSuperpage(1, &sid) == Status::kOk);
  const std::vector<std::byte> secret = MakeBytes(kSuperpageBytes, 7);
  REQUIRE(WriteRange(pool, 1, sid, 0, secret) == Status::kOk);
  REQUIRE(pool.FreeSuperpage(1, sid) == Status::kOk);
  REQUIRE(pool.AllocSuperpage(2, &sid) == Status::kOk);
  std::vector<std::byte> out(kSuperpageBytes, std::byte{1});
  REQUIRE(ReadRange(pool, 2, sid, 0, out) == Status::kOk);
  CHECK(AllZero(out));
}

TEST_CASE("another session's or an unknown SID is not permitted") {
  LenderPool pool(2 * kSuperpageBytes);
  std::uint32_t mine = 0;
  REQUIRE(pool.AllocSuperpage(1, &mine) == Status::kOk);
  const Page page = MakePage(3);
  REQUIRE(WriteRange(pool, 1, mine, 0, page) == Status::kOk);

  Page out{};
  CHECK(WriteRange(pool, 2, mine, 0, MakePage(4)) == Status::kNotPermitted);
  CHECK(ReadRange(pool, 2, mine, 0, out) == Status::kNotPermitted);
  CHECK(pool.FreeSuperpage(2, mine) == Status::kNotPermitted);
  CHECK(WriteRange(pool, 1, mine + 1000, 0, page) == Status::kNotPermitted);
  CHECK(ReadRange(pool, 1, mine + 1000, 0, out) == Status::kNotPermitted);
  CHECK(pool.FreeSuperpage(1, mine + 1000) == Status::kNotPermitted);
  // The permission check comes before the range check.
  CHECK(pool.Write(2, RangeBody{mine, 1, 0, 0}, {}) == Status::kNotPermitted);
  // None of that hurt the owner.
  REQUIRE(ReadRange(pool, 1, mine, 0, out) == Status::kOk);
  CHECK(out == page);
  CHECK(pool.Stats(1).caller_pages == kPagesPerSuperpage);
  CHECK(pool.Stats(2).caller_pages == 0);
}

TEST_CASE("ranges that are unaligned, empty or past the superpage are invalid") {
  LenderPool pool(kSuperpageBytes);
  std::uint32_t sid = 0;
  REQUIRE(pool.AllocSuperpage(1, &sid) == Status::kOk);
  std::vector<std::byte> buffer(2 * kPageBytes);
  const auto range = [&](std::uint32_t offset, std::uint32_t length) {
    return RangeBody{sid, offset, length, 0};
  };
  struct Case {
    const char* what;
    std::uint32_t offset;
    std::uint32_t length;
  };
  const Case cases[] = {
      {"zero length", 0, 0},
      {"unaligned offset", 512, kPageBytes},
      {"unaligned length", 0, kPageBytes + 1},
      {"past the end", kSuperpageBytes - kPageBytes, 2 * kPageBytes},
      {"offset at the end", kSuperpageBytes, kPageBytes},
      {"offset + length overflows 32 bits", 0xfffff000u, 2 * kPageBytes},
  };
  for (const Case& c : cases) {
    CAPTURE(c.what);
    const std::size_t bytes = std::min<std::size_t>(c.length, buffer.size());
    CHECK(pool.Write(1, range(c.offset, c.length), std::span(buffer.data(), bytes)) ==
          Status::kInvalid);
    CHECK(pool.Read(1, range(c.offset, c.length), std::span(buffer.data(), bytes)) ==
          Status::kInvalid);
  }
}

TEST_CASE("ReleaseSession frees superpages and pages of that session only") {
  LenderPool pool(4 * kSuperpageBytes);
  std::uint32_t sid = 0;
  REQUIRE(pool.AllocSuperpage(1, &sid) == Status::kOk);
  REQUIRE(pool.AllocSuperpage(1, &sid) == Status::kOk);
  for (std::uint64_t i = 0; i < 10; ++i) {
    REQUIRE(PutPage(pool, 1, Handle(1, i, 0), false, MakePage(i)) == Status::kOk);
    REQUIRE(PutPage(pool, 1, Handle(2, i, 0), true, MakePage(i)) == Status::kOk);
  }
  std::uint32_t other = 0;
  REQUIRE(pool.AllocSuperpage(2, &other) == Status::kOk);
  REQUIRE(PutPage(pool, 2, Handle(1, 5, 0), false, MakePage(55)) == Status::kOk);

  LenderPoolStats stats = pool.Stats(1);
  CHECK(stats.caller_pages == 2 * kPagesPerSuperpage + 20);
  CHECK(stats.borrowers == 2);

  pool.ReleaseSession(1);
  stats = pool.Stats(1);
  CHECK(stats.caller_pages == 0);
  CHECK(stats.borrowers == 1);
  CHECK(stats.free_pages == stats.total_pages - kPagesPerSuperpage - 1);
  CHECK_FALSE(GetPage(pool, 1, Handle(1, 3, 0)));
  CHECK(GetPage(pool, 2, Handle(1, 5, 0)) == MakePage(55));
  // A released session starts from nothing; its old SIDs are dead.
  CHECK(pool.FreeSuperpage(1, sid) == Status::kNotPermitted);
  pool.ReleaseSession(2);
  pool.ReleaseSession(3);  // never seen: nothing happens
  stats = pool.Stats();
  CHECK(stats.free_pages == stats.total_pages);
  CHECK(stats.borrowers == 0);
}

TEST_CASE("persistent pages round-trip, rewrite in place, and miss when absent") {
  LenderPool pool(kSuperpageBytes);
  for (std::uint64_t i = 0; i < 100; ++i) {
    REQUIRE(PutPage(pool, 1, Handle(7, i / 10, static_cast<std::uint32_t>(i % 10)), false,
                    MakePage(i)) == Status::kOk);
  }
  for (std::uint64_t i = 0; i < 100; ++i) {
    CHECK(GetPage(pool, 1, Handle(7, i / 10, static_cast<std::uint32_t>(i % 10))) ==
          MakePage(i));
  }
  REQUIRE(PutPage(pool, 1, Handle(7, 0, 0), false, MakePage(1000)) == Status::kOk);
  CHECK(GetPage(pool, 1, Handle(7, 0, 0)) == MakePage(1000));
  CHECK(pool.Stats(1).caller_pages == 100);  // rewritten, not added

  Page out;
  CHECK(pool.Get(1, Handle(7, 50, 0), out) == Status::kNotFound);  // unknown object
  CHECK(pool.Get(1, Handle(8, 0, 0), out) == Status::kNotFound);   // unknown pool
  CHECK(pool.Get(2, Handle(7, 0, 0), out) == Status::kNotFound);   // another session's
  CHECK(pool.Get(3, Handle(1, 0, 0), out) == Status::kNotFound);   // a session with nothing
}

TEST_CASE("pools are per session: the same handle in two sessions is two pages") {
  LenderPool pool(kSuperpageBytes);
  REQUIRE(PutPage(pool, 1, Handle(1, 1, 1), false, MakePage(1)) == Status::kOk);
  REQUIRE(PutPage(pool, 2, Handle(1, 1, 1), true, MakePage(2)) == Status::kOk);  // own kind
  CHECK(GetPage(pool, 1, Handle(1, 1, 1)) == MakePage(1));
  CHECK(GetPage(pool, 2, Handle(1, 1, 1)) == MakePage(2));
  CHECK(pool.Flush(2, Handle(1, 1, 1)) == Status::kOk);
  CHECK(GetPage(pool, 1, Handle(1, 1, 1)) == MakePage(1));
  CHECK(pool.DestroyPool(2, 1) == Status::kOk);
  CHECK(GetPage(pool, 1, Handle(1, 1, 1)) == MakePage(1));
}

TEST_CASE("a full pool evicts the oldest ephemeral page for a persistent put") {
  LenderPool pool(kSuperpageBytes);  // 512 slots
  EvictionLog log;
  log.Attach(pool);
  for (std::uint32_t i = 0; i < kPagesPerSuperpage; ++i) {
    REQUIRE(PutPage(pool, 1, Handle(3, i, 0), true, MakePage(i)) == Status::kOk);
  }
  CHECK(pool.Stats().free_pages == 0);
  CHECK(log.entries.empty());
  // Re-putting page 0 makes it the newest, so page 1 is now the oldest.
  REQUIRE(PutPage(pool, 1, Handle(3, 0, 0), true, MakePage(1000)) == Status::kOk);
  CHECK(log.entries.empty());

  REQUIRE(PutPage(pool, 2, Handle(9, 42, 4), false, MakePage(4242)) == Status::kOk);
  REQUIRE(log.entries.size() == 1);
  CHECK(log.entries[0].owner == 1);
  CHECK(log.entries[0].handle.pool == 3);
  CHECK(log.entries[0].handle.object == 1);
  CHECK(log.entries[0].handle.index == 0);
  CHECK_FALSE(GetPage(pool, 1, Handle(3, 1, 0)));
  CHECK(GetPage(pool, 1, Handle(3, 0, 0)) == MakePage(1000));
  CHECK(GetPage(pool, 1, Handle(3, 2, 0)) == MakePage(2));
  CHECK(GetPage(pool, 2, Handle(9, 42, 4)) == MakePage(4242));

  // An ephemeral put evicts too, the next oldest.
  REQUIRE(PutPage(pool, 2, Handle(10, 1, 0), true, MakePage(5)) == Status::kOk);
  REQUIRE(log.entries.size() == 2);
  CHECK(log.entries[1].owner == 1);
  CHECK(log.entries[1].handle.object == 2);
  LenderPoolStats stats = pool.Stats(1);
  CHECK(stats.caller_pages == kPagesPerSuperpage - 2);
  CHECK(pool.Stats(2).caller_pages == 2);
  CHECK(stats.free_pages == 0);
}

TEST_CASE("a persistent put into a pool full of persistent pages fails with no space") {
  LenderPool pool(kSuperpageBytes);
  EvictionLog log;
  log.Attach(pool);
  for (std::uint32_t i = 0; i < kPagesPerSuperpage; ++i) {
    REQUIRE(PutPage(pool, 1, Handle(1, i, 0), false, MakePage(i)) == Status::kOk);
  }
  CHECK(PutPage(pool, 1, Handle(1, 9999, 0), false, MakePage(1)) == Status::kNoSpace);
  CHECK(PutPage(pool, 2, Handle(1, 9999, 0), false, MakePage(1)) == Status::kNoSpace);
  CHECK(PutPage(pool, 2, Handle(2, 1, 0), true, MakePage(1)) == Status::kNoSpace);
  CHECK_FALSE(GetPage(pool, 1, Handle(1, 9999, 0)));
  CHECK(log.entries.empty());
  // A handle that already holds a page is rewritten in place, so it needs no room.
  REQUIRE(PutPage(pool, 1, Handle(1, 5, 0), false, MakePage(500)) == Status::kOk);
  CHECK(GetPage(pool, 1, Handle(1, 5, 0)) == MakePage(500));
  // A failed put never leaves the handle's old page readable: a put of the wrong kind
  // fails and removes it ("turns into a flush and fails").
  CHECK(PutPage(pool, 1, Handle(1, 6, 0), true, MakePage(600)) == Status::kInvalid);
  CHECK_FALSE(GetPage(pool, 1, Handle(1, 6, 0)));
  CHECK(pool.Stats(1).caller_pages == kPagesPerSuperpage - 1);
  // That freed one slot, and only one.
  CHECK(PutPage(pool, 2, Handle(1, 1, 0), false, MakePage(1)) == Status::kOk);
  CHECK(PutPage(pool, 2, Handle(1, 2, 0), false, MakePage(2)) == Status::kNoSpace);
}

TEST_CASE("granted superpages leave no room for pages, and pages none for superpages") {
  LenderPool pool(2 * kSuperpageBytes);
  std::uint32_t sid = 0;
  REQUIRE(pool.AllocSuperpage(1, &sid) == Status::kOk);
  REQUIRE(PutPage(pool, 2, Handle(1, 1, 0), false, MakePage(1)) == Status::kOk);
  // The second superpage is active now, with 511 free slots, but not whole.
  CHECK(pool.AllocSuperpage(1, &sid) == Status::kNoSpace);
  CHECK(pool.Stats().free_pages == kPagesPerSuperpage - 1);
  // Its last page gone, the superpage goes back to the free pool.
  REQUIRE(pool.Flush(2, Handle(1, 1, 0)) == Status::kOk);
  CHECK(pool.AllocSuperpage(1, &sid) == Status::kOk);
  CHECK(PutPage(pool, 2, Handle(1, 1, 0), false, MakePage(1)) == Status::kNoSpace);
  CHECK(pool.Stats().free_pages == 0);
}

TEST_CASE("flush removes a page and frees its slot; flushing nothing is fine") {
  LenderPool pool(kSuperpageBytes);
  REQUIRE(PutPage(pool, 1, Handle(1, 1, 1), false, MakePage(1)) == Status::kOk);
  REQUIRE(PutPage(pool, 1, Handle(1, 1, 2), false, MakePage(2)) == Status::kOk);
  CHECK(pool.Stats(1).caller_pages == 2);
  CHECK(pool.Flush(1, Handle(1, 1, 1)) == Status::kOk);
  CHECK_FALSE(GetPage(pool, 1, Handle(1, 1, 1)));
  CHECK(GetPage(pool, 1, Handle(1, 1, 2)) == MakePage(2));
  CHECK(pool.Stats(1).caller_pages == 1);
  CHECK(pool.Flush(1, Handle(1, 1, 1)) == Status::kOk);  // already gone
  CHECK(pool.Flush(1, Handle(5, 1, 1)) == Status::kOk);  // no such pool
  CHECK(pool.Flush(9, Handle(1, 1, 1)) == Status::kOk);  // no such session
  CHECK(pool.Stats().free_pages == pool.total_pages() - 1);
}

TEST_CASE("destroying a pool frees its pages and forgets its kind") {
  LenderPool pool(kSuperpageBytes);
  for (std::uint32_t i = 0; i < 20; ++i) {
    REQUIRE(PutPage(pool, 1, Handle(1, i, 0), true, MakePage(i)) == Status::kOk);
    REQUIRE(PutPage(pool, 1, Handle(2, i, 0), false, MakePage(100 + i)) == Status::kOk);
  }
  CHECK(pool.DestroyPool(1, 1) == Status::kOk);
  CHECK(pool.Stats(1).caller_pages == 20);
  for (std::uint32_t i = 0; i < 20; ++i) {
    CHECK_FALSE(GetPage(pool, 1, Handle(1, i, 0)));
    CHECK(GetPage(pool, 1, Handle(2, i, 0)) == MakePage(100 + i));
  }
  // Pool 1 was ephemeral; a new pool 1 can be persistent.
  CHECK(PutPage(pool, 1, Handle(1, 0, 0), false, MakePage(7)) == Status::kOk);
  CHECK(pool.DestroyPool(1, 77) == Status::kOk);  // never existed
  CHECK(pool.DestroyPool(5, 1) == Status::kOk);   // a session with nothing
}

TEST_CASE("the first put fixes a pool's kind; the other kind is invalid") {
  LenderPool pool(kSuperpageBytes);
  REQUIRE(PutPage(pool, 1, Handle(1, 0, 0), false, MakePage(1)) == Status::kOk);
  CHECK(PutPage(pool, 1, Handle(1, 1, 0), true, MakePage(2)) == Status::kInvalid);
  CHECK_FALSE(GetPage(pool, 1, Handle(1, 1, 0)));
  REQUIRE(PutPage(pool, 1, Handle(2, 0, 0), true, MakePage(3)) == Status::kOk);
  CHECK(PutPage(pool, 1, Handle(2, 1, 0), false, MakePage(4)) == Status::kInvalid);
  CHECK(pool.Stats(1).caller_pages == 2);
  // A pool whose pages were all flushed keeps its kind.
  REQUIRE(pool.Flush(1, Handle(2, 0, 0)) == Status::kOk);
  CHECK(PutPage(pool, 1, Handle(2, 0, 0), false, MakePage(5)) == Status::kInvalid);
}

TEST_CASE("stats add up: free plus every session's pages is the total") {
  LenderPool pool(4 * kSuperpageBytes);
  std::uint32_t sid = 0;
  REQUIRE(pool.AllocSuperpage(1, &sid) == Status::kOk);
  REQUIRE(pool.AllocSuperpage(2, &sid) == Status::kOk);
  // Two pools, one of each kind; 600 pages spill into a second active superpage.
  for (std::uint32_t i = 0; i < 600; ++i) {
    REQUIRE(PutPage(pool, 3, Handle(i % 2, i, 0), i % 2 == 0, MakePage(i)) == Status::kOk);
  }
  for (std::uint32_t i = 0; i < 30; ++i) {
    REQUIRE(PutPage(pool, 1, Handle(4, i, 0), false, MakePage(i)) == Status::kOk);
  }
  const LenderPoolStats stats = pool.Stats();
  const std::uint64_t held =
      pool.Stats(1).caller_pages + pool.Stats(2).caller_pages + pool.Stats(3).caller_pages;
  CHECK(pool.Stats(1).caller_pages == kPagesPerSuperpage + 30);
  CHECK(pool.Stats(2).caller_pages == kPagesPerSuperpage);
  CHECK(pool.Stats(3).caller_pages == 600);
  CHECK(stats.free_pages + held == stats.total_pages);
  CHECK(stats.used_bytes == held * kPageBytes);
  CHECK(stats.borrowers == 3);
  CHECK(pool.Stats(9).caller_pages == 0);
}

TEST_CASE("sessions working in parallel keep their data apart") {
  LenderPool pool(16 * kSuperpageBytes);
  std::atomic<int> evictions{0};
  pool.SetEvictionHandler([&](SessionId, const HandleBody&) { evictions.fetch_add(1); });
  constexpr int kSessions = 4;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int s = 1; s <= kSessions; ++s) {
    threads.emplace_back([&pool, &failures, s] {
      const SessionId session = static_cast<SessionId>(s);
      std::uint32_t sid = 0;
      if (pool.AllocSuperpage(session, &sid) != Status::kOk) {
        failures.fetch_add(1);
        return;
      }
      std::vector<std::byte> out(kPageBytes);
      for (std::uint32_t round = 0; round < 300; ++round) {
        const std::uint64_t seed = session * 1000000 + round;
        const Page page = MakePage(seed);
        const std::uint32_t offset = (round % kPagesPerSuperpage) * kPageBytes;
        if (WriteRange(pool, session, sid, offset, page) != Status::kOk ||
            ReadRange(pool, session, sid, offset, out) != Status::kOk ||
            std::memcmp(out.data(), page.data(), kPageBytes) != 0) {
          failures.fetch_add(1);
        }
        // Persistent pages must always come back; ephemeral ones may be evicted.
        if (PutPage(pool, session, Handle(1, round, 0), false, page) != Status::kOk ||
            GetPage(pool, session, Handle(1, round, 0)) != page) {
          failures.fetch_add(1);
        }
        if (PutPage(pool, session, Handle(2, round, 0), true, page) != Status::kOk) {
          failures.fetch_add(1);
        }
        const std::optional<Page> got = GetPage(pool, session, Handle(2, round % 50, 0));
        if (got && *got != MakePage(session * 1000000 + round % 50)) failures.fetch_add(1);
        if (round % 7 == 0) pool.Flush(session, Handle(1, round / 2, 0));
        (void)pool.Stats(session);
      }
      pool.ReleaseSession(session);
    });
  }
  for (std::thread& t : threads) t.join();
  CHECK(failures.load() == 0);
  const LenderPoolStats stats = pool.Stats();
  CHECK(stats.free_pages == stats.total_pages);
  CHECK(stats.borrowers == 0);
}

}  // TEST_SUITE("lender_pool")

namespace {

// A port that was free a moment ago: bind port 0, read what the kernel chose, close.
std::uint16_t PickFreePort() {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(fd.valid());
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  REQUIRE(::bind(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);
  socklen_t length = sizeof(address);
  REQUIRE(::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&address), &length) == 0);
  return ntohs(address.sin_port);
}

// A started LenderService on a free loopback port.
struct RunningLender {
  explicit RunningLender(std::uint64_t pool_bytes, std::uint64_t node_id = 0xfeedULL) {
    for (int attempt = 0;; ++attempt) {
      endpoint.host = "127.0.0.1";
      endpoint.port = PickFreePort();
      try {
        service = std::make_unique<LenderService>(endpoint, pool_bytes, node_id);
        break;
      } catch (const std::runtime_error&) {
        if (attempt == 20) throw;  // someone keeps taking the port
      }
    }
    service->Start();
  }
  PeerTestClient Connect() { return PeerTestClient(endpoint); }

  Endpoint endpoint;
  std::unique_ptr<LenderService> service;
};

// Polls `condition` for up to two seconds: session teardown runs on the lender's thread.
template <typename Condition>
bool Eventually(Condition condition) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (std::chrono::steady_clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return condition();
}

std::uint32_t AllocOverWire(PeerTestClient& client) {
  std::optional<TestMessage> reply = client.Call(MessageType::kAllocSuperpage);
  REQUIRE(reply);
  REQUIRE(reply->status() == Status::kOk);
  SuperpageBody body{};
  REQUIRE(reply->As(&body));
  return body.sid;
}

}  // namespace

TEST_SUITE("lender_service") {

TEST_CASE("the service refuses a busy endpoint with a message naming it") {
  RunningLender lender(kSuperpageBytes);
  try {
    LenderService second(lender.endpoint, kSuperpageBytes, 1);
    FAIL("a second service bound the same port");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()).find(lender.endpoint.ToString()) != std::string::npos);
  }
}

TEST_CASE("HELLO returns the lender's identity and geometry") {
  RunningLender lender(5 * kMiB, 0x1234abcdULL);
  PeerTestClient client = lender.Connect();
  std::optional<TestMessage> reply =
      client.Call(MessageType::kHello, 0, HelloBody{77, 0, kSuperpageBytes, kCapPassive});
  REQUIRE(reply);
  CHECK(reply->header.reply);
  CHECK(reply->header.type == MessageType::kHello);
  CHECK(reply->header.tag == 1);
  CHECK(reply->status() == Status::kOk);
  HelloBody hello{};
  REQUIRE(reply->As(&hello));
  CHECK(reply->payload.size() == sizeof(HelloBody));
  CHECK(hello.node_id == 0x1234abcdULL);
  CHECK(hello.pool_bytes == 4 * kMiB);
  CHECK(hello.superpage_bytes == kSuperpageBytes);
  CHECK(hello.capabilities == (kCapPassive | kCapActive));
}

TEST_CASE("QUERY reports total, free and the caller's pages and the borrowers") {
  RunningLender lender(4 * kSuperpageBytes);
  PeerTestClient a = lender.Connect();
  PeerTestClient b = lender.Connect();
  REQUIRE(a.Hello());
  REQUIRE(b.Hello());
  std::optional<QueryReply> q = a.Query();
  REQUIRE(q);
  CHECK(q->total_pages == 4 * kPagesPerSuperpage);
  CHECK(q->free_pages == 4 * kPagesPerSuperpage);
  CHECK(q->caller_pages == 0);
  CHECK(q->borrowers == 0);
  CHECK(q->superpage_pages == kPagesPerSuperpage);

  AllocOverWire(a);
  const Page page = MakePage(1);
  const std::optional<TestMessage> put =
      b.Call(MessageType::kPut, 0, Handle(1, 1, 1), page);
  REQUIRE(put);
  REQUIRE(put->status() == Status::kOk);
  q = a.Query();
  REQUIRE(q);
  CHECK(q->caller_pages == kPagesPerSuperpage);
  CHECK(q->free_pages == 3 * kPagesPerSuperpage - 1);
  CHECK(q->borrowers == 2);
  q = b.Query();
  REQUIRE(q);
  CHECK(q->caller_pages == 1);

  const LendingStats stats = lender.service->Stats();
  CHECK(stats.total_bytes == 4 * kSuperpageBytes);
  CHECK(stats.used_bytes == (kPagesPerSuperpage + 1) * kPageBytes);
  CHECK(stats.borrowers == 2);
}

TEST_CASE("requests before HELLO are refused with PROTOCOL") {
  RunningLender lender(kSuperpageBytes);
  PeerTestClient client = lender.Connect();
  for (const MessageType type : {MessageType::kQuery, MessageType::kAllocSuperpage}) {
    std::optional<TestMessage> reply = client.Call(type);
    REQUIRE(reply);
    CHECK(reply->header.type == type);
    CHECK(reply->status() == Status::kProtocol);
    CHECK(reply->text().find("HELLO") != std::string::npos);
  }
  CHECK(lender.service->Stats().used_bytes == 0);
  // The connection still works once it says HELLO.
  REQUIRE(client.Hello());
  CHECK(client.Query());
}

TEST_CASE("a request of another version gets PROTOCOL naming both versions, then a hang-up") {
  RunningLender lender(kSuperpageBytes);
  {
    PeerTestClient client = lender.Connect();
    const HelloBody hello{1, 0, kSuperpageBytes, kCapPassive};
    REQUIRE(client.Send(MessageType::kHello, 42, 0,
                        std::as_bytes(std::span<const HelloBody, 1>(&hello, 1)), {}, 7));
    std::optional<TestMessage> reply = client.ReadMessage();
    REQUIRE(reply);
    CHECK(reply->header.reply);
    CHECK(reply->header.type == MessageType::kHello);
    CHECK(reply->header.tag == 42);
    CHECK(reply->header.version == kVersion);
    CHECK(reply->status() == Status::kProtocol);
    CHECK(reply->text() ==
          "this lender speaks peer protocol version 1, the request was version 7");
    CHECK(client.WaitClosed());
  }
  PeerTestClient again = lender.Connect();
  CHECK(again.Hello());
}

TEST_CASE("a payload over the maximum, a bad magic or a reply from the borrower ends the "
          "connection, not the service") {
  RunningLender lender(kSuperpageBytes);
  SUBCASE("oversized payload") {
    PeerTestClient client = lender.Connect();
    REQUIRE(client.Hello());
    std::byte wire[sizeof(Header)];
    EncodeHeader(MessageType::kWrite, false, 0, Status::kOk, 5, kMaxPayload + 1, wire);
    REQUIRE(client.SendRaw(wire));
    CHECK(client.WaitClosed());
  }
  SUBCASE("bad magic") {
    PeerTestClient client = lender.Connect();
    REQUIRE(client.Hello());
    std::byte wire[sizeof(Header)];
    EncodeHeader(MessageType::kQuery, false, 0, Status::kOk, 5, 0, wire);
    wire[0] = std::byte{0};
    REQUIRE(client.SendRaw(wire));
    CHECK(client.WaitClosed());
  }
  SUBCASE("a reply-typed message") {
    PeerTestClient client = lender.Connect();
    REQUIRE(client.Hello());
    REQUIRE(client.Send(MessageType::kQuery, 5, 0, {}, {}, kVersion, /*reply=*/true));
    CHECK(client.WaitClosed());
  }
  PeerTestClient again = lender.Connect();
  REQUIRE(again.Hello());
  CHECK(again.Query());
}

TEST_CASE("an unknown type gets UNSUPPORTED and the connection keeps working") {
  RunningLender lender(kSuperpageBytes);
  PeerTestClient client = lender.Connect();
  REQUIRE(client.Hello());
  const std::byte junk[5] = {};
  std::optional<TestMessage> reply = client.Call(static_cast<MessageType>(0x77), 0, junk);
  REQUIRE(reply);
  CHECK(reply->status() == Status::kUnsupported);
  CHECK(static_cast<unsigned>(reply->header.type) == 0x77);
  // A lender notice sent by a borrower is not a request either.
  reply = client.Call(MessageType::kEvicted, 0, Handle(1, 1, 1));
  REQUIRE(reply);
  CHECK(reply->status() == Status::kUnsupported);
  CHECK(client.Query());
}

TEST_CASE("malformed bodies and flags are invalid") {
  RunningLender lender(kSuperpageBytes);
  PeerTestClient client = lender.Connect();
  REQUIRE(client.Hello());
  const std::uint32_t sid = AllocOverWire(client);
  const Page page = MakePage(5);
  // WRITE whose payload is not 16 + length.
  std::optional<TestMessage> reply =
      client.Call(MessageType::kWrite, 0, RangeBody{sid, 0, 2 * kPageBytes, 0}, page);
  REQUIRE(reply);
  CHECK(reply->status() == Status::kInvalid);
  CHECK_FALSE(reply->text().empty());
  CHECK(reply->payload.size() <= kMaxErrorText);
  // A body cut short.
  const std::byte short_body[8] = {};
  reply = client.Call(MessageType::kRead, 0, short_body);
  REQUIRE(reply);
  CHECK(reply->status() == Status::kInvalid);
  // A payload longer than the request allows.
  reply = client.Call(MessageType::kQuery, 0, short_body);
  REQUIRE(reply);
  CHECK(reply->status() == Status::kTooBig);
  // Unknown flags.
  reply = client.Call(MessageType::kQuery, 0x10);
  REQUIRE(reply);
  CHECK(reply->status() == Status::kInvalid);
  reply = client.Call(MessageType::kPut, kPutEphemeral | 0x4, Handle(1, 1, 1), page);
  REQUIRE(reply);
  CHECK(reply->status() == Status::kInvalid);
  // READ past the superpage, then a READ longer than any superpage.
  reply = client.Call(MessageType::kRead, 0, RangeBody{sid, kSuperpageBytes, kPageBytes, 0});
  REQUIRE(reply);
  CHECK(reply->status() == Status::kInvalid);
  reply = client.Call(MessageType::kRead, 0, RangeBody{sid, 0, 0x80000000u, 0});
  REQUIRE(reply);
  CHECK(reply->status() == Status::kInvalid);
  CHECK(client.Query());
}

TEST_CASE("passive and active data round-trip over the wire") {
  RunningLender lender(2 * kSuperpageBytes);
  PeerTestClient client = lender.Connect();
  REQUIRE(client.Hello());
  const std::uint32_t sid = AllocOverWire(client);
  const std::vector<std::byte> data = MakeBytes(kSuperpageBytes, 3);
  std::optional<TestMessage> reply =
      client.Call(MessageType::kWrite, 0, RangeBody{sid, 0, kSuperpageBytes, 0}, data);
  REQUIRE(reply);
  REQUIRE(reply->status() == Status::kOk);
  CHECK(reply->payload.empty());
  reply = client.Call(MessageType::kRead, 0,
                      RangeBody{sid, 8 * kPageBytes, 4 * kPageBytes, 0});
  REQUIRE(reply);
  REQUIRE(reply->status() == Status::kOk);
  CHECK(std::equal(reply->payload.begin(), reply->payload.end(),
                   data.begin() + 8 * kPageBytes, data.begin() + 12 * kPageBytes));
  CHECK(reply->payload.size() == 4 * kPageBytes);

  const Page page = MakePage(9);
  reply = client.Call(MessageType::kPut, 0, Handle(2, 3, 4), page);
  REQUIRE(reply);
  REQUIRE(reply->status() == Status::kOk);
  reply = client.Call(MessageType::kGet, 0, Handle(2, 3, 4));
  REQUIRE(reply);
  REQUIRE(reply->status() == Status::kOk);
  CHECK(std::equal(reply->payload.begin(), reply->payload.end(), page.begin(), page.end()));
  reply = client.Call(MessageType::kFlush, 0, Handle(2, 3, 4));
  REQUIRE(reply);
  CHECK(reply->status() == Status::kOk);
  reply = client.Call(MessageType::kGet, 0, Handle(2, 3, 4));
  REQUIRE(reply);
  CHECK(reply->status() == Status::kNotFound);
  CHECK(reply->payload.empty());
  reply = client.Call(MessageType::kDestroyPool, 0, Handle(2, 0, 0));
  REQUIRE(reply);
  CHECK(reply->status() == Status::kOk);
  reply = client.Call(MessageType::kFreeSuperpage, 0, SuperpageBody{sid});
  REQUIRE(reply);
  CHECK(reply->status() == Status::kOk);
  CHECK(lender.service->Stats().used_bytes == 0);
}

TEST_CASE("a second session may not touch the first one's superpage") {
  RunningLender lender(2 * kSuperpageBytes);
  PeerTestClient owner = lender.Connect();
  PeerTestClient other = lender.Connect();
  REQUIRE(owner.Hello());
  REQUIRE(other.Hello());
  const std::uint32_t sid = AllocOverWire(owner);
  const Page page = MakePage(1);
  std::optional<TestMessage> reply =
      owner.Call(MessageType::kWrite, 0, RangeBody{sid, 0, kPageBytes, 0}, page);
  REQUIRE(reply);
  REQUIRE(reply->status() == Status::kOk);

  reply = other.Call(MessageType::kWrite, 0, RangeBody{sid, 0, kPageBytes, 0}, MakePage(2));
  REQUIRE(reply);
  CHECK(reply->status() == Status::kNotPermitted);
  CHECK(reply->text().find(std::to_string(sid)) != std::string::npos);
  reply = other.Call(MessageType::kRead, 0, RangeBody{sid, 0, kPageBytes, 0});
  REQUIRE(reply);
  CHECK(reply->status() == Status::kNotPermitted);
  CHECK(reply->payload.size() <= kMaxErrorText);
  reply = other.Call(MessageType::kFreeSuperpage, 0, SuperpageBody{sid});
  REQUIRE(reply);
  CHECK(reply->status() == Status::kNotPermitted);

  reply = owner.Call(MessageType::kRead, 0, RangeBody{sid, 0, kPageBytes, 0});
  REQUIRE(reply);
  REQUIRE(reply->status() == Status::kOk);
  CHECK(std::equal(reply->payload.begin(), reply->payload.end(), page.begin(), page.end()));
}

TEST_CASE("a session's memory is freed when its connection closes") {
  RunningLender lender(4 * kSuperpageBytes);
  PeerTestClient watcher = lender.Connect();
  REQUIRE(watcher.Hello());
  {
    PeerTestClient leaver = lender.Connect();
    REQUIRE(leaver.Hello());
    AllocOverWire(leaver);
    AllocOverWire(leaver);
    const Page page = MakePage(1);
    std::optional<TestMessage> reply = leaver.Call(MessageType::kPut, 0, Handle(1, 1, 1), page);
    REQUIRE(reply);
    REQUIRE(reply->status() == Status::kOk);
    std::optional<QueryReply> q = watcher.Query();
    REQUIRE(q);
    CHECK(q->free_pages == 2 * kPagesPerSuperpage - 1);
    CHECK(q->borrowers == 1);
  }
  CHECK(Eventually([&] {
    const std::optional<QueryReply> q = watcher.Query();
    return q && q->free_pages == 4 * kPagesPerSuperpage && q->borrowers == 0;
  }));
  CHECK(lender.service->Stats().used_bytes == 0);
}

TEST_CASE("an evicted page's owner gets an EVICTED notice") {
  RunningLender lender(kSuperpageBytes);
  PeerTestClient cache = lender.Connect();
  PeerTestClient store = lender.Connect();
  REQUIRE(cache.Hello());
  REQUIRE(store.Hello());
  for (std::uint32_t i = 0; i < kPagesPerSuperpage; ++i) {
    const std::optional<TestMessage> reply =
        cache.Call(MessageType::kPut, kPutEphemeral, Handle(6, i, 2), MakePage(i));
    REQUIRE(reply);
    REQUIRE(reply->status() == Status::kOk);
  }
  std::optional<TestMessage> reply =
      store.Call(MessageType::kPut, 0, Handle(1, 1, 1), MakePage(100));
  REQUIRE(reply);
  REQUIRE(reply->status() == Status::kOk);
  CHECK(store.notices().empty());

  std::optional<TestMessage> notice = cache.ReadMessage();
  REQUIRE(notice);
  CHECK_FALSE(notice->header.reply);
  CHECK(notice->header.type == MessageType::kEvicted);
  CHECK(notice->header.tag == 0);
  HandleBody evicted{};
  REQUIRE(notice->As(&evicted));
  CHECK(evicted.pool == 6);
  CHECK(evicted.object == 0);
  CHECK(evicted.index == 2);
  reply = cache.Call(MessageType::kGet, 0, Handle(6, 0, 2));
  REQUIRE(reply);
  CHECK(reply->status() == Status::kNotFound);
}

TEST_CASE("Stop sends SHUTDOWN, hangs up every session and is idempotent") {
  RunningLender lender(2 * kSuperpageBytes);
  PeerTestClient client = lender.Connect();
  REQUIRE(client.Hello());
  AllocOverWire(client);
  lender.service->Stop();
  std::optional<TestMessage> notice = client.ReadMessage();
  REQUIRE(notice);
  CHECK(notice->header.type == MessageType::kShutdown);
  CHECK_FALSE(notice->header.reply);
  ShutdownBody body{1, 1};
  REQUIRE(notice->As(&body));
  CHECK(body.deadline_ms == 0);
  CHECK(client.WaitClosed());
  CHECK(lender.service->Stats().used_bytes == 0);
  lender.service->Stop();
  std::string error;
  CHECK_FALSE(ConnectTo(lender.endpoint, &error).valid());
}

}  // TEST_SUITE("lender_service")

}  // namespace memlend::peer
