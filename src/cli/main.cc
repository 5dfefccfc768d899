// memlend: the one command. `memlend daemon` runs the daemon; the other subcommands talk
// to a running daemon over its control socket.
#include <cstdio>
#include <exception>
#include <iostream>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cli/status.h"
#include "common/log.h"
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
  try {
    memlend::Daemon daemon(config);
    daemon.Run();
  } catch (const std::exception& e) {
    memlend::LogError("%s", e.what());
    return 1;
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

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "memlend: a block device backed by RAM — this host's, and (soon) other hosts' spare "
      "memory.\nRun `memlend daemon` to serve devices over NBD, then use them with any NBD "
      "client (nbdfuse, nbd-client, qemu, fio)."};
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
                     "Where to serve NBD: HOST:PORT, [ADDRESS]:PORT or unix:PATH")
      ->type_name("ADDR");
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
  daemon->add_option("--compress", daemon_args.compress,
                     "Compress pages in the local store: none or lz4")
      ->type_name("none|lz4")
      ->default_str("none");
  daemon->add_option("--control", daemon_args.control,
                     "Control socket path (default: " + memlend::DefaultControlPath() + ")")
      ->type_name("PATH");

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
                     "Where borrowers connect to lent memory: HOST:PORT or [ADDRESS]:PORT")
      ->type_name("ADDR");
  daemon->add_option("--node-id", daemon_args.node_id,
                     "This daemon's identity among peers, 1-16 hex digits (default: random)")
      ->type_name("HEX");
  daemon->footer(
      "A daemon can serve devices (--device, --nbd, --local-store), lend memory (--lend, "
      "--listen), or both.");

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
  if (peers->parsed()) {
    return RunQuery(peers_control, memlend::kControlPeers, peers_json, memlend::FormatPeers);
  }
  return RunQuery(status_control, memlend::kControlStatus, status_json, memlend::FormatStatus);
}
