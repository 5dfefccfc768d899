// memory_pattern: allocates anonymous memory, fills every 4 KiB page with a pattern derived
// from the page's index and a seed, then reads it all back and checks it. Run under a
// memory limit (a cgroup, or a small machine) it forces the kernel to swap the pages out
// and in again, so a mismatch means the swap device lost or mixed up data.
//
// Usage: memory_pattern SIZE_MIB [SEED] [PASSES] [THREADS]
// With THREADS (default 1), that many threads share the work, each writing and then reading
// back its own contiguous part of the memory, so that they fault concurrently.
// Prints one summary line; exits 0 when every page read back intact, 1 on a mismatch, 2 on
// bad arguments or when the memory cannot be mapped.
#include <sys/mman.h>

#include <cerrno>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr std::size_t kPageBytes = 4096;
constexpr std::size_t kWordsPerPage = kPageBytes / sizeof(std::uint64_t);

// splitmix64: a cheap, well-mixed sequence, so that no two pages hold the same bytes and
// no page is all zero or highly compressible.
std::uint64_t Mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

void FillPage(std::uint64_t* words, std::uint64_t page, std::uint64_t seed) {
  std::uint64_t state = Mix(page ^ (seed << 40));
  for (std::size_t i = 0; i < kWordsPerPage; ++i) {
    state = Mix(state);
    words[i] = state;
  }
}

bool CheckPage(const std::uint64_t* words, std::uint64_t page, std::uint64_t seed) {
  std::uint64_t state = Mix(page ^ (seed << 40));
  for (std::size_t i = 0; i < kWordsPerPage; ++i) {
    state = Mix(state);
    if (words[i] != state) return false;
  }
  return true;
}

bool ParseNumber(const char* text, std::uint64_t* value) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long parsed = std::strtoull(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0') return false;
  *value = parsed;
  return true;
}

double Seconds() {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<double>(now.tv_sec) + static_cast<double>(now.tv_nsec) / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  std::uint64_t size_mib = 0;
  std::uint64_t seed = 1;
  std::uint64_t passes = 1;
  std::uint64_t threads = 1;
  if (argc < 2 || argc > 5 || !ParseNumber(argv[1], &size_mib) || size_mib == 0 ||
      size_mib > (std::uint64_t{1} << 24) || (argc > 2 && !ParseNumber(argv[2], &seed)) ||
      (argc > 3 && (!ParseNumber(argv[3], &passes) || passes == 0)) ||
      (argc > 4 && (!ParseNumber(argv[4], &threads) || threads == 0 || threads > 256))) {
    std::fprintf(stderr, "usage: memory_pattern SIZE_MIB [SEED] [PASSES] [THREADS]\n");
    return 2;
  }
  const std::size_t bytes = size_mib << 20;
  const std::size_t pages = bytes / kPageBytes;
  void* memory = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED) {
    std::fprintf(stderr, "memory_pattern: mmap of %" PRIu64 " MiB: %s\n", size_mib,
                 std::strerror(errno));
    return 2;
  }
  auto* words = static_cast<std::uint64_t*>(memory);
  // Each thread's part: pages [first, end), its own counts, written only by it.
  struct Part {
    std::size_t first = 0;
    std::size_t end = 0;
    std::uint64_t bad_pages = 0;
    double fill_s = 0;
    double check_s = 0;
  };
  std::vector<Part> parts(threads);
  for (std::uint64_t t = 0; t < threads; ++t) {
    parts[t].first = pages * t / threads;
    parts[t].end = pages * (t + 1) / threads;
  }
  auto work = [&](Part& part) {
    for (std::uint64_t pass = 0; pass < passes; ++pass) {
      const std::uint64_t pass_seed = seed + pass;
      const double start = Seconds();
      for (std::size_t p = part.first; p < part.end; ++p) {
        FillPage(words + p * kWordsPerPage, p, pass_seed);
      }
      const double filled = Seconds();
      part.fill_s += filled - start;
      for (std::size_t p = part.first; p < part.end; ++p) {
        if (!CheckPage(words + p * kWordsPerPage, p, pass_seed)) {
          if (part.bad_pages < 10) std::fprintf(stderr, "memory_pattern: page %zu differs\n", p);
          ++part.bad_pages;
        }
      }
      part.check_s += Seconds() - filled;
    }
  };
  std::vector<std::thread> workers;
  for (std::uint64_t t = 1; t < threads; ++t) workers.emplace_back(work, std::ref(parts[t]));
  work(parts[0]);
  for (std::thread& worker : workers) worker.join();
  std::uint64_t bad_pages = 0;
  double fill_s = 0;
  double check_s = 0;
  for (const Part& part : parts) {
    bad_pages += part.bad_pages;
    fill_s = part.fill_s > fill_s ? part.fill_s : fill_s;  // the slowest thread's
    check_s = part.check_s > check_s ? part.check_s : check_s;
  }
  std::printf("memory_pattern: %" PRIu64 " MiB, %zu pages, %" PRIu64 " pass(es), %" PRIu64
              " thread(s): %" PRIu64 " bad page(s) (writing %.1f s, reading back %.1f s)\n",
              size_mib, pages, passes, threads, bad_pages, fill_s, check_s);
  return bad_pages == 0 ? 0 : 1;
}
