// Daemon: wires a validated DaemonConfig into stores, devices, peers, the NBD server, the
// lender service and the control socket, and runs until SIGTERM or SIGINT.
#pragma once

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/unique_fd.h"
#include "daemon/config.h"
#include "daemon/control.h"
#include "daemon/host_memory.h"
#include "frontend/block_frontend.h"
#include "nbd/server.h"
#include "peer/lender_service.h"
#include "daemon/pool_pressure.h"
#include "daemon/state_dir.h"
#include "peer/peer_store.h"
#include "store/device_table.h"
#include "store/state_segment.h"
#include "store/placement_store.h"
#include "store/tiering.h"

namespace memlend {

class Daemon {
 public:
  // Reserves the local store, opens the backing file, connects to the peers (a peer that
  // cannot be reached is logged and retried later), creates the devices, reserves the
  // lent pool and binds every socket. A daemon with a local store then locks its memory
  // and marks itself an I/O flusher (see LockMemory). Throws std::runtime_error (or std::system_error)
  // with a one-line message on any startup failure; nothing is left listening then.
  explicit Daemon(const DaemonConfig& config);
  ~Daemon();

  // Serves until SIGTERM or SIGINT arrives, then shuts down cleanly: stops accepting,
  // detaches every attached block device, hangs up clients and borrowers, joins threads, removes socket files. REQUIRES: those
  // signals are blocked in every thread (BlockShutdownSignals() before any thread starts).
  // After Run: whether the daemon left ublk devices for the next one (--on-exit keep); the
  // process must then exit at once, without destroying the daemon.
  bool leaves_devices() const { return leaves_devices_; }
  void Run();

  // The replies to the control API's "status" and "peers" commands.
  nlohmann::json Status() const;
  nlohmann::json PeersJson() const;

  // The control API's "attach" and "detach" commands (docs/control.md). Attach creates a
  // device in the shared tiers and a block frontend for it and replies with its path;
  // on any failure it throws std::runtime_error with a one-line reason and leaves neither
  // behind. Detach refuses while the block device is in use. Control thread only.
  nlohmann::json Attach(const AttachRequest& request);
  nlohmann::json Detach(const DetachRequest& request);
  // Starts a lender's drain (the main thread runs it, then stops the daemon).
  nlohmann::json StartDrain(const DrainRequest& request);
  // A lender's pool at run time (lend): its size and --reclaim-below. Control thread only.
  nlohmann::json Lend(const LendRequest& request);
  // Membership changes of a borrower (peer_add, peer_remove).
  nlohmann::json AddPeer(const PeerAddRequest& request);
  nlohmann::json RemovePeer(const PeerRemoveRequest& request);
  // Wakes the refresher to run Refresh now.
  void RefreshSoon();

  // Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and threads it creates
  // later) so that Run() can wait for them, and ignores SIGPIPE.
  static void BlockShutdownSignals();

 private:
  nlohmann::json HandleControl(const ControlRequest& request);
  // Asks the peers for their free space every few seconds and reconnects lost ones.
  void RefreshLoop();
  // A lender's watch over its pool's size: every second, and when `lend` changes it.
  void ReclaimLoop();
  // Sets the pool's target: the size asked for (--lend, `lend`), less what --reclaim-below
  // asks while MemAvailable is under it. Any thread.
  void AdjustPool();
  void Stop();
  // Takes over the ublk devices an earlier daemon left (to_recover_). Throws.
  void RecoverAttached();
  // Writes state_ to state.json (control thread). Throws.
  void SaveStateNow() {
    std::lock_guard lock(state_mu_);
    SaveState(config_.state_dir, *state_);
  }
  // Guards state_'s writes from threads other than the control thread (peers, placements)
  // and every SaveState.
  mutable std::mutex state_mu_;
  UniqueFd state_lock_;  // flock'ed DIR/lock: one daemon per state directory
  std::map<std::size_t, std::unique_ptr<StateSegment>> placement_segments_;  // by chunk
  // --state-dir: attaches the segments `saved` names (or makes them, and state.json, when
  // it is null) and returns the arena's memory and each --device's page table, in order.
  // Throws std::runtime_error with one line when they cannot be had.
  // --state-dir: takes DIR/lock for the life of the process (waiting up to 10 s). Throws.
  void LockStateDir();
  std::byte* OpenState(const std::optional<SavedState>& saved,
                       std::vector<void*>* tables);
  // After a restart: rebuilds the stores' free lists from the devices' page tables, and logs
  // what was found. Throws if pages were on peers (not recoverable yet).
  void RecoverDevices(const std::vector<std::shared_ptr<Device>>& devices,
                      const std::vector<bool>& referenced, DiskStore* disk);
  // --state-dir with peers: placement records in segments (made as the table grows, and
  // recorded in state.json), and after a restart the ones `saved` names given back.
  void PersistPlacements(const std::optional<SavedState>& saved);
  // Writes the peers' sessions to state.json (any thread).
  void SavePeers();
  // Detaches every attached block device (forcibly if still in use), newest first.
  void DetachAll();
  // Creates the frontend of `kind` ("ublk", "nbd" or "fuse") for `device`; `queues` is for
  // ublk (0: one per CPU). Throws.
  // `recover_dev_id`: take over that ublk device instead (ublk only).
  std::unique_ptr<BlockFrontend> CreateFrontend(const std::string& kind,
                                                std::shared_ptr<Device> device, unsigned queues,
                                                int recover_dev_id = -1);
  // A detached device's page table segment goes (and state.json forgets the device).
  void ForgetAttached(const std::string& name, std::weak_ptr<Device> device);
  // The unix socket nbdfuse connects to: --nbd if it is one, else a private one next to
  // the control socket, started on first use.
  std::string FuseNbdSocket();
  // Where nbdfuse mounts go: a private directory next to the control socket.
  std::string FuseMountRoot();
  // Make the daemon safe to serve swap: smaller thread stacks and PR_SET_IO_FLUSHER before
  // any thread starts, mlockall once everything is allocated. Each failure is a warning,
  // not an error; it is kept in swap_warnings_ and printed once startup has succeeded.
  void PrepareForSwap();
  void LockMemory();
  // The redundancy of a device attached without one: --redundancy, else the default rule
  // applied to the peers the daemon has now.
  Redundancy DefaultRedundancy() const;
  // The options every NBD server of this daemon shares.
  nbd::NbdServerOptions NbdOptions() const;
  // What the daemon holds, for CheckReservation: the stores, the heap reserve, the page
  // tables of attached devices.
  std::vector<Reservation> Reservations() const;

