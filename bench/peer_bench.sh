#!/bin/bash
# peer_bench.sh — a memlend borrower whose pages live on two lenders, against nbdkit's memory
# plugin, in the same run.
#
# Usage: bench/peer_bench.sh [--runtime SECONDS] [--repeat N] [--size SIZE] [--local-store SIZE] [--memlend PATH]
#   --runtime SECONDS    time of each fio measurement (default 5)
#   --repeat N           measurements per server and workload, interleaved; medians are shown (default 3)
#   --size SIZE          device size, with an optional K/M/G/T suffix (binary; default 1G)
#   --local-store SIZE   the borrower's local store (default 4M), so almost every page is remote
#   --memlend PATH       memlend binary (default build/src/memlend next to this script)
#
# Three memlend daemons run on this host: two lenders (`--lend`, each with room for 5/8 of the
# device plus 16 MiB, so together they hold all of it with slack for partly used superpages;
# the borrower keeps one copy of each page, --redundancy none: lender_death_bench.sh compares
# replicas:2)
# on free 127.0.0.1 TCP ports, and a borrower with one device `bench`, a tiny local store and
# both lenders as --peer. Beside it runs `nbdkit memory`, the reference NBD RAM disk. Clients
# reach both the borrower and nbdkit over a unix socket, so the difference measured is the
# borrower's tiering and its TCP round trips to the lenders. Both devices are prefilled by a
# sequential write pass, after which nearly every page of the borrower is on a lender (the
# borrower's status is printed). Then fio's nbd ioengine (libnbd) measures 4 KiB random reads
# and random writes at queue depth 1 and 32, one job each, time based, alternating between the
# two servers (and swapping who goes first from one workload to the next). Each cell is measured
# --repeat times and the table shows medians. A random read of a remote page fetches it from a
# lender (and promotes it while the local store has room, which the evictor then undoes); a
# random write lands in the local store and pushes a cold page out to a lender.
#
# IOPS ratio = memlend / nbdkit (above 1: memlend faster); lat ratio = memlend / nbdkit (below
# 1: memlend faster); CPU us/IO: user + system time per I/O of the three memlend daemons
# together, and of nbdkit (bench/lib.sh).
#
# Requires fio with the nbd engine, nbdkit and python3; exits 77 (skipped) with a message if one
# is missing. Everything started is stopped on exit, including on Ctrl-C.

set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
local_store=4M
bench_extra_option() {
  case $1 in
    --local-store) local_store=${2:?--local-store needs a value}; bench_shift=2 ;;
    *) return 1 ;;
  esac
}
bench_parse_args "$@"
bench_check
local_store_bytes=$(to_bytes "$local_store") || exit 1
((local_store_bytes >= 1 << 20)) || fail "--local-store must be at least 1M"
# Each lender: 5/8 of the device + 16 MiB, rounded up to whole 2 MiB superpages.
superpage=$((2 << 20))
lend_bytes=$(((size_bytes * 5 / 8 + (16 << 20) + superpage - 1) / superpage * superpage))

# --- Start the servers -------------------------------------------------------------------------

port1=$(free_port)
port2=$(free_port)
start_daemon lender1 --lend "$lend_bytes" --listen "127.0.0.1:$port1"
start_daemon lender2 --lend "$lend_bytes" --listen "127.0.0.1:$port2"
start_daemon borrower --device "bench:$size_bytes" --nbd "unix:$workdir/memlend.sock" \
  --local-store "$local_store_bytes" --compress none --redundancy none \
  --peer "127.0.0.1:$port1" --peer "127.0.0.1:$port2"
start_server nbdkit "$workdir/nbdkit.sock" nbdkit -f -U "$workdir/nbdkit.sock" memory "$size_bytes"

memlend_uri="nbd+unix:///bench?socket=$workdir/memlend.sock"
memlend_processes=(borrower lender1 lender2)  # memlend's CPU is all three daemons'
nbdkit_uri="nbd+unix:///bench?socket=$workdir/nbdkit.sock"

# One line on where the borrower's pages are, from `memlend status --json`.
borrower_status_line() {
  status_json borrower >"$workdir/borrower-status.json"
  python3 - "$workdir/borrower-status.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
p = s["devices"][0]["pages"]
local = s["local_store"]
share = 100 * p["remote"] / p["mapped"] if p["mapped"] else 0
peers = ", ".join("%s %s %d pages rtt %d us" % (q["address"], q["state"], q["pages_stored"], q["rtt_us"])
                  for q in s["peers"])
print("borrower: %d pages mapped: %d remote (%.1f%%), %d local, %d disk; local store %d of %d KiB, "
      "%d evictions so far; peers: %s"
      % (p["mapped"], p["remote"], share, p["local"], p["disk"], local["used_bytes"] >> 10,
         local["total_bytes"] >> 10, local["evicted_pages"], peers))
EOF
}

# --- Prefill -----------------------------------------------------------------------------------

bench_prefill
# Let the borrower's evictor finish (at most about 10 s) before measuring.
previous=
for _ in $(seq 40); do
  current=$(status_json borrower |
    python3 -c 'import json, sys; s = json.load(sys.stdin); print(s["local_store"]["evicted_pages"], s["devices"][0]["pages"])')
  [[ $current == "$previous" ]] && break
  previous=$current
  sleep 0.25
done
echo "After prefill: $(borrower_status_line)"

# --- Measure -----------------------------------------------------------------------------------

bench_measure

# --- Report ------------------------------------------------------------------------------------

bench_print_machine
echo "Setup: device $size ($size_bytes bytes); memlend = borrower with a $local_store local store" \
  "and two lenders of $((lend_bytes >> 20)) MiB on 127.0.0.1 TCP; nbdkit memory; clients over unix" \
  "sockets; median of $repeat runs of ${runtime}s each, 4 KiB blocks, fio ioengine=nbd, numjobs=1"
echo "At the end: $(borrower_status_line)"
bench_print_table
