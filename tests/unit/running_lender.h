// A real LenderService on a free loopback port, for unit tests of both ends of the peer
// protocol, and a bounded poll for what the lender's threads do in the background.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <thread>

#include "common/unique_fd.h"
#include "peer/lender_service.h"
#include "peer/peer_test_client.h"
#include "transport/socket.h"

namespace memlend::peer::testing {

// A port that was free a moment ago: bind port 0, read what the kernel chose, close.
inline std::uint16_t PickFreePort() {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(fd.valid());
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  REQUIRE(::bind(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);
  socklen_t length = sizeof(address);
  REQUIRE(::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&address), &length) == 0);
  return ntohs(address.sin_port);
}

// A started LenderService on a free loopback port.
struct RunningLender {
  explicit RunningLender(std::uint64_t pool_bytes, std::uint64_t node_id = 0xfeedULL,
                         const LenderOptions& options = {}) {
    for (int attempt = 0;; ++attempt) {
      endpoint.host = "127.0.0.1";
      endpoint.port = PickFreePort();
      try {
        service = std::make_unique<LenderService>(endpoint, pool_bytes, node_id, options);
        break;
      } catch (const std::runtime_error&) {
        if (attempt == 20) throw;  // someone keeps taking the port
      }
    }
    service->Start();
  }
  // A raw protocol client connected to it.
  PeerTestClient Connect() { return PeerTestClient(endpoint); }

  Endpoint endpoint;
  std::unique_ptr<LenderService> service;
};

// Polls `condition` for up to two seconds: session teardown and notices run on other threads.
template <typename Condition>
bool Eventually(Condition condition) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (std::chrono::steady_clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return condition();
}

}  // namespace memlend::peer::testing
