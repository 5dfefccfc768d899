// PeerStore: the remote tier's passive store. Pages live in superpages that lenders granted
// to this host, reached through the remote passive protocol (docs/peer-protocol.md), on the
// sessions of its Membership (peer/membership.h: peers, states, heartbeats).
//
// The borrower decides where each page goes: a write takes a free slot of a superpage the
// chosen peer's session holds (its SlotAllocator), asking the lender for another superpage
// when none is left, and sends the page there. A superpage whose last page is discarded goes
// back to its lender at once, so TRIM and overwrites show up in the lender's used count.
// Placement is Membership::Pick: power of two choices on reported free space among peers
// that are up.
//
// Every request has a deadline (request_timeout). A write that misses it is placed
// elsewhere; Read asks again while the peer is not down (the placement store above uses
// ReadOnce and reads another copy instead). Slots are passive slots (peer/remote_slot.h).
//
// It also offers, on the same sessions, the cache in the lenders' ephemeral pools
// (cache(), peer/ephemeral_cache.h).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "memlend/page_store.h"
#include "peer/ephemeral_cache.h"
#include "peer/membership.h"

namespace memlend::peer {

class PeerStore final : public PageStore {
 public:
  static constexpr std::size_t kMaxPeers = Membership::kMaxPeers;
  using PeerMask = Membership::PeerMask;
  using LostCopy = peer::LostCopy;

  // `node_id` is this daemon's identity in HELLO.
  explicit PeerStore(std::uint64_t node_id, const PeerStoreOptions& options = {});
  ~PeerStore() override;

  // The peers, their sessions and states (see Membership). Any thread.
  Membership& members() noexcept { return members_; }
  const Membership& members() const noexcept { return members_; }
  int AddPeer(const Endpoint& endpoint) { return members_.Add(endpoint); }
  int RemovePeer(const Endpoint& endpoint) { return members_.Remove(endpoint); }
  // From one thread (the daemon's refresher): reconnects, asks for free space; probes.
  void Refresh() { members_.Refresh(); }
  void Heartbeat() { members_.Heartbeat(); }
  const PeerStoreOptions& options() const { return members_.options(); }
  // Entries ever added, removed ones included: slots name peers by their index.
  std::size_t peer_count() const { return members_.count(); }
  // Every peer as `memlend peers` shows it, with the pages cached there.
  std::vector<PeerInfo> Peers() const;
  // Pages lost with peers that went down and not yet overwritten or trimmed: a device
  // still counts them as remote, and reading them fails with EIO.
  std::uint64_t lost_pages() const { return members_.lost_pages(); }
  int PickPeer(std::uint64_t hint, const PeerMask* exclude = nullptr) const noexcept {
    return members_.Pick(hint, exclude);
  }
  // The copies that were on peers that went down since the last call, with their owners.
  std::vector<LostCopy> TakeLostCopies() { return members_.TakeLostCopies(); }
  // Up to `max` copies that must move (Membership::CopiesToMove).
  std::vector<LostCopy> CopiesOnDrainingPeers(std::size_t max) {
    return members_.CopiesToMove(max);
  }

