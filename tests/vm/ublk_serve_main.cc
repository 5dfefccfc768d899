// ublk_serve: serves one memlend Device (a LocalStore-backed Tiering, as the daemon builds
// it) as /dev/ublkbN through AttachUblk, for tests/vm/ublk_test.sh to drive in the VM.
//
//     ublk_serve SIZE_MIB [QUEUES [QUEUE_DEPTH [MAX_IO_BYTES]]]
//
// Prints "attached PATH" once the block device exists, then reads commands from stdin, one
// per line, and answers each on stdout:
//     detach   -> "detach RET"  (RET: Detach()'s result, e.g. 0 or -16 for EBUSY)
//     stats    -> "stats TOTAL ZERO LOCAL" page counts of the Device
//     quit     -> exits 0 (the frontend is destroyed, which detaches by force)
// End of input does what quit does. SIGTERM or SIGINT destroys the frontend (as the daemon
// does on shutdown), prints "stopped" and exits 0. Attach failures print one line on
// stderr and exit 1.
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <memory>
#include <string>

#include "frontend/ublk_frontend.h"
#include "store/device.h"
#include "store/local_store.h"
#include "store/tiering.h"

namespace {

int Serve(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: ublk_serve SIZE_MIB [QUEUES [QUEUE_DEPTH [MAX_IO_BYTES]]]\n");
    return 2;
  }
  const std::uint64_t size_bytes = std::strtoull(argv[1], nullptr, 10) << 20;
  memlend::UblkOptions options;
  if (argc > 2) options.queues = static_cast<unsigned>(std::strtoul(argv[2], nullptr, 10));
  if (argc > 3) options.queue_depth = static_cast<unsigned>(std::strtoul(argv[3], nullptr, 10));
  if (argc > 4)
    options.max_io_bytes = static_cast<std::uint32_t>(std::strtoul(argv[4], nullptr, 10));

  // Signals wait for the main loop (queue threads block them too).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  const int signal_fd = signalfd(-1, &signals, SFD_CLOEXEC);

  auto tiers = std::make_unique<memlend::Tiering>(
      std::make_unique<memlend::LocalStore>(size_bytes, memlend::Compression::kNone), nullptr);
  auto device = std::make_shared<memlend::Device>("ublk-test", size_bytes, *tiers);
  std::unique_ptr<memlend::BlockFrontend> frontend;
  try {
    frontend = memlend::AttachUblk(device, options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ublk_serve: %s\n", e.what());
    return 1;
  }
  std::printf("attached %s\n", frontend->path().c_str());
  std::fflush(stdout);

  std::string pending;
  for (;;) {
    pollfd fds[2] = {{0, POLLIN, 0}, {signal_fd, POLLIN, 0}};
    if (poll(fds, 2, -1) < 0) continue;
    if (fds[1].revents & POLLIN) {
      frontend.reset();
      std::printf("stopped\n");
      return 0;
    }
    if (!(fds[0].revents & (POLLIN | POLLHUP))) continue;
    char chunk[256];
    const ssize_t n = read(0, chunk, sizeof(chunk));
    if (n <= 0) return 0;
    pending.append(chunk, static_cast<std::size_t>(n));
    std::size_t newline;
    while ((newline = pending.find('\n')) != std::string::npos) {
      const std::string command = pending.substr(0, newline);
      pending.erase(0, newline + 1);
      if (command == "detach") {
        std::printf("detach %d\n", frontend->Detach());
      } else if (command == "stats") {
        const memlend::DevicePageCounts counts = device->Counts();
        std::printf("stats %llu %llu %llu\n", static_cast<unsigned long long>(counts.total),
                    static_cast<unsigned long long>(counts.zero),
                    static_cast<unsigned long long>(counts.local));
      } else if (command == "quit") {
        return 0;
      } else {
        std::printf("unknown command %s\n", command.c_str());
      }
      std::fflush(stdout);
    }
  }
}

}  // namespace

int main(int argc, char** argv) { return Serve(argc, argv); }
