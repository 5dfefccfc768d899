// Helpers shared by the remote tier's batched calls (PeerStore, EphemeralCache).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <span>

#include "peer/peer_transport.h"

namespace memlend::peer {

// Batched calls keep at most this many requests in flight: a batch that big costs one
// round trip (a swap-out of 64 pages with two copies each, or a read with the pages
// fetched ahead of it).
inline constexpr std::size_t kWindow = 256;

// Completes a request that was never sent, so that waiting for it returns `error` at once.
inline void CompleteNow(PendingRequest& pending, int error) {
  pending.result = error;
  pending.done.store(true, std::memory_order_release);
}

// Calls fn(peer, indexes) once per distinct peer in peer_of[0..count), count <= kWindow,
// with the indexes of the requests that go to it, in order.
template <typename Fn>
void ForEachPeerGroup(const std::size_t* peer_of, std::size_t count, Fn fn) {
  std::size_t order[kWindow];
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

}  // namespace memlend::peer
