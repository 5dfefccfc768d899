// Unit tests for the lender: LenderPool's rules (grants, ranges, active pages, eviction,
// accounting) called directly, and LenderService over real loopback TCP driven by
// PeerTestClient.
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <map>
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
#include "running_lender.h"

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

Status PutPage(LenderPool& pool, SessionId session, const HandleBody& handle, const Page& page) {
  return pool.Put(session, handle, std::span<const std::byte, kPageBytes>(page));
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

// Records every eviction the pool reports, and how many came in each handler call.
struct EvictionLog {
  std::vector<Eviction> entries;
  std::vector<std::size_t> calls;
  void Attach(LenderPool& pool) {
    pool.SetEvictionHandler([this](std::span<const Eviction> evictions) {
      calls.push_back(evictions.size());
      entries.insert(entries.end(), evictions.begin(), evictions.end());
    });
  }
  void Clear() {
    entries.clear();
    calls.clear();
  }
};

// What the pool must report about itself, given what the test knows it holds: QUERY's
// free pages leave out only granted superpages; used bytes count every page that holds
// data, cached ones too.
void CheckAccounting(const LenderPool& pool, std::uint64_t granted_superpages,
                     std::uint64_t ephemeral_pages) {
  const LenderPoolStats stats = pool.Stats();
  const std::uint64_t granted_pages = granted_superpages * kPagesPerSuperpage;
  CHECK(stats.free_pages == stats.total_pages - granted_pages);
  CHECK(stats.ephemeral_pages == ephemeral_pages);
  CHECK(stats.used_bytes == (granted_pages + ephemeral_pages) * kPageBytes);
}

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
  // Two granted and one of cached pages, one for session 2.
  LenderPool pool(5 * kSuperpageBytes);
  std::uint32_t sid = 0;
  REQUIRE(pool.AllocSuperpage(1, &sid) == Status::kOk);
  REQUIRE(pool.AllocSuperpage(1, &sid) == Status::kOk);
  for (std::uint64_t i = 0; i < 10; ++i) {
    REQUIRE(PutPage(pool, 1, Handle(1, i, 0), MakePage(i)) == Status::kOk);
    REQUIRE(PutPage(pool, 1, Handle(2, i, 0), MakePage(i)) == Status::kOk);
  }
  std::uint32_t other = 0;
  REQUIRE(pool.AllocSuperpage(2, &other) == Status::kOk);
  REQUIRE(PutPage(pool, 2, Handle(1, 5, 0), MakePage(55)) == Status::kOk);

  LenderPoolStats stats = pool.Stats(1);
  CHECK(stats.caller_pages == 2 * kPagesPerSuperpage + 20);
  CHECK(stats.borrowers == 2);

  pool.ReleaseSession(1);
  stats = pool.Stats(1);
  CHECK(stats.caller_pages == 0);
  CHECK(stats.borrowers == 1);
  CHECK(stats.free_pages == stats.total_pages - kPagesPerSuperpage);  // cached: free
  CHECK(stats.ephemeral_pages == 1);
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

TEST_CASE("a session has at most kMaxPoolsPerSession pools; a failed PUT leaves none behind") {
  LenderPool pool(2 * kSuperpageBytes);
  const SessionId session = 1;
  const Page page = MakePage(3);
  for (std::uint32_t id = 0; id < LenderPool::kMaxPoolsPerSession; ++id) {
    REQUIRE(pool.Put(session, HandleBody{id, 0, 1}, page) == Status::kOk);
  }
  CHECK(pool.Put(session, HandleBody{1000, 0, 1}, page) == Status::kNoSpace);  // the 65th
  CHECK(pool.Put(session, HandleBody{5, 1, 1}, page) == Status::kOk);  // into one it has
  // Destroying a pool makes room for another.
  REQUIRE(pool.DestroyPool(session, 5) == Status::kOk);
  CHECK(pool.Put(session, HandleBody{1000, 0, 1}, page) == Status::kOk);
  // With every superpage granted there is no room, and PUTs into new pools that fail for
  // want of it leave no pool behind.
  pool.ReleaseSession(session);
  std::uint32_t sid = 0;
  REQUIRE(pool.AllocSuperpage(2, &sid) == Status::kOk);
  REQUIRE(pool.AllocSuperpage(2, &sid) == Status::kOk);
  for (std::uint32_t id = 0; id < 100; ++id) {
    CHECK(pool.Put(session, HandleBody{id, 0, 1}, page) == Status::kNoSpace);
  }
  REQUIRE(pool.FreeSuperpage(2, sid) == Status::kOk);
  for (std::uint32_t id = 0; id < LenderPool::kMaxPoolsPerSession; ++id) {
    CHECK(pool.Put(session, HandleBody{id + 100, 0, 1}, page) == Status::kOk);
  }
}

TEST_CASE("cached pages round-trip, rewrite in place, and miss when absent") {
  LenderPool pool(kSuperpageBytes);
  for (std::uint64_t i = 0; i < 100; ++i) {
    REQUIRE(PutPage(pool, 1, Handle(7, i / 10, static_cast<std::uint32_t>(i % 10)),
                    MakePage(i)) == Status::kOk);
  }
  for (std::uint64_t i = 0; i < 100; ++i) {
    CHECK(GetPage(pool, 1, Handle(7, i / 10, static_cast<std::uint32_t>(i % 10))) ==
          MakePage(i));
  }
  REQUIRE(PutPage(pool, 1, Handle(7, 0, 0), MakePage(1000)) == Status::kOk);
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
  REQUIRE(PutPage(pool, 1, Handle(1, 1, 1), MakePage(1)) == Status::kOk);
  REQUIRE(PutPage(pool, 2, Handle(1, 1, 1), MakePage(2)) == Status::kOk);
  CHECK(GetPage(pool, 1, Handle(1, 1, 1)) == MakePage(1));
  CHECK(GetPage(pool, 2, Handle(1, 1, 1)) == MakePage(2));
  CHECK(pool.Flush(2, Handle(1, 1, 1)) == Status::kOk);
  CHECK(GetPage(pool, 1, Handle(1, 1, 1)) == MakePage(1));
  CHECK(pool.DestroyPool(2, 1) == Status::kOk);
  CHECK(GetPage(pool, 1, Handle(1, 1, 1)) == MakePage(1));
}

TEST_CASE("an ephemeral put into a full pool evicts the oldest ephemeral page, only one") {
  LenderPool pool(kSuperpageBytes);  // 512 slots
  EvictionLog log;
  log.Attach(pool);
  for (std::uint32_t i = 0; i < kPagesPerSuperpage; ++i) {
    REQUIRE(PutPage(pool, 1, Handle(3, i, 0), MakePage(i)) == Status::kOk);
  }
  CHECK(log.entries.empty());
  CheckAccounting(pool, 0, kPagesPerSuperpage);
  // Re-putting page 0 makes it the newest, so page 1 is now the oldest.
  REQUIRE(PutPage(pool, 1, Handle(3, 0, 0), MakePage(1000)) == Status::kOk);
  CHECK(log.entries.empty());

  REQUIRE(PutPage(pool, 2, Handle(10, 1, 0), MakePage(5)) == Status::kOk);
  REQUIRE(log.entries.size() == 1);
  CHECK(log.entries[0].owner == 1);
  CHECK(log.entries[0].handle.pool == 3);
  CHECK(log.entries[0].handle.object == 1);
  CHECK(log.entries[0].handle.index == 0);
  CHECK_FALSE(GetPage(pool, 1, Handle(3, 1, 0)));
  CHECK(GetPage(pool, 1, Handle(3, 0, 0)) == MakePage(1000));
  CHECK(GetPage(pool, 1, Handle(3, 2, 0)) == MakePage(2));
  CHECK(GetPage(pool, 2, Handle(10, 1, 0)) == MakePage(5));
  // The next one evicts the next oldest.
  REQUIRE(PutPage(pool, 2, Handle(10, 2, 0), MakePage(6)) == Status::kOk);
  REQUIRE(log.entries.size() == 2);
  CHECK(log.entries[1].owner == 1);
  CHECK(log.entries[1].handle.object == 2);
  CHECK(log.calls == std::vector<std::size_t>{1, 1});
  CHECK(pool.Stats(1).caller_pages == kPagesPerSuperpage - 2);
  CHECK(pool.Stats(2).caller_pages == 2);
  CheckAccounting(pool, 0, kPagesPerSuperpage);
}

TEST_CASE("Resize: free superpages retire at once, and growing puts them back in service") {
  LenderPool pool(8 * kSuperpageBytes);
  CHECK(pool.Resize(3).empty());  // nothing is granted: nobody to ask
  LenderPoolStats stats = pool.Stats();
  CHECK(stats.total_pages == 3 * kPagesPerSuperpage);
  CHECK(stats.target_pages == 3 * kPagesPerSuperpage);
  CHECK(stats.max_pages == 8 * kPagesPerSuperpage);
  CHECK(stats.free_pages == 3 * kPagesPerSuperpage);
  CHECK(pool.pool_bytes() == 3 * kSuperpageBytes);
  CHECK(pool.max_bytes() == 8 * kSuperpageBytes);
  std::uint32_t sid = 0;
  for (int i = 0; i < 3; ++i) REQUIRE(pool.AllocSuperpage(1, &sid) == Status::kOk);
  CHECK(pool.AllocSuperpage(1, &sid) == Status::kNoSpace);
  CHECK(pool.Resize(100).empty());  // at most what the pool was made with
  stats = pool.Stats();
  CHECK(stats.total_pages == 8 * kPagesPerSuperpage);
  CHECK(stats.target_pages == 8 * kPagesPerSuperpage);
  // Superpages back in service read as zeros like any other.
  for (int i = 0; i < 5; ++i) {
    REQUIRE(pool.AllocSuperpage(2, &sid) == Status::kOk);
    std::vector<std::byte> whole(kSuperpageBytes, std::byte{0x5a});
    REQUIRE(ReadRange(pool, 2, sid, 0, whole) == Status::kOk);
    CHECK(AllZero(whole));
  }
  CHECK(pool.AllocSuperpage(2, &sid) == Status::kNoSpace);
  CheckAccounting(pool, 8, 0);
}

TEST_CASE("a shrink evicts cached pages, then asks for granted superpages back; each retires "
          "when freed") {
  LenderPool pool(6 * kSuperpageBytes);
  EvictionLog log;
  log.Attach(pool);
  std::vector<std::uint32_t> sids(3);
  for (std::uint32_t& sid : sids) REQUIRE(pool.AllocSuperpage(1, &sid) == Status::kOk);
  for (std::uint32_t i = 0; i < kPagesPerSuperpage + 10; ++i) {  // two ephemeral superpages
    REQUIRE(PutPage(pool, 2, Handle(1, i, 0), MakePage(i)) == Status::kOk);
  }
  // Six in service: 3 granted, 2 cached, 1 free. Down to 1: the free one and both cached ones
  // go at once, and two of the granted ones are asked back.
  const std::vector<ReclaimRequest> asked = pool.Resize(1);
  CHECK(log.entries.size() == kPagesPerSuperpage + 10);
  for (const std::size_t call : log.calls) CHECK(call <= kPagesPerSuperpage);
  for (const Eviction& e : log.entries) CHECK(e.owner == 2);
  REQUIRE(asked.size() == 1);
  CHECK(asked[0].owner == 1);
  REQUIRE(asked[0].sids.size() == 2);
  LenderPoolStats stats = pool.Stats();
  CHECK(stats.total_pages == 3 * kPagesPerSuperpage);
  CHECK(stats.target_pages == 1 * kPagesPerSuperpage);
  CHECK(stats.reclaiming_pages == 2 * kPagesPerSuperpage);
  CHECK(stats.free_pages == 0);
  CHECK(stats.ephemeral_pages == 0);
  // Nothing new is granted or cached while the pool is over its size.
  std::uint32_t sid = 0;
  CHECK(pool.AllocSuperpage(3, &sid) == Status::kNoSpace);
  CHECK(PutPage(pool, 2, Handle(1, 9999, 0), MakePage(1)) == Status::kNoSpace);
  // Asked once: a second Resize to the same size asks nothing more.
  CHECK(pool.Resize(1).empty());
  // The borrower frees what it was asked for: each retires.
  for (const std::uint32_t asked_sid : asked[0].sids) {
    REQUIRE(pool.FreeSuperpage(1, asked_sid) == Status::kOk);
  }
  stats = pool.Stats();
  CHECK(stats.total_pages == 1 * kPagesPerSuperpage);
  CHECK(stats.reclaiming_pages == 0);
  CheckAccounting(pool, 1, 0);
  // The one left is still the borrower's, data and all.
  const std::uint32_t kept = sids[0] == asked[0].sids[0] || sids[0] == asked[0].sids[1]
                                 ? (sids[1] == asked[0].sids[0] || sids[1] == asked[0].sids[1]
                                        ? sids[2] : sids[1])
                                 : sids[0];
  const std::vector<std::byte> data = MakeBytes(kSuperpageBytes, 5);
  REQUIRE(WriteRange(pool, 1, kept, 0, data) == Status::kOk);
  // A session that ends gives back what it held: to 0 now.
  CHECK(pool.Resize(0).size() == 1);
  pool.ReleaseSession(1);
  CHECK(pool.Stats().total_pages == 0);
  CHECK(pool.AllocSuperpage(1, &sid) == Status::kNoSpace);
  CHECK(pool.Resize(6).empty());
  CHECK(pool.Stats().free_pages == 6 * kPagesPerSuperpage);
}

TEST_CASE("a resize of more superpages than one lock hold does them all, in one call") {
  // 100 superpages: 40 granted, 45 cached (one page each), 15 free. Work is done 32
  // superpages per lock hold: the shrink to 10 retires the free ones and empties the cached
  // ones over several holds, then asks 30 granted ones back.
  LenderPool pool(100 * kSuperpageBytes);
  EvictionLog log;
  log.Attach(pool);
  std::uint32_t sid = 0;
  for (int i = 0; i < 40; ++i) REQUIRE(pool.AllocSuperpage(1, &sid) == Status::kOk);
  // A cached superpage fills before the next is taken: 45 superpages' worth, less one page.
  const std::uint32_t cached = 45 * kPagesPerSuperpage - 1;
  for (std::uint32_t i = 0; i < cached; ++i) {
    REQUIRE(PutPage(pool, 2, Handle(1, i, 0), MakePage(i)) == Status::kOk);
  }
  CheckAccounting(pool, 40, cached);
  const std::vector<ReclaimRequest> asked = pool.Resize(10);
  CHECK(log.entries.size() == cached);  // every cached page went, each reported once
  REQUIRE(asked.size() == 1);
  CHECK(asked[0].sids.size() == 30);
  LenderPoolStats stats = pool.Stats();
  CHECK(stats.total_pages == 40 * kPagesPerSuperpage);
  CHECK(stats.reclaiming_pages == 30 * kPagesPerSuperpage);
  CHECK(stats.ephemeral_pages == 0);
  CHECK(stats.free_pages == 0);
  for (const std::uint32_t asked_sid : asked[0].sids) {
    REQUIRE(pool.FreeSuperpage(1, asked_sid) == Status::kOk);
  }
  CHECK(pool.Stats().total_pages == 10 * kPagesPerSuperpage);
  CheckAccounting(pool, 10, 0);
  // Growing back past one hold's worth: all 90 return, and can be granted.
  CHECK(pool.Resize(100).empty());
  stats = pool.Stats();
  CHECK(stats.total_pages == 100 * kPagesPerSuperpage);
  CHECK(stats.free_pages == 90 * kPagesPerSuperpage);
  for (int i = 0; i < 90; ++i) REQUIRE(pool.AllocSuperpage(3, &sid) == Status::kOk);
  CHECK(pool.AllocSuperpage(3, &sid) == Status::kNoSpace);
  CheckAccounting(pool, 100, 0);
}

TEST_CASE("a superpage freed while the ones asked back cover the shrink stays in service") {
  LenderPool pool(4 * kSuperpageBytes);
  std::vector<std::uint32_t> sids(4);
  for (std::uint32_t& sid : sids) REQUIRE(pool.AllocSuperpage(1, &sid) == Status::kOk);
  const std::vector<ReclaimRequest> asked = pool.Resize(2);
  REQUIRE(asked.size() == 1);
  REQUIRE(asked[0].sids.size() == 2);
  std::uint32_t other = 0;
  for (const std::uint32_t sid : sids) {
    if (std::find(asked[0].sids.begin(), asked[0].sids.end(), sid) == asked[0].sids.end()) {
      other = sid;
    }
  }
  // Freed though not asked: the two asked back bring the pool to its size without it.
  REQUIRE(pool.FreeSuperpage(1, other) == Status::kOk);
  CHECK(pool.Stats().total_pages == 4 * kPagesPerSuperpage);
  CHECK(pool.Stats().free_pages == kPagesPerSuperpage);
  for (const std::uint32_t sid : asked[0].sids) REQUIRE(pool.FreeSuperpage(1, sid) == Status::kOk);
  const LenderPoolStats stats = pool.Stats();
  CHECK(stats.total_pages == 2 * kPagesPerSuperpage);
  CHECK(stats.reclaiming_pages == 0);
  CHECK(stats.free_pages == kPagesPerSuperpage);
  std::uint32_t sid = 0;
  CHECK(pool.AllocSuperpage(2, &sid) == Status::kOk);  // the one kept in service
  CHECK(pool.AllocSuperpage(2, &sid) == Status::kNoSpace);
}

TEST_CASE("ALLOC_SUPERPAGE reclaims the ephemeral superpage with the fewest pages") {
  constexpr std::uint32_t kSuperpages = 4;
  LenderPool pool(kSuperpages * kSuperpageBytes);
  EvictionLog log;
  log.Attach(pool);
  // Session 1 caches 2048 clean pages: every superpage is ephemeral and full. Pages fill
  // one superpage before the next, so handles [512k, 512k + 512) share superpage k.
  constexpr std::uint32_t kPages = kSuperpages * kPagesPerSuperpage;
  for (std::uint32_t i = 0; i < kPages; ++i) {
    REQUIRE(PutPage(pool, 1, Handle(1, i, 0), MakePage(i)) == Status::kOk);
  }
  CHECK(log.entries.empty());
  CheckAccounting(pool, 0, kPages);
  // Superpage 2 is the emptiest: 412 pages.
  std::set<std::uint64_t> flushed;
  for (std::uint32_t i = 2 * kPagesPerSuperpage; i < 2 * kPagesPerSuperpage + 100; ++i) {
    REQUIRE(pool.Flush(1, Handle(1, i, 0)) == Status::kOk);
    flushed.insert(i);
  }
  CheckAccounting(pool, 0, kPages - 100);

  // Session 2 needs a superpage for dirty pages: it gets one, at the cache's expense.
  std::uint32_t dirty_sid = 0;
  REQUIRE(pool.AllocSuperpage(2, &dirty_sid) == Status::kOk);
  REQUIRE(log.calls == std::vector<std::size_t>{kPagesPerSuperpage - 100});  // one call
  std::set<std::uint64_t> evicted;
  for (const Eviction& e : log.entries) {
    CHECK(e.owner == 1);
    CHECK(e.handle.pool == 1);
    CHECK(e.handle.index == 0);
    CHECK(e.handle.object / kPagesPerSuperpage == 2);
    CHECK(flushed.count(e.handle.object) == 0);
    evicted.insert(e.handle.object);
  }
  CHECK(evicted.size() == kPagesPerSuperpage - 100);  // each page reported once
  for (std::uint32_t i = 0; i < kPages; ++i) {
    CAPTURE(i);
    const std::optional<Page> got = GetPage(pool, 1, Handle(1, i, 0));
    if (evicted.count(i) != 0 || flushed.count(i) != 0) {
      CHECK_FALSE(got);
    } else {
      CHECK(got == MakePage(i));
    }
  }
  CheckAccounting(pool, 1, kPages - kPagesPerSuperpage);
  CHECK(pool.Stats(1).caller_pages == kPages - kPagesPerSuperpage);
  CHECK(pool.Stats(2).caller_pages == kPagesPerSuperpage);

  // The superpage held the cache's data a moment ago; it must read as zeros now.
  std::vector<std::byte> whole(kSuperpageBytes, std::byte{0x5a});
  REQUIRE(ReadRange(pool, 2, dirty_sid, 0, whole) == Status::kOk);
  CHECK(AllZero(whole));
  const std::vector<std::byte> dirty = MakeBytes(kSuperpageBytes, 77);
  REQUIRE(WriteRange(pool, 2, dirty_sid, 0, dirty) == Status::kOk);

  // Every further allocation takes another cached superpage, until none is left.
  std::uint32_t sid = 0;
  for (std::uint32_t n = 1; n < kSuperpages; ++n) {
    log.Clear();
    REQUIRE(pool.AllocSuperpage(2 + n, &sid) == Status::kOk);
    CHECK(log.calls == std::vector<std::size_t>{kPagesPerSuperpage});
    CheckAccounting(pool, 1 + n, kPages - (1 + n) * kPagesPerSuperpage);
  }
  log.Clear();
  CHECK(pool.AllocSuperpage(9, &sid) == Status::kNoSpace);
  CHECK(log.entries.empty());
  CHECK(pool.Stats(1).caller_pages == 0);
  CHECK(PutPage(pool, 1, Handle(1, 0, 0), MakePage(0)) == Status::kNoSpace);
  // The dirty pages were never touched by any of that.
  REQUIRE(ReadRange(pool, 2, dirty_sid, 0, whole) == Status::kOk);
  CHECK(whole == dirty);
}

TEST_CASE("granted superpages leave no room for pages; cached pages yield to superpages") {
  LenderPool pool(2 * kSuperpageBytes);
  EvictionLog log;
  log.Attach(pool);
  std::uint32_t sid = 0;
  REQUIRE(pool.AllocSuperpage(1, &sid) == Status::kOk);
  REQUIRE(PutPage(pool, 2, Handle(1, 1, 0), MakePage(1)) == Status::kOk);
  // The second superpage is active now; QUERY counts all of it as free, cached page and all.
  CHECK(pool.Stats().free_pages == kPagesPerSuperpage);
  // Its last page gone, the superpage goes back to the free pool.
  REQUIRE(pool.Flush(2, Handle(1, 1, 0)) == Status::kOk);
  REQUIRE(PutPage(pool, 2, Handle(1, 2, 0), MakePage(2)) == Status::kOk);
  // An allocation takes the active superpage, evicting the cached page (reported).
  CHECK(pool.AllocSuperpage(1, &sid) == Status::kOk);
  CHECK(log.entries.size() == 1);
  CHECK_FALSE(GetPage(pool, 2, Handle(1, 2, 0)));
  CHECK(PutPage(pool, 2, Handle(1, 1, 0), MakePage(1)) == Status::kNoSpace);
  CHECK(pool.Stats().free_pages == 0);
}

TEST_CASE("flush removes a page and frees its slot; flushing nothing is fine") {
  LenderPool pool(kSuperpageBytes);
  REQUIRE(PutPage(pool, 1, Handle(1, 1, 1), MakePage(1)) == Status::kOk);
  REQUIRE(PutPage(pool, 1, Handle(1, 1, 2), MakePage(2)) == Status::kOk);
  CHECK(pool.Stats(1).caller_pages == 2);
  CHECK(pool.Flush(1, Handle(1, 1, 1)) == Status::kOk);
  CHECK_FALSE(GetPage(pool, 1, Handle(1, 1, 1)));
  CHECK(GetPage(pool, 1, Handle(1, 1, 2)) == MakePage(2));
  CHECK(pool.Stats(1).caller_pages == 1);
  CHECK(pool.Flush(1, Handle(1, 1, 1)) == Status::kOk);  // already gone
  CHECK(pool.Flush(1, Handle(5, 1, 1)) == Status::kOk);  // no such pool
  CHECK(pool.Flush(9, Handle(1, 1, 1)) == Status::kOk);  // no such session
  CHECK(pool.Stats().free_pages == pool.total_pages());  // cached pages count as free
  CHECK(pool.Stats().ephemeral_pages == 1);
}

TEST_CASE("destroying a pool frees its pages and no other pool's") {
  LenderPool pool(2 * kSuperpageBytes);
  for (std::uint32_t i = 0; i < 20; ++i) {
    REQUIRE(PutPage(pool, 1, Handle(1, i, 0), MakePage(i)) == Status::kOk);
    REQUIRE(PutPage(pool, 1, Handle(2, i, 0), MakePage(100 + i)) == Status::kOk);
  }
  CHECK(pool.DestroyPool(1, 1) == Status::kOk);
  CHECK(pool.Stats(1).caller_pages == 20);
  for (std::uint32_t i = 0; i < 20; ++i) {
    CHECK_FALSE(GetPage(pool, 1, Handle(1, i, 0)));
    CHECK(GetPage(pool, 1, Handle(2, i, 0)) == MakePage(100 + i));
  }
  // A new pool 1 starts empty.
  CHECK(PutPage(pool, 1, Handle(1, 0, 0), MakePage(7)) == Status::kOk);
  CHECK(pool.Stats(1).caller_pages == 21);
  CHECK(pool.DestroyPool(1, 77) == Status::kOk);  // never existed
  CHECK(pool.DestroyPool(5, 1) == Status::kOk);   // a session with nothing
}

TEST_CASE("stats add up: free plus every session's pages, less cached ones, is the total") {
  LenderPool pool(4 * kSuperpageBytes);
  std::uint32_t sid = 0;
  REQUIRE(pool.AllocSuperpage(1, &sid) == Status::kOk);
  REQUIRE(pool.AllocSuperpage(2, &sid) == Status::kOk);
  // Two pools; 600 pages spill into a second active superpage.
  for (std::uint32_t i = 0; i < 600; ++i) {
    REQUIRE(PutPage(pool, 3, Handle(i % 2, i, 0), MakePage(i)) == Status::kOk);
  }
  for (std::uint32_t i = 0; i < 30; ++i) {
    REQUIRE(PutPage(pool, 1, Handle(4, i, 0), MakePage(i)) == Status::kOk);
  }
  const LenderPoolStats stats = pool.Stats();
  const std::uint64_t held =
      pool.Stats(1).caller_pages + pool.Stats(2).caller_pages + pool.Stats(3).caller_pages;
  CHECK(pool.Stats(1).caller_pages == kPagesPerSuperpage + 30);
  CHECK(pool.Stats(2).caller_pages == kPagesPerSuperpage);
  CHECK(pool.Stats(3).caller_pages == 600);
  // QUERY counts the 630 cached pages as free; used_bytes counts them as used.
  CHECK(stats.ephemeral_pages == 630);
  CHECK(stats.free_pages + held - stats.ephemeral_pages == stats.total_pages);
  CHECK(stats.used_bytes == held * kPageBytes);
  CHECK(stats.borrowers == 3);
  CHECK(pool.Stats(9).caller_pages == 0);
}

TEST_CASE("sessions working in parallel keep their data apart") {
  LenderPool pool(16 * kSuperpageBytes);
  std::atomic<int> evictions{0};
  pool.SetEvictionHandler([&](std::span<const Eviction> batch) {
    evictions.fetch_add(static_cast<int>(batch.size()));
  });
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
        // Cached pages may be evicted, but never read back wrong.
        if (PutPage(pool, session, Handle(2, round, 0), page) != Status::kOk) {
          failures.fetch_add(1);
        }
        const std::optional<Page> got = GetPage(pool, session, Handle(2, round % 50, 0));
        if (got && *got != MakePage(session * 1000000 + round % 50)) failures.fetch_add(1);
        if (round % 7 == 0) pool.Flush(session, Handle(2, round / 2, 0));
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

TEST_CASE("reclaims racing with cached and passive traffic lose nothing else") {
  // 8 superpages: two dirty sessions hold up to three grants each, so an allocation always
  // finds a free or an active superpage.
  // The dirty sessions start once the caches fill at least four superpages, and the
  // caches keep refilling what is reclaimed until the dirty sessions are done.
  LenderPool pool(8 * kSuperpageBytes);
  std::atomic<std::uint64_t> evicted{0};
  std::atomic<int> reclaims{0};  // a FIFO eviction reports one page, a reclaim usually more
  pool.SetEvictionHandler([&](std::span<const Eviction> batch) {
    if (batch.size() > 1) reclaims.fetch_add(1);
    for (const Eviction& e : batch) {
      if (e.handle.pool != 7) evicted.fetch_add(1ULL << 32);  // only the caches' pages
    }
    evicted.fetch_add(batch.size());
  });
  std::atomic<int> failures{0};
  std::atomic<bool> dirty_done{false};
  std::vector<std::thread> caches;
  std::vector<std::thread> dirties;
  for (SessionId cache = 1; cache <= 2; ++cache) {
    caches.emplace_back([&pool, &failures, &dirty_done, cache] {
      std::mt19937_64 rng(cache);
      std::vector<std::uint64_t> last(2000, 0);  // seed of the last PUT, 0 if none
      for (std::uint64_t round = 1;
           round <= 2000 || !dirty_done.load(std::memory_order_relaxed); ++round) {
        const std::uint64_t object = rng() % last.size();
        if (rng() % 3 != 0) {
          const std::uint64_t seed = cache * 1000000000 + round;
          if (PutPage(pool, cache, Handle(7, object, 0), MakePage(seed)) == Status::kOk) {
            last[object] = seed;
          }
        } else {
          const std::optional<Page> got = GetPage(pool, cache, Handle(7, object, 0));
          if (got && (last[object] == 0 || *got != MakePage(last[object]))) {
            failures.fetch_add(1);
          }
        }
      }
      pool.ReleaseSession(cache);
    });
  }
  for (SessionId dirty = 3; dirty <= 4; ++dirty) {
    dirties.emplace_back([&pool, &failures, dirty] {
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      while (pool.Stats().ephemeral_pages < 4 * kPagesPerSuperpage &&
             std::chrono::steady_clock::now() < give_up) {
        std::this_thread::yield();
      }
      std::vector<std::pair<std::uint32_t, std::uint64_t>> held;  // sid, seed
      std::vector<std::byte> out(kSuperpageBytes);
      const std::vector<std::byte> zeros(kSuperpageBytes);
      for (std::uint64_t round = 1; round <= 60; ++round) {
        std::uint32_t sid = 0;
        if (pool.AllocSuperpage(dirty, &sid) != Status::kOk) {
          failures.fetch_add(1);
          continue;
        }
        const std::uint64_t seed = dirty * 1000 + 2 * round;
        // The first and the last page; the rest must read as zeros though the superpage
        // may have held cached pages a moment ago.
        if (WriteRange(pool, dirty, sid, 0, MakePage(seed)) != Status::kOk ||
            WriteRange(pool, dirty, sid, kSuperpageBytes - kPageBytes, MakePage(seed + 1)) !=
                Status::kOk) {
          failures.fetch_add(1);
        }
        held.push_back({sid, seed});
        if (held.size() > 2) {
          const auto [old_sid, old_seed] = held.front();
          if (ReadRange(pool, dirty, old_sid, 0, out) != Status::kOk ||
              std::memcmp(out.data(), MakePage(old_seed).data(), kPageBytes) != 0 ||
              std::memcmp(out.data() + kPageBytes, zeros.data(),
                          kSuperpageBytes - 2 * kPageBytes) != 0 ||
              std::memcmp(out.data() + kSuperpageBytes - kPageBytes,
                          MakePage(old_seed + 1).data(), kPageBytes) != 0 ||
              pool.FreeSuperpage(dirty, old_sid) != Status::kOk) {
            failures.fetch_add(1);
          }
          held.erase(held.begin());
        }
      }
      pool.ReleaseSession(dirty);
    });
  }
  for (std::thread& t : dirties) t.join();
  dirty_done.store(true);
  for (std::thread& t : caches) t.join();
  CHECK(failures.load() == 0);
  const std::uint64_t others_evicted = evicted.load() >> 32;
  const std::uint64_t pages_evicted = evicted.load() & 0xffffffffULL;
  CHECK(others_evicted == 0);
  CHECK(pages_evicted > 0);
  CHECK(reclaims.load() > 0);
  const LenderPoolStats stats = pool.Stats();
  CHECK(stats.free_pages == stats.total_pages);
  CHECK(stats.used_bytes == 0);
  CHECK(stats.borrowers == 0);
}

TEST_CASE("releasing a session with scrub zeroes its superpages at once") {
  LenderPool pool(2 * kSuperpageBytes);
  std::uint32_t sid = 0;
  REQUIRE(pool.AllocSuperpage(1, &sid) == Status::kOk);
  const std::vector<std::byte> data = MakeBytes(kSuperpageBytes, 9);
  const RangeBody whole{sid, 0, kSuperpageBytes, 0};
  REQUIRE(pool.Write(1, whole, data) == Status::kOk);
  std::byte* at = nullptr;
  REQUIRE(pool.Locate(1, whole, &at) == Status::kOk);
  pool.ReleaseSession(1, /*scrub=*/true);
  CHECK(pool.Stats().used_bytes == 0);
  // The memory is still mapped (free, not retired): what the session kept is gone from it.
  CHECK(std::all_of(at, at + kSuperpageBytes, [](std::byte b) { return b == std::byte{0}; }));
}

}  // TEST_SUITE("lender_pool")

namespace {

using testing::Eventually;
using testing::RunningLender;

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
  CHECK(reply->payload.size() == sizeof(HelloBody) + sizeof(SessionTicket));
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
      b.Call(MessageType::kPut, kPutEphemeral, Handle(1, 1, 1), page);
  REQUIRE(put);
  REQUIRE(put->status() == Status::kOk);
  q = a.Query();
  REQUIRE(q);
  CHECK(q->caller_pages == kPagesPerSuperpage);
  CHECK(q->free_pages == 3 * kPagesPerSuperpage);  // a cached page counts as free
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

TEST_CASE("a connection that does not say HELLO in time is hung up") {
  LenderOptions options;
  options.hello_timeout = std::chrono::milliseconds(200);
  RunningLender lender(kSuperpageBytes, 0xfeed, options);
  PeerTestClient silent = lender.Connect();
  CHECK(Eventually([&] { return lender.service->sessions() == 1; }));
  CHECK(silent.WaitClosed());
  CHECK(Eventually([&] { return lender.service->sessions() == 0; }));
  // One that says HELLO in time stays, past the deadline.
  PeerTestClient prompt = lender.Connect();
  REQUIRE(prompt.Hello());
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  CHECK(prompt.Query());
}

TEST_CASE("a borrower node holds at most max_superpages_per_borrower, across its sessions") {
  LenderOptions options;
  options.max_superpages_per_borrower = 2;
  RunningLender lender(8 * kSuperpageBytes, 0xfeed, options);
  const auto alloc = [](PeerTestClient& client) -> std::optional<std::uint32_t> {
    std::optional<TestMessage> reply = client.Call(MessageType::kAllocSuperpage);
    REQUIRE(reply);
    SuperpageBody body{};
    if (reply->status() != Status::kOk) {
      CHECK(reply->status() == Status::kNoSpace);
      CHECK(reply->text().find("limit of 2 superpages") != std::string::npos);
      return std::nullopt;
    }
    REQUIRE(reply->As(&body));
    return body.sid;
  };
  PeerTestClient a = lender.Connect();
  REQUIRE(a.Hello(7));
  const std::optional<std::uint32_t> first = alloc(a);
  REQUIRE(first);
  // QUERY tells it what it may still take, not the whole pool's room.
  std::optional<QueryReply> query = a.Query();
  REQUIRE(query);
  CHECK(query->free_pages == kPagesPerSuperpage);
  REQUIRE(alloc(a));
  CHECK_FALSE(alloc(a));
  query = a.Query();
  REQUIRE(query);
  CHECK(query->free_pages == 0);
  // Another session of the same node shares the limit; another node has its own.
  PeerTestClient a2 = lender.Connect();
  REQUIRE(a2.Hello(7));
  CHECK_FALSE(alloc(a2));
  PeerTestClient b = lender.Connect();
  REQUIRE(b.Hello(8));
  CHECK(alloc(b));
  CHECK(alloc(b));
  CHECK_FALSE(alloc(b));
  CHECK(lender.service->NodeSuperpages(7) == 2);
  CHECK(lender.service->NodeSuperpages(8) == 2);
  // Freeing one makes room for the node again.
  std::optional<TestMessage> freed =
      a.Call(MessageType::kFreeSuperpage, 0, SuperpageBody{*first});
  REQUIRE(freed);
  REQUIRE(freed->status() == Status::kOk);
  CHECK(alloc(a2));
  CHECK(lender.service->Stats().used_bytes == 4 * kSuperpageBytes);
}

TEST_CASE("past max_borrowers a connection gets a HELLO reply with tag 0 saying why") {
  LenderOptions options;
  options.max_borrowers = 2;
  RunningLender lender(kSuperpageBytes, 0xfeed, options);
  auto first = std::make_unique<PeerTestClient>(lender.Connect());
  REQUIRE(first->Hello());
  PeerTestClient second = lender.Connect();
  REQUIRE(second.Hello());
  {
    PeerTestClient third = lender.Connect();
    std::optional<TestMessage> refusal = third.ReadMessage();
    REQUIRE(refusal);
    CHECK(refusal->header.reply);
    CHECK(refusal->header.type == MessageType::kHello);
    CHECK(refusal->header.tag == 0);
    CHECK(refusal->status() == Status::kTooManyBorrowers);
    CHECK(refusal->text().find("at most 2 borrower") != std::string::npos);
    CHECK(third.WaitClosed());
  }
  CHECK(lender.service->sessions() == 2);
  first.reset();
  CHECK(Eventually([&] { return lender.service->sessions() == 1; }));
  PeerTestClient fourth = lender.Connect();
  CHECK(fourth.Hello());
}

TEST_CASE("requests sent along with HELLO survive the move to full-size buffers") {
  RunningLender lender(4 * kSuperpageBytes);
  PeerTestClient client = lender.Connect();
  const HelloBody hello{1, 0, kSuperpageBytes, kCapPassive | kCapActive};
  std::vector<std::byte> wire;
  const auto append = [&](MessageType type, std::uint64_t tag, std::span<const std::byte> body) {
    std::byte header[sizeof(Header)];
    EncodeHeader(type, false, 0, Status::kOk, tag, static_cast<std::uint32_t>(body.size()),
                 header);
    wire.insert(wire.end(), header, header + sizeof(header));
    wire.insert(wire.end(), body.begin(), body.end());
  };
  append(MessageType::kHello, 1, std::as_bytes(std::span<const HelloBody, 1>(&hello, 1)));
  for (std::uint64_t tag = 2; tag < 40; ++tag) append(MessageType::kQuery, tag, {});
  REQUIRE(client.SendRaw(wire));
  for (std::uint64_t tag = 1; tag < 40; ++tag) {
    std::optional<TestMessage> reply = client.ReadMessage();
    REQUIRE(reply);
    CHECK(reply->header.tag == tag);
    CHECK(reply->status() == Status::kOk);
  }
}

TEST_CASE("before HELLO a request larger than the small buffer is refused and hung up") {
  RunningLender lender(kSuperpageBytes);
  PeerTestClient client = lender.Connect();
  const RangeBody range{1, 0, kSuperpageBytes, 0};
  const std::vector<std::byte> data(kSuperpageBytes);
  // The lender may hang up before the payload is all sent, so the send may fail.
  (void)client.Send(MessageType::kWrite, 3, 0,
                    std::as_bytes(std::span<const RangeBody, 1>(&range, 1)), data);
  std::optional<TestMessage> reply = client.ReadMessage();
  REQUIRE(reply);
  CHECK(reply->header.tag == 3);
  CHECK(reply->status() == Status::kProtocol);
  CHECK(reply->text() == "send HELLO before WRITE");
  CHECK(client.WaitClosed());
}

TEST_CASE("an oversized HELLO before HELLO is refused as too big, naming its length") {
  RunningLender lender(kSuperpageBytes);
  PeerTestClient client = lender.Connect();
  const std::vector<std::byte> body(5000);
  (void)client.Send(MessageType::kHello, 4, 0, body);
  std::optional<TestMessage> reply = client.ReadMessage();
  REQUIRE(reply);
  CHECK(reply->status() == Status::kTooBig);
  CHECK(reply->text() == "HELLO carries 5000 payload bytes, expected 24");
  CHECK(client.WaitClosed());
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
  // Without the EPHEMERAL flag: persistent pools are not served.
  reply = client.Call(MessageType::kPut, 0, Handle(2, 3, 4), page);
  REQUIRE(reply);
  CHECK(reply->status() == Status::kUnsupported);
  CHECK(std::string(reinterpret_cast<const char*>(reply->payload.data()), reply->payload.size())
            .find("persistent pools are not served") != std::string::npos);
  reply = client.Call(MessageType::kGet, 0, Handle(2, 3, 4));
  REQUIRE(reply);
  CHECK(reply->status() == Status::kNotFound);
  reply = client.Call(MessageType::kPut, kPutEphemeral, Handle(2, 3, 4), page);
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

TEST_CASE("pipelined READs, a WRITE over them and READs again are answered in order") {
  // READ replies go out from the pool itself, after the requests that came with them are
  // served: a WRITE among them must not change what an earlier READ returns.
  RunningLender lender(2 * kSuperpageBytes);
  PeerTestClient client = lender.Connect();
  REQUIRE(client.Hello());
  const std::uint32_t sid = AllocOverWire(client);
  const std::vector<std::byte> before = MakeBytes(16 * kPageBytes, 1);
  const std::vector<std::byte> after = MakeBytes(16 * kPageBytes, 2);
  std::optional<TestMessage> reply =
      client.Call(MessageType::kWrite, 0, RangeBody{sid, 0, 16 * kPageBytes, 0}, before);
  REQUIRE(reply);
  REQUIRE(reply->status() == Status::kOk);
  const RangeBody range{sid, 0, 16 * kPageBytes, 0};
  const auto body = std::as_bytes(std::span(&range, 1));
  // One send: READ (tag 1), READ (2), WRITE (3), READ (4).
  std::vector<std::byte> wire;
  for (const auto& part : {PeerTestClient::Encode(MessageType::kRead, 1, 0, body),
                           PeerTestClient::Encode(MessageType::kRead, 2, 0, body),
                           PeerTestClient::Encode(MessageType::kWrite, 3, 0, body, after),
                           PeerTestClient::Encode(MessageType::kRead, 4, 0, body)}) {
    wire.insert(wire.end(), part.begin(), part.end());
  }
  REQUIRE(client.SendRaw(wire));
  for (std::uint64_t tag = 1; tag <= 4; ++tag) {
    reply = client.ReadMessage();
    REQUIRE(reply);
    CHECK(reply->header.tag == tag);
    REQUIRE(reply->status() == Status::kOk);
    if (tag == 3) continue;
    CHECK(reply->payload == (tag < 3 ? before : after));
  }
}

// A lender with two sessions, `owner` holding superpage `sid`, and `other`.
struct TwoSessions {
  RunningLender lender{2 * kSuperpageBytes};
  PeerTestClient owner = lender.Connect();
  PeerTestClient other = lender.Connect();
  std::uint32_t sid = 0;

  TwoSessions() {
    REQUIRE(owner.Hello());
    REQUIRE(other.Hello());
    sid = AllocOverWire(owner);
  }
};

TEST_CASE_FIXTURE(TwoSessions,
                  "a large WRITE into another session's superpage is refused and the stream goes on") {
  const std::vector<std::byte> mine = MakeBytes(kSuperpageBytes, 5);
  std::optional<TestMessage> reply =
      owner.Call(MessageType::kWrite, 0, RangeBody{sid, 0, kSuperpageBytes, 0}, mine);
  REQUIRE(reply);
  REQUIRE(reply->status() == Status::kOk);
  // A whole superpage of someone else's: refused, and its bytes are not taken for requests.
  reply = other.Call(MessageType::kWrite, 0, RangeBody{sid, 0, kSuperpageBytes, 0},
                     MakeBytes(kSuperpageBytes, 6));
  REQUIRE(reply);
  CHECK(reply->status() == Status::kNotPermitted);
  reply = other.Call(MessageType::kQuery);
  REQUIRE(reply);
  CHECK(reply->status() == Status::kOk);
  reply = owner.Call(MessageType::kRead, 0, RangeBody{sid, 0, kSuperpageBytes, 0});
  REQUIRE(reply);
  REQUIRE(reply->status() == Status::kOk);
  CHECK(reply->payload == mine);
}

TEST_CASE_FIXTURE(TwoSessions, "a second session may not touch the first one's superpage") {
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

TEST_CASE("with no grace period a session's memory is freed when its connection closes") {
  LenderOptions options;
  options.borrower_grace = std::chrono::milliseconds(0);
  RunningLender lender(4 * kSuperpageBytes, 0xfeedULL, options);
  PeerTestClient watcher = lender.Connect();
  REQUIRE(watcher.Hello());
  {
    PeerTestClient leaver = lender.Connect();
    REQUIRE(leaver.Hello());
    AllocOverWire(leaver);
    AllocOverWire(leaver);
    const Page page = MakePage(1);
    std::optional<TestMessage> reply =
        leaver.Call(MessageType::kPut, kPutEphemeral, Handle(1, 1, 1), page);
    REQUIRE(reply);
    REQUIRE(reply->status() == Status::kOk);
    std::optional<QueryReply> q = watcher.Query();
    REQUIRE(q);
    CHECK(q->free_pages == 2 * kPagesPerSuperpage);  // the cached page counts as free
    CHECK(lender.service->Stats().used_bytes == (2 * kPagesPerSuperpage + 1) * kPageBytes);
    CHECK(q->borrowers == 1);
  }
  CHECK(Eventually([&] {
    const std::optional<QueryReply> q = watcher.Query();
    return q && q->free_pages == 4 * kPagesPerSuperpage && q->borrowers == 0;
  }));
  CHECK(lender.service->Stats().used_bytes == 0);
}

// Reads `count` EVICTED notices from `client` (nothing else may come) and returns their
// handles' objects; every notice must name `pool` and `index`.
std::set<std::uint64_t> ReadEvictedNotices(PeerTestClient& client, std::size_t count,
                                           std::uint32_t pool, std::uint32_t index) {
  std::set<std::uint64_t> objects;
  for (std::size_t i = 0; i < count; ++i) {
    std::optional<TestMessage> notice = client.ReadMessage();
    REQUIRE(notice);
    REQUIRE(notice->header.type == MessageType::kEvicted);
    CHECK_FALSE(notice->header.reply);
    CHECK(notice->header.tag == 0);
    HandleBody evicted{};
    REQUIRE(notice->As(&evicted));
    CHECK(notice->payload.size() == sizeof(HandleBody));
    CHECK(evicted.pool == pool);
    CHECK(evicted.index == index);
    objects.insert(evicted.object);
  }
  return objects;
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
  // Another cached page evicts the oldest one.
  std::optional<TestMessage> reply =
      store.Call(MessageType::kPut, kPutEphemeral, Handle(1, 1, 1), MakePage(100));
  REQUIRE(reply);
  REQUIRE(reply->status() == Status::kOk);
  CHECK(store.notices().empty());
  CHECK(ReadEvictedNotices(cache, 1, 6, 2) == std::set<std::uint64_t>{0});
  reply = cache.Call(MessageType::kGet, 0, Handle(6, 0, 2));
  REQUIRE(reply);
  CHECK(reply->status() == Status::kNotFound);

  // A PUT without the EPHEMERAL flag is refused, and evicts nothing.
  reply = store.Call(MessageType::kPut, 0, Handle(2, 1, 1), MakePage(200));
  REQUIRE(reply);
  CHECK(reply->status() == Status::kUnsupported);
  CHECK(store.notices().empty());
  reply = cache.Call(MessageType::kGet, 0, Handle(6, 7, 2));
  REQUIRE(reply);
  CHECK(reply->status() == Status::kOk);
  CHECK(cache.notices().empty());
}

TEST_CASE("another borrower's ALLOC_SUPERPAGE evicts cached pages; their owner is told") {
  RunningLender lender(2 * kSuperpageBytes);
  PeerTestClient cache = lender.Connect();
  PeerTestClient dirty = lender.Connect();
  REQUIRE(cache.Hello());
  REQUIRE(dirty.Hello());
  // The cache fills the whole pool with clean pages.
  constexpr std::uint32_t kPages = 2 * kPagesPerSuperpage;
  for (std::uint32_t i = 0; i < kPages; ++i) {
    const std::optional<TestMessage> reply =
        cache.Call(MessageType::kPut, kPutEphemeral, Handle(4, i, 0), MakePage(i));
    REQUIRE(reply);
    REQUIRE(reply->status() == Status::kOk);
  }
  // QUERY shows that room as free to anyone placing dirty pages; the lender's status
  // still counts it as used.
  std::optional<QueryReply> q = dirty.Query();
  REQUIRE(q);
  CHECK(q->free_pages == kPages);
  q = cache.Query();
  REQUIRE(q);
  CHECK(q->free_pages == kPages);
  CHECK(q->caller_pages == kPages);
  LendingStats stats = lender.service->Stats();
  CHECK(stats.used_bytes == 2 * kSuperpageBytes);
  CHECK(stats.ephemeral_bytes == 2 * kSuperpageBytes);

  // Superpage 1 (objects 512..1023) has fewer pages: 500.
  for (std::uint32_t i = kPagesPerSuperpage; i < kPagesPerSuperpage + 12; ++i) {
    const std::optional<TestMessage> reply = cache.Call(MessageType::kFlush, 0, Handle(4, i, 0));
    REQUIRE(reply);
    REQUIRE(reply->status() == Status::kOk);
  }
  const std::uint32_t sid = AllocOverWire(dirty);
  CHECK(dirty.notices().empty());
  // The notices were written before the ALLOC reply, so they are all there to read.
  const std::set<std::uint64_t> evicted = ReadEvictedNotices(cache, 500, 4, 0);
  REQUIRE(evicted.size() == 500);
  CHECK(*evicted.begin() == kPagesPerSuperpage + 12);
  CHECK(*evicted.rbegin() == kPages - 1);
  for (const std::uint32_t i : {0u, 1u, 300u, kPagesPerSuperpage - 1}) {
    const std::optional<TestMessage> reply = cache.Call(MessageType::kGet, 0, Handle(4, i, 0));
    REQUIRE(reply);
    REQUIRE(reply->status() == Status::kOk);
    const Page expected = MakePage(i);
    CHECK(std::equal(reply->payload.begin(), reply->payload.end(), expected.begin(),
                     expected.end()));
  }
  for (const std::uint64_t i : {kPagesPerSuperpage + 12, kPagesPerSuperpage + 100, kPages - 1}) {
    const std::optional<TestMessage> reply =
        cache.Call(MessageType::kGet, 0, Handle(4, i, 0));
    REQUIRE(reply);
    CHECK(reply->status() == Status::kNotFound);
  }
  CHECK(cache.notices().empty());  // no notice beyond the 500
  q = dirty.Query();
  REQUIRE(q);
  CHECK(q->caller_pages == kPagesPerSuperpage);
  CHECK(q->free_pages == kPagesPerSuperpage);
  stats = lender.service->Stats();
  CHECK(stats.used_bytes == 2 * kSuperpageBytes);
  CHECK(stats.ephemeral_bytes == kSuperpageBytes);

  // The granted superpage holds the dirty pages and none of the cache's.
  std::optional<TestMessage> reply =
      dirty.Call(MessageType::kRead, 0, RangeBody{sid, 0, kSuperpageBytes, 0});
  REQUIRE(reply);
  REQUIRE(reply->status() == Status::kOk);
  CHECK(AllZero(reply->payload));
}

TEST_CASE("RECLAIM for a borrower whose socket is full waits for room, not the resize") {
  RunningLender lender(4 * kSuperpageBytes);
  PeerTestClient client = lender.Connect();
  REQUIRE(client.Hello());
  const std::uint32_t first = AllocOverWire(client);
  const std::uint32_t second = AllocOverWire(client);
  // 32 reads of a whole superpage, none of whose replies is read yet: 64 MiB, more than the
  // loopback socket buffers hold, so the session's thread is stuck writing a reply.
  constexpr int kReads = 32;
  for (int i = 0; i < kReads; ++i) {
    const RangeBody range{first, 0, kSuperpageBytes, 0};
    REQUIRE(client.Send(MessageType::kRead, 1000 + static_cast<std::uint64_t>(i), 0,
                        std::as_bytes(std::span<const RangeBody, 1>(&range, 1))));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // let it fill (not a bound)
  // Down to 1: the two free superpages retire, and one granted one is asked back. This
  // returns with the notice queued: before, it waited on the stuck session (up to its 30 s
  // send timeout, which then ended the session).
  lender.service->Resize(kSuperpageBytes, std::chrono::milliseconds(20000));
  lender.service->SendPendingReclaims();
  // Read everything: the replies, then (sent by a later round, as the daemon's every second
  // would) the one RECLAIM, naming one of the two superpages.
  int replies = 0;
  std::optional<TestMessage> reclaim;
  for (int rounds = 0; rounds < 2000 && (replies < kReads || !reclaim); ++rounds) {
    if (replies == kReads) {
      lender.service->SendPendingReclaims();
      pollfd ready{client.fd(), POLLIN, 0};
      if (::poll(&ready, 1, 10) != 1) continue;  // the session's thread still held the socket
    }
    std::optional<TestMessage> message = client.ReadMessage();
    REQUIRE(message);
    if (message->header.reply) {
      CHECK(message->status() == Status::kOk);
      CHECK(message->payload.size() == kSuperpageBytes);
      ++replies;
    } else {
      REQUIRE(message->header.type == MessageType::kReclaim);
      CHECK_FALSE(reclaim);  // once
      reclaim = std::move(message);
    }
  }
  REQUIRE(replies == kReads);
  REQUIRE(reclaim);
  ReclaimBody body{};
  REQUIRE(reclaim->As(&body));
  CHECK(body.count == 1);
  CHECK(body.deadline_ms > 0);
  CHECK(body.deadline_ms <= 20000);
  REQUIRE(reclaim->payload.size() == sizeof(ReclaimBody) + sizeof(std::uint32_t));
  std::uint32_t sid = 0;
  std::memcpy(&sid, reclaim->payload.data() + sizeof(ReclaimBody), sizeof(sid));
  CHECK((sid == first || sid == second));
  // The session is alive: the superpage goes back, and the pool is down to its size.
  std::optional<TestMessage> reply =
      client.Call(MessageType::kFreeSuperpage, 0, SuperpageBody{sid});
  REQUIRE(reply);
  CHECK(reply->status() == Status::kOk);
  CHECK(lender.service->Stats().total_bytes == kSuperpageBytes);
  CHECK(lender.service->Stats().reclaiming_bytes == 0);
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

// A borrower's session on a lender with a grace period: one superpage holding `page` at
// offset 0, and the ticket its HELLO got.
struct ParkedSessionFixture {
  static LenderOptions Options(std::chrono::milliseconds grace, unsigned max_borrowers = 32) {
    LenderOptions options;
    options.borrower_grace = grace;
    options.max_borrowers = max_borrowers;
    return options;
  }
  explicit ParkedSessionFixture(std::chrono::milliseconds grace = std::chrono::seconds(60),
                                unsigned max_borrowers = 32)
      : lender(4 * kSuperpageBytes, 0xfeedULL, Options(grace, max_borrowers)) {}

  // Connects as node 7, takes a superpage, writes `page` there and hangs up.
  void Leave() {
    PeerTestClient client = lender.Connect();
    std::optional<SessionTicket> got = client.HelloSession(7);
    REQUIRE(got);
    ticket = *got;
    sid = AllocOverWire(client);
    std::optional<TestMessage> reply =
        client.Call(MessageType::kWrite, 0, RangeBody{sid, 0, kPageBytes, 0}, page);
    REQUIRE(reply);
    REQUIRE(reply->status() == Status::kOk);
  }
  bool Parked() {
    return Eventually([&] { return lender.service->Parked().size() == 1; });
  }
  // Reads the page at offset 0 of `sid` over `client`: the reply's status and data.
  std::pair<Status, std::vector<std::byte>> ReadBack(PeerTestClient& client) {
    std::optional<TestMessage> reply =
        client.Call(MessageType::kRead, 0, RangeBody{sid, 0, kPageBytes, 0});
    REQUIRE(reply);
    return {reply->status(), reply->payload};
  }

  RunningLender lender;
  const Page page = MakePage(42);
  SessionTicket ticket{};
  std::uint32_t sid = 0;
};

TEST_CASE("every session gets its own secret and the lender's grace period") {
  ParkedSessionFixture f;
  PeerTestClient a = f.lender.Connect();
  PeerTestClient b = f.lender.Connect();
  const std::optional<SessionTicket> ta = a.HelloSession(1);
  const std::optional<SessionTicket> tb = b.HelloSession(1);
  REQUIRE(ta);
  REQUIRE(tb);
  CHECK(ta->grace_ms == 60000);
  CHECK(ta->superpages == 0);
  CHECK(std::memcmp(ta->secret, tb->secret, kSecretBytes) != 0);
  const std::uint8_t zeros[kSecretBytes] = {};
  CHECK(std::memcmp(ta->secret, zeros, kSecretBytes) != 0);
}

TEST_CASE_FIXTURE(ParkedSessionFixture,
                  "a session that hangs up is kept, and its borrower resumes it with the secret") {
  Leave();
  REQUIRE(Parked());
  const std::vector<ParkedSession> parked = lender.service->Parked();
  CHECK(parked.at(0).node_id == 7);
  CHECK(parked.at(0).pages == kPagesPerSuperpage);
  CHECK(parked.at(0).left > std::chrono::seconds(50));
  CHECK(lender.service->Stats().borrowers == 1);  // its memory still counts
  CHECK(lender.service->Stats().used_bytes == kSuperpageBytes);

  PeerTestClient back = lender.Connect();
  bool resumed = false;
  std::vector<std::uint32_t> listed;
  const std::optional<SessionTicket> again =
      back.HelloSession(7, &ticket, &resumed, kHelloResume, &listed);
  REQUIRE(again);
  CHECK(resumed);
  CHECK(again->superpages == 1);
  CHECK(listed == std::vector<std::uint32_t>{sid});  // the reply names it
  CHECK(std::memcmp(again->secret, ticket.secret, kSecretBytes) == 0);  // the same session
  const auto [status, data] = ReadBack(back);
  CHECK(status == Status::kOk);
  CHECK(std::equal(data.begin(), data.end(), page.begin(), page.end()));
  CHECK(lender.service->Parked().empty());
  // It is the session's in every way: it frees the superpage, and the pool is empty again.
  std::optional<TestMessage> reply = back.Call(MessageType::kFreeSuperpage, 0, SuperpageBody{sid});
  REQUIRE(reply);
  CHECK(reply->status() == Status::kOk);
  CHECK(lender.service->Stats().used_bytes == 0);
}

TEST_CASE_FIXTURE(ParkedSessionFixture,
                  "a wrong secret, or the right one from another node, resumes nothing") {
  Leave();
  REQUIRE(Parked());
  SessionTicket wrong = ticket;
  wrong.secret[kSecretBytes - 1] ^= 1;
  PeerTestClient guesser = lender.Connect();
  bool resumed = true;
  std::optional<SessionTicket> got = guesser.HelloSession(7, &wrong, &resumed);
  REQUIRE(got);
  CHECK_FALSE(resumed);
  CHECK(got->superpages == 0);
  CHECK(ReadBack(guesser).first == Status::kNotPermitted);

  PeerTestClient other_node = lender.Connect();
  resumed = true;
  got = other_node.HelloSession(8, &ticket, &resumed);
  REQUIRE(got);
  CHECK_FALSE(resumed);
  CHECK(ReadBack(other_node).first == Status::kNotPermitted);
  CHECK(lender.service->Parked().size() == 1);  // still there for its own borrower

  // RESUME only on a connection's first HELLO, and its body must be whole.
  std::optional<TestMessage> reply = guesser.Call(
      MessageType::kHello, kHelloResume, HelloBody{7, 0, kSuperpageBytes, kCapPassive});
  REQUIRE(reply);
  CHECK(reply->status() == Status::kInvalid);
  PeerTestClient short_body = lender.Connect();
  reply = short_body.Call(MessageType::kHello, kHelloResume,
                          HelloBody{7, 0, kSuperpageBytes, kCapPassive});
  REQUIRE(reply);
  CHECK(reply->status() == Status::kInvalid);
}

TEST_CASE("a session not resumed within the grace period is freed, its superpages zeroed") {
  ParkedSessionFixture f(std::chrono::milliseconds(300));
  f.Leave();
  REQUIRE(f.Parked());
  CHECK(f.lender.service->ExpireParked() == 0);  // not yet
  std::this_thread::sleep_for(std::chrono::milliseconds(350));
  CHECK(f.lender.service->ExpireParked() == 1);
  CHECK(f.lender.service->Parked().empty());
  CHECK(f.lender.service->Stats().used_bytes == 0);
  CHECK(f.lender.service->Stats().borrowers == 0);
  PeerTestClient late = f.lender.Connect();
  bool resumed = true;
  REQUIRE(late.HelloSession(7, &f.ticket, &resumed));
  CHECK_FALSE(resumed);
  // A new borrower's superpage reads as zeros.
  const std::uint32_t sid = AllocOverWire(late);
  std::optional<TestMessage> reply =
      late.Call(MessageType::kRead, 0, RangeBody{sid, 0, kSuperpageBytes, 0});
  REQUIRE(reply);
  REQUIRE(reply->status() == Status::kOk);
  CHECK(std::all_of(reply->payload.begin(), reply->payload.end(),
                    [](std::byte b) { return b == std::byte{0}; }));
}

TEST_CASE_FIXTURE(ParkedSessionFixture,
                  "a resume takes over a session whose connection is still open") {
  PeerTestClient stale = lender.Connect();
  std::optional<SessionTicket> got = stale.HelloSession(7);
  REQUIRE(got);
  ticket = *got;
  sid = AllocOverWire(stale);
  std::optional<TestMessage> reply =
      stale.Call(MessageType::kWrite, 0, RangeBody{sid, 0, kPageBytes, 0}, page);
  REQUIRE(reply);
  REQUIRE(reply->status() == Status::kOk);
  // The borrower came back on a new connection; the old one is still open here.
  PeerTestClient fresh = lender.Connect();
  bool resumed = false;
  got = fresh.HelloSession(7, &ticket, &resumed);
  REQUIRE(got);
  CHECK(resumed);
  CHECK(got->superpages == 1);
  CHECK(stale.WaitClosed());
  const auto [status, data] = ReadBack(fresh);
  CHECK(status == Status::kOk);
  CHECK(std::equal(data.begin(), data.end(), page.begin(), page.end()));
  CHECK(lender.service->Parked().empty());
  CHECK(lender.service->sessions() == 1);
}

TEST_CASE_FIXTURE(ParkedSessionFixture, "a session that says GOODBYE is not kept") {
  {
    PeerTestClient client = lender.Connect();
    REQUIRE(client.HelloSession(7));
    AllocOverWire(client);
    std::optional<TestMessage> reply = client.Call(MessageType::kGoodbye);
    REQUIRE(reply);
    CHECK(reply->status() == Status::kOk);
  }
  CHECK(Eventually([&] { return lender.service->Stats().used_bytes == 0; }));
  CHECK(lender.service->Parked().empty());
}

TEST_CASE_FIXTURE(ParkedSessionFixture,
                  "HELLO with FORGET frees the session its secret names, and starts a new one") {
  Leave();
  REQUIRE(Parked());
  PeerTestClient back = lender.Connect();
  bool resumed = true;
  const std::optional<SessionTicket> got = back.HelloSession(7, &ticket, &resumed, kHelloForget);
  REQUIRE(got);
  CHECK_FALSE(resumed);
  CHECK(std::memcmp(got->secret, ticket.secret, kSecretBytes) != 0);
  CHECK(lender.service->Parked().empty());
  CHECK(lender.service->Stats().used_bytes == 0);
  CHECK(ReadBack(back).first == Status::kNotPermitted);
  // Both at once is refused.
  PeerTestClient both = lender.Connect();
  CHECK_FALSE(both.HelloSession(7, &ticket, nullptr, kHelloForget | kHelloResume));
}

TEST_CASE("parked sessions count against max_borrowers, but their own borrower gets back in") {
  ParkedSessionFixture f(std::chrono::seconds(60), /*max_borrowers=*/2);
  f.Leave();
  REQUIRE(f.Parked());
  PeerTestClient live = f.lender.Connect();
  REQUIRE(live.HelloSession(1));
  // One live and one parked: a new borrower is refused at HELLO, saying why.
  PeerTestClient newcomer = f.lender.Connect();
  std::optional<TestMessage> reply =
      newcomer.Call(MessageType::kHello, 0, HelloBody{2, 0, kSuperpageBytes, kCapPassive});
  REQUIRE(reply);
  CHECK(reply->status() == Status::kTooManyBorrowers);
  const std::string text(reinterpret_cast<const char*>(reply->payload.data()),
                         reply->payload.size());
  CHECK(text.find("--max-borrowers") != std::string::npos);
  CHECK(newcomer.WaitClosed());
  // The parked session's borrower is let in.
  CHECK(Eventually([&] { return f.lender.service->sessions() == 1; }));
  PeerTestClient back = f.lender.Connect();
  bool resumed = false;
  REQUIRE(back.HelloSession(7, &f.ticket, &resumed));
  CHECK(resumed);
  CHECK(f.ReadBack(back).first == Status::kOk);
}

TEST_CASE_FIXTURE(ParkedSessionFixture,
                  "a superpage asked back while its session was parked is asked again on resume") {
  Leave();
  REQUIRE(Parked());
  lender.service->Resize(0, std::chrono::milliseconds(20000));
  CHECK(lender.service->Stats().reclaiming_bytes == kSuperpageBytes);
  PeerTestClient back = lender.Connect();
  bool resumed = false;
  REQUIRE(back.HelloSession(7, &ticket, &resumed));
  REQUIRE(resumed);
  // Sent by a later round (as the daemon's every second) if the session's thread held the
  // socket at first.
  bool readable = false;
  for (int round = 0; round < 500 && !readable; ++round) {
    lender.service->SendPendingReclaims();
    pollfd ready{back.fd(), POLLIN, 0};
    readable = ::poll(&ready, 1, 10) == 1;
  }
  REQUIRE(readable);
  std::optional<TestMessage> notice = back.ReadMessage();
  REQUIRE(notice);
  REQUIRE(notice->header.type == MessageType::kReclaim);
  ReclaimBody body{};
  REQUIRE(notice->As(&body));
  CHECK(body.count == 1);
  std::uint32_t asked = 0;
  REQUIRE(notice->payload.size() == sizeof(ReclaimBody) + sizeof(asked));
  std::memcpy(&asked, notice->payload.data() + sizeof(ReclaimBody), sizeof(asked));
  CHECK(asked == sid);
  // Its page is still there to be moved off.
  const auto [status, data] = ReadBack(back);
  CHECK(status == Status::kOk);
  CHECK(std::equal(data.begin(), data.end(), page.begin(), page.end()));
}

}  // TEST_SUITE("lender_service")

}  // namespace memlend::peer
