// PlacementStore: the remote tier as one PageStore whose slots name *placements*, each a
// record of the copies one page has on distinct peers (docs/remote-tier.md). A device's
// page-table entry keeps only the placement id, so several copies cost it nothing.
//
// Writes (WriteBatchCopies) put each page on up to `copies` distinct peers, chosen first and
// sent in one peer store batch, all acknowledged before the call returns. A page that got fewer copies
// than asked (too few peers up) is *degraded*; so is one whose copy was on a peer that went
// down. Reads try the copies on ready peers first; a copy whose peer misses its deadline
// gives way to the next, and only when no other copy answers is the first one asked again
// (until its peer answers or is down). A page all of whose copies are gone is *lost*: it
// reads as -EIO and is counted (lost_pages) until it is rewritten or trimmed.
//
// A peer that sent SHUTDOWN is draining: the same thread moves every copy on it to another
// peer (reading it from the draining peer while it answers), and the peer store gives that
// peer's superpages back as they empty, which is what the lender waits for. A copy that finds
// no room elsewhere is dropped if the page has another copy, else left (lost at the deadline).
//
// Disk copies. With a disk store (the backing file), a record may also name one copy there:
// every page of a replicas:N+disk device has one, written before its peer copies, and a
// page on a draining peer that finds no room on any other peer moves there (repatriation)
// rather than be lost at the deadline. A page with a disk copy is never lost; reads try
// the ready peers once and then the disk, and the rebuilder adds missing peer copies from
// it (and a missing disk copy from a peer, when the disk had no room at first).
//
// The rebuilder (one thread) takes, from the peer store's reverse index, the copies that
// went down with a peer, drops them from their records, and copies every degraded page from
// a live copy to another peer, at most rebuild_rate pages a second. It commits a new copy
// only if the record did not change meanwhile (its version), so a page rewritten or trimmed
// during the copy keeps nothing stale; it holds no record lock across a network wait.
//
// Locks: a record's stripe lock, then the peer store's locks (never the other way). The
// table's free list has its own leaf lock.
#pragma once

#include <atomic>
#include <array>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "memlend/page_store.h"
#include "peer/peer_store.h"
#include "store/page_sealer.h"

namespace memlend {

struct PlacementStats {
  std::uint64_t pages = 0;          // placements in use with at least one live copy
  std::uint64_t copies = 0;         // copies named by those placements
  std::uint64_t degraded = 0;       // placements with fewer copies than asked
  std::uint64_t lost = 0;           // placements with no copy left
  std::uint64_t rebuilt = 0;        // copies made by the rebuilder since start
  std::uint64_t moved = 0;          // copies moved off draining peers since start
  std::uint64_t disk_copies = 0;    // placements with a copy in the disk store
  std::uint64_t integrity_failures = 0;  // peer copies that did not open (sealing) since start
  // The rebuilder's pace: copies made (rebuilt or moved) per second, averaged over the last
  // few seconds; and, while pages are degraded, the seconds left at that pace (-1 while it
  // makes no progress: no peer up with room for another copy).
  double copies_per_s = 0;
  double eta_s = 0;
};

class PlacementStore final : public PageStore {
 public:
  static constexpr unsigned kMaxCopies = 3;

  // `disk`, if not null, is where disk copies go; it must outlive this store. Write and
  // WriteBatch keep one copy (none); `rebuild_rate` is pages per second the rebuilder
  // copies at most.
  PlacementStore(std::unique_ptr<peer::PeerStore> peers, PageStore* disk = nullptr,
                 unsigned rebuild_rate = 5000);
  // Stops the rebuilder.
  ~PlacementStore() override;

  // Starts the rebuilder thread.
  void Start();

  // Seals every page before it goes to a peer, and opens it when it comes back
  // (docs/security.md): with `sealer`, bound to the borrower's `node_id`; `counter` hands out
  // the seal counters (never twice under one key: it lives as long as the key does, across
  // restarts with the state). A copy that does not open counts against its peer and is
  // read from another copy. Before any write.
  void EnableSealing(std::unique_ptr<PageSealer> sealer, std::uint64_t node_id,
                     std::atomic<std::uint64_t>* counter);
  bool sealing() const { return sealer_ != nullptr; }

  peer::PeerStore& peers() { return *peers_; }
  const peer::PeerStore& peers() const { return *peers_; }

