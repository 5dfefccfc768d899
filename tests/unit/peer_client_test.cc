// PeerClient deadlines against a scripted lender on a unix socket: a request whose reply does
// not come in time fails with -ETIMEDOUT and leaves the client overdue; the late reply is
// skipped by its tag, and a reply in time clears the overdue mark.
#include <doctest/doctest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <future>
#include <string>
#include <thread>

#include "peer/codec.h"
#include "peer/peer_client.h"
#include "transport/socket.h"

namespace memlend::peer {
namespace {

using Clock = std::chrono::steady_clock;

// Reads one request header (and skips its payload); false at end of stream.
bool ReadRequest(int fd, Message* message) {
  std::byte wire[sizeof(Header)];
  if (ReadFull(fd, wire, sizeof(wire)) != 0) return false;
  if (DecodeHeader(wire, message) != HeaderCheck::kOk) return false;
  std::byte skip[4096];
  for (std::uint32_t left = message->payload_bytes; left > 0;) {
    const std::uint32_t chunk = std::min<std::uint32_t>(left, sizeof(skip));
    if (ReadFull(fd, skip, chunk) != 0) return false;
    left -= chunk;
  }
  return true;
}

template <typename Body>
void Reply(int fd, MessageType type, std::uint64_t tag, const Body& body) {
  std::byte wire[sizeof(Header) + sizeof(Body)];
  EncodeHeader(type, true, 0, Status::kOk, tag, sizeof(Body),
               std::span<std::byte, sizeof(Header)>(wire, sizeof(Header)));
  EncodeBody(body, wire + sizeof(Header));
  REQUIRE(WriteFull(fd, wire, sizeof(wire)) == 0);
}

// Accepts the client's connection on `listener` and answers its HELLO.
UniqueFd AcceptAndGreet(int listener) {
  UniqueFd fd(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
  REQUIRE(fd.valid());
  Message hello;
  REQUIRE(ReadRequest(fd.get(), &hello));
  Reply(fd.get(), MessageType::kHello, hello.tag,
        HelloBody{0x1e4de7, 64 << 20, kSuperpageBytes, kCapPassive | kCapActive});
  return fd;
}

struct SocketDir {
  std::string path;
  SocketDir() {
    char pattern[] = "/tmp/memlend-peer-client-XXXXXX";
    REQUIRE(::mkdtemp(pattern) != nullptr);
    path = pattern;
  }
  // The scripted lender's address in it.
  memlend::Endpoint Endpoint() const {
    std::string error;
    const auto endpoint = ParseEndpoint("unix:" + path + "/lender.sock", &error);
    REQUIRE(endpoint);
    return *endpoint;
  }
  ~SocketDir() {
    ::unlink((path + "/lender.sock").c_str());
    ::rmdir(path.c_str());
  }
};

TEST_CASE("a reply that misses its deadline: -ETIMEDOUT, overdue, skipped when it comes late") {
  SocketDir dir;
  const Endpoint endpoint = dir.Endpoint();
  UniqueFd listener = ListenOn(endpoint);
  std::promise<void> first_given_up;
  std::future<void> answer_late = first_given_up.get_future();
  std::thread lender([&] {
    UniqueFd fd = AcceptAndGreet(listener.get());
    Message first;
    REQUIRE(ReadRequest(fd.get(), &first));
    answer_late.wait();  // the client has given up on it
    Reply(fd.get(), MessageType::kQuery, first.tag, QueryReply{1, 1, 0, 1, 512});
    Message second;
    REQUIRE(ReadRequest(fd.get(), &second));
    Reply(fd.get(), MessageType::kQuery, second.tag, QueryReply{2, 2, 0, 1, 512});
    Message end;
    CHECK_FALSE(ReadRequest(fd.get(), &end));  // the client hangs up
  });

  {
    PeerClientOptions options;
    options.request_timeout = std::chrono::milliseconds(100);
    PeerClient client(endpoint, 0xb0, nullptr, options);
    CHECK(client.overdue_since() == Clock::time_point::min());
    QueryReply reply{};
    const auto start = Clock::now();
    CHECK(client.Query(&reply) == -ETIMEDOUT);
    CHECK(Clock::now() - start >= std::chrono::milliseconds(100));
    CHECK(client.overdue_since() != Clock::time_point::min());
    CHECK(client.connected());
    first_given_up.set_value();
    // The late reply (total 1) is dropped; this request gets its own (total 2), in time.
    reply = {};
    CHECK(client.Query(&reply) == 0);
    CHECK(reply.total_pages == 2);
    CHECK(client.overdue_since() == Clock::time_point::min());
    CHECK(client.connected());
  }
  lender.join();
}

TEST_CASE("a superpage granted after its ALLOC_SUPERPAGE gave up is given back") {
  SocketDir dir;
  const Endpoint endpoint = dir.Endpoint();
  UniqueFd listener = ListenOn(endpoint);
  std::promise<void> given_up;
  std::future<void> grant_late = given_up.get_future();
  std::atomic<std::uint32_t> freed{0};
  std::thread lender([&] {
    UniqueFd fd = AcceptAndGreet(listener.get());
    Message alloc;
    REQUIRE(ReadRequest(fd.get(), &alloc));
    REQUIRE(alloc.type == MessageType::kAllocSuperpage);
    grant_late.wait();
    Reply(fd.get(), MessageType::kAllocSuperpage, alloc.tag, SuperpageBody{77});
    // The client gives it back, without a reply wanted, and asks a QUERY: in either order
    // (the QUERY may go out before the grant is read).
    for (int message = 0; message < 2; ++message) {
      std::byte wire[sizeof(Header)];
      REQUIRE(ReadFull(fd.get(), wire, sizeof(wire)) == 0);
      Message request;
      REQUIRE(DecodeHeader(wire, &request) == HeaderCheck::kOk);
      if (request.type == MessageType::kQuery) {
        Reply(fd.get(), MessageType::kQuery, request.tag, QueryReply{3, 3, 0, 1, 512});
        continue;
      }
      CHECK(request.type == MessageType::kFreeSuperpage);
      CHECK(request.tag == 0);  // no reply wanted
      REQUIRE(request.payload_bytes == sizeof(SuperpageBody));
      SuperpageBody body{};
      REQUIRE(ReadFull(fd.get(), &body, sizeof(body)) == 0);
      freed.store(body.sid);
    }
    Message end;
    CHECK_FALSE(ReadRequest(fd.get(), &end));
  });
  {
    PeerClientOptions options;
    options.request_timeout = std::chrono::milliseconds(100);
    PeerClient client(endpoint, 0xb1, nullptr, options);
    std::uint32_t sid = 0;
    CHECK(client.AllocSuperpage(&sid) == -ETIMEDOUT);
    given_up.set_value();
    // The late grant is read (by the idle reader or the QUERY's waiter) and freed.
    QueryReply reply{};
    CHECK(client.Query(&reply) == 0);
    CHECK(reply.total_pages == 3);
    for (int wait = 0; wait < 500 && freed.load() == 0; ++wait) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  lender.join();
  CHECK(freed.load() == 77);
}

TEST_CASE("a connect to an address that does not answer gives up at its deadline") {
  // 192.0.2.0/24 (TEST-NET-1) is never routed; where the host has no route at all the connect
  // fails at once instead, which is as good: either way it does not hang.
  std::string error;
  const auto endpoint = ParseEndpoint("192.0.2.1:7710", &error);
  REQUIRE(endpoint);
  const auto start = Clock::now();
  const UniqueFd fd = ConnectTo(*endpoint, &error, start + std::chrono::milliseconds(200));
  CHECK_FALSE(fd.valid());
  CHECK(Clock::now() - start < std::chrono::seconds(10));  // a hang guard, not a timing check
  CHECK_FALSE(error.empty());
}

}  // namespace
}  // namespace memlend::peer
