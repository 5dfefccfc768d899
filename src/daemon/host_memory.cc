#include "daemon/host_memory.h"

#include <sys/resource.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "common/size.h"

namespace memlend {

bool HasCapIpcLock() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("CapEff:", 0) == 0) {
      try {
        const std::uint64_t caps = std::stoull(line.substr(7), nullptr, 16);
        return (caps >> 14) & 1;  // CAP_IPC_LOCK
      } catch (const std::exception&) {
        return false;
      }
    }
  }
  return false;
}

namespace {

// A field of /proc/meminfo ("MemTotal:", say) in bytes, or nullopt.
std::optional<std::uint64_t> MeminfoBytes(const std::string& field) {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  std::uint64_t value = 0;
  std::string unit;
  while (meminfo >> key >> value) {
    std::getline(meminfo, unit);
    if (key == field) return value * 1024;  // the kernel's "kB" are KiB
  }
  return std::nullopt;
}

}  // namespace

HostMemory ReadHostMemory() {
  HostMemory host;
  host.total_bytes = MeminfoBytes("MemTotal:").value_or(kNoLimit);
  rlimit limit{};
  if (!HasCapIpcLock() && ::getrlimit(RLIMIT_MEMLOCK, &limit) == 0 &&
      limit.rlim_cur != RLIM_INFINITY) {
    host.lock_limit_bytes = limit.rlim_cur;
  }
  return host;
}

std::optional<std::uint64_t> ReadMemAvailable() { return MeminfoBytes("MemAvailable:"); }

std::optional<double> ParseMemoryPressure(std::string_view text) {
  // "some avg10=1.23 avg60=0.50 avg300=0.10 total=12345"
  std::istringstream lines{std::string(text)};
  std::string line;
  while (std::getline(lines, line)) {
    if (line.rfind("some ", 0) != 0) continue;
    const std::size_t field = line.find(" avg10=");
    if (field == std::string::npos) return std::nullopt;
    const char* const start = line.c_str() + field + 7;
    char* end = nullptr;
    const double percent = std::strtod(start, &end);
    if (end == start || (*end != ' ' && *end != '\0') || !(percent >= 0) || percent > 100) {
      return std::nullopt;
    }
    return percent;
  }
  return std::nullopt;
}

std::optional<double> ReadMemoryPressure() {
  std::ifstream file("/proc/pressure/memory");
  if (!file) return std::nullopt;
  std::ostringstream text;
  text << file.rdbuf();
  return ParseMemoryPressure(text.str());
}

std::uint64_t HostMargin(const HostMemory& host) {
  if (host.total_bytes == kNoLimit) return 0;
  return std::min(std::max<std::uint64_t>(std::uint64_t{1} << 30, host.total_bytes / 10),
                  host.total_bytes / 4);
}

std::string CheckReservation(const HostMemory& host, bool lock,
                             const std::vector<Reservation>& parts) {
  std::uint64_t sum = 0;
  std::string listed;
  for (const Reservation& part : parts) {
    if (part.bytes == 0) continue;
    sum = part.bytes > kNoLimit - sum ? kNoLimit : sum + part.bytes;
    listed += (listed.empty() ? "" : ", ") + part.what + " " + FormatSize(part.bytes);
  }
  const std::uint64_t margin = HostMargin(host);
  const std::uint64_t host_room = host.total_bytes == kNoLimit ? kNoLimit
                                  : host.total_bytes > margin  ? host.total_bytes - margin
                                                               : 0;
  std::ostringstream message;
  if (sum > host_room) {
    message << "reserving " << FormatSize(sum) << " (" << listed << ") is more than this host "
            << "can hold: at most " << FormatSize(host_room) << " (MemTotal "
            << FormatSize(host.total_bytes) << " less " << FormatSize(margin)
            << " kept for the rest of the host); reserve less, or pass --force";
    return message.str();
  }
  if (lock && sum > host.lock_limit_bytes) {
    message << "reserving " << FormatSize(sum) << " (" << listed << ") is more than this "
            << "process may lock: at most " << FormatSize(host.lock_limit_bytes)
            << " (RLIMIT_MEMLOCK, without CAP_IPC_LOCK); raise `ulimit -l`, give it "
            << "CAP_IPC_LOCK, reserve less, pass --no-mlock (not for swap), or --force";
    return message.str();
  }
  return "";
}

}  // namespace memlend
