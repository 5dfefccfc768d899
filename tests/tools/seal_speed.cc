// seal_speed: how fast one core seals and opens 4 KiB pages (PageSealer, AES-256-GCM), next
// to copying them (memcpy), in the same run. bench/seal_bench.sh runs it.
//
// Usage: seal_speed [SECONDS]   (default 1 per measurement)
// Prints one line per measurement: MB/s of pages, and the ratio to memcpy.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "store/page_sealer.h"

namespace {

using memlend::kPageSize;
using Clock = std::chrono::steady_clock;

// Runs `step` over the pages again and again for `seconds`; returns pages per second.
double PagesPerSecond(double seconds, std::size_t pages,
                      const std::function<void(std::size_t)>& step) {
  std::uint64_t done = 0;
  const auto start = Clock::now();
  const auto end = start + std::chrono::duration<double>(seconds);
  while (Clock::now() < end) {
    for (std::size_t i = 0; i < pages; ++i) step(i);
    done += pages;
  }
  return static_cast<double>(done) / std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  const double seconds = argc > 1 ? std::atof(argv[1]) : 1.0;
  if (!(seconds > 0) || seconds > 60) {
    std::fprintf(stderr, "usage: seal_speed [SECONDS] (0 < SECONDS <= 60)\n");
    return 2;
  }
  constexpr std::size_t kPages = 2048;  // 8 MiB: beyond the caches, as pages in flight are
  std::vector<std::byte> in(kPages * kPageSize);
  std::vector<std::byte> out(kPages * kPageSize);
  for (std::size_t i = 0; i < in.size(); ++i) in[i] = static_cast<std::byte>(i * 131 + (i >> 12));
  const memlend::PageSealer sealer(memlend::PageSealer::NewKey(), 1);
  std::vector<memlend::PageSealer::Tag> tags(kPages);
  const auto page = [](std::vector<std::byte>& v, std::size_t i) {
    return memlend::PageSpan(v.data() + i * kPageSize, kPageSize);
  };
  const auto const_page = [](const std::vector<std::byte>& v, std::size_t i) {
    return memlend::ConstPageSpan(v.data() + i * kPageSize, kPageSize);
  };
  std::uint64_t counter = 0;
  bool ok = true;

  const double copy = PagesPerSecond(seconds, kPages, [&](std::size_t i) {
    std::memcpy(out.data() + i * kPageSize, in.data() + i * kPageSize, kPageSize);
  });
  const double seal = PagesPerSecond(seconds, kPages, [&](std::size_t i) {
    ok &= sealer.Seal(const_page(in, i), page(out, i), {1, i, ++counter}, &tags[i]);
  });
  // Open what the last round sealed: each page with the counter it was sealed under.
  const std::uint64_t last_round = counter - kPages;
  std::vector<std::byte> opened(kPages * kPageSize);
  const double open = PagesPerSecond(seconds, kPages, [&](std::size_t i) {
    ok &= sealer.Open(const_page(out, i), page(opened, i), {1, i, last_round + i + 1}, tags[i]) ==
          0;
  });
  if (!ok || std::memcmp(opened.data(), in.data(), in.size()) != 0) {
    std::fprintf(stderr, "seal_speed: a page did not open to what was sealed\n");
    return 1;
  }
  const auto line = [&](const char* what, double pages_per_s) {
    std::printf("%-28s %9.0f MB/s  %6.2fx memcpy\n", what,
                pages_per_s * kPageSize / 1e6, pages_per_s / copy);
  };
  line("memcpy 4 KiB (reference)", copy);
  line("seal 4 KiB (AES-256-GCM)", seal);
  line("open 4 KiB (AES-256-GCM)", open);
  return 0;
}
