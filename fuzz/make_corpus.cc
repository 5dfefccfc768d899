// Writes the fuzz targets' seed corpus: `make_corpus DIR` writes DIR/<target>/<seed> for
// each target (DIR is fuzz/corpus in the repository). Seeds are built with the project's
// own encoders where there is one (nbd/codec.h, peer/codec.h), so they speak the protocols
// as the daemon does; each reaches one message type, option or command past the header
// checks, valid and not. Files are rewritten, never removed: inputs kept from fuzzing runs
// (regressions) stay.
#include <endian.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include "nbd/codec.h"
#include "nbd/protocol.h"
#include "peer/codec.h"
#include "peer/wire.h"

namespace memlend::fuzz {
namespace {

using Bytes = std::vector<std::byte>;

class CorpusWriter {
 public:
  explicit CorpusWriter(std::filesystem::path root) : root_(std::move(root)) {}

  void Write(const std::string& target, const std::string& name, const Bytes& bytes) {
    const std::filesystem::path dir = root_ / target;
    std::filesystem::create_directories(dir);
    std::ofstream out(dir / name, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
    if (!out) {
      std::fprintf(stderr, "make_corpus: cannot write %s\n", (dir / name).c_str());
      failed_ = true;
    }
    ++written_;
  }
  void Write(const std::string& target, const std::string& name, std::string_view text) {
    const auto* bytes = reinterpret_cast<const std::byte*>(text.data());
    Write(target, name, Bytes(bytes, bytes + text.size()));
  }

  bool failed() const { return failed_; }
  int written() const { return written_; }

 private:
  const std::filesystem::path root_;
  bool failed_ = false;
  int written_ = 0;
};

void Append(Bytes* out, const Bytes& more) { out->insert(out->end(), more.begin(), more.end()); }
void Append(Bytes* out, std::string_view text) {
  const auto* bytes = reinterpret_cast<const std::byte*>(text.data());
  out->insert(out->end(), bytes, bytes + text.size());
}
void AppendFill(Bytes* out, std::size_t count, std::uint8_t value) {
  out->insert(out->end(), count, std::byte{value});
}
template <typename T>
void AppendBig(Bytes* out, T value) {
  if constexpr (sizeof(T) == 2) value = htobe16(value);
  if constexpr (sizeof(T) == 4) value = htobe32(value);
  if constexpr (sizeof(T) == 8) value = htobe64(value);
  const auto* bytes = reinterpret_cast<const std::byte*>(&value);
  out->insert(out->end(), bytes, bytes + sizeof(T));
}

// ---- NBD handshake: what a client sends after the greeting ----

namespace nbd_seeds {

using namespace memlend::nbd;

constexpr std::uint32_t kFlags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

Bytes ClientFlags(std::uint32_t flags = kFlags) {
  Bytes out;
  AppendBig(&out, flags);
  return out;
}

Bytes Option(std::uint32_t option, const Bytes& data, std::uint64_t magic = IHAVEOPT) {
  Bytes out;
  AppendBig(&out, magic);
  AppendBig(&out, option);
  AppendBig(&out, static_cast<std::uint32_t>(data.size()));
  Append(&out, data);
  return out;
}

Bytes Text(std::string_view text) {
  Bytes out;
  Append(&out, text);
  return out;
}

// The data of NBD_OPT_INFO and NBD_OPT_GO: name, then the information requests.
Bytes InfoData(std::string_view name, std::initializer_list<std::uint16_t> requests) {
  Bytes out;
  AppendBig(&out, static_cast<std::uint32_t>(name.size()));
  Append(&out, name);
  AppendBig(&out, static_cast<std::uint16_t>(requests.size()));
  for (const std::uint16_t request : requests) AppendBig(&out, request);
  return out;
}

Bytes Session(std::initializer_list<Bytes> options, std::uint32_t flags = kFlags) {
  Bytes out = ClientFlags(flags);
  for (const Bytes& option : options) Append(&out, option);
  return out;
}

void Write(CorpusWriter& corpus) {
  const std::string t = "nbd_handshake";
  corpus.Write(t, "export_name", Session({Option(NBD_OPT_EXPORT_NAME, Text("disk0"))}));
  corpus.Write(t, "export_name_zeroes",
               Session({Option(NBD_OPT_EXPORT_NAME, Text("swap0"))}, NBD_FLAG_C_FIXED_NEWSTYLE));
  corpus.Write(t, "export_name_empty", Session({Option(NBD_OPT_EXPORT_NAME, {})}));
  corpus.Write(t, "export_name_unknown", Session({Option(NBD_OPT_EXPORT_NAME, Text("nosuch"))}));
  {
    Bytes name;
    AppendFill(&name, kMaxNameLength + 1, 'a');
    corpus.Write(t, "export_name_too_long", Session({Option(NBD_OPT_EXPORT_NAME, name)}));
  }
  corpus.Write(t, "abort", Session({Option(NBD_OPT_ABORT, {})}));
  corpus.Write(t, "list", Session({Option(NBD_OPT_LIST, {}), Option(NBD_OPT_ABORT, {})}));
  corpus.Write(t, "list_with_data",
               Session({Option(NBD_OPT_LIST, Text("x")), Option(NBD_OPT_ABORT, {})}));
  corpus.Write(
      t, "info_then_go",
      Session({Option(NBD_OPT_INFO, InfoData("disk0", {NBD_INFO_EXPORT, NBD_INFO_NAME,
                                                       NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE})),
               Option(NBD_OPT_GO, InfoData("swap0", {NBD_INFO_BLOCK_SIZE}))}));
  corpus.Write(t, "go", Session({Option(NBD_OPT_GO, InfoData("disk0", {}))}));
  corpus.Write(t, "go_empty_name", Session({Option(NBD_OPT_GO, InfoData("", {}))}));
  corpus.Write(t, "go_unknown_export",
               Session({Option(NBD_OPT_GO, InfoData("nosuch", {NBD_INFO_EXPORT})),
                        Option(NBD_OPT_INFO, InfoData("other", {})),
                        Option(NBD_OPT_GO, InfoData("scratch", {}))}));
  {
    const Bytes short_data(2);
    Bytes name_overruns;
    AppendBig(&name_overruns, std::uint32_t{100});
    Append(&name_overruns, "disk0");
    Bytes name_too_long;
    AppendBig(&name_too_long, std::uint32_t{kMaxNameLength + 1});
    Bytes count_mismatch = InfoData("disk0", {NBD_INFO_EXPORT});
    count_mismatch.pop_back();
    Bytes trailing = InfoData("disk0", {});
    AppendFill(&trailing, 3, 0);
    corpus.Write(
        t, "go_malformed",
        Session({Option(NBD_OPT_GO, short_data), Option(NBD_OPT_GO, name_overruns),
                 Option(NBD_OPT_INFO, name_too_long), Option(NBD_OPT_GO, count_mismatch),
                 Option(NBD_OPT_INFO, trailing), Option(NBD_OPT_GO, InfoData("disk0", {}))}));
  }
  corpus.Write(t, "unsupported_options",
               Session({Option(NBD_OPT_STARTTLS, {}), Option(NBD_OPT_STRUCTURED_REPLY, {}),
                        Option(9, Text("meta")), Option(10, {}), Option(0xdeadbeef, Text("?")),
                        Option(NBD_OPT_EXPORT_NAME, Text("scratch"))}));
  corpus.Write(t, "bad_option_magic", Session({Option(NBD_OPT_GO, {}, NBDMAGIC)}));
  {
    Bytes too_long;
    AppendBig(&too_long, IHAVEOPT);
    AppendBig(&too_long, NBD_OPT_GO);
    AppendBig(&too_long, kMaxOptionLength + 1);
    corpus.Write(t, "option_too_long", Session({too_long}));
  }
  corpus.Write(t, "unknown_client_flags", Session({Option(NBD_OPT_ABORT, {})}, 0x4));
  corpus.Write(t, "flags_only", ClientFlags());
  {
    Bytes partial = Option(NBD_OPT_GO, InfoData("disk0", {}));
    partial.resize(partial.size() - 3);
    corpus.Write(t, "truncated_option", Session({partial}));
  }
  corpus.Write(t, "haggle",
               Session({Option(NBD_OPT_LIST, {}), Option(NBD_OPT_STRUCTURED_REPLY, {}),
                        Option(NBD_OPT_INFO, InfoData("", {NBD_INFO_EXPORT})),
                        Option(NBD_OPT_INFO, InfoData("swap0", {NBD_INFO_NAME})),
                        Option(NBD_OPT_GO, InfoData("disk0", {NBD_INFO_BLOCK_SIZE}))},
                       NBD_FLAG_C_FIXED_NEWSTYLE));
}

}  // namespace nbd_seeds

// ---- NBD transmission: what a client sends once an export is chosen ----

namespace transmission_seeds {

using namespace memlend::nbd;

// The target's device: 64 pages; its store holds 16.
constexpr std::uint64_t kDeviceBytes = 64 * 4096;

std::uint64_t next_handle = 1;

Bytes Request(std::uint16_t type, std::uint64_t offset, std::uint32_t length,
              std::uint16_t flags = 0) {
  nbd::Request request;
  request.type = type;
  request.flags = flags;
  request.handle = next_handle++;
  request.offset = offset;
  request.length = length;
  Bytes out(kRequestSize);
  EncodeRequest(request, std::span<std::byte, kRequestSize>(out.data(), kRequestSize));
  return out;
}

Bytes Write(std::uint64_t offset, std::uint32_t length, std::uint8_t fill,
            std::uint16_t flags = 0) {
  Bytes out = Request(NBD_CMD_WRITE, offset, length, flags);
  AppendFill(&out, length, fill);
  return out;
}

Bytes Stream(std::initializer_list<Bytes> requests) {
  Bytes out;
  for (const Bytes& request : requests) Append(&out, request);
  return out;
}

Bytes Disc() { return Request(NBD_CMD_DISC, 0, 0); }

void Write(CorpusWriter& corpus) {
  const std::string t = "nbd_transmission";
  corpus.Write(t, "read", Stream({Request(NBD_CMD_READ, 0, 4096), Disc()}));
  corpus.Write(
      t, "read_run",
      Stream({Request(NBD_CMD_READ, 0, 4096), Request(NBD_CMD_READ, 8192, 100),
              Request(NBD_CMD_READ, 5000, 9000, NBD_CMD_FLAG_FUA),
              Request(NBD_CMD_READ, kDeviceBytes - 1, 1), Request(NBD_CMD_READ, kDeviceBytes, 0),
              Request(NBD_CMD_FLUSH, 0, 0), Request(NBD_CMD_READ, 0, 0)}));
  corpus.Write(t, "read_invalid",
               Stream({Request(NBD_CMD_READ, kDeviceBytes - 4096, 8192),
                       Request(NBD_CMD_READ, kDeviceBytes + 4096, 1),
                       Request(NBD_CMD_READ, ~std::uint64_t{0} - 10, 4096),
                       Request(NBD_CMD_READ, 0, kMaxPayload + 1),
                       Request(NBD_CMD_READ, 0, 4096, NBD_CMD_FLAG_NO_HOLE),
                       Request(NBD_CMD_READ, 0, 4096, 0x8000), Disc()}));
  corpus.Write(t, "write_read_back",
               Stream({Write(0, 4096, 0x11), Write(4090, 12, 0x22),
                       Write(12288, 100, 0x33, NBD_CMD_FLAG_FUA), Write(16384, 4096, 0),
                       Request(NBD_CMD_READ, 0, 16384), Request(NBD_CMD_READ, 4000, 200), Disc()}));
  corpus.Write(t, "write_past_end",
               Stream({Write(kDeviceBytes - 8, 16, 0x44), Write(kDeviceBytes, 1, 0x45),
                       Write(0, 8, 0x46, 0x4), Request(NBD_CMD_READ, 0, 8), Disc()}));
  corpus.Write(t, "write_too_long",
               Stream({Request(NBD_CMD_WRITE, 0, kMaxPayload + 1), Request(NBD_CMD_FLUSH, 0, 0)}));
  {
    Bytes truncated = Write(0, 4096, 0x55);
    truncated.resize(kRequestSize + 1000);
    corpus.Write(t, "write_truncated", truncated);
  }
  {
    // Longer than the connection's 1 MiB input buffer: served in pieces as it arrives.
    Bytes large = Request(NBD_CMD_WRITE, 0, (1 << 20) + 4096);
    AppendFill(&large, 64, 0x66);
    corpus.Write(t, "write_large_truncated", large);
  }
  {
    // One byte in each of 17 pages: the 16-page store is full, the 17th write fails.
    Bytes fill;
    for (std::uint64_t page = 0; page < 17; ++page) Append(&fill, Write(page * 4096 + 7, 1, 0x77));
    Append(&fill, Request(NBD_CMD_TRIM, 0, 4096));
    Append(&fill, Write(16 * 4096, 1, 0x78));
    Append(&fill, Request(NBD_CMD_READ, 0, 17 * 4096));
    corpus.Write(t, "store_full", fill);
  }
  corpus.Write(t, "flush",
               Stream({Request(NBD_CMD_FLUSH, 0, 0), Request(NBD_CMD_FLUSH, 7, 9),
                       Request(NBD_CMD_FLUSH, 0, 0, NBD_CMD_FLAG_FUA),
                       Request(NBD_CMD_FLUSH, 0, 0, NBD_CMD_FLAG_NO_HOLE)}));
  corpus.Write(
      t, "trim",
      Stream({Write(0, 12288, 0x88), Request(NBD_CMD_TRIM, 0, 4096),
              Request(NBD_CMD_TRIM, 4100, 100), Request(NBD_CMD_TRIM, 8192, 4096, NBD_CMD_FLAG_FUA),
              Request(NBD_CMD_TRIM, kDeviceBytes - 4096, 8192),
              Request(NBD_CMD_TRIM, 0, 4096, NBD_CMD_FLAG_NO_HOLE), Request(NBD_CMD_READ, 0, 12288),
              Disc()}));
  corpus.Write(
      t, "write_zeroes",
      Stream({Write(0, 8192, 0x99), Request(NBD_CMD_WRITE_ZEROES, 0, 4096),
              Request(NBD_CMD_WRITE_ZEROES, 4096, 10, NBD_CMD_FLAG_NO_HOLE),
              Request(NBD_CMD_WRITE_ZEROES, 20000, 50000, NBD_CMD_FLAG_FUA),
              Request(NBD_CMD_WRITE_ZEROES, kDeviceBytes, 1),
              Request(NBD_CMD_WRITE_ZEROES, 0, 1, 0x4), Request(NBD_CMD_READ, 0, 8192), Disc()}));
  corpus.Write(t, "disc_then_more",
               Stream({Write(0, 10, 0xaa), Disc(), Request(NBD_CMD_READ, 0, 10)}));
  corpus.Write(t, "unknown_command",
               Stream({Request(5, 0, 0), Request(7, 0, 4096), Request(0xffff, 0, 0),
                       Request(NBD_CMD_READ, 0, 1), Disc()}));
  {
    Bytes bad_magic = Request(NBD_CMD_READ, 0, 4096);
    bad_magic[0] = std::byte{0x67};
    corpus.Write(t, "bad_magic", Stream({Request(NBD_CMD_READ, 0, 1), bad_magic, Disc()}));
  }
  {
    Bytes partial = Request(NBD_CMD_READ, 0, 4096);
    partial.resize(kRequestSize - 5);
    corpus.Write(t, "truncated_request", partial);
  }
}

}  // namespace transmission_seeds

// ---- Peer protocol, lender side: what a borrower sends ----

namespace peer_seeds {

using namespace memlend::peer;

Bytes Message(MessageType type, const Bytes& payload, std::uint64_t tag, std::uint32_t flags = 0,
              bool reply = false, Status status = Status::kOk) {
  Bytes out(sizeof(Header));
  EncodeHeader(type, reply, flags, status, tag, static_cast<std::uint32_t>(payload.size()),
               std::span<std::byte, sizeof(Header)>(out.data(), sizeof(Header)));
  Append(&out, payload);
  return out;
}

template <typename T>
Bytes Body(const T& body) {
  Bytes out(sizeof(T));
  EncodeBody(body, out.data());
  return out;
}

template <typename T>
Bytes BodyAnd(const T& body, std::size_t data_bytes, std::uint8_t fill) {
  Bytes out = Body(body);
  AppendFill(&out, data_bytes, fill);
  return out;
}

Bytes Stream(std::initializer_list<Bytes> messages) {
  Bytes out;
  for (const Bytes& message : messages) Append(&out, message);
  return out;
}

// -- Borrower's requests --

std::uint64_t next_tag = 1;

Bytes Hello() {
  return Message(MessageType::kHello,
                 Body(HelloBody{0xb0, 0, kSuperpageBytes, kCapPassive | kCapActive}), 0);
}
Bytes Request(MessageType type, const Bytes& payload = {}, std::uint32_t flags = 0) {
  return Message(type, payload, next_tag++, flags);
}
Bytes Sid(std::uint32_t sid) { return Body(SuperpageBody{sid}); }
Bytes Range(std::uint32_t sid, std::uint32_t offset, std::uint32_t length) {
  return Body(RangeBody{sid, offset, length, 0});
}
Bytes WriteRange(std::uint32_t sid, std::uint32_t offset, std::uint32_t length, std::uint8_t fill) {
  return BodyAnd(RangeBody{sid, offset, length, 0}, length, fill);
}
Bytes Handle(std::uint32_t pool, std::uint64_t object, std::uint32_t index = 0) {
  return Body(HandleBody{pool, index, object});
}
Bytes Page(std::uint32_t pool, std::uint64_t object, std::uint8_t fill) {
  return BodyAnd(HandleBody{pool, 0, object}, kPageBytes, fill);
}

void WriteLender(CorpusWriter& corpus) {
  const std::string t = "peer_lender";
  corpus.Write(t, "hello", Hello());
  corpus.Write(t, "hello_query", Stream({Hello(), Request(MessageType::kQuery)}));
  corpus.Write(t, "hello_twice", Stream({Hello(), Hello(), Request(MessageType::kQuery)}));
  corpus.Write(
      t, "alloc_free",
      Stream({Hello(), Request(MessageType::kAllocSuperpage),
              Request(MessageType::kFreeSuperpage, Sid(1)),
              Request(MessageType::kFreeSuperpage, Sid(1)),
              Request(MessageType::kFreeSuperpage, Sid(99)), Request(MessageType::kQuery)}));
  corpus.Write(
      t, "write_read",
      Stream({Hello(), Request(MessageType::kAllocSuperpage),
              Request(MessageType::kWrite, WriteRange(1, 0, 4096, 0x11)),
              Request(MessageType::kWrite, WriteRange(1, kSuperpageBytes - 8192, 8192, 0x12)),
              Request(MessageType::kRead, Range(1, 0, 4096)),
              Request(MessageType::kRead, Range(1, 4096, 8192)),
              Request(MessageType::kRead, Range(1, kSuperpageBytes - 4096, 4096)),
              Request(MessageType::kQuery)}));
  {
    Bytes short_write = WriteRange(1, 0, 4096, 0x13);
    short_write.resize(sizeof(RangeBody) + 100);
    corpus.Write(t, "write_read_invalid",
                 Stream({Hello(), Request(MessageType::kAllocSuperpage),
                         Request(MessageType::kWrite, short_write),
                         Request(MessageType::kWrite, WriteRange(1, 100, 4096, 0x14)),
                         Request(MessageType::kWrite, WriteRange(2, 0, 4096, 0x15)),
                         Request(MessageType::kWrite, WriteRange(1, 0, 0, 0)),
                         Request(MessageType::kWrite, Bytes(8)),
                         Request(MessageType::kRead, Range(1, 0, 4095)),
                         Request(MessageType::kRead, Range(1, kSuperpageBytes, 4096)),
                         Request(MessageType::kRead, Range(1, 0, kSuperpageBytes + 4096)),
                         Request(MessageType::kRead, Range(1, 0xfffff000, 0x2000)),
                         Request(MessageType::kRead, Range(7, 0, 4096)),
                         Request(MessageType::kRead, BodyAnd(RangeBody{1, 0, 4096, 0}, 4, 0)),
                         Request(MessageType::kRead, Bytes(4))}));
  }
  corpus.Write(
      t, "put_get",
      Stream({Hello(), Request(MessageType::kPut, Page(1, 10, 0x21), kPutEphemeral),
              Request(MessageType::kGet, Handle(1, 10)),
              Request(MessageType::kPut, Page(1, 10, 0x22), kPutEphemeral),
              Request(MessageType::kPut, Page(2, 20, 0x23)),
              Request(MessageType::kGet, Handle(2, 20)), Request(MessageType::kGet, Handle(2, 21)),
              Request(MessageType::kPut, Page(1, 11, 0x24)),
              Request(MessageType::kPut, Page(2, 10, 0x25), kPutEphemeral),
              Request(MessageType::kFlush, Handle(2, 20)),
              Request(MessageType::kFlush, Handle(3, 1)), Request(MessageType::kGet, Handle(2, 20)),
              Request(MessageType::kDestroyPool, Handle(1, 0)),
              Request(MessageType::kDestroyPool, Handle(9, 0)),
              Request(MessageType::kGet, Handle(1, 10)), Request(MessageType::kQuery)}));
  corpus.Write(
      t, "put_get_invalid",
      Stream({Hello(), Request(MessageType::kPut, Handle(1, 1)),
              Request(MessageType::kPut, BodyAnd(HandleBody{1, 0, 1}, kPageBytes + 1, 0)),
              Request(MessageType::kGet, Bytes(8)), Request(MessageType::kGet, Bytes(24)),
              Request(MessageType::kFlush, Bytes(15)), Request(MessageType::kDestroyPool, Bytes(3)),
              Request(MessageType::kGet, Handle(1, 1), kPutEphemeral),
              Request(MessageType::kPut, Page(1, 1, 0x26), 0x2)}));
  // The pool has three superpages: an ephemeral page holds one, two are granted, and the
  // third grant reclaims the ephemeral superpage (an EVICTED notice); then nothing is left.
  corpus.Write(t, "alloc_until_full",
               Stream({Hello(), Request(MessageType::kPut, Page(1, 1, 0x31), kPutEphemeral),
                       Request(MessageType::kPut, Page(1, 2, 0x32), kPutEphemeral),
                       Request(MessageType::kAllocSuperpage), Request(MessageType::kAllocSuperpage),
                       Request(MessageType::kAllocSuperpage), Request(MessageType::kAllocSuperpage),
                       Request(MessageType::kPut, Page(1, 3, 0x33), kPutEphemeral),
                       Request(MessageType::kPut, Page(2, 1, 0x34)),
                       Request(MessageType::kGet, Handle(1, 1)), Request(MessageType::kQuery)}));
  corpus.Write(t, "persistent_reclaims",
               Stream({Hello(), Request(MessageType::kPut, Page(1, 1, 0x41), kPutEphemeral),
                       Request(MessageType::kAllocSuperpage), Request(MessageType::kAllocSuperpage),
                       Request(MessageType::kPut, Page(2, 1, 0x42)),
                       Request(MessageType::kPut, Page(1, 2, 0x43), kPutEphemeral),
                       Request(MessageType::kFreeSuperpage, Sid(1)),
                       Request(MessageType::kPut, Page(1, 3, 0x44), kPutEphemeral),
                       Request(MessageType::kQuery)}));
  corpus.Write(
      t, "before_hello",
      Stream({Request(MessageType::kQuery), Request(MessageType::kAllocSuperpage), Hello()}));
  corpus.Write(t, "large_before_hello", Request(MessageType::kWrite, WriteRange(1, 0, 8192, 0)));
  corpus.Write(t, "hello_malformed",
               Stream({Message(MessageType::kHello, Bytes(8), 0),
                       Message(MessageType::kHello, Bytes(30), 0), Hello()}));
  corpus.Write(
      t, "unknown_type",
      Stream({Hello(), Message(static_cast<MessageType>(0x77), Bytes(4), 5),
              Message(MessageType::kEvicted, Handle(1, 1), 6),
              Message(MessageType::kReclaim, Bytes(8), 7),
              Message(MessageType::kShutdown, Bytes(8), 8), Request(MessageType::kQuery)}));
  corpus.Write(
      t, "unknown_flags",
      Stream({Hello(), Request(MessageType::kQuery, {}, 1),
              Request(MessageType::kAllocSuperpage, {}, 0x80000000),
              Request(MessageType::kQuery, Bytes(4)),
              Request(MessageType::kAllocSuperpage, Bytes(1)),
              Request(MessageType::kFreeSuperpage, Bytes(2)), Request(MessageType::kQuery)}));
  {
    Bytes other_version = Request(MessageType::kQuery);
    other_version[4] = std::byte{2};
    corpus.Write(t, "wrong_version", Stream({Hello(), other_version}));
    Bytes version_first = Hello();
    version_first[4] = std::byte{0};
    corpus.Write(t, "wrong_version_hello", version_first);
  }
  corpus.Write(t, "reply_bit", Stream({Hello(), Message(MessageType::kQuery, {}, 3, 0, true)}));
  {
    Bytes bad_magic = Request(MessageType::kQuery);
    bad_magic[0] = std::byte{'X'};
    corpus.Write(t, "bad_magic", Stream({Hello(), bad_magic}));
    Bytes too_long = Request(MessageType::kWrite);
    const std::uint32_t length = kMaxPayload + 1;
    std::memcpy(too_long.data() + 24, &length, sizeof(length));
    corpus.Write(t, "payload_too_long", Stream({Hello(), too_long}));
  }
  {
    Bytes truncated =
        Stream({Hello(), Request(MessageType::kPut, Page(1, 1, 0x51), kPutEphemeral)});
    truncated.resize(truncated.size() - 100);
    corpus.Write(t, "truncated", truncated);
  }
}

// -- Lender's replies and notices, for PeerClient --

Bytes Reply(MessageType type, std::uint64_t tag, const Bytes& payload = {},
            Status status = Status::kOk) {
  return Message(type, payload, tag, 0, true, status);
}
Bytes HelloReply(std::uint32_t superpage_bytes = kSuperpageBytes) {
  return Reply(
      MessageType::kHello, 0,
      Body(HelloBody{0x1e, 3 * kSuperpageBytes, superpage_bytes, kCapPassive | kCapActive}));
}
Bytes Failed(MessageType type, std::uint64_t tag, Status status, std::string_view text) {
  Bytes payload;
  Append(&payload, text);
  return Reply(type, tag, payload, status);
}
Bytes Evicted(std::uint32_t pool, std::uint64_t object) {
  return Message(MessageType::kEvicted, Handle(pool, object), 0);
}
Bytes Reclaim(std::initializer_list<std::uint32_t> sids) {
  Bytes payload = Body(ReclaimBody{100, static_cast<std::uint32_t>(sids.size())});
  for (const std::uint32_t sid : sids) Append(&payload, Body(SuperpageBody{sid}));
  return Message(MessageType::kReclaim, payload, 0);
}
Bytes Shutdown() { return Message(MessageType::kShutdown, Body(ShutdownBody{0, 0}), 0); }
Bytes Data(std::size_t bytes, std::uint8_t fill) {
  Bytes out;
  AppendFill(&out, bytes, fill);
  return out;
}

// Replies to every call peer_client_fuzz.cc makes, in order: tags 1 to 12.
Bytes AllReplies() {
  return Stream({Reply(MessageType::kQuery, 1, Body(QueryReply{1536, 1024, 0, 1, 512})),
                 Reply(MessageType::kAllocSuperpage, 2, Sid(1)), Reply(MessageType::kWrite, 3),
                 Reply(MessageType::kRead, 4, Data(16, 0x61)), Reply(MessageType::kPut, 5),
                 Reply(MessageType::kGet, 6, Data(16, 0x62)), Reply(MessageType::kFlush, 0),
                 Reply(MessageType::kFreeSuperpage, 0),
                 Reply(MessageType::kRead, 7, Data(16, 0x63)),
                 Failed(MessageType::kRead, 8, Status::kInvalid, "not whole pages"),
                 Reply(MessageType::kWrite, 9), Reply(MessageType::kRead, 10, Data(16, 0x64)),
                 Reply(MessageType::kPut, 11), Reply(MessageType::kGet, 12, Data(16, 0x65))});
}

void WriteClient(CorpusWriter& corpus) {
  const std::string t = "peer_client";
  corpus.Write(t, "hello", HelloReply());
  corpus.Write(t, "session", Stream({HelloReply(), AllReplies()}));
  corpus.Write(t, "notices",
               Stream({HelloReply(), Evicted(1, 42), Reclaim({1, 2}),
                       Reply(MessageType::kQuery, 1, Body(QueryReply{1536, 1024, 0, 1, 512})),
                       Evicted(1, 43), Reply(MessageType::kAllocSuperpage, 2, Sid(3)), Shutdown(),
                       AllReplies()}));
  corpus.Write(
      t, "out_of_order",
      Stream({HelloReply(), Reply(MessageType::kQuery, 1, Body(QueryReply{})),
              Failed(MessageType::kAllocSuperpage, 2, Status::kNoSpace, "no free superpage"),
              Failed(MessageType::kWrite, 3, Status::kNotPermitted, "not yours"),
              Failed(MessageType::kRead, 4, Status::kInvalid, "bad range"),
              Failed(MessageType::kPut, 5, Status::kNoSpace, "no room"),
              Reply(MessageType::kGet, 6, {}, Status::kNotFound),
              Reply(MessageType::kRead, 8, Data(16, 0x71)),
              Reply(MessageType::kRead, 7, Data(16, 0x72)),
              Reply(MessageType::kGet, 12, {}, Status::kNotFound),
              Failed(MessageType::kPut, 11, Status::kShuttingDown, "leaving"),
              Reply(MessageType::kRead, 10, Data(16, 0x73)), Reply(MessageType::kWrite, 9)}));
  corpus.Write(
      t, "wrong_sizes",
      Stream({HelloReply(), Reply(MessageType::kQuery, 1, Data(8, 0)),
              Reply(MessageType::kAllocSuperpage, 2, Data(40, 0)),
              Reply(MessageType::kWrite, 3, Data(4, 0)),
              Reply(MessageType::kRead, 999, Data(300, 0)), Reply(MessageType::kRead, 4, {}),
              Reply(MessageType::kPut, 5), Reply(static_cast<MessageType>(0x55), 6, Data(16, 0))}));
  corpus.Write(t, "hello_refused",
               Failed(MessageType::kHello, 0, Status::kTooManyBorrowers,
                      "this lender serves at most 32 borrower connections at once"));
  corpus.Write(t, "hello_refused_no_text", Reply(MessageType::kHello, 0, {}, Status::kProtocol));
  {
    Bytes other_version = HelloReply();
    other_version[4] = std::byte{7};
    corpus.Write(t, "hello_wrong_version", other_version);
    Bytes bad_magic = HelloReply();
    bad_magic[3] = std::byte{0};
    corpus.Write(t, "hello_bad_magic", bad_magic);
  }
  corpus.Write(t, "hello_wrong_superpage", HelloReply(4096));
  corpus.Write(
      t, "hello_not_a_reply",
      Message(MessageType::kHello, Body(HelloBody{0x1e, 0, kSuperpageBytes, kCapPassive}), 0));
  corpus.Write(t, "hello_wrong_type",
               Reply(MessageType::kQuery, 0, Body(HelloBody{0x1e, 0, kSuperpageBytes, 0})));
  corpus.Write(t, "hello_short", Reply(MessageType::kHello, 0, Data(10, 1)));
  {
    Bytes truncated = HelloReply();
    truncated.resize(truncated.size() - 4);
    corpus.Write(t, "hello_truncated", truncated);
  }
  {
    Bytes bad_magic = Reply(MessageType::kQuery, 1, Body(QueryReply{}));
    bad_magic[0] = std::byte{0};
    corpus.Write(t, "bad_magic_later", Stream({HelloReply(), bad_magic, AllReplies()}));
    Bytes too_long = Reply(MessageType::kRead, 4);
    const std::uint32_t length = kMaxPayload + 1;
    std::memcpy(too_long.data() + 24, &length, sizeof(length));
    corpus.Write(t, "payload_too_long", Stream({HelloReply(), too_long}));
  }
  {
    Bytes truncated = Stream({HelloReply(), Reply(MessageType::kQuery, 1, Body(QueryReply{}))});
    truncated.resize(truncated.size() - 10);
    corpus.Write(t, "truncated_reply", truncated);
  }
  // Regression: a notice and a reply without payload were read into an empty span with a
  // null data(), which the stream reader handed to memcpy (UBSan: null pointer passed as
  // argument 1).
  corpus.Write(
      t, "regression_empty_payload",
      Stream({HelloReply(), Message(MessageType::kShutdown, {}, 0),
              Reply(MessageType::kQuery, 1, Body(QueryReply{})),
              Reply(MessageType::kAllocSuperpage, 2, Sid(1)), Reply(MessageType::kWrite, 3)}));
}

}  // namespace peer_seeds

// ---- Control requests: one line each ----

void WriteControl(CorpusWriter& corpus) {
  const std::string t = "control_request";
  corpus.Write(t, "status", R"({"command": "status"})");
  corpus.Write(t, "peers", R"({"command":"peers","extra":[1,2,{"x":null}]})");
  corpus.Write(t, "attach",
               R"({"command":"attach","name":"swap0","size_bytes":1073741824,)"
               R"("frontend":"ublk","queues":4})");
  corpus.Write(t, "attach_minimal", R"({"command":"attach","name":"a","size_bytes":4096})");
  corpus.Write(t, "attach_nbd",
               R"({"command":"attach","name":"x.y-z_1","size_bytes":8192,"frontend":"nbd"})");
  corpus.Write(t, "attach_fuse",
               R"({"command":"attach","name":"f","size_bytes":17592186044416,)"
               R"("frontend":"fuse","queues":256})");
  corpus.Write(
      t, "attach_auto",
      R"({"frontend":"auto","size_bytes":4096,"name":"auto","command":"attach","queues":1})");
  corpus.Write(t, "attach_bad_name", R"({"command":"attach","name":"no/slash","size_bytes":4096})");
  corpus.Write(
      t, "attach_name_too_long",
      R"({"command":"attach","name":")" + std::string(65, 'n') + R"(","size_bytes":4096})");
  corpus.Write(t, "attach_name_not_string", R"({"command":"attach","name":7,"size_bytes":4096})");
  corpus.Write(t, "attach_no_size", R"({"command":"attach","name":"a"})");
  corpus.Write(t, "attach_size_zero", R"({"command":"attach","name":"a","size_bytes":0})");
  corpus.Write(t, "attach_size_unaligned", R"({"command":"attach","name":"a","size_bytes":4097})");
  corpus.Write(t, "attach_size_huge",
               R"({"command":"attach","name":"a","size_bytes":18446744073709551615})");
  corpus.Write(t, "attach_size_negative", R"({"command":"attach","name":"a","size_bytes":-4096})");
  corpus.Write(t, "attach_size_float", R"({"command":"attach","name":"a","size_bytes":4096.0})");
  corpus.Write(t, "attach_size_string", R"({"command":"attach","name":"a","size_bytes":"4K"})");
  corpus.Write(t, "attach_bad_frontend",
               R"({"command":"attach","name":"a","size_bytes":4096,"frontend":"loop"})");
  corpus.Write(t, "attach_frontend_not_string",
               R"({"command":"attach","name":"a","size_bytes":4096,"frontend":true})");
  corpus.Write(t, "attach_queues_zero",
               R"({"command":"attach","name":"a","size_bytes":4096,"queues":0})");
  corpus.Write(t, "attach_queues_too_many",
               R"({"command":"attach","name":"a","size_bytes":4096,"queues":257})");
  corpus.Write(t, "attach_queues_not_integer",
               R"({"command":"attach","name":"a","size_bytes":4096,"queues":"2"})");
  corpus.Write(t, "detach", R"({"command":"detach","name":"swap0"})");
  corpus.Write(t, "detach_bad_name", R"({"command":"detach","name":""})");
  corpus.Write(t, "detach_no_name", R"({"command":"detach"})");
  corpus.Write(t, "unknown_command", "{\"command\":\"reboot\\u0001\\n\"}");
  corpus.Write(t, "command_not_string", R"({"command":["status"]})");
  corpus.Write(t, "no_command", R"({"name":"a"})");
  corpus.Write(t, "not_object", R"(["command","status"])");
  corpus.Write(t, "not_json", R"({"command": "status")");
  corpus.Write(t, "empty", "");
  corpus.Write(t, "nested", std::string(200, '[') + std::string(200, ']'));
  corpus.Write(t, "unicode", "{\"command\":\"st\\u00e4tus\",\"name\":\"\\ud83d\\ude00\"}");
  // Regression: an unknown frontend was echoed unquoted, control characters and all, so
  // the one-line reason could span lines.
  corpus.Write(t, "regression_frontend_control_characters",
               R"({"command":"attach","name":"a","size_bytes":4096,"frontend":"x\ny\u001b[1m"})");
}

}  // namespace
}  // namespace memlend::fuzz

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_corpus DIR (the corpus directory, e.g. fuzz/corpus)\n");
    return 2;
  }
  memlend::fuzz::CorpusWriter corpus(argv[1]);
  memlend::fuzz::nbd_seeds::Write(corpus);
  memlend::fuzz::transmission_seeds::Write(corpus);
  memlend::fuzz::peer_seeds::WriteLender(corpus);
  memlend::fuzz::peer_seeds::WriteClient(corpus);
  memlend::fuzz::WriteControl(corpus);
  std::printf("make_corpus: wrote %d seeds under %s\n", corpus.written(), argv[1]);
  return corpus.failed() ? 1 : 0;
}
