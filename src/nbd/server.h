// NbdServer: listens on one endpoint and serves the devices of a DeviceTable over NBD,
// one thread per connection (see transmission.h for why).
#pragma once

#include <atomic>
#include <chrono>
#include <list>
#include <mutex>
#include <thread>

#include "common/unique_fd.h"
#include "store/device_table.h"
#include "transport/acceptor.h"
#include "transport/socket.h"

namespace memlend::nbd {

class NbdServer {
 public:
  // Binds and listens on `endpoint`. Throws std::runtime_error naming the endpoint and
  // the reason (address in use, permission, bad host). `devices` must outlive the server.
  // `busy_poll`: see RunTransmission.
  NbdServer(const Endpoint& endpoint, const DeviceTable& devices,
            std::chrono::microseconds busy_poll);
  // Stops the server if it still runs.
  ~NbdServer();
  NbdServer(const NbdServer&) = delete;
  NbdServer& operator=(const NbdServer&) = delete;

  // Starts accepting connections on a background thread.
  void Start();
  // Stops accepting, hangs up every open connection and waits for their threads.
  // Idempotent; call from any thread but a connection's own.
  void Stop();

  const Endpoint& endpoint() const { return endpoint_; }

 private:
  struct Client {
    UniqueFd fd;
    std::thread thread;
    std::atomic<bool> finished{false};
  };

  // Runs on the acceptor thread: starts a thread for the connection.
  void Accept(UniqueFd fd);
  void ServeClient(Client* client);
  // Joins and forgets clients whose threads have ended. REQUIRES: mu_ held.
  void ReapFinishedLocked();

  // Constant after construction.
  const Endpoint endpoint_;
  const DeviceTable& devices_;
  const std::chrono::microseconds busy_poll_;

  std::mutex mu_;
  std::list<Client> clients_;  // guarded by mu_
  bool stopping_ = false;      // guarded by mu_
  Acceptor acceptor_;          // last: it calls Accept, which uses the members above
};

}  // namespace memlend::nbd
