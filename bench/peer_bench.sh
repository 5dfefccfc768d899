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
# device plus 16 MiB, so together they hold all of it with slack for partly used superpages)
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
# 1: memlend faster).
#
# Requires fio with the nbd engine, nbdkit and python3; exits 77 (skipped) with a message if one
# is missing. Everything started is stopped on exit, including on Ctrl-C.

set -euo pipefail

runtime=5
repeat=3
size=1G
local_store=4M
script_dir=${BASH_SOURCE[0]%/*}
[[ $script_dir != "${BASH_SOURCE[0]}" ]] || script_dir=.
memlend=$script_dir/../build/src/memlend

usage() {
  sed -n '4,9p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --runtime) runtime=${2:?--runtime needs a value}; shift 2 ;;
    --repeat) repeat=${2:?--repeat needs a value}; shift 2 ;;
    --size) size=${2:?--size needs a value}; shift 2 ;;
    --local-store) local_store=${2:?--local-store needs a value}; shift 2 ;;
    --memlend) memlend=${2:?--memlend needs a value}; shift 2 ;;
    -h | --help) usage 0 ;;
    *) echo "peer_bench.sh: unknown argument: $1" >&2; usage 2 >&2 ;;
  esac
done

skip() {
  echo "peer_bench.sh: SKIPPED: $*"
  exit 77
}
die() {
  echo "peer_bench.sh: $*" >&2
  exit 1
}

command -v fio >/dev/null || skip "fio is not installed"
fio --enghelp=nbd 2>/dev/null | grep -q '^uri' || skip "fio has no nbd ioengine (built without libnbd)"
command -v nbdkit >/dev/null || skip "nbdkit is not installed"
command -v python3 >/dev/null || skip "python3 is needed to read fio's JSON output"
[[ -x $memlend ]] || die "memlend binary '$memlend' is not executable (build it, or pass --memlend)"
[[ $runtime =~ ^[1-9][0-9]*$ ]] || die "--runtime must be a positive number of seconds"
[[ $repeat =~ ^[1-9][0-9]*$ ]] || die "--repeat must be a positive number"

# SIZE with an optional binary suffix -> bytes.
to_bytes() {
  local text=$1 number unit
  [[ $text =~ ^([0-9]+)([KMGTkmgt]?)$ ]] || die "bad size '$text'"
  number=${BASH_REMATCH[1]}
  unit=${BASH_REMATCH[2]^^}
  case $unit in
    K) echo $((number << 10)) ;;
    M) echo $((number << 20)) ;;
    G) echo $((number << 30)) ;;
    T) echo $((number << 40)) ;;
    *) echo "$number" ;;
  esac
}

size_bytes=$(to_bytes "$size")
((size_bytes > 0 && size_bytes % 4096 == 0)) || die "--size must be a positive multiple of 4 KiB"
local_store_bytes=$(to_bytes "$local_store")
((local_store_bytes >= 1 << 20)) || die "--local-store must be at least 1M"
# Each lender: 5/8 of the device + 16 MiB, rounded up to whole 2 MiB superpages.
superpage=$((2 << 20))
lend_bytes=$(((size_bytes * 5 / 8 + (16 << 20) + superpage - 1) / superpage * superpage))

workdir=$(mktemp -d "${TMPDIR:-/tmp}/memlend-peer-bench.XXXXXX")
pids=()

cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Returns a TCP port on 127.0.0.1 that is free right now.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Returns 0 if the unix socket at $1 accepts connections.
socket_accepts() {
  python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError:
    sys.exit(1)
EOF
}

# Waits (about 10 s at most) until $name is ready: its stderr has the ready line (memlend) or
# its unix socket $2 accepts connections (nbdkit).
wait_for() {
  local name=$1 socket=$2 pid=$3
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || die "$name exited during startup: $(cat "$workdir/$name.stderr")"
    if [[ $name == nbdkit ]]; then
      socket_accepts "$socket" && return 0
    elif grep -q 'memlend: ready:' "$workdir/$name.stderr" && socket_accepts "$socket"; then
      return 0
    fi
    sleep 0.1
  done
  die "$name was not ready within 10 s: $(cat "$workdir/$name.stderr")"
}

# --- Start the servers -------------------------------------------------------------------------

lender_ports=()
for name in lender1 lender2; do
  port=$(free_port)
  lender_ports+=("$port")
  "$memlend" daemon --lend "$lend_bytes" --listen "127.0.0.1:$port" \
    --control "$workdir/$name.control" 2>"$workdir/$name.stderr" &
  pids+=($!)
  wait_for "$name" "$workdir/$name.control" $!
done
"$memlend" daemon --device "bench:$size_bytes" --nbd "unix:$workdir/memlend.sock" \
  --local-store "$local_store_bytes" --compress none --control "$workdir/borrower.control" \
  --peer "127.0.0.1:${lender_ports[0]}" --peer "127.0.0.1:${lender_ports[1]}" \
  2>"$workdir/borrower.stderr" &
pids+=($!)
wait_for borrower "$workdir/borrower.control" $!
nbdkit -f -U "$workdir/nbdkit.sock" memory "$size_bytes" 2>"$workdir/nbdkit.stderr" &
pids+=($!)
wait_for nbdkit "$workdir/nbdkit.sock" $!

memlend_uri="nbd+unix:///bench?socket=$workdir/memlend.sock"
nbdkit_uri="nbd+unix:///bench?socket=$workdir/nbdkit.sock"
uri_of() {
  if [[ $1 == memlend ]]; then echo "$memlend_uri"; else echo "$nbdkit_uri"; fi
}

# Runs one fio job against a server; its JSON goes to $workdir/RESULT.json.
#   run_fio SERVER RESULT fio-options...
run_fio() {
  local server=$1 result=$2
  shift 2
  fio --name="$result" --ioengine=nbd --uri="$(uri_of "$server")" --output-format=json \
    --output="$workdir/$result.json" "$@" 2>"$workdir/$result.stderr" ||
    die "fio failed for $result: $(cat "$workdir/$result.stderr")"
}

# One line on where the borrower's pages are, from `memlend status --json`.
borrower_status_line() {
  "$memlend" status --control "$workdir/borrower.control" --json >"$workdir/borrower-status.json"
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

echo "Prefilling both devices ($size, sequential 1 MiB writes)..."
for server in memlend nbdkit; do
  run_fio "$server" "prefill-$server" --rw=write --bs=1M --iodepth=8 --size="$size_bytes"
done
# Let the borrower's evictor finish (at most about 10 s) before measuring.
previous=
for _ in $(seq 40); do
  current=$("$memlend" status --control "$workdir/borrower.control" --json |
    python3 -c 'import json, sys; s = json.load(sys.stdin); print(s["local_store"]["evicted_pages"], s["devices"][0]["pages"])')
  [[ $current == "$previous" ]] && break
  previous=$current
  sleep 0.25
done
echo "After prefill: $(borrower_status_line)"

# --- Measure -----------------------------------------------------------------------------------

ramp=$((runtime >= 5 ? 1 : 0))
order=(memlend nbdkit)
measurements=()
for workload in randread randwrite; do
  for qd in 1 32; do
    for ((rep = 1; rep <= repeat; rep++)); do
      for server in "${order[@]}"; do
        echo "  $workload qd=$qd $server run $rep/$repeat (${runtime}s)..."
        run_fio "$server" "$workload-qd$qd-$server-$rep" --rw="$workload" --bs=4k \
          --iodepth="$qd" --numjobs=1 --size="$size_bytes" --time_based --runtime="$runtime" \
          --ramp_time="$ramp" --norandommap --randrepeat=0
      done
      order=("${order[1]}" "${order[0]}")  # the other server goes first next time
    done
    measurements+=("$workload:$qd")
  done
done

# --- Report ------------------------------------------------------------------------------------

echo
echo "Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')," \
  "kernel $(uname -r)"
echo "Versions: $(fio --version), $(nbdkit --version | head -n1), memlend $memlend"
echo "Setup: device $size ($size_bytes bytes); memlend = borrower with a $local_store local store" \
  "and two lenders of $((lend_bytes >> 20)) MiB on 127.0.0.1 TCP; nbdkit memory; clients over unix" \
  "sockets; median of $repeat runs of ${runtime}s each, 4 KiB blocks, fio ioengine=nbd, numjobs=1"
echo "At the end: $(borrower_status_line)"
echo

python3 - "$workdir" "$repeat" "${measurements[@]}" <<'EOF'
import json
import statistics
import sys

workdir, repeat, measurements = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def one_run(workload, qd, server, rep):
    """Returns (IOPS, mean total latency in microseconds) of one fio run."""
    with open(f"{workdir}/{workload}-qd{qd}-{server}-{rep}.json") as f:
        text = f.read()
    job = json.loads(text[text.index("{"):])["jobs"][0]  # fio may print notes before the JSON
    side = job["read" if workload.endswith("read") else "write"]
    return side["iops"], side["lat_ns"]["mean"] / 1000.0

def result(workload, qd, server):
    """Returns the median IOPS and median mean latency over the repeated runs."""
    runs = [one_run(workload, qd, server, rep) for rep in range(1, repeat + 1)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)

def ratio(a, b):
    return f"{a / b:.2f}" if b else "n/a"

header = ("workload", "qd", "memlend IOPS", "nbdkit IOPS", "IOPS ratio",
          "memlend lat us", "nbdkit lat us", "lat ratio")
rows = []
for measurement in measurements:
    workload, qd = measurement.split(":")
    m_iops, m_lat = result(workload, qd, "memlend")
    n_iops, n_lat = result(workload, qd, "nbdkit")
    rows.append((workload, qd, f"{m_iops:.0f}", f"{n_iops:.0f}", ratio(m_iops, n_iops),
                 f"{m_lat:.1f}", f"{n_lat:.1f}", ratio(m_lat, n_lat)))

widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
def line(row):
    cells = [str(cell).ljust(w) if i == 0 else str(cell).rjust(w)
             for i, (cell, w) in enumerate(zip(row, widths))]
    return "  ".join(cells)
print(line(header))
print("  ".join("-" * w for w in widths))
for row in rows:
    print(line(row))
print()
print("IOPS ratio = memlend / nbdkit (above 1: memlend faster); "
      "lat ratio = memlend / nbdkit (below 1: memlend faster).")
EOF
