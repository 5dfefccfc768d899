// Acceptor: accepts connections on a listening socket on its own thread and hands each to
// a callback, until Stop(). The NBD server, the lender service and the control socket
// all run one.
#pragma once

#include <functional>
#include <string>
#include <thread>

#include "common/unique_fd.h"

namespace memlend {

class Acceptor {
 public:
  // Runs on the acceptor thread for each accepted connection (CLOEXEC; TCP_NODELAY set
  // when asked). It should hand the socket on quickly: the next accept waits for it. An
  // exception it throws is logged and costs that one connection.
  using OnAccept = std::function<void(UniqueFd connection)>;

  // Takes ownership of `listener`. `name` (e.g. "nbd 127.0.0.1:10809") prefixes log
  // lines. Throws std::runtime_error if the wake-up pipe cannot be created.
  Acceptor(UniqueFd listener, std::string name, bool tcp_nodelay, OnAccept on_accept);
  // Stops if still running.
  ~Acceptor();
  Acceptor(const Acceptor&) = delete;
  Acceptor& operator=(const Acceptor&) = delete;

  // Starts the accepting thread.
  void Start();
  // Wakes the thread, waits for it to end and closes the listener, so that new
  // connections are refused rather than left in the backlog; no callback runs after it
  // returns. Idempotent. Call from any thread but the acceptor's own.
  void Stop();

 private:
  void Loop();

  // Constant after construction.
  UniqueFd listener_;  // closed by Stop()
  const std::string name_;
  const bool tcp_nodelay_;
  const OnAccept on_accept_;
  UniqueFd wake_read_;
  UniqueFd wake_write_;
  std::thread thread_;
};

}  // namespace memlend
