// The state directory's state.json: what a restarted daemon needs to find and check the
// page store an earlier process left in its state segment (docs/restart.md).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "daemon/config.h"

namespace memlend {

// What every kept device records of the restarts it went through.
struct SavedRestarts {
  unsigned restarts = 0;          // daemons that took the device over
  std::uint64_t last_gap_ms = 0;  // how long the last restart left it without a server
};

struct SavedDevice {
  std::string name;
  std::uint64_t size_bytes = 0;
  int segment_id = -1;  // of the segment holding its page table
  SavedRestarts history;
};

// A device attached through ublk (memlend attach) that a restarted daemon takes over.
struct SavedAttached {
  std::string name;
  std::uint64_t size_bytes = 0;
  unsigned copies = 0;   // its redundancy
  bool disk = false;
  std::string frontend = "ublk";  // ublk | nbd
  int ublk_dev_id = -1;  // N of /dev/ublkbN, or of /dev/nbdN
  int segment_id = -1;   // of the segment holding its page table
  SavedRestarts history;
};

// A lender's session (Membership::SessionState), in table order.
struct SavedPeer {
  std::string address;
  unsigned generation = 0;
  std::string secret_hex;  // empty: no session to resume
};

struct SavedState {
  static constexpr int kVersion = 1;
  std::uint64_t node_id = 0;
  std::uint64_t instance = 0;       // repeated in each segment's header
  int arena_segment_id = -1;        // the local store's arena
  std::uint64_t local_store_bytes = 0;
  std::string compression;          // none | lz4
  std::string backing_file;         // empty: none
  std::vector<SavedDevice> devices;
  std::vector<SavedAttached> attached;
  std::vector<SavedPeer> peers;
  std::vector<int> placement_chunks;  // segment id of each chunk of placement records
  bool sealed = false;               // pages on peers are sealed (--seal-pages)
  unsigned restarts = 0;             // daemons that took this state over
  std::uint64_t last_gap_ms = 0;     // how long the last restart left it without a server
};

// The state of a daemon started with `config`, its segments not made yet (ids -1).
SavedState StateFor(const DaemonConfig& config, std::uint64_t instance);

// Reads DIR/state.json: nullopt when there is none. Throws std::runtime_error with one line
// naming the file when it cannot be read or is not a state file of this version.
std::optional<SavedState> LoadState(const std::string& dir);
// Writes DIR/state.json whole (a temporary file, fsync, rename), making DIR if needed.
// Throws std::runtime_error naming the file on failure.
void SaveState(const std::string& dir, const SavedState& state);
// Removes DIR/state.json (not DIR itself).
void RemoveState(const std::string& dir) noexcept;
// The first way `config` differs from what `saved` was made with (local store, compression,
// backing file, devices), as a phrase; empty when they agree.
std::string CompareState(const SavedState& saved, const DaemonConfig& config);

}  // namespace memlend
