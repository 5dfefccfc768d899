// LocalStore implementation. See local_store.h for the design.
//
// Size classes. Class c (0..15) splits a frame into k = c + 1 equal chunks of
// ClassBytes(c) = floor(kPageSize / k) rounded down to a multiple of 8 bytes. Class 0 is
// the whole frame and holds a page stored raw: every page when compression is off, and
// with lz4 every page whose compressed form (plus its 2-byte length) does not fit a class 1
// chunk of 2048 bytes. A chunk of class 1..15 starts with the compressed length as a
// 2-byte little-endian number followed by the lz4 block.
//
// Slot encoding: bits 8.. frame index, bits 4..7 size class, bits 0..3 chunk index.
//
// Locking. A shard's mutex guards its free-frame stack, its partial lists and the FrameMeta
// of its frames. Chunk contents are not guarded: Write copies the page into its chunk
// after it drops the lock (the chunk is the caller's alone by then), and Read needs no
// metadata at all because the slot names the chunk. The caller orders a Write before the
// Reads of the slot it returns, and a Discard after them, as PageStore requires.
#include "store/local_store.h"

#include <lz4.h>
#include <sys/mman.h>

#include <algorithm>
#include <bit>
#include <cassert>
#include <cerrno>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <system_error>

#if defined(__x86_64__)
#include <emmintrin.h>
#endif

namespace memlend {
namespace {

// The most shards an arena is split into; a small arena gets one shard per frame.
constexpr std::uint32_t kMaxShards = 16;

// Number of size classes, and the class that stores a page raw in a whole frame.
constexpr unsigned kClassCount = 16;
constexpr unsigned kRawClass = 0;

// Marks the end of a free-frame stack or partial list.
constexpr std::uint32_t kNoFrame = std::numeric_limits<std::uint32_t>::max();

// The most frames an arena may have: frame indices are 32 bits and kNoFrame is reserved.
constexpr std::uint64_t kMaxFrames = kNoFrame - 1;

// Bytes in front of each compressed chunk holding the compressed length.
constexpr std::size_t kLengthBytes = 2;

// Slot field layout.
constexpr unsigned kFrameShift = 8;
constexpr unsigned kClassShift = 4;
constexpr Slot kFieldMask = 0xf;

// Returns the chunk size of size class `size_class`.
constexpr std::size_t ClassBytes(unsigned size_class) {
  return (kPageSize / (size_class + 1)) & ~std::size_t{7};
}

// Returns the mask with one bit set per chunk of size class `size_class`.
constexpr std::uint32_t FullMask(unsigned size_class) {
  return (std::uint32_t{1} << (size_class + 1)) - 1;
}

static_assert(ClassBytes(0) == kPageSize);
static_assert(ClassBytes(1) == 2048);
static_assert(ClassBytes(kClassCount - 1) == 256);
static_assert(FullMask(kClassCount - 1) == 0xffff);

// The largest lz4 block a compressed chunk can hold; a page that does not compress to
// this size is stored raw.
constexpr std::size_t kMaxCompressedBytes = ClassBytes(1) - kLengthBytes;

// Returns the smallest size class (the one with the most chunks) whose chunk holds
// `bytes` bytes. REQUIRES: bytes <= ClassBytes(1).
unsigned ClassFor(std::size_t bytes) {
  for (unsigned c = kClassCount - 1; c > 1; --c) {
    if (ClassBytes(c) >= bytes) return c;
  }
  return 1;
}

// Copies a whole raw page into its frame. The frame is usually cold (pages land at random
// places in the arena), so on x86-64 the copy uses non-temporal stores: they skip reading
// each destination cache line before overwriting it, which a plain copy spends most of its
// time on. Measured with fio's nbd engine at queue depth 32, same run, alternating: about
// 3% more 4 KiB random writes (the client, not the server, is then the limit: see README).
void CopyPageToFrame(std::byte* frame, const std::byte* page) noexcept {
#if defined(__x86_64__)
  auto* to = reinterpret_cast<__m128i*>(frame);
  const auto* from = reinterpret_cast<const __m128i*>(page);
  for (std::size_t i = 0; i < kPageSize / sizeof(__m128i); i += 4) {
    const __m128i a = _mm_loadu_si128(from + i);
    const __m128i b = _mm_loadu_si128(from + i + 1);
    const __m128i c = _mm_loadu_si128(from + i + 2);
    const __m128i d = _mm_loadu_si128(from + i + 3);
    _mm_stream_si128(to + i, a);
    _mm_stream_si128(to + i + 1, b);
    _mm_stream_si128(to + i + 2, c);
    _mm_stream_si128(to + i + 3, d);
  }
  _mm_sfence();  // order the streamed stores before the slot is published
#else
  std::memcpy(frame, page, kPageSize);
#endif
}

Slot MakeSlot(std::uint32_t frame, unsigned size_class, unsigned chunk) {
  return Slot{frame} << kFrameShift | Slot{size_class} << kClassShift | Slot{chunk};
}

}  // namespace

// Per-frame metadata; guarded by the owning shard's mutex.
struct LocalStore::FrameMeta {
  std::uint32_t prev = kNoFrame;  // previous frame in its class's partial list
  std::uint32_t next = kNoFrame;  // next frame in its partial list or the free stack
  std::uint16_t used_mask = 0;    // one bit per live chunk; 0 means the frame is free
  std::uint8_t size_class = 0;    // valid while used_mask != 0
  std::uint8_t unused = 0;
};

// One contiguous range of frames with its own allocator. Aligned so that shards' mutexes
// do not share cache lines.
struct alignas(64) LocalStore::Shard {
  // Constant after construction.
  std::uint32_t begin = 0;  // first frame of the shard
  std::uint32_t end = 0;    // one past the last frame of the shard

