// vm_watch: a progress monitor for swap tests under whole-system memory pressure, where a
// shell loop is swapped out and prints nothing. It locks itself in memory, allocates
// nothing after start, and every INTERVAL seconds prints one line of swap and memory
// figures, then one line per watched process with each thread's state, kernel wait
// channel and CPU ticks (NAME/TID:STATE:WCHAN:TICKS). When no page was swapped in or out
// during an interval it also prints the kernel stack of every watched thread and asks the
// kernel for its blocked tasks and what every CPU is running (sysrq w and l), so a stuck
// run leaves the stacks that explain it on the console.
//
// It marks itself an I/O flusher (PR_SET_IO_FLUSHER: its allocations never wait for I/O)
// and keeps /proc/vmstat, /proc/meminfo and /proc/sysrq-trigger open: the swap device it
// watches may be the very thing reclaim waits for, and a monitor that blocks in reclaim
// (as one that opened /proc files each round did) reports nothing when it matters.
//
// Usage: vm_watch INTERVAL_SECONDS NAME=PID...
// Runs until killed. Exits 2 on bad arguments.
#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

namespace {

constexpr int kMaxProcesses = 8;

struct Watched {
  const char* name;
  long pid;
};

// Reads a small file into `buffer` (NUL-terminated). Returns the length, or -1.
long ReadSmall(const char* path, char* buffer, std::size_t size) {
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  const long n = ::read(fd, buffer, size - 1);
  ::close(fd);
  if (n < 0) return -1;
  buffer[n] = '\0';
  return n;
}

// Reads an open /proc file again from its start (NUL-terminated). Returns the length, or -1.
long Reread(int fd, char* buffer, std::size_t size) {
  if (fd < 0) return -1;
  const long n = ::pread(fd, buffer, size - 1, 0);
  if (n < 0) return -1;
  buffer[n] = '\0';
  return n;
}

// Calls fn(tid) for each thread of `pid`; false when the process is gone.
template <typename Fn>
bool ForEachThread(long pid, Fn fn) {
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%ld/task", pid);
  const int dir = ::open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir < 0) return false;
  alignas(8) char entries[4096];
  long n;
  while ((n = ::syscall(SYS_getdents64, dir, entries, sizeof(entries))) > 0) {
    for (long offset = 0; offset < n;) {
      const auto* entry = reinterpret_cast<const dirent64*>(entries + offset);
      offset += entry->d_reclen;
      if (entry->d_name[0] == '.') continue;
      fn(std::strtol(entry->d_name, nullptr, 10));
    }
  }
  ::close(dir);
  return true;
}

// Prints the kernel stack of each thread of `pid`, one line per thread.
void PrintStacks(const char* name, long pid) {
  ForEachThread(pid, [&](long tid) {
    char path[64];
    static char stack[4096];
    char comm[32] = "?";
    std::snprintf(path, sizeof(path), "/proc/%ld/task/%ld/comm", pid, tid);
    if (ReadSmall(path, comm, sizeof(comm)) > 0) comm[std::strcspn(comm, "\n")] = '\0';
    std::snprintf(path, sizeof(path), "/proc/%ld/task/%ld/stack", pid, tid);
    if (ReadSmall(path, stack, sizeof(stack)) < 0) return;
    // One line: the frames' names, without their offsets and the "[<0>] " prefixes.
    static char frames[2048];
    frames[0] = '\0';
    for (char* frame = std::strtok(stack, "\n"); frame != nullptr;
         frame = std::strtok(nullptr, "\n")) {
      char* symbol = std::strchr(frame, ' ');
      symbol = symbol == nullptr ? frame : symbol + 1;
      symbol[std::strcspn(symbol, "+")] = '\0';
      if (frames[0] != '\0') std::strncat(frames, "<", sizeof(frames) - std::strlen(frames) - 1);
      std::strncat(frames, symbol, sizeof(frames) - std::strlen(frames) - 1);
    }
    std::printf("  [stack %s %s/%ld: %s]\n", name, comm, tid, frames);
  });
}

// The value of `key` in /proc/vmstat or /proc/meminfo text (0 if absent).
std::uint64_t Field(const char* text, const char* key) {
  const std::size_t length = std::strlen(key);
  for (const char* at = text; (at = std::strstr(at, key)) != nullptr; at += length) {
    if ((at == text || at[-1] == '\n') && (at[length] == ' ' || at[length] == ':')) {
      return std::strtoull(at + length + 1 + (at[length] == ':'), nullptr, 10);
    }
  }
  return 0;
}

