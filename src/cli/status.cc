#include "cli/status.h"

#include <cstdio>

#include "common/size.h"

namespace memlend {

namespace {

std::uint64_t U64(const nlohmann::json& object, const char* key) {
  return object.at(key).get<std::uint64_t>();
}

}  // namespace

std::string FormatStatus(const nlohmann::json& status) {
  std::string text;
  char line[512];
  std::snprintf(line, sizeof(line), "node %s\n", status.value("node_id", "?").c_str());
  text += line;

  const nlohmann::json& lending = status.at("lending");
  if (U64(lending, "total_bytes") > 0) {
    std::snprintf(line, sizeof(line), "lending:     %s of %s lent to %llu borrower(s)\n",
                  FormatSize(U64(lending, "used_bytes")).c_str(),
                  FormatSize(U64(lending, "total_bytes")).c_str(),
                  static_cast<unsigned long long>(U64(lending, "borrowers")));
    text += line;
    const std::uint64_t limit = U64(lending, "max_lend_per_borrower_bytes");
    if (lending.contains("by_borrower")) {
      for (const nlohmann::json& borrower : lending.at("by_borrower")) {
        std::snprintf(line, sizeof(line), "             node %s holds %s (%llu session(s))%s%s\n",
                      borrower.value("node_id", "?").c_str(),
                      FormatSize(U64(borrower, "pages") * 4096).c_str(),
                      static_cast<unsigned long long>(U64(borrower, "sessions")),
                      limit > 0 ? " of at most " : "",
                      limit > 0 ? FormatSize(limit).c_str() : "");
        text += line;
      }
    }
    if (lending.contains("parked")) {
      for (const nlohmann::json& parked : lending.at("parked")) {
        std::snprintf(line, sizeof(line),
                      "             kept for node %s: %s, freed in %llu s unless it comes back\n",
                      parked.value("node_id", "?").c_str(),
                      FormatSize(U64(parked, "pages") * 4096).c_str(),
                      static_cast<unsigned long long>(U64(parked, "seconds_left")));
        text += line;
      }
    }
  }

  if (status.contains("state") && !status.at("state").is_null()) {
    const nlohmann::json& state = status.at("state");
    std::snprintf(line, sizeof(line), "state:       %s, %llu device(s) outlive the daemon",
                  state.value("dir", "?").c_str(),
                  static_cast<unsigned long long>(U64(state, "kept_devices")));
    text += line;
    if (U64(state, "restarts") > 0) {
      std::snprintf(line, sizeof(line),
                    "; taken over %llu time(s), the last after %llu ms without a server",
                    static_cast<unsigned long long>(U64(state, "restarts")),
                    static_cast<unsigned long long>(U64(state, "last_gap_ms")));
      text += line;
    }
    text += "\n";
  }

  const nlohmann::json& local = status.at("local_store");
  if (local.is_null()) return text + "no devices (this daemon only lends)\n";
  std::snprintf(line, sizeof(line), "local store: %s of %s used, %llu pages, compression %s",
                FormatSize(U64(local, "used_bytes")).c_str(),
                FormatSize(U64(local, "total_bytes")).c_str(),
                static_cast<unsigned long long>(U64(local, "pages")),
                local.at("compression").get<std::string>().c_str());
  text += line;
  if (local.at("compression").get<std::string>() != "none") {
    std::snprintf(line, sizeof(line), " (ratio %.2f)", local.at("compression_ratio").get<double>());
    text += line;
  }
  text += "\n";

  const nlohmann::json& remote = status.at("remote_store");
  if (!remote.is_null()) {
    std::snprintf(line, sizeof(line),
                  "peers:       %llu pages in %s of superpages, %llu clean pages cached, on %zu "
                  "peer(s) (see memlend peers)\n",
                  static_cast<unsigned long long>(U64(remote, "pages")),
                  FormatSize(U64(remote, "used_bytes")).c_str(),
                  static_cast<unsigned long long>(remote.value("cached_pages", std::uint64_t{0})),
                  status.at("peers").size());
    text += line;
    const std::uint64_t degraded = remote.value("degraded_pages", std::uint64_t{0});
    const std::uint64_t lost = remote.value("lost_pages", std::uint64_t{0});
    if (degraded > 0) {
      const nlohmann::json& eta = remote.value("rebuild_eta_s", nlohmann::json(nullptr));
      const double seconds = eta.is_number() ? eta.get<double>() : -1;
      std::snprintf(line, sizeof(line),
                    "rebuild:     %llu pages short of a copy, %.0f copies/s, %s\n",
                    static_cast<unsigned long long>(degraded),
                    remote.value("rebuild_copies_per_s", 0.0),
                    seconds < 0 ? "waiting for a peer with room"
                                : ("about " + std::to_string(static_cast<long long>(seconds)) +
                                   " s left").c_str());
      text += line;
    }
    if (lost > 0) {
      std::snprintf(line, sizeof(line),
                    "LOST:        %llu pages had every copy on peers that went down; they read "
                    "as EIO until rewritten or trimmed\n",
                    static_cast<unsigned long long>(lost));
      text += line;
    }
  }

  const nlohmann::json& disk = status.at("disk_store");
  if (disk.is_null()) {
    text += "disk store:  none (writes fail with ENOSPC when every other tier is full)\n";
  } else {
    const std::uint64_t total = U64(disk, "total_bytes");
    std::snprintf(line, sizeof(line), "disk store:  %s, %llu pages (%s of %s)\n",
                  disk.at("path").get<std::string>().c_str(),
                  static_cast<unsigned long long>(U64(disk, "pages")),
                  FormatSize(U64(disk, "used_bytes")).c_str(),
                  total == 0 ? "unbounded" : FormatSize(total).c_str());
    text += line;
  }

  std::snprintf(line, sizeof(line), "\n%-20s %10s %10s %10s %10s %10s %10s %10s %-8s %s\n",
                "DEVICE", "SIZE", "MAPPED", "ZERO", "LOCAL", "REMOTE", "DISK", "CACHED", "PROTOCOL",
                "ATTACHED");
  text += line;
  for (const nlohmann::json& device : status.at("devices")) {
    const nlohmann::json& pages = device.at("pages");
    auto count = [&](const char* key) { return static_cast<unsigned long long>(U64(pages, key)); };
    std::string attached = "-";
    if (const auto path = device.find("path"); path != device.end() && path->is_string()) {
      attached = path->get<std::string>() + " (" + device.value("frontend", "?") + ")";
    }
    std::snprintf(line, sizeof(line),
                  "%-20s %10s %10llu %10llu %10llu %10llu %10llu %10llu %-8s %s\n",
                  device.at("name").get<std::string>().c_str(),
                  FormatSize(U64(device, "size_bytes")).c_str(), count("mapped"), count("zero"),
                  count("local"), count("remote"), count("disk"), count("cached"),
                  device.value("protocol", "auto").c_str(), attached.c_str());
    text += line;
  }
  text += "(page counts are 4 KiB pages; CACHED: disk pages also cached on a peer)\n";
  for (const nlohmann::json& device : status.at("devices")) {
    const std::uint64_t restarts = device.value("restarts", std::uint64_t{0});
    if (restarts == 0) continue;
    std::snprintf(line, sizeof(line),
                  "%s: served across %llu restart(s) of the daemon, the last %llu ms without a "
                  "server\n",
                  device.at("name").get<std::string>().c_str(),
                  static_cast<unsigned long long>(restarts),
                  static_cast<unsigned long long>(device.value("last_gap_ms", std::uint64_t{0})));
    text += line;
  }
  return text;
}

std::string FormatPeers(const nlohmann::json& reply) {
  const nlohmann::json& peers = reply.at("peers");
  if (peers.empty()) return "no peers (start the daemon with --peer HOST:PORT to borrow)\n";
  std::string text;
  char line[512];
  std::snprintf(line, sizeof(line), "%-16s %-24s %-9s %10s %10s %10s %10s %8s\n", "NODE",
                "ADDRESS", "STATE", "POOL", "FREE", "PAGES", "CACHED", "RTT");
  text += line;
  for (const nlohmann::json& peer : peers) {
    const std::string state = peer.at("state").get<std::string>();
    char rtt[32] = "-";
    if (state != "down") {
      std::snprintf(rtt, sizeof(rtt), "%llu us",
                    static_cast<unsigned long long>(U64(peer, "rtt_us")));
    }
    std::snprintf(line, sizeof(line), "%-16s %-24s %-9s %10s %10s %10llu %10llu %8s\n",
                  peer.at("node_id").get<std::string>().c_str(),
                  peer.at("address").get<std::string>().c_str(), state.c_str(),
                  FormatSize(U64(peer, "pool_total_bytes")).c_str(),
                  FormatSize(U64(peer, "pool_free_bytes")).c_str(),
                  static_cast<unsigned long long>(U64(peer, "pages_stored")),
                  static_cast<unsigned long long>(peer.value("pages_cached", std::uint64_t{0})),
                  rtt);
    text += line;
    const std::string error = peer.value("error", "");
    if (!error.empty() && state != "up") text += "    " + error + "\n";
    if (const std::uint64_t lost = peer.value("pages_lost", std::uint64_t{0}); lost > 0) {
      text += "    " + std::to_string(lost) +
              " pages were lost when it went down (reads of them fail with EIO until rewritten)\n";
    }
  }
  text += "(PAGES: 4 KiB pages this host keeps on the peer; CACHED: clean pages it caches there)\n";
  return text;
}

}  // namespace memlend
