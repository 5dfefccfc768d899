#include "transport/socket.h"

#include <netdb.h>
#include <netinet/in.h>
#include <fcntl.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <stdexcept>

namespace memlend {
namespace {

bool FillUnixAddress(const std::string& path, sockaddr_un* address) {
  std::memset(address, 0, sizeof(*address));
  address->sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(address->sun_path)) return false;
  std::memcpy(address->sun_path, path.data(), path.size());
  return true;
}

std::string ErrnoText(int error) { return std::strerror(error); }

// Gives the socket file just bound at `path` its group and mode. The socket inode was
// given the mode before bind (so the file was created with at most those bits: the umask
// can only take some away); this adds back what the umask took. Neither call follows a
// symbolic link, so a link swapped in at the path is refused, not followed.
// (Known weakness: in a directory that others may write to without the sticky bit, they
// could swap another socket in between bind and these calls; /run and /tmp are sticky or
// root's.)
int ApplyAccess(const std::string& path, const UnixSocketAccess& access) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) return errno;
  if (!S_ISSOCK(st.st_mode)) return EEXIST;
  if (access.group != static_cast<gid_t>(-1) && st.st_gid != access.group &&
      ::fchownat(AT_FDCWD, path.c_str(), static_cast<uid_t>(-1), access.group,
                 AT_SYMLINK_NOFOLLOW) != 0) {
    return errno;
  }
  if ((st.st_mode & 07777) != access.mode &&
      ::fchmodat(AT_FDCWD, path.c_str(), access.mode, AT_SYMLINK_NOFOLLOW) != 0) {
    return errno;
  }
  return 0;
}

int RemainingMs(Deadline deadline) {
  const auto left = std::chrono::ceil<std::chrono::milliseconds>(
      deadline - std::chrono::steady_clock::now());
  return left.count() <= 0 ? 0 : static_cast<int>(std::min<long long>(left.count(), 1 << 30));
}

// Waits for `events` on fd until the deadline: 0, -ETIMEDOUT or -errno.
int WaitFor(int fd, short events, Deadline deadline) noexcept {
  for (;;) {
    const int left = RemainingMs(deadline);
    if (left == 0) return -ETIMEDOUT;
    pollfd poll_fd{fd, events, 0};
    const int n = ::poll(&poll_fd, 1, left);
    if (n > 0) return 0;
    if (n < 0 && errno != EINTR) return -errno;
  }
}

}  // namespace

std::string Endpoint::ToString() const {
  if (kind == Kind::kUnix) return "unix:" + path;
  const bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

std::optional<Endpoint> ParseEndpoint(std::string_view text, std::string* error) {
  Endpoint endpoint;
  if (text.starts_with("unix:")) {
    endpoint.kind = Endpoint::Kind::kUnix;
    endpoint.path = std::string(text.substr(5));
    sockaddr_un unused;
    if (!FillUnixAddress(endpoint.path, &unused)) {
      *error = "unix socket path must be 1 to " + std::to_string(sizeof(unused.sun_path) - 1) +
               " bytes";
      return std::nullopt;
    }
    return endpoint;
  }
  std::string_view host;
  std::string_view port;
  if (text.starts_with("[")) {
    const std::size_t close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      *error = "expected [ADDRESS]:PORT";
      return std::nullopt;
    }
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    const std::size_t colon = text.rfind(':');
    if (colon == std::string_view::npos || text.find(':') != colon) {
      *error = "expected HOST:PORT, [ADDRESS]:PORT or unix:PATH";
      return std::nullopt;
    }
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
  }
  unsigned value = 0;
  const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (host.empty() || port.empty() || ec != std::errc() || end != port.data() + port.size() ||
      value == 0 || value > 65535) {
    *error = "expected HOST:PORT with a port from 1 to 65535";
    return std::nullopt;
  }
  for (const char c : host) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '-' || c == '_' || c == ':' || c == '%';
    if (!ok) {
      *error = "the host may hold only letters, digits and . - _ : %";
      return std::nullopt;
    }
  }
  endpoint.host = std::string(host);
  endpoint.port = static_cast<std::uint16_t>(value);
  return endpoint;
}

