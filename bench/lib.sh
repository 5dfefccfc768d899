# shellcheck shell=bash source-path=SCRIPTDIR
# lib.sh — what nbd_bench.sh and peer_bench.sh share on top of scripts/lib.sh: the common
# options, the checks before a run, fio runs against memlend and nbdkit, and the table of medians.
#
# A benchmark sources it, may define bench_extra_option (see bench_parse_args), then calls
#     bench_parse_args "$@"; bench_check
# and after starting its servers sets memlend_uri and nbdkit_uri (and memlend_processes, the
# names under which start_daemon started every memlend daemon of the setup, for the CPU
# figures) and calls bench_prefill, bench_measure, bench_print_machine and bench_print_table.
#
# CPU per I/O: around each fio run, the user and system time of the server's processes (every
# memlend daemon of the setup, or nbdkit) is read from /proc/PID/stat; their sum over the run
# divided by the I/Os the run completed (its IOPS times its runtime, ramp included) is the
# server's CPU time per I/O. fio's own CPU is not counted.

ml_prefix="${0##*/}: "
# shellcheck source=../scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

# The common options' defaults.
runtime=5
repeat=3
size=1G
memlend=$ml_root/build/src/memlend

# Prints the script's usage: its header comment from "# Usage:" to the next bare "#".
bench_usage() {
  sed -n '/^# Usage:/,/^#$/{/^#$/d;s/^# \{0,1\}//;p;}' "$0"
  exit "${1:-0}"
}

# bench_parse_args ARGS...: sets runtime, repeat, size and memlend from --runtime, --repeat,
# --size and --memlend, prints the usage for -h/--help. Any other argument goes to the script's
# bench_extra_option ARGS... (if it has one), which returns 1 for an argument it does not know,
# else handles it and sets bench_shift to the number of words it took. An unknown argument prints
# the usage and exits 2.
bench_parse_args() {
  while [[ $# -gt 0 ]]; do
    bench_shift=2
    case $1 in
      --runtime) runtime=${2:?--runtime needs a value} ;;
      --repeat) repeat=${2:?--repeat needs a value} ;;
      --size) size=${2:?--size needs a value} ;;
      --memlend) memlend=${2:?--memlend needs a value} ;;
      -h | --help) bench_usage 0 ;;
      *)
        if ! declare -F bench_extra_option >/dev/null || ! bench_extra_option "$@"; then
          echo "${ml_prefix}unknown argument: $1" >&2
          bench_usage 2 >&2
        fi
        ;;
    esac
    shift "$bench_shift"
  done
}

