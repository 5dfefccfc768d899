#include "frontend/ublk_frontend.h"

#include <unistd.h>

#include <stdexcept>

namespace memlend {

bool UblkAvailable() noexcept { return ::access("/dev/ublk-control", F_OK) == 0; }

std::unique_ptr<BlockFrontend> AttachUblk(std::shared_ptr<Device> /*device*/,
                                          const UblkOptions& /*options*/) {
  throw std::runtime_error("ublk: this build has no ublk server yet");
}

}  // namespace memlend
