#!/usr/bin/env bash
# swap_bench.sh — swap in a real kernel: memlend against zram, brd and kernel NBD to nbdkit,
# in the same boot.
#
# Usage: bench/swap_bench.sh [--boots N] [--size MIB] [--limit MIB] [--rows LIST] [--memlend PATH] [--logs DIR]
#   --boots N      guest boots; each runs every row once, and the table shows medians (default 1)
#   --size MIB     memory the workload writes and verifies (default 384)
#   --limit MIB    the memory cgroup's memory.high (default 96)
#   --rows LIST    comma-separated, from zram,brd,local,lender,lenders2,nbdkit (default all;
#                  zram is always run first, as the reference)
#   --memlend PATH memlend binary (default build/src/memlend next to this script)
#   --logs DIR     keep each boot's whole console log in DIR (boot-N.log)
#
# Each row is a swap device of 2 x SIZE: zram (lz4), brd (the kernel's RAM disk), memlend ublk
# with every page in its local store ("local"), with a 16 MiB local store and one lender in the
# guest at --redundancy none ("lender"), with two lenders and replicas:2 ("lenders2"), and the
# kernel's NBD client to `nbdkit memory` ("nbdkit"; not locked in memory, it may hang as swap,
# and gives up after 300 s). Two workloads in a memory cgroup: memory_pattern writing and
# verifying SIZE in one thread ("single"), and 4 threads of one process, each on its own quarter,
# at once ("4threads"). Prints
# seconds, the ratio to zram's, how long the pattern took to write its memory and to read it
# back, pages swapped, and memlend's peer round trips per swapped page.
# The guest runs under TCG emulation, its 2 vCPUs on one host thread: absolute times are far above a real
# machine's; compare the ratios. Exits 77 (skipped) when the VM harness cannot run.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
boots=1
size=384
limit=96
rows=zram,brd,local,lender,lenders2,nbdkit
memlend=$here/../build/src/memlend
logs=
while [[ $# -gt 0 ]]; do
  case $1 in
    --boots) boots=${2:?}; shift 2 ;;
    --size) size=${2:?}; shift 2 ;;
    --limit) limit=${2:?}; shift 2 ;;
    --rows) rows=${2:?}; shift 2 ;;
    --memlend) memlend=${2:?}; shift 2 ;;
    --logs) logs=${2:?}; shift 2 ;;
    -h | --help) sed -n '/^# Usage:/,/^#$/{/^#$/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    *) echo "swap_bench.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done
[[ $boots =~ ^[1-9][0-9]*$ && $size =~ ^[1-9][0-9]*$ && $limit =~ ^[1-9][0-9]*$ ]] ||
  { echo "swap_bench.sh: --boots, --size and --limit take positive numbers" >&2; exit 2; }
((limit < size)) || { echo "swap_bench.sh: --limit must be below --size" >&2; exit 2; }
[[ $rows =~ ^[a-z0-9,]+$ ]] || { echo "swap_bench.sh: bad --rows" >&2; exit 2; }
rows=zram$(echo "$rows" | tr , '\n' | grep -vx zram | sed 's/^/,/' | tr -d '\n')
[[ -x $memlend ]] || { echo "swap_bench.sh: $memlend is not executable (build first)" >&2; exit 1; }
memlend=$(cd "$(dirname "$memlend")" && pwd)/$(basename "$memlend")
# The nbdkit row needs nbd-client (the guest runs the host's programs).
if [[ ,$rows, == *,nbdkit,* ]] && ! command -v nbd-client >/dev/null && [[ $(id -u) -eq 0 ]]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nbd-client >/dev/null 2>&1 ||
    echo "swap_bench.sh: nbd-client could not be installed; the nbdkit row will be skipped" >&2
fi

out=$(mktemp -d /tmp/swap-bench.XXXXXX)
trap 'rm -rf "$out"' EXIT
# Memory: the lenders hold the whole workload (twice with replicas:2), besides the cgroup.
mem=$((size * 4 + 1024))
for ((boot = 1; boot <= boots; boot++)); do
  echo "boot $boot/$boots: rows $rows, $size MiB in a $limit MiB cgroup" >&2
  bash "$here/../tests/vm/run" --mem "$mem" --timeout 3600 \
    "$here/swap_bench_guest.sh" "$memlend" "$size" "$limit" "$rows" | tee "$out/boot-$boot.log" |
    grep --line-buffered -E '^SWAPBENCH|^PERF|^[a-z0-9]+: |status:|FAIL' >&2 || true
  status=${PIPESTATUS[0]}
  [[ $status -ne 77 ]] || exit 77
  if [[ -n $logs ]]; then
    mkdir -p "$logs"
    cp "$out/boot-$boot.log" "$logs/"
  fi
  ((status == 0)) || echo "boot $boot: the guest script failed (status $status)${logs:+; its log is $logs/boot-$boot.log}" >&2
done

python3 - "$out" "$boots" "$rows" "$size" "$limit" <<'EOF'
import glob, re, statistics, sys
out, boots, rows, size, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4], sys.argv[5]
runs = {}
for path in sorted(glob.glob(f"{out}/boot-*.log")):
    for line in open(path, errors="replace"):
        if not line.startswith("SWAPBENCH "):
            continue
        f = dict(kv.split("=", 1) for kv in line.split()[1:])
        runs.setdefault((f["row"], f["workload"]), []).append(f)
names = {"zram": "zram (lz4)", "brd": "brd (kernel RAM disk)", "local": "memlend ublk, pages local",
         "lender": "memlend ublk, pages on a lender", "lenders2": "memlend ublk, two lenders, replicas:2",
         "nbdkit": "kernel NBD to nbdkit memory"}
print(f"\nswap: memory_pattern over {size} MiB in a cgroup with memory.high = {limit} MiB; "
      f"median of {boots} boot(s); guest: 2 vCPUs on one TCG thread")
header = ("device", "workload", "seconds", "vs zram", "write s", "read s", "swapped in", "swapped out",
          "trips/page", "runs")
table = []
for workload in ("single", "4threads"):
    ref = None
    for row in rows:
        fs = runs.get((row, workload), [])
        done = [f for f in fs if f.get("ok") == "1"]
        if not fs or fs[0].get("skipped"):
            table.append((names.get(row, row), workload, "skipped", "", "", "", "", "", "",
                          fs[0]["skipped"] if fs else "not run"))
            continue
        if not done:
            table.append((names.get(row, row), workload, "did not finish", "", "", "", "", "", "",
                          f"0/{len(fs)}"))
            continue
        sec = statistics.median(float(f["seconds"]) for f in done)
        if row == "zram":
            ref = sec
        sin = statistics.median(int(f["swapin"]) for f in done)
        sout = statistics.median(int(f["swapout"]) for f in done)
        trips = [int(f["trips"]) / max(1, int(f["swapin"]) + int(f["swapout"])) for f in done if f["trips"] != "-"]
        phase = lambda key: (f"{statistics.median(float(f[key]) for f in done):.1f}"
                             if all(key in f for f in done) else "-")
        table.append((names.get(row, row), workload, f"{sec:.1f}", f"{sec / ref:.2f}" if ref else "n/a",
                      phase("write_s"), phase("read_s"),
                      f"{sin:.0f}", f"{sout:.0f}", f"{statistics.median(trips):.3f}" if trips else "-",
                      f"{len(done)}/{len(fs)}"))
widths = [max(len(r[i]) for r in [header] + table) for i in range(len(header))]
for r in [header, tuple("-" * w for w in widths)] + table:
    print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
EOF