# Skips (77) unless fio with the nbd ioengine, nbdkit and python3 are there; fails (1) on a bad
# option value or a memlend that is not executable. Sets size_bytes and makes $workdir.
bench_check() {
  require_fio_nbd
  command -v nbdkit >/dev/null || skip "nbdkit is not installed"
  [[ -x $memlend ]] || fail "memlend binary '$memlend' is not executable (build it, or pass --memlend)"
  [[ $runtime =~ ^[1-9][0-9]*$ ]] || fail "--runtime must be a positive number of seconds"
  [[ $repeat =~ ^[1-9][0-9]*$ ]] || fail "--repeat must be a positive number"
  size_bytes=$(to_bytes "$size") || exit 1
  ((size_bytes > 0 && size_bytes % 4096 == 0)) || fail "--size must be a positive multiple of 4 KiB"
  local name=${0##*/}
  make_workdir "memlend-${name%.sh}"
}

# to_bytes SIZE: prints SIZE (a number with an optional binary K/M/G/T suffix) in bytes.
to_bytes() {
  local text=$1 number unit
  [[ $text =~ ^([0-9]+)([KMGTkmgt]?)$ ]] || fail "bad size '$text'"
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

# bench_cpu_ticks SERVER: the user + system clock ticks so far of SERVER's processes (every
# daemon named in memlend_processes, or nbdkit).
bench_cpu_ticks() {
  local names=(nbdkit) name total=0 stat fields
  [[ $1 != memlend ]] || names=("${memlend_processes[@]:-memlend}")
  for name in "${names[@]}"; do
    stat=$(cat "/proc/${ml_pids[$name]:?no process named $name}/stat")
    # Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    read -r -a fields <<<"${stat##*) }"
    total=$((total + fields[11] + fields[12]))
  done
  echo "$total"
}

# bench_run_fio SERVER RESULT FIO_OPTIONS...: one fio job with the nbd ioengine against SERVER
# (memlend or nbdkit: $memlend_uri or $nbdkit_uri); its JSON goes to $workdir/RESULT.json and
# the server's CPU seconds during it to $workdir/RESULT.cpu.
bench_run_fio() {
  local server=$1 result=$2 uri=${nbdkit_uri:?} before after
  shift 2
  [[ $server != memlend ]] || uri=${memlend_uri:?}
  before=$(bench_cpu_ticks "$server")
  fio --name="$result" --ioengine=nbd --uri="$uri" --output-format=json \
    --output="$workdir/$result.json" "$@" 2>"$workdir/$result.stderr" ||
    fail "fio failed for $result: $(cat "$workdir/$result.stderr")"
  after=$(bench_cpu_ticks "$server")
  awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.3f\n", t / hz}' \
    >"$workdir/$result.cpu"
}

# Writes both whole devices once, sequentially, so that reads hit real data.
bench_prefill() {
  local server
  echo "Prefilling both devices ($size, sequential 1 MiB writes)..."
  for server in memlend nbdkit; do
    bench_run_fio "$server" "prefill-$server" --rw=write --bs=1M --iodepth=8 --size="$size_bytes"
  done
}

# Measures 4 KiB random reads and writes at queue depth 1 and 32, --repeat times each, the two
# servers taking turns (and swapping who goes first, so neither always runs on a warmer
# machine). Sets measurements for bench_print_table.
bench_measure() {
  local ramp=$((runtime >= 5 ? 1 : 0)) order=(memlend nbdkit) workload qd rep server
  measurements=()
  for workload in randread randwrite; do
    for qd in 1 32; do
      for ((rep = 1; rep <= repeat; rep++)); do
        for server in "${order[@]}"; do
          echo "  $workload qd=$qd $server run $rep/$repeat (${runtime}s)..."
          bench_run_fio "$server" "$workload-qd$qd-$server-$rep" --rw="$workload" --bs=4k \
            --iodepth="$qd" --numjobs=1 --size="$size_bytes" --time_based --runtime="$runtime" \
            --ramp_time="$ramp" --norandommap --randrepeat=0
        done
        order=("${order[1]}" "${order[0]}")  # the other server goes first next time
      done
      measurements+=("$workload:$qd")
    done
  done
}

# The lines on the machine and the versions that head the report.
bench_print_machine() {
  echo
  echo "Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')," \
    "kernel $(uname -r)"
  echo "Versions: $(fio --version), $(nbdkit --version | head -n1), memlend $memlend"
}

# The table: per workload and queue depth, the median IOPS and mean latency of each server and
# their ratios.
bench_print_table() {
  echo
  python3 - "$workdir" "$repeat" "$runtime" "${measurements[@]}" <<'EOF'
import json
import statistics
import sys

workdir, repeat, runtime, measurements = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
ramp = 1 if runtime >= 5 else 0  # as bench_measure

def one_run(workload, qd, server, rep):
    """Returns (IOPS, mean total latency in microseconds: submission + completion, server CPU
    microseconds per I/O) of one fio run."""
    name = f"{workdir}/{workload}-qd{qd}-{server}-{rep}"
    with open(f"{name}.json") as f:
        text = f.read()
    job = json.loads(text[text.index("{"):])["jobs"][0]  # fio may print notes before the JSON
    side = job["read" if workload.endswith("read") else "write"]
    with open(f"{name}.cpu") as f:
        cpu_s = float(f.read())
    ios = side["iops"] * (runtime + ramp)
    return side["iops"], side["lat_ns"]["mean"] / 1000.0, cpu_s * 1e6 / ios if ios else 0.0

def result(workload, qd, server):
    """Returns the medians of IOPS, mean latency and CPU per I/O over the repeated runs."""
    runs = [one_run(workload, qd, server, rep) for rep in range(1, repeat + 1)]
    return tuple(statistics.median(r[i] for r in runs) for i in range(3))

def ratio(a, b):
    return f"{a / b:.2f}" if b else "n/a"

header = ("workload", "qd", "memlend IOPS", "nbdkit IOPS", "IOPS ratio",
          "memlend lat us", "nbdkit lat us", "lat ratio",
          "memlend CPU us/IO", "nbdkit CPU us/IO", "CPU ratio")
rows = []
for measurement in measurements:
    workload, qd = measurement.split(":")
    m_iops, m_lat, m_cpu = result(workload, qd, "memlend")
    n_iops, n_lat, n_cpu = result(workload, qd, "nbdkit")
    rows.append((workload, qd, f"{m_iops:.0f}", f"{n_iops:.0f}", ratio(m_iops, n_iops),
                 f"{m_lat:.1f}", f"{n_lat:.1f}", ratio(m_lat, n_lat),
                 f"{m_cpu:.2f}", f"{n_cpu:.2f}", ratio(m_cpu, n_cpu)))

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
      "lat ratio = memlend / nbdkit (below 1: memlend faster);")
print("CPU us/IO = the server's user + system time per I/O, fio's own not counted "
      "(CPU ratio below 1: memlend uses less).")
EOF
}
