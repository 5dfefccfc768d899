// LenderService: the lender's end of the peer protocol (docs/peer-protocol.md). Listens on
// one endpoint and serves each borrower connection — a session — on its own thread, over
// one LenderPool that holds the lent memory and its rules.
//
// Design. One blocking thread per session, as NbdServer does: a lender has a handful of
// borrowers, each request costs a network round trip, and a borrower pipelines on one
// connection, so a session's thread spends its time in recv. Requests of one session are
// therefore served in order, one at a time, which LenderPool relies on to copy data
// outside its lock. The thread reads a header and its whole payload into a per-session
// buffer (at most kMaxPayload), validates the request once here — framing, HELLO first,
// payload length, flags — and hands it to the pool, then sends the reply with one write
// of header and body. A PUT or ALLOC_SUPERPAGE on one session can evict other sessions'
// ephemeral pages (a whole superpage's worth at once); the EVICTED notices are then
// written to each owner's socket by the evicting thread, batched per owner, so every
// write to a session's socket holds that session's send mutex. Sessions are shared_ptrs so a
// notice can be sent to a session that is ending without racing its destruction.
// Sockets have a send timeout (kSendTimeout): a borrower that stops reading its socket is
// dropped rather than stalling the sessions whose PUTs evict its pages. Known weakness:
// those notices are written synchronously, so a slow borrower delays the PUT and
// ALLOC_SUPERPAGE replies of the sessions evicting its pages, by up to the send timeout.
//
// Bounds. Anyone who can reach the port can connect, so what a connection costs before it
// has said HELLO is small and short-lived: 8 KiB of buffers, a thread, and hello_timeout
// to say HELLO (the full buffers, about 6.3 MiB, come with the HELLO). At most
// max_borrowers sessions exist at once, saying HELLO or not; a connection past that gets,
// at once and before anything is read, a HELLO reply with tag 0 (the tag a borrower's
// HELLO carries) and status kTooManyBorrowers whose text says why, and is closed. So is one
// whose thread cannot be started. A session's thread removes it when it ends.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <span>
#include <vector>
#include <unordered_map>

#include "common/log.h"
#include "common/unique_fd.h"
#include "peer/codec.h"
#include "peer/lender_pool.h"
#include "transport/acceptor.h"
#include "transport/socket.h"

namespace memlend::peer {

// What `memlend status` shows under "lending".
struct LendingStats {
  std::uint64_t total_bytes = 0;  // the pool's size now (superpages in service)
  std::uint64_t target_bytes = 0; // the size asked for (Resize); total_bytes once reached
  std::uint64_t max_bytes = 0;    // what the pool was made with (--lend): the most it grows to
  // Granted superpages' bytes that borrowers were asked to give back (RECLAIM) and still hold.
  std::uint64_t reclaiming_bytes = 0;
  std::uint64_t used_bytes = 0;   // bytes granted or holding active pages (both kinds)
  // The part of used_bytes that holds ephemeral pages: cached data the lender drops for
  // any allocation, so QUERY reports it as free.
  std::uint64_t ephemeral_bytes = 0;
  std::uint64_t borrowers = 0;    // sessions holding memory now
  // Pages borrowers must move off before this lender may leave: granted superpages' pages
  // (cached ones are copies and may just go).
  std::uint64_t held_pages = 0;
  bool draining = false;          // Drain has begun
};

// One borrower's share of a lender, for drain progress.
struct BorrowerHolding {
  std::uint64_t node_id = 0;  // from its HELLO
  std::uint64_t pages = 0;    // granted superpages' pages and active pages it holds
};

// A session kept after its connection ended, for its borrower to resume (docs/restart.md).
struct ParkedSession {
  std::uint64_t node_id = 0;
  std::uint64_t pages = 0;                  // what it holds, as BorrowerHolding::pages
  std::chrono::milliseconds left{0};        // until it is freed
};

struct LenderOptions {
  // Sessions at once, before and after HELLO; more connections are refused.
  unsigned max_borrowers = 32;
  // From accept to a HELLO.
  std::chrono::milliseconds hello_timeout{5000};
  // Who may connect, for a unix socket.
  UnixSocketAccess access;
  // The most superpages one borrower node (by the node id in its HELLO) holds at once,
  // across its sessions, live and parked; 0: no limit but the pool. Its active (ephemeral)
  // pages are not counted: any allocation evicts them.
  std::uint32_t max_superpages_per_borrower = 0;
  // How long a session that holds memory is kept after its connection ends, for its
  // borrower to resume with the session's secret (docs/restart.md). 0: freed at once.
  std::chrono::milliseconds borrower_grace{60000};
  // Serve a session's requests under SCHED_FIFO (lowest priority), waiting for them under
  // the ordinary policy: each reply is a socket send that allocates kernel memory, and a
  // real-time thread may allocate a little below the min watermark, so replies still go out
  // when this host is out of memory and waits for swap I/O that needs them (a borrower on
  // this host). Needs CAP_SYS_NICE; without it the lender warns once and serves as usual.
  bool realtime = false;
};

class LenderService {
 public:
  // The most a session's buffers hold, whatever its borrower sends: a whole largest
  // message twice over for input, and 2.25 MiB for replies (lender_service.cc checks it).
  static constexpr std::uint64_t kMaxSessionBufferBytes = std::uint64_t{6432} << 10;
  // How long a write to a borrower may block before the borrower is dropped.
  static constexpr std::chrono::seconds kSendTimeout{30};
  // How long Stop() waits for a session's socket to be free to send it SHUTDOWN.
  static constexpr std::chrono::milliseconds kShutdownNoticeWait{100};
  // How long a resume waits for the session it takes over to let go of its connection.
  static constexpr std::chrono::milliseconds kTakeOverWait{2000};
  // The deadline of RECLAIM notices asked again of a session that resumes.
  static constexpr std::chrono::seconds kResumedReclaimDeadline{10};

