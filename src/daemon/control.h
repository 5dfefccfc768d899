// The control socket: a small JSON request/reply service on a unix socket (see
// include/memlend/control_api.h), and the client half that the CLI uses.
#pragma once

#include <functional>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/unique_fd.h"
#include "daemon/control_request.h"
#include "transport/acceptor.h"

namespace memlend {

class ControlServer {
 public:
  // Handles one request (parsed and checked by ParseControlRequest) and returns the reply.
  // Runs on the control thread; may throw (the exception becomes an {"ok": false} reply).
  using Handler = std::function<nlohmann::json(const ControlRequest& request)>;

  // Listens on `path` (replacing a stale socket). Throws std::runtime_error naming the
  // path and the reason. The socket is made accessible to its owner only.
  ControlServer(const std::string& path, Handler handler);
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // Serves requests one at a time on a background thread until Stop().
  void Start();
  // Stops serving and removes the socket file. Idempotent.
  void Stop();

 private:
  // Serves one client, on the acceptor thread (requests are small and answered at once).
  void ServeOne(int fd);

  // Constant after construction.
  const std::string path_;
  const Handler handler_;
  bool stopped_ = false;  // touched only by the thread that owns the server
  Acceptor acceptor_;     // last: it calls ServeOne
};

// Sends `request` to the daemon at `path` and returns its reply, waiting at most
// `timeout_ms` for it. Throws std::runtime_error with a one-line reason when the daemon
// cannot be reached, does not answer in time or answers with something that is not JSON.
nlohmann::json CallControl(const std::string& path, const nlohmann::json& request,
                           int timeout_ms = 5000);

}  // namespace memlend
