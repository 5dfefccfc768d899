// LocalStore: the RAM tier. A reserved arena of 4 KiB frames, optionally lz4-compressed.
//
// Design. The arena is one anonymous mapping of `capacity_bytes` (rounded down to whole
// frames) carved into frames of kPageSize. Without compression every page takes one frame.
// With lz4 a page is compressed and stored in a chunk of a size class; each size class
// splits a frame into k equal chunks (k = 1..16), so a page that compresses to 900 bytes
// takes a quarter of a frame. A frame belongs to one class while any chunk in it is live
// and returns to the free pool when its last chunk is discarded. Pages that do not
// compress below the largest multi-chunk class are stored raw in a whole frame. Each chunk
// starts with a 2-byte length so lz4 gets the exact compressed size back.
//
// The alternatives were one global allocator (simple, but a single lock costs about a
// third of the CPU time under parallel load, as nbdkit's sparse allocator notes) and
// zsmalloc-style variable objects spanning frames (denser, much more code). We shard
// instead: the frames are split into kShards contiguous ranges, each with its own mutex,
// free-frame stack and per-class lists of partly used frames. A write picks the shard from
// its hint and falls back to the other shards when its own is full.
//
// Slot encoding: frame index << 8 | size class << 4 | chunk index.
// Metadata costs 12 bytes per frame (3 MiB per GiB of arena).
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "memlend/page_store.h"

namespace memlend {

enum class Compression { kNone, kLz4 };

class LocalStore final : public PageStore {
 public:
  // Reserves the arena. Throws std::system_error if the memory cannot be mapped, or
  // std::invalid_argument if `capacity_bytes` is smaller than one frame per shard.
  LocalStore(std::uint64_t capacity_bytes, Compression compression);
  // The same over `arena`, memory the caller owns (a state segment: docs/restart.md) of
  // ArenaBytes(capacity_bytes) bytes, page-aligned, which outlives the store. Its frames
  // hold whatever an earlier store left there: they are all free until Adopt says otherwise.
  LocalStore(std::byte* arena, std::uint64_t capacity_bytes, Compression compression);
  ~LocalStore() override;
  // The arena's bytes for a store of `capacity_bytes`: whole frames.
  static std::uint64_t ArenaBytes(std::uint64_t capacity_bytes) {
    return capacity_bytes / kPageSize * kPageSize;
  }

  // Recovery after a restart, before any other call: Adopt marks each slot that a page
  // table names as live (false if it cannot be one: out of range, or its chunk is taken
  // already or by a frame of another size class), then FinishAdopt rebuilds the free lists
  // from what was adopted. Not thread-safe.
  bool Adopt(Slot slot) noexcept;
  void FinishAdopt() noexcept;
  LocalStore(const LocalStore&) = delete;
  LocalStore& operator=(const LocalStore&) = delete;

  int Write(ConstPageSpan page, std::uint64_t hint, Slot* slot) noexcept override;
  // Rewrites in place when the new contents need the same chunk size as the old (always
  // so without compression), which takes no lock; else writes a new chunk and leaves the
  // old one live (PageStore::Rewrite). When there is no room for one: in place if the new
  // contents fit the old chunk (raw into a raw frame, smaller into a larger chunk), or raw
  // in the old chunk's frame made over to a raw one if the chunk is alone there (*placed is
  // then a new slot, and the old one is gone: *keeps_old is false).
  int Rewrite(Slot slot, ConstPageSpan page, std::uint64_t hint, Slot* placed,
              bool* keeps_old) noexcept override;
  int Read(Slot slot, PageSpan out) noexcept override;
  void Discard(Slot slot) noexcept override;
  // Takes a whole frame for a page that the caller copies into it itself (a page received
  // straight from a peer): on success sets *slot, and *frame to the frame's kPageSize bytes,
  // which the caller must fill before the slot is read, or Discard. 0 or -ENOSPC.
  int ReserveFrame(std::uint64_t hint, Slot* slot, std::byte** frame) noexcept;
  // pages: live pages; used_bytes: frames in use * kPageSize; total_bytes: arena size.
  StoreStats Stats() const noexcept override;

  Compression compression() const { return compression_; }

 private:
  struct Shard;
  struct FrameMeta;
  // A page ready to copy into a chunk: raw, or a length prefix and an lz4 block.
  struct Packed {
    const std::byte* bytes;
    std::size_t length;
    unsigned size_class;
  };

  // Compresses `page` into `buffer` when compression is on and it pays; otherwise the
  // result points at `page` itself. `buffer` holds at least kPageSize / 2 bytes.
  Packed Pack(ConstPageSpan page, std::byte* buffer) const noexcept;
  // Reserves a chunk of `size_class`, trying the hinted shard first. 0 or -ENOSPC.
  int Allocate(unsigned size_class, std::uint64_t hint, Slot* slot) noexcept;
  std::byte* ChunkAddress(Slot slot) const noexcept;
  Shard& ShardOf(std::uint32_t frame) noexcept;
  // If `slot` is the only live chunk of its frame, makes the frame a raw one (its whole
  // kPageSize bytes for one page), sets *placed to it and returns true.
  bool MakeLoneChunkRaw(Slot slot, Slot* placed) noexcept;
  // Copies a packed page into its chunk.
  static void CopyPacked(const Packed& packed, std::byte* chunk) noexcept;

  // Constant after construction.
  // Sizes the metadata and shards for `capacity_bytes` (the constructors' common part).
  void Init(std::uint64_t capacity_bytes);

  const Compression compression_;
  bool owns_arena_ = true;
  std::byte* arena_ = nullptr;
  std::uint64_t arena_bytes_ = 0;
  std::uint32_t frame_count_ = 0;
  std::vector<FrameMeta> frames_;
  std::vector<std::unique_ptr<Shard>> shards_;

  std::atomic<std::uint64_t> live_pages_{0};
  std::atomic<std::uint64_t> used_frames_{0};
};

}  // namespace memlend
