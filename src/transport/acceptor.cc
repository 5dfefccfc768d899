#include "transport/acceptor.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "common/log.h"
#include "common/thread_name.h"

namespace memlend {

Acceptor::Acceptor(UniqueFd listener, std::string name, bool tcp_nodelay, OnAccept on_accept)
    : listener_(std::move(listener)),
      name_(std::move(name)),
      tcp_nodelay_(tcp_nodelay),
      on_accept_(std::move(on_accept)) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) {
    throw std::runtime_error(std::string("cannot create a pipe: ") + std::strerror(errno));
  }
  wake_read_.Reset(fds[0]);
  wake_write_.Reset(fds[1]);
}

Acceptor::~Acceptor() { Stop(); }

void Acceptor::Start() {
  thread_ = std::thread([this] {
    SetThreadName("ml-accept");
    Loop();
  });
}

void Acceptor::Stop() {
  if (thread_.joinable()) {
    const char byte = 1;
    [[maybe_unused]] const ssize_t ignored = ::write(wake_write_.get(), &byte, 1);
    thread_.join();
  }
  listener_.Reset();
}

void Acceptor::Loop() {
  for (;;) {
    pollfd polls[2] = {{listener_.get(), POLLIN, 0}, {wake_read_.get(), POLLIN, 0}};
    if (::poll(polls, 2, -1) < 0) {
      if (errno == EINTR) continue;
      LogError("%s: poll failed: %s", name_.c_str(), std::strerror(errno));
      return;
    }
    if (polls[1].revents != 0) return;
    if (polls[0].revents == 0) continue;

    UniqueFd fd(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!fd.valid()) {
      if (errno != EINTR && errno != ECONNABORTED && errno != EAGAIN) {
        LogError("%s: accept failed: %s", name_.c_str(), std::strerror(errno));
        if (errno == EMFILE || errno == ENFILE) ::usleep(100 * 1000);  // let fds free up
      }
      continue;
    }
    if (tcp_nodelay_) {
      const int one = 1;
      ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    try {
      on_accept_(std::move(fd));
    } catch (const std::exception& e) {
      // One connection is lost, not the daemon (out of memory, say); it closed with `fd`.
      LogError("%s: dropped a connection: %s", name_.c_str(), e.what());
    }
  }
}

}  // namespace memlend
