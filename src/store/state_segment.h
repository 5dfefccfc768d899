// StateSegment: memory that outlives the daemon process, for the page store's state
// (docs/restart.md, "The state directory and the state segment").
//
// A System V shared memory segment, attached at start and locked with SHM_LOCK, so that its
// pages stay resident whether or not a process has it attached: the local store's arena is
// one, each device's page table another. It begins with a header (magic, layout version,
// the instance number the state directory's state.json names, and its size), which Attach
// checks before anything else is read: a segment id that a reboot gave to something else is
// refused, never used. What it keeps starts at data().
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace memlend {

class StateSegment {
 public:
  // Bytes in front of the first region (the header, rounded up to a page).
  static constexpr std::uint64_t kHeaderBytes = 4096;
  static constexpr std::uint64_t kAliveOffset = 64;
  static constexpr std::uint64_t kSealOffset = 128;

  // The sealing key and counter (docs/security.md), in the arena segment's header: they live
  // exactly as long as the pages sealed with them, and the counter never goes back.
  struct SealMaterial {
    std::uint8_t key[32];
    std::uint32_t salt;
    std::uint32_t present;  // 1 once the key is set
    std::atomic<std::uint64_t> counter;
  };
  static_assert(kSealOffset + sizeof(SealMaterial) <= kHeaderBytes);

  // Makes a new segment keeping `data_bytes` (rounded up to whole pages, after the header), zeroed,
  // with a header naming `instance`. `lock`: SHM_LOCK it (the daemon locks its memory).
  // Throws std::system_error naming the cause (shmget's or shmat's error; e.g. kernel.shmmax
  // too small, or no memory).
  static std::unique_ptr<StateSegment> Create(std::uint64_t data_bytes, std::uint64_t instance,
                                              bool lock);
  // Attaches the segment `id` made by an earlier process. Returns nullptr with *error set
  // (one line) when there is none by that id, or its header is not memlend's, or names
  // another instance, or another size than `data_bytes` asks for.
  static std::unique_ptr<StateSegment> Attach(int id, std::uint64_t data_bytes,
                                              std::uint64_t instance, bool lock,
                                              std::string* error);

  // Detaches; the segment itself stays for the next process unless Remove was called.
  ~StateSegment();
  StateSegment(const StateSegment&) = delete;
  StateSegment& operator=(const StateSegment&) = delete;

  // Marks the segment for removal: it goes when the last process detaches (this one, at
  // destruction). For a clean stop that leaves nothing behind.
  void Remove() noexcept;

  // A clock the daemon sets (CLOCK_REALTIME, ns) every fraction of a second while it runs:
  // the next daemon learns from it how long the devices were without a server. In the
  // header, so it outlives the process too.
  std::atomic<std::uint64_t>& alive_ns() const {
    return *reinterpret_cast<std::atomic<std::uint64_t>*>(base_ + kAliveOffset);
  }

  SealMaterial& seal_material() const {
    return *reinterpret_cast<SealMaterial*>(base_ + kSealOffset);
  }

  int id() const { return id_; }
  std::uint64_t bytes() const { return bytes_; }
  // What the segment keeps: `data_bytes` of Create or Attach, page-aligned.
  std::byte* data() const { return base_ + kHeaderBytes; }

 private:
  StateSegment(int id, std::byte* base, std::uint64_t bytes) : id_(id), base_(base), bytes_(bytes) {}

  const int id_;
  std::byte* const base_;
  const std::uint64_t bytes_;
};

}  // namespace memlend
