#!/bin/bash
# fio with data verification through a borrower whose pages live mostly on two lenders.
#
# Usage: fio_peers_verify.sh PATH_TO_MEMLEND
#
# Three daemons on 127.0.0.1: two lenders (--lend 48M each) and a borrower with one 64 MiB
# device, a 2 MiB local store and both lenders as --peer, serving NBD on a unix socket. So
# nearly every page fio writes is evicted to a lender over TCP and read back from there.
# Two fio runs over fresh NBD connections made by fio's nbd ioengine (libnbd):
#   1. the workload: two concurrent jobs doing random reads and writes at iodepth 16, one with
#      4 KiB blocks, one with 4-64 KiB blocks; every block written carries a crc32c header and
#      is read back and checked (do_verify=1, verify_fatal=1);
#   2. --verify_only: the same jobs re-read everything from new connections and check it again;
#   3. a negative control: a fresh borrower on the same lenders (the old one's superpages were
#      freed when it left) must FAIL --verify_only with verify errors, which proves that runs 1
#      and 2 really verified data.
# Runs 1 and 2 must report error 0 for every job in fio's JSON output and no "verify:" complaints.
# After run 2, `memlend status --json` of the borrower must show more pages remote than local,
# on both lenders, with figures that agree with the lenders'. Every daemon must exit 0 on SIGTERM.
#
# Exit status: 0 pass, 1 fail, 77 skipped (fio without the nbd engine, or python3 missing).

set -euo pipefail

memlend=${1:?usage: fio_peers_verify.sh PATH_TO_MEMLEND}
# shellcheck source=fio_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/fio_lib.sh" memlend-fio-peers
socket=$workdir/nbd.sock

port1=$(free_port)
port2=$(free_port)
start_daemon lender1 --lend 48M --listen "127.0.0.1:$port1"
start_daemon lender2 --lend 48M --listen "127.0.0.1:$port2"
# start_borrower NAME: one 64 MiB device `fio` on $socket, a 2 MiB local store, both lenders.
start_borrower() {
  start_daemon "$1" --device fio:64M --nbd "unix:$socket" --local-store 2M --compress none \
    --peer "127.0.0.1:$port1" --peer "127.0.0.1:$port2"
}
start_borrower borrower

write_verify_job "nbd+unix:///fio?socket=$socket" 28m 32m 32m

verify_workload " (local store 2 MiB, two lenders)"

# Where the pages are: wait (at most 10 s) for eviction to settle, then check that most pages
# are remote, that both lenders hold some, and that the borrower's books match the lenders'.
echo "placement:"
check_placement borrower lender1 lender2 ||
  fail "placement checks failed after 10 s (status in the lines above)"

echo "run 3: negative control - a fresh borrower on the same lenders has none of the data"
stop_daemon borrower
rm -f "$socket"
start_borrower borrower2
expect_verify_failure

for name in borrower2 lender1 lender2; do stop_daemon "$name"; done

echo "PASS: fio verified all data written through a borrower onto two lenders"
