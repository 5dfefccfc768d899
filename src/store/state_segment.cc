#include "store/state_segment.h"

#include <sys/ipc.h>
#include <sys/shm.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <system_error>

namespace memlend {
namespace {

constexpr std::uint64_t kMagic = 0x31617473646c6d6dULL;  // "mmldsta1" read little-endian
constexpr std::uint32_t kLayoutVersion = 1;

struct Header {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t reserved;
  std::uint64_t instance;
  std::uint64_t bytes;
};
static_assert(sizeof(Header) <= StateSegment::kHeaderBytes);

std::uint64_t RoundUp(std::uint64_t bytes) { return (bytes + 4095) / 4096 * 4096; }

// SHM_LOCK where asked; a failure is not fatal (the daemon warns about unlocked memory
// elsewhere), as mlockall's is not.
void Lock(int id, bool lock) {
  if (lock) ::shmctl(id, SHM_LOCK, nullptr);
}

}  // namespace

std::unique_ptr<StateSegment> StateSegment::Create(std::uint64_t data_bytes,
                                                   std::uint64_t instance, bool lock) {
  const std::uint64_t bytes = kHeaderBytes + RoundUp(data_bytes);
  const int id = ::shmget(IPC_PRIVATE, bytes, IPC_CREAT | IPC_EXCL | 0600);
  if (id < 0) {
    throw std::system_error(errno, std::generic_category(),
                            "cannot make a state segment of " + std::to_string(bytes) +
                                " bytes (shmget; see kernel.shmmax and kernel.shmall)");
  }
  void* base = ::shmat(id, nullptr, 0);
  if (base == reinterpret_cast<void*>(-1)) {
    const int error = errno;
    ::shmctl(id, IPC_RMID, nullptr);
    throw std::system_error(error, std::generic_category(), "cannot attach the state segment");
  }
  Lock(id, lock);
  // A new segment reads as zeros: every page table entry is an unmapped page.
  const Header header{kMagic, kLayoutVersion, 0, instance, bytes};
  std::memcpy(base, &header, sizeof(header));
  return std::unique_ptr<StateSegment>(new StateSegment(id, static_cast<std::byte*>(base), bytes));
}

std::unique_ptr<StateSegment> StateSegment::Attach(int id, std::uint64_t data_bytes,
                                                   std::uint64_t instance, bool lock,
                                                   std::string* error) {
  const std::uint64_t bytes = kHeaderBytes + RoundUp(data_bytes);
  shmid_ds info{};
  if (::shmctl(id, IPC_STAT, &info) != 0) {
    *error = "state segment " + std::to_string(id) + " is gone (" + std::strerror(errno) +
             "; the host restarted, or it was removed)";
    return nullptr;
  }
  if (info.shm_nattch > 0) {
    *error = "state segment " + std::to_string(id) + " is in use by another process (pid " +
             std::to_string(info.shm_lpid) + ": is a daemon still running on this state?)";
    return nullptr;
  }
  if (info.shm_segsz != bytes) {
    *error = "state segment " + std::to_string(id) + " has " + std::to_string(info.shm_segsz) +
             " bytes, the state directory says " + std::to_string(bytes) +
             " (it is not this daemon's)";
    return nullptr;
  }
  void* base = ::shmat(id, nullptr, 0);
  if (base == reinterpret_cast<void*>(-1)) {
    *error = "cannot attach state segment " + std::to_string(id) + ": " + std::strerror(errno);
    return nullptr;
  }
  Header header{};
  std::memcpy(&header, base, sizeof(header));
  if (header.magic != kMagic || header.version != kLayoutVersion ||
      header.instance != instance || header.bytes != bytes) {
    ::shmdt(base);
    *error = "state segment " + std::to_string(id) +
             " is not the one the state directory names (another program's, or another "
             "daemon's)";
    return nullptr;
  }
  Lock(id, lock);
  return std::unique_ptr<StateSegment>(new StateSegment(id, static_cast<std::byte*>(base), bytes));
}

StateSegment::~StateSegment() { ::shmdt(base_); }

void StateSegment::Remove() noexcept { ::shmctl(id_, IPC_RMID, nullptr); }

}  // namespace memlend
