// PeerStore, the borrower's remote tier, against a real LenderService on loopback: passive
// pages in superpages, and the cache of clean pages in the lender's ephemeral pool, including
// pages the lender drops for another borrower's allocation.

#include <doctest/doctest.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <vector>

#include "peer/peer_store.h"
#include "running_lender.h"
#include "seeded_page.h"

namespace memlend::peer {
namespace {

using testing::Eventually;
using testing::RunningLender;

constexpr std::uint64_t kSuperpage = 2 * 1024 * 1024;
constexpr std::size_t kPagesPer = kSuperpage / kPageSize;

using memlend::testing::PageOf;

// Puts pages seeds [first, first + count) into `cache`, in batches of 64. CHECKs each went in.
std::vector<Slot> CachePages(PageStore& cache, std::uint64_t first, std::size_t count) {
  std::vector<Slot> slots(count);
  for (std::size_t base = 0; base < count; base += 64) {
    const std::size_t n = std::min<std::size_t>(64, count - base);
    std::vector<std::vector<std::byte>> pages;
    std::vector<const std::byte*> pointers;
    std::vector<std::uint64_t> hints;
    for (std::size_t i = 0; i < n; ++i) {
      pages.push_back(PageOf(first + base + i));
      hints.push_back(first + base + i);
    }
    for (const auto& page : pages) pointers.push_back(page.data());
    std::vector<int> results(n, -1);
    cache.WriteBatch(pointers, hints, std::span(slots).subspan(base, n), results);
    for (std::size_t i = 0; i < n; ++i) REQUIRE(results[i] == 0);
  }
  return slots;
}

// Breaks the store's link to its first peer from this end (the lender sees the connection
// end) and waits until the transport knows it.
void BreakLink(PeerStore& store) {
  const std::shared_ptr<PeerTransport> broken = store.members().TransportOf(store.members().at(0));
  broken->Hangup();
  REQUIRE(Eventually([&] { return !broken->connected(); }));
}

TEST_SUITE("peer_store") {

TEST_CASE("passive pages and cached pages round-trip; discards show on the lender") {
  RunningLender lender(8 * kSuperpage);
  PeerStore store(0x1111);
  REQUIRE(store.AddPeer(lender.endpoint) == 0);
  store.Refresh();
  REQUIRE(store.Peers().at(0).state == PeerState::kUp);

  // Passive: a dirty page in a superpage.
  Slot passive = 0;
  const std::vector<std::byte> dirty = PageOf(7);
  REQUIRE(store.Write(ConstPageSpan(dirty.data(), kPageSize), 7, &passive) == 0);

  // Cache: 100 clean pages in the ephemeral pool.
  PageStore& cache = store.cache();
  const std::vector<Slot> slots = CachePages(cache, 1000, 100);
  CHECK(cache.Stats().pages == 100);
  CHECK(store.Peers().at(0).pages_cached == 100);
  CHECK(store.Stats().pages == 1);  // the passive figures do not count the cache
  const LendingStats lent = lender.service->Stats();
  // One superpage granted, and 100 pages holding the cached ones.
  CHECK(lent.used_bytes == kSuperpage + 100 * kPageSize);
  CHECK(lent.ephemeral_bytes == 100 * kPageSize);

  std::vector<std::byte> out(kPageSize);
  REQUIRE(store.Read(passive, PageSpan(out.data(), kPageSize)) == 0);
  CHECK(out == dirty);
  for (std::size_t i = 0; i < slots.size(); ++i) {
    REQUIRE(cache.Read(slots[i], PageSpan(out.data(), kPageSize)) == 0);
    CHECK(out == PageOf(1000 + i));
  }

  // Discarding every cached page frees them on the lender (FLUSH is sent without waiting,
  // so the lender's count drops a moment later).
  for (const Slot slot : slots) cache.Discard(slot);
  CHECK(cache.Stats().pages == 0);
  CHECK(Eventually([&] { return lender.service->Stats().used_bytes == kSuperpage; }));
  store.Discard(passive);
  CHECK(Eventually([&] { return lender.service->Stats().used_bytes == 0; }));
}

TEST_CASE("another borrower's allocation evicts cached pages; reads of them miss, others hit") {
  RunningLender lender(2 * kSuperpage);
  PeerStore owner(0x1111);
  REQUIRE(owner.AddPeer(lender.endpoint) == 0);
  owner.Refresh();
  PageStore& cache = owner.cache();
  // Fill the whole pool with cached pages.
  const std::vector<Slot> slots = CachePages(cache, 0, 2 * kPagesPer);
  CHECK(cache.Stats().pages == 2 * kPagesPer);
  // A further cached page finds no room and is refused, not an error.
  {
    const std::vector<std::byte> extra = PageOf(99999);
    Slot slot = 0;
    const int rc = cache.Write(ConstPageSpan(extra.data(), kPageSize), 99999, &slot);
    // The lender may evict an older cached page to take it, or refuse it.
    CHECK((rc == 0 || rc == -ENOSPC));
    if (rc == 0) cache.Discard(slot);
  }

  // A second borrower needs a superpage for a dirty page: the lender empties one.
  PeerStore other(0x2222);
  REQUIRE(other.AddPeer(lender.endpoint) == 0);
  other.Refresh();
  Slot dirty_slot = 0;
  const std::vector<std::byte> dirty = PageOf(424242);
  REQUIRE(other.Write(ConstPageSpan(dirty.data(), kPageSize), 1, &dirty_slot) == 0);

  // The owner is told (EVICTED notices) and its cache count drops by a superpage's pages.
  CHECK(Eventually([&] { return cache.Stats().pages <= kPagesPer; }));
  const std::uint64_t left = cache.Stats().pages;
  CHECK(left >= kPagesPer - 1);
  std::size_t hits = 0;
  std::size_t misses = 0;
  std::vector<std::byte> out(kPageSize);
  for (std::size_t i = 0; i < slots.size(); ++i) {
    const int rc = cache.Read(slots[i], PageSpan(out.data(), kPageSize));
    if (rc == 0) {
      ++hits;
      CHECK(out == PageOf(i));
    } else {
      CHECK(rc == -ENOENT);
      ++misses;
    }
  }
  CHECK(hits == left);
  CHECK(misses == slots.size() - left);
  // The dirty page is intact.
  REQUIRE(other.Read(dirty_slot, PageSpan(out.data(), kPageSize)) == 0);
  CHECK(out == dirty);
  // Discarding missed pages is harmless; discarding the rest frees the lender's memory.
  for (const Slot slot : slots) cache.Discard(slot);
  CHECK(cache.Stats().pages == 0);
  other.Discard(dirty_slot);
  CHECK(Eventually([&] { return lender.service->Stats().used_bytes == 0; }));
}

TEST_CASE("a borrower's own dirty pages take the room of its cached pages") {
  RunningLender lender(2 * kSuperpage);
  PeerStore store(0x1111);
  REQUIRE(store.AddPeer(lender.endpoint) == 0);
  store.Refresh();
  const std::vector<Slot> cached = CachePages(store.cache(), 0, 2 * kPagesPer);
  store.Refresh();  // QUERY: cached pages count as free room for dirty ones
  CHECK(store.Peers().at(0).pool_free_bytes == 2 * kSuperpage);
  // Two superpages' worth of dirty pages all fit: every cached page gives way.
  std::vector<Slot> dirty(2 * kPagesPer);
  for (std::size_t i = 0; i < dirty.size(); ++i) {
    const std::vector<std::byte> page = PageOf(5000 + i);
    REQUIRE(store.Write(ConstPageSpan(page.data(), kPageSize), i, &dirty[i]) == 0);
  }
  CHECK(Eventually([&] { return store.cache().Stats().pages == 0; }));
  std::vector<std::byte> out(kPageSize);
  for (std::size_t i = 0; i < dirty.size(); ++i) {
    REQUIRE(store.Read(dirty[i], PageSpan(out.data(), kPageSize)) == 0);
    CHECK(out == PageOf(5000 + i));
  }
  for (const Slot slot : cached) {
    CHECK(store.cache().Read(slot, PageSpan(out.data(), kPageSize)) == -ENOENT);
  }
  // Now the pool is full of dirty pages: nothing more fits, cached or not.
  const std::vector<std::byte> page = PageOf(1);
  Slot slot = 0;
  CHECK(store.Write(ConstPageSpan(page.data(), kPageSize), 1, &slot) == -ENOSPC);
  CHECK(store.cache().Write(ConstPageSpan(page.data(), kPageSize), 1, &slot) == -ENOSPC);
}

TEST_CASE("membership: add, remove once nothing is left there, add again") {
  RunningLender lender(8 * kSuperpage);
  PeerStore store(0x1111);
  Endpoint unknown = lender.endpoint;
  unknown.port = static_cast<std::uint16_t>(unknown.port == 1 ? 2 : 1);
  CHECK(store.RemovePeer(lender.endpoint) == -ENOENT);
  REQUIRE(store.AddPeer(lender.endpoint) == 0);
  CHECK(store.AddPeer(lender.endpoint) == -EEXIST);
  store.Refresh();
  REQUIRE(store.Peers().at(0).state == PeerState::kUp);
  Slot slot = 0;
  const std::vector<std::byte> page = PageOf(3);
  REQUIRE(store.Write(ConstPageSpan(page.data(), kPageSize), 3, &slot) == 0);

  CHECK(store.RemovePeer(unknown) == -ENOENT);
  REQUIRE(store.RemovePeer(lender.endpoint) == 0);
  CHECK(store.Peers().at(0).state == PeerState::kRemoving);
  CHECK(store.PickPeer(1) == -1);  // nothing new goes there
  // Its page is still there and readable, and listed to be moved.
  std::vector<std::byte> out(kPageSize);
  CHECK(store.Read(slot, PageSpan(out.data(), kPageSize)) == 0);
  CHECK(out == page);
  const auto leaving = store.CopiesOnDrainingPeers(10);
  REQUIRE(leaving.size() == 1);
  CHECK(leaving[0].slot == slot);
  store.Refresh();  // a page is left: not removed yet
  REQUIRE(store.Peers().size() == 1);
  CHECK(store.Peers().at(0).state == PeerState::kRemoving);

  store.Discard(slot);  // moved elsewhere, say
  store.Refresh();
  CHECK(store.Peers().empty());
  CHECK(store.SlotGone(slot));
  CHECK(Eventually([&] { return lender.service->Stats().used_bytes == 0; }));
  CHECK(store.RemovePeer(lender.endpoint) == -ENOENT);

  // Back, in the same entry (slots name peers by index), with a new session.
  REQUIRE(store.AddPeer(lender.endpoint) == 0);
  CHECK(store.peer_count() == 1);
  store.Refresh();
  REQUIRE(store.Peers().size() == 1);
  CHECK(store.Peers().at(0).state == PeerState::kUp);
  Slot again = 0;
  REQUIRE(store.Write(ConstPageSpan(page.data(), kPageSize), 3, &again) == 0);
  CHECK(store.Read(again, PageSpan(out.data(), kPageSize)) == 0);
  CHECK(out == page);
  CHECK(store.Read(slot, PageSpan(out.data(), kPageSize)) == -EIO);  // the old session's slot

  // Adding a peer that is being removed cancels the removal.
  REQUIRE(store.RemovePeer(lender.endpoint) == 0);
  REQUIRE(store.AddPeer(lender.endpoint) == 0);
  store.Refresh();
  CHECK(store.Peers().at(0).state == PeerState::kUp);
  store.Discard(again);
}

TEST_CASE("a broken connection is resumed: the pages on the lender are still there") {
  RunningLender lender(8 * kSuperpage);
  PeerStore store(0x1111);
  REQUIRE(store.AddPeer(lender.endpoint) == 0);
  store.Refresh();
  REQUIRE(store.Peers().at(0).state == PeerState::kUp);
  constexpr std::size_t kPages = kPagesPer + 3;  // two superpages
  std::vector<Slot> slots(kPages);
  for (std::size_t i = 0; i < kPages; ++i) {
    const std::vector<std::byte> page = PageOf(100 + i);
    REQUIRE(store.Write(ConstPageSpan(page.data(), kPageSize), 100 + i, &slots[i]) == 0);
  }
  REQUIRE(store.Peers().at(0).superpages_held == 2);
  // The link breaks (this end closes it; the lender sees the connection end and parks the
  // session), and the next heartbeats resume it.
  BreakLink(store);
  CHECK(Eventually([&] {
    store.Heartbeat();
    return store.Peers().at(0).state == PeerState::kUp;
  }));
  const PeerInfo info = store.Peers().at(0);
  CHECK(info.pages_lost == 0);
  CHECK(info.superpages_held == 2);
  CHECK(info.pages_stored == kPages);
  CHECK(store.TakeLostCopies().empty());
  CHECK(lender.service->Parked().empty());
  for (std::size_t i = 0; i < kPages; ++i) {
    std::vector<std::byte> out(kPageSize);
    REQUIRE(store.Read(slots[i], PageSpan(out.data(), kPageSize)) == 0);
    CHECK(out == PageOf(100 + i));
  }
  // And it takes new pages as before.
  Slot more = 0;
  const std::vector<std::byte> page = PageOf(9);
  CHECK(store.Write(ConstPageSpan(page.data(), kPageSize), 9, &more) == 0);
}

TEST_CASE("a superpage granted as the connection broke is given back when the session resumes") {
  RunningLender lender(8 * kSuperpage);
  PeerStore store(0x1111);
  REQUIRE(store.AddPeer(lender.endpoint) == 0);
  store.Refresh();
  Slot slot = 0;
  const std::vector<std::byte> page = PageOf(5);
  REQUIRE(store.Write(ConstPageSpan(page.data(), kPageSize), 5, &slot) == 0);
  REQUIRE(lender.service->Stats().used_bytes == kSuperpage);
  // Another connection with the session's secret takes the session over (the lender closes
  // the borrower's), is granted a superpage, and hangs up: to the borrower, that is a grant
  // whose reply never came.
  SessionTicket ticket{};
  {
    Membership::Member& peer = store.members().at(0);
    std::lock_guard lock(peer.mu);
    REQUIRE(peer.secret);
    std::memcpy(ticket.secret, peer.secret->data(), kSecretBytes);
  }
  {
    PeerTestClient other = lender.Connect();
    bool resumed = false;
    REQUIRE(other.HelloSession(0x1111, &ticket, &resumed));
    REQUIRE(resumed);
    const std::optional<TestMessage> grant = other.Call(MessageType::kAllocSuperpage);
    REQUIRE(grant);
    REQUIRE(grant->status() == Status::kOk);
  }
  CHECK(lender.service->Stats().used_bytes == 2 * kSuperpage);
  // The borrower resumes, learns of the superpage it was never told of, and gives it back.
  CHECK(Eventually([&] {
    store.Heartbeat();
    return store.Peers().at(0).state == PeerState::kUp;
  }));
  CHECK(store.Peers().at(0).superpages_held == 1);
  CHECK(Eventually([&] {
    store.Refresh();  // sends the frees that wait
    return lender.service->Stats().used_bytes == kSuperpage;
  }));
  std::vector<std::byte> out(kPageSize);
  REQUIRE(store.Read(slot, PageSpan(out.data(), kPageSize)) == 0);
  CHECK(out == page);
  CHECK(store.Peers().at(0).pages_lost == 0);
}

TEST_CASE("a lender that keeps nothing after a disconnect: the pages there are lost") {
  LenderOptions options;
  options.borrower_grace = std::chrono::milliseconds(0);
  RunningLender lender(8 * kSuperpage, 0xfeedULL, options);
  PeerStore store(0x1111);
  REQUIRE(store.AddPeer(lender.endpoint) == 0);
  store.Refresh();
  Slot slot = 0;
  const std::vector<std::byte> page = PageOf(5);
  REQUIRE(store.Write(ConstPageSpan(page.data(), kPageSize), 5, &slot) == 0);
  BreakLink(store);
  CHECK(Eventually([&] {
    store.Heartbeat();
    return store.Peers().at(0).pages_lost == 1;
  }));
  CHECK(store.TakeLostCopies().size() == 1);
  std::vector<std::byte> out(kPageSize);
  CHECK(store.Read(slot, PageSpan(out.data(), kPageSize)) != 0);
  store.Refresh();  // a new session
  CHECK(store.Peers().at(0).state == PeerState::kUp);
}

TEST_CASE("a lender whose process is gone is not waited for") {
  auto lender = std::make_unique<RunningLender>(8 * kSuperpage);
  PeerStoreOptions options;
  options.down_after = std::chrono::seconds(60);  // resuming would wait this long
  PeerStore store(0x1111, options);
  REQUIRE(store.AddPeer(lender->endpoint) == 0);
  store.Refresh();
  Slot slot = 0;
  const std::vector<std::byte> page = PageOf(5);
  REQUIRE(store.Write(ConstPageSpan(page.data(), kPageSize), 5, &slot) == 0);
  // The link broke before the lender left, so no SHUTDOWN came; then nothing listens there:
  // the connect is refused, and the session is known to be lost at once.
  BreakLink(store);
  lender.reset();
  CHECK(Eventually([&] {
    store.Heartbeat();
    return store.Peers().at(0).state == PeerState::kDown;
  }));
  CHECK(store.Peers().at(0).pages_lost == 1);
}

TEST_CASE("a peer removed after it went down stays listed while its lost pages are named") {
  auto lender = std::make_unique<RunningLender>(8 * kSuperpage);
  const Endpoint endpoint = lender->endpoint;
  PeerStore store(0x1111);
  REQUIRE(store.AddPeer(endpoint) == 0);
  store.Refresh();
  Slot slot = 0;
  const std::vector<std::byte> page = PageOf(5);
  REQUIRE(store.Write(ConstPageSpan(page.data(), kPageSize), 5, &slot) == 0);
  lender.reset();  // the lender goes away, and the one page with it
  CHECK(Eventually([&] {
    store.Heartbeat();
    return store.Peers().at(0).state == PeerState::kDown;
  }));
  CHECK(store.Peers().at(0).pages_lost == 1);
  REQUIRE(store.RemovePeer(endpoint) == 0);
  store.Refresh();
  REQUIRE(store.Peers().size() == 1);
  CHECK(store.Peers().at(0).state == PeerState::kRemoved);
  CHECK(store.Peers().at(0).pages_lost == 1);
  CHECK(store.lost_pages() == 1);
  store.Discard(slot);  // the page is rewritten elsewhere, say
  CHECK(store.Peers().empty());
  CHECK(store.lost_pages() == 0);
}

}  // TEST_SUITE("peer_store")

}  // namespace
}  // namespace memlend::peer
