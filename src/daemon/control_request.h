// The control API's requests (include/memlend/control_api.h), parsed and checked in one
// place: a request line either becomes one of the types below, or is refused with a
// one-line reason, before any of the daemon's state is touched. No daemon state here, so
// the parser is what the unit tests and the control fuzz target exercise.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>

#include "memlend/page_store.h"
#include "transport/socket.h"

namespace memlend {

struct StatusRequest {};
struct PeersRequest {};
struct AttachRequest {
  std::string name;         // ValidDeviceName
  std::uint64_t size_bytes = 0;  // CheckDeviceSize
  std::string frontend = "auto";  // auto, ublk, nbd or fuse
  unsigned queues = 0;      // ublk queues, 1 to kMaxUblkQueues; 0: one per CPU
  // "redundancy" (ParseRedundancy); none given: the daemon's default.
  std::optional<Redundancy> redundancy;
};
struct DetachRequest {
  std::string name;
};
// A lender's repatriation (docs/remote-tier.md): tell borrowers, wait for them, exit.
struct DrainRequest {
  std::uint64_t deadline_ms = 30000;  // 0 to kMaxDrainDeadlineMs
};
// A borrower's membership (docs/remote-tier.md, "Membership"): a lender to use, or one to
// stop using once its pages have moved elsewhere.
struct PeerAddRequest {
  Endpoint address;  // ParseEndpoint
};
struct PeerRemoveRequest {
  Endpoint address;
};
// A lender's pool at run time (docs/remote-tier.md, "Reclaim"): at least one of the two.
struct LendRequest {
  std::optional<std::uint64_t> size_bytes;           // shrink or grow to this
  std::optional<std::uint64_t> reclaim_below_bytes;  // shrink while MemAvailable is under it
  // For borrowers to give superpages back, 0 to kMaxDrainDeadlineMs; none: the last one
  // given, else --drain-deadline.
  std::optional<std::uint64_t> deadline_ms;
};
using ControlRequest = std::variant<StatusRequest, PeersRequest, AttachRequest, DetachRequest,
                                    DrainRequest, PeerAddRequest, PeerRemoveRequest, LendRequest>;

inline constexpr std::uint64_t kMaxDrainDeadlineMs = 3600 * 1000;

// The most ublk queues an attach may ask for.
inline constexpr unsigned kMaxUblkQueues = 256;

// Parses one request line (without its '\n'). Throws std::invalid_argument with a
// one-line reason when it is not a JSON object, names no known "command", or a field is
// missing, of the wrong type or out of range. Unknown fields are ignored.
ControlRequest ParseControlRequest(std::string_view line);

}  // namespace memlend