  const DaemonConfig config_;
  const HostMemory host_;  // read at startup
  bool locks_memory_ = false;  // mlockall and the rest of PrepareForSwap; set at startup
  std::vector<std::string> swap_warnings_;  // written by the constructor, printed by Run
  // Borrowing side; all null or empty when the daemon serves no device.
  peer::PeerStore* peers_ = nullptr;         // owned by placements_
  PlacementStore* placements_ = nullptr;     // owned by tiers_
  // --state-dir: the segments the local store's arena and the devices' page tables live in
  // (docs/restart.md); destroyed after the stores and devices that use them.
  std::vector<std::unique_ptr<StateSegment>> segments_;
  // The sealing key and counter without a state directory (with one: the arena segment's).
  std::unique_ptr<StateSegment::SealMaterial> own_seal_;
  // The page tables of devices attached at run time, by name (control thread).
  std::map<std::string, std::unique_ptr<StateSegment>> attached_segments_;
  std::vector<std::unique_ptr<StateSegment>> retired_segments_;  // see Attach
  // What state.json says now: written at start, and at each ublk attach and detach
  // (control thread).
  std::optional<SavedState> state_;
  // Stop left ublk devices for the next daemon: the process must end without tearing down
  // what their queues use (RunDaemon exits at once).
  bool leaves_devices_ = false;
  // Stop leaves the state for the next daemon: --on-exit keep, or a recovery that failed.
  bool keep_state_ = false;
  // Sets the state segment's alive clock while the daemon runs (--state-dir).
  std::thread alive_;
  std::condition_variable alive_cv_;  // with refresh_mu_ and stopping_
  std::unique_ptr<Tiering> tiers_;
  DeviceTable devices_;               // destroyed before tiers_
  // ublk devices an earlier daemon left, to take over once the daemon runs (destroyed before
  // tiers_, which their devices use).
  std::vector<std::pair<SavedAttached, std::shared_ptr<Device>>> to_recover_;
  std::unique_ptr<nbd::NbdServer> nbd_;          // --nbd; null without it
  std::unique_ptr<nbd::NbdServer> private_nbd_;  // for nbdfuse when --nbd is not unix
  // Attached block devices by device name. Touched by the control thread, and by Stop()
  // once the control thread has ended.
  std::map<std::string, std::unique_ptr<BlockFrontend>> frontends_;
  std::vector<std::string> attach_order_;  // names in frontends_, oldest first
  mutable std::mutex frontends_mu_;        // guards both, for Status() readers
  // Lending side; null when the daemon lends nothing.
  std::unique_ptr<peer::LenderService> lender_;
  std::unique_ptr<ControlServer> control_;

  std::thread refresher_;
  std::mutex refresh_mu_;
  std::condition_variable refresh_cv_;
  bool stopping_ = false;  // guarded by refresh_mu_
  bool refresh_now_ = false;  // guarded by refresh_mu_: RefreshLoop refreshes at once
  // A lender's pool size (AdjustPool).
  std::thread reclaimer_;
  std::condition_variable reclaim_cv_;    // with refresh_mu_ and stopping_
  std::mutex adjust_mu_;                  // one AdjustPool at a time
  std::atomic<std::uint64_t> lend_size_bytes_{0};      // asked for: --lend, then `lend`
  std::atomic<std::uint64_t> reclaim_below_bytes_{0};  // --reclaim-below, then `lend`
  std::atomic<std::uint64_t> reclaim_deadline_ms_{30000};
  std::unique_ptr<PoolPressure> pressure_;  // guarded by adjust_mu_: what the host allows
  // Drain: asked by `memlend drain` (else by SIGTERM), its deadline, and its outcome.
  std::atomic<bool> drain_asked_{false};
  std::atomic<std::uint64_t> drain_deadline_ms_{0};
  std::atomic<bool> drain_done_{false};
  std::atomic<std::uint64_t> drain_left_{0};
  mutable std::atomic<bool> drain_result_read_{false};  // set by Status()
};

}  // namespace memlend