  // Reserves a pool of `pool_bytes` (rounded down to whole 2 MiB superpages) and binds and
  // listens on `listen`. `node_id` is sent in HELLO replies. Throws std::runtime_error
  // naming the endpoint and the reason when it cannot listen, std::invalid_argument when
  // the pool is smaller than one superpage, std::system_error when it cannot be mapped.
  LenderService(const Endpoint& listen, std::uint64_t pool_bytes, std::uint64_t node_id,
                const LenderOptions& options = {});
  // Stops the service if it still runs.
  ~LenderService();
  LenderService(const LenderService&) = delete;
  LenderService& operator=(const LenderService&) = delete;

  // Starts accepting borrowers on a background thread. Call once.
  void Start();
  // Stops accepting and closes the listening socket, sends every session a SHUTDOWN
  // notice with deadline 0 (best effort: skipped for a session whose socket is full or
  // busy with another message for more than kShutdownNoticeWait), hangs up every session,
  // waits for their threads and frees what they held. Idempotent; call from any thread
  // but a session's own.
  void Stop();

  // Repatriation: stops granting (ALLOC_SUPERPAGE gets SHUTTING_DOWN), sends every session
  // SHUTDOWN with the time left until `deadline`, and waits until borrowers hold no page that
  // must be moved (LendingStats::held_pages is 0) or the deadline passes. Returns the pages
  // still held. Stop() comes after it. Thread-safe; a second call waits as the first.
  std::uint64_t Drain(std::chrono::steady_clock::time_point deadline);

  // Reclaim and growth: sets the pool's size to `bytes` (rounded down to superpages, at most
  // what it was made with), hands free and cached memory back at once (EVICTED notices for
  // cached pages), and sends RECLAIM with `deadline` to borrowers for the granted
  // superpages it still needs back. Returns without waiting: Stats() shows the progress
  // (total_bytes falls to target_bytes as borrowers free them). Thread-safe.
  void Resize(std::uint64_t bytes, std::chrono::milliseconds deadline);
  // Sends the RECLAIM notices Resize could not send at once (a borrower's socket was full,
  // or its thread was writing a reply), and the rest of any notice sent in part: the daemon
  // calls it every second. Never blocks on a full socket. Thread-safe.
  void SendPendingReclaims() noexcept;
  // Whether superpages put back in service are locked in memory (the daemon locked its
  // memory). REQUIRES: before Start().
  void SetLockMemory(bool lock) { pool_.SetLockMemory(lock); }

  // Frees the parked sessions whose grace period has ended (their superpages zeroed) and
  // returns how many. The daemon calls it every second. Thread-safe.
  std::size_t ExpireParked();
  // The sessions parked now. Thread-safe.
  std::vector<ParkedSession> Parked() const;

  // A snapshot of the pool's use. Thread-safe.
  LendingStats Stats() const;
  // What each session holds now, for sessions holding anything. Thread-safe.
  std::vector<BorrowerHolding> Holdings() const;
  // Superpages held now by the sessions (live and parked) of borrower node `node_id`.
  // Thread-safe.
  std::uint64_t NodeSuperpages(std::uint64_t node_id) const;
  // Sessions open now, with or without HELLO. Thread-safe.
  unsigned sessions() const;

  const Endpoint& endpoint() const { return endpoint_; }

