// NbdServer: listens on one endpoint and serves the devices of a DeviceTable over NBD,
// one thread per connection (see transmission.h for why).
//
// What a client can make the server hold is bounded: at most max_connections connections
// at once (more are closed as soon as they are accepted, and the refusals logged), each
// with a handshake that must be over within handshake_timeout, and each connection's
// buffers are released when it ends (ByteBuffer maps them apart from the heap). A
// connection thread removes itself when its client goes; nothing waits for the next
// accept to reap it.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <list>
#include <mutex>

#include "common/log.h"
#include "common/unique_fd.h"
#include "store/device_table.h"
#include "transport/acceptor.h"
#include "transport/socket.h"

namespace memlend::nbd {

struct NbdServerOptions {
  // How long a connection thread spins for the next request before it sleeps (see
  // RunTransmission).
  std::chrono::microseconds busy_poll{50};
  // Connections served at once, handshaking or not; more are refused.
  unsigned max_connections = 64;
  // From accept to the end of option haggling.
  std::chrono::milliseconds handshake_timeout{10'000};
  // Who may connect, for a unix socket.
  UnixSocketAccess access;
};

class NbdServer {
 public:
  static constexpr unsigned kDefaultMaxConnections = 64;

  // Binds and listens on `endpoint`. Throws std::runtime_error naming the endpoint and
  // the reason (address in use, permission, bad host). `devices` must outlive the server.
  NbdServer(const Endpoint& endpoint, const DeviceTable& devices,
            const NbdServerOptions& options);
  // Stops the server if it still runs.
  ~NbdServer();
  NbdServer(const NbdServer&) = delete;
  NbdServer& operator=(const NbdServer&) = delete;

  // Starts accepting connections on a background thread.
  void Start();
  // Stops accepting, hangs up every open connection and waits for their threads.
  // Idempotent; call from any thread but a connection's own.
  void Stop();

  // Connections open now. Thread-safe.
  unsigned connections() const;

  const Endpoint& endpoint() const { return endpoint_; }

 private:
  struct Client {
    UniqueFd fd;  // closed when the client's thread removes it from clients_
  };
  using ClientList = std::list<Client>;

  // Runs on the acceptor thread: starts a thread for the connection, or refuses it.
  void Accept(UniqueFd fd);
  // The connection's thread: serves it, then removes it from clients_.
  void ServeClient(ClientList::iterator client);
  // Logs a refused connection, at most once every few seconds.
  void LogRefusal(const char* why);

  // Constant after construction.
  const Endpoint endpoint_;
  const DeviceTable& devices_;
  const NbdServerOptions options_;

  mutable std::mutex mu_;
  ClientList clients_;          // guarded by mu_
  unsigned threads_ = 0;        // connection threads still running; guarded by mu_
  std::condition_variable threads_done_;  // threads_ fell to 0
  bool stopping_ = false;       // guarded by mu_
  LogThrottle refusals_{std::chrono::seconds(10)};  // guarded by mu_
  Acceptor acceptor_;  // last: it calls Accept, which uses the members above
};

}  // namespace memlend::nbd
