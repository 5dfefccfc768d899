#include "daemon/state_dir.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace memlend {
namespace {

std::string StatePath(const std::string& dir) { return dir + "/state.json"; }

const char* CompressionName(Compression compression) {
  return compression == Compression::kLz4 ? "lz4" : "none";
}

// A device's restarts (absent in a state written before they were kept: none).
SavedRestarts LoadRestarts(const nlohmann::json& device) {
  return {device.value("restarts", 0u), device.value("last_gap_ms", std::uint64_t{0})};
}

}  // namespace

SavedState StateFor(const DaemonConfig& config, std::uint64_t instance) {
  SavedState state;
  state.node_id = config.node_id;
  state.instance = instance;
  state.local_store_bytes = config.local_store_bytes;
  state.compression = CompressionName(config.compression);
  state.backing_file = config.backing_file;
  state.sealed = config.seal_pages;
  for (const DeviceSpec& spec : config.devices) {
    state.devices.push_back({spec.name, spec.size_bytes, -1, {}});
  }
  return state;
}

std::optional<SavedState> LoadState(const std::string& dir) {
  const std::string path = StatePath(dir);
  if (::access(path.c_str(), F_OK) != 0 && errno == ENOENT) return std::nullopt;
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path + ": " + std::strerror(errno));
  std::stringstream text;
  text << in.rdbuf();
  try {
    const nlohmann::json json = nlohmann::json::parse(text.str());
    if (json.at("version").get<int>() != SavedState::kVersion) {
      throw std::runtime_error("version " + json.at("version").dump() + ", this daemon reads " +
                               std::to_string(SavedState::kVersion));
    }
    SavedState state;
    state.node_id = json.at("node_id").get<std::uint64_t>();
    state.instance = json.at("instance").get<std::uint64_t>();
    state.arena_segment_id = json.at("arena_segment_id").get<int>();
    state.local_store_bytes = json.at("local_store_bytes").get<std::uint64_t>();
    state.compression = json.at("compression").get<std::string>();
    state.backing_file = json.at("backing_file").get<std::string>();
    for (const nlohmann::json& device : json.at("devices")) {
      state.devices.push_back({device.at("name").get<std::string>(),
                               device.at("size_bytes").get<std::uint64_t>(),
                               device.at("segment_id").get<int>(), LoadRestarts(device)});
    }
    state.restarts = json.value("restarts", 0u);
    state.sealed = json.value("sealed", false);
    if (json.contains("peers")) {
      for (const nlohmann::json& peer : json.at("peers")) {
        state.peers.push_back({peer.at("address").get<std::string>(),
                               peer.at("generation").get<unsigned>(),
                               peer.at("secret").get<std::string>()});
      }
    }
    if (json.contains("placement_chunks")) {
      state.placement_chunks = json.at("placement_chunks").get<std::vector<int>>();
    }
    state.last_gap_ms = json.value("last_gap_ms", std::uint64_t{0});
    if (json.contains("attached")) {
      for (const nlohmann::json& device : json.at("attached")) {
        state.attached.push_back({device.at("name").get<std::string>(),
                                  device.at("size_bytes").get<std::uint64_t>(),
                                  device.at("copies").get<unsigned>(),
                                  device.at("disk").get<bool>(),
                                  device.value("frontend", std::string("ublk")),
                                  device.at("ublk_dev_id").get<int>(),
                                  device.at("segment_id").get<int>(), LoadRestarts(device)});
      }
    }
    return state;
  } catch (const std::exception& e) {
    throw std::runtime_error(path + " is not a memlend state file: " + e.what() +
                             " (remove it to start afresh)");
  }
}

void SaveState(const std::string& dir, const SavedState& state) {
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    throw std::runtime_error("cannot make the state directory " + dir + ": " +
                             std::strerror(errno));
  }
  nlohmann::json devices = nlohmann::json::array();
  for (const SavedDevice& device : state.devices) {
    devices.push_back({{"name", device.name},
                       {"size_bytes", device.size_bytes},
                       {"segment_id", device.segment_id},
                       {"restarts", device.history.restarts},
                       {"last_gap_ms", device.history.last_gap_ms}});
  }
  nlohmann::json attached = nlohmann::json::array();
  for (const SavedAttached& device : state.attached) {
    attached.push_back({{"name", device.name},
                        {"size_bytes", device.size_bytes},
                        {"copies", device.copies},
                        {"disk", device.disk},
                        {"frontend", device.frontend},
                        {"ublk_dev_id", device.ublk_dev_id},
                        {"segment_id", device.segment_id},
                        {"restarts", device.history.restarts},
                        {"last_gap_ms", device.history.last_gap_ms}});
  }
  nlohmann::json peers = nlohmann::json::array();
  for (const SavedPeer& peer : state.peers) {
    peers.push_back({{"address", peer.address},
                     {"generation", peer.generation},
                     {"secret", peer.secret_hex}});
  }
  const nlohmann::json json = {{"version", SavedState::kVersion},
                               {"attached", std::move(attached)},
                               {"peers", std::move(peers)},
                               {"placement_chunks", state.placement_chunks},
                               {"restarts", state.restarts},
                               {"sealed", state.sealed},
                               {"last_gap_ms", state.last_gap_ms},
                               {"node_id", state.node_id},
                               {"instance", state.instance},
                               {"arena_segment_id", state.arena_segment_id},
                               {"local_store_bytes", state.local_store_bytes},
                               {"compression", state.compression},
                               {"backing_file", state.backing_file},
                               {"devices", std::move(devices)}};
  const std::string path = StatePath(dir);
  const std::string temporary = path + ".new";
  const std::string text = json.dump(2) + "\n";
  const int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  bool ok = fd >= 0 && ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) &&
            ::fsync(fd) == 0;
  const int error = errno;
  if (fd >= 0) ::close(fd);
  ok = ok && ::rename(temporary.c_str(), path.c_str()) == 0;
  if (!ok) {
    ::unlink(temporary.c_str());
    throw std::runtime_error("cannot write " + path + ": " + std::strerror(error != 0 ? error : errno));
  }
}

void RemoveState(const std::string& dir) noexcept { ::unlink(StatePath(dir).c_str()); }

std::string CompareState(const SavedState& saved, const DaemonConfig& config) {
  if (saved.local_store_bytes != config.local_store_bytes) {
    return "it was made with --local-store " + std::to_string(saved.local_store_bytes) +
           " bytes, not " + std::to_string(config.local_store_bytes);
  }
  if (saved.compression != CompressionName(config.compression)) {
    return "it was made with --compress " + saved.compression;
  }
  if (saved.backing_file != config.backing_file) {
    return saved.backing_file.empty() ? "it was made without --backing-file"
                                      : "it was made with --backing-file " + saved.backing_file;
  }
  if (saved.sealed != config.seal_pages) {
    return saved.sealed ? "it was made with --seal-pages" : "it was made without --seal-pages";
  }
  if (saved.devices.size() != config.devices.size()) {
    return "it was made with " + std::to_string(saved.devices.size()) + " device(s), not " +
           std::to_string(config.devices.size());
  }
  for (std::size_t i = 0; i < saved.devices.size(); ++i) {
    const SavedDevice& device = saved.devices[i];
    if (device.name != config.devices[i].name ||
        device.size_bytes != config.devices[i].size_bytes) {
      return "its device " + std::to_string(i + 1) + " is " + device.name + " of " +
             std::to_string(device.size_bytes) + " bytes, not " + config.devices[i].name +
             " of " + std::to_string(config.devices[i].size_bytes);
    }
  }
  return "";
}

}  // namespace memlend