  int Write(ConstPageSpan page, std::uint64_t hint, Slot* slot) noexcept override;
  int Read(Slot slot, PageSpan out) noexcept override;
  void ReadBatch(std::span<const Slot> slots, std::span<std::byte* const> outs,
                 std::span<int> results) noexcept override;
  void WriteBatch(std::span<const std::byte* const> pages, std::span<const std::uint64_t> hints,
                  std::span<Slot> slots, std::span<int> results) noexcept override {
    WriteBatchCopies(pages, hints, Redundancy{}, slots, results);
  }
  // redundancy.copies is clamped to 1..kMaxCopies; redundancy.disk asks for a disk copy
  // too (ignored without a disk store).
  void WriteBatchCopies(std::span<const std::byte* const> pages,
                        std::span<const std::uint64_t> hints, Redundancy redundancy,
                        std::span<Slot> slots, std::span<int> results) noexcept override;
  void Pin(Slot slot) noexcept override;
  void Unpin(Slot slot) noexcept override;
  // False once every copy of the page is lost: its lenders went down (whether or not the
  // rebuilder has marked the record lost yet) and it has no disk copy.
  bool Holds(Slot slot) const noexcept override;
  bool AwaitRoom() noexcept override { return peers_->AwaitRoom(); }
  void Discard(Slot slot) noexcept override;
  // pages: placements with a live copy; used_bytes and total_bytes: the peers'.
  StoreStats Stats() const noexcept override;
  PlacementStats Placements() const noexcept;

  // Runs one rebuild round now (what the rebuilder thread does every interval); for tests.
  void RebuildRound() noexcept;

  // Persistence (docs/restart.md). Where a new chunk of records goes: memory of
  // ChunkBytes() bytes that outlives the process (a state segment), or nullptr when there is
  // none (the write that needed it then finds no room). Set before any write.
  using ChunkSource = std::function<void*(std::size_t chunk)>;
  void SetChunkSource(ChunkSource source) { chunk_source_ = std::move(source); }
  static constexpr std::size_t ChunkBytes() { return sizeof(Record) * kChunkRecords; }
  // Recovery, before any other call: AdoptChunk gives back chunk `chunk` as an earlier
  // process left it (chunks in order from 0); Recover then keeps the records whose ids
  // `referenced` says a page table names (`referenced[id]`), adopts their copies' slots in
  // the peer store (a copy of a session that had ended is dropped) and their disk copies
  // (`adopt_disk`), frees the others, and rebuilds the counts and free ids. Returns the
  // records kept. Not thread-safe. May throw bad_alloc.
  void AdoptChunk(std::size_t chunk, void* memory);
  std::uint64_t Recover(const std::vector<bool>& referenced,
                        const std::function<bool(Slot)>& adopt_disk);

 private:
  static constexpr unsigned kChunkShift = 12;  // records per chunk: 4096
  static constexpr std::size_t kChunkRecords = std::size_t{1} << kChunkShift;
  static constexpr std::size_t kMaxChunks = std::size_t{1} << 20;  // 2^32 placements
  static constexpr std::size_t kLockStripes = 1024;

  static constexpr Slot kNoDisk = ~Slot{0};
  struct Record {
    std::uint32_t version = 0;   // changes whenever the record does
    std::uint8_t count = 0;      // copies[0..count) are the peer copies
    std::uint8_t wanted = 0;     // peer copies asked for; 0: the record is free
    bool want_disk = false;      // a disk copy asked for (replicas:N+disk)
    std::uint16_t pins = 0;
    bool discarded = false;      // Discard came while pinned: free at the last Unpin
    bool lost = false;           // every copy is gone
    Slot disk = kNoDisk;         // the disk copy's slot, if there is one
    Slot copies[kMaxCopies] = {};
    // When sealing: the counter the page was sealed under, and its tag (the peer copies hold
    // the ciphertext; the disk copy is plaintext).
    std::uint64_t seal = 0;
    PageSealer::Tag tag{};
  };
  // A record's seal, taken with its copies (and its version) under its lock.
  struct Seal {
    std::uint64_t counter = 0;
    PageSealer::Tag tag{};
    std::uint32_t version = 0;
  };
  // Opens in place a page read whole from peer copy `copy` of placement `id`; true when it
  // opened, or when nothing is sealed. When it does not open and the record is still as
  // `seal` saw it (so the slot cannot have been reused for another page meanwhile), counts
  // an integrity failure against the peer and queues the copy to be dropped and made again.
  bool OpenCopy(std::uint32_t id, const Seal& seal, Slot copy, PageSpan page) noexcept;
  // Seals `page` of placement `id` under `counter` into `out`.
  bool SealInto(std::uint32_t id, std::uint64_t counter, ConstPageSpan page, PageSpan out,
                PageSealer::Tag* tag) const noexcept;
  // Short of a copy it asked for. REQUIRES: a live record, not lost.
  static bool Degraded(const Record& record) noexcept {
    return record.count < record.wanted || (record.want_disk && record.disk == kNoDisk);
  }
  // Keeps degraded_ in step after a change to a live record that was `was_degraded`, and
  // queues it for the rebuilder if it still is. REQUIRES: its stripe lock held.
  void AfterChangeLocked(std::uint32_t id, const Record& record, bool was_degraded) noexcept;
  // Whether the disk store can take another page now.
  bool DiskHasRoom() const noexcept;
  struct alignas(64) Stripe {
    std::mutex mu;
  };

