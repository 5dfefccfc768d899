#include "daemon/config.h"

#include <unistd.h>

#include <cstdlib>
#include <set>

#include "common/size.h"

namespace memlend {
namespace {

// Quotes a command-line argument for an error message, escaping control characters so
// the message stays on one line.
std::string Quote(std::string_view text) {
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

bool ValidName(std::string_view name) {
  if (name.empty() || name.size() > 64) return false;
  for (const char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

}  // namespace

std::optional<DeviceSpec> ParseDeviceSpec(std::string_view text, std::string* error) {
  const std::size_t colon = text.rfind(':');
  if (colon == std::string_view::npos) {
    *error = "--device " + Quote(text) + ": expected NAME:SIZE, e.g. swap0:4G";
    return std::nullopt;
  }
  DeviceSpec spec;
  spec.name = std::string(text.substr(0, colon));
  if (!ValidName(spec.name)) {
    *error = "--device " + Quote(text) +
             ": the name must be 1 to 64 characters of letters, digits, '.', '_' or '-'";
    return std::nullopt;
  }
  const std::string_view size_text = text.substr(colon + 1);
  const std::optional<std::uint64_t> size = ParseSize(size_text);
  if (!size) {
    *error = "--device " + Quote(text) + ": " + Quote(size_text) +
             " is not a size (use a number with an optional K, M, G or T suffix)";
    return std::nullopt;
  }
  if (*size == 0 || *size % kPageSize != 0) {
    *error = "--device " + Quote(text) + ": the size must be a positive multiple of 4 KiB";
    return std::nullopt;
  }
  spec.size_bytes = *size;
  return spec;
}

bool BuildDaemonConfig(const DaemonArgs& args, DaemonConfig* config, std::string* error) {
  if (args.devices.empty()) {
    *error = "at least one --device NAME:SIZE is required";
    return false;
  }
  std::set<std::string> names;
  for (const std::string& text : args.devices) {
    std::optional<DeviceSpec> spec = ParseDeviceSpec(text, error);
    if (!spec) return false;
    if (!names.insert(spec->name).second) {
      *error = "--device: the name " + Quote(spec->name) + " is used twice";
      return false;
    }
    config->devices.push_back(std::move(*spec));
  }

  std::string reason;
  std::optional<Endpoint> nbd = ParseEndpoint(args.nbd, &reason);
  if (!nbd) {
    *error = "--nbd " + Quote(args.nbd) + ": " + reason;
    return false;
  }
  config->nbd = std::move(*nbd);

  const std::optional<std::uint64_t> local = ParseSize(args.local_store);
  if (!local || *local < kPageSize) {
    *error = "--local-store " + Quote(args.local_store) + ": expected a size of at least 4K";
    return false;
  }
  config->local_store_bytes = *local;

  config->backing_file = args.backing_file;
  if (!args.backing_size.empty()) {
    const std::optional<std::uint64_t> bound = ParseSize(args.backing_size);
    if (!bound || *bound < kPageSize) {
      *error = "--backing-size " + Quote(args.backing_size) + ": expected a size of at least 4K";
      return false;
    }
    if (args.backing_file.empty()) {
      *error = "--backing-size needs --backing-file";
      return false;
    }
    config->backing_size_bytes = *bound;
  }

  if (args.compress == "none") {
    config->compression = Compression::kNone;
  } else if (args.compress == "lz4") {
    config->compression = Compression::kLz4;
  } else {
    *error = "--compress " + Quote(args.compress) + ": expected none or lz4";
    return false;
  }

  if (args.busy_poll_us > 1000000) {
    *error = "--busy-poll " + std::to_string(args.busy_poll_us) +
             ": at most 1000000 microseconds";
    return false;
  }
  config->busy_poll_us = args.busy_poll_us;

  config->control_path = args.control.empty() ? DefaultControlPath() : args.control;
  if (!ParseEndpoint("unix:" + config->control_path, &reason)) {
    *error = "--control " + Quote(config->control_path) + ": " + reason;
    return false;
  }
  return true;
}

std::string DefaultControlPath() {
  if (const char* path = std::getenv("MEMLEND_CONTROL"); path != nullptr && *path != '\0') {
    return path;
  }
  if (::geteuid() == 0) return "/run/memlend.sock";
  const char* runtime = std::getenv("XDG_RUNTIME_DIR");
  const std::string dir = runtime != nullptr && *runtime != '\0' ? runtime : "/tmp";
  return dir + "/memlend-" + std::to_string(::geteuid()) + ".sock";
}

}  // namespace memlend
