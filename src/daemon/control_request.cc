#include "daemon/control_request.h"

#include <optional>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "common/quote.h"
#include "daemon/config.h"
#include "memlend/control_api.h"

namespace memlend {
namespace {

using nlohmann::json;

// Reads request[key] as a string; throws when it is missing or not a string.
std::string StringField(const json& request, const char* key) {
  const auto it = request.find(key);
  if (it == request.end() || !it->is_string()) {
    throw std::invalid_argument(std::string("\"") + key + "\" must be given as a string");
  }
  return it->get<std::string>();
}

std::string DeviceName(const json& request) {
  std::string name = StringField(request, "name");
  if (!ValidDeviceName(name)) {
    throw std::invalid_argument("the name must be 1 to 64 characters of letters, digits, '.', "
                                "'_' or '-'");
  }
  return name;
}

AttachRequest ParseAttach(const json& request) {
  AttachRequest attach;
  attach.name = DeviceName(request);
  const auto size = request.find("size_bytes");
  if (size == request.end() || !size->is_number_unsigned()) {
    throw std::invalid_argument("\"size_bytes\" must be given as a positive integer");
  }
  attach.size_bytes = size->get<std::uint64_t>();
  if (const std::string error = CheckDeviceSize(attach.size_bytes); !error.empty()) {
    throw std::invalid_argument(error);
  }
  if (request.contains("frontend")) attach.frontend = StringField(request, "frontend");
  if (attach.frontend != "auto" && attach.frontend != "ublk" && attach.frontend != "nbd" &&
      attach.frontend != "fuse") {
    throw std::invalid_argument("unknown frontend " + Quote(attach.frontend) +
                                " (expected auto, ublk, nbd or fuse)");
  }
  if (const auto queues = request.find("queues"); queues != request.end()) {
    if (!queues->is_number_unsigned() || queues->get<std::uint64_t>() == 0 ||
        queues->get<std::uint64_t>() > kMaxUblkQueues) {
      throw std::invalid_argument("\"queues\" must be an integer from 1 to " +
                                  std::to_string(kMaxUblkQueues));
    }
    attach.queues = queues->get<unsigned>();
  }
  if (request.contains("redundancy")) {
    const std::string redundancy = StringField(request, "redundancy");
    std::string reason;
    Redundancy parsed;
    if (!ParseRedundancy(redundancy, &parsed, &reason)) {
      throw std::invalid_argument("\"redundancy\" " + Quote(redundancy) + ": " + reason);
    }
    attach.redundancy = parsed;
  }
  return attach;
}

Endpoint PeerAddress(const json& request) {
  const std::string text = StringField(request, "address");
  std::string reason;
  std::optional<Endpoint> address = ParseEndpoint(text, &reason);
  if (!address) throw std::invalid_argument("\"address\" " + Quote(text) + ": " + reason);
  return std::move(*address);
}

// The deadline_ms field of drain and lend, if present: 0 to kMaxDrainDeadlineMs.
std::optional<std::uint64_t> DeadlineField(const json& request) {
  const auto deadline = request.find("deadline_ms");
  if (deadline == request.end()) return std::nullopt;
  if (!deadline->is_number_unsigned() || deadline->get<std::uint64_t>() > kMaxDrainDeadlineMs) {
    throw std::invalid_argument("\"deadline_ms\" must be an integer from 0 to " +
                                std::to_string(kMaxDrainDeadlineMs));
  }
  return deadline->get<std::uint64_t>();
}

LendRequest ParseLend(const json& request) {
  LendRequest lend;
  for (const char* field : {"size_bytes", "reclaim_below_bytes"}) {
    const auto value = request.find(field);
    if (value == request.end()) continue;
    if (!value->is_number_unsigned()) {
      throw std::invalid_argument("\"" + std::string(field) + "\" must be a byte count");
    }
    (std::string(field) == "size_bytes" ? lend.size_bytes : lend.reclaim_below_bytes) =
        value->get<std::uint64_t>();
  }
  if (!lend.size_bytes && !lend.reclaim_below_bytes) {
    throw std::invalid_argument("lend needs \"size_bytes\" or \"reclaim_below_bytes\"");
  }
  lend.deadline_ms = DeadlineField(request);
  return lend;
}

}  // namespace

ControlRequest ParseControlRequest(std::string_view line) {
  // No exceptions from the parser itself: a malformed line is one refusal among others.
  const json request = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (request.is_discarded()) throw std::invalid_argument("the request is not JSON");
  if (!request.is_object()) throw std::invalid_argument("the request must be a JSON object");
  const std::string command = StringField(request, "command");
  if (command == kControlStatus) return StatusRequest{};
  if (command == kControlPeers) return PeersRequest{};
  if (command == kControlAttach) return ParseAttach(request);
  if (command == kControlDetach) return DetachRequest{DeviceName(request)};
  if (command == kControlDrain) {
    DrainRequest drain;
    if (const auto deadline = DeadlineField(request)) drain.deadline_ms = *deadline;
    return drain;
  }
  if (command == kControlLend) return ParseLend(request);
  if (command == kControlPeerAdd) return PeerAddRequest{PeerAddress(request)};
  if (command == kControlPeerRemove) return PeerRemoveRequest{PeerAddress(request)};
  throw std::invalid_argument("unknown command " + Quote(command));
}

}  // namespace memlend
