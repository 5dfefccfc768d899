// PlacementStore's disk copies, against real LenderServices on loopback and a real backing
// file: replicas:N+disk pages survive every lender, a page on a leaving lender with no room
// elsewhere moves to the disk, and a disk copy the full disk could not take comes later.

#include <doctest/doctest.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include "peer/peer_store.h"
#include "peer/peer_transport.h"
#include "running_lender.h"
#include "seeded_page.h"
#include "store/disk_store.h"
#include "store/placement_store.h"
#include "temp_dir.h"

namespace memlend {
namespace {

using peer::PeerState;
using peer::PeerStore;
using peer::testing::Eventually;
using peer::testing::RunningLender;

constexpr std::uint64_t kSuperpage = 2 * 1024 * 1024;

using memlend::testing::PageOf;

// Writes pages seeds [0, count) with `redundancy`; REQUIREs each was placed.
std::vector<Slot> WritePages(PlacementStore& store, std::size_t count, Redundancy redundancy) {
  std::vector<Slot> slots(count);
  for (std::size_t base = 0; base < count; base += 64) {
    const std::size_t n = std::min<std::size_t>(64, count - base);
    std::vector<std::vector<std::byte>> pages;
    std::vector<const std::byte*> pointers;
    std::vector<std::uint64_t> hints;
    for (std::size_t i = 0; i < n; ++i) {
      pages.push_back(PageOf(base + i));
      hints.push_back(base + i);
    }
    for (const auto& page : pages) pointers.push_back(page.data());
    std::vector<int> results(n, -1);
    store.WriteBatchCopies(pointers, hints, redundancy, std::span(slots).subspan(base, n),
                           results);
    for (std::size_t i = 0; i < n; ++i) REQUIRE(results[i] == 0);
  }
  return slots;
}

// What a lender behind a LateReads does to the pages written to it (`tamper`).
enum Tamper { kHonest, kFlip, kSwap, kDrop };

// A transport in front of a real one that, while `late` is set, answers no page read: each
// gets -ETIMEDOUT at once, as from a lender that missed its deadline. With `tamper` set, the
// pages written reach the lender changed: a bit flipped in each (kFlip), the first two of a
// batch exchanged (kSwap), or not at all while the writer is told they were (kDrop: the slot
// keeps what it held, an older page or zeros). Everything else goes through.
class LateReads final : public peer::PeerTransport {
 public:
  LateReads(std::shared_ptr<peer::PeerTransport> inner, std::atomic<bool>* late,
            std::atomic<int>* tamper = nullptr)
      : inner_(std::move(inner)), late_(late), tamper_(tamper) {}
  int Query(peer::QueryReply* reply) noexcept override { return inner_->Query(reply); }
  int AllocSuperpage(std::uint32_t* sid) noexcept override { return inner_->AllocSuperpage(sid); }
  int FreeSuperpageNoReply(std::uint32_t sid, bool wait) noexcept override {
    return inner_->FreeSuperpageNoReply(sid, wait);
  }
  int Write(std::uint32_t sid, std::uint32_t offset,
            std::span<const std::byte> data) noexcept override {
    const int mode = tamper_ ? tamper_->load() : kHonest;
    if (mode == kDrop) return 0;
    return inner_->Write(sid, offset, mode == kFlip ? Flipped(data) : data);
  }
  int Read(std::uint32_t sid, std::uint32_t offset, std::span<std::byte> out) noexcept override {
    if (late_->load()) return -ETIMEDOUT;
    return inner_->Read(sid, offset, out);
  }
  int Put(const peer::HandleBody& handle, std::uint32_t flags,
          std::span<const std::byte> page) noexcept override {
    return inner_->Put(handle, flags, page);
  }
  int Get(const peer::HandleBody& handle, std::span<std::byte> out) noexcept override {
    return inner_->Get(handle, out);
  }
  int FlushNoReply(const peer::HandleBody& handle) noexcept override {
    return inner_->FlushNoReply(handle);
  }
  int SubmitRead(std::uint32_t sid, std::uint32_t offset,
                 peer::PendingRequest* pending) noexcept override {
    if (late_->load()) return Late(pending);
    return inner_->SubmitRead(sid, offset, pending);
  }
  int SubmitQuery(peer::PendingRequest* pending) noexcept override {
    return inner_->SubmitQuery(pending);
  }
  int SubmitWrite(std::uint32_t sid, std::uint32_t offset, std::span<const std::byte> data,
                  peer::PendingRequest* pending) noexcept override {
    const int mode = tamper_ ? tamper_->load() : kHonest;
    if (mode == kDrop) return Complete(pending, 0);
    return inner_->SubmitWrite(sid, offset, mode == kFlip ? Flipped(data) : data, pending);
  }
  void SubmitBatch(std::span<const peer::BatchedRequest> requests) noexcept override {
    const int mode = tamper_ ? tamper_->load() : kHonest;
    std::vector<peer::BatchedRequest> through;
    std::vector<std::size_t> writes;
    for (const peer::BatchedRequest& request : requests) {
      if (request.type == peer::MessageType::kRead && late_->load()) {
        Late(request.pending);
      } else if (request.type == peer::MessageType::kWrite && mode == kDrop) {
        Complete(request.pending, 0);
      } else {
        if (request.type == peer::MessageType::kWrite) writes.push_back(through.size());
        through.push_back(request);
        if (request.type == peer::MessageType::kWrite && mode == kFlip) {
          through.back().data = Flipped(request.data);
        }
      }
    }
    if (mode == kSwap && !writes.empty()) {
      // Two pages of one WRITE (a run) exchanged, or the first two WRITEs' pages.
      peer::BatchedRequest& first = through[writes[0]];
      if (first.data.size() >= 2 * kPageSize) {
        first.data = Swapped(first.data);
      } else if (writes.size() >= 2 &&
                 through[writes[1]].data.size() == first.data.size()) {
        std::swap(first.data, through[writes[1]].data);
      }
    }
    if (!through.empty()) inner_->SubmitBatch(through);
  }
  bool connected() const noexcept override { return inner_->connected(); }
  void Hangup() noexcept override { inner_->Hangup(); }
  void Goodbye() noexcept override { inner_->Goodbye(); }
  const Endpoint& endpoint() const noexcept override { return inner_->endpoint(); }
  const peer::HelloBody& lender() const noexcept override { return inner_->lender(); }
  const peer::SessionGrant& session() const noexcept override { return inner_->session(); }
  std::uint64_t last_rtt_us() const noexcept override { return inner_->last_rtt_us(); }
  std::chrono::steady_clock::time_point overdue_since() const noexcept override {
    return inner_->overdue_since();
  }
  std::chrono::steady_clock::time_point last_heard() const noexcept override {
    return inner_->last_heard();
  }

