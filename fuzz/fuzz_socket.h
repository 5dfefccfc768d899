// What the fuzz targets share: playing the far end of a stream socket for one input.
//
// The code under test reads a socket and writes replies to it, so an input is a byte
// stream a client (or a lender) sends. The far end writes the input, shuts its side down
// for writing, and reads and drops every reply until the code under test closes the
// socket. Writing and reading are interleaved with poll(2), so neither side ever blocks
// on a full socket buffer, however much the code under test answers.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <thread>

#include "common/unique_fd.h"
#include "transport/socket.h"

namespace memlend::fuzz {

// A fresh directory under $TMPDIR (or /tmp) holding one unix socket, `socket.sock`, for the
// life of the process; removed when it exits normally. Aborts, naming `target`, if the
// directory cannot be made.
struct SocketDir {
  explicit SocketDir(const char* target) {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") +
                          "/memlend-fuzz-" + target + "-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) {
      std::fprintf(stderr, "%s_fuzz: mkdtemp: %s\n", target, std::strerror(errno));
      std::abort();
    }
    dir = pattern;
    endpoint.kind = Endpoint::Kind::kUnix;
    endpoint.path = dir + "/socket.sock";
  }
  ~SocketDir() {
    ::unlink(endpoint.path.c_str());
    ::rmdir(dir.c_str());
  }
  SocketDir(const SocketDir&) = delete;
  SocketDir& operator=(const SocketDir&) = delete;

  std::string dir;
  Endpoint endpoint;
};

// Writes `input` to `fd`, shuts `fd` down for writing, and reads until the other end
// closes (or resets) the stream; drops what it reads. A failed write (the other end hung
// up early) ends the writing, not the reading. Returns the number of bytes read.
inline std::size_t FeedAndDrain(int fd, std::span<const std::uint8_t> input) {
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  std::size_t written = 0;
  std::size_t read = 0;
  bool writing = true;
  if (input.empty()) {
    ::shutdown(fd, SHUT_WR);
    writing = false;
  }
  static thread_local std::byte scratch[64 * 1024];
  for (;;) {
    pollfd events{fd, static_cast<short>(POLLIN | (writing ? POLLOUT : 0)), 0};
    if (::poll(&events, 1, -1) < 0) {
      if (errno == EINTR) continue;
      return read;
    }
    if (writing && (events.revents & (POLLOUT | POLLERR | POLLHUP))) {
      const ssize_t n =
          ::send(fd, input.data() + written, input.size() - written, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) written += static_cast<std::size_t>(n);
      if ((n < 0 && errno != EAGAIN && errno != EINTR) || written == input.size()) {
        ::shutdown(fd, SHUT_WR);
        writing = false;
      }
    }
    if (events.revents & (POLLIN | POLLERR | POLLHUP)) {
      const ssize_t n = ::recv(fd, scratch, sizeof(scratch), MSG_DONTWAIT);
      if (n == 0) return read;
      if (n > 0) {
        read += static_cast<std::size_t>(n);
      } else if (errno != EAGAIN && errno != EINTR) {
        return read;
      }
    }
  }
}

// Runs `serve(fd)` on the calling thread on one end of a fresh unix socket pair while
// another thread feeds `input` to the other end and drains it (FeedAndDrain). The
// server's end is closed when `serve` returns, which ends the drain.
template <typename Serve>
void ServeInput(std::span<const std::uint8_t> input, Serve serve) {
  int ends[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, ends) != 0) {
    std::perror("fuzz: socketpair");
    std::abort();
  }
  UniqueFd server(ends[0]);
  UniqueFd client(ends[1]);
  std::thread peer([&client, input] { FeedAndDrain(client.get(), input); });
  serve(server.get());
  server.Reset();
  peer.join();
}

}  // namespace memlend::fuzz
