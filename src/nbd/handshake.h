// The NBD fixed-newstyle handshake, from the greeting to the start of transmission.
#pragma once

#include <memory>

#include "nbd/protocol.h"
#include "store/device_table.h"
#include "transport/socket.h"

namespace memlend::nbd {

// The transmission flags every memlend export advertises.
inline constexpr std::uint16_t kTransmissionFlags =
    NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM |
    NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_CAN_MULTI_CONN;

// Runs option haggling on the connected socket `fd` until the client picks an export
// (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) and returns that device. Returns null when the
// connection must close: the client aborted or hung up, or sent something malformed (bad
// magic, unknown client flags, an option longer than kMaxOptionLength, an unknown export
// by NBD_OPT_EXPORT_NAME, which cannot carry an error). Recoverable mistakes (unknown
// option, unknown export in GO/INFO, malformed INFO data) get an error reply and haggling
// goes on. An empty export name picks the only device when there is exactly one. The
// whole handshake must be over by `deadline`, or the connection closes: a client that
// connects and then says nothing, or dribbles a byte at a time, holds a thread only so long.
std::shared_ptr<Device> RunHandshake(int fd, const DeviceTable& devices, Deadline deadline);

}  // namespace memlend::nbd
