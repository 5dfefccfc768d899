// DaemonConfig: everything `memlend daemon` is told on its command line, validated.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "store/local_store.h"
#include "transport/socket.h"

namespace memlend {

struct DeviceSpec {
  std::string name;
  std::uint64_t size_bytes = 0;
  // Which remote protocol carries the device's pages (docs/placement.md): "auto" sends
  // dirty pages through the passive protocol and caches clean pages (those with a valid
  // disk copy) in the lenders' ephemeral pools through the active protocol; "passive"
  // uses only the passive protocol, so clean pages are dropped back to their disk copy.
  bool cache_clean_pages = true;
};

struct DaemonConfig {
  std::uint64_t node_id = 0;            // this daemon's identity among peers
  // Borrowing side: devices, served over NBD (when serve_nbd) and attached as block
  // devices at runtime (`memlend attach`), backed by the tiers below. A daemon serves
  // devices when local_store_bytes > 0, even with no --device.
  std::vector<DeviceSpec> devices;
  bool serve_nbd = false;               // --nbd given
  Endpoint nbd;
  UnixSocketAccess nbd_access;          // --socket-mode, --socket-group (a unix --nbd)
  unsigned max_connections = 64;        // NBD connections at once, per NBD socket
  std::uint64_t local_store_bytes = 0;  // 0: no local store, no devices (lend only)
  // Lock the daemon's memory (mlockall) and mark it an I/O flusher at startup, and serve
  // kernel NBD requests under SCHED_FIFO, so that serving a swap device, or lending to one,
  // cannot deadlock under memory pressure. --no-mlock clears it.
  bool lock_memory = true;
  std::string backing_file;             // empty: no disk tier
  std::uint64_t backing_size_bytes = 0; // 0: bounded only by the file system
  bool backing_direct = false;          // open the backing file with O_DIRECT
  // Where the page store's state is kept across restarts (docs/restart.md); empty: nowhere.
  std::string state_dir;
  bool keep_state_on_exit = false;      // --on-exit keep
  Compression compression = Compression::kNone;
  std::string control_path;
  std::uint32_t busy_poll_us = 50;
  std::vector<Endpoint> peers;          // lenders to borrow from
  // What devices keep of each page that leaves the host (their default redundancy).
  // Decided from --redundancy, else replicas:2 with at least two peers, else disk with a
  // backing file, else none.
  Redundancy redundancy;
  bool redundancy_given = false;        // --redundancy was given (else: the default rule)
  unsigned rebuild_rate = 5000;         // pages a second the rebuild copies at most
  unsigned peer_timeout_ms = 500;       // each peer request's deadline, and the heartbeat
  unsigned peer_down_after_ms = 5000;   // overdue this long: the peer is down
  double high_watermark = 0.90;         // local-store use that starts eviction
  double low_watermark = 0.80;          // eviction stops below this
  // Lending side: 0 lends nothing.
  std::uint64_t lend_bytes = 0;
  Endpoint listen;                      // where lenders serve the peer protocol
  unsigned max_borrowers = 32;          // borrower connections at once
  std::uint64_t max_lend_per_borrower_bytes = 0;  // whole superpages; 0: no limit
  // How long a lender keeps a borrower's memory after its connection ends, for it to resume.
  std::uint64_t borrower_grace_ms = 60000;
  // How long a lender leaving (SIGTERM) waits for its borrowers to move their pages off.
  std::uint64_t drain_deadline_ms = 30000;
  // Shrink the pool while the host's MemAvailable is under this (0: never); see
  // docs/remote-tier.md, "Reclaim".
  std::uint64_t reclaim_below_bytes = 0;
  // Shrink the pool while the host's memory pressure (PSI "some avg10", percent) is at or
  // above this (0: never).
  double reclaim_pressure = 0;
  // Reserve memory even past what the host can hold (see host_memory.h). --force.
  bool force = false;
  // Seal every page before it goes to a peer (AES-256-GCM, docs/security.md). --seal-pages.
  bool seal_pages = false;
};

// "none", "replicas:N", "disk" or "replicas:N+disk".
std::string RedundancyName(Redundancy redundancy);
// Parses --redundancy: none, replicas:N, disk, replicas:N+disk (1 <= N <= 3). False with
// *error set when `text` is none of them.
bool ParseRedundancy(const std::string& text, Redundancy* redundancy, std::string* error);
// Whether a daemon with `peers` lenders and (or not) a backing file can keep `redundancy`;
// false with *error saying what is missing.
bool RedundancyFits(Redundancy redundancy, std::size_t peers, bool backing_file,
                    std::string* error);

// The text forms of the options, as given on the command line.
struct DaemonArgs {
  std::vector<std::string> devices;
  std::string nbd;
  std::string local_store;
  std::string backing_file;
  std::string backing_size;
  bool backing_direct = false;
  std::string state_dir;
  std::string on_exit;          // keep | detach; empty: detach
  bool keep_devices = false;    // --keep-devices: the same as --on-exit keep
  std::string compress = "none";
  std::string control;
  std::uint32_t busy_poll_us = 50;
  std::vector<std::string> peers;
  std::string redundancy;       // none | replicas:N | disk | replicas:N+disk; empty: default
  std::string rebuild_rate;     // pages per second; empty: the default
  std::string peer_timeout;     // milliseconds; empty: the default
  std::string peer_down_after;  // milliseconds; empty: the default
  std::string high_watermark = "90";
  std::string low_watermark = "80";
  std::string lend;
  std::string listen;
  std::string node_id;  // 16 hex digits; empty: random
  bool no_mlock = false;
  std::string max_connections;  // empty: the default
  std::string max_borrowers;    // empty: the default
  std::string max_lend_per_borrower;  // a size; empty or 0: no limit
  std::string drain_deadline;   // seconds; empty: the default
  std::string borrower_grace;   // seconds; empty: the default
  std::string reclaim_below;    // a size; empty: never
  std::string reclaim_pressure; // a percentage; empty: never
  std::string socket_mode;      // octal; empty: 0600
  std::string socket_group;     // a group name or number; empty: the daemon's
  bool force = false;
  bool seal_pages = false;
};

// Parses a percentage "1".."100" with an optional '%'; returns it as a fraction.
std::optional<double> ParsePercent(std::string_view text);

// Parses permission bits for a socket: 1 to 4 octal digits, at most 0777.
std::optional<mode_t> ParseSocketMode(std::string_view text);

// Validates `args` into *config. On failure returns false and sets *error to one line
// that names the option and the problem.
bool BuildDaemonConfig(const DaemonArgs& args, DaemonConfig* config, std::string* error);

// Parses NAME:SIZE[:PROTOCOL]. Names are 1-64 characters of [A-Za-z0-9._-]; SIZE is a
// positive multiple of 4 KiB; PROTOCOL is auto (the default) or passive. On failure
// returns nullopt and sets *error.
std::optional<DeviceSpec> ParseDeviceSpec(std::string_view text, std::string* error);

// True when `name` can name a device: 1 to 64 characters of [A-Za-z0-9._-].
bool ValidDeviceName(std::string_view name);

// The largest device: 16 TiB (an attached device's page table, 16 bytes per 4 KiB page, is
// allocated and locked at attach).
inline constexpr std::uint64_t kMaxDeviceBytes = std::uint64_t{16} << 40;

// "" when `bytes` can be a device's size: a positive multiple of 4 KiB, at most
// kMaxDeviceBytes; else the reason it cannot, as a sentence part. The one size rule of
// --device, `memlend attach` and the control API.
std::string CheckDeviceSize(std::uint64_t bytes);

// The control socket path used when --control is not given: $MEMLEND_CONTROL if set,
// /run/memlend.sock for root, else ${XDG_RUNTIME_DIR:-/tmp}/memlend-UID.sock.
std::string DefaultControlPath();

}  // namespace memlend
