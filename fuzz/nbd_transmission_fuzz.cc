// Fuzz target: the NBD transmission phase, nbd::RunTransmission.
//
// An input is what a client sends once an export is chosen: requests (magic, flags, type,
// handle, offset, length) and WRITE payloads. It is fed over a unix socket pair to
// RunTransmission serving a fresh 256 KiB device (64 pages), without busy polling; the
// replies are read and dropped. The device's pages live in a local store of 16 uncompressed
// pages and nothing else, so a few small writes to different pages fill every tier (ENOSPC).
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "fuzz_socket.h"
#include "nbd/transmission.h"
#include "store/device.h"
#include "store/local_store.h"
#include "store/tiering.h"

namespace memlend::fuzz {
namespace {

constexpr std::uint64_t kDeviceBytes = 64 * kPageSize;
constexpr std::uint64_t kStoreBytes = 16 * kPageSize;

}  // namespace
}  // namespace memlend::fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace memlend;
  // Never destroyed: the process exits. Each input's device gives back all it stored.
  static auto* tiers =
      new Tiering(std::make_unique<LocalStore>(fuzz::kStoreBytes, Compression::kNone), nullptr);
  Device device("fuzz0", fuzz::kDeviceBytes, *tiers);
  fuzz::ServeInput(std::span<const std::uint8_t>(data, size), [&device](int fd) {
    nbd::RunTransmission(fd, device, std::chrono::microseconds(0));
  });
  return 0;
}
