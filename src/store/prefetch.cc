#include "store/prefetch.h"

#include <algorithm>

namespace memlend {

std::uint64_t SequentialPrefetch::OnMiss(std::uint64_t first, std::uint64_t count) noexcept {
  std::lock_guard lock(mu_);
  ++clock_;
  const bool paying = AgeAndCheck();
  const std::uint64_t end = first + count;
  Stream* match = nullptr;
  Stream* oldest = &streams_[0];
  for (Stream& stream : streams_) {
    // Near where it heads, or inside the window it fetched last (a page of it that did
    // not make it into RAM, or one still on its way).
    if (stream.used != 0 && first + kSlackPages >= std::min(stream.start, stream.next) &&
        first <= stream.next + kSlackPages) {
      // The closest run, when several are near.
      if (match == nullptr || std::max(first, stream.next) - std::min(first, stream.next) <
                                  std::max(first, match->next) - std::min(first, match->next)) {
        match = &stream;
      }
    }
    if (stream.used < oldest->used) oldest = &stream;
  }
  if (match == nullptr) {
    *oldest = Stream{end, end, 0, clock_};
    return 0;
  }
  if (!paying && ++probe_ % kProbeEvery != 0) {
    // Followed, but nothing fetched; its window grows on the next probe as if it had been.
    match->start = end;
    match->next = end;
    match->used = clock_;
    return 0;
  }
  match->window = match->window == 0 ? kMinPages : std::min(kMaxPages, match->window * 2);
  match->start = end;
  match->next = end + match->window;
  match->used = clock_;
  return match->window;
}

SequentialPrefetch::Range SequentialPrefetch::OnTrigger(std::uint64_t page) noexcept {
  std::lock_guard lock(mu_);
  ++clock_;
  if (!AgeAndCheck()) return {};
  for (Stream& stream : streams_) {
    if (stream.used == 0 || stream.window == 0 || page < stream.start || page >= stream.next) {
      continue;
    }
    stream.window = std::min(kMaxPages, stream.window * 2);
    stream.start = stream.next;
    stream.next += stream.window;
    stream.used = clock_;
    return {stream.start, stream.window};
  }
  return {};
}

bool SequentialPrefetch::AgeAndCheck() noexcept {
  std::uint64_t read = pages_read() - read_base_;
  std::uint64_t wasted = pages_wasted() - wasted_base_;
  if (read + wasted >= kHistory) {
    read_base_ += read / 2;
    wasted_base_ += wasted / 2;
    read -= read / 2;
    wasted -= wasted / 2;
  }
  return wasted < kMinEvidence || wasted <= read;
}

bool SequentialPrefetch::Paying() noexcept {
  std::lock_guard lock(mu_);
  return AgeAndCheck();
}

}  // namespace memlend