// Appends "NAME/TID:STATE:WCHAN:TICKS" for each thread of `pid` to `line`.
void DescribeThreads(long pid, char* line, std::size_t size) {
  const bool alive = ForEachThread(pid, [&](long tid) {
    char path[64];
    char stat[512];
    char wchan[64] = "?";
    std::snprintf(path, sizeof(path), "/proc/%ld/task/%ld/stat", pid, tid);
    if (ReadSmall(path, stat, sizeof(stat)) < 0) return;
    std::snprintf(path, sizeof(path), "/proc/%ld/task/%ld/wchan", pid, tid);
    if (ReadSmall(path, wchan, sizeof(wchan)) <= 0) std::strcpy(wchan, "-");
    // After "(comm) ": state, then 10 fields up to utime and stime.
    const char* after = std::strrchr(stat, ')');
    const char* open = std::strchr(stat, '(');
    if (after == nullptr || open == nullptr) return;
    char comm[32];
    std::snprintf(comm, sizeof(comm), "%.*s", static_cast<int>(after - open - 1), open + 1);
    char state = after[2];
    unsigned long utime = 0;
    unsigned long stime = 0;
    std::sscanf(after + 4, "%*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime);
    char part[128];
    std::snprintf(part, sizeof(part), " %s/%ld:%c:%s:%lu", comm, tid, state, wchan,
                  utime + stime);
    std::strncat(line, part, size - std::strlen(line) - 1);
  });
  if (!alive) std::strncat(line, " (gone)", size - std::strlen(line) - 1);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc - 2 > kMaxProcesses) {
    std::fprintf(stderr, "usage: vm_watch INTERVAL_SECONDS NAME=PID... (at most %d)\n",
                 kMaxProcesses);
    return 2;
  }
  const long interval = std::strtol(argv[1], nullptr, 10);
  Watched watched[kMaxProcesses];
  const int count = argc - 2;
  for (int i = 0; i < count; ++i) {
    char* equals = std::strchr(argv[i + 2], '=');
    if (interval <= 0 || equals == nullptr) {
      std::fprintf(stderr, "vm_watch: bad argument '%s'\n", argv[i + 2]);
      return 2;
    }
    *equals = '\0';
    watched[i] = {argv[i + 2], std::strtol(equals + 1, nullptr, 10)};
  }
  if (::mlockall(MCL_CURRENT | MCL_FUTURE) != 0) std::perror("vm_watch: mlockall");
  if (::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0) std::perror("vm_watch: PR_SET_IO_FLUSHER");
  const int vmstat_fd = ::open("/proc/vmstat", O_RDONLY | O_CLOEXEC);
  const int meminfo_fd = ::open("/proc/meminfo", O_RDONLY | O_CLOEXEC);
  const int sysrq = ::open("/proc/sysrq-trigger", O_WRONLY | O_CLOEXEC);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);

  static char vmstat[16384];
  static char meminfo[8192];
  static char line[8192];
  std::uint64_t last_in = 0;
  std::uint64_t last_out = 0;
  for (long elapsed = 0;; elapsed += interval) {
    if (Reread(vmstat_fd, vmstat, sizeof(vmstat)) < 0) vmstat[0] = '\0';
    if (Reread(meminfo_fd, meminfo, sizeof(meminfo)) < 0) meminfo[0] = '\0';
    const std::uint64_t in = Field(vmstat, "pswpin");
    const std::uint64_t out = Field(vmstat, "pswpout");
    std::printf("  [vm_watch %lds: swapped in %llu, out %llu pages; MemFree %llu KiB, "
                "SwapFree %llu KiB]\n",
                elapsed, static_cast<unsigned long long>(in),
                static_cast<unsigned long long>(out),
                static_cast<unsigned long long>(Field(meminfo, "MemFree")),
                static_cast<unsigned long long>(Field(meminfo, "SwapFree")));
    for (int i = 0; i < count; ++i) {
      std::snprintf(line, sizeof(line), "  [%s", watched[i].name);
      DescribeThreads(watched[i].pid, line, sizeof(line));
      std::printf("%s]\n", line);
    }
    if (elapsed > 0 && in == last_in && out == last_out) {
      std::printf("  [vm_watch: no swap traffic for %ld s; the watched threads' kernel stacks, "
                  "then blocked tasks and CPU backtraces follow]\n", interval);
      for (int i = 0; i < count; ++i) PrintStacks(watched[i].name, watched[i].pid);
      if (sysrq >= 0) {
        (void)!::write(sysrq, "w", 1);
        (void)!::write(sysrq, "l", 1);
      }
    }
    last_in = in;
    last_out = out;
    ::sleep(static_cast<unsigned>(interval));
  }
}
