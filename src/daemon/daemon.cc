#include "daemon/daemon.h"

#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <stdexcept>
#include <utility>
#include <variant>

#include "common/log.h"
#include "common/realtime.h"
#include "common/size.h"
#include "common/thread_name.h"
#include "frontend/fuse_frontend.h"
#include "frontend/nbd_kernel_frontend.h"
#include "frontend/ublk_frontend.h"
#include "memlend/control_api.h"

namespace memlend {

namespace {

constexpr std::chrono::seconds kRefreshInterval{2};
// Thread stacks of a daemon that locks its memory: every page of a locked stack is
// resident, so the 8 MiB default would cost 8 MiB per connection. Nothing in the daemon
// keeps more than a few KiB on the stack.
constexpr std::size_t kLockedStackBytes = 1 << 20;
// Heap kept resident and locked for allocations made while serving (see PrepareForSwap).
constexpr std::size_t kHeapReserveBytes = 32 << 20;
#ifndef PR_SET_IO_FLUSHER
constexpr int PR_SET_IO_FLUSHER = 57;
#endif

// An attached device's page table: 16 bytes per 4 KiB page, allocated and locked at attach.
std::uint64_t PageTableBytes(std::uint64_t device_bytes) { return device_bytes / kPageSize * 16; }

std::string HexOfSecret(const peer::SessionSecret& secret) {
  std::string text;
  char byte[3];
  for (const std::uint8_t b : secret) {
    std::snprintf(byte, sizeof(byte), "%02x", b);
    text += byte;
  }
  return text;
}

std::optional<peer::SessionSecret> SecretFromHex(const std::string& text) {
  if (text.size() != 2 * peer::kSecretBytes) return std::nullopt;
  peer::SessionSecret secret{};
  for (std::size_t i = 0; i < secret.size(); ++i) {
    unsigned value = 0;
    if (std::sscanf(text.c_str() + 2 * i, "%2x", &value) != 1) return std::nullopt;
    secret[i] = static_cast<std::uint8_t>(value);
  }
  return secret;
}

// How long the kernel's NBD client keeps a device whose daemon ended, for the next one.
constexpr unsigned kNbdKeepSeconds = 120;

std::uint64_t RealtimeNs() {
  timespec now{};
  ::clock_gettime(CLOCK_REALTIME, &now);
  return static_cast<std::uint64_t>(now.tv_sec) * 1000000000 + static_cast<std::uint64_t>(now.tv_nsec);
}

std::string Hex(std::uint64_t value) {
  char text[17];
  std::snprintf(text, sizeof(text), "%016llx", static_cast<unsigned long long>(value));
  return text;
}

// The configuration, with the node id of the state directory's last daemon if there is one:
// its identity on peers (and in the sessions they keep for it) stays the same.
DaemonConfig WithSavedIdentity(DaemonConfig config) {
  if (config.state_dir.empty() || config.local_store_bytes == 0) return config;
  if (const std::optional<SavedState> saved = LoadState(config.state_dir)) {
    config.node_id = saved->node_id;
  }
  return config;
}

}  // namespace

Daemon::Daemon(const DaemonConfig& given) : config_(WithSavedIdentity(given)), host_(ReadHostMemory()) {
  const DaemonConfig& config = config_;
  keep_state_ = config.keep_state_on_exit;
  const bool serves_devices = config.local_store_bytes > 0;
  // A lender is locked too: a swap device (this host's or a borrower's) may hold pages in its
  // pool, and a pool page that is itself swapped out, onto a device that needs this lender,
  // would never come back.
  const bool swap_critical = serves_devices || config.lend_bytes > 0;
  locks_memory_ = swap_critical && config.lock_memory;
  if (!config.force) {
    const std::string refusal = CheckReservation(host_, locks_memory_, Reservations());
    if (!refusal.empty()) throw std::runtime_error(refusal);
  }
  if (locks_memory_) PrepareForSwap();
  if (serves_devices) {
    std::optional<SavedState> saved;
    if (!config.state_dir.empty()) {
      LockStateDir();
      saved = LoadState(config.state_dir);
    }
    std::vector<void*> tables;
    std::unique_ptr<LocalStore> local;
    if (config.state_dir.empty()) {
      local = std::make_unique<LocalStore>(config.local_store_bytes, config.compression);
    } else {
      local = std::make_unique<LocalStore>(OpenState(saved, &tables), config.local_store_bytes,
                                           config.compression);
    }
    std::unique_ptr<DiskStore> disk;
    if (!config.backing_file.empty()) {
      // After a restart its slots hold the pages the page tables name: kept, not truncated.
      disk = std::make_unique<DiskStore>(config.backing_file, config.backing_size_bytes,
                                         config.backing_direct, /*keep=*/saved.has_value());
    }
    DiskStore* const disk_store = disk.get();
    std::unique_ptr<PlacementStore> remote;
    PageStore* cache = nullptr;
    if (!config.peers.empty()) {
      peer::PeerStoreOptions peer_options;
      peer_options.request_timeout = std::chrono::milliseconds(config.peer_timeout_ms);
      peer_options.down_after = std::chrono::milliseconds(config.peer_down_after_ms);
      auto peers = std::make_unique<peer::PeerStore>(config.node_id, peer_options);
      if (saved) {
        // The same peers at the same indices (slots name peers by index), each with the
        // session the last daemon had, to resume.
        for (const SavedPeer& peer : saved->peers) {
          std::string error;
          const std::optional<Endpoint> endpoint = ParseEndpoint(peer.address, &error);
          if (!endpoint) throw std::runtime_error("--state-dir: peer " + peer.address + ": " + error);
          peer::Membership::SessionState session{peer.address, peer.generation, std::nullopt};
          session.secret = SecretFromHex(peer.secret_hex);
          peers->members().Restore(*endpoint, session,
                                   std::max(std::chrono::milliseconds(config.peer_down_after_ms),
                                            std::chrono::milliseconds(10000)));
        }
      }
      for (const Endpoint& endpoint : config.peers) peers->AddPeer(endpoint);  // -EEXIST: kept
      peers_ = peers.get();
      // Sealed pages are not cached on lenders: the cache sends clean pages as they are.
      if (!config.seal_pages) cache = &peers->cache();
      // The placement store keeps disk copies in the disk store (which Tiering owns and
      // destroys after it), for replicas:N+disk and for pages with nowhere else to go.
      remote = std::make_unique<PlacementStore>(std::move(peers), disk.get(),
                                                config.rebuild_rate);
      placements_ = remote.get();
      if (state_) PersistPlacements(saved);
      if (config.seal_pages) {
        StateSegment::SealMaterial* material = nullptr;
        if (state_) {
          material = &segments_.front()->seal_material();  // the arena's header
        } else {
          own_seal_ = std::make_unique<StateSegment::SealMaterial>();
          material = own_seal_.get();
          material->present = 0;
        }
        // No key yet, also after a restart whose last daemon died before it made one: then
        // nothing was sealed (writes begin only after this), so a new key is safe.
        if (material->present != 1) {
          const PageSealer::Key key = PageSealer::NewKey();
          std::memcpy(material->key, key.data(), key.size());
          std::random_device random;
          material->salt = random();
          material->counter.store(0, std::memory_order_relaxed);
          material->present = 1;
        }
        PageSealer::Key key;
        std::memcpy(key.data(), material->key, key.size());
        remote->EnableSealing(std::make_unique<PageSealer>(key, material->salt), config.node_id,
                              &material->counter);
      }
    }
    TieringOptions options;
    options.high_watermark = config.high_watermark;
    options.low_watermark = config.low_watermark;
    tiers_ = std::make_unique<Tiering>(std::move(local), std::move(remote), std::move(disk),
                                       options, cache);
    std::vector<std::shared_ptr<Device>> made;
    for (std::size_t i = 0; i < config.devices.size(); ++i) {
      const DeviceSpec& spec = config.devices[i];
      made.push_back(tables.empty()
                         ? std::make_shared<Device>(spec.name, spec.size_bytes, *tiers_,
                                                    spec.cache_clean_pages, config.redundancy)
                         : std::make_shared<Device>(spec.name, spec.size_bytes, *tiers_,
                                                    spec.cache_clean_pages, config.redundancy,
                                                    tables[i], /*fresh=*/!saved));
      devices_.Add(made.back());
    }
    std::vector<bool> referenced;  // placement ids the page tables name
    if (saved && placements_ != nullptr) tiers_->SetRemoteReferences(&referenced);
    if (saved) {
      for (const SavedAttached& attached : saved->attached) {
        std::string error;
        std::unique_ptr<StateSegment> segment =
            StateSegment::Attach(attached.segment_id, Device::PageTableBytes(attached.size_bytes),
                                 saved->instance, locks_memory_, &error);
        if (!segment) {
          throw std::runtime_error("--state-dir " + config.state_dir + ": attached device " +
                                   attached.name + ": " + error);
        }
        auto device = std::make_shared<Device>(
            attached.name, attached.size_bytes, *tiers_, /*cache_clean_pages=*/true,
            Redundancy{attached.copies, attached.disk}, segment->data(), /*fresh=*/false);
        attached_segments_[attached.name] = std::move(segment);
        devices_.Add(device);
        made.push_back(device);
        to_recover_.push_back({attached, device});
      }
      RecoverDevices(made, referenced, disk_store);
    }
    tiers_->SetRemoteReferences(nullptr);
    if (peers_ != nullptr) {
      if (state_) {
        peers_->members().SetSessionListener([this] { SavePeers(); });
        SavePeers();
      }
      peers_->Refresh();  // connect (or resume) and learn free space now; unreachable peers retry
    }
    if (config.serve_nbd) {
      nbd::NbdServerOptions options = NbdOptions();
      options.access = config.nbd_access;
      nbd_ = std::make_unique<nbd::NbdServer>(config.nbd, devices_, options);
    }
  }
  if (config.lend_bytes > 0) {
    peer::LenderOptions options;
    options.max_borrowers = config.max_borrowers;
    options.max_superpages_per_borrower =
        static_cast<std::uint32_t>(config.max_lend_per_borrower_bytes / peer::kSuperpageBytes);
    options.borrower_grace = std::chrono::milliseconds(config.borrower_grace_ms);
    options.realtime = locks_memory_;  // replies may be what a swapping host waits for
    lender_ = std::make_unique<peer::LenderService>(config.listen, config.lend_bytes,
                                                    config.node_id, options);
    lender_->SetLockMemory(locks_memory_);
    lend_size_bytes_.store(lender_->Stats().max_bytes);
    pressure_ = std::make_unique<PoolPressure>(lender_->Stats().max_bytes);
    reclaim_below_bytes_.store(config.reclaim_below_bytes);
    if (config.reclaim_pressure > 0 && !ReadMemoryPressure()) {
      throw std::runtime_error(
          "--reclaim-pressure: this kernel reports no memory pressure (/proc/pressure/memory "
          "is missing or unreadable: it needs CONFIG_PSI, and psi=1 where it is off by default); "
          "use --reclaim-below SIZE instead");
    }
    reclaim_deadline_ms_.store(config.drain_deadline_ms);
  }
  control_ = std::make_unique<ControlServer>(
      config.control_path, [this](const ControlRequest& request) { return HandleControl(request); });
  if (locks_memory_) LockMemory();
}

nbd::NbdServerOptions Daemon::NbdOptions() const {
  nbd::NbdServerOptions options;
  options.busy_poll = std::chrono::microseconds(config_.busy_poll_us);
  options.max_connections = config_.max_connections;
  return options;
}

std::vector<Reservation> Daemon::Reservations() const {
  std::vector<Reservation> parts = {{"--local-store", config_.local_store_bytes},
                                    {"--lend", config_.lend_bytes}};
  if (locks_memory_) parts.push_back({"locked heap reserve", kHeapReserveBytes});
  // Connections are not reservations: what they may hold is bounded by --max-connections
  // and --max-borrowers (6.5 and 7.3 MiB each at most), and taken only while they are open.
  std::uint64_t tables = 0;
  std::lock_guard lock(frontends_mu_);
  for (const auto& [name, frontend] : frontends_) {
    if (const std::shared_ptr<Device> device = devices_.Find(name)) {
      tables += PageTableBytes(device->size_bytes());
    }
  }
  if (tables > 0) parts.push_back({"attached devices' page tables", tables});
  return parts;
}

Redundancy Daemon::DefaultRedundancy() const {
  if (config_.redundancy_given) return config_.redundancy;
  std::size_t peers = 0;
  if (peers_ != nullptr) {
    for (const peer::PeerInfo& peer : peers_->Peers()) {
      if (peer.state != peer::PeerState::kRemoving && peer.state != peer::PeerState::kRemoved) {
        ++peers;
      }
    }
  }
  if (peers >= 2) return Redundancy{2, false};
  if (tiers_ != nullptr && tiers_->disk() != nullptr) return Redundancy{0, true};
  return Redundancy{1, false};
}

void Daemon::PrepareForSwap() {
  // One malloc arena, which never returns memory to the system and never maps blocks of
  // their own: the reserve LockMemory faults in then serves every later allocation without
  // a page fault, which under memory pressure could wait on the very device we serve.
  ::mallopt(M_ARENA_MAX, 1);
  ::mallopt(M_MMAP_MAX, 0);
  ::mallopt(M_TRIM_THRESHOLD, std::numeric_limits<int>::max());
  pthread_attr_t attr;
  if (pthread_attr_init(&attr) == 0) {
    if (pthread_attr_setstacksize(&attr, kLockedStackBytes) == 0) {
      pthread_setattr_default_np(&attr);
    }
    pthread_attr_destroy(&attr);
  }
  // Threads created from here on inherit the flag: memory they allocate is never reclaimed
  // by writing to a block device (which could be this daemon's own), and they are not
  // throttled for dirty pages of other devices.
  if (::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0) {
    swap_warnings_.push_back(std::string("warning: PR_SET_IO_FLUSHER failed (") +
                             std::strerror(errno) +
                             "; needs CAP_SYS_RESOURCE): under memory pressure a swap device "
                             "served by this daemon may deadlock");
  }
}

void Daemon::LockMemory() {
  // Without CAP_IPC_LOCK, locked memory is bounded by RLIMIT_MEMLOCK, and with MCL_FUTURE
  // every later allocation past it would fail; lock only what exists then.
  rlimit limit{};
  ::getrlimit(RLIMIT_MEMLOCK, &limit);
  const bool unbounded = HasCapIpcLock() || limit.rlim_cur == RLIM_INFINITY;
  const int flags = unbounded ? MCL_CURRENT | MCL_FUTURE : MCL_CURRENT;
  if (::mlockall(flags) != 0) {
    const int error = errno;
    ::munlockall();
    swap_warnings_.push_back(std::string("warning: mlockall failed (") + std::strerror(error) +
                             "): the daemon's memory may be swapped out, which can deadlock a "
                             "swap device it serves; give it CAP_IPC_LOCK or a RLIMIT_MEMLOCK "
                             "(ulimit -l) above its local store, or pass --no-mlock");
    return;
  }
  if (unbounded) {
    // Grow the heap by the reserve and give it back to malloc: it stays mapped, resident
    // and locked (see PrepareForSwap).
    if (void* reserve = std::malloc(kHeapReserveBytes)) {
      std::memset(reserve, 0, kHeapReserveBytes);
      std::free(reserve);
    }
  } else {
    swap_warnings_.push_back("warning: without CAP_IPC_LOCK only memory allocated at startup is "
                             "locked (RLIMIT_MEMLOCK " + FormatSize(limit.rlim_cur) + ")");
  }
}

Daemon::~Daemon() { Stop(); }

void Daemon::LockStateDir() {
  const std::string& dir = config_.state_dir;
  // One daemon at a time: held until this process ends. A daemon started while the last
  // one is still on its way out (an upgrade) waits for it a little.
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    throw std::runtime_error("cannot make the state directory " + dir + ": " +
                             std::strerror(errno));
  }
  state_lock_ = UniqueFd(::open((dir + "/lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!state_lock_.valid()) {
    throw std::runtime_error("cannot open " + dir + "/lock: " + std::strerror(errno));
  }
  for (int tries = 0; ::flock(state_lock_.get(), LOCK_EX | LOCK_NB) != 0; ++tries) {
    if (errno != EWOULDBLOCK || tries == 100) {
      throw std::runtime_error("--state-dir " + dir + " is in use by another daemon");
    }
    if (tries == 0) LogError("waiting for the daemon that holds %s to end", dir.c_str());
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

std::byte* Daemon::OpenState(const std::optional<SavedState>& saved,
                             std::vector<void*>* tables) {
  const std::string& dir = config_.state_dir;
  const std::uint64_t arena_bytes = LocalStore::ArenaBytes(config_.local_store_bytes);
  if (saved) {
    const std::string difference = CompareState(*saved, config_);
    if (!difference.empty()) {
      throw std::runtime_error("--state-dir " + dir + " keeps the pages of another "
                               "configuration: " + difference + ". Start with the options it "
                               "was made with, or remove " + dir + "/state.json to start afresh");
    }
    const auto attach = [&](int id, std::uint64_t bytes) {
      std::string error;
      std::unique_ptr<StateSegment> segment =
          StateSegment::Attach(id, bytes, saved->instance, locks_memory_, &error);
      if (!segment) {
        throw std::runtime_error("--state-dir " + dir + ": " + error + ". Remove " + dir +
                                 "/state.json to start afresh");
      }
      segments_.push_back(std::move(segment));
      return segments_.back()->data();
    };
    std::byte* arena = attach(saved->arena_segment_id, arena_bytes);
    for (const SavedDevice& device : saved->devices) {
      tables->push_back(attach(device.segment_id, Device::PageTableBytes(device.size_bytes)));
    }
    LogError("recovering the page store kept in %s", dir.c_str());
    state_ = saved;
    const std::uint64_t alive = segments_.front()->alive_ns().load();
    const std::uint64_t now = RealtimeNs();
    state_->last_gap_ms = alive != 0 && now > alive ? (now - alive) / 1000000 : 0;
    ++state_->restarts;
    const auto taken_over = [&](SavedRestarts& history) {
      ++history.restarts;
      history.last_gap_ms = state_->last_gap_ms;
    };
    for (SavedDevice& device : state_->devices) taken_over(device.history);
    for (SavedAttached& device : state_->attached) taken_over(device.history);
    SaveState(dir, *state_);
    return arena;
  }
  std::random_device random;
  SavedState state = StateFor(config_, std::uint64_t{random()} << 32 | random());
  try {
    segments_.push_back(StateSegment::Create(arena_bytes, state.instance, locks_memory_));
    state.arena_segment_id = segments_.back()->id();
    for (SavedDevice& device : state.devices) {
      segments_.push_back(StateSegment::Create(Device::PageTableBytes(device.size_bytes),
                                               state.instance, locks_memory_));
      device.segment_id = segments_.back()->id();
      tables->push_back(segments_.back()->data());
    }
    SaveState(dir, state);
    state_ = state;
  } catch (const std::exception& e) {
    for (const std::unique_ptr<StateSegment>& segment : segments_) segment->Remove();
    segments_.clear();
    throw std::runtime_error(std::string("--state-dir ") + dir + ": " + e.what());
  }
  return segments_.front()->data();
}

void Daemon::RecoverDevices(const std::vector<std::shared_ptr<Device>>& devices,
                            const std::vector<bool>& referenced, DiskStore* disk) {
  std::uint64_t remote = 0;
  std::uint64_t invalid = 0;
  for (const std::shared_ptr<Device>& device : devices) {
    const Device::Recovery found = device->Recover();
    remote += found.unrecoverable;
    invalid += found.invalid;
    LogError("recovered %s: %llu pages (%llu in the local store, %llu on disk, %llu on peers)",
             device->name().c_str(), static_cast<unsigned long long>(found.mapped),
             static_cast<unsigned long long>(found.local),
             static_cast<unsigned long long>(found.disk),
             static_cast<unsigned long long>(found.remote));
  }
  if (placements_ != nullptr && remote == 0) {
    const std::uint64_t kept = placements_->Recover(
        referenced, [disk](Slot slot) { return disk != nullptr && disk->Adopt(slot); });
    LogError("recovered %llu placements of pages on peers; resuming the peers' sessions",
             static_cast<unsigned long long>(kept));
  }
  if (remote > 0) {
    // Nothing is released: the state stays as it is for a daemon that can recover it.
    for (const std::shared_ptr<Device>& device : devices) device->KeepPagesOnExit();
    throw std::runtime_error(
        "--state-dir " + config_.state_dir + ": " + std::to_string(remote) +
        " pages were on peers, which a restart cannot recover yet; remove " + config_.state_dir +
        "/state.json to start afresh (their data is lost)");
  }
  if (invalid > 0) {
    LogError("warning: %llu page-table entries named room that cannot be theirs; "
             "those pages read as zeros",
             static_cast<unsigned long long>(invalid));
  }
  tiers_->FinishAdopt();
}

void Daemon::Stop() {
  {
    std::lock_guard lock(refresh_mu_);
    stopping_ = true;
  }
  refresh_cv_.notify_all();
  reclaim_cv_.notify_all();
  alive_cv_.notify_all();
  if (alive_.joinable()) alive_.join();
  if (refresher_.joinable()) refresher_.join();
  if (reclaimer_.joinable()) reclaimer_.join();
  if (control_) control_->Stop();
  if (keep_state_ && state_ && peers_ != nullptr) {
    peers_->members().KeepSessionsOnExit();  // the lenders keep them for the next daemon
  }
  if (keep_state_ && state_) {
    // ublk devices stay, quiesced, for the next daemon: their frontends are never torn
    // down (the process ends without destroying what their queues use: leaves_devices()).
    std::lock_guard lock(frontends_mu_);
    for (auto it = attach_order_.begin(); it != attach_order_.end();) {
      std::unique_ptr<BlockFrontend>& frontend = frontends_[*it];
      if (frontend && (frontend->kind() == "ublk" || frontend->kind() == "nbd")) {
        LogError("leaving %s (%s) for the next daemon", it->c_str(), frontend->path().c_str());
        frontend.release();  // NOLINT(bugprone-unused-return-value): left on purpose
        frontends_.erase(*it);
        it = attach_order_.erase(it);
        leaves_devices_ = true;
      } else {
        ++it;
      }
    }
  }
  // Block devices first: their last requests still reach the NBD servers.
  DetachAll();
  if (private_nbd_) private_nbd_->Stop();
  ::rmdir((config_.control_path + ".fuse").c_str());  // made by FuseMountRoot; empty now
  if (nbd_) nbd_->Stop();
  if (lender_) lender_->Stop();
  if (!segments_.empty()) {
    if (keep_state_) {
      for (const std::shared_ptr<Device>& device : devices_.List()) device->KeepPagesOnExit();
      LogError("the pages stay in %s for the next daemon (--on-exit keep)",
               config_.state_dir.c_str());
    } else {
      // Each goes when this process detaches it, after the devices and stores let go.
      for (const std::unique_ptr<StateSegment>& segment : segments_) segment->Remove();
      for (const auto& [name, segment] : attached_segments_) segment->Remove();
      for (const auto& [chunk, segment] : placement_segments_) segment->Remove();
      RemoveState(config_.state_dir);
    }
  }
}

void Daemon::RefreshLoop() {
  // Heartbeats every peer timeout; reconnects and free-space queries every kRefreshInterval,
  // and at once after a membership change (a peer added connects now).
  const auto tick = peers_->options().request_timeout;
  auto next_refresh = std::chrono::steady_clock::now() + kRefreshInterval;
  std::unique_lock lock(refresh_mu_);
  for (;;) {
    refresh_cv_.wait_for(lock, tick, [this] { return stopping_ || refresh_now_; });
    if (stopping_) return;
    const bool now = std::exchange(refresh_now_, false);
    lock.unlock();
    peers_->Heartbeat();
    if (now || std::chrono::steady_clock::now() >= next_refresh) {
      peers_->Refresh();
      next_refresh = std::chrono::steady_clock::now() + kRefreshInterval;
    }
    lock.lock();
  }
}

void Daemon::ReclaimLoop() {
  std::unique_lock lock(refresh_mu_);
  while (!stopping_) {
    lock.unlock();
    try {
      AdjustPool();
    } catch (const std::exception& e) {  // out of memory for the lists of what to ask back
      LogError("lender: resizing the pool failed: %s; trying again in a second", e.what());
    }
    lender_->SendPendingReclaims();  // to borrowers whose sockets were full
    lender_->ExpireParked();         // borrowers that did not come back in time
    lock.lock();
    reclaim_cv_.wait_for(lock, std::chrono::seconds(1), [this] { return stopping_; });
  }
}

void Daemon::AdjustPool() {
  std::lock_guard lock(adjust_mu_);
  const peer::LendingStats stats = lender_->Stats();
  const std::uint64_t size = lend_size_bytes_.load(std::memory_order_acquire);
  PoolReading reading;
  reading.total_bytes = stats.total_bytes;
  reading.target_bytes = stats.target_bytes;
  reading.max_bytes = stats.max_bytes;
  reading.used_bytes = stats.used_bytes;
  reading.reclaim_below_bytes = reclaim_below_bytes_.load(std::memory_order_acquire);
  if (reading.reclaim_below_bytes > 0) reading.available_bytes = ReadMemAvailable();
  reading.reclaim_pressure = config_.reclaim_pressure;
  if (reading.reclaim_pressure > 0) reading.pressure = ReadMemoryPressure();
  reading.now = std::chrono::steady_clock::now();
  if (const std::string line = pressure_->Update(reading, size); !line.empty()) {
    LogError("%s", line.c_str());
  }
  const std::uint64_t target =
      std::min(size, pressure_->allowed_bytes()) / peer::kSuperpageBytes * peer::kSuperpageBytes;
  if (target != stats.target_bytes) {
    lender_->Resize(target,
                    std::chrono::milliseconds(reclaim_deadline_ms_.load(std::memory_order_acquire)));
  }
}

nlohmann::json Daemon::Lend(const LendRequest& request) {
  if (!lender_) throw std::runtime_error("this daemon lends nothing (no --lend): no pool to resize");
  const std::uint64_t max = lender_->Stats().max_bytes;
  if (request.size_bytes && *request.size_bytes > max) {
    throw std::runtime_error("the pool can grow to " + FormatSize(max) +
                             " at most (its --lend size); start the daemon with a larger --lend "
                             "to lend more");
  }
  if (request.deadline_ms) {
    reclaim_deadline_ms_.store(*request.deadline_ms, std::memory_order_release);
  }
  if (request.size_bytes) lend_size_bytes_.store(*request.size_bytes, std::memory_order_release);
  if (request.reclaim_below_bytes) {
    reclaim_below_bytes_.store(*request.reclaim_below_bytes, std::memory_order_release);
  }
  AdjustPool();
  const peer::LendingStats stats = lender_->Stats();
  return {{"ok", true},
          {"target_bytes", stats.target_bytes},
          {"total_bytes", stats.total_bytes},
          {"max_bytes", stats.max_bytes},
          {"reclaim_below_bytes", reclaim_below_bytes_.load(std::memory_order_acquire)}};
}

void Daemon::RefreshSoon() {
  {
    std::lock_guard lock(refresh_mu_);
    refresh_now_ = true;
  }
  refresh_cv_.notify_all();
}

void Daemon::BlockShutdownSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

void Daemon::Run() {
  for (const std::string& warning : swap_warnings_) LogError("%s", warning.c_str());
  if (tiers_) tiers_->StartEvictor();
  if (!segments_.empty()) {
    alive_ = std::thread([this] {
      SetThreadName("ml-alive");
      std::unique_lock lock(refresh_mu_);
      while (!stopping_) {
        segments_.front()->alive_ns().store(RealtimeNs(), std::memory_order_relaxed);
        alive_cv_.wait_for(lock, std::chrono::milliseconds(100), [this] { return stopping_; });
      }
    });
  }
  if (placements_) placements_->Start();
  if (peers_) {
    refresher_ = std::thread([this] {
      SetThreadName("ml-refresh");
      // Its heartbeats and frees share the peers' sockets with the requests a swapping host
      // waits for: a send that reclaims memory with the socket locked holds them all up (seen
      // under whole-system memory pressure in the VM: 20 s). As the serving threads do, it may
      // then allocate a little below the min watermark (common/realtime.h).
      if (locks_memory_) UseRealtimeScheduling();
      RefreshLoop();
    });
  }
  if (nbd_) nbd_->Start();
  if (lender_) {
    lender_->Start();
    reclaimer_ = std::thread([this] {
      SetThreadName("ml-reclaim");
      ReclaimLoop();
    });
  }
  try {
    RecoverAttached();
  } catch (const std::exception&) {
    keep_state_ = true;  // what could not be taken over stays for another try
    Stop();
    throw;
  }
  control_->Start();
  std::string what;
  if (nbd_) {
    what += "NBD on " + config_.nbd.ToString() + " (" + std::to_string(config_.devices.size()) +
            " device(s), " + std::to_string(config_.peers.size()) + " peer(s)), ";
  } else if (tiers_) {
    what += "devices by memlend attach (" + std::to_string(config_.peers.size()) + " peer(s)), ";
  }
  if (lender_) {
    what += "lending " + std::to_string(config_.lend_bytes >> 20) + " MiB on " +
            config_.listen.ToString() + ", ";
  }
  LogError("ready: node %s, %scontrol on %s", Hex(config_.node_id).c_str(), what.c_str(),
           config_.control_path.c_str());

  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  int signal_number = 0;
  while (sigwait(&set, &signal_number) != 0) {
  }
  const bool asked = drain_asked_.load(std::memory_order_acquire);
  if (!asked) LogError("%s received, shutting down", strsignal(signal_number));
  if (lender_) {
    // Repatriation: borrowers move what they keep here before this lender goes.
    const std::uint64_t deadline_ms =
        asked ? drain_deadline_ms_.load(std::memory_order_acquire) : config_.drain_deadline_ms;
    LogError("lender: draining: borrowers have %llu ms to move %llu pages off",
             static_cast<unsigned long long>(deadline_ms),
             static_cast<unsigned long long>(lender_->Stats().held_pages));
    const std::uint64_t left = lender_->Drain(std::chrono::steady_clock::now() +
                                              std::chrono::milliseconds(deadline_ms));
    drain_left_.store(left, std::memory_order_release);
    drain_done_.store(true, std::memory_order_release);
    if (left == 0) {
      LogError("lender: drained: borrowers moved every page");
    } else {
      LogError("lender: the drain's deadline passed with %llu pages still held; they are lost "
               "to their borrowers", static_cast<unsigned long long>(left));
    }
    // `memlend drain` learns the outcome from a status request: give it a moment to ask.
    for (int i = 0; asked && i < 40 && !drain_result_read_.load(std::memory_order_acquire); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  Stop();
}

nlohmann::json Daemon::StartDrain(const DrainRequest& request) {
  if (!lender_) throw std::runtime_error("this daemon lends nothing (no --lend): nothing to drain");
  if (!drain_asked_.exchange(true)) {
    drain_deadline_ms_.store(request.deadline_ms, std::memory_order_release);
    ::kill(::getpid(), SIGTERM);  // the main thread drains, then stops
  }
  return {{"ok", true}, {"draining", true}, {"deadline_ms", drain_deadline_ms_.load()}};
}

nlohmann::json Daemon::AddPeer(const PeerAddRequest& request) {
  if (peers_ == nullptr) {
    throw std::runtime_error("this daemon has no remote tier: start it with --local-store and at "
                             "least one --peer (a lender that is down for now will do)");
  }
  const std::string address = request.address.ToString();
  const int rc = peers_->AddPeer(request.address);
  if (rc == -EEXIST) throw std::runtime_error(address + " is a peer already");
  if (rc == -ENOSPC) {
    throw std::runtime_error("cannot add " + address + ": " +
                             std::to_string(peer::PeerStore::kMaxPeers) +
                             " peers were added already");
  }
  RefreshSoon();  // connect it now, not at the next refresh
  return {{"ok", true}, {"address", address}};
}

nlohmann::json Daemon::RemovePeer(const PeerRemoveRequest& request) {
  const std::string address = request.address.ToString();
  if (peers_ == nullptr || peers_->RemovePeer(request.address) != 0) {
    throw std::runtime_error(address + " is not a peer");
  }
  RefreshSoon();
  return {{"ok", true}, {"address", address}, {"removing", true}};
}

nlohmann::json Daemon::HandleControl(const ControlRequest& request) {
  struct Dispatch {
    Daemon& daemon;
    nlohmann::json operator()(const StatusRequest&) const { return daemon.Status(); }
    nlohmann::json operator()(const PeersRequest&) const { return daemon.PeersJson(); }
    nlohmann::json operator()(const AttachRequest& attach) const { return daemon.Attach(attach); }
    nlohmann::json operator()(const DetachRequest& detach) const { return daemon.Detach(detach); }
    nlohmann::json operator()(const DrainRequest& drain) const { return daemon.StartDrain(drain); }
    nlohmann::json operator()(const PeerAddRequest& add) const { return daemon.AddPeer(add); }
    nlohmann::json operator()(const LendRequest& lend) const { return daemon.Lend(lend); }
    nlohmann::json operator()(const PeerRemoveRequest& remove) const {
      return daemon.RemovePeer(remove);
    }
  };
  return std::visit(Dispatch{*this}, request);
}

nlohmann::json Daemon::PeersJson() const {
  nlohmann::json peers = nlohmann::json::array();
  if (peers_ != nullptr) {
    for (const peer::PeerInfo& info : peers_->Peers()) {
      peers.push_back({{"node_id", info.node_id == 0 ? std::string("-") : Hex(info.node_id)},
                       {"address", info.address},
                       {"state", peer::PeerStateName(info.state)},
                       {"pool_total_bytes", info.pool_total_bytes},
                       {"pool_free_bytes", info.pool_free_bytes},
                       {"pages_stored", info.pages_stored},
                       {"pages_cached", info.pages_cached},
                       {"superpages_held", info.superpages_held},
                       {"superpages_reclaimed", info.superpages_reclaimed},
                       {"pages_lost", info.pages_lost},
                       {"integrity_failures", info.integrity_failures},
                       {"rtt_us", info.rtt_us},
                       {"error", info.last_error}});
    }
  }
  return {{"ok", true}, {"peers", peers}};
}

nlohmann::json Daemon::Status() const {
  nlohmann::json status = {{"ok", true},
                           {"node_id", Hex(config_.node_id)},
                           {"devices", nlohmann::json::array()},
                           {"local_store", nullptr},
                           {"remote_store", nullptr},
                           {"disk_store", nullptr},
                           {"peers", PeersJson()["peers"]}};
  const peer::LendingStats lending = lender_ ? lender_->Stats() : peer::LendingStats{};
  status["lending"] = {{"total_bytes", lending.total_bytes},
                       {"target_bytes", lending.target_bytes},
                       {"max_bytes", lending.max_bytes},
                       {"reclaiming_bytes", lending.reclaiming_bytes},
                       {"reclaim_below_bytes", reclaim_below_bytes_.load(std::memory_order_relaxed)},
                       {"reclaim_pressure_percent", config_.reclaim_pressure},
                       {"used_bytes", lending.used_bytes},
                       {"ephemeral_bytes", lending.ephemeral_bytes},
                       {"borrowers", lending.borrowers},
                       {"sessions", lender_ ? lender_->sessions() : 0},
                       {"max_borrowers", lender_ ? config_.max_borrowers : 0},
                       {"held_pages", lending.held_pages},
                       {"draining", lending.draining},
                       {"borrower_grace_s", lender_ ? config_.borrower_grace_ms / 1000 : 0},
                       {"max_lend_per_borrower_bytes", config_.max_lend_per_borrower_bytes}};
  if (lender_) {
    // What each borrower node holds, across its sessions (live and parked).
    std::map<std::uint64_t, std::pair<std::uint64_t, unsigned>> by_node;  // pages, sessions
    for (const peer::BorrowerHolding& holding : lender_->Holdings()) {
      auto& [pages, sessions] = by_node[holding.node_id];
      pages += holding.pages;
      ++sessions;
    }
    nlohmann::json borrowers = nlohmann::json::array();
    for (const auto& [node, held] : by_node) {
      borrowers.push_back({{"node_id", Hex(node)}, {"pages", held.first}, {"sessions", held.second}});
    }
    status["lending"]["by_borrower"] = std::move(borrowers);
    nlohmann::json parked = nlohmann::json::array();
    for (const peer::ParkedSession& session : lender_->Parked()) {
      parked.push_back({{"node_id", Hex(session.node_id)},
                        {"pages", session.pages},
                        {"seconds_left", (session.left.count() + 999) / 1000}});
    }
    status["lending"]["parked"] = std::move(parked);
  }
  if (lending.draining) {
    nlohmann::json holdings = nlohmann::json::array();
    for (const peer::BorrowerHolding& holding : lender_->Holdings()) {
      holdings.push_back({{"node_id", Hex(holding.node_id)}, {"pages", holding.pages}});
    }
    status["lending"]["holdings"] = std::move(holdings);
    const bool done = drain_done_.load(std::memory_order_acquire);
    status["lending"]["drain_done"] = done;
    status["lending"]["drain_pages_left"] = drain_left_.load(std::memory_order_acquire);
    if (done) drain_result_read_.store(true, std::memory_order_release);
  }
  status["state"] = nullptr;
  // Each kept device's restarts, by name.
  std::map<std::string, SavedRestarts> histories;
  if (state_) {
    std::lock_guard lock(state_mu_);
    status["state"] = {{"dir", config_.state_dir},
                       {"restarts", state_->restarts},
                       {"last_gap_ms", state_->last_gap_ms},
                       {"kept_devices", state_->devices.size() + state_->attached.size()}};
    for (const SavedDevice& device : state_->devices) histories[device.name] = device.history;
    for (const SavedAttached& device : state_->attached) histories[device.name] = device.history;
  }
  status["nbd"] = nullptr;
  if (nbd_) {
    status["nbd"] = {{"connections", nbd_->connections()},
                     {"max_connections", config_.max_connections}};
  }
  if (!tiers_) return status;

  std::map<std::string, std::pair<std::string, std::string>> attached;
  {
    std::lock_guard lock(frontends_mu_);
    for (const auto& [name, frontend] : frontends_) {
      attached[name] = {std::string(frontend->kind()), frontend->path()};
    }
  }
  for (const auto& device : devices_.List()) {
    const DevicePageCounts counts = device->Counts();
    const DeviceIoCounts io = device->IoCounts();
    const auto frontend = attached.find(device->name());
    const bool is_attached = frontend != attached.end();
    const auto history = histories.find(device->name());
    const SavedRestarts restarts = history != histories.end() ? history->second : SavedRestarts{};
    status["devices"].push_back({{"name", device->name()},
                                 {"restarts", restarts.restarts},
                                 {"last_gap_ms", restarts.last_gap_ms},
                                 {"frontend", is_attached ? nlohmann::json(frontend->second.first)
                                                          : nlohmann::json(nullptr)},
                                 {"path", is_attached ? nlohmann::json(frontend->second.second)
                                                      : nlohmann::json(nullptr)},
                                 {"size_bytes", device->size_bytes()},
                                 {"protocol", device->cache_clean_pages() ? "auto" : "passive"},
                                 {"redundancy", RedundancyName(device->redundancy())},
                                 {"pages",
                                  {{"total", counts.total},
                                   {"mapped", counts.mapped()},
                                   {"zero", counts.zero},
                                   {"local", counts.local},
                                   {"disk", counts.disk},
                                   {"remote", counts.remote},
                                   {"cached", counts.cached},
                                   {"clean", counts.clean},
                                   {"remote_copies", counts.remote_copies}}},
                                 {"io",
                                  {{"remote_reads", io.remote_reads},
                                   {"remote_read_trips", io.remote_read_trips},
                                   {"remote_writes", io.remote_writes},
                                   {"remote_write_trips", io.remote_write_trips},
                                   {"written_around", io.written_around},
                                   {"promotions", io.promotions},
                                   {"prefetched", io.prefetched},
                                   {"prefetch_hits", io.prefetch_hits},
                                   {"prefetch_wasted", io.prefetch_wasted},
                                   {"read_ahead_trips", io.read_ahead_trips}}}});
  }
  const StoreStats local = tiers_->local().Stats();
  const double ratio = local.used_bytes == 0
                           ? 1.0
                           : static_cast<double>(local.pages * kPageSize) /
                                 static_cast<double>(local.used_bytes);
  status["local_store"] = {
      {"total_bytes", local.total_bytes},
      {"used_bytes", local.used_bytes},
      {"pages", local.pages},
      {"compression", tiers_->local().compression() == Compression::kLz4 ? "lz4" : "none"},
      {"compression_ratio", ratio},
      {"evicted_pages", tiers_->evicted_pages()}};
  if (const PageStore* remote = tiers_->remote()) {
    const StoreStats stats = remote->Stats();
    const StoreStats cached = tiers_->cache() ? tiers_->cache()->Stats() : StoreStats{};
    const PlacementStats placed = placements_ ? placements_->Placements() : PlacementStats{};
    status["remote_store"] = {{"pages", stats.pages},
                              {"lost_pages", placed.lost},
                              {"copies", placed.copies},
                              {"degraded_pages", placed.degraded},
                              {"rebuilt_copies", placed.rebuilt},
                              {"moved_copies", placed.moved},
                              // pages whose placement has a copy in the backing file too
                              {"disk_copies", placed.disk_copies},
                              {"sealed", placements_ != nullptr && placements_->sealing()},
                              {"integrity_failures", placed.integrity_failures},
                              {"rebuild_copies_per_s", std::round(placed.copies_per_s)},
                              // null while nothing is degraded, -1 while no progress is made
                              {"rebuild_eta_s", placed.degraded == 0
                                                    ? nlohmann::json(nullptr)
                                                    : nlohmann::json(std::ceil(placed.eta_s))},
                              {"cached_pages", cached.pages},
                              {"used_bytes", stats.used_bytes},
                              {"total_bytes", stats.total_bytes}};
  }
  if (const DiskStore* disk = tiers_->disk()) {
    const StoreStats stats = disk->Stats();
    status["disk_store"] = {{"path", disk->path()},
                            {"pages", stats.pages},
                            {"used_bytes", stats.used_bytes},
                            {"total_bytes", stats.total_bytes}};
  }
  return status;
}

}  // namespace memlend

namespace memlend {

std::string Daemon::FuseNbdSocket() {
  if (nbd_ && config_.nbd.kind == Endpoint::Kind::kUnix) return config_.nbd.path;
  if (!private_nbd_) {
    Endpoint endpoint;
    endpoint.kind = Endpoint::Kind::kUnix;
    endpoint.path = config_.control_path + ".nbd";
    private_nbd_ = std::make_unique<nbd::NbdServer>(endpoint, devices_, NbdOptions());
    private_nbd_->Start();
  }
  return private_nbd_->endpoint().path;
}

std::string Daemon::FuseMountRoot() {
  const std::string root = config_.control_path + ".fuse";
  if (::mkdir(root.c_str(), 0700) != 0 && errno != EEXIST) {
    throw std::runtime_error("fuse: cannot create " + root + ": " + std::strerror(errno));
  }
  return root;
}

std::unique_ptr<BlockFrontend> Daemon::CreateFrontend(const std::string& kind,
                                                      std::shared_ptr<Device> device,
                                                      unsigned queues, int recover_dev_id) {
  if (kind == "ublk") {
    UblkOptions options;
    options.lock_memory = config_.lock_memory;  // its I/O buffers, like the rest of the daemon
    options.realtime = config_.lock_memory;     // a swap-safe daemon: see docs/attach.md
    options.queues = queues;
    // With a state directory the device outlives this process (docs/restart.md).
    options.user_recovery = state_.has_value();
    options.recover_dev_id = recover_dev_id;
    return AttachUblk(std::move(device), options);
  }
  if (kind == "nbd") {
    NbdKernelOptions options;
    options.busy_poll = std::chrono::microseconds(config_.busy_poll_us);
    options.realtime = config_.lock_memory;  // a swap-safe daemon: see docs/attach.md
    // With a state directory the device outlives this process (docs/restart.md).
    options.keep_for_s = state_.has_value() ? kNbdKeepSeconds : 0;
    options.reconnect_index = recover_dev_id;
    return AttachNbdKernel(std::move(device), options);
  }
  FuseOptions options;
  options.nbd_socket = FuseNbdSocket();
  options.mount_root = FuseMountRoot();
  return AttachFuse(std::move(device), options);
}

nlohmann::json Daemon::Attach(const AttachRequest& request) {
  const std::string& name = request.name;
  const std::uint64_t size_bytes = request.size_bytes;
  const std::string& wanted = request.frontend;
  const unsigned queues = request.queues;  // ublk's default (0): one per CPU
  if (!tiers_) {
    throw std::runtime_error("this daemon has no local store to keep devices in: start it with "
                             "--local-store SIZE");
  }

  if (!config_.force) {
    std::vector<Reservation> parts = Reservations();
    parts.push_back({"the new device's page table", PageTableBytes(size_bytes)});
    const std::string refusal = CheckReservation(host_, locks_memory_, parts);
    if (!refusal.empty()) {
      throw std::runtime_error("a " + FormatSize(size_bytes) + " device: " + refusal);
    }
  }
  const Redundancy redundancy = request.redundancy ? *request.redundancy : DefaultRedundancy();
  std::string reason;
  if (!RedundancyFits(redundancy, peers_ == nullptr ? 0 : peers_->peer_count(),
                      tiers_->disk() != nullptr, &reason)) {
    throw std::runtime_error(reason);
  }
  if (devices_.Find(name)) throw std::runtime_error("a device named '" + name + "' already exists");
  // With a state directory the page table lives in a segment of its own, which a ublk device
  // keeps for the next daemon (docs/restart.md); the others' goes when this process ends.
  // Declared first: on a failure the device goes before the memory its table is in.
  std::unique_ptr<StateSegment> segment;
  std::shared_ptr<Device> device;
  if (state_) {
    segment = StateSegment::Create(Device::PageTableBytes(size_bytes), state_->instance,
                                   locks_memory_);
    device = std::make_shared<Device>(name, size_bytes, *tiers_, /*cache_clean_pages=*/true,
                                      redundancy, segment->data(), /*fresh=*/true);
  } else {
    device = std::make_shared<Device>(name, size_bytes, *tiers_, /*cache_clean_pages=*/true,
                                      redundancy);
    // The kernel may write pages out through this device when memory is short, so nothing
    // on that path may allocate: the whole page table is allocated now.
    if (!device->AllocatePageTable()) {
      throw std::runtime_error("no memory for the page table of a " + FormatSize(size_bytes) +
                               " device (16 bytes per 4 KiB page)");
    }
  }
  if (!devices_.Add(device)) {
    if (segment) segment->Remove();
    throw std::runtime_error("a device named '" + name + "' already exists");
  }
  std::vector<std::string> kinds;
  if (wanted != "auto") {
    kinds.push_back(wanted);
  } else {
    // ublk where the driver is there, else the kernel's NBD client, else FUSE; a kind that
    // is present but fails to attach gives way to the next.
    if (UblkAvailable()) kinds.push_back("ublk");
    if (NbdKernelUnavailableReason().empty()) kinds.push_back("nbd");
    kinds.push_back("fuse");
  }
  std::unique_ptr<BlockFrontend> frontend;
  std::string reasons;
  for (const std::string& kind : kinds) {
    try {
      frontend = CreateFrontend(kind, device, queues);
      break;
    } catch (const std::exception& e) {
      reasons += (reasons.empty() ? "" : "; ") + std::string(e.what());
    }
  }
  if (frontend && !reasons.empty()) {
    LogError("attach %s: using %s (%s)", name.c_str(), std::string(frontend->kind()).c_str(),
             reasons.c_str());
  }
  if (!frontend) {
    devices_.Remove(name);
    if (segment) segment->Remove();
    if (wanted == "auto") throw std::runtime_error("no frontend could attach: " + reasons);
    throw std::runtime_error(reasons);
  }
  if (segment) {
    if (frontend->kind() == "ublk" || frontend->kind() == "nbd") {
      const std::string& path = frontend->path();  // /dev/ublkbN, /dev/nbdN
      std::lock_guard lock(state_mu_);
      state_->attached.push_back({name, size_bytes, redundancy.copies, redundancy.disk,
                                  std::string(frontend->kind()),
                                  std::atoi(path.c_str() + path.find_first_of("0123456789")),
                                  segment->id(), {}});
      try {
        SaveState(config_.state_dir, *state_);
      } catch (const std::exception& e) {
        LogError("warning: %s will not outlive this daemon: %s", name.c_str(), e.what());
        state_->attached.pop_back();
        segment->Remove();
      }
    } else {
      segment->Remove();  // FUSE devices are not taken over by the next daemon
    }
    // A device of that name detached earlier may still use its segment (an NBD connection
    // held it): keep that one mapped until the process ends.
    if (const auto old = attached_segments_.find(name); old != attached_segments_.end()) {
      retired_segments_.push_back(std::move(old->second));
    }
    attached_segments_[name] = std::move(segment);
  }
  nlohmann::json reply = {
      {"ok", true}, {"name", name}, {"path", frontend->path()}, {"frontend", frontend->kind()}};
  LogError("attached %s (%s) as %s through %s", name.c_str(), FormatSize(size_bytes).c_str(),
           frontend->path().c_str(), std::string(frontend->kind()).c_str());
  std::lock_guard lock(frontends_mu_);
  frontends_[name] = std::move(frontend);
  attach_order_.push_back(name);
  return reply;
}

nlohmann::json Daemon::Detach(const DetachRequest& request) {
  const std::string& name = request.name;
  BlockFrontend* frontend = nullptr;
  {
    std::lock_guard lock(frontends_mu_);
    const auto it = frontends_.find(name);
    if (it != frontends_.end()) frontend = it->second.get();
  }
  if (frontend == nullptr) {
    // ublkbN that no daemon serves any more (its state was lost): remove it.
    const std::string& base = name;
    if (base.rfind("ublkb", 0) == 0 && base.size() > 5 &&
        base.find_first_not_of("0123456789", 5) == std::string::npos && base.size() <= 12) {
      std::string error;
      const int dev_id = std::atoi(base.c_str() + 5);
      if (RemoveOrphanUblk(dev_id, &error) != 0) throw std::runtime_error(error);
      LogError("removed /dev/%s, which no daemon served", base.c_str());
      return {{"ok", true}, {"name", name}, {"path", "/dev/" + base}};
    }
    if (devices_.Find(name)) {
      throw std::runtime_error("'" + name + "' is a --device of this daemon, not attached by "
                               "memlend attach; it goes when the daemon stops");
    }
    throw std::runtime_error("no attached device named '" + name + "'");
  }
  const int rc = frontend->Detach();
  if (rc == -EBUSY) {
    throw std::runtime_error(frontend->path() + " (" + name +
                             ") is in use: unmount it or swapoff it first");
  }
  if (rc != 0) {
    throw std::runtime_error("cannot detach " + frontend->path() + ": " + std::strerror(-rc));
  }
  const std::string path = frontend->path();
  {
    std::lock_guard lock(frontends_mu_);
    frontends_.erase(name);
    attach_order_.erase(std::find(attach_order_.begin(), attach_order_.end(), name));
  }
  std::weak_ptr<Device> gone = devices_.Find(name);
  if (const std::shared_ptr<Device> device = gone.lock()) device->ReleasePagesOnExit();
  devices_.Remove(name);
  ForgetAttached(name, gone);
  LogError("detached %s (%s)", name.c_str(), path.c_str());
  return {{"ok", true}, {"name", name}, {"path", path}};
}

void Daemon::DetachAll() {
  for (;;) {
    std::unique_ptr<BlockFrontend> frontend;
    std::string name;
    {
      std::lock_guard lock(frontends_mu_);
      if (attach_order_.empty()) return;
      name = attach_order_.back();
      attach_order_.pop_back();
      frontend = std::move(frontends_[name]);
      frontends_.erase(name);
    }
    if (frontend->Detach() == -EBUSY) {
      LogError("%s (%s) is still in use at shutdown; detaching it anyway", name.c_str(),
               frontend->path().c_str());
    }
    frontend.reset();  // forces what Detach refused
    std::weak_ptr<Device> gone = devices_.Find(name);
    if (const std::shared_ptr<Device> device = gone.lock()) device->ReleasePagesOnExit();
    devices_.Remove(name);
    ForgetAttached(name, gone);
  }
}

void Daemon::ForgetAttached(const std::string& name, std::weak_ptr<Device> device) {
  const auto it = attached_segments_.find(name);
  if (it == attached_segments_.end()) return;
  it->second->Remove();
  // Unmapped only once the device has gone (an NBD connection may hold it a moment longer).
  if (device.expired()) attached_segments_.erase(it);
  if (!state_) return;
  std::lock_guard lock(state_mu_);
  auto& attached = state_->attached;
  const auto entry = std::find_if(attached.begin(), attached.end(),
                                  [&](const SavedAttached& a) { return a.name == name; });
  if (entry == attached.end()) return;
  attached.erase(entry);
  try {
    SaveState(config_.state_dir, *state_);
  } catch (const std::exception& e) {
    LogError("warning: %s", e.what());
  }
}

void Daemon::SavePeers() {
  if (!state_ || peers_ == nullptr) return;
  const std::vector<peer::Membership::SessionState> sessions = peers_->members().Sessions();
  std::lock_guard lock(state_mu_);
  state_->peers.clear();
  for (const peer::Membership::SessionState& session : sessions) {
    state_->peers.push_back({session.address, session.generation,
                             session.secret ? HexOfSecret(*session.secret) : std::string()});
  }
  SaveState(config_.state_dir, *state_);
}

void Daemon::PersistPlacements(const std::optional<SavedState>& saved) {
  if (saved) {
    for (std::size_t chunk = 0; chunk < saved->placement_chunks.size(); ++chunk) {
      std::string error;
      std::unique_ptr<StateSegment> segment =
          StateSegment::Attach(saved->placement_chunks[chunk], PlacementStore::ChunkBytes(),
                               saved->instance, locks_memory_, &error);
      if (!segment) {
        throw std::runtime_error("--state-dir " + config_.state_dir + ": placements: " + error);
      }
      placements_->AdoptChunk(chunk, segment->data());
      placement_segments_[chunk] = std::move(segment);
    }
  }
  // Called under the placement table's leaf lock, on a write path: a new segment and a
  // state.json write once per 4096 placements.
  placements_->SetChunkSource([this](std::size_t chunk) -> void* {
    if (const auto it = placement_segments_.find(chunk); it != placement_segments_.end()) {
      return it->second->data();  // made by an earlier call that then failed
    }
    try {
      std::unique_ptr<StateSegment> segment =
          StateSegment::Create(PlacementStore::ChunkBytes(), state_->instance, locks_memory_);
      std::lock_guard lock(state_mu_);
      if (state_->placement_chunks.size() <= chunk) state_->placement_chunks.resize(chunk + 1, -1);
      state_->placement_chunks[chunk] = segment->id();
      SaveState(config_.state_dir, *state_);
      void* memory = segment->data();
      placement_segments_[chunk] = std::move(segment);
      return memory;
    } catch (const std::exception& e) {
      LogError("warning: no state segment for more placements: %s", e.what());
      return nullptr;
    }
  });
}

void Daemon::RecoverAttached() {
  for (auto& [saved, device] : to_recover_) {
    std::unique_ptr<BlockFrontend> frontend =
        CreateFrontend(saved.frontend, device, /*queues=*/0, saved.ublk_dev_id);
    LogError("took over %s as %s", saved.name.c_str(), frontend->path().c_str());
    std::lock_guard lock(frontends_mu_);
    frontends_[saved.name] = std::move(frontend);
    attach_order_.push_back(saved.name);
  }
  to_recover_.clear();
}

}  // namespace memlend
