#!/bin/bash
# fio with data verification against a real memlend daemon over NBD.
#
# Usage: fio_verify.sh PATH_TO_MEMLEND
#
# Three fio runs against one device on a unix socket, each over fresh NBD connections made by
# fio's nbd ioengine (libnbd):
#   1. the workload: two concurrent jobs doing random reads and writes at iodepth 16, one with
#      4 KiB blocks, one with 4-64 KiB blocks and half-compressible buffers; every block written
#      carries a crc32c header and is read back and checked (do_verify=1, verify_fatal=1);
#   2. --verify_only: the same jobs re-read everything from new connections and check it again;
#   3. a negative control: the daemon is restarted (its RAM store starts empty) and --verify_only
#      must now FAIL with verify errors, which proves that runs 1 and 2 really verified data.
# Each run must report error 0 for every job in fio's JSON output and no "verify:" complaints.
#
# Exit status: 0 pass, 1 fail, 77 skipped (fio without the nbd engine, or python3 missing).

set -euo pipefail

memlend=${1:?usage: fio_verify.sh PATH_TO_MEMLEND}
# shellcheck source=fio_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/fio_lib.sh" memlend-fio
socket=$workdir/nbd.sock

# start_fio_daemon NAME: one 96 MiB device `fio` on $socket, a RAM store larger than it.
start_fio_daemon() {
  start_daemon "$1" --device fio:96M --nbd "unix:$socket" --local-store 256M --compress lz4
}

write_verify_job "nbd+unix:///fio?socket=$socket" 32m 40m 48m \
  buffer_compress_percentage=50 refill_buffers=1

start_fio_daemon daemon
verify_workload ""

echo "run 3: negative control - after a restart the data is gone and verification must fail"
stop_daemon daemon
start_fio_daemon restarted
expect_verify_failure
stop_daemon restarted

echo "PASS: fio verified all data written through memlend"