  int Write(ConstPageSpan page, std::uint64_t hint, Slot* slot) noexcept override;
  int Read(Slot slot, PageSpan out) noexcept override;
  // Submits every read before waiting for any, so a batch costs about one round trip.
  void ReadBatch(std::span<const Slot> slots, std::span<std::byte* const> outs,
                 std::span<int> results) noexcept override;
  // Places every page (power of two choices each), submits all the writes, then waits.
  void WriteBatch(std::span<const std::byte* const> pages, std::span<const std::uint64_t> hints,
                  std::span<Slot> slots, std::span<int> results) noexcept override {
    WriteBatchFor(pages, hints, {}, {}, slots, results);
  }
  // As WriteBatch, with an owner number kept beside each stored page (the reverse index:
  // TakeLostCopies names them when their peer goes down) and, per page, peers it must not
  // go to (a replica's other copies). Either span may be empty.
  void WriteBatchFor(std::span<const std::byte* const> pages, std::span<const std::uint64_t> hints,
                     std::span<const std::uint32_t> owners, std::span<const PeerMask> excludes,
                     std::span<Slot> slots, std::span<int> results) noexcept;
  // As ReadBatch, with one attempt per page: an overdue read gets -ETIMEDOUT.
  void ReadBatchOnce(std::span<const Slot> slots, std::span<std::byte* const> outs,
                     std::span<int> results) noexcept;
  // One attempt at Read: 0, -ETIMEDOUT when the peer did not answer in time (it may still),
  // or -EIO when the page is gone (its peer or session ended).
  int ReadOnce(Slot slot, PageSpan out) noexcept;
  // The index of the peer `slot` is on.
  static std::size_t PeerIndexOf(Slot slot) noexcept;
  // Counts a page read from `slot` that failed its integrity check against its peer.
  void NoteIntegrityFailure(Slot slot) noexcept {
    const std::size_t index = PeerIndexOf(slot);
    if (index < peer_count()) {
      members_.at(index).integrity_failures.fetch_add(1, std::memory_order_relaxed);
    }
  }
  // The address of the peer `slot` is on, for messages.
  std::string AddressOf(Slot slot) const {
    const std::size_t index = PeerIndexOf(slot);
    return index < peer_count() ? members_.at(index).endpoint.ToString() : "?";
  }
  // Whether `slot` belongs to its peer's current session and that peer is up (connected,
  // not suspect): where a read should go first.
  bool SlotReady(Slot slot) const noexcept;
  // Whether `slot` belongs to an ended session: its page is gone.
  bool SlotGone(Slot slot) const noexcept;
  // Waits while the session holding `slot` is being resumed after its connection broke
  // (Membership::AwaitResume); true when it is up again and the slot still valid.
  bool AwaitResume(Slot slot) noexcept;
  // A write found no room: waits while a lender's session is being resumed
  // (Membership::AwaitAnyResume).
  bool AwaitRoom() noexcept override { return members_.AwaitAnyResume(); }
  // Recovery (docs/restart.md): marks `slot` taken for `owner` in its peer's session, which
  // Membership::Restore brought back. False when the slot is of another session (its
  // generation is not the peer's), or its peer is not in the table, or it is taken already.
  bool AdoptSlot(Slot slot, std::uint32_t owner) noexcept;
  void Pin(Slot slot) noexcept override;
  void Unpin(Slot slot) noexcept override;
  void Discard(Slot slot) noexcept override;
  // pages: pages stored on all peers; used_bytes: superpages held * 2 MiB; total_bytes:
  // the sum of the peers' pools.
  StoreStats Stats() const noexcept override;

  // The ephemeral cache on the same peers: a PageStore whose Read returns -ENOENT when the
  // page is gone and whose Write returns -ENOSPC when no lender takes it. Lives as long as
  // this PeerStore.
  PageStore& cache() { return cache_; }

 private:
  using Member = Membership::Member;
  // Reserves a free slot on `peer`, allocating a superpage if needed. Returns 0 and sets
  // *sid, *index and *generation, or -ENOSPC / -ENOTCONN / -ENOMEM.
  int ReserveSlot(Member& peer, std::uint32_t* sid, std::uint32_t* index, unsigned* generation,
                  std::uint32_t owner = 0) noexcept;
  // Returns a reserved or stored slot; gives an emptied superpage back to its lender.
  void ReleaseSlot(Member& peer, std::uint32_t sid, std::uint32_t index) noexcept;
  // The transport to reach `slot` through, or null when its peer is down or the session
  // that held the slot has ended.
  std::shared_ptr<PeerTransport> TransportFor(Slot slot) const noexcept;
  // A write to `peer` failed with `rc`: -ENOTCONN takes it down.
  void AfterFailedWrite(Member& peer, int rc);

  Membership members_;
  EphemeralCache cache_{members_};
};

}  // namespace memlend::peer