 private:
  int Late(peer::PendingRequest* pending) noexcept {
    ++late_reads;
    return Complete(pending, -ETIMEDOUT);
  }
  int Complete(peer::PendingRequest* pending, int result) noexcept {
    pending->transport = this;
    pending->result = result;
    pending->done.store(true);
    return result;
  }
  // A copy of `data` with its first two pages exchanged, kept until the transport goes.
  std::span<const std::byte> Swapped(std::span<const std::byte> data) noexcept {
    std::lock_guard lock(mu_);
    changed_.emplace_back(data.begin(), data.end());
    std::swap_ranges(changed_.back().begin(), changed_.back().begin() + kPageSize,
                     changed_.back().begin() + kPageSize);
    return changed_.back();
  }
  // A copy of `data` with one bit of each page flipped, kept until the transport goes.
  std::span<const std::byte> Flipped(std::span<const std::byte> data) noexcept {
    std::lock_guard lock(mu_);
    changed_.emplace_back(data.begin(), data.end());
    for (std::size_t at = 100; at < changed_.back().size(); at += kPageSize) {
      changed_.back()[at] ^= std::byte{0x04};
    }
    return changed_.back();
  }
  void AwaitReply(peer::PendingRequest*) noexcept override {}  // done when made

 public:
  std::atomic<int> late_reads{0};

