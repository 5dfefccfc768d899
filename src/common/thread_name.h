// Names the calling thread, so that top -H, perf and /proc/PID/task/*/comm tell a daemon's
// threads apart. Linux keeps at most 15 characters; longer names are cut.
#pragma once

#include <pthread.h>

#include <string>

namespace memlend {

inline void SetThreadName(const std::string& name) {
  ::pthread_setname_np(::pthread_self(), name.substr(0, 15).c_str());
}

}  // namespace memlend
