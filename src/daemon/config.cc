#include "daemon/config.h"

#include <grp.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <random>
#include <utility>
#include <set>

#include "common/quote.h"
#include "common/size.h"

namespace memlend {

std::string CheckDeviceSize(std::uint64_t bytes) {
  if (bytes == 0 || bytes % kPageSize != 0) return "the size must be a positive multiple of 4 KiB";
  if (bytes > kMaxDeviceBytes) return "the size must not exceed " + FormatSize(kMaxDeviceBytes);
  return "";
}

bool ValidDeviceName(std::string_view name) {
  if (name.empty() || name.size() > 64) return false;
  for (const char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

std::optional<DeviceSpec> ParseDeviceSpec(std::string_view text, std::string* error) {
  const std::size_t colon = text.find(':');
  if (colon == std::string_view::npos) {
    *error = "--device " + Quote(text) + ": expected NAME:SIZE, e.g. swap0:4G";
    return std::nullopt;
  }
  DeviceSpec spec;
  spec.name = std::string(text.substr(0, colon));
  std::string_view size_text = text.substr(colon + 1);
  if (const std::size_t second = size_text.find(':'); second != std::string_view::npos) {
    const std::string_view protocol = size_text.substr(second + 1);
    size_text = size_text.substr(0, second);
    if (protocol == "passive") {
      spec.cache_clean_pages = false;
    } else if (protocol != "auto") {
      *error = "--device " + Quote(text) + ": unknown protocol " + Quote(protocol) +
               " (expected auto or passive)";
      return std::nullopt;
    }
  }
  if (!ValidDeviceName(spec.name)) {
    *error = "--device " + Quote(text) +
             ": the name must be 1 to 64 characters of letters, digits, '.', '_' or '-'";
    return std::nullopt;
  }
  const std::optional<std::uint64_t> size = ParseSize(size_text);
  if (!size) {
    *error = "--device " + Quote(text) + ": " + Quote(size_text) +
             " is not a size (use a number with an optional K, M, G or T suffix)";
    return std::nullopt;
  }
  if (const std::string problem = CheckDeviceSize(*size); !problem.empty()) {
    *error = "--device " + Quote(text) + ": " + problem;
    return std::nullopt;
  }
  spec.size_bytes = *size;
  return spec;
}

std::optional<mode_t> ParseSocketMode(std::string_view text) {
  if (text.empty() || text.size() > 4) return std::nullopt;
  mode_t mode = 0;
  for (const char c : text) {
    if (c < '0' || c > '7') return std::nullopt;
    mode = mode * 8 + static_cast<mode_t>(c - '0');
  }
  if (mode > 0777) return std::nullopt;
  return mode;
}

std::optional<double> ParsePercent(std::string_view text) {
  if (!text.empty() && text.back() == '%') text.remove_suffix(1);
  if (text.empty() || text.size() > 3) return std::nullopt;
  unsigned value = 0;
  for (const char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    value = value * 10 + static_cast<unsigned>(c - '0');
  }
  if (value < 1 || value > 100) return std::nullopt;
  return value / 100.0;
}

std::string RedundancyName(Redundancy redundancy) {
  if (redundancy.copies == 0) return redundancy.disk ? "disk" : "none";
  if (redundancy.copies == 1 && !redundancy.disk) return "none";
  std::string name = "replicas:" + std::to_string(redundancy.copies);
  return redundancy.disk ? name + "+disk" : name;
}

bool ParseRedundancy(const std::string& text, Redundancy* redundancy, std::string* error) {
  if (text == "none") {
    *redundancy = Redundancy{1, false};
    return true;
  }
  if (text == "disk") {
    *redundancy = Redundancy{0, true};
    return true;
  }
  constexpr std::string_view kReplicas = "replicas:";
  constexpr std::string_view kDisk = "+disk";
  std::string_view rest = text;
  const bool disk = rest.ends_with(kDisk);
  if (disk) rest.remove_suffix(kDisk.size());
  unsigned copies = 0;
  if (rest.starts_with(kReplicas)) {
    rest.remove_prefix(kReplicas.size());
    const auto [at, ec] = std::from_chars(rest.data(), rest.data() + rest.size(), copies);
    if (ec != std::errc() || at != rest.data() + rest.size()) copies = 0;
  }
  if (copies < 1 || copies > 3) {
    *error = "expected none, disk, replicas:N or replicas:N+disk with N from 1 to 3";
    return false;
  }
  *redundancy = Redundancy{copies, disk};
  return true;
}

bool RedundancyFits(Redundancy redundancy, std::size_t peers, bool backing_file,
                    std::string* error) {
  if (redundancy.disk && !backing_file) {
    *error = "redundancy " + RedundancyName(redundancy) +
             " keeps a copy of each page in the backing file, and there is none "
             "(start the daemon with --backing-file)";
    return false;
  }
  if (redundancy.copies > 1 && peers < redundancy.copies) {
    *error = "redundancy " + RedundancyName(redundancy) + " needs at least " +
             std::to_string(redundancy.copies) + " peers (--peer), and this daemon has " +
             std::to_string(peers);
    return false;
  }
  return true;
}

namespace {

// Parses a count option from `min` to `max`; an empty `text` leaves *value as it is.
bool ParseCount(const char* option, const std::string& text, unsigned min, unsigned max,
                unsigned* value, std::string* error) {
  if (text.empty()) return true;
  unsigned parsed = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), parsed);
  if (ec != std::errc() || end != text.data() + text.size() || parsed < min || parsed > max) {
    *error = std::string(option) + " " + Quote(text) + ": expected a number from " +
             std::to_string(min) + " to " + std::to_string(max);
    return false;
  }
  *value = parsed;
  return true;
}

// Resolves a group name or number.
std::optional<gid_t> LookUpGroup(const std::string& text) {
  gid_t number = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), number);
  if (ec == std::errc() && end == text.data() + text.size()) return number;
  // A group with many members (a directory service's, say) needs a large buffer.
  for (std::size_t size = 4096; size <= (std::size_t{1} << 24); size *= 4) {
    std::vector<char> buffer(size);
    group entry;
    group* found = nullptr;
    const int error = ::getgrnam_r(text.c_str(), &entry, buffer.data(), buffer.size(), &found);
    if (error == ERANGE) continue;
    if (error != 0 || found == nullptr) return std::nullopt;
    return found->gr_gid;
  }
  return std::nullopt;
}