 private:
  const std::shared_ptr<peer::PeerTransport> inner_;
  std::atomic<bool>* const late_;
  std::atomic<int>* const tamper_;
  std::mutex mu_;
  std::deque<std::vector<std::byte>> changed_;
};

// How many of the pages read back wrong (each alone, then all in one batch).
std::size_t BadPages(PlacementStore& store, const std::vector<Slot>& slots) {
  std::size_t bad = 0;
  std::vector<std::byte> out(kPageSize);
  for (std::size_t i = 0; i < slots.size(); ++i) {
    if (store.Read(slots[i], PageSpan(out.data(), kPageSize)) != 0 || out != PageOf(i)) ++bad;
  }
  std::vector<std::byte> all(slots.size() * kPageSize);
  std::vector<std::byte*> outs;
  for (std::size_t i = 0; i < slots.size(); ++i) outs.push_back(all.data() + i * kPageSize);
  std::vector<int> results(slots.size(), -1);
  store.ReadBatch(slots, outs, results);
  for (std::size_t i = 0; i < slots.size(); ++i) {
    const std::vector<std::byte> page = PageOf(i);
    if (results[i] != 0 || std::memcmp(outs[i], page.data(), kPageSize) != 0) ++bad;
  }
  return bad;
}

TEST_SUITE("placement_store") {

TEST_CASE("replicas:1+disk: pages outlive their lender, read from disk, and get a copy back") {
  testing::TempDir dir;
  DiskStore disk(dir.File("backing"), 0);
  auto doomed = std::make_unique<RunningLender>(8 * kSuperpage);
  RunningLender spare(8 * kSuperpage);
  auto peers = std::make_unique<PeerStore>(0x2222);
  PeerStore& members = *peers;
  REQUIRE(members.AddPeer(doomed->endpoint) == 0);
  members.Refresh();
  PlacementStore store(std::move(peers), &disk);

  constexpr std::size_t kPages = 300;
  const std::vector<Slot> slots = WritePages(store, kPages, Redundancy{1, true});
  PlacementStats stats = store.Placements();
  CHECK(stats.pages == kPages);
  CHECK(stats.copies == kPages);
  CHECK(stats.disk_copies == kPages);
  CHECK(stats.degraded == 0);
  CHECK(disk.Stats().pages == kPages);

  REQUIRE(members.AddPeer(spare.endpoint) == 0);
  doomed.reset();  // every peer copy goes with it
  CHECK(Eventually([&] {
    members.Heartbeat();
    return members.Peers().at(0).state == PeerState::kDown;
  }));
  members.Refresh();  // connects the spare
  store.RebuildRound();
  stats = store.Placements();
  CHECK(stats.lost == 0);
  CHECK(stats.pages == kPages);
  CHECK(BadPages(store, slots) == 0);  // from the disk, or the copies made since

  // The rebuild puts a peer copy back on the spare, from the disk copies.
  CHECK(Eventually([&] {
    store.RebuildRound();
    return store.Placements().degraded == 0;
  }));
  stats = store.Placements();
  CHECK(stats.copies == kPages);
  CHECK(stats.rebuilt == kPages);
  CHECK(stats.disk_copies == kPages);
  CHECK(BadPages(store, slots) == 0);

  for (Slot slot : slots) store.Discard(slot);
  stats = store.Placements();
  CHECK(stats.pages == 0);
  CHECK(stats.disk_copies == 0);
  CHECK(disk.Stats().pages == 0);
}

TEST_CASE("a page on a leaving lender with no room on another moves to the disk") {
  testing::TempDir dir;
  DiskStore disk(dir.File("backing"), 0);
  RunningLender lender(8 * kSuperpage);
  auto peers = std::make_unique<PeerStore>(0x3333);
  PeerStore& members = *peers;
  REQUIRE(members.AddPeer(lender.endpoint) == 0);
  members.Refresh();
  PlacementStore store(std::move(peers), &disk);

  constexpr std::size_t kPages = 200;
  const std::vector<Slot> slots = WritePages(store, kPages, Redundancy{1, false});
  CHECK(store.Placements().disk_copies == 0);
  CHECK(disk.Stats().pages == 0);

  REQUIRE(members.RemovePeer(lender.endpoint) == 0);
  CHECK(Eventually([&] {
    store.RebuildRound();
    return store.Placements().disk_copies == kPages;
  }));
  PlacementStats stats = store.Placements();
  CHECK(stats.moved == kPages);
  CHECK(stats.copies == 0);
  CHECK(stats.lost == 0);
  CHECK(stats.degraded == kPages);  // none asks for a peer copy, and there is no peer now
  CHECK(disk.Stats().pages == kPages);
  // Nothing is left on the lender: its session ends and it frees what it lent.
  members.Refresh();
  CHECK(members.Peers().empty());
  CHECK(Eventually([&] { return lender.service->Stats().used_bytes == 0; }));
  CHECK(BadPages(store, slots) == 0);
  for (Slot slot : slots) store.Discard(slot);
  CHECK(store.Placements().degraded == 0);
  CHECK(disk.Stats().pages == 0);
}

TEST_CASE("a disk copy the full disk could not take is written once it has room") {
  testing::TempDir dir;
  constexpr std::size_t kDiskPages = 40;
  DiskStore disk(dir.File("backing"), kDiskPages * kPageSize);
  RunningLender lender(8 * kSuperpage);
  auto peers = std::make_unique<PeerStore>(0x4444);
  REQUIRE(peers->AddPeer(lender.endpoint) == 0);
  peers->Refresh();
  PlacementStore store(std::move(peers), &disk);

  // Room on disk for 40 of them; a filler takes 20 of those.
  std::vector<Slot> filler(20);
  const std::vector<std::byte> zero(kPageSize);
  for (Slot& slot : filler) {
    REQUIRE(disk.Write(ConstPageSpan(zero.data(), kPageSize), 0, &slot) == 0);
  }
  constexpr std::size_t kPages = 50;
  const std::vector<Slot> slots = WritePages(store, kPages, Redundancy{1, true});
  PlacementStats stats = store.Placements();
  CHECK(stats.pages == kPages);
  CHECK(stats.disk_copies == 20);
  CHECK(stats.degraded == 30);
  store.RebuildRound();  // the disk is full: nothing changes
  CHECK(store.Placements().degraded == 30);

  for (Slot slot : filler) disk.Discard(slot);
  store.RebuildRound();
  stats = store.Placements();
  CHECK(stats.disk_copies == 40);
  CHECK(stats.degraded == 10);
  CHECK(BadPages(store, slots) == 0);
  for (Slot slot : slots) store.Discard(slot);
  CHECK(disk.Stats().pages == 0);
}

TEST_CASE("a lender that misses its deadlines: reads go to the other copy, or the disk copy") {
  testing::TempDir dir;
  DiskStore disk(dir.File("backing"), 0);
  RunningLender slow_lender(8 * kSuperpage);
  RunningLender other_lender(8 * kSuperpage);
  std::atomic<bool> late{false};
  std::vector<std::shared_ptr<LateReads>> made;
  peer::PeerStoreOptions options;
  options.connect = [&](const peer::TransportParams& params) -> std::shared_ptr<peer::PeerTransport> {
    std::shared_ptr<peer::PeerTransport> real = peer::ConnectTcp(params);
    if (params.endpoint.port != slow_lender.endpoint.port) return real;
    auto wrapped = std::make_shared<LateReads>(std::move(real), &late);
    made.push_back(wrapped);
    return wrapped;
  };
  auto peers = std::make_unique<PeerStore>(0x5555, options);
  PeerStore& members = *peers;
  REQUIRE(members.AddPeer(slow_lender.endpoint) == 0);
  members.Refresh();
  PlacementStore store(std::move(peers), &disk);
  REQUIRE(made.size() == 1);

  // On the slow lender alone, with a disk copy: every read is the disk's.
  const std::vector<Slot> backed = WritePages(store, 100, Redundancy{1, true});
  late = true;
  CHECK(BadPages(store, backed) == 0);
  CHECK(made[0]->late_reads.load() > 0);
  for (Slot slot : backed) store.Discard(slot);

  // Two copies, one on each lender: the other one answers.
  late = false;
  REQUIRE(members.AddPeer(other_lender.endpoint) == 0);
  members.Refresh();
  const std::vector<Slot> replicated = WritePages(store, 100, Redundancy{2, false});
  CHECK(store.Placements().degraded == 0);
  late = true;
  const int before = made[0]->late_reads.load();
  CHECK(BadPages(store, replicated) == 0);
  CHECK(made[0]->late_reads.load() > before);  // some reads went there first, and gave way
  CHECK(store.Placements().lost == 0);
  late = false;
  for (Slot slot : replicated) store.Discard(slot);
}

TEST_CASE("sealed pages: a lender that flips a bit, swaps pages or drops writes is caught, and "
          "the page is read from its other copy, never wrong") {
  RunningLender bad_lender(8 * kSuperpage);
  RunningLender good_lender(8 * kSuperpage);
  std::atomic<bool> late{false};
  std::atomic<int> tamper{kHonest};
  peer::PeerStoreOptions options;
  options.connect = [&](const peer::TransportParams& params) -> std::shared_ptr<peer::PeerTransport> {
    std::shared_ptr<peer::PeerTransport> real = peer::ConnectTcp(params);
    if (params.endpoint.port != bad_lender.endpoint.port) return real;
    return std::make_shared<LateReads>(std::move(real), &late, &tamper);
  };
  auto peers = std::make_unique<PeerStore>(0x7777, options);
  PeerStore& members = *peers;
  REQUIRE(members.AddPeer(bad_lender.endpoint) == 0);
  REQUIRE(members.AddPeer(good_lender.endpoint) == 0);
  members.Refresh();
  PlacementStore store(std::move(peers));
  std::atomic<std::uint64_t> counter{0};
  store.EnableSealing(std::make_unique<PageSealer>(PageSealer::NewKey(), 1), 0x7777, &counter);
  REQUIRE(store.sealing());

  // Honest lenders: everything reads back, nothing fails its check.
  const std::vector<Slot> honest = WritePages(store, 64, Redundancy{2, false});
  CHECK(BadPages(store, honest) == 0);
  CHECK(store.Placements().integrity_failures == 0);
  CHECK(counter.load() == 64);  // one seal per page, for both its copies
  for (Slot slot : honest) store.Discard(slot);

  for (const int mode : {kFlip, kSwap, kDrop}) {
    CAPTURE(mode);
    const std::uint64_t before = store.Placements().integrity_failures;
    tamper = mode;
    const std::vector<Slot> slots = WritePages(store, 64, Redundancy{2, false});
    tamper = kHonest;
    // Every page comes back right, from the good lender where the bad one's copy fails.
    CHECK(BadPages(store, slots) == 0);
    const std::uint64_t caught = store.Placements().integrity_failures;
    CHECK(caught > before);
    CHECK(store.Placements().lost == 0);
    // The bad copies are dropped and made again (the lender is honest now): read again,
    // nothing fails.
    store.RebuildRound();
    CHECK(store.Placements().degraded == 0);
    CHECK(BadPages(store, slots) == 0);
    CHECK(store.Placements().integrity_failures == caught);
    for (Slot slot : slots) store.Discard(slot);
  }
  std::uint64_t counted = 0;
  for (const peer::PeerInfo& info : members.Peers()) {
    if (info.address.ends_with(":" + std::to_string(bad_lender.endpoint.port))) {
      counted = info.integrity_failures;
    } else {
      CHECK(info.integrity_failures == 0);
    }
  }
  CHECK(counted == store.Placements().integrity_failures);

  // One copy each, spread over both: a page whose only copy is the bad lender's fails to
  // read (EIO, zeros in the buffer), never returns wrong bytes; the others read back.
  tamper = kFlip;
  const std::vector<Slot> single = WritePages(store, 64, Redundancy{1, false});
  tamper = kHonest;
  std::vector<std::byte> out(kPageSize);
  int failed = 0;
  for (std::size_t i = 0; i < single.size(); ++i) {
    const int rc = store.Read(single[i], PageSpan(out.data(), kPageSize));
    if (rc == 0) {
      CHECK(out == PageOf(i));
    } else {
      ++failed;
      CHECK(rc == -EIO);
      CHECK(std::all_of(out.begin(), out.end(), [](std::byte b) { return b == std::byte{0}; }));
    }
  }
  CHECK(failed > 0);
  CHECK(failed < 64);
  for (Slot slot : single) store.Discard(slot);
}

}  // TEST_SUITE("placement_store")

}  // namespace
}  // namespace memlend
