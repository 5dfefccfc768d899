// NBD protocol conformance and robustness on a raw socket: option negotiation, error replies to
// bad requests on a connection that keeps working, oversized writes, and garbled handshakes that
// must close only the connection that sent them.

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "harness.h"
#include "raw_nbd_client.h"

namespace memlend::integration {
namespace {

using namespace nbd_wire;

constexpr uint64_t kDeviceSize = 64 * kMiB;      // d0: big enough for an in-range 33 MiB request
constexpr uint64_t kSmallDeviceSize = 4 * kMiB;  // d1
constexpr uint32_t kTooLong = 33 * kMiB;         // above the 32 MiB maximum block size

// The transmission flags memlend must advertise.
constexpr uint16_t kRequiredFlags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
                                    NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES |
                                    NBD_FLAG_CAN_MULTI_CONN;

DaemonOptions TwoDevices() {
  DaemonOptions options;
  options.devices = {"d0:64M", "d1:4M"};
  return options;
}

// Parses the names out of NBD_REP_SERVER replies (u32 name length, name, optional description).
std::string ServerReplyName(const RawNbdClient::OptionReply& reply) {
  REQUIRE(reply.data.size() >= 4);
  uint32_t length = static_cast<uint32_t>(reply.data[0]) << 24 | reply.data[1] << 16 |
                    reply.data[2] << 8 | reply.data[3];
  REQUIRE(4 + length <= reply.data.size());
  return std::string(reply.data.begin() + 4, reply.data.begin() + 4 + length);
}

// A known page at offset 0 and at the last page of d0, written through a raw connection and read
// back after every bad request to prove the connection is still in sync.
struct KnownPages {
  std::vector<uint8_t> first;
  std::vector<uint8_t> last;
};

KnownPages WriteKnownPages(RawNbdClient& raw) {
  std::mt19937_64 rng(TestSeed());
  KnownPages pages{std::vector<uint8_t>(kPageSize), std::vector<uint8_t>(kPageSize)};
  FillRandom(rng, pages.first);
  FillRandom(rng, pages.last);
  REQUIRE(raw.Write(0, pages.first, 1) == 0);
  REQUIRE(raw.Write(kDeviceSize - kPageSize, pages.last, 2) == 0);
  return pages;
}

void CheckKnownPages(RawNbdClient& raw, const KnownPages& pages, uint64_t cookie) {
  CHECK(DescribeMismatch(pages.first, raw.Read(0, kPageSize, cookie), 0) == "");
  CHECK(DescribeMismatch(pages.last, raw.Read(kDeviceSize - kPageSize, kPageSize, cookie + 1),
                         kDeviceSize - kPageSize) == "");
}

void CheckKnownPages(NbdClient& client, const KnownPages& pages) {
  std::vector<uint8_t> buffer(kPageSize);
  client.Read(buffer, 0);
  CHECK(DescribeMismatch(pages.first, buffer, 0) == "");
  client.Read(buffer, kDeviceSize - kPageSize);
  CHECK(DescribeMismatch(pages.last, buffer, kDeviceSize - kPageSize) == "");
}

// One malformed or refused request and the error it must get.
struct BadRequest {
  const char* what;
  uint16_t flags;
  uint16_t type;
  uint64_t offset;
  uint32_t length;
  bool sends_payload;  // a WRITE carries `length` bytes of payload that the server must consume
  std::vector<uint32_t> allowed_errors;
};

}  // namespace

TEST_SUITE("protocol") {
  TEST_CASE("option negotiation") {
    TempDir dir;
    MemlendDaemon daemon(dir, TwoDevices());
    {
      RawNbdClient raw(daemon.endpoint());
      raw.StartHandshake();

      // NBD_OPT_LIST names both devices, then ACKs.
      {
        raw.SendOption(NBD_OPT_LIST, "");
        std::vector<std::string> names;
        for (;;) {
          RawNbdClient::OptionReply reply = raw.ReadOptionReply();
          CHECK(reply.option == NBD_OPT_LIST);
          if (reply.type != NBD_REP_SERVER) {
            CHECK(reply.type == NBD_REP_ACK);
            break;
          }
          names.push_back(ServerReplyName(reply));
        }
        std::sort(names.begin(), names.end());
        CHECK(names == std::vector<std::string>{"d0", "d1"});
      }

      // Structured replies are refused; simple replies it is.
      raw.SendOption(NBD_OPT_STRUCTURED_REPLY, "");
      RawNbdClient::OptionReply reply = raw.ReadOptionReply();
      CHECK(reply.option == NBD_OPT_STRUCTURED_REPLY);
      CHECK(reply.type == NBD_REP_ERR_UNSUP);

      // An option number nobody defined is unsupported, and the negotiation goes on.
      raw.SendOption(0x4d4c, "xyz");
      reply = raw.ReadOptionReply();
      CHECK(reply.option == 0x4d4c);
      CHECK(reply.type == NBD_REP_ERR_UNSUP);

      // NBD_OPT_INFO describes d1 and stays in negotiation.
      RawNbdClient::ExportInfo info;
      CHECK(raw.RequestExport(NBD_OPT_INFO, "d1", &info) == NBD_REP_ACK);
      CHECK(info.size == kSmallDeviceSize);
      CHECK((info.transmission_flags & kRequiredFlags) == kRequiredFlags);
      CHECK((info.transmission_flags & NBD_FLAG_READ_ONLY) == 0);
      CHECK(info.has_block_size);
      CHECK(info.min_block == 1);
      CHECK(info.preferred_block == 4096);
      CHECK(info.max_block == 32 * kMiB);

      // NBD_OPT_GO for an export that does not exist: NBD_REP_ERR_UNKNOWN, still negotiating.
      info = {};
      CHECK(raw.RequestExport(NBD_OPT_GO, "no-such-device", &info) == NBD_REP_ERR_UNKNOWN);

      // NBD_OPT_GO for d0 enters transmission.
      info = {};
      REQUIRE(raw.RequestExport(NBD_OPT_GO, "d0", &info) == NBD_REP_ACK);
      CHECK(info.size == kDeviceSize);
      CHECK((info.transmission_flags & kRequiredFlags) == kRequiredFlags);
      std::vector<uint8_t> data(kPageSize, 0x5a);
      CHECK(raw.Write(8192, data, 7) == 0);
      CHECK(raw.Read(8192, kPageSize, 8) == data);

      // NBD_CMD_DISC ends the connection without a reply.
      raw.SendRequest(0, NBD_CMD_DISC, 9, 0, 0);
      CHECK(raw.WaitForClose());
    }  // Clients disconnect before the daemon is stopped.
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }

  TEST_CASE("NBD_OPT_ABORT is acknowledged") {
    TempDir dir;
    MemlendDaemon daemon(dir, TwoDevices());
    {
      RawNbdClient raw(daemon.endpoint());
      raw.StartHandshake();
      raw.SendOption(NBD_OPT_ABORT, "");
      RawNbdClient::OptionReply reply = raw.ReadOptionReply();
      CHECK(reply.option == NBD_OPT_ABORT);
      CHECK(reply.type == NBD_REP_ACK);
      CHECK(raw.WaitForClose());
    }  // Clients disconnect before the daemon is stopped.
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }

  TEST_CASE("NBD_OPT_EXPORT_NAME with and without zero padding") {
    TempDir dir;
    MemlendDaemon daemon(dir, TwoDevices());
    {
      {
        // With NO_ZEROES negotiated (the client asks for it when offered).
        RawNbdClient raw(daemon.endpoint());
        RawNbdClient::ExportInfo info = raw.HandshakeWithExportName("d1");
        CHECK(info.size == kSmallDeviceSize);
        CHECK((info.transmission_flags & kRequiredFlags) == kRequiredFlags);
        std::vector<uint8_t> data(100, 0x33);
        CHECK(raw.Write(kSmallDeviceSize - 100, data, 1) == 0);
        CHECK(raw.Read(kSmallDeviceSize - 100, 100, 2) == data);
      }
      {
        // Without NO_ZEROES: the size and flags are followed by 124 bytes of zeros.
        RawNbdClient raw(daemon.endpoint());
        raw.ReadGreeting();
        raw.SendClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE);
        raw.SendOption(NBD_OPT_EXPORT_NAME, "d1");
        std::vector<uint8_t> reply = raw.ReceiveBytes(8 + 2 + 124);
        CHECK(std::all_of(reply.begin() + 10, reply.end(), [](uint8_t b) { return b == 0; }));
        CHECK(raw.Read(kSmallDeviceSize - 100, 100, 3) == std::vector<uint8_t>(100, 0x33));
      }
    }  // Clients disconnect before the daemon is stopped.
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }

