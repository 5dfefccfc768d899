#include "peer/peer_store.h"

#include <cassert>
#include <cerrno>
#include <optional>

#include "common/log.h"
#include "peer/batch_window.h"
#include "peer/remote_slot.h"

namespace memlend::peer {

PeerStore::PeerStore(std::uint64_t node_id, const PeerStoreOptions& options)
    : members_(node_id, options) {}

// The cache observes the sessions and goes first: end them before it does.
PeerStore::~PeerStore() { members_.EndAll(); }

std::vector<PeerInfo> PeerStore::Peers() const {
  std::vector<PeerInfo> all = members_.Peers();
  for (PeerInfo& info : all) info.pages_cached = cache_.pages_on(info.index);
  return all;
}

int PeerStore::ReserveSlot(Member& peer, std::uint32_t* sid, std::uint32_t* index,
                           unsigned* generation, std::uint32_t owner) noexcept {
  std::unique_lock lock(peer.mu);
  *generation = peer.generation.load(std::memory_order_relaxed);
  if (peer.slots.Take(owner, sid, index)) return 0;
  if (!peer.transport || peer.refusing) return -ENOSPC;
  // Ask for another superpage, once per 512 pages, without holding the peer's lock for the
  // round trip: a slow or stuck connection must not stall the threads that only release
  // slots (a write over a remote page, a trim).
  const std::shared_ptr<PeerTransport> transport = peer.transport;
  const unsigned session = *generation;
  lock.unlock();
  std::uint32_t granted = 0;
  const int rc = transport->AllocSuperpage(&granted);
  lock.lock();
  if (peer.transport != transport || peer.generation.load(std::memory_order_relaxed) != session) {
    return -ENOTCONN;  // the session ended meanwhile, and its superpages with it
  }
  if (rc == -ETIMEDOUT) return -ENOSPC;  // suspect now; a late grant stays unused
  if (rc == -ENOSPC || rc == -ESHUTDOWN) {
    peer.refusing = true;
    peer.free_pages.store(0, std::memory_order_relaxed);
    return -ENOSPC;
  }
  if (rc != 0) {
    // A broken connection may be resumed, with the superpages held there.
    if (rc == -ENOTCONN) {
      members_.BreakLocked(peer, "connection lost");
    } else {
      members_.MarkDownLocked(peer, "superpage allocation failed");
    }
    return -ENOTCONN;
  }
  if (!peer.slots.AddGranted(granted, owner)) return -ENOMEM;
  const std::uint64_t free = peer.free_pages.load(std::memory_order_relaxed);
  peer.free_pages.store(free > kPagesPerSuperpage ? free - kPagesPerSuperpage : 0,
                        std::memory_order_relaxed);
  *sid = granted;
  *index = 0;
  return 0;
}

void PeerStore::ReleaseSlot(Member& peer, std::uint32_t sid, std::uint32_t index) noexcept {
  std::shared_ptr<PeerTransport> transport;
  bool reclaimed = false;
  {
    std::lock_guard lock(peer.mu);
    const SlotAllocator::Released released = peer.slots.Release(sid, index);
    if (released != SlotAllocator::Released::kEmptied &&
        released != SlotAllocator::Released::kEmptiedReclaimed) {
      return;  // still in use, or lost with a connection that went down
    }
    reclaimed = released == SlotAllocator::Released::kEmptiedReclaimed;
    transport = peer.transport;
    if (!transport && peer.resuming) {
      // The session comes back with this superpage: free it then (Refresh sends these).
      try {
        peer.frees_pending.push_back(sid);
      } catch (const std::bad_alloc&) {
      }
      return;
    }
  }
  // The superpage is empty: give it back so the lender's count drops, without waiting for
  // the reply, or for the connection when another thread is sending on it (that send may
  // be stuck, under memory pressure, until this thread's request completes): then the
  // next Refresh sends it. The lender has room for a superpage now, whatever it said
  // before; don't wait for the next QUERY to use it.
  if (!transport) return;
  const int rc = transport->FreeSuperpageNoReply(sid, /*wait_to_send=*/false);
  std::lock_guard lock(peer.mu);
  if (peer.transport != transport) return;
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

void PeerStore::AfterFailedWrite(Member& peer, int rc) {
  if (rc != -ENOTCONN) return;
  std::lock_guard lock(peer.mu);
  // Its session may be resumed: the pages already there stay.
  if (peer.transport && !peer.transport->connected()) members_.BreakLocked(peer, "connection lost");
}

int PeerStore::Write(ConstPageSpan page, std::uint64_t hint, Slot* slot) noexcept {
  for (std::size_t attempt = 0; attempt <= peer_count(); ++attempt) {
    const int chosen = members_.Pick(hint + attempt);
    if (chosen < 0) return -ENOSPC;
    Member& peer = members_.at(static_cast<std::size_t>(chosen));
    std::uint32_t sid = 0;
    std::uint32_t index = 0;
    unsigned generation = 0;
    if (ReserveSlot(peer, &sid, &index, &generation) != 0) continue;
    std::shared_ptr<PeerTransport> transport = members_.TransportOf(peer);
    const int rc = transport ? transport->Write(sid, index * kPageBytes, page) : -ENOTCONN;
    if (rc != 0) {
      ReleaseSlot(peer, sid, index);
      AfterFailedWrite(peer, rc);
      continue;
    }
    peer.pages.fetch_add(1, std::memory_order_relaxed);
    *slot = MakeSlot(static_cast<std::size_t>(chosen), generation, sid, index);
    return 0;
  }
  return -ENOSPC;
}

std::shared_ptr<PeerTransport> PeerStore::TransportFor(Slot slot) const noexcept {
  const std::size_t index = SplitSlot(slot).peer;
  assert(index < peer_count());
  const Member& peer = members_.at(index);
  std::lock_guard lock(peer.mu);
  if (GenerationOf(slot) != peer.generation.load(std::memory_order_relaxed)) return nullptr;
  return peer.transport;
}

int PeerStore::ReadOnce(Slot slot, PageSpan out) noexcept {
  std::shared_ptr<PeerTransport> transport = TransportFor(slot);
  if (!transport) return -EIO;  // the peer, or the session holding the page, is gone
  const SlotParts parts = SplitSlot(slot);
  const int rc = transport->Read(parts.sid, parts.index * kPageBytes, out);
  return rc == 0 || rc == -ETIMEDOUT ? rc : -EIO;
}

std::size_t PeerStore::PeerIndexOf(Slot slot) noexcept { return SplitSlot(slot).peer; }

bool PeerStore::SlotReady(Slot slot) const noexcept {
  const std::shared_ptr<PeerTransport> transport = TransportFor(slot);
  return transport && transport->connected() &&
         transport->overdue_since() == std::chrono::steady_clock::time_point::min();
}

bool PeerStore::SlotGone(Slot slot) const noexcept {
  const std::size_t index = PeerIndexOf(slot);
  if (index >= peer_count()) return true;
  const Member& peer = members_.at(index);
  std::lock_guard lock(peer.mu);
  return GenerationOf(slot) != peer.generation.load(std::memory_order_relaxed) ||
         !peer.transport;
}

bool PeerStore::AdoptSlot(Slot slot, std::uint32_t owner) noexcept {
  const SlotParts parts = SplitSlot(slot);
  if (parts.peer >= peer_count()) return false;
  Member& peer = members_.at(parts.peer);
  std::lock_guard lock(peer.mu);
  if (GenerationOf(slot) != peer.generation.load(std::memory_order_relaxed)) return false;
  if (!peer.slots.Adopt(parts.sid, parts.index, owner)) return false;
  peer.pages.fetch_add(1, std::memory_order_relaxed);
  return true;
}

bool PeerStore::AwaitResume(Slot slot) noexcept {
  const std::size_t index = PeerIndexOf(slot);
  if (index >= peer_count()) return false;
  return members_.AwaitResume(members_.at(index), GenerationOf(slot));
}

int PeerStore::Read(Slot slot, PageSpan out) noexcept {
  const SlotParts parts = SplitSlot(slot);
  bool waited = false;  // for a resume, once
  for (;;) {
    std::shared_ptr<PeerTransport> transport = TransportFor(slot);
    const int rc = transport ? transport->Read(parts.sid, parts.index * kPageBytes, out) : -EIO;
    if (rc == 0) return 0;
    if (rc != -ETIMEDOUT) {
      // The peer, or the session holding the page, is gone, unless the session is resumed.
      if (waited || !AwaitResume(slot)) return -EIO;
      waited = true;
      continue;
    }
    // Overdue. The page has no other copy: ask again while the peer may still answer.
    if (members_.OverdueTooLong(*transport)) {
      members_.MarkDownIf(members_.at(parts.peer), transport.get(), members_.OverdueReason());
      return -EIO;
    }
  }
}

void PeerStore::ReadBatch(std::span<const Slot> slots, std::span<std::byte* const> outs,
                          std::span<int> results) noexcept {
  ReadBatchOnce(slots, outs, results);
  // An overdue read is asked again, alone, until the peer answers or is down; so is one whose
  // connection broke, once its session is resumed.
  for (std::size_t i = 0; i < slots.size(); ++i) {
    if (results[i] != 0) results[i] = Read(slots[i], PageSpan(outs[i], kPageSize));
  }
}

void PeerStore::ReadBatchOnce(std::span<const Slot> slots, std::span<std::byte* const> outs,
                              std::span<int> results) noexcept {
  for (std::size_t base = 0; base < slots.size(); base += kWindow) {
    const std::size_t count = std::min(kWindow, slots.size() - base);
    PendingRequest pending[kWindow];
    std::size_t peer_of[kWindow];
    SlotParts parts[kWindow];
    std::size_t leader[kWindow];  // the request whose READ carries this page
    for (std::size_t i = 0; i < count; ++i) {
      parts[i] = SplitSlot(slots[base + i]);
      peer_of[i] = parts[i].peer;
      assert(peer_of[i] < peer_count());
      pending[i].out = std::span<std::byte>(outs[base + i], kPageSize);
    }
    // The transports must outlive the waits below (a waiter reads replies through them).
    std::shared_ptr<PeerTransport> transports[kWindow];
    std::size_t transport_count = 0;
    ForEachPeerGroup(peer_of, count, [&](std::size_t index, std::span<const std::size_t> group) {
      std::shared_ptr<PeerTransport> transport;
      unsigned generation;
      {
        const Member& peer = members_.at(index);
        std::lock_guard lock(peer.mu);
        transport = peer.transport;
        generation = peer.generation.load(std::memory_order_relaxed);
      }
      std::optional<RequestBatch> batch;
      if (transport) batch.emplace(*transport);
      transports[transport_count++] = transport;
      // Pages next to each other both in a superpage and in memory go as one READ.
      std::size_t run = kWindow;  // the first request of the run being built, if any
      auto end_run = [&] {
        if (run == kWindow) return;
        batch->AddRead(parts[run].sid, parts[run].index * kPageBytes, &pending[run]);
        run = kWindow;
      };
      for (const std::size_t i : group) {
        leader[i] = i;
        if (!batch || GenerationOf(slots[base + i]) != generation) {
          CompleteNow(pending[i], -EIO);
          continue;
        }
        if (run != kWindow && parts[i].sid == parts[run].sid &&
            pending[run].out.data() + pending[run].out.size() == outs[base + i] &&
            parts[i].index == parts[run].index + pending[run].out.size() / kPageBytes) {
          pending[run].out = std::span<std::byte>(pending[run].out.data(),
                                                  pending[run].out.size() + kPageBytes);
          leader[i] = run;
          continue;
        }
        end_run();
        run = i;
      }
      end_run();
    });  // each batch is sent as it goes out of scope
    for (std::size_t i = 0; i < count; ++i) {
      const int rc = PeerTransport::Wait(&pending[leader[i]]);
      results[base + i] = rc == 0 || rc == -ETIMEDOUT ? rc : -EIO;
    }
  }
}

void PeerStore::WriteBatchFor(std::span<const std::byte* const> pages,
                              std::span<const std::uint64_t> hints,
                              std::span<const std::uint32_t> owners,
                              std::span<const PeerMask> excludes, std::span<Slot> slots,
                              std::span<int> results) noexcept {
  constexpr std::size_t kNone = kMaxPeers;  // pages with no peer: a group that sends nothing
  for (std::size_t base = 0; base < pages.size(); base += kWindow) {
    const std::size_t count = std::min(kWindow, pages.size() - base);
    PendingRequest pending[kWindow];
    std::uint32_t sids[kWindow];
    std::uint32_t indexes[kWindow];
    unsigned generations[kWindow];
    std::size_t peer_of[kWindow];
    for (std::size_t i = 0; i < count; ++i) {
      const int chosen =
          members_.Pick(hints[base + i], excludes.empty() ? nullptr : &excludes[base + i]);
      const int rc = chosen < 0 ? -ENOSPC
                                : ReserveSlot(members_.at(static_cast<std::size_t>(chosen)),
                                              &sids[i], &indexes[i], &generations[i],
                                              owners.empty() ? 0 : owners[base + i]);
      if (rc != 0) CompleteNow(pending[i], -ENOSPC);
      peer_of[i] = rc != 0 ? kNone : static_cast<std::size_t>(chosen);
    }
    // The transports must outlive the waits below (a waiter reads replies through them).
    std::shared_ptr<PeerTransport> transports[kWindow];
    std::size_t transport_count = 0;
    std::size_t leader[kWindow];  // the request whose WRITE carries this page
    std::size_t run_pages[kWindow];
    for (std::size_t i = 0; i < count; ++i) leader[i] = i;
    ForEachPeerGroup(peer_of, count, [&](std::size_t index, std::span<const std::size_t> group) {
      if (index == kNone) return;
      std::shared_ptr<PeerTransport> transport = members_.TransportOf(members_.at(index));
      std::optional<RequestBatch> batch;
      if (transport) batch.emplace(*transport);
      transports[transport_count++] = transport;
      if (!batch) {
        for (const std::size_t i : group) CompleteNow(pending[i], -ENOTCONN);
        return;
      }
      // Pages next to each other both in memory and in a superpage go as one WRITE.
      std::size_t run = kWindow;
      auto end_run = [&] {
        if (run == kWindow) return;
        batch->AddWrite(sids[run], indexes[run] * kPageBytes,
                        std::span<const std::byte>(pages[base + run], run_pages[run] * kPageSize),
                        &pending[run]);
        run = kWindow;
      };
      for (const std::size_t i : group) {
        if (run != kWindow && sids[i] == sids[run] && generations[i] == generations[run] &&
            indexes[i] == indexes[run] + run_pages[run] &&
            pages[base + i] == pages[base + run] + run_pages[run] * kPageSize) {
          ++run_pages[run];
          leader[i] = run;
          continue;
        }
        end_run();
        run = i;
        run_pages[i] = 1;
      }
      end_run();
    });
    for (std::size_t i = 0; i < count; ++i) {
      const int rc = PeerTransport::Wait(&pending[leader[i]]);
      if (peer_of[i] != kNone) {
        Member& peer = members_.at(peer_of[i]);
        if (rc == 0) {
          peer.pages.fetch_add(1, std::memory_order_relaxed);
          slots[base + i] = MakeSlot(peer_of[i], generations[i], sids[i], indexes[i]);
        } else {
          ReleaseSlot(peer, sids[i], indexes[i]);
          AfterFailedWrite(peer, rc);
        }
      }
      results[base + i] = rc == 0 ? 0 : -ENOSPC;  // the caller places it elsewhere
    }
  }
}

void PeerStore::Pin(Slot slot) noexcept {
  const SlotParts parts = SplitSlot(slot);
  Member& peer = members_.at(parts.peer);
  std::lock_guard lock(peer.mu);
  if (GenerationOf(slot) != peer.generation.load(std::memory_order_relaxed)) return;
  if (!peer.slots.Pin(parts.sid, parts.index)) {
    // Pin cannot fail. Without the pin a racing discard could recycle the slot before
    // the batched read, which would then return another page's bytes; say so loudly.
    LogError("peer store: out of memory pinning a page");
  }
}

void PeerStore::Unpin(Slot slot) noexcept {
  const SlotParts parts = SplitSlot(slot);
  Member& peer = members_.at(parts.peer);
  bool release = false;
  {
    std::lock_guard lock(peer.mu);
    if (GenerationOf(slot) != peer.generation.load(std::memory_order_relaxed)) return;
    release = peer.slots.Unpin(parts.sid, parts.index);
  }
  if (release) ReleaseSlot(peer, parts.sid, parts.index);
}

void PeerStore::Discard(Slot slot) noexcept {
  const SlotParts parts = SplitSlot(slot);
  assert(parts.peer < peer_count());
  Member& peer = members_.at(parts.peer);
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
    // A batched read still needs it: release at Unpin.
    if (peer.slots.Defer(parts.sid, parts.index)) return;
  }
  ReleaseSlot(peer, parts.sid, parts.index);
}

StoreStats PeerStore::Stats() const noexcept {
  StoreStats stats;
  for (const auto& peer : members_.List()) {
    std::lock_guard lock(peer->mu);
    stats.pages += peer->pages.load(std::memory_order_relaxed);
    stats.used_bytes += peer->slots.superpages() * std::uint64_t{kSuperpageBytes};
    if (peer->transport) stats.total_bytes += peer->pool_total_bytes;
  }
  return stats;
}

}  // namespace memlend::peer
