#include "cli/status.h"

#include <cstdio>

#include "common/size.h"

namespace memlend {

std::string FormatStatus(const nlohmann::json& status) {
  std::string text;
  char line[512];
  const nlohmann::json& local = status.at("local_store");
  std::snprintf(line, sizeof(line), "local store: %s of %s used, %llu pages, compression %s",
                FormatSize(local.at("used_bytes").get<std::uint64_t>()).c_str(),
                FormatSize(local.at("total_bytes").get<std::uint64_t>()).c_str(),
                static_cast<unsigned long long>(local.at("pages").get<std::uint64_t>()),
                local.at("compression").get<std::string>().c_str());
  text += line;
  if (local.at("compression").get<std::string>() != "none") {
    std::snprintf(line, sizeof(line), " (ratio %.2f)", local.at("compression_ratio").get<double>());
    text += line;
  }
  text += "\n";

  const nlohmann::json& disk = status.at("disk_store");
  if (disk.is_null()) {
    text += "disk store:  none (writes fail with ENOSPC when the local store is full)\n";
  } else {
    const std::uint64_t total = disk.at("total_bytes").get<std::uint64_t>();
    std::snprintf(line, sizeof(line), "disk store:  %s, %llu pages (%s of %s)\n",
                  disk.at("path").get<std::string>().c_str(),
                  static_cast<unsigned long long>(disk.at("pages").get<std::uint64_t>()),
                  FormatSize(disk.at("used_bytes").get<std::uint64_t>()).c_str(),
                  total == 0 ? "unbounded" : FormatSize(total).c_str());
    text += line;
  }

  std::snprintf(line, sizeof(line), "\n%-20s %10s %10s %10s %10s %10s %10s\n", "DEVICE", "SIZE",
                "MAPPED", "ZERO", "LOCAL", "DISK", "REMOTE");
  text += line;
  for (const nlohmann::json& device : status.at("devices")) {
    const nlohmann::json& pages = device.at("pages");
    auto count = [&](const char* key) {
      return static_cast<unsigned long long>(pages.at(key).get<std::uint64_t>());
    };
    std::snprintf(line, sizeof(line), "%-20s %10s %10llu %10llu %10llu %10llu %10llu\n",
                  device.at("name").get<std::string>().c_str(),
                  FormatSize(device.at("size_bytes").get<std::uint64_t>()).c_str(),
                  count("mapped"), count("zero"), count("local"), count("disk"), count("remote"));
    text += line;
  }
  text += "(page counts are 4 KiB pages)\n";
  return text;
}

}  // namespace memlend
