#include "daemon/daemon.h"

#include <signal.h>

#include <cstring>
#include <stdexcept>

#include "common/log.h"
#include "memlend/control_api.h"

namespace memlend {

Daemon::Daemon(const DaemonConfig& config) : config_(config) {
  auto local = std::make_unique<LocalStore>(config.local_store_bytes, config.compression);
  std::unique_ptr<DiskStore> disk;
  if (!config.backing_file.empty()) {
    disk = std::make_unique<DiskStore>(config.backing_file, config.backing_size_bytes);
  }
  tiers_ = std::make_unique<Tiering>(std::move(local), std::move(disk));
  for (const DeviceSpec& spec : config.devices) {
    devices_.Add(std::make_shared<Device>(spec.name, spec.size_bytes, *tiers_));
  }
  nbd_ = std::make_unique<nbd::NbdServer>(config.nbd, devices_,
                                          std::chrono::microseconds(config.busy_poll_us));
  control_ = std::make_unique<ControlServer>(
      config.control_path, [this](const nlohmann::json& request) { return HandleControl(request); });
}

Daemon::~Daemon() {
  if (control_) control_->Stop();
  if (nbd_) nbd_->Stop();
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
  nbd_->Start();
  control_->Start();
  LogError("ready: NBD on %s, control on %s, %zu device(s)", config_.nbd.ToString().c_str(),
           config_.control_path.c_str(), config_.devices.size());

  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  int signal_number = 0;
  while (sigwait(&set, &signal_number) != 0) {
  }
  LogError("%s received, shutting down", strsignal(signal_number));
  control_->Stop();
  nbd_->Stop();
}

nlohmann::json Daemon::HandleControl(const nlohmann::json& request) {
  const std::string command = request.value("command", "");
  if (command == kControlStatus) return Status();
  return {{"ok", false}, {"error", "unknown command '" + command + "'"}};
}

nlohmann::json Daemon::Status() const {
  nlohmann::json devices = nlohmann::json::array();
  for (const auto& device : devices_.List()) {
    const DevicePageCounts counts = device->Counts();
    devices.push_back({{"name", device->name()},
                       {"size_bytes", device->size_bytes()},
                       {"pages",
                        {{"total", counts.total},
                         {"mapped", counts.mapped()},
                         {"zero", counts.zero},
                         {"local", counts.local},
                         {"disk", counts.disk},
                         {"remote", counts.remote}}}});
  }
  const StoreStats local = tiers_->local().Stats();
  const double ratio = local.used_bytes == 0
                           ? 1.0
                           : static_cast<double>(local.pages * kPageSize) /
                                 static_cast<double>(local.used_bytes);
  nlohmann::json status = {
      {"ok", true},
      {"devices", devices},
      {"local_store",
       {{"total_bytes", local.total_bytes},
        {"used_bytes", local.used_bytes},
        {"pages", local.pages},
        {"compression", tiers_->local().compression() == Compression::kLz4 ? "lz4" : "none"},
        {"compression_ratio", ratio}}},
      {"disk_store", nullptr},
  };
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
