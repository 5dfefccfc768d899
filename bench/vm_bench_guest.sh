#!/usr/bin/env bash
# vm_bench_guest.sh — the guest half of bench/vm_bench.sh; runs inside the VM:
#     tests/vm/run --mem 2048 bench/vm_bench_guest.sh MEMLEND SIZE_MIB RUNTIME REPEAT
# Attaches two memlend devices of SIZE_MIB to one daemon (its local store holds both, so no
# page leaves RAM), one through ublk and one through the kernel's NBD client, and makes a loop
# device on a tmpfs file of the same size as the reference. fio (io_uring, O_DIRECT, one job)
# measures 4 KiB random reads and writes at queue depth 1 and 32 on each, REPEAT times in turns,
# and the table shows medians and the ublk/NBD and ublk/loop ratios.
set -euo pipefail
ml_prefix="vm_bench_guest.sh: "
source "$(dirname "${BASH_SOURCE[0]}")/../tests/vm/guest_lib.sh"
require_vm

[[ $# -eq 4 ]] || fail "usage: vm_bench_guest.sh MEMLEND SIZE_MIB RUNTIME REPEAT"
memlend=$1
size_mib=$2
runtime=$3
repeat=$4
command -v fio >/dev/null || skip "fio is not installed"

vm_require_module ublk_drv
vm_require_module nbd nbds_max=4
vm_require_module loop
vm_wait_path /dev/ublk-control || fail "no /dev/ublk-control"
vm_wait_path /dev/nbd0 || fail "no /dev/nbd0"

make_workdir vm-bench
devices=()
bench_cleanup() {
  [[ -z ${loop_device:-} ]] || losetup -d "$loop_device" 2>/dev/null || true
  ml_cleanup
}
trap bench_cleanup EXIT

start_daemon bench --local-store "$((size_mib * 2 + 64))M" --compress none
for frontend in ublk nbd; do
  devices+=("$("$memlend" attach "b$frontend" --size "${size_mib}M" --frontend "$frontend" \
    --control "$workdir/bench.control")")
done
truncate -s "${size_mib}M" /tmp/loop-reference
loop_device=$(losetup -f --show /tmp/loop-reference)
devices+=("$loop_device")
names=(ublk nbd loop)
echo "devices: ublk ${devices[0]}, nbd ${devices[1]}, loop ${devices[2]} (tmpfs file)"

# Prefill, so that reads hit stored pages.
for device in "${devices[@]}"; do
  fio --eta=never --name=prefill --filename="$device" --rw=write --bs=1M --iodepth=8 --ioengine=io_uring \
    --direct=1 --size="${size_mib}M" >/dev/null
done

results=$workdir/results
mkdir -p "$results"
for workload in randread randwrite; do
  for qd in 1 32; do
    for ((rep = 1; rep <= repeat; rep++)); do
      for i in "${!devices[@]}"; do
        echo "  $workload qd=$qd ${names[$i]} run $rep/$repeat (${runtime}s)..."
        fio --eta=never --name=bench --filename="${devices[$i]}" --rw="$workload" --bs=4k --iodepth="$qd" \
          --ioengine=io_uring --direct=1 --numjobs=1 --size="${size_mib}M" --time_based \
          --runtime="$runtime" --norandommap --randrepeat=0 --output-format=json \
          --output="$results/$workload-$qd-${names[$i]}-$rep.json"
      done
    done
  done
done

echo
echo "Guest: kernel $(uname -r), $(nproc) CPUs under TCG emulation, $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) MiB;" \
  "devices of $size_mib MiB; median of $repeat runs of ${runtime}s; fio io_uring, direct, 4 KiB, numjobs=1"
python3 - "$results" "$repeat" <<'EOF'
import json, statistics, sys
results, repeat = sys.argv[1], int(sys.argv[2])

def iops(workload, qd, name):
    runs = []
    for rep in range(1, repeat + 1):
        text = open(f"{results}/{workload}-{qd}-{name}-{rep}.json").read()
        job = json.loads(text[text.index("{"):])["jobs"][0]
        runs.append(job["read" if workload == "randread" else "write"]["iops"])
    return statistics.median(runs)

header = ("workload", "qd", "ublk IOPS", "nbd IOPS", "loop IOPS", "ublk/nbd", "ublk/loop")
rows = []
for workload in ("randread", "randwrite"):
    for qd in (1, 32):
        u, n, l = (iops(workload, qd, name) for name in ("ublk", "nbd", "loop"))
        rows.append((workload, str(qd), f"{u:.0f}", f"{n:.0f}", f"{l:.0f}",
                     f"{u / n:.2f}" if n else "n/a", f"{u / l:.2f}" if l else "n/a"))
widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
for row in [header, tuple("-" * w for w in widths)] + rows:
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
EOF

for frontend in ublk nbd; do
  "$memlend" detach "b$frontend" --control "$workdir/bench.control"
done
stop_daemon bench
