// memlend: the one command. `memlend daemon` runs the daemon; the other subcommands talk
// to a running daemon over its control socket.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>
#include <exception>
#include <iostream>
#include <optional>
#include <memory>
#include <string>
#include <tuple>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cli/status.h"
#include "common/log.h"
#include "common/size.h"
#include "daemon/config.h"
#include "daemon/control.h"
#include "daemon/daemon.h"
#include "memlend/control_api.h"

namespace {

int RunDaemon(const memlend::DaemonArgs& args) {
  memlend::DaemonConfig config;
  std::string error;
  if (!memlend::BuildDaemonConfig(args, &config, &error)) {
    memlend::LogError("%s", error.c_str());
    return 1;
  }
  memlend::Daemon::BlockShutdownSignals();
  std::unique_ptr<memlend::Daemon> daemon;
  try {
    daemon = std::make_unique<memlend::Daemon>(config);
    daemon->Run();
  } catch (const std::exception& e) {
    memlend::LogError("%s", e.what());
    if (daemon && daemon->leaves_devices()) {
      std::fflush(nullptr);
      std::_Exit(1);  // as below: ublk queue threads still use what the daemon holds
    }
    return 1;
  }
  if (daemon->leaves_devices()) {
    // Its ublk devices wait, quiesced, for the next daemon (--on-exit keep); their queue
    // threads still run: end the process as is, destroying nothing they use.
    std::fflush(nullptr);
    std::_Exit(0);
  }
  return 0;
}

// Sends `command` to the daemon and prints its reply, as JSON or through `format`.
int RunQuery(const std::string& control, const char* command, bool json,
             std::string (*format)(const nlohmann::json&)) {
  try {
    const nlohmann::json reply = memlend::CallControl(
        control.empty() ? memlend::DefaultControlPath() : control, {{"command", command}});
    if (!reply.value("ok", false)) {
      memlend::LogError("daemon refused: %s", reply.value("error", "no reason given").c_str());
      return 1;
    }
    if (json) {
      std::cout << reply.dump(2) << "\n";
    } else {
      std::cout << format(reply);
    }
  } catch (const std::exception& e) {
    memlend::LogError("%s", e.what());
    return 1;
  }
  return 0;
}

// An attach may wait for a frontend to come up (nbdfuse, the kernel); a detach for the
// kernel to let go of the device.
constexpr int kAttachTimeoutMs = 60000;

// `queues` 0: the daemon's default.
int RunAttach(const std::string& control, const std::string& name, const std::string& size,
              const std::string& frontend, unsigned queues, const std::string& redundancy) {
  const std::optional<std::uint64_t> bytes = memlend::ParseSize(size);
  if (!bytes) {
    memlend::LogError("attach %s: --size '%s' is not a size (use a number with an optional K, M, "
                      "G or T suffix)",
                      name.c_str(), size.c_str());
    return 2;
  }
  if (const std::string problem = memlend::CheckDeviceSize(*bytes); !problem.empty()) {
    memlend::LogError("attach %s: --size %s: %s", name.c_str(), size.c_str(), problem.c_str());
    return 2;
  }
  if (!memlend::ValidDeviceName(name)) {
    memlend::LogError("attach: the name must be 1 to 64 characters of letters, digits, '.', '_' "
                      "or '-'");
    return 2;
  }
  nlohmann::json request = {{"command", memlend::kControlAttach},
                            {"name", name},
                            {"size_bytes", *bytes},
                            {"frontend", frontend}};
  if (queues != 0) request["queues"] = queues;
  if (!redundancy.empty()) request["redundancy"] = redundancy;
  try {
    const nlohmann::json reply = memlend::CallControl(
        control.empty() ? memlend::DefaultControlPath() : control, request, kAttachTimeoutMs);
    if (!reply.value("ok", false)) {
      memlend::LogError("attach %s: %s", name.c_str(),
                        reply.value("error", "no reason given").c_str());
      return 1;
    }
    std::cout << reply.value("path", "") << "\n";
  } catch (const std::exception& e) {
    memlend::LogError("attach %s: %s", name.c_str(), e.what());
    return 1;
  }
  return 0;
}

int RunDetach(const std::string& control, const std::string& name) {
  try {
    const nlohmann::json reply = memlend::CallControl(
        control.empty() ? memlend::DefaultControlPath() : control,
        {{"command", memlend::kControlDetach}, {"name", name}}, kAttachTimeoutMs);
    if (!reply.value("ok", false)) {
      memlend::LogError("detach %s: %s", name.c_str(),
                        reply.value("error", "no reason given").c_str());
      return 1;
    }
  } catch (const std::exception& e) {
    memlend::LogError("detach %s: %s", name.c_str(), e.what());
    return 1;
  }
  return 0;
}

// A progress line "[####      ] <left> <what>" for a count that falls from `first` to 0,
// redrawn in place on a terminal, one line per update otherwise.
void ShowProgress(bool tty, std::uint64_t first, std::uint64_t left, const std::string& what) {
  constexpr std::size_t kWidth = 30;
  first = std::max<std::uint64_t>(first, 1);
  const std::size_t done = static_cast<std::size_t>(kWidth * (first - std::min(first, left)) / first);
  const std::string line = "[" + std::string(done, '#') + std::string(kWidth - done, ' ') + "] " +
                           std::to_string(left) + " " + what;
  std::printf(tty ? "\r%s   " : "%s\n", line.c_str());
  std::fflush(stdout);
}

// memlend drain: asks a lender to leave once its borrowers have moved their pages off, and
// shows the pages left (per borrower) until it is done. 0 only when nothing was left behind.
int RunDrain(const std::string& control_option, unsigned deadline_s) {
  const std::string control = control_option.empty() ? memlend::DefaultControlPath() : control_option;
  try {
    const nlohmann::json reply = memlend::CallControl(
        control, {{"command", memlend::kControlDrain}, {"deadline_ms", deadline_s * 1000ull}});
    if (!reply.value("ok", false)) {
      memlend::LogError("drain: %s", reply.value("error", "no reason given").c_str());
      return 1;
    }
  } catch (const std::exception& e) {
    memlend::LogError("drain: %s", e.what());
    return 1;
  }
  const bool tty = ::isatty(STDOUT_FILENO) != 0;
  std::uint64_t first = 0;
  std::uint64_t last = 0;
  bool seen = false;
  for (;;) {
    nlohmann::json lending;
    try {
      lending = memlend::CallControl(control, {{"command", memlend::kControlStatus}}).at("lending");
    } catch (const std::exception&) {
      // The daemon has gone (it exits once drained) without our seeing the outcome.
      std::printf("%sthe lender exited; %llu pages were still held when last asked\n",
                  tty ? "\n" : "", static_cast<unsigned long long>(last));
      return last == 0 && seen ? 0 : 1;
    }
    const std::uint64_t held = lending.value("held_pages", std::uint64_t{0});
    if (!seen) first = std::max<std::uint64_t>(held, 1);
    seen = true;
    last = held;
    std::string what = "pages left";
    std::string borrowers;
    for (const auto& holding : lending.value("holdings", nlohmann::json::array())) {
      borrowers += (borrowers.empty() ? "" : ", ") + holding.value("node_id", std::string("?")) +
                   " " + std::to_string(holding.value("pages", std::uint64_t{0}));
    }
    if (!borrowers.empty()) what += " (by borrower: " + borrowers + ")";
    ShowProgress(tty, first, held, what);
    if (lending.value("drain_done", false)) {
      const std::uint64_t left = lending.value("drain_pages_left", std::uint64_t{0});
      std::printf("%s%s\n", tty ? "\n" : "",
                  left == 0 ? "drained: every borrower moved its pages; the lender exits"
                            : ("the deadline passed with " + std::to_string(left) +
                               " pages left behind; the lender exits").c_str());
      return left == 0 ? 0 : 1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

// The entry of `peers` for `address` (as the daemon spells it), or null when it is not a peer.
nlohmann::json FindPeer(const std::string& control, const std::string& address) {
  const nlohmann::json reply = memlend::CallControl(control, {{"command", memlend::kControlPeers}});
  for (const nlohmann::json& peer : reply.value("peers", nlohmann::json::array())) {
    if (peer.value("address", std::string()) == address) return peer;
  }
  return nullptr;
}

// Sends a membership command; returns the address as the daemon spells it, or "" after
// saying why it was refused.
std::string ChangeMembership(const std::string& control, const char* command,
                             const std::string& address) {
  const char* verb = command == std::string(memlend::kControlPeerAdd) ? "add" : "remove";
  try {
    const nlohmann::json reply =
        memlend::CallControl(control, {{"command", command}, {"address", address}});
    if (!reply.value("ok", false)) {
      memlend::LogError("peer %s: %s", verb, reply.value("error", "no reason given").c_str());
      return "";
    }
    return reply.value("address", address);
  } catch (const std::exception& e) {
    memlend::LogError("peer %s: %s", verb, e.what());
    return "";
  }
}

// memlend peer add: the borrower starts using a lender; waits up to `wait_s` for it to come up.
int RunPeerAdd(const std::string& control_option, const std::string& address_arg,
               unsigned wait_s) {
  const std::string control = control_option.empty() ? memlend::DefaultControlPath() : control_option;
  const std::string address = ChangeMembership(control, memlend::kControlPeerAdd, address_arg);
  if (address.empty()) return 1;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(wait_s);
  nlohmann::json peer;
  for (;;) {
    try {
      peer = FindPeer(control, address);
    } catch (const std::exception& e) {
      memlend::LogError("peer add: %s", e.what());
      return 1;
    }
    if (!peer.is_null() && peer.value("state", std::string()) == "up") {
      std::printf("%s added: up, %s free\n", address.c_str(),
                  memlend::FormatSize(peer.value("pool_free_bytes", std::uint64_t{0})).c_str());
      return 0;
    }
    if (std::chrono::steady_clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  // Added all the same: the daemon keeps trying to reach it.
  const std::string state = peer.is_null() ? "unknown" : peer.value("state", std::string("?"));
  const std::string why = peer.is_null() ? "" : peer.value("error", std::string());
  std::printf("%s added, but %s after %u s%s%s; the daemon keeps trying to connect\n",
              address.c_str(), state.c_str(), wait_s, why.empty() ? "" : ": ", why.c_str());
  return 0;
}

// memlend peer remove: the borrower moves its pages off a lender, then stops using it. Shows
// the pages left there; 0 once the peer is gone, 1 if the deadline passed first (removal
// goes on in the background; `memlend peer add` of the same address cancels it).
int RunPeerRemove(const std::string& control_option, const std::string& address_arg,
                  unsigned deadline_s) {
  const std::string control = control_option.empty() ? memlend::DefaultControlPath() : control_option;
  const std::string address = ChangeMembership(control, memlend::kControlPeerRemove, address_arg);
  if (address.empty()) return 1;
  const bool tty = ::isatty(STDOUT_FILENO) != 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(deadline_s);
  std::uint64_t first = 0;
  std::uint64_t left = 0;
  for (;;) {
    nlohmann::json peer;
    try {
      peer = FindPeer(control, address);
    } catch (const std::exception& e) {
      memlend::LogError("peer remove: %s", e.what());
      return 1;
    }
    if (peer.is_null() || peer.value("state", std::string()) == "removed") {
      // Listed as removed only while pages lost with it (it went down first) are named.
      std::printf("%s%s removed: no page of this host is left there\n", tty ? "\n" : "",
                  address.c_str());
      return 0;
    }
    left = peer.value("pages_stored", std::uint64_t{0});
    if (first == 0) first = std::max<std::uint64_t>(left, 1);
    ShowProgress(tty, first, left, "pages left on " + address);
    if (std::chrono::steady_clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  std::printf("%sstill removing %s after %u s: %llu pages have found no room elsewhere yet; "
              "they move as room appears (`memlend peer add %s` cancels)\n",
              tty ? "\n" : "", address.c_str(), deadline_s,
              static_cast<unsigned long long>(left), address.c_str());
  return 1;
}

// memlend lend: a lender's pool at run time. A shrink shows the superpages borrowers still
// hold until the pool is down to its new size; 0 once it is (at once for a growth).
int RunLend(const std::string& control_option, const std::string& size_text,
            const std::string& below_text, unsigned deadline_s) {
  const std::string control = control_option.empty() ? memlend::DefaultControlPath() : control_option;
  nlohmann::json request = {{"command", memlend::kControlLend}, {"deadline_ms", deadline_s * 1000ull}};
  for (const auto& [option, text, field] :
       {std::tuple{"--size", &size_text, "size_bytes"},
        std::tuple{"--reclaim-below", &below_text, "reclaim_below_bytes"}}) {
    if (text->empty()) continue;
    const std::optional<std::uint64_t> bytes =
        *text == "off" ? std::optional<std::uint64_t>(0) : memlend::ParseSize(*text);
    if (!bytes) {
      memlend::LogError("lend: %s '%s': expected a size such as 512M or 2G", option, text->c_str());
      return 2;
    }
    request[field] = *bytes;
  }
  if (size_text.empty() && below_text.empty()) {
    memlend::LogError("lend: give --size SIZE, --reclaim-below SIZE, or both (see `memlend lend --help`)");
    return 2;
  }
  nlohmann::json reply;
  try {
    reply = memlend::CallControl(control, request);
  } catch (const std::exception& e) {
    memlend::LogError("lend: %s", e.what());
    return 1;
  }
  if (!reply.value("ok", false)) {
    memlend::LogError("lend: %s", reply.value("error", "no reason given").c_str());
    return 1;
  }
  const bool tty = ::isatty(STDOUT_FILENO) != 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(deadline_s) +
                        std::chrono::seconds(2);
  std::uint64_t first = 0;
  for (bool shown = false;; shown = true) {
    nlohmann::json lending;
    try {
      lending = memlend::CallControl(control, {{"command", memlend::kControlStatus}}).at("lending");
    } catch (const std::exception& e) {
      memlend::LogError("lend: %s", e.what());
      return 1;
    }
    const std::uint64_t total = lending.value("total_bytes", std::uint64_t{0});
    const std::uint64_t target = lending.value("target_bytes", std::uint64_t{0});
    const std::uint64_t left = total > target ? (total - target) >> 20 : 0;
    if (left == 0) {
      std::printf("%spool: %s (at most %s)%s\n", shown && tty ? "\n" : "",
                  memlend::FormatSize(total).c_str(),
                  memlend::FormatSize(lending.value("max_bytes", std::uint64_t{0})).c_str(),
                  lending.value("reclaim_below_bytes", std::uint64_t{0}) > 0
                      ? (", shrinking while MemAvailable is under " +
                         memlend::FormatSize(lending.value("reclaim_below_bytes", std::uint64_t{0})))
                            .c_str()
                      : "");
      return 0;
    }
    if (first == 0) first = left;
    ShowProgress(tty, first, left, "MiB still held by borrowers, moving them off");
    if (std::chrono::steady_clock::now() >= deadline) {
      std::printf("%sthe deadline passed with %llu MiB still held by borrowers; the pool stays "
                  "larger than asked until they give it back\n",
                  tty ? "\n" : "", static_cast<unsigned long long>(left));
      return 1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "memlend: a block device backed by RAM — this host's and other hosts' spare memory.\n"
      "Run `memlend daemon` to serve devices over NBD or lend memory to peers; `memlend "
      "attach` makes a block device of this host (for swap or a file system)."};
  app.require_subcommand(1);
  bool verbose = false;
  app.add_flag("-v,--verbose", verbose, "Log control-path events to stderr");

  memlend::DaemonArgs daemon_args;
  CLI::App* daemon = app.add_subcommand("daemon", "Run the daemon in the foreground");
  daemon->add_option("--device", daemon_args.devices,
                     "A device to serve, as NAME:SIZE[:PROTOCOL] (e.g. swap0:4G); the NBD export "
                     "name is NAME; SIZE is a multiple of 4K. PROTOCOL picks how pages reach "
                     "peers: auto (default: dirty pages by the passive protocol, clean pages "
                     "that also have a disk copy cached in peers' ephemeral pools) or passive "
                     "(clean pages are dropped back to their disk copy). Repeatable")
      ->type_name("NAME:SIZE[:PROTOCOL]");
  daemon->add_option("--nbd", daemon_args.nbd,
                     "Where to serve NBD: HOST:PORT, [ADDRESS]:PORT or unix:PATH. NBD has no "
                     "authentication: anyone who can connect can read and write every device, "
                     "so prefer a unix socket")
      ->type_name("ADDR");
  daemon->add_option("--socket-mode", daemon_args.socket_mode,
                     "Permission bits of a unix --nbd socket, in octal (default 0600: this "
                     "user only); e.g. 0660 with --socket-group for a group of users")
      ->type_name("MODE");
  daemon->add_option("--socket-group", daemon_args.socket_group,
                     "Group owning a unix --nbd socket (a name or number)")
      ->type_name("GROUP");
  daemon->add_option("--max-connections", daemon_args.max_connections,
                     "NBD connections served at once on each NBD socket; more are refused "
                     "(each may hold up to 6.5 MiB of locked memory while it is open)")
      ->type_name("N")
      ->default_str("64");
  daemon->add_option("--local-store", daemon_args.local_store,
                     "RAM reserved for pages on this host, e.g. 512M; shared by all devices")
      ->type_name("SIZE");
  daemon->add_option("--backing-file", daemon_args.backing_file,
                     "File that takes pages when the local store is full (created or "
                     "truncated). Without it such writes fail with ENOSPC")
      ->type_name("PATH");
  daemon->add_option("--backing-size", daemon_args.backing_size,
                     "Largest size the backing file may grow to (default: no bound)")
      ->type_name("SIZE");
  daemon->add_option("--state-dir", daemon_args.state_dir,
                     "Keep the page store where a restarted daemon finds it: the local store "
                     "and the page tables in a locked shared memory segment named in "
                     "DIR/state.json. A daemon that crashes, or stops with --on-exit keep, "
                     "leaves them; the next one started with the same DIR, devices, local "
                     "store, backing file and peers serves the same pages (on lenders too: it "
                     "resumes its sessions) and takes over the ublk devices attached to it")
      ->type_name("DIR");
  daemon->add_option("--on-exit", daemon_args.on_exit,
                     "On SIGTERM: detach (the default) frees the pages and the state; keep "
                     "leaves them in --state-dir for the next daemon, and ublk devices "
                     "attached to the kernel waiting for it (an upgrade)")
      ->type_name("keep|detach");
  daemon->add_flag("--keep-devices", daemon_args.keep_devices,
                   "The same as --on-exit keep: a SIGTERM (an upgrade) leaves the pages and the "
                   "attached devices for the next daemon on --state-dir");
  daemon->add_flag("--backing-direct", daemon_args.backing_direct,
                   "Write the backing file with O_DIRECT, bypassing the page cache: slower, "
                   "but spilling pages then needs no page-cache memory, which a swap device "
                   "lacks under whole-system memory pressure");
  daemon->add_option("--compress", daemon_args.compress,
                     "Compress pages in the local store: none or lz4")
      ->type_name("none|lz4")
      ->default_str("none");
  daemon->add_option("--control", daemon_args.control,
                     "Control socket path (default: " + memlend::DefaultControlPath() + ")")
      ->type_name("PATH");

  daemon->add_option("--redundancy", daemon_args.redundancy,
                     "What is kept of each page that leaves this host's RAM: none (one lender "
                     "holds it), replicas:N (N distinct lenders, 1-3, all acknowledged before the "
                     "page leaves RAM: a lender's death loses nothing, and its pages are copied "
                     "again elsewhere), disk (the backing file holds it, a lender may cache it: "
                     "nothing is lost with any lender), or replicas:N+disk (both). Default: "
                     "replicas:2 with two or more --peer, else disk with --backing-file, else "
                     "none; shown per device in `memlend status`")
      ->type_name("MODE");
  daemon->add_option("--rebuild-rate", daemon_args.rebuild_rate,
                     "Pages a second the background rebuild copies at most, when a lender's "
                     "death or departure left pages with fewer copies than --redundancy asks "
                     "(10-10000000, default 5000)")
      ->type_name("PAGES");
  daemon->add_option("--peer-timeout", daemon_args.peer_timeout,
                     "Milliseconds a lender has to answer each request (10-60000, default 500). "
                     "A write that misses it goes elsewhere (another lender, the backing file), a "
                     "read is asked again, and the lender is suspect: it gets no new pages until "
                     "it answers in time again. "
                     "Idle lenders are sent a heartbeat this often")
      ->type_name("MS");
  daemon->add_option("--peer-down-after", daemon_args.peer_down_after,
                     "Milliseconds a suspect lender may go without a reply in time before it is "
                     "down (100-600000, default 5000): its connection is closed, pages with "
                     "no other copy read as errors and are counted as lost")
      ->type_name("MS");
  daemon->add_option("--busy-poll", daemon_args.busy_poll_us,
                     "Microseconds a connection thread spins waiting for the next request "
                     "before it sleeps: lower latency for some CPU; 0 turns it off")
      ->type_name("USEC")
      ->default_val(50);

  daemon->add_option("--peer", daemon_args.peers,
                     "A lender to borrow RAM from (HOST:PORT of its --listen). Cold pages move "
                     "there past the high watermark. Repeatable")
      ->type_name("ADDR");
  daemon->add_option("--high-watermark", daemon_args.high_watermark,
                     "Local-store use (percent) at which cold pages start moving to peers, or "
                     "to the backing file when no peer has room")
      ->type_name("PCT")
      ->default_str("90");
  daemon->add_option("--low-watermark", daemon_args.low_watermark,
                     "Local-store use (percent) at which that eviction stops")
      ->type_name("PCT")
      ->default_str("80");
  daemon->add_option("--lend", daemon_args.lend,
                     "RAM to lend to peers, e.g. 4G: reserved as 2 MiB superpages and reachable "
                     "only through the peer protocol")
      ->type_name("SIZE");
  daemon->add_option("--listen", daemon_args.listen,
                     "Where borrowers connect to lent memory: HOST:PORT, [ADDRESS]:PORT or "
                     "unix:PATH. Peers are not authenticated yet: listen only on a network "
                     "you trust")
      ->type_name("ADDR");
  daemon->add_option("--drain-deadline", daemon_args.drain_deadline,
                     "Seconds a lender given SIGTERM waits for its borrowers to move their pages "
                     "elsewhere before it exits (0-3600, default 30; see `memlend drain`)")
      ->type_name("S");
  daemon->add_option("--reclaim-below", daemon_args.reclaim_below,
                     "Shrink the lent pool while this host's MemAvailable is under SIZE "
                     "(borrowers move their pages off first), and grow it back, up to --lend, "
                     "once there is room again (default: never; `memlend lend` changes it)")
      ->type_name("SIZE");
  daemon->add_option("--reclaim-pressure", daemon_args.reclaim_pressure,
                     "Shrink the lent pool by a quarter every 10 s while this host's memory "
                     "pressure (PSI, /proc/pressure/memory: the share of the last 10 s in which "
                     "some task waited for memory) is at least PCT percent, and grow it back by "
                     "an eighth every 10 s once it is under half of that (default: never)")
      ->type_name("PCT");
  daemon->add_option("--max-borrowers", daemon_args.max_borrowers,
                     "Borrower connections served at once; more are refused with a message "
                     "saying so (each may hold up to 7.3 MiB of locked memory while it is "
                     "open)")
      ->type_name("N")
      ->default_str("32");
  daemon->add_option("--max-lend-per-borrower", daemon_args.max_lend_per_borrower,
                     "The most one borrower (by node id, across its connections) may hold of "
                     "the lent memory at once, in whole 2 MiB superpages; past it, its requests "
                     "for more are refused and it places pages elsewhere (default 0: no limit "
                     "but --lend)")
      ->type_name("SIZE");
  daemon->add_option("--borrower-grace", daemon_args.borrower_grace,
                     "Seconds a borrower's memory is kept after its connection ends (0-86400), "
                     "for it to reconnect and resume its session with the secret it was given; "
                     "then it is zeroed and freed. 0 frees it at once")
      ->type_name("S")
      ->default_str("60");
  daemon->add_option("--node-id", daemon_args.node_id,
                     "This daemon's identity among peers, 1-16 hex digits (default: random)")
      ->type_name("HEX");
  daemon->add_flag("--force", daemon_args.force,
                   "Reserve --local-store and --lend even past what this host can hold (MemTotal "
                   "less the larger of 1 GiB and 10%, at most a quarter) or lock (RLIMIT_MEMLOCK): the kernel's "
                   "OOM killer may then stop any process of the host");
  daemon->add_flag("--seal-pages", daemon_args.seal_pages,
                   "Encrypt and authenticate every page before it goes to a lender (AES-256-GCM "
                   "under a key that never leaves this host; tags kept here), so a lender can "
                   "neither read a page nor change, swap or replay one undetected: a copy that "
                   "fails its check is read from another copy, or the read fails with EIO. "
                   "Clean pages are then not cached on lenders");
  daemon->add_flag("--no-mlock", daemon_args.no_mlock,
                   "Do not lock the daemon's memory (mlockall), mark it an I/O flusher, or "
                   "serve kernel NBD requests under SCHED_FIFO. Only safe when no device it "
                   "serves is used as swap");
  daemon->footer(
      "A daemon can serve devices (--device, --nbd, --local-store; or --local-store alone and "
      "`memlend attach` later), lend memory (--lend, --listen), or both. A daemon with a local "
      "store locks its memory and needs CAP_IPC_LOCK (or a large enough `ulimit -l`), "
      "CAP_SYS_RESOURCE and CAP_SYS_NICE for that; see docs/attach.md.");

  std::string attach_control;
  std::string attach_name;
  std::string attach_size;
  std::string attach_frontend = "auto";
  unsigned attach_queues = 0;
  std::string attach_redundancy;
  CLI::App* attach = app.add_subcommand(
      "attach", "Create a device in the running daemon and attach it as a block device; prints "
                "its path (e.g. /dev/nbd0). With the daemon's --state-dir, a ublk device outlives "
                "the daemon: the next one started on that directory takes it over (kill -9, "
                "--on-exit keep), as does one on the kernel's NBD client (for up to 120 s: "
                "the next daemon hands the kernel a new socket). FUSE devices do not");
  attach->add_option("NAME", attach_name, "The device's name (letters, digits, '.', '_', '-')")
      ->required();
  attach->add_option("--size", attach_size,
                     "The device's size, a multiple of 4K, e.g. 4G (K, M, G, T are binary)")
      ->type_name("SIZE")
      ->required();
  attach->add_option("--frontend", attach_frontend,
                     "How the kernel sees it: ublk (/dev/ublkbN), nbd (the kernel's NBD client, "
                     "/dev/nbdN), fuse (nbdfuse and a loop device, /dev/loopN), or auto: the "
                     "first of those this host has")
      ->check(CLI::IsMember({"auto", "ublk", "nbd", "fuse"}))
      ->default_str("auto");
  attach->add_option("--redundancy", attach_redundancy,
                     "What is kept of each page this device evicts: none, replicas:N (N 1-3), "
                     "disk or replicas:N+disk (see `memlend daemon --help`); default: the "
                     "daemon's --redundancy, else replicas:2 when the daemon has two or more "
                     "peers, else disk when it has a backing file, else none. Shown in "
                     "`memlend status`")
      ->type_name("MODE");
  attach->add_option("--queues", attach_queues,
                     "ublk only: hardware queues, each served by a thread of its own "
                     "(default: one per CPU)")
      ->check(CLI::Range(1u, 256u))
      ->type_name("N");
  attach->add_option("--control", attach_control,
                     "The daemon's control socket (default: " + memlend::DefaultControlPath() +
                         ")")
      ->type_name("PATH");
  attach->footer(
      "Needs a daemon with a local store (memlend daemon --local-store SIZE ...) running as "
      "root. Use the device for swap (mkswap, swapon) or a file system, then `memlend detach "
      "NAME`. See docs/attach.md.");

  std::string detach_control;
  std::string detach_name;
  CLI::App* detach = app.add_subcommand(
      "detach", "Remove a block device made by `memlend attach`, and its device and pages; "
                "refused while it is mounted or swapped on. `memlend detach ublkbN` removes "
                "/dev/ublkbN when no daemon serves it any more (left for a restart whose state "
                "directory was lost)");
  detach->add_option("NAME", detach_name, "The device's name, or ublkbN")->required();
  detach->add_option("--control", detach_control,
                     "The daemon's control socket (default: " + memlend::DefaultControlPath() +
                         ")")
      ->type_name("PATH");

  std::string status_control;
  bool status_json = false;
  CLI::App* status = app.add_subcommand("status", "Show devices and where their pages are");
  status->add_option("--control", status_control,
                     "The daemon's control socket (default: " + memlend::DefaultControlPath() +
                         ")")
      ->type_name("PATH");
  status->add_flag("--json", status_json, "Print the daemon's JSON reply");

  std::string peers_control;
  bool peers_json = false;
  CLI::App* peers = app.add_subcommand(
      "peers", "Show the lenders this daemon borrows from and the pages it keeps on each");
  peers->add_option("--control", peers_control,
                    "The daemon's control socket (default: " + memlend::DefaultControlPath() +
                        ")")
      ->type_name("PATH");
  peers->add_flag("--json", peers_json, "Print the daemon's JSON reply");

  std::string drain_control;
  unsigned drain_deadline = 30;
  CLI::App* drain = app.add_subcommand(
      "drain", "Make a lender leave: its borrowers move their pages elsewhere, then it exits");
  drain->add_option("--deadline", drain_deadline,
                    "Seconds the borrowers have to move their pages (0-3600, default 30); the "
                    "lender exits then, whatever is left")
      ->check(CLI::Range(0, 3600))
      ->default_val(30);
  drain->add_option("--control", drain_control,
                    "The lender's control socket (default: " + memlend::DefaultControlPath() + ")")
      ->type_name("PATH");
  drain->footer("Shows the pages left, per borrower node id, until the lender is done; exits 0 "
                "only when nothing was left behind. SIGTERM to the lender drains the same way, "
                "with its --drain-deadline.");

  std::string lend_control;
  std::string lend_size;
  std::string lend_below;
  unsigned lend_deadline = 30;
  CLI::App* lend = app.add_subcommand(
      "lend", "Shrink or grow a running lender's pool, or set when it shrinks by itself");
  lend->add_option("--size", lend_size,
                   "The pool's new size, up to the daemon's --lend size; a shrink gives free "
                   "and cached memory back at once and asks borrowers (RECLAIM) for the rest")
      ->type_name("SIZE");
  lend->add_option("--reclaim-below", lend_below,
                   "Shrink the pool while the host's MemAvailable is under SIZE, and grow it "
                   "back once there is room again; off (or 0) stops that")
      ->type_name("SIZE|off");
  lend->add_option("--deadline", lend_deadline,
                   "Seconds borrowers have to move their pages off a shrinking pool (0-3600, "
                   "default 30)")
      ->check(CLI::Range(0, 3600))
      ->default_val(30);
  lend->add_option("--control", lend_control,
                   "The lender's control socket (default: " + memlend::DefaultControlPath() + ")")
      ->type_name("PATH");
  lend->footer("Shows what borrowers still hold until the pool is down to its new size; exits "
               "0 once it is, 1 if the deadline passes first (the pool then stays larger until "
               "they give it back). A page that is a borrower's only copy is never dropped.");

  std::string peer_control;
  std::string peer_address;
  unsigned peer_add_wait = 10;
  unsigned peer_remove_deadline = 120;
  CLI::App* peer = app.add_subcommand(
      "peer", "Change the lenders a running daemon borrows from (`memlend peers` lists them)");
  peer->require_subcommand(1);
  CLI::App* peer_add = peer->add_subcommand(
      "add", "Start using the lender at ADDR for new pages (it is tried again while down)");
  peer_add->add_option("ADDR", peer_address, "The lender's --listen address: HOST:PORT or unix:PATH")
      ->required();
  peer_add->add_option("--wait", peer_add_wait,
                       "Seconds to wait for it to come up before returning (0-600, default 10)")
      ->check(CLI::Range(0, 600))
      ->default_val(10);
  CLI::App* peer_remove = peer->add_subcommand(
      "remove", "Move this host's pages off the lender at ADDR, then stop using it");
  peer_remove->add_option("ADDR", peer_address, "The lender's address as `memlend peers` shows it")
      ->required();
  peer_remove->add_option("--deadline", peer_remove_deadline,
                          "Seconds to show progress for (1-3600, default 120); removal goes on "
                          "after that until the last page has moved")
      ->check(CLI::Range(1, 3600))
      ->default_val(120);
  for (CLI::App* sub : {peer_add, peer_remove}) {
    sub->add_option("--control", peer_control,
                    "The daemon's control socket (default: " + memlend::DefaultControlPath() + ")")
        ->type_name("PATH");
  }
  peer->footer("Needs a daemon started with --peer (the remote tier). Removing a peer first "
               "copies each page it holds to another peer (pages with copies elsewhere keep "
               "them), so nothing is lost; it exits 0 when none is left there. Membership "
               "changes last until the daemon stops: add the peer to its --peer list too.");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::string where = "memlend";
    for (const CLI::App* sub : app.get_subcommands()) where += " " + sub->get_name();
    memlend::LogError("%s (see `%s --help`)", e.what(), where.c_str());
    return 2;
  }
  memlend::g_verbose = verbose;

  if (daemon->parsed()) return RunDaemon(daemon_args);
  if (attach->parsed()) {
    return RunAttach(attach_control, attach_name, attach_size, attach_frontend, attach_queues,
                     attach_redundancy);
  }
  if (detach->parsed()) return RunDetach(detach_control, detach_name);
  if (drain->parsed()) return RunDrain(drain_control, drain_deadline);
  if (lend->parsed()) return RunLend(lend_control, lend_size, lend_below, lend_deadline);
  if (peer_add->parsed()) return RunPeerAdd(peer_control, peer_address, peer_add_wait);
  if (peer_remove->parsed()) {
    return RunPeerRemove(peer_control, peer_address, peer_remove_deadline);
  }
  if (peers->parsed()) {
    return RunQuery(peers_control, memlend::kControlPeers, peers_json, memlend::FormatPeers);
  }
  return RunQuery(status_control, memlend::kControlStatus, status_json, memlend::FormatStatus);
}
