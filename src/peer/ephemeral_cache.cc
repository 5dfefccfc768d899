#include "peer/ephemeral_cache.h"

#include <cassert>
#include <optional>

#include "peer/batch_window.h"
#include "peer/codec.h"
#include "peer/remote_slot.h"

namespace memlend::peer {
namespace {

constexpr std::uint32_t kCachePool = 1;  // the one ephemeral pool of each session

HandleBody CacheHandle(std::uint64_t key) { return HandleBody{kCachePool, 0, key}; }

}  // namespace

EphemeralCache::EphemeralCache(Membership& members) : members_(members) {
  members_.SetObserver(this);
}

void EphemeralCache::WriteBatch(std::span<const std::byte* const> pages,
                                std::span<const std::uint64_t> hints, std::span<Slot> slots,
                                std::span<int> results) noexcept {
  constexpr std::size_t kNone = Membership::kMaxPeers;  // a group that sends nothing
  for (std::size_t base = 0; base < pages.size(); base += kWindow) {
    const std::size_t count = std::min(kWindow, pages.size() - base);
    PendingRequest pending[kWindow];
    std::size_t peer_of[kWindow];
    std::uint64_t keys[kWindow];
    unsigned generations[kWindow];
    for (std::size_t i = 0; i < count; ++i) {
      const int chosen = members_.Pick(hints[base + i]);
      peer_of[i] = chosen < 0 ? kNone : static_cast<std::size_t>(chosen);
      if (chosen < 0) {
        CompleteNow(pending[i], -ENOSPC);
        continue;
      }
      generations[i] = members_.at(peer_of[i]).generation.load(std::memory_order_acquire);
      // The key is recorded before the PUT goes out, so an EVICTED notice that overtakes
      // the reply still finds it.
      PerPeer& cached = peers_[peer_of[i]];
      std::lock_guard lock(cached.mu);
      keys[i] = cached.next_key++ & kCacheKeyMask;
      try {
        cached.keys.insert(keys[i]);
      } catch (const std::bad_alloc&) {
        peer_of[i] = kNone;
        CompleteNow(pending[i], -ENOSPC);
      }
    }
    HandleBody handles[kWindow];
    // The transports must outlive the waits below (a waiter reads replies through them).
    std::shared_ptr<PeerTransport> transports[kWindow];
    std::size_t transport_count = 0;
    ForEachPeerGroup(peer_of, count, [&](std::size_t peer, std::span<const std::size_t> group) {
      if (peer == kNone) return;
      std::shared_ptr<PeerTransport> transport = members_.TransportOf(members_.at(peer));
      std::optional<RequestBatch> batch;
      if (transport) batch.emplace(*transport);
      transports[transport_count++] = transport;
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
      } else if (peer_of[i] != kNone) {
        Forget(peers_[peer_of[i]], keys[i]);
      }
      results[base + i] = rc == 0 ? 0 : -ENOSPC;
    }
  }
}

int EphemeralCache::Write(ConstPageSpan page, std::uint64_t hint, Slot* slot) noexcept {
  const std::byte* pages[1] = {page.data()};
  int result = 0;
  WriteBatch(pages, std::span(&hint, 1), std::span(slot, 1), std::span(&result, 1));
  return result;
}

EphemeralCache::Entry EphemeralCache::Find(Slot slot) noexcept {
  const std::size_t index = CachePeerOf(slot);
  assert(index < members_.count());
  const Membership::Member& peer = members_.at(index);
  Entry entry{&peers_[index], slot & kCacheKeyMask, nullptr, false};
  std::lock_guard lock(peer.mu);
  entry.current = GenerationOf(slot) == peer.generation.load(std::memory_order_relaxed);
  if (entry.current) entry.transport = peer.transport;
  return entry;
}

void EphemeralCache::Forget(PerPeer& cached, std::uint64_t key) noexcept {
  std::lock_guard lock(cached.mu);
  cached.keys.erase(key);
}

int EphemeralCache::Read(Slot slot, PageSpan out) noexcept {
  const Entry entry = Find(slot);
  if (!entry.current) return -ENOENT;  // the session that held it has ended
  {
    std::lock_guard lock(entry.cached->mu);
    if (!entry.cached->keys.contains(entry.key)) return -ENOENT;  // evicted: no need to ask
  }
  if (!entry.transport || entry.transport->Get(CacheHandle(entry.key), out) != 0) {
    Forget(*entry.cached, entry.key);
    return -ENOENT;
  }
  return 0;
}

void EphemeralCache::Discard(Slot slot) noexcept {
  const Entry entry = Find(slot);
  if (!entry.current) return;
  {
    std::lock_guard lock(entry.cached->mu);
    if (entry.cached->keys.erase(entry.key) == 0) return;  // the lender dropped it already
  }
  if (entry.transport) entry.transport->FlushNoReply(CacheHandle(entry.key));
}

StoreStats EphemeralCache::Stats() const noexcept {
  StoreStats stats;
  for (std::size_t i = 0; i < members_.count(); ++i) stats.pages += pages_on(i);
  stats.used_bytes = stats.pages * kPageSize;
  return stats;
}

std::uint64_t EphemeralCache::pages_on(std::size_t index) const noexcept {
  const PerPeer& cached = peers_[index];
  std::lock_guard lock(cached.mu);
  return cached.keys.size();
}

void EphemeralCache::OnSessionEnded(Membership::Member& peer) noexcept {
  // Cached pages went with the session; they have copies elsewhere, so none is lost.
  PerPeer& cached = peers_[peer.index];
  std::lock_guard lock(cached.mu);
  cached.keys.clear();
}

void EphemeralCache::OnNotice(Membership::Member& peer, const Message& notice,
                              std::span<const std::byte> payload) noexcept {
  HandleBody handle{};
  if (notice.type == MessageType::kEvicted && DecodeBody(payload, &handle) &&
      handle.pool == kCachePool) {
    // The lender dropped a cached page. The device still names its slot; reading it will
    // miss and fall back to the page's other copy.
    Forget(peers_[peer.index], handle.object);
  }
}

}  // namespace memlend::peer
