// PeerStore: the remote tier. Pages live in superpages that lenders granted to this host,
// reached through the remote passive protocol (docs/peer-protocol.md).
//
// The borrower decides where each page goes: per peer it keeps the superpages it was
// granted and a bitmap of their free 4 KiB slots; a write takes a free slot (asking the
// peer for another superpage when none is left) and sends the page there. A superpage
// whose last page is discarded goes back to its lender at once, so TRIM and overwrites
// show up in the lender's used count.
//
// Placement: power of two choices on the free space the peers last reported (QUERY at
// start and on every Refresh), skipping peers that are down or suspect or refused an
// allocation since the last Refresh. A peer that hangs up is marked down; pages it held
// read as -EIO (keeping copies elsewhere is a later capability), and Refresh tries to
// reconnect.
//
// Failure detection (docs/remote-tier.md, "Peer states"). Every request has a deadline
// (request_timeout). A write that misses it is placed elsewhere; a read is asked again, since
// the page has no other copy, for as long as the peer is not down. A peer with a request
// overdue is *suspect*: no new placements until a reply comes in time. Heartbeat(), which the
// daemon calls every request_timeout, sends QUERY to peers it has not heard from for that
// long, and marks down a peer overdue for down_after: its connection is closed, and its
// pages are lost. Connecting (Refresh) has its own deadline and holds no lock.
//
// Slot encoding: session generation << 49 | peer index << 41 | SID << 9 | page index
// within the superpage. The generation makes a slot from a session that ended (say, a
// lender that restarted and hands out the same SIDs again) read as lost, not as another
// page's bytes.
//
// The PeerStore also offers a cache (cache()) in the lenders' ephemeral pools, reached
// through the remote active protocol: a page goes in with PUT (flag EPHEMERAL) under
// handle (pool 1, object = a key unique per peer, index 0), comes back with GET, and
// leaves with FLUSH. A lender may refuse the PUT or drop the page later (it then sends
// EVICTED), so a cache read may miss: only pages that have another valid copy (on disk)
// belong there. Cache slots: generation << 49 | peer index << 41 | key.
#pragma once

#include <array>
#include <atomic>
#include <bitset>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "memlend/page_store.h"
#include "peer/peer_transport.h"

namespace memlend::peer {

enum class PeerState { kUp, kDown, kRefusing, kSuspect, kDraining, kRemoving, kRemoved };
const char* PeerStateName(PeerState state);

struct PeerInfo {
  std::string address;
  std::uint64_t pages_cached = 0;      // clean pages this host caches there (ephemeral)
  PeerState state = PeerState::kDown;
  std::uint64_t node_id = 0;
  std::uint64_t pool_total_bytes = 0;
  std::uint64_t pool_free_bytes = 0;
  std::uint64_t pages_stored = 0;      // pages this host keeps there
  std::uint64_t superpages_held = 0;   // superpages granted to this host
  std::uint64_t superpages_reclaimed = 0;  // of those, the ones the lender asked back
  std::uint64_t pages_lost = 0;        // pages that were there when it went down
  std::uint64_t rtt_us = 0;
  std::string last_error;              // why it is down, suspect or refusing, if it is
};

struct PeerStoreOptions {
  std::chrono::milliseconds request_timeout{500};
  std::chrono::milliseconds down_after{5000};
  std::chrono::milliseconds connect_timeout{2000};
  // How sessions are made: TCP (or unix sockets) by default. A test may wrap it.
  TransportFactory connect = ConnectTcp;
};

class PeerStore final : public PageStore {
 public:
  static constexpr std::size_t kMaxPeers = 255;
  // A set of peers, by index (the order of AddPeer).
  using PeerMask = std::bitset<kMaxPeers + 1>;
  // A copy that was on a peer when it went down: the slot it had, and the owner its writer
  // gave it (see WriteBatchFor).
  struct LostCopy {
    std::uint32_t owner;
    Slot slot;
    // On a superpage its lender asked back (RECLAIM), the lender staying: the page may move
    // to another superpage of the same lender.
    bool reclaim = false;
  };

  // `node_id` is this daemon's identity in HELLO.
  explicit PeerStore(std::uint64_t node_id, const PeerStoreOptions& options = {});
  ~PeerStore() override;

  // Membership, at any time and from any thread. AddPeer adds a lender, which the next
  // Refresh connects (a failure leaves it down, to retry on the Refresh after; the reason is
  // logged once). Returns 0, -EEXIST when it is a peer already, or -ENOSPC when kMaxPeers
  // peers were ever added (a removed peer's entry is reused only for the same address, so
  // that a slot never names another lender's page). Adding a peer that is being removed
  // cancels the removal.
  int AddPeer(const Endpoint& endpoint);
  // Starts removing a peer: it gets no new pages, the placement store moves its copies
  // elsewhere as for a draining peer (CopiesOnDrainingPeers), and the Refresh after its last
  // page left ends the session (the lender frees what it granted). Returns 0, or -ENOENT when
  // it is not a peer. A peer that is down is removed at the next Refresh (its copies were
  // lost with it and are rebuilt from the others).
  int RemovePeer(const Endpoint& endpoint);

