// Membership: the lenders this host borrows from, their sessions and their states
// (docs/remote-tier.md, "Peer states").
//
// Peers are added and removed at any time, from any thread (`--peer` at start, `memlend
// peer add|remove`). The table has kMaxPeers entries published by count: readers index it
// without a lock, and an entry is never freed or moved, so a slot names its peer by index
// for as long as the daemon runs (a removed peer's entry is reused only for the same
// address).
//
// Each peer has at most one *session*: a live transport to the lender and the superpages it
// granted (SlotAllocator), under the peer's lock. A lender frees a session's superpages when
// the connection ends, so a new connection is a new session with a new generation.
//
// States: a peer with no session is down; one with a request overdue is suspect (no new
// placements until a reply comes in time); Heartbeat, every request_timeout, probes peers
// not heard from for that long and takes down those overdue for down_after or whose
// connection broke: the copies on them are listed as lost (TakeLostCopies). A lender that
// sends SHUTDOWN is draining, and one being removed is removing: no new pages, and
// CopiesToMove lists their pages, with those of superpages a lender asked back (RECLAIM).
// Refresh reconnects peers that are down (a connect has its own deadline and holds no
// lock), asks each for its free space, and ends a removed peer's session once nothing of
// ours is left there.
//
// Locks: a peer's `mu`, then leaf locks (its reclaim list, the lost-copy list, an
// observer's). Nothing waits on the network with `mu` held.
#pragma once

#include <array>
#include <functional>
#include <atomic>
#include <bitset>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "memlend/page_store.h"
#include "peer/peer_transport.h"
#include "peer/slot_allocator.h"

namespace memlend::peer {

enum class PeerState { kUp, kDown, kRefusing, kSuspect, kDraining, kRemoving, kRemoved, kResuming };
const char* PeerStateName(PeerState state);

struct PeerInfo {
  std::size_t index = 0;               // in the membership's table
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
  std::uint64_t integrity_failures = 0;  // pages it returned that failed to open (sealing)
  std::uint64_t rtt_us = 0;
  std::string last_error;              // why it is down, suspect or refusing, if it is
};

// Options of the remote tier's peers.
struct PeerStoreOptions {
  std::chrono::milliseconds request_timeout{500};
  std::chrono::milliseconds down_after{5000};
  std::chrono::milliseconds connect_timeout{2000};
  // How sessions are made: TCP (or unix sockets) by default. A test may wrap it.
  TransportFactory connect = ConnectTcp;
};

// A copy that must move or be made again: the slot it has (had) and the owner its writer
// gave it.
struct LostCopy {
  std::uint32_t owner;
  Slot slot;
  // On a superpage its lender asked back (RECLAIM), the lender staying: the page may move
  // to another superpage of the same lender.
  bool reclaim = false;
};

class Membership {
 public:
  static constexpr std::size_t kMaxPeers = 255;
  // A set of peers, by index.
  using PeerMask = std::bitset<kMaxPeers + 1>;

  struct Member {
    Endpoint endpoint;
    std::size_t index = 0;                 // in the table, as slots name it
    mutable std::mutex mu;
    // The session, guarded by mu. No transport: down.
    std::shared_ptr<PeerTransport> transport;
    SlotAllocator slots;
    std::vector<std::uint32_t> frees_pending;  // emptied SIDs the next Refresh gives back
    bool refusing = false;                 // refused a superpage since it last had room
    std::uint64_t pool_total_bytes = 0;
    std::string last_error;
    std::atomic<std::uint64_t> free_pages{0};  // last reported by the lender
    std::atomic<std::uint64_t> pages{0};       // pages stored there
    std::atomic<std::uint64_t> integrity_failures{0};  // pages from there that did not open
    std::atomic<std::uint64_t> lost{0};        // pages of ended sessions still named
    std::atomic<unsigned> generation{0};       // of the session (or of the next one)
    std::atomic<bool> draining{false};         // the session's lender sent SHUTDOWN
    std::atomic<bool> removing{false};         // Remove: move everything off, then hang up
    std::atomic<bool> removed{false};          // gone from the membership; never reconnected
    // The session the lender gave, for resuming it (docs/restart.md); guarded by mu. Set when
    // the lender keeps sessions after a disconnect (its grace period is not 0).
    std::optional<SessionSecret> secret;
    std::chrono::milliseconds grace{0};
    // The secret of a session this host gave up (its copies counted lost): the next HELLO
    // asks the lender to free it at once (kHelloForget). Guarded by mu.
    std::optional<SessionSecret> forget;
    // The connection broke and the session's slots wait for it to be resumed, until
    // resume_until; guarded by mu (no transport meanwhile).
    bool resuming = false;
    std::chrono::steady_clock::time_point resume_until;

