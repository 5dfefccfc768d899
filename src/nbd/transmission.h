// The NBD transmission phase for one connection.
//
// Design: one thread per connection runs this loop, and the loop batches. Each recv takes
// whatever the client has sent, possibly dozens of pipelined requests; every complete
// request in the buffer is validated, served against the device and its reply appended
// to one output buffer, and the replies go out in one send before the loop blocks in recv
// again. With a client at queue depth 32 that is two system calls for many requests
// instead of two or more per request, and at queue depth 1 it is the minimum of one recv
// and one send. READ data is copied from the store straight into the output buffer.
//
// The alternative, a pool of worker threads per connection (nbdkit's model), spreads one
// connection over cores but pays a hand-off and a lock per request; for page-sized
// requests served from RAM that costs more than the copy itself. Several connections
// (multi-conn) still run in parallel, one thread each. A WRITE whose payload does not fit
// the input buffer is written in pieces as it arrives, so a connection's memory is bounded
// by its buffers (1 MiB each for input and replies, more for the replies of a long run of
// large READs) whatever its client sends.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>

#include "store/device.h"

namespace memlend::nbd {

// Serves requests on the connected socket `fd` for `device` until the client sends DISC
// or hangs up, the stream goes out of sync (bad request magic), a request makes the
// connection unrecoverable (oversized WRITE), or the socket is shut down. Each request is
// validated once here (CheckRequest); the device only asserts.
// `busy_poll` is how long the loop spins for the next request before it sleeps.
// Every buffer the loop needs is allocated when it starts, so that serving WRITEs, of any
// size, allocates nothing (the kernel NBD client may be writing out swap); so does serving
// READs of up to 1 MiB at a time. Throws std::bad_alloc when the buffers cannot be had.
// `realtime` serves requests under SCHED_FIFO (common/realtime.h) and waits for them under
// the ordinary policy: the replies' socket buffers may then come from the kernel's reserve
// when the system is out of memory, and a request's arrival does not preempt the client
// before it has sent the rest of its batch (which, with the kernel NBD client on the same
// CPU, cost two thirds of the IOPS at queue depth 32 in the VM benchmark). That is two
// more system calls whenever the loop has to wait. Falls back to the ordinary policy, with
// one warning, where real-time scheduling is not permitted.
void RunTransmission(int fd, Device& device, std::chrono::microseconds busy_poll,
                     bool realtime = false);

// The most a connection's buffers hold, whatever its client sends: 1 MiB of input, and
// replies of up to 4 MiB of READ data besides those not yet sent (transmission.cc checks it).
inline constexpr std::uint64_t kMaxConnectionBufferBytes = std::uint64_t{5632} << 10;

}  // namespace memlend::nbd