  // Reconnects peers that are down and asks every peer for its free space. The daemon
  // calls it periodically, from one thread (Heartbeat's).
  void Refresh();
  // Sends QUERY to every connected peer not heard from for request_timeout and waits for
  // the replies (until their deadline); marks down those overdue for down_after. The daemon
  // calls it every request_timeout, from one thread (Refresh's).
  void Heartbeat();
  const PeerStoreOptions& options() const { return options_; }

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
  // Picks a peer for a new page (power of two choices on free space), or -1 when none can
  // take one; never one in `exclude`, nor one that is suspect, draining or down.
  int PickPeer(std::uint64_t hint, const PeerMask* exclude = nullptr) const noexcept;
  // One attempt at Read: 0, -ETIMEDOUT when the peer did not answer in time (it may still),
  // or -EIO when the page is gone (its peer or session ended).
  int ReadOnce(Slot slot, PageSpan out) noexcept;
  // The index of the peer `slot` is on.
  static std::size_t PeerIndexOf(Slot slot) noexcept;
  // Whether `slot` belongs to its peer's current session and that peer is up (connected,
  // not suspect): where a read should go first.
  bool SlotReady(Slot slot) const noexcept;
  // Whether `slot` belongs to an ended session: its page is gone.
  bool SlotGone(Slot slot) const noexcept;
  // The copies that were on peers that went down since the last call, with their owners.
  std::vector<LostCopy> TakeLostCopies();
  // Up to `max` copies that must move: those on peers that are draining (they sent SHUTDOWN,
  // or are being removed) and those on superpages their lender asked back (RECLAIM), with
  // their owners.
  std::vector<LostCopy> CopiesOnDrainingPeers(std::size_t max);
  void Pin(Slot slot) noexcept override;
  void Unpin(Slot slot) noexcept override;
  void Discard(Slot slot) noexcept override;
  // pages: pages stored on all peers; used_bytes: superpages held * 2 MiB; total_bytes:
  // the sum of the peers' pools.
  StoreStats Stats() const noexcept override;

  // The ephemeral cache on the same peers, as a PageStore whose Read returns -ENOENT when
  // the page is gone (the lender dropped it, or the peer is down) and whose Write returns
  // -ENOSPC when no lender takes it. Lives as long as this PeerStore.
  PageStore& cache() { return cache_; }

  std::vector<PeerInfo> Peers() const;
  // Pages lost with peers that went down and not yet overwritten or trimmed: a device
  // still counts them as remote, and reading them fails with EIO.
  std::uint64_t lost_pages() const;
  // Entries ever added, removed ones included: slots name peers by their index in it.
  std::size_t peer_count() const { return peer_count_.load(std::memory_order_acquire); }

 private:
  struct Superpage {
    std::uint64_t used_mask[kPagesPerSuperpage / 64] = {};
    std::uint32_t used = 0;
    bool reclaimed = false;  // the lender asked for it back: no new pages, the old ones move
    std::uint32_t owner[kPagesPerSuperpage] = {};  // the reverse index: who stored each page
  };
  // The cache() view: forwards to the Cache* methods below.
  class Cache final : public PageStore {
   public:
    explicit Cache(PeerStore& store) : store_(store) {}
    int Write(ConstPageSpan page, std::uint64_t hint, Slot* slot) noexcept override;
    int Read(Slot slot, PageSpan out) noexcept override { return store_.CacheRead(slot, out); }
    void WriteBatch(std::span<const std::byte* const> pages, std::span<const std::uint64_t> hints,
                    std::span<Slot> slots, std::span<int> results) noexcept override {
      store_.CacheWriteBatch(pages, hints, slots, results);
    }
    void Discard(Slot slot) noexcept override { store_.CacheDiscard(slot); }
    // pages: pages cached on all peers; used_bytes: pages * 4 KiB; total_bytes: 0.
    StoreStats Stats() const noexcept override;

   private:
    PeerStore& store_;
  };

  struct Peer {
    Endpoint endpoint;
    std::size_t index = 0;                // in peers_, as slots name it
    mutable std::mutex mu;
    std::shared_ptr<PeerTransport> client;  // guarded by mu; null: down
    std::unordered_map<std::uint32_t, Superpage> superpages;  // guarded by mu
    std::vector<std::uint32_t> partial;  // guarded by mu: SIDs with a free slot (may be stale)
    std::uint64_t free_slots = 0;        // guarded by mu: free slots of superpages not reclaimed
    std::size_t reclaimed = 0;           // guarded by mu: superpages with `reclaimed` set
    std::vector<std::uint32_t> frees_pending;  // guarded by mu: emptied SIDs Refresh frees
    std::string last_error;              // guarded by mu
    bool refusing = false;               // guarded by mu
    std::uint64_t pool_total_bytes = 0;  // guarded by mu
    struct PinState {
      std::uint32_t count = 0;
      bool discarded = false;  // Discard came while pinned: release at the last Unpin
    };
    std::unordered_map<Slot, PinState> pins;  // guarded by mu
    std::atomic<std::uint64_t> free_pages{0};  // last reported by the lender
    std::atomic<std::uint64_t> pages{0};
    std::atomic<std::uint64_t> lost{0};   // pages of ended sessions still named by devices
    std::atomic<unsigned> generation{0};  // bumped for each new session (7 bits used)
    std::atomic<bool> draining{false};    // the session's lender sent SHUTDOWN
    std::atomic<bool> removing{false};    // RemovePeer: move everything off, then hang up
    std::atomic<bool> removed{false};     // gone from the membership; never reconnected