  // The record of `id`, or nullptr if `id` was never allocated.
  Record* Find(std::uint32_t id) const noexcept;
  std::mutex& LockFor(std::uint32_t id) const noexcept { return stripes_[id % kLockStripes].mu; }
  // Takes a free id (growing the table if needed); false when memory ran out.
  bool Allocate(std::uint32_t* id) noexcept;
  void Free(std::uint32_t id) noexcept;
  // Releases every copy of a record and frees it. REQUIRES: its stripe lock held.
  void ReleaseLocked(std::uint32_t id, Record& record) noexcept;
  // Reads `copies` of placement `id` in order, ready peers first (see the file comment);
  // a copy that does not open (sealing) is passed over like one that failed.
  int ReadCopies(std::uint32_t id, const Seal& seal, const Slot* copies, unsigned count,
                 PageSpan out) noexcept;
  // Reads a record's page from its peer copies or its disk copy (kNoDisk: none): with a
  // disk copy, each ready peer is asked once and then the disk, so nothing waits on a
  // peer that is late.
  int ReadRecord(std::uint32_t id, const Seal& seal, const Slot* copies, unsigned count,
                 Slot disk, PageSpan out) noexcept;
  // Whether a degraded record goes on the rebuild queue. REQUIRES: its stripe lock held.
  void NoteDegradedLocked(std::uint32_t id, const Record& record) noexcept;
  void RebuilderLoop();
  // Updates copies_per_s_ with `made` copies in `seconds`.
  void NotePace(std::uint64_t made, double seconds) noexcept;
  // Drops copies lost with peers that went down from their records.
  void DropLostCopies() noexcept;
  // Adds a copy to up to `budget` degraded records; returns how many it tried.
  std::size_t RebuildSome(std::size_t budget) noexcept;
  // Moves up to `budget` copies off draining peers (repatriation); returns how many moved.
  std::size_t MoveSome(std::size_t budget) noexcept;

  const std::unique_ptr<peer::PeerStore> peers_;
  std::unique_ptr<PageSealer> sealer_;            // null: pages go as they are
  std::uint64_t node_id_ = 0;                     // bound into every seal
  std::atomic<std::uint64_t>* seal_counter_ = nullptr;
  std::unique_ptr<std::byte[]> sealed_buffer_;    // the rebuilder's sealed window
  // Copies that failed to open, for the rebuilder to drop and make again (as lost copies).
  static constexpr std::size_t kMaxBadCopies = 65536;
  struct BadCopy {
    std::uint32_t owner;
    Slot slot;
    std::uint32_t version;  // the record's when the copy failed: dropped only if unchanged
  };
  std::mutex bad_mu_;
  std::vector<BadCopy> bad_copies_;  // guarded by bad_mu_
  // Drops `slot` from record `id` (a copy lost, or failed); the page is lost if it was the
  // last copy. Returns whether it was the last one. REQUIRES: the record's stripe lock held,
  // the record live and holding `at`, one of its copies.
  bool DropCopyLocked(std::uint32_t id, Record& record, Slot* at) noexcept;
  PageStore* const disk_;  // or null
  const unsigned rebuild_rate_;

  const std::unique_ptr<std::atomic<Record*>[]> chunks_;  // kMaxChunks slots, filled as needed
  ChunkSource chunk_source_;  // set: chunks live in memory it gives (never deleted here)
  mutable std::array<Stripe, kLockStripes> stripes_;  // mutable: Holds locks one
  std::mutex table_mu_;                    // a leaf lock
  std::vector<std::uint32_t> free_ids_;    // guarded by table_mu_
  std::size_t chunk_count_ = 0;            // guarded by table_mu_

  std::atomic<std::uint64_t> pages_{0};
  std::atomic<std::uint64_t> copies_{0};
  std::atomic<std::uint64_t> degraded_{0};
  std::atomic<std::uint64_t> lost_{0};
  std::atomic<std::uint64_t> rebuilt_{0};
  std::atomic<std::uint64_t> moved_{0};
  std::atomic<std::uint64_t> integrity_failures_{0};
  std::atomic<std::uint64_t> disk_copies_{0};
  std::atomic<double> copies_per_s_{0};  // written by the rebuilder only
  unsigned idle_rounds_ = 0;             // the rebuilder's: rounds in a row that made nothing

  std::mutex queue_mu_;                   // a leaf lock
  std::deque<std::uint32_t> rebuild_queue_;  // guarded by queue_mu_: ids that may be degraded

  const std::unique_ptr<std::byte[]> rebuild_buffer_;  // the rebuilder's pages in flight
  std::mutex rebuilder_mu_;
  std::condition_variable rebuilder_cv_;
  bool stopping_ = false;  // guarded by rebuilder_mu_
  std::thread rebuilder_;
};

}  // namespace memlend
