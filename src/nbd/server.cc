#include "nbd/server.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/log.h"
#include "nbd/handshake.h"
#include "nbd/transmission.h"

namespace memlend::nbd {

NbdServer::NbdServer(const Endpoint& endpoint, const DeviceTable& devices,
                     std::chrono::microseconds busy_poll)
    : endpoint_(endpoint),
      devices_(devices),
      busy_poll_(busy_poll),
      listener_(ListenOn(endpoint)) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) {
    throw std::runtime_error(std::string("cannot create a pipe: ") + std::strerror(errno));
  }
  wake_read_.Reset(fds[0]);
  wake_write_.Reset(fds[1]);
}

NbdServer::~NbdServer() { Stop(); }

void NbdServer::Start() { acceptor_ = std::thread([this] { AcceptLoop(); }); }

void NbdServer::Stop() {
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    for (Client& client : clients_) ::shutdown(client.fd.get(), SHUT_RDWR);
  }
  const char byte = 1;
  [[maybe_unused]] const ssize_t ignored = ::write(wake_write_.get(), &byte, 1);
  if (acceptor_.joinable()) acceptor_.join();
  // No new clients can appear now; wait for the ones that are winding down.
  std::list<Client> remaining;
  {
    std::lock_guard lock(mu_);
    remaining.swap(clients_);
  }
  for (Client& client : remaining) {
    if (client.thread.joinable()) client.thread.join();
  }
  if (endpoint_.kind == Endpoint::Kind::kUnix) ::unlink(endpoint_.path.c_str());
}

void NbdServer::AcceptLoop() {
  for (;;) {
    pollfd polls[2] = {{listener_.get(), POLLIN, 0}, {wake_read_.get(), POLLIN, 0}};
    if (::poll(polls, 2, -1) < 0) {
      if (errno == EINTR) continue;
      LogError("nbd: poll failed on %s: %s", endpoint_.ToString().c_str(), std::strerror(errno));
      return;
    }
    if (polls[1].revents != 0) return;
    if (polls[0].revents == 0) continue;

    UniqueFd fd(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!fd.valid()) {
      if (errno != EINTR && errno != ECONNABORTED && errno != EAGAIN) {
        LogError("nbd: accept failed on %s: %s", endpoint_.ToString().c_str(),
                 std::strerror(errno));
        if (errno == EMFILE || errno == ENFILE) ::usleep(100 * 1000);  // let fds free up
      }
      continue;
    }
    if (endpoint_.kind == Endpoint::Kind::kTcp) {
      const int one = 1;
      ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }

    std::lock_guard lock(mu_);
    ReapFinishedLocked();
    if (stopping_) return;
    Client& client = clients_.emplace_back();
    client.fd = std::move(fd);
    client.thread = std::thread([this, &client] { ServeClient(&client); });
  }
}

void NbdServer::ServeClient(Client* client) {
  if (std::shared_ptr<Device> device = RunHandshake(client->fd.get(), devices_)) {
    LogDebug("nbd: client attached to %s", device->name().c_str());
    RunTransmission(client->fd.get(), *device, busy_poll_);
  }
  // Hang up now; the descriptor itself is closed when the thread is reaped, so Stop()
  // never shuts down a number that was reused meanwhile.
  ::shutdown(client->fd.get(), SHUT_RDWR);
  client->finished.store(true, std::memory_order_release);
}

void NbdServer::ReapFinishedLocked() {
  for (auto it = clients_.begin(); it != clients_.end();) {
    if (it->finished.load(std::memory_order_acquire)) {
      it->thread.join();
      it = clients_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace memlend::nbd
