// Daemon: wires a validated DaemonConfig into stores, devices, peers, the NBD server, the
// lender service and the control socket, and runs until SIGTERM or SIGINT.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

#include <nlohmann/json.hpp>

#include "daemon/config.h"
#include "daemon/control.h"
#include "nbd/server.h"
#include "peer/lender_service.h"
#include "peer/peer_store.h"
#include "store/device_table.h"
#include "store/tiering.h"

namespace memlend {

class Daemon {
 public:
  // Reserves the local store, opens the backing file, connects to the peers (a peer that
  // cannot be reached is logged and retried later), creates the devices, reserves the
  // lent pool and binds every socket. Throws std::runtime_error (or std::system_error)
  // with a one-line message on any startup failure; nothing is left listening then.
  explicit Daemon(const DaemonConfig& config);
  ~Daemon();

  // Serves until SIGTERM or SIGINT arrives, then shuts down cleanly: stops accepting,
  // hangs up clients and borrowers, joins threads, removes socket files. REQUIRES: those
  // signals are blocked in every thread (BlockShutdownSignals() before any thread starts).
  void Run();

  // The replies to the control API's "status" and "peers" commands.
  nlohmann::json Status() const;
  nlohmann::json PeersJson() const;

  // Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and threads it creates
  // later) so that Run() can wait for them, and ignores SIGPIPE.
  static void BlockShutdownSignals();

 private:
  nlohmann::json HandleControl(const nlohmann::json& request);
  // Asks the peers for their free space every few seconds and reconnects lost ones.
  void RefreshLoop();
  void Stop();

  const DaemonConfig config_;
  // Borrowing side; all null or empty when the daemon serves no device.
  peer::PeerStore* peers_ = nullptr;  // owned by tiers_
  std::unique_ptr<Tiering> tiers_;
  DeviceTable devices_;               // destroyed before tiers_
  std::unique_ptr<nbd::NbdServer> nbd_;
  // Lending side; null when the daemon lends nothing.
  std::unique_ptr<peer::LenderService> lender_;
  std::unique_ptr<ControlServer> control_;

  std::thread refresher_;
  std::mutex refresh_mu_;
  std::condition_variable refresh_cv_;
  bool stopping_ = false;  // guarded by refresh_mu_
};

}  // namespace memlend