  TEST_CASE("bad requests get an error reply and the connection goes on") {
    TempDir dir;
    MemlendDaemon daemon(dir, TwoDevices());
    {
      RawNbdClient raw(daemon.endpoint());
      RawNbdClient::ExportInfo info = raw.HandshakeWithGo("d0");
      REQUIRE(info.size == kDeviceSize);
      KnownPages known = WriteKnownPages(raw);

      const uint64_t kMaxOffset = std::numeric_limits<uint64_t>::max();
      const std::vector<BadRequest> bad_requests = {
          {"READ crossing the end",
           0,
           NBD_CMD_READ,
           kDeviceSize - kPageSize,
           2 * kPageSize,
           false,
           {NBD_EINVAL}},
          {"READ starting at the end", 0, NBD_CMD_READ, kDeviceSize, 1, false, {NBD_EINVAL}},
          {"READ whose offset + length wraps around 2^64",
           0,
           NBD_CMD_READ,
           kMaxOffset - 4095,
           2 * kPageSize,
           false,
           {NBD_EINVAL}},
          {"TRIM crossing the end",
           0,
           NBD_CMD_TRIM,
           kDeviceSize - kPageSize,
           2 * kPageSize,
           false,
           {NBD_EINVAL}},
          {"WRITE crossing the end",
           0,
           NBD_CMD_WRITE,
           kDeviceSize - kPageSize,
           2 * kPageSize,
           true,
           {NBD_ENOSPC}},
          {"WRITE whose offset + length wraps around 2^64",
           0,
           NBD_CMD_WRITE,
           kMaxOffset - 100,
           kPageSize,
           true,
           {NBD_ENOSPC, NBD_EINVAL}},
          {"WRITE_ZEROES crossing the end",
           0,
           NBD_CMD_WRITE_ZEROES,
           kDeviceSize - kPageSize,
           2 * kPageSize,
           false,
           {NBD_ENOSPC}},
          {"READ longer than 32 MiB", 0, NBD_CMD_READ, 0, kTooLong, false, {NBD_EOVERFLOW}},
          {"unknown command type 99", 0, 99, 0, 0, false, {NBD_EINVAL}},
          {"READ with unknown flag 0x8000",
           0x8000,
           NBD_CMD_READ,
           0,
           kPageSize,
           false,
           {NBD_EINVAL}},
          {"WRITE with unknown flag 0x4000",
           0x4000,
           NBD_CMD_WRITE,
           0,
           kPageSize,
           true,
           {NBD_EINVAL}},
      };

      uint64_t cookie = 0x1000;
      for (const BadRequest& bad : bad_requests) {
        INFO("request: " << bad.what << " (type " << bad.type << ", flags 0x" << std::hex
                         << bad.flags << std::dec << ", offset " << bad.offset << ", length "
                         << bad.length << ")");
        raw.SendRequest(bad.flags, bad.type, ++cookie, bad.offset, bad.length);
        if (bad.sends_payload) {
          // Payload that differs from the known pages, so that a write which wrongly went
          // through is noticed below.
          raw.SendBytes(std::vector<uint8_t>(bad.length, 0xee));
        }
        RawNbdClient::SimpleReply reply = raw.ReadSimpleReply();
        CHECK(reply.cookie == cookie);
        CHECK(std::find(bad.allowed_errors.begin(), bad.allowed_errors.end(), reply.error) !=
              bad.allowed_errors.end());
        // The same connection still serves good requests, and nothing was modified.
        CheckKnownPages(raw, known, cookie + 0x100000);
      }

      // Exactly the maximum block size (32 MiB) is fine in both directions.
      {
        std::mt19937_64 rng(TestSeed() + 1);
        std::vector<uint8_t> big(32 * kMiB);
        FillRandom(rng, big);
        CHECK(raw.Write(16 * kMiB, big, 0x90) == 0);
        CHECK(DescribeMismatch(big, raw.Read(16 * kMiB, 32 * kMiB, 0x91), 16 * kMiB) == "");
      }

      // Good FLUSH, TRIM and WRITE_ZEROES with FUA on the same connection.
      raw.SendRequest(0, NBD_CMD_FLUSH, 0x77, 0, 0);
      RawNbdClient::SimpleReply reply = raw.ReadSimpleReply();
      CHECK(reply.error == 0);
      CHECK(reply.cookie == 0x77);
      raw.SendRequest(0, NBD_CMD_TRIM, 0x78, 8 * kPageSize, 8 * kPageSize);
      CHECK(raw.ReadSimpleReply().error == 0);
      raw.SendRequest(NBD_CMD_FLAG_FUA, NBD_CMD_WRITE_ZEROES, 0x79, 20 * kPageSize, 5000);
      CHECK(raw.ReadSimpleReply().error == 0);
      CheckKnownPages(raw, known, 0x80);
    }  // Clients disconnect before the daemon is stopped.
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }

