#!/usr/bin/env bash
# ublk_vm_bench.sh — 4 KiB random I/O on a memlend ublk device, inside the VM:
#     tests/vm/run --mem 2048 bench/ublk_vm_bench.sh UBLK_SERVE [RUNTIME_S [REPEAT]]
# UBLK_SERVE is the ublk_serve test program (build-dir/tests/ublk_serve). It serves a
# 512 MiB memlend Device (LocalStore-backed, nothing spills) as /dev/ublkbN, prefills it
# with a sequential write so reads hit real pages, and measures with fio (io_uring engine,
# direct=1, one job, time based, RUNTIME_S each, default 10) randread and randwrite at
# iodepth 1 and 32, REPEAT times each (default 3), printing the median IOPS. The kernel's
# RAM disk (brd) is measured the same way as a reference for what the (emulated) machine
# can do without a user-space server.
#
# The VM runs under TCG (no KVM on these hosts), so absolute numbers are far below real
# hardware's; the ratio to brd is the figure to watch.
set -euo pipefail
ml_prefix="ublk_vm_bench.sh: "
source "${MEMLEND_VM_REPO:?run this through tests/vm/run}/tests/vm/guest_lib.sh"
require_vm

serve=${1:?usage: ublk_vm_bench.sh UBLK_SERVE [RUNTIME_S [REPEAT]]}
runtime=${2:-10}
repeat=${3:-3}
[[ -x $serve ]] || fail "no ublk_serve program at $serve"
command -v fio >/dev/null || skip "fio is not installed"
command -v python3 >/dev/null || skip "python3 is needed to read fio's JSON output"
vm_require_module ublk_drv
vm_wait_path /dev/ublk-control || fail "/dev/ublk-control did not appear"

workdir=$(mktemp -d /tmp/ublk_bench.XXXXXX)
serve_pid=
cleanup() {
  [[ -z $serve_pid ]] || { kill -TERM "$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null; } || true
}
trap cleanup EXIT

size_mib=512
mkfifo "$workdir/in"
"$serve" "$size_mib" <"$workdir/in" >"$workdir/out" 2>"$workdir/err" &
serve_pid=$!
exec 7>"$workdir/in"
for _ in $(seq 100); do
  grep -q '^attached ' "$workdir/out" && break
  sleep 0.1
done
ublk=$(awk '/^attached / {print $2}' "$workdir/out")
[[ -n $ublk ]] || fail "ublk_serve did not attach: $(cat "$workdir/err")"
vm_wait_path "$ublk" || fail "$ublk did not appear"

devices=("$ublk")
if vm_modprobe brd rd_nr=1 rd_size=$((size_mib * 1024)) 2>/dev/null && vm_wait_path /dev/ram0; then
  devices+=(/dev/ram0)
fi
for device in "${devices[@]}"; do
  fio --name=prefill --filename="$device" --rw=write --bs=1M --iodepth=8 --ioengine=io_uring \
    --direct=1 --size=${size_mib}M --eta=never --output=/dev/null
done

# iops DEVICE RW DEPTH: one fio run; prints its IOPS.
iops() {
  fio --name=bench --filename="$1" --rw="$2" --bs=4k --iodepth="$3" --ioengine=io_uring \
    --direct=1 --size=${size_mib}M --time_based --runtime="$runtime" --ramp_time=1 \
    --norandommap --randrepeat=0 --output-format=json --output="$workdir/fio.json" ||
    fail "fio $2 iodepth $3 on $1 failed"
  python3 -c '
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
print(int(job["read"]["iops"] + job["write"]["iops"]))' "$workdir/fio.json"
}

median() { printf '%s\n' "$@" | sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

echo "kernel $(uname -r), $(nproc) CPUs; fio 4 KiB, io_uring, direct=1, ${runtime} s x $repeat, median IOPS"
printf '%-12s %-10s %8s %10s\n' DEVICE WORKLOAD IODEPTH IOPS
for rw in randread randwrite; do
  for depth in 1 32; do
    for device in "${devices[@]}"; do
      results=()
      for _ in $(seq "$repeat"); do results+=("$(iops "$device" "$rw" "$depth")"); done
      printf '%-12s %-10s %8s %10s   (runs: %s)\n' "$device" "$rw" "$depth" \
        "$(median "${results[@]}")" "${results[*]}"
    done
  done
done
echo quit >&7
wait "$serve_pid" || fail "ublk_serve exited with status $?"
serve_pid=
