// The peer protocol's wire format: how a borrower and a lender talk over a stream socket.
// docs/peer-protocol.md describes the protocol; this header is the byte layout.
//
// Every message is a 32-byte header followed by `payload_bytes` of payload. All integers
// are little-endian; the structs below are packed images of the wire and may be memcpy'd
// on little-endian hosts (the codec converts elsewhere). Requests carry a tag chosen by
// the requester; the reply to a request has the same type with kReplyBit set and the same
// tag, and replies may come in any order. Lender notices (EVICTED, RECLAIM, SHUTDOWN)
// are unsolicited, with tag 0.
#pragma once

#include <cstddef>
#include <cstdint>

namespace memlend::peer {

inline constexpr std::uint32_t kMagic = 0x4c504c4d;  // "MLPL" read as little-endian bytes
inline constexpr std::uint16_t kVersion = 1;

// Geometry of a lender's pool.
inline constexpr std::uint32_t kPageBytes = 4096;
inline constexpr std::uint32_t kSuperpageBytes = 2 * 1024 * 1024;
inline constexpr std::uint32_t kPagesPerSuperpage = kSuperpageBytes / kPageBytes;  // 512

// The largest payload a message may carry: one whole superpage, plus room for a fixed
// request body in front of it.
inline constexpr std::uint32_t kMaxPayload = kSuperpageBytes + 64;
// The longest error text a failed reply may carry.
inline constexpr std::uint32_t kMaxErrorText = 256;

enum class MessageType : std::uint16_t {
  kHello = 1,
  kQuery = 2,
  // Remote passive protocol: the borrower places pages inside superpages it was granted.
  kAllocSuperpage = 3,
  kFreeSuperpage = 4,
  kWrite = 5,
  kRead = 6,
  // Remote active protocol: the lender manages its memory; pages are named by handle.
  kPut = 7,
  kGet = 8,
  kFlush = 9,
  kDestroyPool = 10,
  // The borrower ends its session for good: nothing of it is kept after the connection.
  kGoodbye = 11,
  // Lender notices.
  kEvicted = 0x40,
  kReclaim = 0x41,
  kShutdown = 0x42,
};
inline constexpr std::uint16_t kReplyBit = 0x8000;

// Status codes in replies. The numbers are fixed by the protocol (they happen to match
// Linux errno values); a failed reply may carry a UTF-8 error text as its payload.
enum class Status : std::int32_t {
  kOk = 0,
  kNotPermitted = 1,   // EPERM: a superpage or pool that is not the caller's
  kNotFound = 2,       // ENOENT: GET of a page the lender does not have (ephemeral miss)
  kTooBig = 7,         // E2BIG: payload longer than kMaxPayload or than the request allows
  kInvalid = 22,       // EINVAL: malformed body, range outside the superpage, misalignment
  kNoSpace = 28,       // ENOSPC: the pool (or the caller's quota) is full; PUT refused
  kProtocol = 71,      // EPROTO: version mismatch, or a request before HELLO
  kTooManyBorrowers = 87,  // EUSERS: HELLO refused, the lender serves all the borrowers it
                           // takes (sent at once, with tag 0, and the connection closed)
  kUnsupported = 95,   // EOPNOTSUPP: unknown message type
  kShuttingDown = 108, // ESHUTDOWN: the lender is leaving; no new allocations
};

#pragma pack(push, 1)

struct Header {
  std::uint32_t magic;
  std::uint16_t version;
  std::uint16_t type;           // MessageType, | kReplyBit in replies
  std::uint32_t flags;          // per message type; 0 unless stated
  std::int32_t status;          // replies: Status; requests and notices: 0
  std::uint64_t tag;
  std::uint32_t payload_bytes;  // bytes after the header; at most kMaxPayload
  std::uint32_t reserved;       // 0
};
static_assert(sizeof(Header) == 32);

// HELLO request and reply. The borrower sends its node id; the lender answers with its
// own and its pool's geometry. `pool_bytes` is 0 from a node that lends nothing.
struct HelloBody {
  std::uint64_t node_id;
  std::uint64_t pool_bytes;
  std::uint32_t superpage_bytes;
  std::uint32_t capabilities;  // kCapPassive | kCapActive
};
static_assert(sizeof(HelloBody) == 24);
inline constexpr std::uint32_t kCapPassive = 1 << 0;
inline constexpr std::uint32_t kCapActive = 1 << 1;

// Sessions that outlive their connection (docs/restart.md). A lender's HELLO reply carries
// a SessionTicket after the HelloBody (a lender without parking sends only the HelloBody).
// A HELLO request with flag kHelloResume carries a ResumeBody after its HelloBody and asks
// for the parked session that secret names; the reply has flag kHelloResumed if it was
// given, and the ticket's `superpages` is then what the session holds.
inline constexpr std::uint32_t kSecretBytes = 32;
inline constexpr std::uint32_t kHelloResume = 1 << 0;   // HELLO request flag
// HELLO request flag: free the session the ResumeBody's secret names (the borrower gave it
// up), then start a new one. Not with kHelloResume.
inline constexpr std::uint32_t kHelloForget = 1 << 1;
inline constexpr std::uint32_t kHelloResumed = 1 << 0;  // HELLO reply flag
struct ResumeBody {
  std::uint8_t secret[kSecretBytes];
};
static_assert(sizeof(ResumeBody) == 32);
struct SessionTicket {
  std::uint8_t secret[kSecretBytes];  // names the session for a later resume
  std::uint32_t grace_ms;             // how long the lender keeps it after a disconnect; 0: not
  std::uint32_t superpages;           // superpages the session holds now
};
static_assert(sizeof(SessionTicket) == 40);
// A reply with kHelloResumed lists, after the ticket, the id of each superpage the session
// holds (`superpages` little-endian u32s), so that the borrower learns of one granted just
// as its connection broke; a session holding more than kMaxListedSuperpages sends no list.
inline constexpr std::uint32_t kMaxListedSuperpages =
    (kSuperpageBytes - sizeof(HelloBody) - sizeof(SessionTicket)) / sizeof(std::uint32_t);

// QUERY reply (the request has no payload).
struct QueryReply {
  std::uint64_t total_pages;
  std::uint64_t free_pages;
  std::uint64_t caller_pages;  // pages the caller holds (superpage pages + active pages)
  std::uint32_t borrowers;     // sessions holding memory now
  std::uint32_t superpage_pages;
};
static_assert(sizeof(QueryReply) == 32);

// ALLOC_SUPERPAGE reply (no request payload); FREE_SUPERPAGE request.
struct SuperpageBody {
  std::uint32_t sid;
};
static_assert(sizeof(SuperpageBody) == 4);

// WRITE request (followed by `length` bytes of data) and READ request (the reply carries
// `length` bytes). offset and length are multiples of kPageBytes, length > 0, and
// offset + length <= kSuperpageBytes.
struct RangeBody {
  std::uint32_t sid;
  std::uint32_t offset;
  std::uint32_t length;
  std::uint32_t reserved;
};
static_assert(sizeof(RangeBody) == 16);

// PUT (followed by kPageBytes of data), GET (the reply carries kPageBytes), FLUSH, and
// the EVICTED notice. DESTROY_POOL uses only `pool`. The pool's kind is fixed by the
// first PUT into it: flags kPutEphemeral makes an ephemeral pool.
struct HandleBody {
  std::uint32_t pool;
  std::uint32_t index;
  std::uint64_t object;
};
static_assert(sizeof(HandleBody) == 16);
inline constexpr std::uint32_t kPutEphemeral = 1 << 0;

// RECLAIM notice: the lender wants these superpages back by the deadline; followed by
// `count` uint32 SIDs. SHUTDOWN notice: the lender leaves at the deadline.
struct ReclaimBody {
  std::uint32_t deadline_ms;
  std::uint32_t count;
};
static_assert(sizeof(ReclaimBody) == 8);
struct ShutdownBody {
  std::uint32_t deadline_ms;
  std::uint32_t reserved;
};
static_assert(sizeof(ShutdownBody) == 8);

#pragma pack(pop)

}  // namespace memlend::peer
