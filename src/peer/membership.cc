#include "peer/membership.h"

#include <algorithm>
#include <unordered_set>
#include <cerrno>
#include <cstring>
#include <thread>

#include "common/log.h"
#include "peer/codec.h"
#include "peer/remote_slot.h"

namespace memlend::peer {
namespace {

// SIDs of RECLAIM notices a peer may have waiting to be applied (the rebuild round applies
// them every 100 ms): 256 KiB, a 128 GiB lender's worth of superpages. SIDs past it are
// dropped; the lender's shrink then stops short of its size, which it shows.
constexpr std::size_t kMaxReclaims = std::size_t{1} << 16;

std::uint64_t Mix(std::uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  return x;
}

}  // namespace

const char* PeerStateName(PeerState state) {
  switch (state) {
    case PeerState::kUp: return "up";
    case PeerState::kDown: return "down";
    case PeerState::kRefusing: return "refusing";
    case PeerState::kSuspect: return "suspect";
    case PeerState::kDraining: return "draining";
    case PeerState::kRemoving: return "removing";
    case PeerState::kRemoved: return "removed";
    case PeerState::kResuming: return "resuming";
  }
  return "unknown";
}

Membership::Membership(std::uint64_t node_id, const PeerStoreOptions& options)
    : node_id_(node_id), options_(options) {}

Membership::~Membership() { EndAll(); }

void Membership::EndAll() noexcept {
  for (const auto& peer : List()) {
    std::shared_ptr<PeerTransport> transport;
    {
      std::lock_guard lock(peer->mu);
      transport = std::move(peer->transport);
    }
    if (transport) {
      // The lender keeps nothing of this session, unless the next daemon takes it up.
      if (!keep_sessions_.load()) transport->Goodbye();
      transport->Hangup();
    }
    transport.reset();  // the last reference: joins the transport's reader
  }
}

int Membership::Add(const Endpoint& endpoint) {
  const std::string address = endpoint.ToString();
  std::lock_guard lock(add_mu_);
  const std::size_t n = count();
  for (std::size_t i = 0; i < n; ++i) {
    Member& peer = *members_[i];
    if (peer.endpoint.ToString() != address) continue;
    if (peer.removing.exchange(false, std::memory_order_acq_rel)) {
      LogError("peer %s: removal cancelled", address.c_str());
      return 0;
    }
    if (!peer.removed.load(std::memory_order_acquire)) return -EEXIST;
    peer.removed.store(false, std::memory_order_release);  // the next Refresh connects it
    return 0;
  }
  if (n >= kMaxPeers) return -ENOSPC;
  auto peer = std::make_unique<Member>();
  peer->endpoint = endpoint;
  peer->index = n;
  members_[n] = std::move(peer);
  count_.store(n + 1, std::memory_order_release);
  return 0;
}

int Membership::Remove(const Endpoint& endpoint) {
  const std::string address = endpoint.ToString();
  std::lock_guard lock(add_mu_);
  for (const auto& peer : List()) {
    if (peer->endpoint.ToString() != address || peer->removed.load(std::memory_order_acquire)) {
      continue;
    }
    if (!peer->removing.exchange(true, std::memory_order_acq_rel)) {
      LogError("peer %s: removing: moving its pages elsewhere first", address.c_str());
    }
    return 0;
  }
  return -ENOENT;
}

bool Membership::Leaving(const Member& peer) noexcept {
  return peer.draining.load(std::memory_order_acquire) ||
         peer.removing.load(std::memory_order_acquire) ||
         peer.removed.load(std::memory_order_acquire);
}

void Membership::EndSessionLocked(Member& peer) {
  peer.transport.reset();
  if (peer.secret) peer.forget = peer.secret;
  peer.secret.reset();
  peer.resuming = false;
  peer.slots.Clear();
  peer.frees_pending.clear();
  {
    std::lock_guard reclaim_lock(peer.reclaim_mu);
    peer.reclaims.clear();
  }
  peer.pages.store(0, std::memory_order_relaxed);
  peer.free_pages.store(0, std::memory_order_relaxed);
  // Slots of the ended session read as gone from now on, and a later session's slots (a
  // restarted lender reuses SIDs) can never be mistaken for them.
  peer.generation.store(NextGeneration(peer.generation.load(std::memory_order_relaxed)),
                        std::memory_order_release);
  if (observer_ != nullptr) observer_->OnSessionEnded(peer);
}

bool Membership::FinishRemoval(Member& peer) {
  std::shared_ptr<PeerTransport> transport;
  {
    std::lock_guard lock(peer.mu);
    if (!peer.removing.load(std::memory_order_acquire)) return false;
    // A pinned slot may still be read, and a superpage still holds a page: not yet.
    if (peer.transport && !peer.slots.idle()) return false;
    // Waiting to resume: what it holds there is lost with it, as with a peer that is down.
    if (peer.resuming) MarkDownLocked(peer, "removed while its session waited to resume");
    transport = peer.transport;
    EndSessionLocked(peer);
    peer.pool_total_bytes = 0;
    peer.last_error = "removed";
    peer.removed.store(true, std::memory_order_release);
    peer.removing.store(false, std::memory_order_release);
  }
  // Ending the session for good is what makes the lender free everything it granted us.
  if (transport) {
    transport->Goodbye();
    transport->Hangup();
  }
  LogError("peer %s removed", peer.endpoint.ToString().c_str());
  return true;
}

bool Membership::ConnectOnce(Member& peer) {
  if (peer.removed.load(std::memory_order_acquire) ||
      peer.removing.load(std::memory_order_acquire)) {
    return false;  // leaving the membership: nothing new goes there
  }
  std::optional<SessionSecret> resume;
  std::optional<SessionSecret> forget;
  {
    std::lock_guard lock(peer.mu);
    if (peer.transport && peer.transport->connected()) return false;
    if (peer.transport) BreakLocked(peer, "connection lost");
    if (peer.resuming) resume = peer.secret;
    else forget = peer.forget;
  }
  // Connect and HELLO with no lock held: a lender that does not answer must not stall the
  // threads that read, write or release slots meanwhile.
  std::shared_ptr<PeerTransport> transport;
  std::string error;
  bool gone = false;  // nothing listens there: the lender's process, and our session, are gone
  try {
    TransportParams params;
    params.endpoint = peer.endpoint;
    params.node_id = node_id_;
    params.resume = resume;
    params.forget = forget;
    params.on_notice = [this, &peer](const Message& notice, std::span<const std::byte> payload) {
      OnNotice(peer, notice, payload);
    };
    params.connect_timeout = options_.connect_timeout;
    params.request_timeout = options_.request_timeout;
    params.stall_timeout = options_.down_after;
    transport = options_.connect(params);
  } catch (const NothingListening& e) {
    error = e.what();
    gone = true;
  } catch (const std::exception& e) {
    error = e.what();
  }
  std::lock_guard lock(peer.mu);
  if (!transport) {
    if (peer.resuming && (gone || std::chrono::steady_clock::now() >= peer.resume_until)) {
      MarkDownLocked(peer, gone ? "its lender is gone, and its session with it: " + error
                                : "its session could not be resumed within " +
                                      std::to_string(options_.down_after.count()) + " ms: " +
                                      error);
      return false;
    }
    if (peer.last_error != error) LogError("%s", error.c_str());
    peer.last_error = error;
    return false;
  }
  const SessionGrant& grant = transport->session();
  if (peer.resuming) {
    // The lender also holds the emptied superpages not freed yet, and may hold one granted
    // just as the connection broke, whose reply never came (it goes with the session).
    const std::size_t known = peer.slots.superpages() + peer.frees_pending.size();
    // With the lender's list of them: each we know must be there, and those we do not are
    // given back.
    std::vector<std::uint32_t> unknown;
    bool same = grant.resumed && grant.superpages >= known;
    if (same && grant.listed) {
      try {
        const std::unordered_set<std::uint32_t> freeing(peer.frees_pending.begin(),
                                                        peer.frees_pending.end());
        std::size_t found = 0;
        for (const std::uint32_t sid : grant.superpage_ids) {
          if (peer.slots.Holds(sid) || freeing.contains(sid)) {
            ++found;
          } else {
            unknown.push_back(sid);
          }
        }
        same = found == known;
      } catch (const std::bad_alloc&) {
        unknown.clear();  // they stay unused until the session ends
      }
    }
    if (same) {
      // The same session: its slots, superpages and generation stay.
      if (!unknown.empty()) {
        LogError("peer %s: giving back %zu superpage(s) granted as the connection broke",
                 peer.endpoint.ToString().c_str(), unknown.size());
        peer.frees_pending.insert(peer.frees_pending.end(), unknown.begin(), unknown.end());
      } else if (grant.superpages > known) {
        LogError("peer %s: %zu superpage(s) granted as the connection broke are unknown here; "
                 "they are freed when the session ends",
                 peer.endpoint.ToString().c_str(), grant.superpages - known);
      }
      peer.resuming = false;
      peer.transport = std::move(transport);
      peer.pool_total_bytes = peer.transport->lender().pool_bytes;
      LogError("peer %s is up: session resumed with its %zu superpages",
               peer.endpoint.ToString().c_str(), peer.slots.superpages());
      peer.last_error.clear();
      peer.refusing = false;
      return true;
    }
    const std::string why =
        grant.resumed ? "the lender resumed a session of " + std::to_string(grant.superpages) +
                            " superpages, this host held " + std::to_string(known)
                      : std::string("the lender no longer had its session");
    MarkDownLocked(peer, why);
    if (grant.resumed) {
      // Not the session we knew: hang up, and the lender frees it after its grace period.
      transport->Hangup();
      return false;
    }
  }
  peer.transport = std::move(transport);
  peer.forget.reset();  // the HELLO freed it
  if (grant.grace.count() > 0) {
    peer.secret = grant.secret;
    peer.grace = grant.grace;
  }
  // A new session: slots of an earlier one must never name this session's superpages.
  peer.generation.store(NextGeneration(peer.generation.load(std::memory_order_relaxed)),
                        std::memory_order_release);
  peer.pool_total_bytes = peer.transport->lender().pool_bytes;
  peer.draining.store(false, std::memory_order_release);
  if (!peer.last_error.empty()) LogError("peer %s is up", peer.endpoint.ToString().c_str());
  peer.last_error.clear();
  peer.refusing = false;
  return true;
}

void Membership::Connect(Member& peer) {
  if (ConnectOnce(peer)) SessionChanged();
}

bool Membership::OverdueTooLong(const PeerTransport& transport) const noexcept {
  const auto since = transport.overdue_since();
  return since != std::chrono::steady_clock::time_point::min() &&
         std::chrono::steady_clock::now() - since >= options_.down_after;
}

std::string Membership::OverdueReason() const {
  return "no reply in time for " + std::to_string(options_.down_after.count()) + " ms";
}

void Membership::MarkDownIf(Member& peer, const PeerTransport* transport, const std::string& why) {
  std::lock_guard lock(peer.mu);
  if (peer.transport.get() == transport && transport != nullptr) MarkDownLocked(peer, why);
}

void Membership::MarkDownLocked(Member& peer, const std::string& why) {
  // The lender frees a session's superpages when it ends, so they are gone either way.
  // Hang up now: threads that still hold the transport fail at once rather than wait.
  if (peer.transport) peer.transport->Hangup();
  // Name every copy that goes with them, for whoever keeps other copies.
  if (peer.slots.superpages() > 0) {
    const std::size_t index = peer.index;
    const unsigned generation = peer.generation.load(std::memory_order_relaxed);
    std::lock_guard lost_lock(lost_mu_);
    try {
      peer.slots.ForEachTaken(false, [&](std::uint32_t sid, std::uint32_t page,
                                         std::uint32_t owner, bool) {
        lost_copies_.push_back({owner, MakeSlot(index, generation, sid, page)});
        return true;
      });
    } catch (const std::bad_alloc&) {
      LogError("peer store: out of memory listing the pages lost with peer %s",
               peer.endpoint.ToString().c_str());
    }
  }
  peer.lost.fetch_add(peer.pages.load(std::memory_order_relaxed), std::memory_order_relaxed);
  EndSessionLocked(peer);
  if (peer.last_error != why) {
    LogError("peer %s is down: %s", peer.endpoint.ToString().c_str(), why.c_str());
  }
  peer.last_error = why;
}

std::vector<Membership::SessionState> Membership::Sessions() const {
  std::vector<SessionState> all;
  for (const auto& peer : List()) {
    std::lock_guard lock(peer->mu);
    all.push_back({peer->endpoint.ToString(), peer->generation.load(std::memory_order_relaxed),
                   peer->transport || peer->resuming ? peer->secret : std::nullopt});
  }
  return all;
}

int Membership::Restore(const Endpoint& endpoint, const SessionState& state,
                        std::chrono::milliseconds resume_for) {
  const int rc = Add(endpoint);
  if (rc != 0) return rc;
  Member& peer = *members_[count() - 1];
  std::lock_guard lock(peer.mu);
  peer.generation.store(state.generation, std::memory_order_release);
  if (state.secret) {
    peer.secret = state.secret;
    peer.grace = resume_for;
    peer.resuming = true;
    peer.resume_until = std::chrono::steady_clock::now() + resume_for;
    peer.last_error = "restarted; resuming its session";
  }
  return 0;
}

void Membership::SessionChanged() noexcept {
  if (!on_session_) return;
  try {
    on_session_();
  } catch (const std::exception& e) {
    LogError("warning: saving the peers' sessions: %s", e.what());
  }
}

void Membership::BreakLocked(Member& peer, const std::string& why) {
  // A lender that said SHUTDOWN freed everything when it left.
  if (!peer.secret || peer.slots.superpages() == 0 ||
      peer.removing.load(std::memory_order_acquire) ||
      peer.draining.load(std::memory_order_acquire)) {
    LogDebug("peer %s: not resumable (secret %d, superpages %zu, removing %d, draining %d)",
             peer.endpoint.ToString().c_str(), peer.secret.has_value() ? 1 : 0,
             peer.slots.superpages(), peer.removing.load() ? 1 : 0, peer.draining.load() ? 1 : 0);
    MarkDownLocked(peer, why);
    return;
  }
  if (peer.transport) peer.transport->Hangup();
  peer.transport.reset();
  // free_pages stays as last heard: nothing goes to a peer without a transport, and a
  // writer waiting for the resume must find the room there at once (AwaitAnyResume).
  peer.resuming = true;
  peer.resume_until = std::chrono::steady_clock::now() + std::min(options_.down_after, peer.grace);
  peer.last_error = why + "; resuming its session";
  LogError("peer %s: %s", peer.endpoint.ToString().c_str(), peer.last_error.c_str());
}

Membership::ResumeCheck Membership::CheckResume(Member& peer, unsigned generation) noexcept {
  std::lock_guard lock(peer.mu);
  if (peer.generation.load(std::memory_order_relaxed) != generation) return ResumeCheck::kGone;
  if (peer.transport && peer.transport->connected()) return ResumeCheck::kUp;
  const bool may_resume =
      peer.resuming || (peer.transport && peer.secret && peer.slots.superpages() > 0 &&
                        !peer.draining.load(std::memory_order_acquire));
  return may_resume ? ResumeCheck::kWaiting : ResumeCheck::kGone;
}

bool Membership::AwaitResume(Member& peer, unsigned generation) noexcept {
  const auto give_up =
      std::chrono::steady_clock::now() + options_.down_after + options_.connect_timeout;
  for (;;) {
    const ResumeCheck check = CheckResume(peer, generation);
    if (check != ResumeCheck::kWaiting) return check == ResumeCheck::kUp;
    if (std::chrono::steady_clock::now() >= give_up) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

bool Membership::AwaitAnyResume() noexcept {
  struct Waiting {
    Member* peer;
    unsigned generation;
  };
  std::vector<Waiting> waiting;
  try {
    for (const std::unique_ptr<Member>& peer : List()) {
      if (peer->removed.load(std::memory_order_acquire)) continue;
      const unsigned generation = peer->generation.load(std::memory_order_acquire);
      if (CheckResume(*peer, generation) == ResumeCheck::kWaiting) {
        waiting.push_back({peer.get(), generation});
      }
    }
  } catch (const std::bad_alloc&) {
    return false;
  }
  const auto give_up =
      std::chrono::steady_clock::now() + options_.down_after + options_.connect_timeout;
  while (!waiting.empty()) {
    for (std::size_t i = 0; i < waiting.size();) {
      const ResumeCheck check = CheckResume(*waiting[i].peer, waiting[i].generation);
      if (check == ResumeCheck::kUp) return true;
      if (check == ResumeCheck::kGone) {
        waiting[i] = waiting.back();
        waiting.pop_back();
      } else {
        ++i;
      }
    }
    if (waiting.empty() || std::chrono::steady_clock::now() >= give_up) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return false;
}

void Membership::Resume() {
  for (const auto& peer_ptr : List()) {
    Member& peer = *peer_ptr;
    bool resuming = false;
    {
      std::lock_guard lock(peer.mu);
      resuming = peer.resuming;
    }
    if (!resuming) continue;
    Connect(peer);
    // Up again: the frees that waited (and superpages given back) go now, and its room is
    // asked for, as at a refresh.
    if (std::shared_ptr<PeerTransport> transport = TransportOf(peer)) Sync(peer, *transport);
  }
}

void Membership::Sync(Member& peer, PeerTransport& transport) {
  std::vector<std::uint32_t> frees;
  {
    std::lock_guard lock(peer.mu);
    frees.swap(peer.frees_pending);
  }
  for (const std::uint32_t sid : frees) {
    transport.FreeSuperpageNoReply(sid, /*wait_to_send=*/true);
  }
  QueryReply reply{};
  if (transport.Query(&reply) != 0) return;  // the reader thread notices a dead link
  std::lock_guard lock(peer.mu);
  peer.free_pages.store(reply.free_pages, std::memory_order_relaxed);
  peer.pool_total_bytes = reply.total_pages * kPageBytes;
  if (reply.free_pages > 0) peer.refusing = false;
}

void Membership::Refresh() {
  for (const auto& peer_ptr : List()) {
    Member& peer = *peer_ptr;
    if (peer.removed.load(std::memory_order_acquire) || FinishRemoval(peer)) continue;
    Connect(peer);
    if (std::shared_ptr<PeerTransport> transport = TransportOf(peer)) Sync(peer, *transport);
  }
}

void Membership::Heartbeat() {
  const auto now = std::chrono::steady_clock::now();
  struct Probe {
    Member* peer;
    std::shared_ptr<PeerTransport> transport;
    QueryReply reply{};
    PendingRequest pending;
    bool sent = false;
  };
  const std::size_t n = count();
  std::vector<Probe> probes(n);
  for (std::size_t i = 0; i < n; ++i) {
    Probe& probe = probes[i];
    probe.peer = members_[i].get();
    probe.transport = TransportOf(*probe.peer);
    if (!probe.transport) continue;
    if (!probe.transport->connected()) {
      // Now, not at the next reconnect: its copies are to be made again, unless its
      // session can be resumed.
      std::lock_guard lock(probe.peer->mu);
      if (probe.peer->transport == probe.transport) BreakLocked(*probe.peer, "connection lost");
      continue;
    }
    if (OverdueTooLong(*probe.transport)) {
      MarkDownIf(*probe.peer, probe.transport.get(), OverdueReason());
      continue;
    }
    if (now - probe.transport->last_heard() < options_.request_timeout) continue;
    probe.pending.out = std::as_writable_bytes(std::span<QueryReply, 1>(&probe.reply, 1));
    probe.sent = probe.transport->SubmitQuery(&probe.pending) == 0;
  }
  for (Probe& probe : probes) {
    if (!probe.sent || PeerTransport::Wait(&probe.pending) != 0) continue;
    std::lock_guard lock(probe.peer->mu);
    if (probe.peer->transport != probe.transport) continue;
    probe.peer->free_pages.store(probe.reply.free_pages, std::memory_order_relaxed);
    if (probe.reply.free_pages > 0) probe.peer->refusing = false;
  }  // Connections that broke since the last heartbeat are resumed as soon as they can be.
  Resume();
}

std::shared_ptr<PeerTransport> Membership::TransportOf(const Member& peer) const {
  std::lock_guard lock(peer.mu);
  return peer.transport;
}

int Membership::Pick(std::uint64_t hint, const PeerMask* exclude) const noexcept {
  // Room = the lender's free pages plus the free slots in superpages we already hold.
  auto room = [this, exclude](std::size_t i) -> std::uint64_t {
    if (exclude != nullptr && exclude->test(i)) return 0;
    const Member& peer = *members_[i];
    if (Leaving(peer)) return 0;  // nothing new goes to a peer that leaves
    std::lock_guard lock(peer.mu);
    if (!peer.transport || !peer.transport->connected()) return 0;
    // A suspect peer gets no new pages until it answers in time again.
    if (peer.transport->overdue_since() != std::chrono::steady_clock::time_point::min()) {
      return 0;
    }
    const std::uint64_t lender =
        peer.refusing ? 0 : peer.free_pages.load(std::memory_order_relaxed);
    return lender + peer.slots.free_slots();
  };
  const std::size_t n = count();
  if (n == 0) return -1;
  const std::uint64_t mixed = Mix(hint);
  const std::size_t a = mixed % n;
  const std::size_t b = (a + 1 + (mixed >> 32) % std::max<std::size_t>(n - 1, 1)) % n;
  const std::uint64_t room_a = room(a);
  const std::uint64_t room_b = n > 1 ? room(b) : 0;
  if (room_a == 0 && room_b == 0) {
    // Neither sample has room; fall back to any peer that has.
    for (std::size_t i = 0; i < n; ++i) {
      if (room(i) > 0) return static_cast<int>(i);
    }
    return -1;
  }
  return static_cast<int>(room_a >= room_b ? a : b);
}

std::vector<LostCopy> Membership::TakeLostCopies() {
  std::vector<LostCopy> taken;
  std::lock_guard lock(lost_mu_);
  taken.swap(lost_copies_);
  return taken;
}

std::vector<LostCopy> Membership::CopiesToMove(std::size_t max) {
  std::vector<LostCopy> copies;
  // Every peer's RECLAIMs are applied, however many copies the first peers fill `max` with.
  for (const auto& peer : List()) {
    std::lock_guard lock(peer->mu);
    ApplyReclaimsLocked(*peer);
  }
  for (const auto& peer : List()) {
    if (copies.size() >= max) break;
    std::lock_guard lock(peer->mu);
    const bool leaving = peer->draining.load(std::memory_order_acquire) ||
                         peer->removing.load(std::memory_order_acquire);
    if (!peer->transport || (!leaving && peer->slots.reclaimed() == 0)) continue;
    const unsigned generation = peer->generation.load(std::memory_order_relaxed);
    peer->slots.ForEachTaken(!leaving, [&](std::uint32_t sid, std::uint32_t page,
                                           std::uint32_t owner, bool) {
      copies.push_back({owner, MakeSlot(peer->index, generation, sid, page), !leaving});
      return copies.size() < max;
    });
  }
  return copies;
}

void Membership::ApplyReclaimsLocked(Member& peer) {
  std::vector<std::uint32_t> sids;
  {
    std::lock_guard reclaim_lock(peer.reclaim_mu);
    if (peer.reclaims.empty()) return;
    sids.swap(peer.reclaims);
  }
  const std::size_t marked = peer.slots.MarkReclaimed(sids);
  if (marked > 0) {
    LogError("peer %s asks for %zu superpage(s) back: moving their pages elsewhere",
             peer.endpoint.ToString().c_str(), marked);
  }
}

std::uint64_t Membership::lost_pages() const {
  std::uint64_t lost = 0;
  for (const auto& peer : List()) lost += peer->lost.load(std::memory_order_relaxed);
  return lost;
}

std::vector<PeerInfo> Membership::Peers() const {
  std::vector<PeerInfo> all;
  for (const auto& peer : List()) {
    // A removed peer is listed only while pages lost with it are still named (it went down
    // before its removal), so that the lost pages stay counted where they were.
    const bool removed = peer->removed.load(std::memory_order_acquire);
    if (removed && peer->lost.load(std::memory_order_relaxed) == 0) continue;
    std::lock_guard lock(peer->mu);
    PeerInfo info;
    info.index = peer->index;
    info.address = peer->endpoint.ToString();
    const PeerTransport* transport = peer->transport.get();
    const bool up = transport != nullptr && transport->connected();
    const bool overdue =
        up && transport->overdue_since() != std::chrono::steady_clock::time_point::min();
    const bool draining = up && peer->draining.load(std::memory_order_acquire);
    const bool removing = peer->removing.load(std::memory_order_acquire);
    info.state = removed           ? PeerState::kRemoved
                 : removing        ? PeerState::kRemoving
                 : peer->resuming  ? PeerState::kResuming
                 : !up             ? PeerState::kDown
                 : draining ? PeerState::kDraining
                 : overdue ? PeerState::kSuspect
                 : peer->refusing ? PeerState::kRefusing
                                  : PeerState::kUp;
    if (up) {
      info.node_id = transport->lender().node_id;
      info.rtt_us = transport->last_rtt_us();
      info.pool_total_bytes = peer->pool_total_bytes;
      info.pool_free_bytes = peer->free_pages.load(std::memory_order_relaxed) * kPageBytes;
    }
    info.pages_stored = peer->pages.load(std::memory_order_relaxed);
    info.superpages_held = peer->slots.superpages();
    info.superpages_reclaimed = peer->slots.reclaimed();
    info.pages_lost = peer->lost.load(std::memory_order_relaxed);
    info.integrity_failures = peer->integrity_failures.load(std::memory_order_relaxed);
    info.last_error = peer->last_error;
    if (overdue) {
      const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::steady_clock::now() - transport->overdue_since())
                          .count();
      info.last_error = "no reply in time for " + std::to_string(ms) + " ms";
    }
    all.push_back(std::move(info));
  }
  return all;
}

void Membership::OnNotice(Member& peer, const Message& notice,
                          std::span<const std::byte> payload) noexcept {
  ShutdownBody shutdown{};
  if (notice.type == MessageType::kShutdown && DecodeBody(payload, &shutdown) &&
      !peer.draining.exchange(true, std::memory_order_acq_rel)) {
    // The lender is leaving: no new pages go there, and the placement store moves the ones
    // there elsewhere (CopiesToMove) before its deadline.
    LogError("peer %s is shutting down: moving its pages elsewhere within %u ms",
             peer.endpoint.ToString().c_str(), shutdown.deadline_ms);
  }
  ReclaimBody reclaim{};
  if (notice.type == MessageType::kReclaim && DecodeBody(payload, &reclaim)) {
    // The lender wants these superpages back by the deadline. Checked against the payload,
    // and bounded: a lender can ask for what it granted, not make us hold more.
    const std::size_t sids = (payload.size() - sizeof(ReclaimBody)) / sizeof(std::uint32_t);
    if (reclaim.count != sids ||
        payload.size() != sizeof(ReclaimBody) + sids * sizeof(std::uint32_t)) {
      return;
    }
    std::lock_guard lock(peer.reclaim_mu);
    try {
      for (std::size_t i = 0; i < sids && peer.reclaims.size() < kMaxReclaims; ++i) {
        std::uint32_t sid;
        std::memcpy(&sid, payload.data() + sizeof(ReclaimBody) + i * sizeof(std::uint32_t),
                    sizeof(sid));
        peer.reclaims.push_back(sid);
      }
    } catch (const std::bad_alloc&) {
      // The rest stay; the lender's deadline passes and it keeps them.
    }
  }
  if (observer_ != nullptr) observer_->OnNotice(peer, notice, payload);
}

}  // namespace memlend::peer
