#include "store/tiering.h"

#include <cassert>
#include <cerrno>
#include <cstring>

namespace memlend {

Tiering::Tiering(std::unique_ptr<LocalStore> local, std::unique_ptr<DiskStore> disk)
    : local_(std::move(local)), disk_(std::move(disk)) {
  assert(local_ != nullptr);
}

PageStore* Tiering::StoreFor(Tier tier) noexcept {
  switch (tier) {
    case Tier::kLocal: return local_.get();
    case Tier::kDisk: return disk_.get();
    default: return nullptr;
  }
}

int Tiering::Store(ConstPageSpan page, std::uint64_t hint, Location old,
                   Location* placed) noexcept {
  *placed = old;
  Slot slot = 0;
  const bool was_local = old.tier() == Tier::kLocal;
  int rc = was_local ? local_->Rewrite(old.slot(), page, hint, &slot)
                     : local_->Write(page, hint, &slot);
  if (rc == 0) {
    if (!was_local) Release(old);
    *placed = Location(Tier::kLocal, slot);
    return 0;
  }
  if (rc != -ENOSPC) return rc;

  if (was_local) {
    // The store is full and the new contents need a chunk of another size, but this page
    // already holds room in it. Keep a copy of the old
    // contents so that, if another thread takes the freed room first and no tier has
    // room, the page can be put back as it was.
    alignas(64) std::byte saved[kPageSize];
    rc = local_->Read(old.slot(), PageSpan(saved));
    if (rc != 0) return rc;
    local_->Discard(old.slot());
    rc = local_->Write(page, hint, &slot);
    if (rc == 0) {
      *placed = Location(Tier::kLocal, slot);
      return 0;
    }
    if (disk_ && disk_->Write(page, hint, &slot) == 0) {
      *placed = Location(Tier::kDisk, slot);
      return 0;
    }
    // Every tier is full: restore the old copy where it came from.
    if (local_->Write(ConstPageSpan(saved), hint, &slot) != 0) {
      // The freed room went to a concurrent writer and the disk is full too; the page
      // cannot be kept. Callers treat the page as unwritten (reads return zeros).
      *placed = Location();
      return -ENOSPC;
    }
    *placed = Location(Tier::kLocal, slot);
    return -ENOSPC;
  }

  if (!disk_) return -ENOSPC;
  // A page already on disk is rewritten in its own slot, so a full device can still
  // rewrite the blocks it holds.
  const bool was_disk = old.tier() == Tier::kDisk;
  rc = was_disk ? disk_->Rewrite(old.slot(), page, hint, &slot) : disk_->Write(page, hint, &slot);
  if (rc != 0) return rc;
  if (!was_disk) Release(old);
  *placed = Location(Tier::kDisk, slot);
  return 0;
}

int Tiering::Load(Location location, PageSpan out) noexcept {
  if (location.reads_as_zero()) {
    std::memset(out.data(), 0, kPageSize);
    return 0;
  }
  PageStore* store = StoreFor(location.tier());
  assert(store != nullptr);
  return store->Read(location.slot(), out);
}

void Tiering::Release(Location location) noexcept {
  if (location.reads_as_zero()) return;
  PageStore* store = StoreFor(location.tier());
  assert(store != nullptr);
  store->Discard(location.slot());
}

}  // namespace memlend
