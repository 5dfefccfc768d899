// EphemeralCache: clean pages kept in the lenders' ephemeral pools, on the sessions of a
// Membership, through the remote active protocol (docs/peer-protocol.md).
//
// A page goes in with PUT (flag EPHEMERAL) under handle (pool 1, object = a key unique per
// peer, index 0), comes back with GET, and leaves with FLUSH. A lender may refuse the PUT
// or drop the page later (it then sends EVICTED), so a read may miss (-ENOENT): only pages
// that have another valid copy (on disk) belong here. Its slots are cache slots
// (peer/remote_slot.h); one of a session that ended reads as a miss.
//
// Locks: one leaf lock per peer (the keys stored there), taken on transport reader threads
// for EVICTED and under the peer's `mu` when its session ends.
#pragma once

#include <array>
#include <mutex>
#include <unordered_set>

#include "memlend/page_store.h"
#include "peer/membership.h"

namespace memlend::peer {

class EphemeralCache final : public PageStore, public Membership::Observer {
 public:
  // Observes `members` (SetObserver) and lives no longer than it.
  explicit EphemeralCache(Membership& members);

  // -ENOSPC when no lender takes the page.
  int Write(ConstPageSpan page, std::uint64_t hint, Slot* slot) noexcept override;
  // -ENOENT when the page is gone (the lender dropped it, or the peer is down).
  int Read(Slot slot, PageSpan out) noexcept override;
  void WriteBatch(std::span<const std::byte* const> pages, std::span<const std::uint64_t> hints,
                  std::span<Slot> slots, std::span<int> results) noexcept override;
  void Discard(Slot slot) noexcept override;
  // pages: pages cached on all peers; used_bytes: pages * 4 KiB; total_bytes: 0.
  StoreStats Stats() const noexcept override;
  // Pages cached on the peer at `index`.
  std::uint64_t pages_on(std::size_t index) const noexcept;

  void OnSessionEnded(Membership::Member& peer) noexcept override;
  void OnNotice(Membership::Member& peer, const Message& notice,
                std::span<const std::byte> payload) noexcept override;

 private:
  struct PerPeer {
    mutable std::mutex mu;  // a leaf lock
    std::unordered_set<std::uint64_t> keys;  // stored now
    std::uint64_t next_key = 1;
  };
  // What a cache slot names: its peer, its key, and the transport to reach it through
  // (null when the peer is down); `current` is false when its session has ended.
  struct Entry {
    PerPeer* cached;
    std::uint64_t key;
    std::shared_ptr<PeerTransport> transport;
    bool current;
  };
  Entry Find(Slot slot) noexcept;
  void Forget(PerPeer& cached, std::uint64_t key) noexcept;

  Membership& members_;
  std::array<PerPeer, Membership::kMaxPeers> peers_;
};

}  // namespace memlend::peer
