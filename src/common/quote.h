// Quoting text that came from a user or a peer for a one-line message.
#pragma once

#include <string>
#include <string_view>

namespace memlend {

// 'text' in single quotes, control characters escaped as \xNN so that the message stays on
// one line.
inline std::string Quote(std::string_view text) {
  std::string quoted = "'";
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte < 0x20 || byte == 0x7f) {
      static constexpr char kHex[] = "0123456789abcdef";
      quoted += "\\x";
      quoted += kHex[byte >> 4];
      quoted += kHex[byte & 0xf];
    } else {
      quoted += c;
    }
  }
  return quoted + "'";
}

}  // namespace memlend
