#!/bin/bash
# nbd_bench.sh — memlend's NBD server against nbdkit's memory plugin, in the same run.
#
# Usage: bench/nbd_bench.sh [--runtime SECONDS] [--repeat N] [--size SIZE] [--memlend PATH] [--tcp]
#   --runtime SECONDS  time of each fio measurement (default 5)
#   --repeat N         measurements per server and workload, interleaved; medians are shown (default 3)
#   --size SIZE        device size, with an optional K/M/G/T suffix (binary; default 1G)
#   --memlend PATH     memlend binary (default build/src/memlend next to this script)
#   --tcp              serve over 127.0.0.1 on free ports instead of unix sockets
#
# Both servers are started side by side on the same transport: `memlend daemon` with one device
# `bench` and a local store larger than the device (so nothing spills), and `nbdkit memory`, the
# reference NBD RAM disk. Both are prefilled by a sequential write pass so that reads hit real
# data. Then fio's nbd ioengine (libnbd, no kernel involved) measures 4 KiB random reads and
# random writes at queue depth 1 and 32, one job each, time based, alternating between the two
# servers (and swapping who goes first from one workload to the next, so neither always runs on
# a warmer machine). Each cell is measured --repeat times, the two servers taking turns, and the
# table shows the median of each: on a shared machine single runs swing by tens of percent. It
# compares IOPS, mean completion latency and each server's CPU time (user + system, from /proc)
# per I/O; a ratio above 1 means memlend has more IOPS, a higher latency, or uses more CPU.
#
# Requires fio with the nbd engine, nbdkit and python3; exits 77 (skipped) with a message if one
# is missing. Everything started is stopped on exit, including on Ctrl-C.

set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
transport=unix
bench_extra_option() {
  case $1 in
    --tcp) transport=tcp; bench_shift=1 ;;
    *) return 1 ;;
  esac
}
bench_parse_args "$@"
bench_check
# The local store holds the whole device uncompressed with room to spare.
local_store_bytes=$((size_bytes + size_bytes / 4 + (64 << 20)))

# --- Start both servers ------------------------------------------------------------------------

if [[ $transport == unix ]]; then
  memlend_nbd=unix:$workdir/memlend.sock
  memlend_uri="nbd+unix:///bench?socket=$workdir/memlend.sock"
  nbdkit_listen=(-U "$workdir/nbdkit.sock")
  nbdkit_uri="nbd+unix:///bench?socket=$workdir/nbdkit.sock"
  nbdkit_address=unix:$workdir/nbdkit.sock
else
  memlend_port=$(free_port)
  nbdkit_port=$(free_port)
  memlend_nbd=127.0.0.1:$memlend_port
  memlend_uri="nbd://127.0.0.1:$memlend_port/bench"
  nbdkit_listen=(-i 127.0.0.1 -p "$nbdkit_port")
  nbdkit_uri="nbd://127.0.0.1:$nbdkit_port/bench"
  nbdkit_address=127.0.0.1:$nbdkit_port
fi

start_daemon memlend --device "bench:$size_bytes" --nbd "$memlend_nbd" ${MEMLEND_BENCH_DAEMON_ARGS:-} \
  --local-store "$local_store_bytes" --compress none
start_server nbdkit "$nbdkit_address" nbdkit -f "${nbdkit_listen[@]}" memory "$size_bytes"
memlend_processes=(memlend)

# --- Prefill and measure -----------------------------------------------------------------------

bench_prefill
bench_measure

# --- Report ------------------------------------------------------------------------------------

bench_print_machine
echo "Setup: device $size ($size_bytes bytes) over $transport, median of $repeat runs of" \
  "${runtime}s each, 4 KiB blocks, fio ioengine=nbd, numjobs=1"
bench_print_table
