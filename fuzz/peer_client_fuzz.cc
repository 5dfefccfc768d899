// Fuzz target: the borrower's end of the peer protocol, PeerClient reading what a lender
// sends.
//
// An input is what a lender sends on a fresh connection: the HELLO reply (tag 0), then
// replies and notices (EVICTED, RECLAIM, SHUTDOWN) in any order. A unix listener in a
// temporary directory, made once per process, plays the lender: for each input a thread
// accepts the PeerClient's connection, writes the input, shuts the socket down for writing
// and drops what the client sends until it hangs up. Once connected, the client makes a
// fixed series of calls, whose tags are therefore known (1, 2, ... in this order):
//   1 QUERY   2 ALLOC_SUPERPAGE   3 WRITE (16 bytes)   4 READ (16 bytes)
//   5 PUT (ephemeral, 4096 bytes)   6 GET (16 bytes)   then FLUSH and FREE_SUPERPAGE,
//   which take tag 0 and want no reply;   7, 8 two READs in flight at once (16 bytes and
//   64 KiB);   9-12 one batch of WRITE, READ (16 bytes), PUT, GET (16 bytes).
// A reply whose tag nobody waits for is skipped; the end of the input ends every call.
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "fuzz_socket.h"
#include "peer/peer_client.h"
#include "peer/wire.h"
#include "transport/socket.h"

namespace memlend::fuzz {
namespace {

using peer::PeerClient;

// The fake lender's listening socket, in a directory removed when the process exits
// normally.
struct Listener {
  Listener() : fd(ListenOn(socket_dir.endpoint)) {}
  SocketDir socket_dir{"peer_client"};
  const Endpoint& endpoint = socket_dir.endpoint;
  UniqueFd fd;
};

// What OnNotice read, so that the reads are not optimised away.
volatile unsigned g_notice_sum = 0;

// Reads every byte of a notice, so that the sanitizers check the span it is handed.
void OnNotice(const peer::Message& notice, std::span<const std::byte> payload) {
  unsigned sum = static_cast<unsigned>(notice.type);
  for (const std::byte b : payload) sum += static_cast<unsigned>(b);
  g_notice_sum = sum;
}

// The calls a borrower makes, in a fixed order (see the top of this file).
void UseClient(PeerClient& client) {
  std::vector<std::byte> page(peer::kPageBytes, std::byte{0x5a});
  std::byte small[16];
  const peer::HandleBody handle{1, 0, 42};

  peer::QueryReply query;
  client.Query(&query);
  std::uint32_t sid = 0;
  client.AllocSuperpage(&sid);
  client.Write(sid, 0, std::span<const std::byte>(page.data(), sizeof(small)));
  client.Read(sid, 0, small);
  client.Put(handle, peer::kPutEphemeral, page);
  client.Get(handle, small);
  client.FlushNoReply(handle);
  client.FreeSuperpageNoReply(sid, /*wait_to_send=*/true);

  std::byte small_read[16];
  std::vector<std::byte> large_read(64 * 1024);
  PeerClient::Pending first;
  first.out = small_read;
  PeerClient::Pending second;
  second.out = large_read;
  // Both are in flight at once: their replies may come in either order.
  const bool first_sent = client.SubmitRead(sid, 0, &first) == 0;
  const bool second_sent = client.SubmitRead(sid, peer::kPageBytes, &second) == 0;
  if (first_sent) PeerClient::Wait(&first);
  if (second_sent) PeerClient::Wait(&second);

  PeerClient::Pending batched[4];
  std::byte batch_read[16];
  std::byte batch_get[16];
  batched[1].out = batch_read;
  batched[3].out = batch_get;
  {
    PeerClient::Batch batch(client);
    batch.AddWrite(sid, 0, std::span<const std::byte>(page.data(), sizeof(small)), &batched[0]);
    batch.AddRead(sid, 0, &batched[1]);
    batch.AddPut(handle, 0, page, &batched[2]);
    batch.AddGet(handle, &batched[3]);
    batch.Send();
  }
  for (PeerClient::Pending& pending : batched) PeerClient::Wait(&pending);
}

void Connect(const Listener& listener, std::span<const std::uint8_t> input) {
  std::thread lender([&listener, input] {
    UniqueFd connection(::accept4(listener.fd.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!connection.valid()) {
      std::perror("peer_client_fuzz: accept");
      std::abort();
    }
    FeedAndDrain(connection.get(), input);
  });
  try {
    PeerClient client(listener.endpoint, 0xb0e0e1ULL, OnNotice, std::chrono::milliseconds(500));
    UseClient(client);
  } catch (const std::runtime_error&) {
    // A refused or garbled HELLO: the borrower skips this lender.
  }
  lender.join();
}

}  // namespace
}  // namespace memlend::fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static memlend::fuzz::Listener listener;
  memlend::fuzz::Connect(listener, std::span<const std::uint8_t>(data, size));
  return 0;
}