    // SIDs of RECLAIM notices, for CopiesOnDrainingPeers to mark (the notice comes on the
    // client's reader thread, which may not take `mu`). reclaim_mu is a leaf lock.
    std::mutex reclaim_mu;
    std::vector<std::uint32_t> reclaims;  // guarded by reclaim_mu; at most kMaxReclaims

    // The ephemeral cache. cache_mu is a leaf lock (the client's reader thread takes it
    // for EVICTED notices, and `mu` may be held while that thread is joined), so nothing
    // else is locked, or waited for, while it is held.
    mutable std::mutex cache_mu;
    std::unordered_set<std::uint64_t> cached;  // guarded by cache_mu: keys stored now
    std::uint64_t next_key = 1;                // guarded by cache_mu
  };

  // The cache, see cache().
  void CacheWriteBatch(std::span<const std::byte* const> pages,
                       std::span<const std::uint64_t> hints, std::span<Slot> slots,
                       std::span<int> results) noexcept;
  int CacheRead(Slot slot, PageSpan out) noexcept;
  // What a cache slot names: its peer, its key, and the client to reach it through (null
  // when the peer is down); `current` is false when the session that stored it has ended.
  struct CacheEntry {
    Peer* peer;
    std::uint64_t key;
    std::shared_ptr<PeerTransport> client;
    bool current;
  };
  CacheEntry FindCached(Slot slot) const noexcept;
  void CacheDiscard(Slot slot) noexcept;
  // Runs on a client's reader thread for each notice it receives from `peer`.
  void OnNotice(Peer& peer, const Message& notice, std::span<const std::byte> payload) noexcept;

  // Connects `peer` if it is down, holding no lock while it connects.
  void Connect(Peer& peer);
  // Whether `client` has had a request overdue for down_after.
  bool OverdueTooLong(const PeerTransport& client) const noexcept;
  // Marks `peer` down for `why` if `client` is still its client.
  void MarkDownIf(Peer& peer, const PeerTransport* client, const std::string& why);
  // Reserves a free slot on `peer`, allocating a superpage if needed. Returns 0 and sets
  // *sid and *index, or -ENOSPC / -ENOTCONN.
  int ReserveSlot(Peer& peer, std::uint32_t* sid, std::uint32_t* index, unsigned* generation,
                  std::uint32_t owner = 0) noexcept;
  // The client to reach `slot` through, or null when its peer is down or the session
  // that held the slot has ended. Sets *sid and *index.
  std::shared_ptr<PeerTransport> ClientFor(Slot slot, std::uint32_t* sid,
                                        std::uint32_t* index) const noexcept;
  // Returns a reserved or stored slot to the free bitmap; frees an emptied superpage.
  void ReleaseSlot(Peer& peer, std::uint32_t sid, std::uint32_t index) noexcept;
  std::shared_ptr<PeerTransport> ClientOf(Peer& peer) const;
  void MarkDown(Peer& peer, const std::string& why);
  // Marks the superpages named by RECLAIM notices since the last call: no new pages go
  // there, and CopiesOnDrainingPeers lists their pages. REQUIRES: peer.mu held.
  void ApplyReclaimsLocked(Peer& peer);

  // The peers added so far, in order: peers_[0..peer_count_). An entry is never freed or
  // moved once published, so readers index it without a lock.
  std::span<const std::unique_ptr<Peer>> PeerList() const noexcept {
    return {peers_.data(), peer_count()};
  }
  // Whether `peer` takes new pages (it is not leaving). Lock-free.
  static bool Leaving(const Peer& peer) noexcept;
  // Ends a removing peer's session once nothing of ours is left there; returns whether it
  // is removed now.
  bool FinishRemoval(Peer& peer);

  const std::uint64_t node_id_;
  const PeerStoreOptions options_;
  std::mutex lost_mu_;  // a leaf lock
  std::vector<LostCopy> lost_copies_;  // guarded by lost_mu_
  std::mutex membership_mu_;  // a leaf lock: serialises AddPeer and RemovePeer
  std::array<std::unique_ptr<Peer>, kMaxPeers> peers_;  // entries written under membership_mu_
  std::atomic<std::size_t> peer_count_{0};  // published after its entry
  Cache cache_{*this};
};

}  // namespace memlend::peer
