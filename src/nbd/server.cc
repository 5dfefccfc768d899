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
#include "common/thread_name.h"
#include "nbd/handshake.h"
#include "nbd/transmission.h"

namespace memlend::nbd {

NbdServer::NbdServer(const Endpoint& endpoint, const DeviceTable& devices,
                     std::chrono::microseconds busy_poll)
    : endpoint_(endpoint),
      devices_(devices),
      busy_poll_(busy_poll),
      acceptor_(ListenOn(endpoint), "nbd " + endpoint.ToString(),
                endpoint.kind == Endpoint::Kind::kTcp,
                [this](UniqueFd fd) { Accept(std::move(fd)); }) {}

NbdServer::~NbdServer() { Stop(); }

void NbdServer::Start() { acceptor_.Start(); }

void NbdServer::Stop() {
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    for (Client& client : clients_) ::shutdown(client.fd.get(), SHUT_RDWR);
  }
  acceptor_.Stop();
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

void NbdServer::Accept(UniqueFd fd) {
  std::lock_guard lock(mu_);
  ReapFinishedLocked();
  if (stopping_) return;
  Client& client = clients_.emplace_back();
  client.fd = std::move(fd);
  client.thread = std::thread([this, &client] { ServeClient(&client); });
}

void NbdServer::ServeClient(Client* client) {
  SetThreadName("ml-nbd-serve");
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
