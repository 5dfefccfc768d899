#include "peer/peer_store.h"

#include <algorithm>
#include <bit>
#include <cassert>
#include <cerrno>
#include <optional>

#include "common/log.h"

namespace memlend::peer {
namespace {

constexpr unsigned kIndexBits = 9;  // 512 pages per superpage
constexpr unsigned kSidBits = 32;
static_assert(1u << kIndexBits == kPagesPerSuperpage);


constexpr unsigned kPeerBits = 8;
constexpr unsigned kGenerationShift = kIndexBits + kSidBits + kPeerBits;
constexpr unsigned kGenerationMask = 0x7f;  // the 7 slot bits left
static_assert(kGenerationShift + 7 == kSlotBits);

Slot MakeSlot(std::size_t peer, unsigned generation, std::uint32_t sid, std::uint32_t index) {
  return Slot{generation & kGenerationMask} << kGenerationShift |
         Slot{peer} << (kIndexBits + kSidBits) | Slot{sid} << kIndexBits | index;
}
void SplitSlot(Slot slot, std::size_t* peer, std::uint32_t* sid, std::uint32_t* index) {
  *index = static_cast<std::uint32_t>(slot & (kPagesPerSuperpage - 1));
  *sid = static_cast<std::uint32_t>(slot >> kIndexBits);
  *peer = static_cast<std::size_t>((slot >> (kIndexBits + kSidBits)) & 0xff);
}
unsigned GenerationOf(Slot slot) {
  return static_cast<unsigned>(slot >> kGenerationShift) & kGenerationMask;
}

// Cache slots: generation | peer | key, the key taking the bits a passive slot gives to
// SID and page index.
constexpr unsigned kKeyBits = kIndexBits + kSidBits;
constexpr std::uint64_t kKeyMask = (std::uint64_t{1} << kKeyBits) - 1;
constexpr std::uint32_t kCachePool = 1;  // the one ephemeral pool of each session

Slot MakeCacheSlot(std::size_t peer, unsigned generation, std::uint64_t key) {
  return Slot{generation & kGenerationMask} << kGenerationShift | Slot{peer} << kKeyBits |
         (key & kKeyMask);
}
std::size_t PeerOf(Slot slot) { return static_cast<std::size_t>((slot >> kKeyBits) & 0xff); }
HandleBody CacheHandle(std::uint64_t key) { return HandleBody{kCachePool, 0, key}; }

// Completes a request that was never sent, so that waiting for it returns `error` at once.
void CompleteNow(PendingRequest& pending, int error) {
  pending.result = error;
  pending.done.store(true, std::memory_order_release);
}

// Batched calls keep at most this many requests in flight.
constexpr std::size_t kWindow = 64;
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

// Calls fn(peer, indexes) once per distinct peer in peer_of[0..count), with the indexes
// of the requests that go to it, in order.
template <typename Fn>
void ForEachPeerGroup(const std::size_t* peer_of, std::size_t count, Fn fn) {
  std::size_t order[64];
  for (std::size_t i = 0; i < count; ++i) order[i] = i;
  std::stable_sort(order, order + count,
                   [peer_of](std::size_t a, std::size_t b) { return peer_of[a] < peer_of[b]; });
  for (std::size_t start = 0; start < count;) {
    std::size_t end = start + 1;
    while (end < count && peer_of[order[end]] == peer_of[order[start]]) ++end;
    fn(peer_of[order[start]], std::span<const std::size_t>(order + start, end - start));
    start = end;
  }
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
  }
  return "unknown";
}

PeerStore::PeerStore(std::uint64_t node_id, const PeerStoreOptions& options)
    : node_id_(node_id), options_(options) {}

PeerStore::~PeerStore() = default;

int PeerStore::AddPeer(const Endpoint& endpoint) {
  const std::string address = endpoint.ToString();
  std::lock_guard lock(membership_mu_);
  const std::size_t count = peer_count();
  for (std::size_t i = 0; i < count; ++i) {
    Peer& peer = *peers_[i];
    if (peer.endpoint.ToString() != address) continue;
    if (peer.removing.exchange(false, std::memory_order_acq_rel)) {
      LogError("peer %s: removal cancelled", address.c_str());
      return 0;
    }
    if (!peer.removed.load(std::memory_order_acquire)) return -EEXIST;
    peer.removed.store(false, std::memory_order_release);  // the next Refresh connects it
    return 0;
  }
  if (count >= kMaxPeers) return -ENOSPC;
  auto peer = std::make_unique<Peer>();
  peer->endpoint = endpoint;
  peer->index = count;
  peers_[count] = std::move(peer);
  peer_count_.store(count + 1, std::memory_order_release);
  return 0;
}

int PeerStore::RemovePeer(const Endpoint& endpoint) {
  const std::string address = endpoint.ToString();
  std::lock_guard lock(membership_mu_);
  for (const auto& peer : PeerList()) {
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

bool PeerStore::Leaving(const Peer& peer) noexcept {
  return peer.draining.load(std::memory_order_acquire) ||
         peer.removing.load(std::memory_order_acquire) ||
         peer.removed.load(std::memory_order_acquire);
}

bool PeerStore::FinishRemoval(Peer& peer) {
  std::shared_ptr<PeerTransport> client;
  {
    std::lock_guard lock(peer.mu);
    if (!peer.removing.load(std::memory_order_acquire)) return false;
    // A pinned slot may still be read, and a superpage still holds a page: not yet.
    if (peer.client && (!peer.superpages.empty() || !peer.pins.empty())) return false;
    client = std::move(peer.client);
    peer.superpages.clear();
    peer.partial.clear();
    peer.frees_pending.clear();
    peer.free_slots = 0;
    peer.reclaimed = 0;
    peer.pages.store(0, std::memory_order_relaxed);
    peer.free_pages.store(0, std::memory_order_relaxed);
    peer.pool_total_bytes = 0;
    // Cached pages have their copies on disk; slots of this session read as gone now.
    peer.generation.store((peer.generation.load(std::memory_order_relaxed) + 1) & kGenerationMask,
                          std::memory_order_release);
    {
      std::lock_guard cache_lock(peer.cache_mu);
      peer.cached.clear();
    }
    peer.last_error = "removed";
    peer.removed.store(true, std::memory_order_release);
    peer.removing.store(false, std::memory_order_release);
  }
  // Ending the session is what makes the lender free everything it granted us.
  if (client) client->Hangup();
  LogError("peer %s removed", peer.endpoint.ToString().c_str());
  return true;
}

void PeerStore::Connect(Peer& peer) {
  if (peer.removed.load(std::memory_order_acquire) ||
      peer.removing.load(std::memory_order_acquire)) {
    return;  // leaving the membership: nothing new goes there
  }
  {
    std::lock_guard lock(peer.mu);
    if (peer.client && peer.client->connected()) return;
    if (peer.client) MarkDown(peer, "connection lost");
  }
  // Connect and HELLO with no lock held: a lender that does not answer must not stall the
  // threads that read, write or release slots meanwhile.
  std::shared_ptr<PeerTransport> client;
  std::string error;
  try {
    TransportParams params;
    params.endpoint = peer.endpoint;
    params.node_id = node_id_;
    params.on_notice = [this, &peer](const Message& notice, std::span<const std::byte> payload) {
      OnNotice(peer, notice, payload);
    };
    params.connect_timeout = options_.connect_timeout;
    params.request_timeout = options_.request_timeout;
    params.stall_timeout = options_.down_after;
    client = options_.connect(params);
  } catch (const std::exception& e) {
    error = e.what();
  }
  std::lock_guard lock(peer.mu);
  if (!client) {
    if (peer.last_error != error) LogError("%s", error.c_str());
    peer.last_error = error;
    return;
  }
  peer.client = std::move(client);
  // A new session: slots of an earlier one must never name this session's superpages
  // (a restarted lender reuses SIDs), so they carry the session's generation.
  peer.generation.store((peer.generation.load(std::memory_order_relaxed) + 1) & kGenerationMask,
                        std::memory_order_release);
  peer.pool_total_bytes = peer.client->lender().pool_bytes;
  peer.draining.store(false, std::memory_order_release);
  if (!peer.last_error.empty()) LogError("peer %s is up", peer.endpoint.ToString().c_str());
  peer.last_error.clear();
  peer.refusing = false;
}

bool PeerStore::OverdueTooLong(const PeerTransport& client) const noexcept {
  const auto since = client.overdue_since();
  return since != std::chrono::steady_clock::time_point::min() &&
         std::chrono::steady_clock::now() - since >= options_.down_after;
}

void PeerStore::MarkDownIf(Peer& peer, const PeerTransport* client, const std::string& why) {
  std::lock_guard lock(peer.mu);
  if (peer.client.get() == client && client != nullptr) MarkDown(peer, why);
}

void PeerStore::MarkDown(Peer& peer, const std::string& why) {
  // The lender frees a session's superpages when it ends, so they are gone either way.
  // Hang up now: threads that still hold the client fail at once rather than wait.
  if (peer.client) peer.client->Hangup();
  // Name every copy that goes with them, for whoever keeps other copies.
  if (!peer.superpages.empty()) {
    const std::size_t index = peer.index;
    const unsigned generation = peer.generation.load(std::memory_order_relaxed);
    std::lock_guard lost_lock(lost_mu_);
    try {
      for (const auto& [sid, superpage] : peer.superpages) {
        for (std::uint32_t page = 0; page < kPagesPerSuperpage; ++page) {
          if ((superpage.used_mask[page / 64] >> (page % 64) & 1) == 0) continue;
          lost_copies_.push_back({superpage.owner[page], MakeSlot(index, generation, sid, page)});
        }
      }
    } catch (const std::bad_alloc&) {
      LogError("peer store: out of memory listing the pages lost with peer %s",
               peer.endpoint.ToString().c_str());
    }
  }
  peer.client.reset();
  peer.superpages.clear();
  peer.partial.clear();
  peer.frees_pending.clear();
  peer.free_slots = 0;
  peer.reclaimed = 0;
  {
    std::lock_guard reclaim_lock(peer.reclaim_mu);
    peer.reclaims.clear();
  }
  peer.pins.clear();
  peer.lost.fetch_add(peer.pages.load(std::memory_order_relaxed), std::memory_order_relaxed);
  // Slots of the ended session read as lost from now on, and a later session's slots
  // (a restarted lender reuses SIDs) can never be mistaken for them.
  peer.generation.store((peer.generation.load(std::memory_order_relaxed) + 1) & kGenerationMask,
                        std::memory_order_release);
  peer.pages.store(0, std::memory_order_relaxed);
  peer.free_pages.store(0, std::memory_order_relaxed);
  {
    // Cached pages went with the session too; they have copies elsewhere, so none is lost.
    std::lock_guard cache_lock(peer.cache_mu);
    peer.cached.clear();
  }
  if (peer.last_error != why) {
    LogError("peer %s is down: %s", peer.endpoint.ToString().c_str(), why.c_str());
  }
  peer.last_error = why;
}

void PeerStore::Refresh() {
  for (const auto& peer_ptr : PeerList()) {
    Peer& peer = *peer_ptr;
    if (peer.removed.load(std::memory_order_acquire) || FinishRemoval(peer)) continue;
    Connect(peer);
    std::shared_ptr<PeerTransport> client = ClientOf(peer);
    if (!client) continue;
    std::vector<std::uint32_t> frees;
    {
      std::lock_guard lock(peer.mu);
      frees.swap(peer.frees_pending);
    }
    for (const std::uint32_t sid : frees) client->FreeSuperpageNoReply(sid, /*wait_to_send=*/true);
    QueryReply reply{};
    if (client->Query(&reply) != 0) continue;  // the reader thread notices a dead link
    std::lock_guard lock(peer.mu);
    peer.free_pages.store(reply.free_pages, std::memory_order_relaxed);
    peer.pool_total_bytes = reply.total_pages * kPageBytes;
    if (reply.free_pages > 0) peer.refusing = false;
  }
}

void PeerStore::Heartbeat() {
  const auto now = std::chrono::steady_clock::now();
  struct Probe {
    Peer* peer;
    std::shared_ptr<PeerTransport> client;
    QueryReply reply{};
    PendingRequest pending;
    bool sent = false;
  };
  const std::size_t count = peer_count();
  std::vector<Probe> probes(count);
  for (std::size_t i = 0; i < count; ++i) {
    Probe& probe = probes[i];
    probe.peer = peers_[i].get();
    probe.client = ClientOf(*probe.peer);
    if (!probe.client) continue;
    if (!probe.client->connected()) {
      // Take it down now, not at the next reconnect: its copies are to be made again.
      MarkDownIf(*probe.peer, probe.client.get(), "connection lost");
      continue;
    }
    if (OverdueTooLong(*probe.client)) {
      MarkDownIf(*probe.peer, probe.client.get(),
                 "no reply in time for " + std::to_string(options_.down_after.count()) + " ms");
      continue;
    }
    if (now - probe.client->last_heard() < options_.request_timeout) continue;
    probe.pending.out = std::as_writable_bytes(std::span<QueryReply, 1>(&probe.reply, 1));
    probe.sent = probe.client->SubmitQuery(&probe.pending) == 0;
  }
  for (Probe& probe : probes) {
    if (!probe.sent || PeerTransport::Wait(&probe.pending) != 0) continue;
    std::lock_guard lock(probe.peer->mu);
    if (probe.peer->client != probe.client) continue;
    probe.peer->free_pages.store(probe.reply.free_pages, std::memory_order_relaxed);
    if (probe.reply.free_pages > 0) probe.peer->refusing = false;
  }
}

std::shared_ptr<PeerTransport> PeerStore::ClientOf(Peer& peer) const {
  std::lock_guard lock(peer.mu);
  return peer.client;
}

int PeerStore::PickPeer(std::uint64_t hint, const PeerMask* exclude) const noexcept {
  // Room = the lender's free pages plus the free slots in superpages we already hold.
  auto room = [this, exclude](std::size_t i) -> std::uint64_t {
    if (exclude != nullptr && exclude->test(i)) return 0;
    const Peer& peer = *peers_[i];
    if (Leaving(peer)) return 0;  // nothing new goes to a peer that leaves
    std::lock_guard lock(peer.mu);
    if (!peer.client || !peer.client->connected()) return 0;
    // A suspect peer gets no new pages until it answers in time again.
    if (peer.client->overdue_since() != std::chrono::steady_clock::time_point::min()) return 0;
    const std::uint64_t lender = peer.refusing ? 0 : peer.free_pages.load(std::memory_order_relaxed);
    return lender + peer.free_slots;
  };
  const std::size_t count = peer_count();
  if (count == 0) return -1;
  const std::uint64_t mixed = Mix(hint);
  const std::size_t a = mixed % count;
  const std::size_t b = (a + 1 + (mixed >> 32) % std::max<std::size_t>(count - 1, 1)) % count;
  const std::uint64_t room_a = room(a);
  const std::uint64_t room_b = count > 1 ? room(b) : 0;
  if (room_a == 0 && room_b == 0) {
    // Neither sample has room; fall back to any peer that has.
    for (std::size_t i = 0; i < count; ++i) {
      if (room(i) > 0) return static_cast<int>(i);
    }
    return -1;
  }
  return static_cast<int>(room_a >= room_b ? a : b);
}

int PeerStore::ReserveSlot(Peer& peer, std::uint32_t* sid, std::uint32_t* index,
                           unsigned* generation, std::uint32_t owner) noexcept {
  std::unique_lock lock(peer.mu);
  *generation = peer.generation.load(std::memory_order_relaxed);
  while (!peer.partial.empty()) {
    const std::uint32_t candidate = peer.partial.back();
    const auto it = peer.superpages.find(candidate);
    if (it == peer.superpages.end() || it->second.used == kPagesPerSuperpage ||
        it->second.reclaimed) {
      peer.partial.pop_back();  // stale entry, or a superpage its lender wants back
      continue;
    }
    Superpage& superpage = it->second;
    for (std::uint32_t word = 0; word < kPagesPerSuperpage / 64; ++word) {
      if (superpage.used_mask[word] == ~std::uint64_t{0}) continue;
      const auto bit = static_cast<std::uint32_t>(std::countr_one(superpage.used_mask[word]));
      superpage.used_mask[word] |= std::uint64_t{1} << bit;
      ++superpage.used;
      --peer.free_slots;
      if (superpage.used == kPagesPerSuperpage) peer.partial.pop_back();
      *sid = candidate;
      *index = word * 64 + bit;
      superpage.owner[*index] = owner;
      return 0;
    }
  }
  if (!peer.client || peer.refusing) return -ENOSPC;
  // Ask for another superpage, once per 512 pages, without holding the peer's lock for the
  // round trip: a slow or stuck connection must not stall the threads that only release
  // slots (a write over a remote page, a trim).
  const std::shared_ptr<PeerTransport> client = peer.client;
  const unsigned session = *generation;
  lock.unlock();
  std::uint32_t granted = 0;
  const int rc = client->AllocSuperpage(&granted);
  lock.lock();
  if (peer.client != client || peer.generation.load(std::memory_order_relaxed) != session) {
    return -ENOTCONN;  // the session ended meanwhile, and its superpages with it
  }
  if (rc == -ETIMEDOUT) return -ENOSPC;  // suspect now; a late grant stays unused
  if (rc == -ENOSPC || rc == -ESHUTDOWN) {
    peer.refusing = true;
    peer.free_pages.store(0, std::memory_order_relaxed);
    return -ENOSPC;
  }
  if (rc != 0) {
    MarkDown(peer, "superpage allocation failed");
    return -ENOTCONN;
  }
  try {
    Superpage& superpage = peer.superpages[granted];
    superpage.used_mask[0] = 1;
    superpage.used = 1;
    superpage.owner[0] = owner;
    peer.free_slots += kPagesPerSuperpage - 1;
    peer.partial.push_back(granted);
  } catch (const std::bad_alloc&) {
    return -ENOMEM;  // the superpage stays granted and unused until the session ends
  }
  const std::uint64_t free = peer.free_pages.load(std::memory_order_relaxed);
  peer.free_pages.store(free > kPagesPerSuperpage ? free - kPagesPerSuperpage : 0,
                        std::memory_order_relaxed);
  *sid = granted;
  *index = 0;
  return 0;
}

void PeerStore::ReleaseSlot(Peer& peer, std::uint32_t sid, std::uint32_t index) noexcept {
  std::shared_ptr<PeerTransport> client;
  bool reclaimed = false;
  {
    std::lock_guard lock(peer.mu);
    const auto it = peer.superpages.find(sid);
    if (it == peer.superpages.end()) return;  // lost with a connection that went down
    Superpage& superpage = it->second;
    const std::uint64_t bit = std::uint64_t{1} << (index % 64);
    assert(superpage.used_mask[index / 64] & bit);
    superpage.used_mask[index / 64] &= ~bit;
    // A reclaimed superpage's slots are not free for new pages: it goes back once empty.
    if (!superpage.reclaimed) ++peer.free_slots;
    if (--superpage.used > 0) {
      if (superpage.used == kPagesPerSuperpage - 1 && !superpage.reclaimed) {
        peer.partial.push_back(sid);
      }
      return;
    }
    reclaimed = superpage.reclaimed;
    if (superpage.reclaimed) {
      --peer.reclaimed;
    } else {
      peer.free_slots -= kPagesPerSuperpage;
    }
    peer.superpages.erase(it);
    client = peer.client;
  }
  // The superpage is empty: give it back so the lender's count drops, without waiting for
  // the reply, or for the connection when another thread is sending on it (that send may
  // be stuck, under memory pressure, until this thread's request completes): then the
  // next Refresh sends it. The lender has room for a superpage now, whatever it said
  // before; don't wait for the next QUERY to use it.
  if (!client) return;
  const int rc = client->FreeSuperpageNoReply(sid, /*wait_to_send=*/false);
  std::lock_guard lock(peer.mu);
  if (peer.client != client) return;
  if (rc == -EAGAIN) {
    try {
      peer.frees_pending.push_back(sid);
    } catch (const std::bad_alloc&) {
      // It stays granted, and unused, until the session ends.
    }
    return;
  }
  // (One its lender asked back leaves the lender's pool: no room comes of it.)
  if (rc == 0 && !reclaimed) {
    peer.refusing = false;
    peer.free_pages.fetch_add(kPagesPerSuperpage, std::memory_order_relaxed);
  }
}

int PeerStore::Write(ConstPageSpan page, std::uint64_t hint, Slot* slot) noexcept {
  for (std::size_t attempt = 0; attempt <= peer_count(); ++attempt) {
    const int chosen = PickPeer(hint + attempt);
    if (chosen < 0) return -ENOSPC;
    Peer& peer = *peers_[static_cast<std::size_t>(chosen)];
    std::uint32_t sid = 0;
    std::uint32_t index = 0;
    unsigned generation = 0;
    if (ReserveSlot(peer, &sid, &index, &generation) != 0) continue;
    std::shared_ptr<PeerTransport> client = ClientOf(peer);
    const int rc = client ? client->Write(sid, index * kPageBytes, page) : -ENOTCONN;
    if (rc != 0) {
      ReleaseSlot(peer, sid, index);
      if (rc == -ENOTCONN) {
        std::lock_guard lock(peer.mu);
        MarkDown(peer, "connection lost");
      }
      continue;
    }
    peer.pages.fetch_add(1, std::memory_order_relaxed);
    *slot = MakeSlot(static_cast<std::size_t>(chosen), generation, sid, index);
    return 0;
  }
  return -ENOSPC;
}

std::shared_ptr<PeerTransport> PeerStore::ClientFor(Slot slot, std::uint32_t* sid,
                                                 std::uint32_t* index) const noexcept {
  std::size_t peer_index;
  SplitSlot(slot, &peer_index, sid, index);
  assert(peer_index < peer_count());
  const Peer& peer = *peers_[peer_index];
  std::lock_guard lock(peer.mu);
  if (GenerationOf(slot) != peer.generation.load(std::memory_order_relaxed)) return nullptr;
  return peer.client;
}

int PeerStore::ReadOnce(Slot slot, PageSpan out) noexcept {
  std::uint32_t sid;
  std::uint32_t index;
  std::shared_ptr<PeerTransport> client = ClientFor(slot, &sid, &index);
  if (!client) return -EIO;  // the peer, or the session holding the page, is gone
  const int rc = client->Read(sid, index * kPageBytes, out);
  return rc == 0 || rc == -ETIMEDOUT ? rc : -EIO;
}

std::size_t PeerStore::PeerIndexOf(Slot slot) noexcept {
  std::size_t peer;
  std::uint32_t sid;
  std::uint32_t index;
  SplitSlot(slot, &peer, &sid, &index);
  return peer;
}

bool PeerStore::SlotReady(Slot slot) const noexcept {
  std::uint32_t sid;
  std::uint32_t index;
  const std::shared_ptr<PeerTransport> client = ClientFor(slot, &sid, &index);
  return client && client->connected() &&
         client->overdue_since() == std::chrono::steady_clock::time_point::min();
}

bool PeerStore::SlotGone(Slot slot) const noexcept {
  const std::size_t peer_index = PeerIndexOf(slot);
  if (peer_index >= peer_count()) return true;
  const Peer& peer = *peers_[peer_index];
  std::lock_guard lock(peer.mu);
  return GenerationOf(slot) != peer.generation.load(std::memory_order_relaxed) || !peer.client;
}

std::vector<PeerStore::LostCopy> PeerStore::CopiesOnDrainingPeers(std::size_t max) {
  std::vector<LostCopy> copies;
  // Every peer's RECLAIMs are applied, however many copies the first peers fill `max` with.
  for (std::size_t index = 0; index < peer_count(); ++index) {
    Peer& peer = *peers_[index];
    std::lock_guard lock(peer.mu);
    ApplyReclaimsLocked(peer);
  }
  for (std::size_t index = 0; index < peer_count() && copies.size() < max; ++index) {
    Peer& peer = *peers_[index];
    std::lock_guard lock(peer.mu);
    const bool leaving = peer.draining.load(std::memory_order_acquire) ||
                         peer.removing.load(std::memory_order_acquire);
    if (!peer.client || (!leaving && peer.reclaimed == 0)) continue;
    const unsigned generation = peer.generation.load(std::memory_order_relaxed);
    for (const auto& [sid, superpage] : peer.superpages) {
      if (!leaving && !superpage.reclaimed) continue;
      for (std::uint32_t page = 0; page < kPagesPerSuperpage && copies.size() < max; ++page) {
        if ((superpage.used_mask[page / 64] >> (page % 64) & 1) == 0) continue;
        copies.push_back({superpage.owner[page], MakeSlot(index, generation, sid, page),
                          /*reclaim=*/!leaving});
      }
      if (copies.size() >= max) break;
    }
  }
  return copies;
}

void PeerStore::ApplyReclaimsLocked(Peer& peer) {
  std::vector<std::uint32_t> sids;
  {
    std::lock_guard reclaim_lock(peer.reclaim_mu);
    if (peer.reclaims.empty()) return;
    sids.swap(peer.reclaims);
  }
  std::size_t marked = 0;
  for (const std::uint32_t sid : sids) {
    const auto it = peer.superpages.find(sid);
    if (it == peer.superpages.end() || it->second.reclaimed) continue;  // freed already, say
    it->second.reclaimed = true;
    ++peer.reclaimed;
    peer.free_slots -= kPagesPerSuperpage - it->second.used;
    ++marked;
  }
  if (marked > 0) {
    LogError("peer %s asks for %zu superpage(s) back: moving their pages elsewhere",
             peer.endpoint.ToString().c_str(), marked);
  }
}

std::vector<PeerStore::LostCopy> PeerStore::TakeLostCopies() {
  std::vector<LostCopy> taken;
  std::lock_guard lock(lost_mu_);
  taken.swap(lost_copies_);
  return taken;
}

int PeerStore::Read(Slot slot, PageSpan out) noexcept {
  std::uint32_t sid;
  std::uint32_t index;
  for (;;) {
    std::shared_ptr<PeerTransport> client = ClientFor(slot, &sid, &index);
    if (!client) return -EIO;  // the peer, or the session holding the page, is gone
    const int rc = client->Read(sid, index * kPageBytes, out);
    if (rc == 0) return 0;
    if (rc != -ETIMEDOUT) return -EIO;
    // Overdue. The page has no other copy: ask again while the peer may still answer.
    if (OverdueTooLong(*client)) {
      std::size_t peer_index;
      SplitSlot(slot, &peer_index, &sid, &index);
      MarkDownIf(*peers_[peer_index], client.get(),
                 "no reply in time for " + std::to_string(options_.down_after.count()) + " ms");
      return -EIO;
    }
  }
}

void PeerStore::ReadBatch(std::span<const Slot> slots, std::span<std::byte* const> outs,
                          std::span<int> results) noexcept {
  ReadBatchOnce(slots, outs, results);
  // An overdue read is asked again, alone, until the peer answers or is down.
  for (std::size_t i = 0; i < slots.size(); ++i) {
    if (results[i] == -ETIMEDOUT) results[i] = Read(slots[i], PageSpan(outs[i], kPageSize));
  }
}

void PeerStore::ReadBatchOnce(std::span<const Slot> slots, std::span<std::byte* const> outs,
                              std::span<int> results) noexcept {
  for (std::size_t base = 0; base < slots.size(); base += kWindow) {
    const std::size_t count = std::min(kWindow, slots.size() - base);
    PendingRequest pending[kWindow];
    std::size_t peer_of[kWindow];
    std::uint32_t sids[kWindow];
    std::uint32_t indexes[kWindow];
    bool current[kWindow];
    for (std::size_t i = 0; i < count; ++i) {
      SplitSlot(slots[base + i], &peer_of[i], &sids[i], &indexes[i]);
      assert(peer_of[i] < peer_count());
      pending[i].out = std::span<std::byte>(outs[base + i], kPageSize);
    }
    // The clients must outlive the waits below (a waiter reads replies through its client).
    std::shared_ptr<PeerTransport> clients[kWindow];
    std::size_t client_count = 0;
    ForEachPeerGroup(peer_of, count, [&](std::size_t peer, std::span<const std::size_t> group) {
      std::shared_ptr<PeerTransport> client;
      unsigned generation;
      {
        std::lock_guard lock(peers_[peer]->mu);
        client = peers_[peer]->client;
        generation = peers_[peer]->generation.load(std::memory_order_relaxed);
      }
      for (const std::size_t i : group) current[i] = GenerationOf(slots[base + i]) == generation;
      std::optional<RequestBatch> batch;
      if (client) batch.emplace(*client);
      clients[client_count++] = client;
      for (const std::size_t i : group) {
        if (batch && current[i]) {
          batch->AddRead(sids[i], indexes[i] * kPageBytes, &pending[i]);
        } else {
          CompleteNow(pending[i], -EIO);
        }
      }
    });  // each batch is sent as it goes out of scope
    for (std::size_t i = 0; i < count; ++i) {
      const int rc = PeerTransport::Wait(&pending[i]);
      results[base + i] = rc == 0 || rc == -ETIMEDOUT ? rc : -EIO;
    }
  }
}

void PeerStore::WriteBatchFor(std::span<const std::byte* const> pages,
                              std::span<const std::uint64_t> hints,
                              std::span<const std::uint32_t> owners,
                              std::span<const PeerMask> excludes, std::span<Slot> slots,
                              std::span<int> results) noexcept {
  for (std::size_t base = 0; base < pages.size(); base += kWindow) {
    const std::size_t count = std::min(kWindow, pages.size() - base);
    PendingRequest pending[kWindow];
    int chosen[kWindow];
    std::uint32_t sids[kWindow];
    std::uint32_t indexes[kWindow];
    unsigned generations[kWindow];
    std::size_t peer_of[kWindow];
    for (std::size_t i = 0; i < count; ++i) {
      chosen[i] = PickPeer(hints[base + i], excludes.empty() ? nullptr : &excludes[base + i]);
      const int rc = chosen[i] < 0 ? -ENOSPC
                                   : ReserveSlot(*peers_[static_cast<std::size_t>(chosen[i])],
                                                 &sids[i], &indexes[i], &generations[i],
                                                 owners.empty() ? 0 : owners[base + i]);
      if (rc != 0) {
        chosen[i] = -1;
        CompleteNow(pending[i], -ENOSPC);
      }
      // Pages with no peer form a group of their own (index kMaxPeers) that sends nothing.
      peer_of[i] = chosen[i] < 0 ? kMaxPeers : static_cast<std::size_t>(chosen[i]);
    }
    // The clients must outlive the waits below (a waiter reads replies through its client).
    std::shared_ptr<PeerTransport> clients[kWindow];
    std::size_t client_count = 0;
    ForEachPeerGroup(peer_of, count, [&](std::size_t peer, std::span<const std::size_t> group) {
      if (peer == kMaxPeers) return;
      std::shared_ptr<PeerTransport> client = ClientOf(*peers_[peer]);
      std::optional<RequestBatch> batch;
      if (client) batch.emplace(*client);
      clients[client_count++] = client;
      for (const std::size_t i : group) {
        if (batch) {
          batch->AddWrite(sids[i], indexes[i] * kPageBytes,
                          std::span<const std::byte>(pages[base + i], kPageSize), &pending[i]);
        } else {
          CompleteNow(pending[i], -ENOTCONN);
        }
      }
    });
    for (std::size_t i = 0; i < count; ++i) {
      int rc = PeerTransport::Wait(&pending[i]);
      if (chosen[i] >= 0) {
        Peer& peer = *peers_[static_cast<std::size_t>(chosen[i])];
        if (rc == 0) {
          peer.pages.fetch_add(1, std::memory_order_relaxed);
          slots[base + i] =
              MakeSlot(static_cast<std::size_t>(chosen[i]), generations[i], sids[i], indexes[i]);
        } else {
          ReleaseSlot(peer, sids[i], indexes[i]);
          if (rc == -ENOTCONN) {
            std::lock_guard lock(peer.mu);
            MarkDown(peer, "connection lost");
          }
        }
      }
      results[base + i] = rc == 0 ? 0 : -ENOSPC;  // the caller places it elsewhere
    }
  }
}

void PeerStore::Pin(Slot slot) noexcept {
  std::size_t peer_index;
  std::uint32_t sid;
  std::uint32_t index;
  SplitSlot(slot, &peer_index, &sid, &index);
  Peer& peer = *peers_[peer_index];
  std::lock_guard lock(peer.mu);
  if (GenerationOf(slot) != peer.generation.load(std::memory_order_relaxed)) return;
  try {
    ++peer.pins[slot].count;
  } catch (const std::bad_alloc&) {
    // Pin cannot fail. Without the pin a racing discard could recycle the slot before
    // the batched read, which would then return another page's bytes; say so loudly.
    LogError("peer store: out of memory pinning a page");
  }
}

void PeerStore::Unpin(Slot slot) noexcept {
  std::size_t peer_index;
  std::uint32_t sid;
  std::uint32_t index;
  SplitSlot(slot, &peer_index, &sid, &index);
  Peer& peer = *peers_[peer_index];
  bool release = false;
  {
    std::lock_guard lock(peer.mu);
    const auto it = peer.pins.find(slot);
    if (it == peer.pins.end()) return;
    if (--it->second.count == 0) {
      release = it->second.discarded;
      peer.pins.erase(it);
    }
  }
  if (release) ReleaseSlot(peer, sid, index);
}

void PeerStore::Discard(Slot slot) noexcept {
  std::size_t peer_index;
  std::uint32_t sid;
  std::uint32_t index;
  SplitSlot(slot, &peer_index, &sid, &index);
  assert(peer_index < peer_count());
  Peer& peer = *peers_[peer_index];
  {
    std::lock_guard lock(peer.mu);
    // A slot of an ended session is gone already; its lender freed it with the session.
    if (GenerationOf(slot) != peer.generation.load(std::memory_order_relaxed)) {
      if (peer.lost.load(std::memory_order_relaxed) > 0) {
        peer.lost.fetch_sub(1, std::memory_order_relaxed);
      }
      return;
    }
    const std::uint64_t pages = peer.pages.load(std::memory_order_relaxed);
    if (pages > 0) peer.pages.fetch_sub(1, std::memory_order_relaxed);
    const auto it = peer.pins.find(slot);
    if (it != peer.pins.end()) {
      it->second.discarded = true;  // a batched read still needs it: release at Unpin
      return;
    }
  }
  ReleaseSlot(peer, sid, index);
}

StoreStats PeerStore::Stats() const noexcept {
  StoreStats stats;
  for (const auto& peer : PeerList()) {
    std::lock_guard lock(peer->mu);
    stats.pages += peer->pages.load(std::memory_order_relaxed);
    stats.used_bytes += peer->superpages.size() * std::uint64_t{kSuperpageBytes};
    if (peer->client) stats.total_bytes += peer->pool_total_bytes;
  }
  return stats;
}

std::uint64_t PeerStore::lost_pages() const {
  std::uint64_t lost = 0;
  for (const auto& peer : PeerList()) lost += peer->lost.load(std::memory_order_relaxed);
  return lost;
}

std::vector<PeerInfo> PeerStore::Peers() const {
  std::vector<PeerInfo> all;
  for (const auto& peer : PeerList()) {
    // A removed peer is listed only while pages lost with it are still named (it went down
    // before its removal), so that the lost pages stay counted where they were.
    const bool removed = peer->removed.load(std::memory_order_acquire);
    if (removed && peer->lost.load(std::memory_order_relaxed) == 0) continue;
    std::lock_guard lock(peer->mu);
    PeerInfo info;
    info.address = peer->endpoint.ToString();
    const bool up = peer->client && peer->client->connected();
    const bool overdue =
        up && peer->client->overdue_since() != std::chrono::steady_clock::time_point::min();
    const bool draining = up && peer->draining.load(std::memory_order_acquire);
    const bool removing = peer->removing.load(std::memory_order_acquire);
    info.state = removed    ? PeerState::kRemoved
                 : removing ? PeerState::kRemoving
                 : !up      ? PeerState::kDown
                 : draining ? PeerState::kDraining
                 : overdue ? PeerState::kSuspect
                 : peer->refusing ? PeerState::kRefusing
                                  : PeerState::kUp;
    if (up) {
      info.node_id = peer->client->lender().node_id;
      info.rtt_us = peer->client->last_rtt_us();
      info.pool_total_bytes = peer->pool_total_bytes;
      info.pool_free_bytes = peer->free_pages.load(std::memory_order_relaxed) * kPageBytes;
    }
    info.pages_stored = peer->pages.load(std::memory_order_relaxed);
    {
      std::lock_guard cache_lock(peer->cache_mu);
      info.pages_cached = peer->cached.size();
    }
    info.superpages_held = peer->superpages.size();
    info.superpages_reclaimed = peer->reclaimed;
    info.pages_lost = peer->lost.load(std::memory_order_relaxed);
    info.last_error = peer->last_error;
    if (overdue) {
      const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::steady_clock::now() - peer->client->overdue_since())
                          .count();
      info.last_error = "no reply in time for " + std::to_string(ms) + " ms";
    }
    all.push_back(std::move(info));
  }
  return all;
}

void PeerStore::OnNotice(Peer& peer, const Message& notice,
                         std::span<const std::byte> payload) noexcept {
  HandleBody handle{};
  if (notice.type == MessageType::kEvicted && DecodeBody(payload, &handle) &&
      handle.pool == kCachePool) {
    // The lender dropped a cached page. The device still names its slot; reading it will
    // miss and fall back to the page's other copy.
    std::lock_guard lock(peer.cache_mu);
    peer.cached.erase(handle.object);
  }
  ShutdownBody shutdown{};
  if (notice.type == MessageType::kShutdown && DecodeBody(payload, &shutdown) &&
      !peer.draining.exchange(true, std::memory_order_acq_rel)) {
    // The lender is leaving: no new pages go there, and the placement store moves the ones
    // there elsewhere (CopiesOnDrainingPeers) before its deadline.
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
}

void PeerStore::CacheWriteBatch(std::span<const std::byte* const> pages,
                                std::span<const std::uint64_t> hints, std::span<Slot> slots,
                                std::span<int> results) noexcept {
  for (std::size_t base = 0; base < pages.size(); base += kWindow) {
    const std::size_t count = std::min(kWindow, pages.size() - base);
    PendingRequest pending[kWindow];
    std::size_t peer_of[kWindow];
    std::uint64_t keys[kWindow];
    unsigned generations[kWindow];
    for (std::size_t i = 0; i < count; ++i) {
      const int chosen = PickPeer(hints[base + i]);
      peer_of[i] = chosen < 0 ? kMaxPeers : static_cast<std::size_t>(chosen);
      if (chosen < 0) {
        CompleteNow(pending[i], -ENOSPC);
        continue;
      }
      Peer& peer = *peers_[peer_of[i]];
      generations[i] = peer.generation.load(std::memory_order_acquire);
      // The key is recorded before the PUT goes out, so an EVICTED notice that overtakes
      // the reply still finds it.
      std::lock_guard lock(peer.cache_mu);
      keys[i] = peer.next_key++ & kKeyMask;
      try {
        peer.cached.insert(keys[i]);
      } catch (const std::bad_alloc&) {
        peer_of[i] = kMaxPeers;
        CompleteNow(pending[i], -ENOSPC);
      }
    }
    HandleBody handles[kWindow];
    // The clients must outlive the waits below (a waiter reads replies through its client).
    std::shared_ptr<PeerTransport> clients[kWindow];
    std::size_t client_count = 0;
    ForEachPeerGroup(peer_of, count, [&](std::size_t peer, std::span<const std::size_t> group) {
      if (peer == kMaxPeers) return;
      std::shared_ptr<PeerTransport> client = ClientOf(*peers_[peer]);
      std::optional<RequestBatch> batch;
      if (client) batch.emplace(*client);
      clients[client_count++] = client;
      for (const std::size_t i : group) {
        handles[i] = CacheHandle(keys[i]);
        if (batch) {
          batch->AddPut(handles[i], kPutEphemeral,
                        std::span<const std::byte>(pages[base + i], kPageSize), &pending[i]);
        } else {
          CompleteNow(pending[i], -ENOTCONN);
        }
      }
    });
    for (std::size_t i = 0; i < count; ++i) {
      const int rc = PeerTransport::Wait(&pending[i]);
      if (rc == 0) {
        slots[base + i] = MakeCacheSlot(peer_of[i], generations[i], keys[i]);
      } else if (peer_of[i] != kMaxPeers) {
        Peer& peer = *peers_[peer_of[i]];
        std::lock_guard lock(peer.cache_mu);
        peer.cached.erase(keys[i]);
      }
      results[base + i] = rc == 0 ? 0 : -ENOSPC;
    }
  }
}

int PeerStore::Cache::Write(ConstPageSpan page, std::uint64_t hint, Slot* slot) noexcept {
  const std::byte* pages[1] = {page.data()};
  int result = 0;
  store_.CacheWriteBatch(pages, std::span(&hint, 1), std::span(slot, 1), std::span(&result, 1));
  return result;
}

PeerStore::CacheEntry PeerStore::FindCached(Slot slot) const noexcept {
  const std::size_t peer_index = PeerOf(slot);
  assert(peer_index < peer_count());
  Peer& peer = *peers_[peer_index];
  CacheEntry entry{&peer, slot & kKeyMask, nullptr, false};
  std::lock_guard lock(peer.mu);
  entry.current = GenerationOf(slot) == peer.generation.load(std::memory_order_relaxed);
  if (entry.current) entry.client = peer.client;
  return entry;
}

int PeerStore::CacheRead(Slot slot, PageSpan out) noexcept {
  const CacheEntry entry = FindCached(slot);
  if (!entry.current) return -ENOENT;  // the session that held it has ended
  {
    std::lock_guard lock(entry.peer->cache_mu);
    if (!entry.peer->cached.contains(entry.key)) return -ENOENT;  // evicted: no need to ask
  }
  if (!entry.client || entry.client->Get(CacheHandle(entry.key), out) != 0) {
    std::lock_guard lock(entry.peer->cache_mu);
    entry.peer->cached.erase(entry.key);
    return -ENOENT;
  }
  return 0;
}

void PeerStore::CacheDiscard(Slot slot) noexcept {
  const CacheEntry entry = FindCached(slot);
  if (!entry.current) return;
  {
    std::lock_guard lock(entry.peer->cache_mu);
    if (entry.peer->cached.erase(entry.key) == 0) return;  // the lender dropped it already
  }
  if (entry.client) entry.client->FlushNoReply(CacheHandle(entry.key));
}

StoreStats PeerStore::Cache::Stats() const noexcept {
  StoreStats stats;
  for (const auto& peer : store_.PeerList()) {
    std::lock_guard lock(peer->cache_mu);
    stats.pages += peer->cached.size();
  }
  stats.used_bytes = stats.pages * kPageSize;
  return stats;
}

}  // namespace memlend::peer
