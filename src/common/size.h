// Parsing and printing of byte sizes as people type them on a command line.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace memlend {

// Parses "4096", "64K", "512M", "2G", "1T" (binary multiples: 1K = 1024; an optional
// trailing "B" or "iB" is accepted, case-insensitive). Returns nullopt for anything else:
// empty text, a sign, a fraction, an unknown suffix, or a value that overflows 64 bits.
std::optional<std::uint64_t> ParseSize(std::string_view text);

// Formats `bytes` for people: "0 B", "4.0 KiB", "1.5 GiB".
std::string FormatSize(std::uint64_t bytes);

}  // namespace memlend
