#include "daemon/control.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "common/log.h"
#include "memlend/control_api.h"
#include "transport/socket.h"

namespace memlend {
namespace {

constexpr int kClientTimeoutMs = 5000;

void SetTimeouts(int fd, int timeout_ms) {
  timeval tv{timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

constexpr std::size_t kMaxControlReply = 16 << 20;

// Reads one '\n'-terminated line of at most `max_bytes`. Returns false on a timeout, an
// overlong line or a closed socket.
bool ReadLine(int fd, std::size_t max_bytes, std::string* line) {
  char chunk[4096];
  for (;;) {
    const ssize_t n = ::recv(fd, chunk, sizeof(chunk), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    line->append(chunk, static_cast<std::size_t>(n));
    const std::size_t newline = line->find('\n');
    if (newline != std::string::npos) {
      line->resize(newline);
      return true;
    }
    if (line->size() > max_bytes) return false;
  }
}

}  // namespace

namespace {

// The socket is its owner's alone (UnixSocketAccess's default): the control API attaches
// and detaches block devices.
UniqueFd ListenOnPath(const std::string& path) {
  Endpoint endpoint;
  endpoint.kind = Endpoint::Kind::kUnix;
  endpoint.path = path;
  return ListenOn(endpoint);
}

}  // namespace

ControlServer::ControlServer(const std::string& path, Handler handler)
    : path_(path),
      handler_(std::move(handler)),
      acceptor_(ListenOnPath(path), "control " + path, /*tcp_nodelay=*/false,
                [this](UniqueFd fd) { ServeOne(fd.get()); }) {}

ControlServer::~ControlServer() { Stop(); }

void ControlServer::Start() { acceptor_.Start(); }

void ControlServer::Stop() {
  if (stopped_) return;
  stopped_ = true;
  acceptor_.Stop();
  ::unlink(path_.c_str());
}

void ControlServer::ServeOne(int fd) {
  SetTimeouts(fd, kClientTimeoutMs);
  std::string line;
  nlohmann::json reply;
  if (!ReadLine(fd, kMaxControlRequest, &line)) {
    reply = {{"ok", false}, {"error", "request missing, too long or too slow"}};
  } else {
    try {
      reply = handler_(ParseControlRequest(line));
    } catch (const std::exception& e) {
      reply = {{"ok", false}, {"error", e.what()}};
    }
  }
  const std::string text = reply.dump() + "\n";
  if (WriteFull(fd, text.data(), text.size()) != 0) {
    LogDebug("control: could not send a reply: %s", std::strerror(errno));
  }
}

nlohmann::json CallControl(const std::string& path, const nlohmann::json& request,
                           int timeout_ms) {
  Endpoint endpoint;
  endpoint.kind = Endpoint::Kind::kUnix;
  endpoint.path = path;
  std::string reason;
  UniqueFd fd = ConnectTo(endpoint, &reason);
  if (!fd.valid()) {
    throw std::runtime_error("cannot reach the daemon at " + path + ": " + reason +
                             " (is `memlend daemon` running? see --control)");
  }
  SetTimeouts(fd.get(), timeout_ms);
  const std::string text = request.dump() + "\n";
  if (WriteFull(fd.get(), text.data(), text.size()) != 0) {
    throw std::runtime_error("cannot send to the daemon at " + path + ": " +
                             std::strerror(errno));
  }
  std::string line;
  if (!ReadLine(fd.get(), kMaxControlReply, &line)) {
    throw std::runtime_error("no reply from the daemon at " + path);
  }
  try {
    return nlohmann::json::parse(line);
  } catch (const nlohmann::json::exception&) {
    throw std::runtime_error("the daemon at " + path + " sent a reply that is not JSON");
  }
}

}  // namespace memlend
