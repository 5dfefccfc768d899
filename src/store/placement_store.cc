#include "store/placement_store.h"

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <new>

#include "common/log.h"
#include "common/thread_name.h"

namespace memlend {
namespace {

constexpr std::size_t kWindow = 256;  // pages per peer store batch (peer::kWindow)
constexpr auto kRebuildInterval = std::chrono::milliseconds(100);

}  // namespace

PlacementStore::PlacementStore(std::unique_ptr<peer::PeerStore> peers, PageStore* disk,
                               unsigned rebuild_rate)
    : peers_(std::move(peers)),
      disk_(disk),
      rebuild_rate_(std::max(rebuild_rate, 10u)),
      chunks_(new std::atomic<Record*>[kMaxChunks]),
      rebuild_buffer_(new std::byte[kWindow * kPageSize]) {
  assert(peers_ != nullptr);
  for (std::size_t i = 0; i < kMaxChunks; ++i) chunks_[i].store(nullptr, std::memory_order_relaxed);
}

PlacementStore::~PlacementStore() {
  {
    std::lock_guard lock(rebuilder_mu_);
    stopping_ = true;
  }
  rebuilder_cv_.notify_all();
  if (rebuilder_.joinable()) rebuilder_.join();
  if (!chunk_source_) {
    for (std::size_t i = 0; i < chunk_count_; ++i) delete[] chunks_[i].load(std::memory_order_relaxed);
  }
}

void PlacementStore::AdoptChunk(std::size_t chunk, void* memory) {
  assert(chunk < kMaxChunks);
  chunks_[chunk].store(static_cast<Record*>(memory), std::memory_order_release);
  chunk_count_ = std::max(chunk_count_, chunk + 1);
}

std::uint64_t PlacementStore::Recover(const std::vector<bool>& referenced,
                                      const std::function<bool(Slot)>& adopt_disk) {
  std::uint64_t kept = 0;
  free_ids_.clear();
  free_ids_.reserve(chunk_count_ * kChunkRecords);
  for (std::size_t chunk = chunk_count_; chunk-- > 0;) {
    Record* records = chunks_[chunk].load(std::memory_order_relaxed);
    for (std::size_t i = kChunkRecords; i-- > 0;) {
      const auto id = static_cast<std::uint32_t>((chunk << kChunkShift) | i);
      if (id == 0) continue;  // never handed out
      Record& record = records[i];
      if (record.wanted != 0 && record.lost && id < referenced.size() && referenced[id]) {
        lost_.fetch_add(1, std::memory_order_relaxed);  // still named: kept, as lost
        ++kept;
        continue;
      }
      const bool live = record.wanted != 0 && id < referenced.size() && referenced[id];
      if (!live) {
        new (&record) Record;
        free_ids_.push_back(id);
        continue;
      }
      // Its copies: those of sessions the peer store takes up again stay.
      std::uint8_t count = 0;
      for (std::uint8_t c = 0; c < record.count && c < kMaxCopies; ++c) {
        if (peers_->AdoptSlot(record.copies[c], id)) record.copies[count++] = record.copies[c];
      }
      record.count = count;
      if (record.disk != kNoDisk && !adopt_disk(record.disk)) record.disk = kNoDisk;
      record.pins = 0;
      record.discarded = false;
      ++record.version;
      if (record.count == 0 && record.disk == kNoDisk) {
        record.lost = true;
        lost_.fetch_add(1, std::memory_order_relaxed);
        ++kept;
        continue;
      }
      pages_.fetch_add(1, std::memory_order_relaxed);
      copies_.fetch_add(record.count, std::memory_order_relaxed);
      if (record.disk != kNoDisk) disk_copies_.fetch_add(1, std::memory_order_relaxed);
      if (Degraded(record)) {
        degraded_.fetch_add(1, std::memory_order_relaxed);
        rebuild_queue_.push_back(id);
      }
      ++kept;
    }
  }
  return kept;
}

void PlacementStore::EnableSealing(std::unique_ptr<PageSealer> sealer, std::uint64_t node_id,
                                   std::atomic<std::uint64_t>* counter) {
  sealed_buffer_.reset(new std::byte[kWindow * kPageSize]);
  sealer_ = std::move(sealer);
  node_id_ = node_id;
  seal_counter_ = counter;
}

bool PlacementStore::OpenCopy(std::uint32_t id, const Seal& seal, Slot copy,
                              PageSpan page) noexcept {
  if (!sealer_) return true;
  const int rc = sealer_->Open(page, page, {node_id_, id, seal.counter}, seal.tag);
  if (rc == 0) return true;
  if (rc != -EBADMSG) return false;  // a local failure (no memory): no one to blame
  {
    // A read that took no pin (the rebuilder's) may have met a slot freed and reused since:
    // blame the peer only if the record is still the one the seal came from.
    Record* record = Find(id);
    std::lock_guard lock(LockFor(id));
    if (record == nullptr || record->version != seal.version || record->wanted == 0) return false;
  }
  const std::uint64_t failures = integrity_failures_.fetch_add(1, std::memory_order_relaxed) + 1;
  peers_->NoteIntegrityFailure(copy);
  {
    std::lock_guard lock(bad_mu_);
    try {
      if (bad_copies_.size() < kMaxBadCopies) bad_copies_.push_back({id, copy, seal.version});
    } catch (const std::bad_alloc&) {
      // It is dropped at the next failure instead.
    }
  }
  if ((failures & (failures - 1)) == 0) {  // the 1st, 2nd, 4th, 8th...
    LogError("peer %s: a page it returned failed its integrity check (%llu so far); read "
             "from another copy",
             peers_->AddressOf(copy).c_str(), static_cast<unsigned long long>(failures));
  }
  return false;
}

bool PlacementStore::SealInto(std::uint32_t id, std::uint64_t counter, ConstPageSpan page,
                              PageSpan out, PageSealer::Tag* tag) const noexcept {
  return sealer_->Seal(page, out, {node_id_, id, counter}, tag);
}

void PlacementStore::Start() {
  if (rebuilder_.joinable()) return;
  rebuilder_ = std::thread([this] {
    SetThreadName("ml-rebuild");
    RebuilderLoop();
  });
}

PlacementStore::Record* PlacementStore::Find(std::uint32_t id) const noexcept {
  const std::size_t chunk = id >> kChunkShift;
  if (chunk >= kMaxChunks) return nullptr;
  Record* records = chunks_[chunk].load(std::memory_order_acquire);
  return records == nullptr ? nullptr : &records[id & (kChunkRecords - 1)];
}

bool PlacementStore::Allocate(std::uint32_t* id) noexcept {
  std::lock_guard lock(table_mu_);
  if (free_ids_.empty()) {
    if (chunk_count_ == kMaxChunks) return false;
    Record* records = nullptr;
    if (chunk_source_) {
      void* memory = chunk_source_(chunk_count_);
      if (memory == nullptr) return false;
      records = static_cast<Record*>(memory);
      for (std::size_t i = 0; i < kChunkRecords; ++i) new (&records[i]) Record;  // all free
    } else {
      records = new (std::nothrow) Record[kChunkRecords];
    }
    if (records == nullptr) return false;
    try {
      free_ids_.reserve(free_ids_.size() + kChunkRecords);
    } catch (const std::bad_alloc&) {
      if (!chunk_source_) delete[] records;
      return false;  // a source's chunk is taken up again by the next call
    }
    const std::size_t chunk = chunk_count_++;
    chunks_[chunk].store(records, std::memory_order_release);
    // Id 0 is never handed out: the peer store's reverse index uses 0 for "no owner".
    for (std::size_t i = kChunkRecords; i-- > (chunk == 0 ? 1 : 0);) {
      free_ids_.push_back(static_cast<std::uint32_t>((chunk << kChunkShift) | i));
    }
  }
  *id = free_ids_.back();
  free_ids_.pop_back();
  return true;
}

void PlacementStore::Free(std::uint32_t id) noexcept {
  std::lock_guard lock(table_mu_);
  free_ids_.push_back(id);  // capacity was reserved when the id's chunk was made
}

void PlacementStore::NoteDegradedLocked(std::uint32_t id, const Record& record) noexcept {
  if (record.lost || !Degraded(record)) return;
  std::lock_guard lock(queue_mu_);
  try {
    rebuild_queue_.push_back(id);
  } catch (const std::bad_alloc&) {
    // It stays degraded until a later event queues it again.
  }
}

void PlacementStore::AfterChangeLocked(std::uint32_t id, const Record& record,
                                       bool was_degraded) noexcept {
  const bool degraded = Degraded(record);
  if (was_degraded && !degraded) degraded_.fetch_sub(1, std::memory_order_relaxed);
  if (!was_degraded && degraded) degraded_.fetch_add(1, std::memory_order_relaxed);
  if (degraded) NoteDegradedLocked(id, record);
}

bool PlacementStore::DiskHasRoom() const noexcept {
  if (disk_ == nullptr) return false;
  const StoreStats stats = disk_->Stats();
  return stats.total_bytes == 0 || stats.used_bytes + kPageSize <= stats.total_bytes;
}

void PlacementStore::WriteBatchCopies(std::span<const std::byte* const> pages,
                                      std::span<const std::uint64_t> hints, Redundancy redundancy,
                                      std::span<Slot> slots, std::span<int> results) noexcept {
  const unsigned copies = std::clamp(redundancy.copies, 1u, kMaxCopies);
  const bool want_disk = redundancy.disk && disk_ != nullptr;
  // Every copy of a window's pages fits one peer store batch.
  const std::size_t window = kWindow / copies;
  for (std::size_t base = 0; base < pages.size(); base += window) {
    const std::size_t count = std::min(window, pages.size() - base);
    std::uint32_t ids[kWindow];
    bool have_id[kWindow];
    Slot got[kWindow][kMaxCopies];
    unsigned got_count[kWindow] = {};
    Slot disk_slots[kWindow];
    // Sealing: each page goes out as ciphertext from this thread's window buffer.
    const std::byte* outgoing[kWindow];
    Seal seals[kWindow];
    thread_local std::unique_ptr<std::byte[]> sealed;
    if (sealer_ && !sealed) sealed.reset(new (std::nothrow) std::byte[kWindow * kPageSize]);
    for (std::size_t i = 0; i < count; ++i) {
      have_id[i] = Allocate(&ids[i]);
      outgoing[i] = pages[base + i];
      if (have_id[i] && sealer_) {
        seals[i].counter = seal_counter_->fetch_add(1, std::memory_order_relaxed) + 1;
        std::byte* into = sealed ? sealed.get() + i * kPageSize : nullptr;
        if (into == nullptr ||
            !SealInto(ids[i], seals[i].counter, ConstPageSpan(pages[base + i], kPageSize),
                      PageSpan(into, kPageSize), &seals[i].tag)) {
          Free(ids[i]);  // out of memory: the caller places the page elsewhere
          have_id[i] = false;
        }
        outgoing[i] = into;
      }
      // The disk copy first: once it is written the page can no longer be lost.
      disk_slots[i] = kNoDisk;
      if (have_id[i] && want_disk &&
          disk_->Write(ConstPageSpan(pages[base + i], kPageSize), hints[base + i],
                       &disk_slots[i]) != 0) {
        disk_slots[i] = kNoDisk;
      }
    }

    // All copies in one peer store batch, so that they travel to their peers at once: the
    // peers are chosen first (distinct for each page), and each entry may go only to its own.
    const std::byte* batch_pages[kWindow];
    std::uint64_t batch_hints[kWindow];
    std::uint32_t batch_owners[kWindow];
    peer::PeerStore::PeerMask batch_only[kWindow];
    std::size_t batch_index[kWindow];
    std::size_t n = 0;
    for (std::size_t i = 0; i < count; ++i) {
      if (!have_id[i]) continue;
      peer::PeerStore::PeerMask chosen;
      for (unsigned k = 0; k < copies; ++k) {
        const int peer = peers_->PickPeer(hints[base + i] + k, &chosen);
        if (peer < 0) break;  // no other peer has room: fewer copies (degraded)
        chosen.set(static_cast<std::size_t>(peer));
        batch_pages[n] = outgoing[i];
        batch_hints[n] = hints[base + i] + k;
        batch_owners[n] = ids[i];
        batch_only[n].set();
        batch_only[n].reset(static_cast<std::size_t>(peer));  // this peer and no other
        batch_index[n++] = i;
      }
    }
    Slot batch_slots[kWindow];
    int batch_results[kWindow];
    peers_->WriteBatchFor(std::span(batch_pages, n), std::span(batch_hints, n),
                          std::span(batch_owners, n), std::span(batch_only, n),
                          std::span(batch_slots, n), std::span(batch_results, n));
    for (std::size_t j = 0; j < n; ++j) {
      if (batch_results[j] != 0) continue;
      const std::size_t i = batch_index[j];
      got[i][got_count[i]++] = batch_slots[j];
    }

    for (std::size_t i = 0; i < count; ++i) {
      if (!have_id[i] || (got_count[i] == 0 && disk_slots[i] == kNoDisk)) {
        if (have_id[i]) Free(ids[i]);
        results[base + i] = -ENOSPC;  // the caller places it elsewhere
        continue;
      }
      Record& record = *Find(ids[i]);
      std::lock_guard lock(LockFor(ids[i]));
      ++record.version;
      record.count = static_cast<std::uint8_t>(got_count[i]);
      record.wanted = static_cast<std::uint8_t>(copies);
      record.want_disk = want_disk;
      record.disk = disk_slots[i];
      record.pins = 0;
      record.discarded = false;
      record.lost = false;
      record.seal = seals[i].counter;
      record.tag = seals[i].tag;
      std::copy(got[i], got[i] + got_count[i], record.copies);
      pages_.fetch_add(1, std::memory_order_relaxed);
      copies_.fetch_add(got_count[i], std::memory_order_relaxed);
      if (record.disk != kNoDisk) disk_copies_.fetch_add(1, std::memory_order_relaxed);
      AfterChangeLocked(ids[i], record, /*was_degraded=*/false);
      slots[base + i] = ids[i];
      results[base + i] = 0;
    }
  }
}

int PlacementStore::Write(ConstPageSpan page, std::uint64_t hint, Slot* slot) noexcept {
  const std::byte* pages[1] = {page.data()};
  int result = -ENOSPC;
  WriteBatchCopies(pages, std::span(&hint, 1), Redundancy{}, std::span(slot, 1),
                   std::span(&result, 1));
  return result;
}

int PlacementStore::ReadCopies(std::uint32_t id, const Seal& seal, const Slot* copies,
                               unsigned count, PageSpan out) noexcept {
  // Ready peers first, in the record's order; then the rest.
  Slot order[kMaxCopies];
  unsigned n = 0;
  for (unsigned c = 0; c < count; ++c) {
    if (peers_->SlotReady(copies[c])) order[n++] = copies[c];
  }
  for (unsigned c = 0; c < count; ++c) {
    if (!peers_->SlotReady(copies[c])) order[n++] = copies[c];
  }
  int overdue = -1;
  for (unsigned c = 0; c < n; ++c) {
    const int rc = peers_->ReadOnce(order[c], out);
    if (rc == 0 && OpenCopy(id, seal, order[c], out)) return 0;
    if (rc == -ETIMEDOUT && overdue < 0) overdue = static_cast<int>(c);
  }
  // No copy answered in time: ask the first overdue one again until its peer answers or is
  // taken for down.
  if (overdue >= 0) {
    return peers_->Read(order[overdue], out) == 0 && OpenCopy(id, seal, order[overdue], out)
               ? 0
               : -EIO;
  }
  // A copy on a peer whose connection broke is read once its session is resumed.
  for (unsigned c = 0; c < n; ++c) {
    if (peers_->AwaitResume(order[c]) && peers_->ReadOnce(order[c], out) == 0 &&
        OpenCopy(id, seal, order[c], out)) {
      return 0;
    }
  }
  return -EIO;
}

int PlacementStore::ReadRecord(std::uint32_t id, const Seal& seal, const Slot* copies,
                               unsigned count, Slot disk, PageSpan out) noexcept {
  if (disk != kNoDisk) {
    for (unsigned c = 0; c < count; ++c) {
      if (peers_->SlotReady(copies[c]) && peers_->ReadOnce(copies[c], out) == 0 &&
          OpenCopy(id, seal, copies[c], out)) {
        return 0;
      }
    }
    if (disk_->Read(disk, out) == 0) return 0;  // plaintext: it never left the host
  }
  return ReadCopies(id, seal, copies, count, out);
}

int PlacementStore::Read(Slot slot, PageSpan out) noexcept {
  const auto id = static_cast<std::uint32_t>(slot);
  Record* record = Find(id);
  if (record == nullptr) return -EIO;
  Slot copies[kMaxCopies];
  unsigned count;
  Slot disk;
  Seal seal;
  {
    std::lock_guard lock(LockFor(id));
    if (record->wanted == 0 || record->lost) return -EIO;
    count = record->count;
    disk = record->disk;
    seal = {record->seal, record->tag, record->version};
    std::copy(record->copies, record->copies + count, copies);
  }
  return ReadRecord(id, seal, copies, count, disk, out);
}

void PlacementStore::ReadBatch(std::span<const Slot> slots, std::span<std::byte* const> outs,
                               std::span<int> results) noexcept {
  for (std::size_t base = 0; base < slots.size(); base += kWindow) {
    const std::size_t count = std::min(kWindow, slots.size() - base);
    Slot copies[kWindow][kMaxCopies];
    unsigned counts[kWindow];
    Slot disks[kWindow];
    Seal seals[kWindow];
    bool live[kWindow];
    Slot first[kWindow];
    std::byte* first_outs[kWindow];
    int first_results[kWindow];
    std::size_t first_index[kWindow];
    std::size_t n = 0;
    for (std::size_t i = 0; i < count; ++i) {
      const auto id = static_cast<std::uint32_t>(slots[base + i]);
      Record* record = Find(id);
      counts[i] = 0;
      live[i] = false;
      results[base + i] = -EIO;
      if (record == nullptr) continue;
      {
        std::lock_guard lock(LockFor(id));
        if (record->wanted == 0 || record->lost) continue;
        live[i] = true;
        counts[i] = record->count;
        disks[i] = record->disk;
        seals[i] = {record->seal, record->tag, record->version};
        std::copy(record->copies, record->copies + counts[i], copies[i]);
      }
      // The batch asks each page's first ready copy; the rest are for a retry below.
      unsigned pick = 0;
      while (pick < counts[i] && !peers_->SlotReady(copies[i][pick])) ++pick;
      if (pick == counts[i]) continue;  // none ready: read below, copy by copy
      first[n] = copies[i][pick];
      first_outs[n] = outs[base + i];
      first_index[n++] = i;
    }
    peers_->ReadBatchOnce(std::span(first, n), std::span(first_outs, n),
                          std::span(first_results, n));
    for (std::size_t j = 0; j < n; ++j) {
      const std::size_t i = first_index[j];
      const auto id = static_cast<std::uint32_t>(slots[base + i]);
      results[base + i] =
          first_results[j] == 0 &&
                  OpenCopy(id, seals[i], first[j], PageSpan(first_outs[j], kPageSize))
              ? 0
              : (first_results[j] == 0 ? -EIO : first_results[j]);
    }
    for (std::size_t i = 0; i < count; ++i) {
      if (results[base + i] == 0 || !live[i]) continue;
      const auto id = static_cast<std::uint32_t>(slots[base + i]);
      results[base + i] = ReadRecord(id, seals[i], copies[i], counts[i], disks[i],
                                     PageSpan(outs[base + i], kPageSize));
    }
  }
}

void PlacementStore::Pin(Slot slot) noexcept {
  const auto id = static_cast<std::uint32_t>(slot);
  Record* record = Find(id);
  if (record == nullptr) return;
  std::lock_guard lock(LockFor(id));
  if (record->wanted != 0) ++record->pins;
}

void PlacementStore::Unpin(Slot slot) noexcept {
  const auto id = static_cast<std::uint32_t>(slot);
  Record* record = Find(id);
  if (record == nullptr) return;
  std::lock_guard lock(LockFor(id));
  if (record->wanted == 0 || record->pins == 0) return;
  if (--record->pins == 0 && record->discarded) ReleaseLocked(id, *record);
}

bool PlacementStore::Holds(Slot slot) const noexcept {
  const auto id = static_cast<std::uint32_t>(slot);
  Record* record = Find(id);
  if (record == nullptr) return false;
  std::lock_guard lock(LockFor(id));
  if (record->wanted == 0 || record->lost) return false;
  if (record->disk != kNoDisk) return true;
  // A copy counts only on a session that still lives: the rebuilder marks a record lost a
  // little after its lenders went down, and a page in RAM must not be dropped meanwhile.
  for (unsigned c = 0; c < record->count; ++c) {
    if (!peers_->SlotGone(record->copies[c])) return true;
  }
  return false;
}

void PlacementStore::Discard(Slot slot) noexcept {
  const auto id = static_cast<std::uint32_t>(slot);
  Record* record = Find(id);
  if (record == nullptr) return;
  std::lock_guard lock(LockFor(id));
  if (record->wanted == 0) return;
  if (record->pins > 0) {
    record->discarded = true;  // a batched read still needs it: release at the last Unpin
    return;
  }
  ReleaseLocked(id, *record);
}

void PlacementStore::ReleaseLocked(std::uint32_t id, Record& record) noexcept {
  // A copy of an ended session is gone already; discarding it settles the peer's count of
  // lost pages.
  for (unsigned c = 0; c < record.count; ++c) peers_->Discard(record.copies[c]);
  if (record.lost) {
    lost_.fetch_sub(1, std::memory_order_relaxed);
  } else {
    pages_.fetch_sub(1, std::memory_order_relaxed);
    copies_.fetch_sub(record.count, std::memory_order_relaxed);
    if (Degraded(record)) degraded_.fetch_sub(1, std::memory_order_relaxed);
  }
  if (record.disk != kNoDisk) {
    disk_->Discard(record.disk);
    disk_copies_.fetch_sub(1, std::memory_order_relaxed);
  }
  ++record.version;
  record.wanted = 0;
  record.want_disk = false;
  record.disk = kNoDisk;
  record.count = 0;
  record.pins = 0;
  record.discarded = false;
  record.lost = false;
  Free(id);
}

StoreStats PlacementStore::Stats() const noexcept {
  StoreStats stats = peers_->Stats();
  stats.pages = pages_.load(std::memory_order_relaxed);
  return stats;
}

PlacementStats PlacementStore::Placements() const noexcept {
  PlacementStats stats;
  stats.pages = pages_.load(std::memory_order_relaxed);
  stats.copies = copies_.load(std::memory_order_relaxed);
  stats.degraded = degraded_.load(std::memory_order_relaxed);
  stats.lost = lost_.load(std::memory_order_relaxed);
  stats.rebuilt = rebuilt_.load(std::memory_order_relaxed);
  stats.moved = moved_.load(std::memory_order_relaxed);
  stats.disk_copies = disk_copies_.load(std::memory_order_relaxed);
  stats.integrity_failures = integrity_failures_.load(std::memory_order_relaxed);
  stats.copies_per_s = copies_per_s_.load(std::memory_order_relaxed);
  if (stats.degraded > 0) {
    stats.eta_s = stats.copies_per_s >= 0.5 ? static_cast<double>(stats.degraded) / stats.copies_per_s
                                            : -1;
  }
  return stats;
}

void PlacementStore::NotePace(std::uint64_t made, double seconds) noexcept {
  if (seconds <= 0) return;
  // A second of rounds that made nothing means no progress now (no peer with room, say),
  // whatever the average of the burst before says.
  idle_rounds_ = made == 0 ? idle_rounds_ + 1 : 0;
  if (idle_rounds_ * kRebuildInterval >= std::chrono::seconds(1)) {
    copies_per_s_.store(0, std::memory_order_relaxed);
    return;
  }
  // An average over about two seconds of rounds: steady enough to read, quick to follow.
  const double weight = std::min(1.0, seconds / 2.0);
  const double pace = copies_per_s_.load(std::memory_order_relaxed);
  const double next = pace + weight * (static_cast<double>(made) / seconds - pace);
  copies_per_s_.store(next < 0.01 ? 0 : next, std::memory_order_relaxed);
}

bool PlacementStore::DropCopyLocked(std::uint32_t id, Record& record, Slot* at) noexcept {
  Slot* end = record.copies + record.count;
  const Slot slot = *at;
  ++record.version;
  const bool was_degraded = Degraded(record);
  if (record.count == 1 && record.disk == kNoDisk) {
    // The last copy: the page is lost. The record keeps the copy, so that discarding the
    // page settles the peer's count of lost pages.
    record.lost = true;
    if (was_degraded) degraded_.fetch_sub(1, std::memory_order_relaxed);
    pages_.fetch_sub(1, std::memory_order_relaxed);
    copies_.fetch_sub(1, std::memory_order_relaxed);
    lost_.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  std::copy(at + 1, end, at);
  --record.count;
  copies_.fetch_sub(1, std::memory_order_relaxed);
  peers_->Discard(slot);  // settles the peer's count of lost copies
  AfterChangeLocked(id, record, was_degraded);
  return false;
}

void PlacementStore::DropLostCopies() noexcept {
  std::vector<peer::PeerStore::LostCopy> lost;
  try {
    lost = peers_->TakeLostCopies();
  } catch (const std::bad_alloc&) {
    return;
  }
  // Copies that failed their integrity check go the same way, if their record has not
  // changed since: dropped, and made again from the others.
  std::vector<BadCopy> bad;
  {
    std::lock_guard lock(bad_mu_);
    bad.swap(bad_copies_);
  }
  std::uint64_t pages_lost = 0;
  const auto drop = [&](std::uint32_t owner, Slot slot, const std::uint32_t* version) {
    Record* record = Find(owner);
    if (record == nullptr) return;
    std::lock_guard lock(LockFor(owner));
    if (record->wanted == 0 || record->lost) return;
    if (version != nullptr && record->version != *version) return;
    Slot* end = record->copies + record->count;
    Slot* at = std::find(record->copies, end, slot);
    if (at == end) return;  // a slot reserved for a write that never completed
    if (DropCopyLocked(owner, *record, at)) ++pages_lost;
  };
  for (const peer::PeerStore::LostCopy& copy : lost) drop(copy.owner, copy.slot, nullptr);
  for (const BadCopy& copy : bad) drop(copy.owner, copy.slot, &copy.version);
  if (pages_lost > 0) {
    LogError("remote tier: %llu page(s) lost: every copy was on peers that went down, or failed "
             "its integrity check; reading them fails until they are rewritten or trimmed",
             static_cast<unsigned long long>(pages_lost));
  }
}

std::size_t PlacementStore::RebuildSome(std::size_t budget) noexcept {
  std::size_t tried = 0;
  while (tried < budget) {
    // A batch of degraded records, each with a snapshot of its copies and version.
    std::uint32_t ids[kWindow];
    std::uint32_t versions[kWindow];
    Slot copies[kWindow][kMaxCopies];
    unsigned counts[kWindow];
    Slot disks[kWindow];
    Seal seals[kWindow];
    bool need_peer[kWindow];
    bool need_disk[kWindow];
    std::size_t n = 0;
    {
      std::unique_lock queue_lock(queue_mu_);
      const std::size_t take = std::min({kWindow, budget - tried, rebuild_queue_.size()});
      for (std::size_t i = 0; i < take; ++i) {
        ids[n++] = rebuild_queue_.front();
        rebuild_queue_.pop_front();
      }
    }
    if (n == 0) break;
    tried += n;
    const bool disk_room = DiskHasRoom();
    bool no_room = false;
    std::size_t kept = 0;
    for (std::size_t i = 0; i < n; ++i) {
      Record* record = Find(ids[i]);
      if (record == nullptr) continue;
      std::lock_guard lock(LockFor(ids[i]));
      if (record->wanted == 0 || record->lost || !Degraded(*record)) continue;
      const bool peer = record->count < record->wanted;
      const bool disk = record->want_disk && record->disk == kNoDisk && disk_room;
      if (!peer && !disk) {
        // Short only of a disk copy, and the disk is full: again when it has room (the
        // round goes on for pages short of a peer copy).
        NoteDegradedLocked(ids[i], *record);
        continue;
      }
      ids[kept] = ids[i];
      versions[kept] = record->version;
      counts[kept] = record->count;
      disks[kept] = record->disk;
      seals[kept] = {record->seal, record->tag, record->version};
      need_peer[kept] = peer;
      need_disk[kept] = disk;
      std::copy(record->copies, record->copies + record->count, copies[kept]);
      ++kept;
    }
    if (kept == 0) continue;
    // Read each page from a live copy (no lock held), then write the copies it lacks.
    std::byte* const buffer = rebuild_buffer_.get();
    const std::byte* pages[kWindow];
    std::uint64_t hints[kWindow];
    peer::PeerStore::PeerMask excludes[kWindow];
    std::uint32_t owners[kWindow];
    std::size_t index[kWindow];
    bool have_page[kWindow];
    Slot new_disk[kWindow];
    std::size_t m = 0;
    for (std::size_t i = 0; i < kept; ++i) {
      std::byte* page = buffer + i * kPageSize;
      new_disk[i] = kNoDisk;
      have_page[i] = ReadRecord(ids[i], seals[i], copies[i], counts[i], disks[i],
                                PageSpan(page, kPageSize)) == 0;
      if (!have_page[i]) {
        // No copy answered now (a peer late, say): again in a later round.
        Record& record = *Find(ids[i]);
        std::lock_guard lock(LockFor(ids[i]));
        if (record.version == versions[i]) NoteDegradedLocked(ids[i], record);
        continue;
      }
      if (need_disk[i] && disk_->Write(ConstPageSpan(page, kPageSize), ids[i], &new_disk[i]) != 0) {
        new_disk[i] = kNoDisk;  // the disk filled meanwhile: the commit below queues it again
      }
      if (!need_peer[i]) continue;
      pages[m] = page;
      if (sealer_) {
        // Sealed again under the record's own counter: the same bytes and tag as its other
        // copies, so the record stays as it is (and no nonce covers two plaintexts).
        // Only the very page that was sealed under that counter goes out again (the same
        // tag): a disk copy read unpinned may hold another page by now.
        std::byte* sealed = sealed_buffer_.get() + i * kPageSize;
        PageSealer::Tag tag;
        if (!SealInto(ids[i], seals[i].counter, ConstPageSpan(page, kPageSize),
                      PageSpan(sealed, kPageSize), &tag) ||
            tag != seals[i].tag) {
          continue;
        }
        pages[m] = sealed;
      }
      hints[m] = ids[i];
      owners[m] = ids[i];
      excludes[m].reset();
      for (unsigned c = 0; c < counts[i]; ++c) {
        excludes[m].set(peer::PeerStore::PeerIndexOf(copies[i][c]));
      }
      index[m++] = i;
    }
    Slot placed[kWindow];
    int results[kWindow];
    peers_->WriteBatchFor(std::span(pages, m), std::span(hints, m), std::span(owners, m),
                          std::span(excludes, m), std::span(placed, m), std::span(results, m));
    Slot new_peer[kWindow];
    for (std::size_t i = 0; i < kept; ++i) new_peer[i] = kNoDisk;
    for (std::size_t j = 0; j < m; ++j) {
      if (results[j] == 0) {
        new_peer[index[j]] = placed[j];
      } else {
        no_room = true;
      }
    }
    for (std::size_t i = 0; i < kept; ++i) {
      if (!have_page[i]) continue;
      Record& record = *Find(ids[i]);
      bool peer_used = false;
      bool disk_used = false;
      {
        std::lock_guard lock(LockFor(ids[i]));
        if (record.version == versions[i] && record.wanted != 0 && !record.lost) {
          const bool was_degraded = Degraded(record);
          if (new_peer[i] != kNoDisk && record.count < record.wanted) {
            record.copies[record.count++] = new_peer[i];
            copies_.fetch_add(1, std::memory_order_relaxed);
            rebuilt_.fetch_add(1, std::memory_order_relaxed);
            peer_used = true;
          }
          if (new_disk[i] != kNoDisk && record.disk == kNoDisk) {
            record.disk = new_disk[i];
            disk_copies_.fetch_add(1, std::memory_order_relaxed);
            rebuilt_.fetch_add(1, std::memory_order_relaxed);
            disk_used = true;
          }
          ++record.version;
          AfterChangeLocked(ids[i], record, was_degraded);  // again later if still short
        }
      }
      // What the record did not take: the page changed meanwhile.
      if (new_peer[i] != kNoDisk && !peer_used) peers_->Discard(new_peer[i]);
      if (new_disk[i] != kNoDisk && !disk_used) disk_->Discard(new_disk[i]);
    }
    if (no_room) break;  // no peer (or disk) takes more now: wait for the next round
  }
  return tried;
}

std::size_t PlacementStore::MoveSome(std::size_t budget) noexcept {
  std::vector<peer::PeerStore::LostCopy> leaving;
  try {
    leaving = peers_->CopiesOnDrainingPeers(budget);
  } catch (const std::bad_alloc&) {
    return 0;
  }
  std::size_t moved = 0;
  std::byte* const buffer = rebuild_buffer_.get();
  for (std::size_t base = 0; base < leaving.size(); base += kWindow) {
    const std::size_t count = std::min(kWindow, leaving.size() - base);
    std::uint32_t versions[kWindow];
    Slot others[kWindow][kMaxCopies];
    unsigned other_count[kWindow];
    bool only_copy[kWindow];  // the page has no other copy, on a peer or the disk
    const std::byte* pages[kWindow];      // what goes to a peer (sealed when sealing)
    const std::byte* plaintext[kWindow];  // what goes to the disk
    std::uint64_t hints[kWindow];
    std::uint32_t owners[kWindow];
    peer::PeerStore::PeerMask excludes[kWindow];
    std::size_t index[kWindow];
    std::size_t n = 0;
    for (std::size_t i = 0; i < count; ++i) {
      const peer::PeerStore::LostCopy& copy = leaving[base + i];
      Record* record = Find(copy.owner);
      if (record == nullptr) continue;
      Slot disk;
      Seal seal;
      {
        std::lock_guard lock(LockFor(copy.owner));
        if (record->wanted == 0 || record->lost) continue;
        const Slot* end = record->copies + record->count;
        if (std::find(static_cast<const Slot*>(record->copies), end, copy.slot) == end) continue;
        versions[n] = record->version;
        seal = {record->seal, record->tag, record->version};
        other_count[n] = 0;
        excludes[n].reset();
        for (const Slot* c = record->copies; c != end; ++c) {
          excludes[n].set(peer::PeerStore::PeerIndexOf(*c));
          if (*c != copy.slot) others[n][other_count[n]++] = *c;
        }
        disk = record->disk;
        only_copy[n] = other_count[n] == 0 && disk == kNoDisk;
        // A superpage its lender asked back (the lender stays): another superpage of the
        // same lender will do.
        if (copy.reclaim) excludes[n].reset(peer::PeerStore::PeerIndexOf(copy.slot));
      }
      std::byte* page = buffer + n * kPageSize;
      // From the leaving peer while it answers, else from another copy (opened either way, so
      // a bad copy is never copied).
      const bool from_leaving =
          peers_->ReadOnce(copy.slot, PageSpan(page, kPageSize)) == 0 &&
          OpenCopy(copy.owner, seal, copy.slot, PageSpan(page, kPageSize));
      if (!from_leaving &&
          (only_copy[n] || ReadRecord(copy.owner, seal, others[n], other_count[n], disk,
                                      PageSpan(page, kPageSize)) != 0)) {
        continue;
      }
      pages[n] = page;
      plaintext[n] = page;
      if (sealer_) {
        std::byte* sealed = sealed_buffer_.get() + n * kPageSize;
        PageSealer::Tag tag;
        if (!SealInto(copy.owner, seal.counter, ConstPageSpan(page, kPageSize),
                      PageSpan(sealed, kPageSize), &tag) ||
            tag != seal.tag) {  // not the page sealed under that counter (see RebuildSome)
          continue;
        }
        pages[n] = sealed;
      }
      hints[n] = copy.owner;
      owners[n] = copy.owner;
      index[n++] = base + i;
    }
    Slot placed[kWindow];
    int results[kWindow];
    peers_->WriteBatchFor(std::span(pages, n), std::span(hints, n), std::span(owners, n),
                          std::span(excludes, n), std::span(placed, n), std::span(results, n));
    // A page that is nowhere else and finds no peer with room goes to the disk instead
    // (repatriation), rather than be lost at the lender's deadline.
    Slot to_disk[kWindow];
    for (std::size_t j = 0; j < n; ++j) {
      to_disk[j] = kNoDisk;
      if (results[j] != 0 && only_copy[j] && DiskHasRoom() &&
          disk_->Write(ConstPageSpan(plaintext[j], kPageSize), hints[j], &to_disk[j]) != 0) {
        to_disk[j] = kNoDisk;
      }
    }
    for (std::size_t j = 0; j < n; ++j) {
      const peer::PeerStore::LostCopy& copy = leaving[index[j]];
      Record& record = *Find(copy.owner);
      bool release_old = false;
      bool release_new = results[j] == 0;
      bool release_disk = to_disk[j] != kNoDisk;
      {
        std::lock_guard lock(LockFor(copy.owner));
        Slot* end = record.copies + record.count;
        Slot* at = std::find(record.copies, end, copy.slot);
        if (record.version == versions[j] && record.wanted != 0 && !record.lost && at != end) {
          const bool was_degraded = Degraded(record);
          if (results[j] == 0) {
            *at = placed[j];  // the page now lives there instead
            ++record.version;
            release_old = true;
            release_new = false;
            ++moved;
          } else if (record.count > 1 || record.disk != kNoDisk || to_disk[j] != kNoDisk) {
            // No room for it on another peer: the page keeps its other copies (or the disk
            // copy just written).
            if (to_disk[j] != kNoDisk && record.disk == kNoDisk) {
              record.disk = to_disk[j];
              disk_copies_.fetch_add(1, std::memory_order_relaxed);
              release_disk = false;
              ++moved;
            }
            std::copy(at + 1, end, at);
            --record.count;
            ++record.version;
            copies_.fetch_sub(1, std::memory_order_relaxed);
            AfterChangeLocked(copy.owner, record, was_degraded);
            release_old = true;
          }
        }
      }
      // A reader that took the old copy from the record before the swap may still be reading
      // it: that is safe, because a draining peer gets no new pages, so the freed slot is
      // never reused for another page's bytes (and a later session's slots never match it).
      if (release_old) peers_->Discard(copy.slot);  // its superpage goes back once empty
      if (release_new) peers_->Discard(placed[j]);  // the page changed meanwhile
      if (release_disk) disk_->Discard(to_disk[j]);
    }
  }
  moved_.fetch_add(moved, std::memory_order_relaxed);
  return moved;
}

void PlacementStore::RebuildRound() noexcept {
  DropLostCopies();
  const std::size_t budget =
      std::max<std::size_t>(1, rebuild_rate_ * kRebuildInterval.count() / 1000);
  MoveSome(budget);
  RebuildSome(budget);
}

void PlacementStore::RebuilderLoop() {
  std::unique_lock lock(rebuilder_mu_);
  auto last = std::chrono::steady_clock::now();
  while (!rebuilder_cv_.wait_for(lock, kRebuildInterval, [this] { return stopping_; })) {
    lock.unlock();
    const std::uint64_t before = rebuilt_.load(std::memory_order_relaxed) +
                                 moved_.load(std::memory_order_relaxed);
    RebuildRound();
    const auto now = std::chrono::steady_clock::now();
    NotePace(rebuilt_.load(std::memory_order_relaxed) + moved_.load(std::memory_order_relaxed) -
                 before,
             std::chrono::duration<double>(now - last).count());
    last = now;
    lock.lock();
  }
}

}  // namespace memlend