// The lending half: --lend SIZE and --listen ADDR.
bool BuildLending(const DaemonArgs& args, DaemonConfig* config, std::string* error) {
  if (args.lend.empty()) {
    if (!args.listen.empty()) {
      *error = "--listen serves lent memory: give --lend SIZE too";
      return false;
    }
    if (!args.max_borrowers.empty()) {
      *error = "--max-borrowers applies to lent memory: give --lend SIZE too";
      return false;
    }
    if (!args.drain_deadline.empty()) {
      *error = "--drain-deadline applies to lent memory: give --lend SIZE too";
      return false;
    }
    if (!args.borrower_grace.empty()) {
      *error = "--borrower-grace applies to lent memory: give --lend SIZE too";
      return false;
    }
    if (!args.max_lend_per_borrower.empty()) {
      *error = "--max-lend-per-borrower applies to lent memory: give --lend SIZE too";
      return false;
    }
    if (!args.reclaim_below.empty() || !args.reclaim_pressure.empty()) {
      *error = std::string(args.reclaim_below.empty() ? "--reclaim-pressure" : "--reclaim-below") +
               " applies to lent memory: give --lend SIZE too";
      return false;
    }
    return true;
  }
  if (!args.reclaim_below.empty()) {
    const std::optional<std::uint64_t> below = ParseSize(args.reclaim_below);
    if (!below) {
      *error = "--reclaim-below " + Quote(args.reclaim_below) + ": expected a size (0: never)";
      return false;
    }
    config->reclaim_below_bytes = *below;
  }
  if (!args.reclaim_pressure.empty()) {
    const std::string& text = args.reclaim_pressure;
    char* end = nullptr;
    const double percent = std::strtod(text.c_str(), &end);
    // Digits and at most one point: no sign, exponent, hex or blanks.
    const bool plain = text.find_first_not_of("0123456789.") == std::string::npos &&
                       text.find('.') == text.rfind('.');
    if (!plain || end == text.c_str() || *end != '\0' || !(percent >= 0) ||
        percent > 100) {
      *error = "--reclaim-pressure " + Quote(text) +
               ": expected a percentage of time from 0 to 100 (0: never)";
      return false;
    }
    config->reclaim_pressure = percent;
  }
  if (!ParseCount("--max-borrowers", args.max_borrowers, 1, 4096, &config->max_borrowers,
                  error)) {
    return false;
  }
  unsigned drain_s = static_cast<unsigned>(config->drain_deadline_ms / 1000);
  if (!ParseCount("--drain-deadline", args.drain_deadline, 0, 3600, &drain_s, error)) return false;
  config->drain_deadline_ms = std::uint64_t{drain_s} * 1000;
  unsigned grace_s = static_cast<unsigned>(config->borrower_grace_ms / 1000);
  if (!ParseCount("--borrower-grace", args.borrower_grace, 0, 86400, &grace_s, error)) {
    return false;
  }
  config->borrower_grace_ms = std::uint64_t{grace_s} * 1000;
  if (!args.max_lend_per_borrower.empty()) {
    const std::optional<std::uint64_t> limit = ParseSize(args.max_lend_per_borrower);
    if (!limit || (*limit != 0 && *limit < (2u << 20))) {
      *error = "--max-lend-per-borrower " + Quote(args.max_lend_per_borrower) +
               ": expected a size of at least 2M (one superpage), or 0 for no limit";
      return false;
    }
    config->max_lend_per_borrower_bytes = *limit / (2u << 20) * (2u << 20);
  }
  const std::optional<std::uint64_t> lend = ParseSize(args.lend);
  if (!lend || *lend < (2u << 20)) {
    *error = "--lend " + Quote(args.lend) + ": expected a size of at least 2M (one superpage)";
    return false;
  }
  config->lend_bytes = *lend;
  if (args.listen.empty()) {
    *error = "--lend needs --listen HOST:PORT for borrowers to connect to";
    return false;
  }
  std::string reason;
  std::optional<Endpoint> listen = ParseEndpoint(args.listen, &reason);
  if (!listen) {
    *error = "--listen " + Quote(args.listen) + ": " + reason;
    return false;
  }
  config->listen = std::move(*listen);
  return true;
}

}  // namespace

