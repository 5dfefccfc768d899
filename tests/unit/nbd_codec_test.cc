// Unit tests for the NBD codec: exact wire layouts (big-endian), request validation, the
// errno mapping and the handshake messages.
#include <doctest/doctest.h>

#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "nbd/codec.h"
#include "nbd/protocol.h"

namespace memlend::nbd {
namespace {

using Bytes = std::vector<std::byte>;

// Formats bytes as lowercase hex pairs separated by spaces, so a failed CHECK shows the
// whole message.
std::string Hex(std::span<const std::byte> bytes) {
  std::string text;
  for (const std::byte b : bytes) {
    char pair[4];
    std::snprintf(pair, sizeof(pair), "%02x", std::to_integer<unsigned>(b));
    if (!text.empty()) text += ' ';
    text += pair;
  }
  return text;
}

// Appends `value` as `width` big-endian bytes: the expected side of layout checks, written
// independently of the codec.
void PutBig(Bytes* out, std::uint64_t value, int width) {
  for (int i = width - 1; i >= 0; --i) out->push_back(static_cast<std::byte>(value >> (8 * i)));
}

Bytes FromInts(std::initializer_list<int> values) {
  Bytes bytes;
  for (const int v : values) bytes.push_back(static_cast<std::byte>(v));
  return bytes;
}

Bytes FromString(const std::string& text) {
  Bytes bytes;
  for (const char c : text) bytes.push_back(static_cast<std::byte>(c));
  return bytes;
}

// The data of an NBD_OPT_INFO/GO option: name length, name, info count, info types.
Bytes InfoData(const std::string& name, std::initializer_list<std::uint16_t> types) {
  Bytes data;
  PutBig(&data, name.size(), 4);
  const Bytes chars = FromString(name);
  data.insert(data.end(), chars.begin(), chars.end());
  PutBig(&data, types.size(), 2);
  for (const std::uint16_t type : types) PutBig(&data, type, 2);
  return data;
}

Request MakeRequest(std::uint16_t type, std::uint64_t offset, std::uint32_t length,
                    std::uint16_t flags = 0) {
  Request request;
  request.type = type;
  request.offset = offset;
  request.length = length;
  request.flags = flags;
  request.handle = 0x1122334455667788ull;
  return request;
}

constexpr std::uint64_t kExportSize = 1 << 20;
constexpr std::uint16_t kAllCommands[] = {NBD_CMD_READ,  NBD_CMD_WRITE, NBD_CMD_DISC,
                                          NBD_CMD_FLUSH, NBD_CMD_TRIM,  NBD_CMD_WRITE_ZEROES};
constexpr std::uint16_t kRangeCommands[] = {NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_TRIM,
                                            NBD_CMD_WRITE_ZEROES};

// The error a request reaching past the end of the export gets.
std::uint32_t PastEndError(std::uint16_t type) {
  return type == NBD_CMD_WRITE || type == NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
}

}  // namespace

TEST_CASE("EncodeRequest writes the big-endian request layout") {
  Request request;
  request.flags = 0x0102;
  request.type = NBD_CMD_WRITE_ZEROES;
  request.handle = 0xa1a2a3a4a5a6a7a8ull;
  request.offset = 0x0001020304050607ull;
  request.length = 0xdeadbeef;
  std::array<std::byte, kRequestSize> wire{};
  EncodeRequest(request, wire);
  CHECK(Hex(wire) ==
        "25 60 95 13 "              // NBD_REQUEST_MAGIC
        "01 02 "                    // flags
        "00 06 "                    // type
        "a1 a2 a3 a4 a5 a6 a7 a8 "  // handle
        "00 01 02 03 04 05 06 07 "  // offset
        "de ad be ef");             // length
  CHECK(wire.size() == 28);
}

TEST_CASE("DecodeRequest reads what EncodeRequest wrote and rejects a wrong magic") {
  for (const Request& original :
       {MakeRequest(NBD_CMD_READ, 0, 4096), MakeRequest(NBD_CMD_WRITE, 12345, 1, 1),
        MakeRequest(0xffff, std::numeric_limits<std::uint64_t>::max(), 0xffffffff, 0xffff)}) {
    std::array<std::byte, kRequestSize> wire{};
    EncodeRequest(original, wire);
    Request decoded;
    REQUIRE(DecodeRequest(wire, &decoded));
    CHECK(decoded.flags == original.flags);
    CHECK(decoded.type == original.type);
    CHECK(decoded.handle == original.handle);
    CHECK(decoded.offset == original.offset);
    CHECK(decoded.length == original.length);
  }

  // Bytes written by hand, as a client sends them.
  Bytes wire = FromInts({0x25, 0x60, 0x95, 0x13, 0x00, 0x01, 0x00, 0x04});
  PutBig(&wire, 0x0102030405060708ull, 8);
  PutBig(&wire, 0x10000, 8);
  PutBig(&wire, 0x2000, 4);
  REQUIRE(wire.size() == kRequestSize);
  Request decoded;
  REQUIRE(
      DecodeRequest(std::span<const std::byte, kRequestSize>(wire.data(), kRequestSize), &decoded));
  CHECK(decoded.flags == NBD_CMD_FLAG_FUA);
  CHECK(decoded.type == NBD_CMD_TRIM);
  CHECK(decoded.handle == 0x0102030405060708ull);
  CHECK(decoded.offset == 0x10000);
  CHECK(decoded.length == 0x2000);

  for (const std::size_t at : {0, 1, 2, 3}) {
    CAPTURE(at);
    Bytes bad = wire;
    bad[at] ^= std::byte{0x01};
    CHECK_FALSE(DecodeRequest(std::span<const std::byte, kRequestSize>(bad.data(), kRequestSize),
                              &decoded));
  }
  // The reply magic is not a request magic (byte-swapped magic neither).
  Bytes reply_magic = wire;
  reply_magic[0] = std::byte{0x67};
  reply_magic[1] = std::byte{0x44};
  reply_magic[2] = std::byte{0x66};
  reply_magic[3] = std::byte{0x98};
  CHECK_FALSE(DecodeRequest(
      std::span<const std::byte, kRequestSize>(reply_magic.data(), kRequestSize), &decoded));
  Bytes swapped = wire;
  swapped[0] = std::byte{0x13};
  swapped[1] = std::byte{0x95};
  swapped[2] = std::byte{0x60};
  swapped[3] = std::byte{0x25};
  CHECK_FALSE(DecodeRequest(std::span<const std::byte, kRequestSize>(swapped.data(), kRequestSize),
                            &decoded));
}

TEST_CASE("EncodeSimpleReply writes magic, error and handle big-endian") {
  std::array<std::byte, kSimpleReplySize> wire{};
  EncodeSimpleReply(NBD_ENOSPC, 0x0102030405060708ull, wire);
  CHECK(Hex(wire) == "67 44 66 98 00 00 00 1c 01 02 03 04 05 06 07 08");
  EncodeSimpleReply(0, 0xffeeddccbbaa9988ull, wire);
  CHECK(Hex(wire) == "67 44 66 98 00 00 00 00 ff ee dd cc bb aa 99 88");
  CHECK(wire.size() == 16);
}

TEST_CASE("CheckRequest serves every command with a valid range") {
  for (const std::uint16_t type : kAllCommands) {
    CAPTURE(type);
    const Verdict at_start = CheckRequest(MakeRequest(type, 0, 4096), kExportSize);
    CHECK(at_start.error == 0);
    CHECK_FALSE(at_start.hang_up);
    // Ending exactly at the end of the export is inside it.
    CHECK(CheckRequest(MakeRequest(type, kExportSize - 512, 512), kExportSize).error == 0);
    CHECK(CheckRequest(MakeRequest(type, kExportSize, 0), kExportSize).error == 0);
    CHECK(CheckRequest(MakeRequest(type, 0, kExportSize), kExportSize).error == 0);
  }
  // The largest payload allowed is exactly kMaxPayload.
  CHECK(CheckRequest(MakeRequest(NBD_CMD_READ, 0, kMaxPayload), 2ull * kMaxPayload).error == 0);
  CHECK(CheckRequest(MakeRequest(NBD_CMD_WRITE, 0, kMaxPayload), 2ull * kMaxPayload).error == 0);
  // TRIM and WRITE_ZEROES carry no payload, so their length is not bounded by kMaxPayload.
  CHECK(CheckRequest(MakeRequest(NBD_CMD_TRIM, 0, 0xffffffff), 1ull << 33).error == 0);
  CHECK(CheckRequest(MakeRequest(NBD_CMD_WRITE_ZEROES, 0, 0xffffffff), 1ull << 33).error == 0);
}

TEST_CASE("CheckRequest rejects ranges past the end") {
  for (const std::uint16_t type : kRangeCommands) {
    CAPTURE(type);
    const std::uint32_t expected = PastEndError(type);
    for (const Request& request :
         {MakeRequest(type, kExportSize - 511, 512), MakeRequest(type, kExportSize, 1),
          MakeRequest(type, kExportSize + 1, 0), MakeRequest(type, 0, kExportSize + 1),
          MakeRequest(type, 1ull << 40, 4096)}) {
      CAPTURE(request.offset);
      CAPTURE(request.length);
      const Verdict verdict = CheckRequest(request, kExportSize);
      CHECK(verdict.error == expected);
      CHECK_FALSE(verdict.hang_up);
    }
  }
  // The documented mapping spelled out per command.
  CHECK(CheckRequest(MakeRequest(NBD_CMD_READ, kExportSize, 1), kExportSize).error == NBD_EINVAL);
  CHECK(CheckRequest(MakeRequest(NBD_CMD_TRIM, kExportSize, 1), kExportSize).error == NBD_EINVAL);
  CHECK(CheckRequest(MakeRequest(NBD_CMD_WRITE, kExportSize, 1), kExportSize).error == NBD_ENOSPC);
  CHECK(CheckRequest(MakeRequest(NBD_CMD_WRITE_ZEROES, kExportSize, 1), kExportSize).error ==
        NBD_ENOSPC);
}

TEST_CASE("CheckRequest treats an offset + length that overflows 64 bits as past the end") {
  constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();
  for (const std::uint16_t type : kRangeCommands) {
    CAPTURE(type);
    // offset + length wraps round to a small number.
    CHECK(CheckRequest(MakeRequest(type, kMax - 10, 4096), kExportSize).error ==
          PastEndError(type));
    CHECK(CheckRequest(MakeRequest(type, kMax, 1), kExportSize).error == PastEndError(type));
    // Even an export as large as 2^64 - 1 bytes does not let it through.
    CHECK(CheckRequest(MakeRequest(type, kMax - 10, 4096), kMax).error == PastEndError(type));
    CHECK(CheckRequest(MakeRequest(type, kMax - 4096, 4096), kMax).error == 0);
  }
}

TEST_CASE("CheckRequest bounds READ and WRITE payloads by kMaxPayload") {
  const std::uint64_t big_export = 4ull * kMaxPayload;
  const Verdict read = CheckRequest(MakeRequest(NBD_CMD_READ, 0, kMaxPayload + 1), big_export);
  CHECK(read.error == NBD_EOVERFLOW);
  CHECK_FALSE(read.hang_up);  // nothing to skip: the connection stays usable

  const Verdict write = CheckRequest(MakeRequest(NBD_CMD_WRITE, 0, kMaxPayload + 1), big_export);
  CHECK(write.error == NBD_EOVERFLOW);
  CHECK(write.hang_up);  // its payload follows and cannot be skipped

  const Verdict huge = CheckRequest(MakeRequest(NBD_CMD_WRITE, 0, 0xffffffff), big_export);
  CHECK(huge.error == NBD_EOVERFLOW);
  CHECK(huge.hang_up);
  // An oversized WRITE hangs up even when it is also past the end or badly flagged: its
  // payload is on the wire either way.
  CHECK(CheckRequest(MakeRequest(NBD_CMD_WRITE, 0, 0xffffffff), 4096).hang_up);
  CHECK(CheckRequest(MakeRequest(NBD_CMD_WRITE, 0, 0xffffffff, 0x8000), big_export).hang_up);
}

TEST_CASE("CheckRequest rejects unknown commands and flags") {
  for (const std::uint16_t type : {5, 7, 8, 0x100, 0xffff}) {
    CAPTURE(type);
    const Verdict verdict = CheckRequest(MakeRequest(type, 0, 4096), kExportSize);
    CHECK(verdict.error == NBD_EINVAL);
    CHECK_FALSE(verdict.hang_up);
  }
  for (const std::uint16_t type : kAllCommands) {
    CAPTURE(type);
    for (const std::uint16_t flags : {1 << 2, 1 << 3, 1 << 15, 0xfffc}) {
      CAPTURE(flags);
      const Verdict verdict = CheckRequest(MakeRequest(type, 0, 4096, flags), kExportSize);
      CHECK(verdict.error == NBD_EINVAL);
      CHECK_FALSE(verdict.hang_up);
    }
  }
}

TEST_CASE("CheckRequest allows NO_HOLE only on WRITE_ZEROES and FUA on writing commands") {
  CHECK(CheckRequest(MakeRequest(NBD_CMD_WRITE_ZEROES, 0, 4096, NBD_CMD_FLAG_NO_HOLE), kExportSize)
            .error == 0);
  CHECK(CheckRequest(
            MakeRequest(NBD_CMD_WRITE_ZEROES, 0, 4096, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA),
            kExportSize)
            .error == 0);
  for (const std::uint16_t type : {NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_FLUSH}) {
    CAPTURE(type);
    CHECK(CheckRequest(MakeRequest(type, 0, 4096, NBD_CMD_FLAG_NO_HOLE), kExportSize).error ==
          NBD_EINVAL);
  }
  for (const std::uint16_t type : {NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES}) {
    CAPTURE(type);
    CHECK(CheckRequest(MakeRequest(type, 0, 4096, NBD_CMD_FLAG_FUA), kExportSize).error == 0);
  }
  // Flags are judged before the range: a past-the-end request with a bad flag is EINVAL
  // even for a WRITE.
  CHECK(CheckRequest(MakeRequest(NBD_CMD_WRITE, kExportSize, 1, NBD_CMD_FLAG_NO_HOLE), kExportSize)
            .error == NBD_EINVAL);
}

// Regression: FUA on READ, FLUSH and DISC was refused with EINVAL (and a DISC with FUA
// left the connection open), although the protocol says a server that advertises
// SEND_FUA must accept it on every command.
TEST_CASE("CheckRequest accepts FUA on every command, as the NBD protocol requires") {
  for (const std::uint16_t type : {NBD_CMD_READ, NBD_CMD_FLUSH, NBD_CMD_DISC}) {
    CAPTURE(type);
    CHECK(CheckRequest(MakeRequest(type, 0, 4096, NBD_CMD_FLAG_FUA), kExportSize).error == 0);
  }
}

TEST_CASE("CheckRequest does not range-check FLUSH and DISC") {
  for (const std::uint16_t type : {NBD_CMD_FLUSH, NBD_CMD_DISC}) {
    CAPTURE(type);
    CHECK(CheckRequest(MakeRequest(type, 12345, 0), kExportSize).error == 0);
    CHECK(CheckRequest(MakeRequest(type, kExportSize * 2, 4096), kExportSize).error == 0);
    CHECK(CheckRequest(MakeRequest(type, std::numeric_limits<std::uint64_t>::max(), 0xffffffff),
                       kExportSize)
              .error == 0);
  }
}

TEST_CASE("HasPayload is true only for a WRITE the server can read") {
  CHECK(HasPayload(MakeRequest(NBD_CMD_WRITE, 0, 0)));
  CHECK(HasPayload(MakeRequest(NBD_CMD_WRITE, 0, 4096)));
  CHECK(HasPayload(MakeRequest(NBD_CMD_WRITE, kExportSize * 4, kMaxPayload)));  // past end too
  CHECK_FALSE(HasPayload(MakeRequest(NBD_CMD_WRITE, 0, kMaxPayload + 1)));
  for (const std::uint16_t type :
       {NBD_CMD_READ, NBD_CMD_DISC, NBD_CMD_FLUSH, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES}) {
    CAPTURE(type);
    CHECK_FALSE(HasPayload(MakeRequest(type, 0, 4096)));
  }
}

TEST_CASE("ErrorFromErrno maps errno of either sign to NBD errors") {
  CHECK(ErrorFromErrno(0) == 0);
  CHECK(ErrorFromErrno(-ENOSPC) == NBD_ENOSPC);
  CHECK(ErrorFromErrno(ENOSPC) == NBD_ENOSPC);
  CHECK(ErrorFromErrno(-EIO) == NBD_EIO);
  CHECK(ErrorFromErrno(EIO) == NBD_EIO);
  CHECK(ErrorFromErrno(-ENOMEM) == NBD_ENOMEM);
  CHECK(ErrorFromErrno(-EINVAL) == NBD_EINVAL);
  CHECK(ErrorFromErrno(-EPERM) == NBD_EPERM);
  CHECK(ErrorFromErrno(-EOVERFLOW) == NBD_EOVERFLOW);
  CHECK(ErrorFromErrno(-ENOTSUP) == NBD_ENOTSUP);
  CHECK(ErrorFromErrno(-ESHUTDOWN) == NBD_ESHUTDOWN);
  // Anything else is an I/O error, never 0.
  for (const int unknown : {-EAGAIN, -ENOENT, EBADF, -9999, 9999}) {
    CAPTURE(unknown);
    CHECK(ErrorFromErrno(unknown) == NBD_EIO);
  }
  // The reply values are the protocol's, spelled out.
  CHECK(NBD_EPERM == 1);
  CHECK(NBD_EIO == 5);
  CHECK(NBD_ENOMEM == 12);
  CHECK(NBD_EINVAL == 22);
  CHECK(NBD_ENOSPC == 28);
  CHECK(NBD_EOVERFLOW == 75);
  CHECK(NBD_ENOTSUP == 95);
  CHECK(NBD_ESHUTDOWN == 108);
}

TEST_CASE("EncodeGreeting writes NBDMAGIC, IHAVEOPT and the fixed-newstyle flags") {
  std::array<std::byte, kGreetingSize> wire{};
  EncodeGreeting(wire);
  CHECK(Hex(wire) ==
        "4e 42 44 4d 41 47 49 43 "  // "NBDMAGIC"
        "49 48 41 56 45 4f 50 54 "  // "IHAVEOPT"
        "00 03");                   // FIXED_NEWSTYLE | NO_ZEROES
  CHECK(wire.size() == 18);
}

TEST_CASE("DecodeOptionHeader reads the option and its length") {
  Bytes wire = FromString("IHAVEOPT");
  PutBig(&wire, NBD_OPT_GO, 4);
  PutBig(&wire, 0x01020304, 4);
  REQUIRE(wire.size() == kOptionHeaderSize);
  std::uint32_t option = 0;
  std::uint32_t length = 0;
  REQUIRE(DecodeOptionHeader(
      std::span<const std::byte, kOptionHeaderSize>(wire.data(), kOptionHeaderSize), &option,
      &length));
  CHECK(option == NBD_OPT_GO);
  CHECK(length == 0x01020304);

  Bytes bad = wire;
  bad[7] = std::byte{'X'};
  CHECK_FALSE(DecodeOptionHeader(
      std::span<const std::byte, kOptionHeaderSize>(bad.data(), kOptionHeaderSize), &option,
      &length));
  Bytes greeting_magic = FromString("NBDMAGIC");
  greeting_magic.insert(greeting_magic.end(), wire.begin() + 8, wire.end());
  CHECK_FALSE(DecodeOptionHeader(
      std::span<const std::byte, kOptionHeaderSize>(greeting_magic.data(), kOptionHeaderSize),
      &option, &length));
}

TEST_CASE("AppendOptionReply writes the reply header and appends its data") {
  Bytes out = FromInts({0xee});  // appends after what is already there
  AppendOptionReply(&out, NBD_OPT_LIST, NBD_REP_ACK);
  CHECK(Hex(out) ==
        "ee "
        "00 03 e8 89 04 55 65 a9 "  // NBD_REP_MAGIC
        "00 00 00 03 "              // option
        "00 00 00 01 "              // NBD_REP_ACK
        "00 00 00 00");             // no data
  CHECK(out.size() == 1 + kOptionReplyHeaderSize);

  Bytes error;
  AppendOptionReply(&error, 0xdeadbeef, NBD_REP_ERR_UNSUP, FromInts({0x61, 0x62, 0x63}));
  CHECK(Hex(error) == "00 03 e8 89 04 55 65 a9 de ad be ef 80 00 00 01 00 00 00 03 61 62 63");
}

TEST_CASE("AppendServerReply carries the export name length and name") {
  Bytes out;
  AppendServerReply(&out, "swap0");
  CHECK(Hex(out) ==
        "00 03 e8 89 04 55 65 a9 "  // NBD_REP_MAGIC
        "00 00 00 03 "              // NBD_OPT_LIST
        "00 00 00 02 "              // NBD_REP_SERVER
        "00 00 00 09 "              // data length: 4 + 5
        "00 00 00 05 "              // name length
        "73 77 61 70 30");          // "swap0"
  Bytes empty;
  AppendServerReply(&empty, "");
  CHECK(Hex(empty) == "00 03 e8 89 04 55 65 a9 00 00 00 03 00 00 00 02 00 00 00 04 00 00 00 00");
}

TEST_CASE("AppendInfoExport and AppendInfoBlockSize write NBD_REP_INFO replies") {
  Bytes out;
  AppendInfoExport(&out, NBD_OPT_GO, 0x0000000140000000ull, 0x016d);
  CHECK(Hex(out) ==
        "00 03 e8 89 04 55 65 a9 "  // NBD_REP_MAGIC
        "00 00 00 07 "              // NBD_OPT_GO
        "00 00 00 03 "              // NBD_REP_INFO
        "00 00 00 0c "              // 12 bytes of data
        "00 00 "                    // NBD_INFO_EXPORT
        "00 00 00 01 40 00 00 00 "  // size
        "01 6d");                   // transmission flags
  CHECK(out.size() == kOptionReplyHeaderSize + 12);

  Bytes block;
  AppendInfoBlockSize(&block, NBD_OPT_INFO, 1, kPreferredBlock, kMaxPayload);
  CHECK(Hex(block) ==
        "00 03 e8 89 04 55 65 a9 "  // NBD_REP_MAGIC
        "00 00 00 06 "              // NBD_OPT_INFO
        "00 00 00 03 "              // NBD_REP_INFO
        "00 00 00 0e "              // 14 bytes of data
        "00 03 "                    // NBD_INFO_BLOCK_SIZE
        "00 00 00 01 "              // minimum
        "00 00 10 00 "              // preferred
        "02 00 00 00");             // maximum: 32 MiB
}

TEST_CASE("AppendExportNameReply writes size and flags, plus 124 zeros unless NO_ZEROES") {
  Bytes short_reply;
  AppendExportNameReply(&short_reply, 0x0102030405060708ull, 0x0a0b, /*no_zeroes=*/true);
  CHECK(short_reply.size() == 8 + 2);
  CHECK(Hex(short_reply) == "01 02 03 04 05 06 07 08 0a 0b");

  Bytes long_reply = FromInts({0xff});
  AppendExportNameReply(&long_reply, 0x0102030405060708ull, 0x0a0b, /*no_zeroes=*/false);
  REQUIRE(long_reply.size() == 1 + 8 + 2 + 124);
  CHECK(Hex(std::span(long_reply).first(11)) == "ff 01 02 03 04 05 06 07 08 0a 0b");
  for (std::size_t i = 11; i < long_reply.size(); ++i) {
    CAPTURE(i);
    CHECK(long_reply[i] == std::byte{0});
  }
}

TEST_CASE("ParseInfoRequest reads the name and the requested info types") {
  const std::optional<InfoRequest> none = ParseInfoRequest(InfoData("swap0", {}));
  REQUIRE(none.has_value());
  CHECK(none->name == "swap0");
  CHECK(none->info_types.empty());

  const std::optional<InfoRequest> two =
      ParseInfoRequest(InfoData("disk-1", {NBD_INFO_BLOCK_SIZE, 0x1234}));
  REQUIRE(two.has_value());
  CHECK(two->name == "disk-1");
  REQUIRE(two->info_types.size() == 2);
  CHECK(two->info_types[0] == NBD_INFO_BLOCK_SIZE);
  CHECK(two->info_types[1] == 0x1234);

  // The default export: an empty name.
  const std::optional<InfoRequest> unnamed = ParseInfoRequest(InfoData("", {NBD_INFO_EXPORT}));
  REQUIRE(unnamed.has_value());
  CHECK(unnamed->name.empty());
  CHECK(unnamed->info_types == std::vector<std::uint16_t>{NBD_INFO_EXPORT});

  // The longest name allowed.
  const std::string longest(kMaxNameLength, 'n');
  const std::optional<InfoRequest> at_limit = ParseInfoRequest(InfoData(longest, {}));
  REQUIRE(at_limit.has_value());
  CHECK(at_limit->name == longest);
}

TEST_CASE("ParseInfoRequest rejects data whose lengths do not add up") {
  const Bytes good = InfoData("swap0", {NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE});
  REQUIRE(ParseInfoRequest(good).has_value());

  SUBCASE("short data") {
    CHECK_FALSE(ParseInfoRequest({}).has_value());
    CHECK_FALSE(ParseInfoRequest(FromInts({0, 0, 0})).has_value());
    CHECK_FALSE(ParseInfoRequest(FromInts({0, 0, 0, 0})).has_value());     // no count
    CHECK_FALSE(ParseInfoRequest(FromInts({0, 0, 0, 0, 0})).has_value());  // half a count
    // Every proper prefix of a good request is rejected.
    for (std::size_t length = 0; length < good.size(); ++length) {
      CAPTURE(length);
      CHECK_FALSE(ParseInfoRequest(std::span(good).first(length)).has_value());
    }
  }
  SUBCASE("name length beyond the data") {
    Bytes bad = good;
    bad[3] = std::byte{6};  // claims 6 name bytes; the count then lands inside the types
    CHECK_FALSE(ParseInfoRequest(bad).has_value());
    bad[3] = std::byte{0xff};
    CHECK_FALSE(ParseInfoRequest(bad).has_value());
    bad[0] = std::byte{0xff};  // about 4 GiB, far past the data
    CHECK_FALSE(ParseInfoRequest(bad).has_value());
  }
  SUBCASE("info count beyond the data") {
    Bytes bad = good;
    bad[4 + 5 + 1] = std::byte{3};
    CHECK_FALSE(ParseInfoRequest(bad).has_value());
  }
  SUBCASE("trailing garbage") {
    Bytes bad = good;
    bad.push_back(std::byte{0});
    CHECK_FALSE(ParseInfoRequest(bad).has_value());
    bad.push_back(std::byte{0});  // a whole extra type that the count does not include
    CHECK_FALSE(ParseInfoRequest(bad).has_value());
  }
  SUBCASE("name longer than kMaxNameLength") {
    const std::string too_long(kMaxNameLength + 1, 'n');
    CHECK_FALSE(ParseInfoRequest(InfoData(too_long, {})).has_value());
  }
}

}  // namespace memlend::nbd
