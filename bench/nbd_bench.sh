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
# table shows the median of each: on a shared machine single runs swing by tens of percent. It compares IOPS and mean completion latency; a ratio above 1 means
# memlend has more IOPS, or a higher latency.
#
# Requires fio with the nbd engine, nbdkit and python3; exits 77 (skipped) with a message if one
# is missing. Everything started is stopped on exit, including on Ctrl-C.

set -euo pipefail

runtime=5
repeat=3
size=1G
script_dir=${BASH_SOURCE[0]%/*}
[[ $script_dir != "${BASH_SOURCE[0]}" ]] || script_dir=.
memlend=$script_dir/../build/src/memlend
transport=unix

usage() {
  sed -n '4,9p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --runtime) runtime=${2:?--runtime needs a value}; shift 2 ;;
    --repeat) repeat=${2:?--repeat needs a value}; shift 2 ;;
    --size) size=${2:?--size needs a value}; shift 2 ;;
    --memlend) memlend=${2:?--memlend needs a value}; shift 2 ;;
    --tcp) transport=tcp; shift ;;
    -h | --help) usage 0 ;;
    *) echo "nbd_bench.sh: unknown argument: $1" >&2; usage 2 >&2 ;;
  esac
done

skip() {
  echo "nbd_bench.sh: SKIPPED: $*"
  exit 77
}
die() {
  echo "nbd_bench.sh: $*" >&2
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
# The local store holds the whole device uncompressed with room to spare.
local_store_bytes=$((size_bytes + size_bytes / 4 + (64 << 20)))

workdir=$(mktemp -d "${TMPDIR:-/tmp}/memlend-bench.XXXXXX")
memlend_pid=
nbdkit_pid=

cleanup() {
  local pid
  for pid in $memlend_pid $nbdkit_pid; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in $memlend_pid $nbdkit_pid; do
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

# Waits (about 10 s at most) until an NBD server answers on the given address: unix:PATH or PORT.
wait_for_server() {
  local name=$1 address=$2 pid=$3
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || die "$name exited during startup: $(cat "$workdir/$name.stderr")"
    if python3 - "$address" <<'EOF'; then
import socket, sys
address = sys.argv[1]
if address.startswith("unix:"):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    target = address[5:]
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    target = ("127.0.0.1", int(address))
try:
    s.connect(target)
except OSError:
    sys.exit(1)
EOF
      return 0
    fi
    sleep 0.1
  done
  die "$name did not accept connections within 10 s: $(cat "$workdir/$name.stderr")"
}

# --- Start both servers ------------------------------------------------------------------------

if [[ $transport == unix ]]; then
  memlend_nbd=unix:$workdir/memlend.sock
  memlend_uri="nbd+unix:///bench?socket=$workdir/memlend.sock"
  memlend_wait=$memlend_nbd
  nbdkit_listen=(-U "$workdir/nbdkit.sock")
  nbdkit_uri="nbd+unix:///bench?socket=$workdir/nbdkit.sock"
  nbdkit_wait=unix:$workdir/nbdkit.sock
else
  memlend_port=$(free_port)
  nbdkit_port=$(free_port)
  memlend_nbd=127.0.0.1:$memlend_port
  memlend_uri="nbd://127.0.0.1:$memlend_port/bench"
  memlend_wait=$memlend_port
  nbdkit_listen=(-i 127.0.0.1 -p "$nbdkit_port")
  nbdkit_uri="nbd://127.0.0.1:$nbdkit_port/bench"
  nbdkit_wait=$nbdkit_port
fi

"$memlend" daemon --device "bench:$size_bytes" --nbd "$memlend_nbd" \
  --local-store "$local_store_bytes" --compress none --control "$workdir/control.sock" \
  2>"$workdir/memlend.stderr" &
memlend_pid=$!
nbdkit -f "${nbdkit_listen[@]}" memory "$size_bytes" 2>"$workdir/nbdkit.stderr" &
nbdkit_pid=$!
wait_for_server memlend "$memlend_wait" "$memlend_pid"
wait_for_server nbdkit "$nbdkit_wait" "$nbdkit_pid"

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

# --- Prefill -----------------------------------------------------------------------------------

echo "Prefilling both devices ($size, sequential 1 MiB writes)..."
for server in memlend nbdkit; do
  run_fio "$server" "prefill-$server" --rw=write --bs=1M --iodepth=8 --size="$size_bytes"
done

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
echo "Setup: device $size ($size_bytes bytes) over $transport, median of $repeat runs of" \
  "${runtime}s each, 4 KiB blocks, fio ioengine=nbd, numjobs=1"
echo

python3 - "$workdir" "$repeat" "${measurements[@]}" <<'EOF'
import json
import statistics
import sys

workdir, repeat, measurements = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def one_run(workload, qd, server, rep):
    """Returns (IOPS, mean total latency in microseconds: submission + completion) of one fio run."""
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
