#include "daemon/daemon.h"

#include <signal.h>

#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "common/log.h"
#include "memlend/control_api.h"

namespace memlend {

namespace {

constexpr std::chrono::seconds kRefreshInterval{2};

std::string Hex(std::uint64_t value) {
  char text[17];
  std::snprintf(text, sizeof(text), "%016llx", static_cast<unsigned long long>(value));
  return text;
}

}  // namespace

Daemon::Daemon(const DaemonConfig& config) : config_(config) {
  if (!config.devices.empty()) {
    auto local = std::make_unique<LocalStore>(config.local_store_bytes, config.compression);
    std::unique_ptr<peer::PeerStore> remote;
    PageStore* cache = nullptr;
    if (!config.peers.empty()) {
      remote = std::make_unique<peer::PeerStore>(config.node_id);
      for (const Endpoint& endpoint : config.peers) remote->AddPeer(endpoint);
      remote->Refresh();  // connect and learn free space now; unreachable peers retry later
      peers_ = remote.get();
      cache = &remote->cache();
    }
    std::unique_ptr<DiskStore> disk;
    if (!config.backing_file.empty()) {
      disk = std::make_unique<DiskStore>(config.backing_file, config.backing_size_bytes);
    }
    TieringOptions options;
    options.high_watermark = config.high_watermark;
    options.low_watermark = config.low_watermark;
    tiers_ = std::make_unique<Tiering>(std::move(local), std::move(remote), std::move(disk),
                                       options, cache);
    for (const DeviceSpec& spec : config.devices) {
      devices_.Add(std::make_shared<Device>(spec.name, spec.size_bytes, *tiers_,
                                            spec.cache_clean_pages));
    }
    nbd_ = std::make_unique<nbd::NbdServer>(config.nbd, devices_,
                                            std::chrono::microseconds(config.busy_poll_us));
  }
  if (config.lend_bytes > 0) {
    lender_ = std::make_unique<peer::LenderService>(config.listen, config.lend_bytes,
                                                    config.node_id);
  }
  control_ = std::make_unique<ControlServer>(
      config.control_path, [this](const nlohmann::json& request) { return HandleControl(request); });
}

Daemon::~Daemon() { Stop(); }

void Daemon::Stop() {
  {
    std::lock_guard lock(refresh_mu_);
    stopping_ = true;
  }
  refresh_cv_.notify_all();
  if (refresher_.joinable()) refresher_.join();
  if (control_) control_->Stop();
  if (nbd_) nbd_->Stop();
  if (lender_) lender_->Stop();
}

void Daemon::RefreshLoop() {
  std::unique_lock lock(refresh_mu_);
  while (!refresh_cv_.wait_for(lock, kRefreshInterval, [this] { return stopping_; })) {
    lock.unlock();
    peers_->Refresh();
    lock.lock();
  }
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
  if (tiers_) tiers_->StartEvictor();
  if (peers_) refresher_ = std::thread([this] { RefreshLoop(); });
  if (nbd_) nbd_->Start();
  if (lender_) lender_->Start();
  control_->Start();
  std::string what;
  if (nbd_) {
    what += "NBD on " + config_.nbd.ToString() + " (" + std::to_string(config_.devices.size()) +
            " device(s), " + std::to_string(config_.peers.size()) + " peer(s)), ";
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
  LogError("%s received, shutting down", strsignal(signal_number));
  Stop();
}

nlohmann::json Daemon::HandleControl(const nlohmann::json& request) {
  const std::string command = request.value("command", "");
  if (command == kControlStatus) return Status();
  if (command == kControlPeers) return PeersJson();
  return {{"ok", false}, {"error", "unknown command '" + command + "'"}};
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
                       {"pages_lost", info.pages_lost},
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
                       {"used_bytes", lending.used_bytes},
                       {"ephemeral_bytes", lending.ephemeral_bytes},
                       {"borrowers", lending.borrowers}};
  if (!tiers_) return status;

  for (const auto& device : devices_.List()) {
    const DevicePageCounts counts = device->Counts();
    status["devices"].push_back({{"name", device->name()},
                                 {"size_bytes", device->size_bytes()},
                                 {"protocol", device->cache_clean_pages() ? "auto" : "passive"},
                                 {"pages",
                                  {{"total", counts.total},
                                   {"mapped", counts.mapped()},
                                   {"zero", counts.zero},
                                   {"local", counts.local},
                                   {"disk", counts.disk},
                                   {"remote", counts.remote},
                                   {"cached", counts.cached},
                                   {"clean", counts.clean}}}});
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
    status["remote_store"] = {{"pages", stats.pages},
                              {"lost_pages", peers_ ? peers_->lost_pages() : 0},
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