  std::mutex mu;
  // Guarded by mu: frames [next_fresh, end) have never been used and are not on the stack.
  std::uint32_t next_fresh = 0;
  // Guarded by mu: top of the stack of freed frames, linked through FrameMeta::next.
  std::uint32_t free_head = kNoFrame;
  // Guarded by mu: per size class, frames with at least one live and one free chunk.
  // Class 0 frames are never partly used, so partial_head[0] stays empty.
  std::array<std::uint32_t, kClassCount> partial_head;

  Shard() { partial_head.fill(kNoFrame); }
};

void LocalStore::Init(std::uint64_t capacity_bytes) {
  static_assert(sizeof(FrameMeta) == 12, "the header promises 12 bytes of metadata per frame");
  if (capacity_bytes < kPageSize) {
    throw std::invalid_argument("local store capacity is smaller than one page");
  }
  const std::uint64_t frames = capacity_bytes / kPageSize;
  if (frames > kMaxFrames) {
    throw std::invalid_argument("local store capacity exceeds the supported maximum");
  }
  frame_count_ = static_cast<std::uint32_t>(frames);
  arena_bytes_ = frames * kPageSize;

  // Everything that can throw bad_alloc comes before the mapping, so nothing leaks.
  frames_.resize(frame_count_);
  const std::uint32_t shard_count = std::min(kMaxShards, frame_count_);
  const std::uint32_t per_shard = frame_count_ / shard_count;
  shards_.reserve(shard_count);
  for (std::uint32_t i = 0; i < shard_count; ++i) {
    auto shard = std::make_unique<Shard>();
    shard->begin = i * per_shard;
    shard->end = i + 1 == shard_count ? frame_count_ : (i + 1) * per_shard;
    shard->next_fresh = shard->begin;
    shards_.push_back(std::move(shard));
  }
}

LocalStore::LocalStore(std::byte* arena, std::uint64_t capacity_bytes, Compression compression)
    : compression_(compression), owns_arena_(false) {
  Init(capacity_bytes);
  arena_ = arena;
}

LocalStore::LocalStore(std::uint64_t capacity_bytes, Compression compression)
    : compression_(compression) {
  Init(capacity_bytes);
  void* arena = mmap(nullptr, arena_bytes_, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (arena == MAP_FAILED) {
    throw std::system_error(errno, std::generic_category(), "mmap of local store arena");
  }
  arena_ = static_cast<std::byte*>(arena);
  // Pages land at random places in the arena, so with 4 KiB mappings nearly every copy
  // misses the TLB. Transparent huge pages (2 MiB) cut that; where THP is off this is a
  // harmless no-op.
  ::madvise(arena_, arena_bytes_, MADV_HUGEPAGE);
}

LocalStore::~LocalStore() {
  if (owns_arena_) munmap(arena_, arena_bytes_);
}

bool LocalStore::Adopt(Slot slot) noexcept {
  const Slot frame = slot >> kFrameShift;
  const unsigned size_class = static_cast<unsigned>((slot >> kClassShift) & kFieldMask);
  const unsigned chunk = static_cast<unsigned>(slot & kFieldMask);
  if (frame >= frame_count_ || chunk > size_class) return false;
  if (compression_ == Compression::kNone && size_class != kRawClass) return false;
  FrameMeta& meta = frames_[frame];
  if (meta.used_mask != 0 && (meta.size_class != size_class || (meta.used_mask & (1u << chunk)))) {
    return false;
  }
  if (meta.used_mask == 0) {
    meta.size_class = static_cast<std::uint8_t>(size_class);
    used_frames_.fetch_add(1, std::memory_order_relaxed);
  }
  meta.used_mask = static_cast<std::uint16_t>(meta.used_mask | (1u << chunk));
  live_pages_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

void LocalStore::FinishAdopt() noexcept {
  for (const std::unique_ptr<Shard>& shard : shards_) {
    shard->next_fresh = shard->end;  // every frame is either live or on the free stack
    shard->free_head = kNoFrame;
    shard->partial_head.fill(kNoFrame);
    // From the top down, so that the lowest free frame is taken first.
    for (std::uint32_t frame = shard->end; frame-- > shard->begin;) {
      FrameMeta& meta = frames_[frame];
      meta.prev = kNoFrame;
      meta.next = kNoFrame;
      if (meta.used_mask == 0) {
        meta.next = shard->free_head;
        shard->free_head = frame;
      } else if (meta.used_mask != FullMask(meta.size_class)) {
        std::uint32_t& head = shard->partial_head[meta.size_class];
        meta.next = head;
        if (head != kNoFrame) frames_[head].prev = frame;
        head = frame;
      }
    }
  }
}

LocalStore::Packed LocalStore::Pack(ConstPageSpan page, std::byte* buffer) const noexcept {
  Packed packed{page.data(), kPageSize, kRawClass};
  if (compression_ != Compression::kLz4) return packed;
  const int n = LZ4_compress_default(
      reinterpret_cast<const char*>(page.data()), reinterpret_cast<char*>(buffer + kLengthBytes),
      static_cast<int>(kPageSize), static_cast<int>(kMaxCompressedBytes));
  if (n > 0) {  // 0: it does not fit a class 1 chunk, so store the page raw
    buffer[0] = static_cast<std::byte>(n & 0xff);
    buffer[1] = static_cast<std::byte>(n >> 8);
    packed.bytes = buffer;
    packed.length = kLengthBytes + static_cast<std::size_t>(n);
    packed.size_class = ClassFor(packed.length);
  }
  return packed;
}

void LocalStore::CopyPacked(const Packed& packed, std::byte* chunk) noexcept {
  if (packed.size_class == kRawClass) {
    CopyPageToFrame(chunk, packed.bytes);
  } else {
    std::memcpy(chunk, packed.bytes, packed.length);
  }
}

std::byte* LocalStore::ChunkAddress(Slot slot) const noexcept {
  const Slot frame = slot >> kFrameShift;
  const unsigned size_class = static_cast<unsigned>((slot >> kClassShift) & kFieldMask);
  const unsigned chunk = static_cast<unsigned>(slot & kFieldMask);
  assert(frame < frame_count_);
  assert(chunk <= size_class);
  return arena_ + frame * kPageSize + chunk * ClassBytes(size_class);
}

int LocalStore::Allocate(unsigned size_class, std::uint64_t hint, Slot* slot) noexcept {
  const std::uint32_t full = FullMask(size_class);
  const std::size_t shard_count = shards_.size();
  const std::size_t first = hint % shard_count;
  for (std::size_t i = 0; i < shard_count; ++i) {
    Shard& shard = *shards_[(first + i) % shard_count];
    std::uint32_t frame;
    unsigned chunk;
    {
      std::lock_guard<std::mutex> lock(shard.mu);
      frame = shard.partial_head[size_class];
      if (frame != kNoFrame) {
        // Take the lowest free chunk of a partly used frame of this class.
        FrameMeta& meta = frames_[frame];
        assert(meta.size_class == size_class && meta.used_mask != 0);
        chunk = static_cast<unsigned>(std::countr_zero(~std::uint32_t{meta.used_mask} & full));
        meta.used_mask = static_cast<std::uint16_t>(meta.used_mask | (1u << chunk));
        if (meta.used_mask == full) {  // now full: leave the partial list
          shard.partial_head[size_class] = meta.next;
          if (meta.next != kNoFrame) frames_[meta.next].prev = kNoFrame;
          meta.next = kNoFrame;
        }
      } else {
        // Start a fresh frame: a freed one first, else one never used.
        if (shard.free_head != kNoFrame) {
          frame = shard.free_head;
          shard.free_head = frames_[frame].next;
        } else if (shard.next_fresh < shard.end) {
          frame = shard.next_fresh++;
        } else {
          continue;  // this shard is full; try the next one
        }
        FrameMeta& meta = frames_[frame];
        meta.size_class = static_cast<std::uint8_t>(size_class);
        meta.used_mask = 1;
        meta.prev = kNoFrame;
        meta.next = kNoFrame;
        chunk = 0;
        if (full != 1) {  // room left: join the partial list
          meta.next = shard.partial_head[size_class];
          if (meta.next != kNoFrame) frames_[meta.next].prev = frame;
          shard.partial_head[size_class] = frame;
        }
        used_frames_.fetch_add(1, std::memory_order_relaxed);
      }
    }
    live_pages_.fetch_add(1, std::memory_order_relaxed);
    *slot = MakeSlot(frame, size_class, chunk);
    return 0;
  }
  return -ENOSPC;
}

int LocalStore::Write(ConstPageSpan page, std::uint64_t hint, Slot* slot) noexcept {
  assert(slot != nullptr);
  // Compress before taking any lock; the chunk is the caller's alone once allocated.
  alignas(8) std::byte buffer[kLengthBytes + kMaxCompressedBytes];
  const Packed packed = Pack(page, buffer);
  const int rc = Allocate(packed.size_class, hint, slot);
  if (rc != 0) return rc;
  CopyPacked(packed, ChunkAddress(*slot));
  return 0;
}

int LocalStore::ReserveFrame(std::uint64_t hint, Slot* slot, std::byte** frame) noexcept {
  const int rc = Allocate(kRawClass, hint, slot);
  if (rc != 0) return rc;
  *frame = ChunkAddress(*slot);
  return 0;
}

int LocalStore::Rewrite(Slot slot, ConstPageSpan page, std::uint64_t hint, Slot* placed,
                        bool* keeps_old) noexcept {
  alignas(8) std::byte buffer[kLengthBytes + kMaxCompressedBytes];
  const Packed packed = Pack(page, buffer);
  const unsigned old_class = static_cast<unsigned>((slot >> kClassShift) & kFieldMask);
  if (packed.size_class == old_class) {
    // Same chunk size: overwrite in place, no allocator lock at all.
    CopyPacked(packed, ChunkAddress(slot));
    *placed = slot;
    *keeps_old = false;
    return 0;
  }
  const int rc = Allocate(packed.size_class, hint, placed);
  if (rc == 0) {
    CopyPacked(packed, ChunkAddress(*placed));
    *keeps_old = true;
    return 0;
  }
  // No room for a chunk of the new size. Contents that fit the old chunk go there: a raw
  // frame takes the page raw, a smaller packed page fits a larger chunk (its length prefix
  // says how much of the chunk it uses). A chunk alone in its frame makes the frame a raw
  // one, which takes the page raw. Either way the page stays in its own room, which no
  // other page can take meanwhile (docs/restart.md).
  if (old_class == kRawClass) {
    CopyPageToFrame(ChunkAddress(slot), page.data());
    *placed = slot;
  } else if (packed.size_class != kRawClass && packed.length <= ClassBytes(old_class)) {
    CopyPacked(packed, ChunkAddress(slot));
    *placed = slot;
  } else if (MakeLoneChunkRaw(slot, placed)) {
    CopyPageToFrame(ChunkAddress(*placed), page.data());
  } else {
    return rc;
  }
  *keeps_old = false;
  return 0;
}

int LocalStore::Read(Slot slot, PageSpan out) noexcept {
  const unsigned size_class = static_cast<unsigned>((slot >> kClassShift) & kFieldMask);
  const std::byte* src = ChunkAddress(slot);
  if (size_class == kRawClass) {
    std::memcpy(out.data(), src, kPageSize);
    return 0;
  }
  const std::size_t n = std::to_integer<std::size_t>(src[0]) | std::to_integer<std::size_t>(src[1])
                                                                   << 8;
  if (n == 0 || n > ClassBytes(size_class) - kLengthBytes) return -EIO;
  const int got = LZ4_decompress_safe(reinterpret_cast<const char*>(src + kLengthBytes),
                                      reinterpret_cast<char*>(out.data()), static_cast<int>(n),
                                      static_cast<int>(kPageSize));
  return got == static_cast<int>(kPageSize) ? 0 : -EIO;
}

LocalStore::Shard& LocalStore::ShardOf(std::uint32_t frame) noexcept {
  // Shards hold frame_count_ / shard_count frames each; the last one also the remainder.
  const std::uint32_t shard_count = static_cast<std::uint32_t>(shards_.size());
  const std::uint32_t shard_index = std::min(frame / (frame_count_ / shard_count), shard_count - 1);
  Shard& shard = *shards_[shard_index];
  assert(frame >= shard.begin && frame < shard.end);
  return shard;
}

bool LocalStore::MakeLoneChunkRaw(Slot slot, Slot* placed) noexcept {
  const auto frame = static_cast<std::uint32_t>(slot >> kFrameShift);
  const unsigned old_class = static_cast<unsigned>((slot >> kClassShift) & kFieldMask);
  const unsigned chunk = static_cast<unsigned>(slot & kFieldMask);
  Shard& shard = ShardOf(frame);
  std::lock_guard<std::mutex> lock(shard.mu);
  FrameMeta& meta = frames_[frame];
  assert(meta.size_class == old_class);
  if (meta.used_mask != (1u << chunk)) return false;  // other pages live there
  if (FullMask(old_class) != 1) {  // a multi-chunk frame with room: leave its partial list
    if (meta.prev != kNoFrame) {
      frames_[meta.prev].next = meta.next;
    } else {
      shard.partial_head[old_class] = meta.next;
    }
    if (meta.next != kNoFrame) frames_[meta.next].prev = meta.prev;
  }
  // A raw frame is full with its one page: it is on no list, and no other page can take it.
  meta.size_class = static_cast<std::uint8_t>(kRawClass);
  meta.used_mask = 1;
  meta.prev = kNoFrame;
  meta.next = kNoFrame;
  *placed = MakeSlot(frame, kRawClass, 0);
  return true;
}

void LocalStore::Discard(Slot slot) noexcept {
  const Slot frame_index = slot >> kFrameShift;
  const unsigned size_class = static_cast<unsigned>((slot >> kClassShift) & kFieldMask);
  const unsigned chunk = static_cast<unsigned>(slot & kFieldMask);
  assert(frame_index < frame_count_);
  assert(chunk <= size_class);
  const auto frame = static_cast<std::uint32_t>(frame_index);
  const std::uint32_t full = FullMask(size_class);

  Shard& shard = ShardOf(frame);
  {
    std::lock_guard<std::mutex> lock(shard.mu);
    FrameMeta& meta = frames_[frame];
    assert(meta.size_class == size_class);
    assert(meta.used_mask & (1u << chunk));
    const bool was_full = meta.used_mask == full;
    meta.used_mask = static_cast<std::uint16_t>(meta.used_mask & ~(1u << chunk));
    if (meta.used_mask == 0) {
      if (!was_full) {  // a multi-chunk frame with room is on its partial list: unlink it
        if (meta.prev != kNoFrame) {
          frames_[meta.prev].next = meta.next;
        } else {
          shard.partial_head[size_class] = meta.next;
        }
        if (meta.next != kNoFrame) frames_[meta.next].prev = meta.prev;
      }
      meta.prev = kNoFrame;
      meta.next = shard.free_head;
      shard.free_head = frame;
      used_frames_.fetch_sub(1, std::memory_order_relaxed);
    } else if (was_full) {  // it has room again: join the partial list
      meta.prev = kNoFrame;
      meta.next = shard.partial_head[size_class];
      if (meta.next != kNoFrame) frames_[meta.next].prev = frame;
      shard.partial_head[size_class] = frame;
    }
  }
  live_pages_.fetch_sub(1, std::memory_order_relaxed);
}

StoreStats LocalStore::Stats() const noexcept {
  StoreStats stats;
  stats.pages = live_pages_.load(std::memory_order_relaxed);
  stats.used_bytes = used_frames_.load(std::memory_order_relaxed) * kPageSize;
  stats.total_bytes = arena_bytes_;
  return stats;
}

}  // namespace memlend