 private:
  struct Session {
    // Changes once at most, when the session resumes a parked one (under mu_).
    std::atomic<SessionId> id{kNoSession};
    UniqueFd fd;  // closed when the last reference goes, after the thread ended
    std::atomic<bool> finished{false};
    std::atomic<std::uint64_t> node_id{0};  // the borrower's, from its HELLO
    // Set by the session's thread at its first HELLO; read under mu_ by others.
    bool said_hello = false;            // guarded by mu_
    bool has_secret = false;            // guarded by mu_: getrandom gave one
    std::array<std::uint8_t, kSecretBytes> secret{};  // guarded by mu_ once said_hello
    bool taken_over = false;            // guarded by mu_: a resume is taking it over
    bool leaving = false;               // guarded by mu_: GOODBYE, or forgotten: never parked
    std::mutex send_mu;  // held for each whole message written to fd
    // The rest of a notice that went out only in part (the socket was full), guarded by
    // send_mu: whoever writes next sends it first, so messages never interleave.
    std::vector<std::byte> unsent_tail;
    // SIDs asked back and not yet sent, each with the deadline it was asked for; a leaf
    // lock. `notices_waiting`: there are some, or an unsent tail (checked without a lock).
    struct AskedBack {
      std::uint32_t sid;
      std::chrono::steady_clock::time_point deadline;
    };
    std::mutex reclaim_mu;
    std::vector<AskedBack> reclaims_unsent;
    std::atomic<bool> notices_waiting{false};
  };
  // Sends what is left of a notice sent in part: waiting for the socket with `wait`, else
  // as far as it takes without waiting. 0 when nothing is left, -EAGAIN when some is, or
  // another -errno when the stream broke. REQUIRES: session.send_mu held.
  static int SendTailLocked(Session& session, bool wait) noexcept;
  // Sends `notice` (a whole message) to every live session, best effort: skips a session
  // whose socket is busy for more than kShutdownNoticeWait, never blocks on a full one.
  void NotifyAll(std::span<const std::byte> notice);
  class Connection;  // one session's request loop (lender_service.cc)

  // A parked session: its id in the pool, whose it is, and when it goes.
  struct ParkedEntry {
    std::uint64_t node_id = 0;
    std::array<std::uint8_t, kSecretBytes> secret{};
    std::chrono::steady_clock::time_point deadline;
  };
  // HELLO: gives `session` its secret, or (`resume`) the parked session that `node_id` and
  // `secret` name, taking over a live one first. Returns whether it resumed one; sets
  // *superpages to what the session holds. Refuses a new session past max_borrowers
  // (parked ones count) with *refusal set. Called on the session's own thread.
  // Queues RECLAIM again for the superpages of a resumed session asked back while it was
  // parked. Called by the session's thread once its HELLO reply has gone out.
  void AskAgain(Session& session) noexcept;
  // With `forget`, the session `resume` names is freed instead, and a new one begins.
  bool Greet(Session& session, std::uint64_t node_id,
             const std::array<std::uint8_t, kSecretBytes>* resume, bool forget,
             std::uint32_t* superpages, std::string* refusal);

  // Runs on the acceptor thread: starts a session thread for the connection, or refuses it.
  void Accept(UniqueFd fd);
  // The session's thread: serves it, frees what it held and removes it from sessions_.
  void ServeSession(std::shared_ptr<Session> session);
  // Answers a connection the lender will not serve with a failed HELLO reply (tag 0)
  // saying why, without reading from it, and closes it; logs it now and then.
  void Refuse(UniqueFd fd, const std::string& why) noexcept;
  // Queues RECLAIM for `sids` to session `owner`, if it is still connected, and sends what
  // its socket takes now (SendReclaims).
  void NotifyReclaim(SessionId owner, std::span<const std::uint32_t> sids,
                     std::chrono::steady_clock::time_point deadline) noexcept;
  // Sends the session's queued RECLAIMs as far as its socket takes them without waiting (a
  // notice half sent is finished first, the next time); the rest stay queued. Skips a
  // session whose thread is writing.
  void SendReclaims(Session& session) noexcept;
  // Sends an EVICTED notice for each eviction to its owner, if it is still connected;
  // one owner's notices go out together. REQUIRES: evictions.size() <= kPagesPerSuperpage.
  void NotifyEvicted(std::span<const Eviction> evictions) noexcept;

  // Constant after construction.
  const Endpoint endpoint_;
  const std::uint64_t node_id_;
  const LenderOptions options_;
  std::atomic<bool> realtime_warned_{false};  // the warning that real-time was refused
  LenderPool pool_;

  std::atomic<bool> shutting_down_{false};  // set by Stop() and Drain(): refuse new allocations
  std::atomic<bool> draining_{false};       // set by Drain()
  std::atomic<std::int64_t> drain_deadline_ns_{0};  // Drain's deadline (steady clock)
  mutable std::mutex mu_;
  std::unordered_map<SessionId, std::shared_ptr<Session>> sessions_;  // guarded by mu_
  std::unordered_map<SessionId, ParkedEntry> parked_;                       // guarded by mu_
  std::condition_variable parked_cv_;  // a session was parked or ended
  SessionId next_session_ = 1;                                          // guarded by mu_
  unsigned threads_ = 0;  // session threads still running; guarded by mu_
  std::condition_variable threads_done_;  // threads_ fell to 0
  bool stopping_ = false;                                               // guarded by mu_
  LogThrottle refusals_{std::chrono::seconds(10)};                      // guarded by mu_
  Acceptor acceptor_;  // last: it calls Accept, which uses the members above
};

}  // namespace memlend::peer
