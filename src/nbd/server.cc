#include "nbd/server.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <new>
#include <string>
#include <system_error>
#include <thread>

#include "common/thread_name.h"
#include "nbd/handshake.h"
#include "nbd/transmission.h"

namespace memlend::nbd {

NbdServer::NbdServer(const Endpoint& endpoint, const DeviceTable& devices,
                     const NbdServerOptions& options)
    : endpoint_(endpoint),
      devices_(devices),
      options_(options),
      acceptor_(ListenOn(endpoint, options.access), "nbd " + endpoint.ToString(),
                endpoint.kind == Endpoint::Kind::kTcp,
                [this](UniqueFd fd) { Accept(std::move(fd)); }) {}

NbdServer::~NbdServer() { Stop(); }

void NbdServer::Start() { acceptor_.Start(); }

void NbdServer::Stop() {
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    // Under mu_: a thread closes its descriptor only under mu_, so each one here is live.
    for (Client& client : clients_) ::shutdown(client.fd.get(), SHUT_RDWR);
  }
  acceptor_.Stop();
  // No new clients can appear now; wait for the ones that are winding down.
  std::unique_lock lock(mu_);
  threads_done_.wait(lock, [this] { return threads_ == 0; });
  lock.unlock();
  if (endpoint_.kind == Endpoint::Kind::kUnix) ::unlink(endpoint_.path.c_str());
}

unsigned NbdServer::connections() const {
  std::lock_guard lock(mu_);
  return static_cast<unsigned>(clients_.size());
}

void NbdServer::LogRefusal(const char* why) {
  std::uint64_t held_back = 0;
  if (!refusals_.Allow(&held_back)) return;
  if (held_back > 0) {
    LogError("nbd %s: refused a connection: %s (and %llu more since the last such message)",
             endpoint_.ToString().c_str(), why, static_cast<unsigned long long>(held_back));
  } else {
    LogError("nbd %s: refused a connection: %s", endpoint_.ToString().c_str(), why);
  }
}

void NbdServer::Accept(UniqueFd fd) {
  std::lock_guard lock(mu_);
  if (stopping_) return;
  if (clients_.size() >= options_.max_connections) {
    // NBD has no way to say why before the client's first option; the server's log does.
    const std::string why = std::to_string(clients_.size()) +
                            " connections are open, the most this server takes "
                            "(--max-connections)";
    LogRefusal(why.c_str());
    return;
  }
  ClientList::iterator client;
  try {
    client = clients_.emplace(clients_.end());
  } catch (const std::bad_alloc&) {
    LogRefusal("no memory for it");
    return;
  }
  client->fd = std::move(fd);
  try {
    std::thread([this, client] { ServeClient(client); }).detach();
    ++threads_;
  } catch (const std::exception& e) {  // pthread_create failed, or the thread's state
    clients_.erase(client);            // closes the connection
    const std::string why = std::string("cannot start a thread for it: ") + e.what();
    LogRefusal(why.c_str());
  }
}

void NbdServer::ServeClient(ClientList::iterator client) {
  SetThreadName("ml-nbd-serve");
  const int fd = client->fd.get();
  try {
    const Deadline deadline = std::chrono::steady_clock::now() + options_.handshake_timeout;
    if (std::shared_ptr<Device> device = RunHandshake(fd, devices_, deadline)) {
      LogDebug("nbd: client attached to %s", device->name().c_str());
      RunTransmission(fd, *device, options_.busy_poll);
    }
  } catch (const std::bad_alloc&) {
    LogError("nbd %s: out of memory for a connection's buffers, hanging up",
             endpoint_.ToString().c_str());
  }
  std::lock_guard lock(mu_);
  clients_.erase(client);  // hangs up, under mu_ (see Stop)
  --threads_;
  // Notified under mu_, and nothing of the server is touched once mu_ is released: from
  // then on Stop() may return and the server be destroyed. (notify_all_at_thread_exit
  // releases the lock first and notifies after, on a condition variable that may be gone
  // by then.)
  threads_done_.notify_all();
}

}  // namespace memlend::nbd
