// DeviceTable: the daemon's devices by name, shared by the frontends and the control
// socket. Devices are held by shared_ptr so a connection keeps its device alive even if
// it is removed from the table meanwhile.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "store/device.h"

namespace memlend {

class DeviceTable {
 public:
  // Adds `device`; returns false (and adds nothing) if its name is taken. Thread-safe.
  bool Add(std::shared_ptr<Device> device) {
    std::lock_guard lock(mu_);
    return devices_.emplace(device->name(), std::move(device)).second;
  }
  // Removes the device called `name`; returns false if there is none. Connections that
  // hold it keep it alive until they end. Thread-safe.
  bool Remove(const std::string& name) {
    std::lock_guard lock(mu_);
    return devices_.erase(name) > 0;
  }
  // Returns the device called `name`, or null. Thread-safe.
  std::shared_ptr<Device> Find(const std::string& name) const {
    std::lock_guard lock(mu_);
    const auto it = devices_.find(name);
    return it == devices_.end() ? nullptr : it->second;
  }
  // Returns every device, ordered by name. Thread-safe.
  std::vector<std::shared_ptr<Device>> List() const {
    std::lock_guard lock(mu_);
    std::vector<std::shared_ptr<Device>> all;
    for (const auto& [name, device] : devices_) all.push_back(device);
    return all;
  }

 private:
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<Device>> devices_;  // guarded by mu_
};

}  // namespace memlend