UniqueFd ListenOn(const Endpoint& endpoint, const UnixSocketAccess& access) {
  const std::string name = endpoint.ToString();
  if (endpoint.kind == Endpoint::Kind::kUnix) {
    sockaddr_un address;
    if (!FillUnixAddress(endpoint.path, &address)) {
      throw std::runtime_error("cannot listen on " + name + ": path too long");
    }
    struct stat st;
    if (::lstat(endpoint.path.c_str(), &st) == 0) {
      if (!S_ISSOCK(st.st_mode)) {
        throw std::runtime_error("cannot listen on " + name + ": file exists and is not a socket");
      }
      std::string ignored;
      if (ConnectTo(endpoint, &ignored).valid()) {
        throw std::runtime_error("cannot listen on " + name + ": address already in use");
      }
      ::unlink(endpoint.path.c_str());  // stale socket from a process that is gone
    }
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    // bind creates the file with the socket inode's mode less the umask.
    if (!fd.valid() || ::fchmod(fd.get(), access.mode & 07777) != 0 ||
        ::bind(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
      throw std::runtime_error("cannot listen on " + name + ": " + ErrnoText(errno));
    }
    if (const int error = ApplyAccess(endpoint.path, access); error != 0) {
      ::unlink(endpoint.path.c_str());
      throw std::runtime_error("cannot set the owner group and mode of " + endpoint.path + ": " +
                               ErrnoText(error));
    }
    if (::listen(fd.get(), 128) != 0) {
      const int error = errno;
      ::unlink(endpoint.path.c_str());
      throw std::runtime_error("cannot listen on " + name + ": " + ErrnoText(error));
    }
    return fd;
  }

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* results = nullptr;
  const std::string port = std::to_string(endpoint.port);
  const int gai = ::getaddrinfo(endpoint.host.c_str(), port.c_str(), &hints, &results);
  if (gai != 0) {
    throw std::runtime_error("cannot listen on " + name + ": " + ::gai_strerror(gai));
  }
  int last_error = EADDRNOTAVAIL;
  UniqueFd fd;
  for (addrinfo* ai = results; ai != nullptr; ai = ai->ai_next) {
    UniqueFd candidate(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
    if (!candidate.valid()) {
      last_error = errno;
      continue;
    }
    const int one = 1;
    ::setsockopt(candidate.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(candidate.get(), ai->ai_addr, ai->ai_addrlen) == 0 &&
        ::listen(candidate.get(), 128) == 0) {
      fd = std::move(candidate);
      break;
    }
    last_error = errno;
  }
  ::freeaddrinfo(results);
  if (!fd.valid()) {
    throw std::runtime_error("cannot listen on " + name + ": " + ErrnoText(last_error));
  }
  return fd;
}

namespace {

// connect(2) that gives up at `deadline`: non-blocking, then a wait for the outcome.
// Returns 0 or -errno (-ETIMEDOUT when the deadline passed). Leaves `fd` blocking.
int ConnectBefore(int fd, const sockaddr* address, socklen_t length, Deadline deadline) {
  if (deadline == Deadline::max()) return ::connect(fd, address, length) == 0 ? 0 : -errno;
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) return -errno;
  int rc = ::connect(fd, address, length) == 0 ? 0 : -errno;
  if (rc == -EINPROGRESS) {
    for (;;) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) {
        rc = -ETIMEDOUT;
        break;
      }
      pollfd ready{fd, POLLOUT, 0};
      const int n = ::poll(&ready, 1, static_cast<int>(std::min<long long>(left.count(), 60000)));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        rc = -errno;
        break;
      }
      if (n == 0) continue;
      int error = 0;
      socklen_t size = sizeof(error);
      rc = ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size) != 0 ? -errno : -error;
      break;
    }
  }
  if (::fcntl(fd, F_SETFL, flags) != 0 && rc == 0) rc = -errno;
  return rc;
}

}  // namespace