  TEST_CASE("a WRITE longer than 32 MiB closes only its connection") {
    TempDir dir;
    MemlendDaemon daemon(dir, TwoDevices());
    {
      NbdClient bystander(daemon.endpoint(), "d0");
      KnownPages known;
      {
        RawNbdClient raw(daemon.endpoint());
        raw.HandshakeWithGo("d0");
        known = WriteKnownPages(raw);
        // Only the header: the server cannot skip 33 MiB, so it answers and hangs up.
        raw.SendRequest(0, NBD_CMD_WRITE, 0xabc, 0, kTooLong);
        RawNbdClient::SimpleReply reply = raw.ReadSimpleReply();
        CHECK(reply.error == NBD_EOVERFLOW);
        CHECK(reply.cookie == 0xabc);
        CHECK(raw.WaitForClose());
      }
      // A new connection works and sees the data; so does the one opened before.
      RawNbdClient fresh(daemon.endpoint());
      fresh.HandshakeWithGo("d0");
      CheckKnownPages(fresh, known, 1);
      CheckKnownPages(bystander, known);
    }  // Clients disconnect before the daemon is stopped.
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }

  TEST_CASE("garbled handshakes close only their own connection") {
    TempDir dir;
    MemlendDaemon daemon(dir, TwoDevices());
    {
      NbdClient bystander(daemon.endpoint(), "d0");
      std::mt19937_64 rng(TestSeed());
      KnownPages known{std::vector<uint8_t>(kPageSize), std::vector<uint8_t>(kPageSize)};
      FillRandom(rng, known.first);
      FillRandom(rng, known.last);
      bystander.Write(known.first, 0);
      bystander.Write(known.last, kDeviceSize - kPageSize);

      // Each case sends something invalid on a new connection; the daemon must close it.
      auto check_daemon_still_serves = [&] {
        CheckKnownPages(bystander, known);
        NbdClient fresh(daemon.endpoint(), "d0");
        CheckKnownPages(fresh, known);
      };

      SUBCASE("wrong option magic") {
        RawNbdClient raw(daemon.endpoint());
        raw.StartHandshake();
        std::vector<uint8_t> bytes = {1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 7, 0, 0, 0, 0};
        raw.SendBytes(bytes);
        CHECK(raw.WaitForClose());
      }
      SUBCASE("unknown client flags") {
        RawNbdClient raw(daemon.endpoint());
        raw.ReadGreeting();
        raw.SendClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE | 0x80000000u);
        CHECK(raw.WaitForClose());
      }
      SUBCASE("option length of 2 GiB") {
        RawNbdClient raw(daemon.endpoint());
        raw.StartHandshake();
        std::vector<uint8_t> bytes = {'I', 'H', 'A', 'V', 'E',  'O',  'P',  'T',
                                      0,   0,   0,   7,   0x7f, 0xff, 0xff, 0xff};
        raw.SendBytes(bytes);
        CHECK(raw.WaitForClose());
      }
      SUBCASE("random bytes instead of a handshake") {
        RawNbdClient raw(daemon.endpoint());
        std::vector<uint8_t> garbage(256);
        FillRandom(rng, garbage);
        raw.SendBytes(garbage);
        CHECK(raw.WaitForClose());
      }
      SUBCASE("bad request magic in transmission") {
        RawNbdClient raw(daemon.endpoint());
        raw.HandshakeWithGo("d0");
        std::vector<uint8_t> request(kRequestSize, 0x42);
        raw.SendBytes(request);
        CHECK(raw.WaitForClose());
      }
      SUBCASE("connections dropped mid-handshake and mid-request") {
        { RawNbdClient silent(daemon.endpoint()); }
        {
          RawNbdClient raw(daemon.endpoint());
          raw.StartHandshake();
          raw.SendBytes(std::vector<uint8_t>{'I', 'H', 'A', 'V'});
        }
        {
          RawNbdClient raw(daemon.endpoint());
          raw.HandshakeWithGo("d0");
          raw.SendRequest(0, NBD_CMD_WRITE, 1, 0, kPageSize);
          raw.SendBytes(std::vector<uint8_t>(100, 0xee));  // then hang up mid-payload
        }
        {
          RawNbdClient raw(daemon.endpoint());
          raw.HandshakeWithGo("d0");
          // A READ whose reply the client never reads.
          raw.SendRequest(0, NBD_CMD_READ, 2, 0, 1 * kMiB);
        }
      }
      check_daemon_still_serves();
    }  // Clients disconnect before the daemon is stopped.
    CHECK_MESSAGE(daemon.Stop() == 0, daemon.StderrText());
  }
}

}  // namespace memlend::integration
