// The control API: how `memlend` commands talk to a running daemon.
//
// Transport: a unix stream socket (the daemon's --control path). The client sends one
// request, a JSON object on one line ending in '\n'; the daemon answers with one JSON
// object on one line and closes the connection. Requests are at most kMaxControlRequest
// bytes. Every reply has "ok": true or "ok": false with "error": "<one line>".
//
// Commands ("command" field):
//   "status": reply fields
//     devices[]: {name, size_bytes, pages: {total, mapped, zero, local, disk, remote}}
//                where mapped = zero + local + disk + remote
//     local_store: {total_bytes, used_bytes, pages, compression ("none"|"lz4"),
//                   compression_ratio (stored page bytes / used_bytes; 1 when empty)}
//     disk_store: {path, pages, used_bytes, total_bytes (0: unbounded)} or null
//     node_id: this daemon's id (16 hex digits)
//     remote_store: {pages, lost_pages, copies, degraded_pages, rebuilt_copies, moved_copies,
//                   rebuild_copies_per_s, rebuild_eta_s (null unless pages are degraded; -1
//                   while no copy can be made), cached_pages, used_bytes, total_bytes} or
//                   null without --peer;
//                   devices[].pages.remote sums to pages + lost_pages
//     lending: {total_bytes (the pool's size now), target_bytes (asked for; total_bytes falls
//              to it as borrowers give superpages back), max_bytes (--lend), reclaiming_bytes,
//              reclaim_below_bytes, used_bytes, ephemeral_bytes, borrowers (sessions holding
//              memory), sessions (connections open, with or without HELLO),
//              max_borrowers} (zeros when not lending)
//     nbd: {connections, max_connections} of the --nbd socket, or null without one
//     peers[]: as for "peers"
//   "peers": reply field peers[]: {node_id, address,
//     state ("up"|"suspect"|"down"|"refusing"|"draining"|"removing"|"removed"),
//     pool_total_bytes, pool_free_bytes, pages_stored, superpages_held, superpages_reclaimed
//     (asked back by the lender, pages moving off), pages_lost, rtt_us,
//     error}
//   "attach" {name, size_bytes, frontend ("auto"|"ublk"|"nbd"|"fuse")}: creates a device
//     and a block device for it; reply fields path ("/dev/..."), frontend (the kind used)
//   "detach" {name}: removes the block device and the device; refused while in use
//   "drain" {deadline_ms}: a lender asks its borrowers to move their pages off, then exits
//   "lend" {size_bytes, reclaim_below_bytes, deadline_ms}: a lender's pool at run time: the
//     size to shrink or grow to (at most its --lend size; pages move off first, with
//     RECLAIM and `deadline_ms` for borrowers), and the MemAvailable under which it shrinks
//     (0: never); either may be left out. Reply: target_bytes, total_bytes, max_bytes,
//     reclaim_below_bytes. Progress in status's lending (total_bytes falls to target_bytes).
//   "peer_add" {address}: a borrower starts using the lender at address ("host:port" or
//     "unix:PATH"); refused if it is a peer already or the daemon has no remote tier
//   "peer_remove" {address}: a borrower moves its pages off that lender, then stops using it;
//     the peer shows "removing" in peers[] until then
//   status's devices[] also carry frontend and path (null unless attached).
//   See docs/control.md.
#pragma once

#include <cstddef>

namespace memlend {

inline constexpr std::size_t kMaxControlRequest = 64 * 1024;
inline constexpr char kControlStatus[] = "status";
inline constexpr char kControlPeers[] = "peers";
inline constexpr char kControlAttach[] = "attach";
inline constexpr char kControlDetach[] = "detach";
inline constexpr char kControlDrain[] = "drain";
inline constexpr char kControlLend[] = "lend";
inline constexpr char kControlPeerAdd[] = "peer_add";
inline constexpr char kControlPeerRemove[] = "peer_remove";

}  // namespace memlend