bool BuildDaemonConfig(const DaemonArgs& args, DaemonConfig* config, std::string* error) {
  if (!args.node_id.empty()) {
    std::uint64_t id = 0;
    const auto [end, ec] =
        std::from_chars(args.node_id.data(), args.node_id.data() + args.node_id.size(), id, 16);
    if (ec != std::errc() || end != args.node_id.data() + args.node_id.size() || id == 0 ||
        args.node_id.size() > 16) {
      *error = "--node-id " + Quote(args.node_id) + ": expected 1 to 16 hex digits, not all zero";
      return false;
    }
    config->node_id = id;
  } else {
    std::random_device random;
    config->node_id = (std::uint64_t{random()} << 32 | random()) | 1;
  }
  if (!BuildLending(args, config, error)) return false;

  config->lock_memory = !args.no_mlock;
  config->force = args.force;
  config->seal_pages = args.seal_pages;
  if (args.seal_pages && args.peers.empty()) {
    *error = "--seal-pages seals the pages that go to lenders: give --peer HOST:PORT too";
    return false;
  }
  if (args.devices.empty() && args.local_store.empty()) {
    if (config->lend_bytes == 0) {
      *error = "nothing to do: give --device NAME:SIZE to serve a device, --local-store SIZE to "
               "attach devices at runtime (memlend attach), or --lend SIZE to lend memory";
      return false;
    }
    for (const auto& [given, name] :
         {std::pair{!args.nbd.empty(), "--nbd"}, {!args.peers.empty(), "--peer"},
          {!args.backing_file.empty(), "--backing-file"},
          {!args.state_dir.empty(), "--state-dir"},
          {!args.on_exit.empty(), "--on-exit"},
          {args.keep_devices, "--keep-devices"},
          {!args.max_connections.empty(), "--max-connections"},
          {!args.socket_mode.empty(), "--socket-mode"},
          {!args.socket_group.empty(), "--socket-group"}}) {
      if (given) {
        *error = std::string(name) +
                 " applies to devices: give at least one --device NAME:SIZE, or --local-store "
                 "SIZE to attach devices at runtime";
        return false;
      }
    }
    config->control_path = args.control.empty() ? DefaultControlPath() : args.control;
    return true;
  }
  if (args.local_store.empty()) {
    *error = "--local-store SIZE is required with --device";
    return false;
  }
  if (!args.devices.empty() && args.nbd.empty()) {
    *error = "--nbd ADDR is required with --device";
    return false;
  }
  std::set<std::string> names;
  for (const std::string& text : args.devices) {
    std::optional<DeviceSpec> spec = ParseDeviceSpec(text, error);
    if (!spec) return false;
    if (!names.insert(spec->name).second) {
      *error = "--device: the name " + Quote(spec->name) + " is used twice";
      return false;
    }
    config->devices.push_back(std::move(*spec));
  }

  std::string reason;
  if (!args.nbd.empty()) {
    std::optional<Endpoint> nbd = ParseEndpoint(args.nbd, &reason);
    if (!nbd) {
      *error = "--nbd " + Quote(args.nbd) + ": " + reason;
      return false;
    }
    config->nbd = std::move(*nbd);
    config->serve_nbd = true;
  }
  if (!ParseCount("--max-connections", args.max_connections, 1, 4096, &config->max_connections,
                  error)) {
    return false;
  }
  if (!args.socket_mode.empty() || !args.socket_group.empty()) {
    if (!config->serve_nbd || config->nbd.kind != Endpoint::Kind::kUnix) {
      *error = std::string(args.socket_mode.empty() ? "--socket-group" : "--socket-mode") +
               " applies to a unix socket: give --nbd unix:PATH";
      return false;
    }
  }
  if (!args.socket_mode.empty()) {
    const std::optional<mode_t> mode = ParseSocketMode(args.socket_mode);
    if (!mode) {
      *error = "--socket-mode " + Quote(args.socket_mode) +
               ": expected permission bits in octal, e.g. 0660";
      return false;
    }
    config->nbd_access.mode = *mode;
  }
  if (!args.socket_group.empty()) {
    const std::optional<gid_t> group = LookUpGroup(args.socket_group);
    if (!group) {
      *error = "--socket-group " + Quote(args.socket_group) + ": no such group";
      return false;
    }
    config->nbd_access.group = *group;
  }

  const std::optional<std::uint64_t> local = ParseSize(args.local_store);
  if (!local || *local < kPageSize) {
    *error = "--local-store " + Quote(args.local_store) + ": expected a size of at least 4K";
    return false;
  }
  config->local_store_bytes = *local;

  config->backing_file = args.backing_file;
  if (!args.backing_size.empty()) {
    const std::optional<std::uint64_t> bound = ParseSize(args.backing_size);
    if (!bound || *bound < kPageSize) {
      *error = "--backing-size " + Quote(args.backing_size) + ": expected a size of at least 4K";
      return false;
    }
    if (args.backing_file.empty()) {
      *error = "--backing-size needs --backing-file";
      return false;
    }
    config->backing_size_bytes = *bound;
  }
  if (args.backing_direct && args.backing_file.empty()) {
    *error = "--backing-direct needs --backing-file";
    return false;
  }
  config->backing_direct = args.backing_direct;

  config->state_dir = args.state_dir;
  if (!args.on_exit.empty() && args.on_exit != "keep" && args.on_exit != "detach") {
    *error = "--on-exit " + Quote(args.on_exit) + ": expected keep or detach";
    return false;
  }
  if (args.keep_devices && args.on_exit == "detach") {
    *error = "--keep-devices and --on-exit detach contradict each other";
    return false;
  }
  config->keep_state_on_exit = args.on_exit == "keep" || args.keep_devices;
  if (config->keep_state_on_exit && config->state_dir.empty()) {
    *error = "--on-exit keep needs --state-dir DIR, where the next daemon finds the pages";
    return false;
  }

  if (args.compress == "none") {
    config->compression = Compression::kNone;
  } else if (args.compress == "lz4") {
    config->compression = Compression::kLz4;
  } else {
    *error = "--compress " + Quote(args.compress) + ": expected none or lz4";
    return false;
  }

  if (args.busy_poll_us > 1000000) {
    *error = "--busy-poll " + std::to_string(args.busy_poll_us) +
             ": at most 1000000 microseconds";
    return false;
  }
  config->busy_poll_us = args.busy_poll_us;

  if (!ParseCount("--peer-timeout", args.peer_timeout, 10, 60000, &config->peer_timeout_ms,
                  error) ||
      !ParseCount("--peer-down-after", args.peer_down_after, 100, 600000,
                  &config->peer_down_after_ms, error)) {
    return false;
  }
  if (config->peer_down_after_ms < config->peer_timeout_ms) {
    *error = "--peer-down-after " + std::to_string(config->peer_down_after_ms) +
             " is shorter than --peer-timeout " + std::to_string(config->peer_timeout_ms) +
             ": a peer is down only after it missed at least one deadline";
    return false;
  }
  for (const std::string& text : args.peers) {
    std::optional<Endpoint> peer = ParseEndpoint(text, &reason);
    if (!peer) {
      *error = "--peer " + Quote(text) + ": " + reason;
      return false;
    }
    config->peers.push_back(std::move(*peer));
  }
  if (!ParseCount("--rebuild-rate", args.rebuild_rate, 10, 10000000, &config->rebuild_rate,
                  error)) {
    return false;
  }
  if (args.redundancy.empty()) {
    if (config->peers.size() >= 2) {
      config->redundancy = Redundancy{2, false};
    } else if (!config->backing_file.empty()) {
      config->redundancy = Redundancy{0, true};
    } else {
      config->redundancy = Redundancy{1, false};
    }
  } else {
    config->redundancy_given = true;
    if (!ParseRedundancy(args.redundancy, &config->redundancy, &reason)) {
      *error = "--redundancy " + Quote(args.redundancy) + ": " + reason;
      return false;
    }
    if (!RedundancyFits(config->redundancy, config->peers.size(),
                        !config->backing_file.empty(), &reason)) {
      *error = "--redundancy " + args.redundancy + ": " + reason;
      return false;
    }
  }
  const std::optional<double> high = ParsePercent(args.high_watermark);
  const std::optional<double> low = ParsePercent(args.low_watermark);
  if (!high || !low) {
    *error = std::string(high ? "--low-watermark " + Quote(args.low_watermark)
                              : "--high-watermark " + Quote(args.high_watermark)) +
             ": expected a percentage from 1 to 100";
    return false;
  }
  if (*low > *high) {
    *error = "--low-watermark " + Quote(args.low_watermark) +
             " must not exceed --high-watermark " + Quote(args.high_watermark);
    return false;
  }
  config->high_watermark = *high;
  config->low_watermark = *low;

  config->control_path = args.control.empty() ? DefaultControlPath() : args.control;
  if (!ParseEndpoint("unix:" + config->control_path, &reason)) {
    *error = "--control " + Quote(config->control_path) + ": " + reason;
    return false;
  }
  return true;
}

std::string DefaultControlPath() {
  if (const char* path = std::getenv("MEMLEND_CONTROL"); path != nullptr && *path != '\0') {
    return path;
  }
  if (::geteuid() == 0) return "/run/memlend.sock";
  const char* runtime = std::getenv("XDG_RUNTIME_DIR");
  const std::string dir = runtime != nullptr && *runtime != '\0' ? runtime : "/tmp";
  return dir + "/memlend-" + std::to_string(::geteuid()) + ".sock";
}

}  // namespace memlend
