// Daemon: wires a validated DaemonConfig into stores, devices, the NBD server and the
// control socket, and runs until SIGTERM or SIGINT.
#pragma once

#include <memory>

#include <nlohmann/json.hpp>

#include "daemon/config.h"
#include "daemon/control.h"
#include "nbd/server.h"
#include "store/device_table.h"
#include "store/tiering.h"

namespace memlend {

class Daemon {
 public:
  // Reserves the local store, opens the backing file, creates the devices and binds the
  // NBD and control sockets. Throws std::runtime_error (or std::system_error) with a
  // one-line message on any startup failure; nothing is left listening then.
  explicit Daemon(const DaemonConfig& config);
  ~Daemon();

  // Serves until SIGTERM or SIGINT arrives, then shuts down cleanly: stops accepting,
  // hangs up clients, joins threads, removes socket files. REQUIRES: those signals are
  // blocked in every thread (BlockShutdownSignals() before any thread starts).
  void Run();

  // The reply to the control API's "status" command.
  nlohmann::json Status() const;

  // Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and threads it creates
  // later) so that Run() can wait for them, and ignores SIGPIPE.
  static void BlockShutdownSignals();

 private:
  nlohmann::json HandleControl(const nlohmann::json& request);

  const DaemonConfig config_;
  std::unique_ptr<Tiering> tiers_;
  DeviceTable devices_;
  std::unique_ptr<nbd::NbdServer> nbd_;
  std::unique_ptr<ControlServer> control_;
};

}  // namespace memlend
