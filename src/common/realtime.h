// Real-time scheduling for the threads that serve a swap device.
#pragma once

#include <pthread.h>
#include <sched.h>

namespace memlend {

// Moves the calling thread to SCHED_FIFO at the lowest real-time priority. Besides being run
// before ordinary threads, a real-time thread may allocate a little below the kernel's min
// watermark (ALLOC_MIN_RESERVE, Linux 6.3 and later): when the rest of the system has used up
// free memory and reclaim is waiting for swap I/O that this thread must complete, its socket
// buffers can still be allocated. Returns 0 or an errno value (EPERM without CAP_SYS_NICE).
inline int UseRealtimeScheduling() noexcept {
  sched_param param{};
  param.sched_priority = ::sched_get_priority_min(SCHED_FIFO);
  return ::pthread_setschedparam(::pthread_self(), SCHED_FIFO, &param);
}

// Moves the calling thread back to the ordinary policy (SCHED_OTHER). Always permitted.
inline int UseOrdinaryScheduling() noexcept {
  sched_param param{};
  return ::pthread_setschedparam(::pthread_self(), SCHED_OTHER, &param);
}

}  // namespace memlend
