// How much memory this host can give the daemon, and the one rule every reservation
// (local store, lent pool, an attached device's page table) is checked against.
//
// A reservation the host cannot hold does not fail when it is made: the mappings are
// MAP_NORESERVE, so it fails later, as the pages fill, when the kernel's OOM killer picks
// some process of the host (`--local-store 1T` on a 24 GiB host did exactly that). So the
// daemon refuses such sizes at startup, saying what it could have, unless told --force.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace memlend {

inline constexpr std::uint64_t kNoLimit = std::numeric_limits<std::uint64_t>::max();

struct HostMemory {
  std::uint64_t total_bytes = 0;          // MemTotal
  // What this process may lock: RLIMIT_MEMLOCK, or kNoLimit with CAP_IPC_LOCK or an
  // unlimited RLIMIT_MEMLOCK.
  std::uint64_t lock_limit_bytes = kNoLimit;
};

// Reads MemTotal (/proc/meminfo), RLIMIT_MEMLOCK and this process's capabilities. A value
// that cannot be read is left at "no limit".
HostMemory ReadHostMemory();

// MemAvailable (/proc/meminfo): what the host can still give without swapping; nullopt
// when it cannot be read.
std::optional<std::uint64_t> ReadMemAvailable();

// Memory pressure (PSI, /proc/pressure/memory): the share of the last 10 s, in percent, in
// which some task waited for memory ("some avg10"). ParseMemoryPressure reads it from the
// file's text; nullopt when the line is missing or malformed (a kernel without PSI has no
// file at all: ReadMemoryPressure returns nullopt then too).
std::optional<double> ParseMemoryPressure(std::string_view text);
std::optional<double> ReadMemoryPressure();

// True when the process has CAP_IPC_LOCK in its effective set.
bool HasCapIpcLock();

// What the rest of the host keeps: the larger of 1 GiB and a tenth of MemTotal, but at most
// a quarter of it (a small machine, a VM of 1 GiB say, still lends or serves some).
std::uint64_t HostMargin(const HostMemory& host);

// One part of a reservation, for the message: e.g. {"--local-store", 2 GiB}.
struct Reservation {
  std::string what;
  std::uint64_t bytes = 0;
};

// "" when the parts together fit: at most MemTotal less HostMargin, and, when the memory
// is to be locked (`lock`), at most lock_limit_bytes. Otherwise one line that names the
// parts, their sum, what the host allows and why, and the ways out (less, --force; for
// the lock limit also `ulimit -l`, CAP_IPC_LOCK or --no-mlock).
std::string CheckReservation(const HostMemory& host, bool lock,
                             const std::vector<Reservation>& parts);

}  // namespace memlend
