// Fuzz target: the lender's end of the peer protocol, LenderService and its request loop.
//
// An input is what a borrower sends: messages (a 32-byte header, then a payload). Each
// input gets a fresh LenderService with a pool of three superpages, listening on a unix
// socket in a temporary directory made once per process, so superpage ids start at 1
// every time and an input can name the superpages it allocates. The input is written to
// one connection, which is then shut down for writing; replies and notices are read and
// dropped until the lender hangs up. Stopping the service then waits for the session's
// thread and frees what it held.
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string>

#include "fuzz_socket.h"
#include "peer/lender_service.h"
#include "peer/wire.h"
#include "transport/socket.h"

namespace memlend::fuzz {
namespace {

constexpr std::uint64_t kPoolBytes = 3 * peer::kSuperpageBytes;

void Lend(const Endpoint& endpoint, std::span<const std::uint8_t> input) {
  peer::LenderOptions options;
  // The input is all there, then the stream ends: the lender never waits for a HELLO.
  options.hello_timeout = std::chrono::milliseconds(500);
  peer::LenderService lender(endpoint, kPoolBytes, 0x1e17de4ULL, options);
  lender.Start();
  std::string reason;
  UniqueFd fd = ConnectTo(endpoint, &reason);
  if (!fd.valid()) {
    std::fprintf(stderr, "peer_lender_fuzz: cannot connect to the lender: %s\n", reason.c_str());
    std::abort();
  }
  FeedAndDrain(fd.get(), input);
  fd.Reset();
  lender.Stop();
}

}  // namespace
}  // namespace memlend::fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static memlend::fuzz::SocketDir socket_dir("peer_lender");
  memlend::fuzz::Lend(socket_dir.endpoint, std::span<const std::uint8_t>(data, size));
  return 0;
}
