// `memlend status`: renders the daemon's status reply for people.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace memlend {

// Formats a "status" reply (see include/memlend/control_api.h) as a short report with
// one table row per device. Throws nlohmann::json::exception if a field is missing.
std::string FormatStatus(const nlohmann::json& status);

// Formats a "peers" reply as one table row per peer.
std::string FormatPeers(const nlohmann::json& reply);

}  // namespace memlend
