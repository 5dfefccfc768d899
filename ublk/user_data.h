// What a queue ring's io_uring user_data carries: which tag a completion belongs to and
// which command produced it, packed into 64 bits by asserting helpers so that a completion
// is decoded in one place and never mistaken for another tag's.
//
// Layout (bit 0 is the least significant):
//   bits  0-15  tag (< UBLK_MAX_QUEUE_DEPTH; unused for kWake and kCompleted)
//   bits 16-23  command: one of UserDataCommand
//   bits 24-31  kUserDataMagic, so that a stray or corrupted value is recognised
//   bits 32-63  zero
#pragma once

#include <cassert>
#include <cstdint>
#include <optional>

#include "ublk/uapi.h"

namespace memlend::ublk {

enum class UserDataCommand : std::uint8_t {
  kFetch = UBLK_IO_FETCH_REQ,                      // FETCH_REQ for a tag
  kCommitAndFetch = UBLK_IO_COMMIT_AND_FETCH_REQ,  // COMMIT_AND_FETCH_REQ for a tag
  kWake = 0x7f,                                    // the queue's wake-up eventfd read
  kCompleted = 0x7e,  // the eventfd read that says deferred requests were completed
};

inline constexpr std::uint64_t kUserDataMagic = 0xb1;

struct IoUserData {
  std::uint16_t tag = 0;
  UserDataCommand command = UserDataCommand::kFetch;
  bool operator==(const IoUserData&) const = default;
};

constexpr bool IsKnownCommand(std::uint8_t value) noexcept {
  return value == static_cast<std::uint8_t>(UserDataCommand::kFetch) ||
         value == static_cast<std::uint8_t>(UserDataCommand::kCommitAndFetch) ||
         value == static_cast<std::uint8_t>(UserDataCommand::kWake) ||
         value == static_cast<std::uint8_t>(UserDataCommand::kCompleted);
}

// REQUIRES: tag < UBLK_MAX_QUEUE_DEPTH.
constexpr std::uint64_t EncodeUserData(IoUserData data) noexcept {
  assert(data.tag < UBLK_MAX_QUEUE_DEPTH);
  assert(IsKnownCommand(static_cast<std::uint8_t>(data.command)));
  return std::uint64_t{data.tag} | (std::uint64_t{static_cast<std::uint8_t>(data.command)} << 16) |
         (kUserDataMagic << 24);
}

// Returns the tag and command packed in `value`, or nothing when `value` is not one that
// EncodeUserData produced (wrong magic, high bits set, unknown command, tag out of range).
constexpr std::optional<IoUserData> DecodeUserData(std::uint64_t value) noexcept {
  if ((value >> 24) != kUserDataMagic) return std::nullopt;
  const auto command = static_cast<std::uint8_t>((value >> 16) & 0xff);
  const auto tag = static_cast<std::uint16_t>(value & 0xffff);
  if (!IsKnownCommand(command) || tag >= UBLK_MAX_QUEUE_DEPTH) return std::nullopt;
  return IoUserData{tag, static_cast<UserDataCommand>(command)};
}

}  // namespace memlend::ublk
