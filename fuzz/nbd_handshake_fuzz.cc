// Fuzz target: the NBD handshake (option haggling), nbd::RunHandshake.
//
// An input is what a client sends after the server's greeting: the 32-bit client flags,
// then options (IHAVEOPT, option, length, data). It is fed to RunHandshake over a unix
// socket pair, twice: against a table of one export (where an empty name picks it) and
// against a table of three. Replies are read and dropped.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "fuzz_socket.h"
#include "nbd/handshake.h"
#include "store/device.h"
#include "store/device_table.h"
#include "store/local_store.h"
#include "store/tiering.h"

namespace memlend::fuzz {
namespace {

// A handshake never waits here (the input is all sent, then the stream ends); the deadline
// only bounds a handshake that would.
constexpr std::chrono::milliseconds kHandshakeTimeout{500};

struct Exports {
  Exports() {
    tiers = std::make_unique<Tiering>(
        std::make_unique<LocalStore>(16 * kPageSize, Compression::kNone), nullptr);
    one.Add(std::make_shared<Device>("disk0", 1 << 20, *tiers));
    three.Add(std::make_shared<Device>("disk0", 1 << 20, *tiers));
    three.Add(std::make_shared<Device>("scratch", 64 * kPageSize, *tiers));
    three.Add(std::make_shared<Device>("swap0", 4 << 20, *tiers));
  }
  std::unique_ptr<Tiering> tiers;
  DeviceTable one;
  DeviceTable three;
};

void Handshake(std::span<const std::uint8_t> input, const DeviceTable& devices) {
  ServeInput(input, [&devices](int fd) {
    const Deadline deadline = std::chrono::steady_clock::now() + kHandshakeTimeout;
    nbd::RunHandshake(fd, devices, deadline);
  });
}

}  // namespace
}  // namespace memlend::fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Never destroyed: the devices must outlive every input, and the process exits anyway.
  static auto* exports = new memlend::fuzz::Exports;
  const std::span<const std::uint8_t> input(data, size);
  memlend::fuzz::Handshake(input, exports->one);
  memlend::fuzz::Handshake(input, exports->three);
  return 0;
}