    // SIDs of RECLAIM notices for ApplyReclaimsLocked (the notice comes on the transport's
    // reader thread, which may not take `mu`). A leaf lock.
    std::mutex reclaim_mu;
    std::vector<std::uint32_t> reclaims;
  };

  // Told of what happens to sessions, under no lock of ours but a peer's `mu` at most: an
  // observer takes only leaf locks.
  class Observer {
   public:
    virtual ~Observer() = default;
    // The session of `peer` ended (down or removed): what it held is gone.
    virtual void OnSessionEnded(Member& peer) noexcept = 0;
    // A notice from `peer`'s lender, on its transport's reader thread.
    virtual void OnNotice(Member& peer, const Message& notice,
                          std::span<const std::byte> payload) noexcept = 0;
  };

  Membership(std::uint64_t node_id, const PeerStoreOptions& options);
  // Ends every session first (EndAll), so no notice comes in while the rest goes.
  ~Membership();
  Membership(const Membership&) = delete;
  Membership& operator=(const Membership&) = delete;
  // Set before any peer is added; lives as long as this Membership.
  void SetObserver(Observer* observer) { observer_ = observer; }

  // What a restarted daemon needs of a peer's session (docs/restart.md).
  struct SessionState {
    std::string address;
    unsigned generation = 0;
    std::optional<SessionSecret> secret;  // none: no session the lender keeps
  };
  // Every peer ever added (removed ones too: their indices stay), in table order.
  std::vector<SessionState> Sessions() const;
  // Recovery: adds the peer at the next index with the session of an earlier process, to
  // resume (its slots are adopted next: PeerStore::AdoptSlot) — for `resume_for` from now,
  // the next heartbeats reconnect it with the secret. Returns Add's result.
  int Restore(const Endpoint& endpoint, const SessionState& state,
              std::chrono::milliseconds resume_for);
  // Called, with no lock held, after a session began or ended, on the thread that saw it.
  void SetSessionListener(std::function<void()> listener) { on_session_ = std::move(listener); }
  // EndAll hangs up without GOODBYE: the lenders keep the sessions for their grace period,
  // for the next daemon (--on-exit keep).
  void KeepSessionsOnExit() noexcept { keep_sessions_.store(true); }

  // Adds a lender, which the next Refresh connects (a failure leaves it down, to retry on
  // the Refresh after; the reason is logged once). Returns 0, -EEXIST when it is a peer
  // already, or -ENOSPC when kMaxPeers peers were ever added. Adding a peer that is being
  // removed cancels the removal.
  int Add(const Endpoint& endpoint);
  // Starts removing a peer (see above). Returns 0, or -ENOENT when it is not a peer. A peer
  // that is down is removed at the next Refresh.
  int Remove(const Endpoint& endpoint);

  // Hangs up every session and waits for its transport's threads: no notice (and no
  // observer call) comes after it returns. Whoever owns the observer calls it before the
  // observer goes. REQUIRES: no other call in progress or to come but destruction.
  void EndAll() noexcept;

  // From one thread, periodically (the daemon's refresher).
  void Refresh();
  void Heartbeat();

  // The peers added so far, in order. Entries are never freed or moved once published.
  std::span<const std::unique_ptr<Member>> List() const noexcept {
    return {members_.data(), count()};
  }
  std::size_t count() const noexcept { return count_.load(std::memory_order_acquire); }
  Member& at(std::size_t index) const noexcept { return *members_[index]; }
  const PeerStoreOptions& options() const noexcept { return options_; }