UniqueFd ConnectTo(const Endpoint& endpoint, std::string* error, Deadline deadline) {
  if (endpoint.kind == Endpoint::Kind::kUnix) {
    sockaddr_un address;
    if (!FillUnixAddress(endpoint.path, &address)) {
      *error = "path too long";
      return UniqueFd();
    }
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd.valid()) {
      *error = ErrnoText(errno);
      return UniqueFd();
    }
    if (const int rc = ConnectBefore(fd.get(), reinterpret_cast<sockaddr*>(&address),
                                     sizeof(address), deadline);
        rc != 0) {
      *error = ErrnoText(-rc);
      return UniqueFd();
    }
    return fd;
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* results = nullptr;
  const std::string port = std::to_string(endpoint.port);
  const int gai = ::getaddrinfo(endpoint.host.c_str(), port.c_str(), &hints, &results);
  if (gai != 0) {
    *error = ::gai_strerror(gai);
    return UniqueFd();
  }
  UniqueFd fd;
  *error = "no address";
  for (addrinfo* ai = results; ai != nullptr; ai = ai->ai_next) {
    UniqueFd candidate(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
    if (!candidate.valid()) {
      *error = ErrnoText(errno);
      continue;
    }
    const int rc = ConnectBefore(candidate.get(), ai->ai_addr, ai->ai_addrlen, deadline);
    if (rc == 0) {
      const int one = 1;
      ::setsockopt(candidate.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      fd = std::move(candidate);
      break;
    }
    *error = rc == -ETIMEDOUT ? "timed out" : ErrnoText(-rc);
    if (rc == -ETIMEDOUT) break;
  }
  ::freeaddrinfo(results);
  return fd;
}

int WriteFull(int fd, const void* data, std::size_t length) noexcept {
  const auto* bytes = static_cast<const std::byte*>(data);
  while (length > 0) {
    const ssize_t n = ::send(fd, bytes, length, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    bytes += n;
    length -= static_cast<std::size_t>(n);
  }
  return 0;
}

int WriteVectorFull(int fd, iovec* parts, int count) noexcept {
  while (count > 0) {
    msghdr message{};
    message.msg_iov = parts;
    message.msg_iovlen = static_cast<std::size_t>(count);
    ssize_t sent = ::sendmsg(fd, &message, MSG_NOSIGNAL);
    if (sent < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    while (count > 0 && static_cast<std::size_t>(sent) >= parts->iov_len) {
      sent -= static_cast<ssize_t>(parts->iov_len);
      ++parts;
      --count;
    }
    if (count > 0) {
      parts->iov_base = static_cast<std::byte*>(parts->iov_base) + sent;
      parts->iov_len -= static_cast<std::size_t>(sent);
    }
  }
  return 0;
}

int ReadFull(int fd, void* data, std::size_t length) noexcept {
  auto* bytes = static_cast<std::byte*>(data);
  while (length > 0) {
    const ssize_t n = ::recv(fd, bytes, length, MSG_WAITALL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (n == 0) return -ECONNRESET;
    bytes += n;
    length -= static_cast<std::size_t>(n);
  }
  return 0;
}

int WaitReadable(int fd, Deadline deadline) noexcept { return WaitFor(fd, POLLIN, deadline); }

int ReadFullBefore(int fd, void* data, std::size_t length, Deadline deadline) noexcept {
  auto* bytes = static_cast<std::byte*>(data);
  while (length > 0) {
    if (const int rc = WaitFor(fd, POLLIN, deadline); rc != 0) return rc;
    const ssize_t n = ::recv(fd, bytes, length, MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return -errno;
    }
    if (n == 0) return -ECONNRESET;
    bytes += n;
    length -= static_cast<std::size_t>(n);
  }
  return 0;
}

int WriteFullBefore(int fd, const void* data, std::size_t length, Deadline deadline) noexcept {
  const auto* bytes = static_cast<const std::byte*>(data);
  while (length > 0) {
    if (const int rc = WaitFor(fd, POLLOUT, deadline); rc != 0) return rc;
    const ssize_t n = ::send(fd, bytes, length, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return -errno;
    }
    bytes += n;
    length -= static_cast<std::size_t>(n);
  }
  return 0;
}

long ReceiveSome(int fd, void* data, std::size_t length, std::chrono::microseconds spin) noexcept {
  const auto spin_until = std::chrono::steady_clock::now() + spin;
  int flags = spin.count() > 0 ? MSG_DONTWAIT : 0;
  for (;;) {
    const ssize_t n = ::recv(fd, data, length, flags);
    if (n >= 0) return n;
    if (errno == EINTR) continue;
    if (errno == EAGAIN && flags != 0) {
      if (std::chrono::steady_clock::now() >= spin_until) flags = 0;  // now block
      // Let a thread that is ready to run on this CPU have it: it may be the very one that
      // is to send what we wait for (see socket.h).
      ::sched_yield();
      continue;
    }
    return -errno;
  }
}

}  // namespace memlend