  // A peer for a new page (power of two choices on the lender's free space plus our free
  // slots there), or -1 when none can take one; never one in `exclude`, nor one that is
  // suspect, leaving or down.
  int Pick(std::uint64_t hint, const PeerMask* exclude = nullptr) const noexcept;
  // Whether `peer` takes no new pages because it leaves. Lock-free.
  static bool Leaving(const Member& peer) noexcept;
  std::shared_ptr<PeerTransport> TransportOf(const Member& peer) const;
  // Whether `transport` has had a request overdue for down_after.
  bool OverdueTooLong(const PeerTransport& transport) const noexcept;
  // Ends `peer`'s session for `why`: hangs up, lists its copies as lost. REQUIRES: peer.mu.
  void MarkDownLocked(Member& peer, const std::string& why);
  // For a connection that broke: keeps the session's slots for a resume if its lender keeps
  // sessions (see "resuming" in docs/restart.md), else MarkDownLocked. REQUIRES: peer.mu.
  void BreakLocked(Member& peer, const std::string& why);
  // Reconnects the peers that are resuming (the refresher, at every heartbeat).
  void Resume();
  // Waits while `peer`'s session of `generation` is resuming, or its connection broke and it
  // can resume, for at most down_after + connect_timeout; true when it is up again with that
  // generation. A reader of a page whose only copy is there waits rather than fail.
  bool AwaitResume(Member& peer, unsigned generation) noexcept;
  // Waits, for at most down_after + connect_timeout, until one of the peers whose session is
  // resuming now (or whose connection broke, if it can resume) is up again; true then. False
  // at once when there is none, or when each of them went down instead. A writer that found
  // no room waits here rather than fail, when the room it needs is in such a session.
  bool AwaitAnyResume() noexcept;
  // The same, if `transport` is still its session's.
  void MarkDownIf(Member& peer, const PeerTransport* transport, const std::string& why);
  // "no reply in time for <down_after> ms"
  std::string OverdueReason() const;

  // The copies that were on peers that went down since the last call.
  std::vector<LostCopy> TakeLostCopies();
  // Up to `max` copies that must move: those on draining or removing peers, and those on
  // superpages their lender asked back (every peer's RECLAIMs are applied first).
  std::vector<LostCopy> CopiesToMove(std::size_t max);

  // Every peer but removed ones whose lost pages are no longer named (pages_cached is the
  // cache's to fill in).
  std::vector<PeerInfo> Peers() const;
  std::uint64_t lost_pages() const;

 private:
  enum class ResumeCheck { kUp, kWaiting, kGone };
  // Where `peer`'s session of `generation` stands: up, waiting to be resumed (or broken and
  // resumable), or gone (ended, down, or not resumable).
  ResumeCheck CheckResume(Member& peer, unsigned generation) noexcept;
  // Sends `peer`'s frees that wait and asks its lender for its room (QUERY).
  void Sync(Member& peer, PeerTransport& transport);
  void Connect(Member& peer);
  // Connect's work; true when a session began (new or resumed).
  bool ConnectOnce(Member& peer);
  bool FinishRemoval(Member& peer);
  void OnNotice(Member& peer, const Message& notice, std::span<const std::byte> payload) noexcept;
  // Marks the superpages named by RECLAIM notices since the last call. REQUIRES: peer.mu.
  void ApplyReclaimsLocked(Member& peer);
  // Forgets the session's superpages and makes its slots read as gone. REQUIRES: peer.mu.
  void EndSessionLocked(Member& peer);

  const std::uint64_t node_id_;
  const PeerStoreOptions options_;
  Observer* observer_ = nullptr;
  std::function<void()> on_session_;
  std::atomic<bool> keep_sessions_{false};
  // Calls on_session_ if set.
  void SessionChanged() noexcept;
  std::mutex add_mu_;  // a leaf lock: serialises Add and Remove
  std::array<std::unique_ptr<Member>, kMaxPeers> members_;  // written under add_mu_
  std::atomic<std::size_t> count_{0};  // published after its entry
  std::mutex lost_mu_;  // a leaf lock
  std::vector<LostCopy> lost_copies_;
};

}  // namespace memlend::peer
