#!/bin/bash
# lender_death_bench.sh — a borrower on three lenders with --redundancy replicas:2 and with
# none, in the same run: steady-state IOPS of each, and replicas:2's throughput before, during
# and after one lender's death (kill -9) in the middle of a run, over several such runs.
#
# Usage: bench/lender_death_bench.sh [--runtime SECONDS] [--repeat N] [--size SIZE] [--death-runtime SECONDS] [--deaths N] [--rebuild-rate PAGES] [--memlend PATH]
#   --runtime SECONDS        time of each steady-state fio measurement (default 5)
#   --repeat N               steady-state measurements per mode and workload, interleaved;
#                            medians are shown (default 3)
#   --size SIZE              device size, with an optional K/M/G/T suffix (default 256M)
#   --death-runtime SECONDS  length of the run in which a lender dies, a third of the way in
#                            (default 30)
#   --deaths N               runs in which a lender dies, each on a fresh borrower and three
#                            fresh lenders; the summary gives their medians (default 3)
#   --rebuild-rate PAGES     the borrowers' --rebuild-rate (default: the daemon's, 5000)
#   --memlend PATH           memlend binary (default build/src/memlend next to this script)
#
# For each mode, three lenders (`--lend`, each with room for the whole device plus 16 MiB, so
# that the two copies of every page still fit on the two lenders left after one dies) and a borrower with a 4 MiB local store
# run on this host, on free 127.0.0.1 TCP ports; clients reach the borrower over a unix socket.
# The device is prefilled sequentially, so nearly every page lives on the lenders. Steady state:
# fio's nbd ioengine measures 4 KiB random reads and random writes at queue depth 32, one job,
# the two modes taking turns. Then, --deaths times, with replicas:2 on a fresh set of daemons
# (prefilled the same way; the steady-state ones are stopped first), one time-based 4 KiB random
# read/write run (70% reads) at depth 32 with a per-second IOPS log; a third of the way in, one
# lender is killed with SIGKILL. Its seconds are split into before the kill, during the rebuild
# (until `memlend status` shows no degraded page) and after it; the table shows each phase's
# mean IOPS and its change from before, per run, and the medians of those changes. This host is
# shared and noisy: one run's change swings by 10-20 points either way. fio verifies nothing
# here (the fault tests do); its error count is shown.
#
# Requires fio with the nbd engine and python3; exits 77 (skipped) with a message if one is
# missing. Everything started is stopped on exit, including on Ctrl-C.
set -euo pipefail

ml_prefix="${0##*/}: "
# shellcheck source=../scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
runtime=5
repeat=3
size=256M
death_runtime=30
deaths=3
rebuild_rate=
memlend=$ml_root/build/src/memlend
while [[ $# -gt 0 ]]; do
  case $1 in
    --runtime) runtime=${2:?--runtime needs a value} ;;
    --repeat) repeat=${2:?--repeat needs a value} ;;
    --size) size=${2:?--size needs a value} ;;
    --death-runtime) death_runtime=${2:?--death-runtime needs a value} ;;
    --deaths) deaths=${2:?--deaths needs a value} ;;
    --rebuild-rate) rebuild_rate=${2:?--rebuild-rate needs a value} ;;
    --memlend) memlend=${2:?--memlend needs a value} ;;
    -h | --help) sed -n '/^# Usage:/,/^#$/{/^#$/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    *) echo "${ml_prefix}unknown argument: $1" >&2; exit 2 ;;
  esac
  shift 2
done
require_fio_nbd
[[ -x $memlend ]] || fail "memlend binary '$memlend' is not executable (build it, or pass --memlend)"
for number in "$runtime" "$repeat" "$death_runtime" "$deaths"; do
  [[ $number =~ ^[1-9][0-9]*$ ]] || fail "--runtime, --repeat, --death-runtime and --deaths take positive numbers"
done
((death_runtime >= 9)) || fail "--death-runtime must be at least 9 seconds"
[[ $size =~ ^([0-9]+)([KMGT]?)$ ]] || fail "bad size '$size'"
case ${BASH_REMATCH[2]} in
  K) size_bytes=$((BASH_REMATCH[1] << 10)) ;; M) size_bytes=$((BASH_REMATCH[1] << 20)) ;;
  G) size_bytes=$((BASH_REMATCH[1] << 30)) ;; T) size_bytes=$((BASH_REMATCH[1] << 40)) ;;
  *) size_bytes=${BASH_REMATCH[1]} ;;
esac
((size_bytes > 0 && size_bytes % 4096 == 0)) || fail "--size must be a positive multiple of 4 KiB"
make_workdir memlend-lender-death-bench
superpage=$((2 << 20))
lend_bytes=$(((size_bytes + (16 << 20) + superpage - 1) / superpage * superpage))

# start_mode MODE [TAG]: three lenders and a borrower for `--redundancy MODE`, named after TAG
# (default: MODE); its URI is uri[TAG].
declare -A uri=()
start_mode() {
  local mode=$1 tag=${2:-${1//:/}} ports=() i
  for i in 1 2 3; do
    ports+=("$(free_port)")
    start_daemon "$tag-lender$i" --lend "$lend_bytes" --listen "127.0.0.1:${ports[-1]}"
  done
  start_daemon "$tag-borrower" --device "bench:$size_bytes" --nbd "unix:$workdir/$tag.sock" \
    --local-store 4M --compress none --redundancy "$mode" ${rebuild_rate:+--rebuild-rate "$rebuild_rate"} \
    --peer "127.0.0.1:${ports[0]}" --peer "127.0.0.1:${ports[1]}" --peer "127.0.0.1:${ports[2]}"
  uri[${2:-$mode}]="nbd+unix:///bench?socket=$workdir/$tag.sock"
}
# stop_mode TAG: the borrower, then its lenders (which then have nobody to wait for).
stop_mode() {
  local name
  stop_daemon "$1-borrower"
  for name in "${!ml_pids[@]}"; do
    [[ $name != "$1"-lender* ]] || stop_daemon "$name"
  done
}
# run_fio MODE RESULT FIO_OPTIONS...
run_fio() {
  local mode=$1 result=$2
  shift 2
  fio --name="$result" --ioengine=nbd --uri="${uri[$mode]}" --output-format=json \
    --output="$workdir/$result.json" "$@" 2>"$workdir/$result.stderr" ||
    fail "fio failed for $result: $(cat "$workdir/$result.stderr")"
}
# remote_line TAG: where the borrower's pages are.
remote_line() {
  status_json "${1//:/}-borrower" | python3 -c '
import json, sys
s = json.load(sys.stdin)
p, r = s["devices"][0]["pages"], s["remote_store"]
peers = ", ".join("%s %d" % (q["state"], q["pages_stored"]) for q in s["peers"])
print("%d of %d pages remote, %d copies, %d degraded, %d lost, %d rebuilt; peers: %s"
      % (p["remote"], p["mapped"], r["copies"], r["degraded_pages"], r["lost_pages"],
         r["rebuilt_copies"], peers))'
}

modes=(none replicas:2)
for mode in "${modes[@]}"; do start_mode "$mode"; done
echo "Prefilling both devices ($size, sequential 1 MiB writes)..."
for mode in "${modes[@]}"; do
  run_fio "$mode" "prefill-${mode//:/}" --rw=write --bs=1M --iodepth=8 --size="$size_bytes"
done
sleep 2  # the evictors settle
for mode in "${modes[@]}"; do echo "  $mode: $(remote_line "$mode")"; done

echo "Steady state..."
order=("${modes[@]}")
for workload in randread randwrite; do
  for ((rep = 1; rep <= repeat; rep++)); do
    for mode in "${order[@]}"; do
      echo "  $workload qd=32 $mode run $rep/$repeat (${runtime}s)..."
      run_fio "$mode" "$workload-${mode//:/}-$rep" --rw="$workload" --bs=4k --iodepth=32 \
        --numjobs=1 --size="$size_bytes" --time_based --runtime="$runtime" --ramp_time=1 \
        --norandommap --randrepeat=0
    done
    order=("${order[1]}" "${order[0]}")
  done
done

for mode in "${modes[@]}"; do stop_mode "${mode//:/}"; done

# death_run K: a fresh replicas:2 set, prefilled, and a run in which its lender1 dies. Leaves
# the times in $workdir/death$K.times (start, kill, rebuild done or 0).
death_run() {
  local k=$1 tag=death$1 fio_pid start killed rebuilt= ticks=0
  start_mode replicas:2 "$tag"
  run_fio "$tag" "prefill-$tag" --rw=write --bs=1M --iodepth=8 --size="$size_bytes"
  sleep 2  # the evictor settles
  echo "A lender's death, run $k/$deaths (replicas:2, ${death_runtime}s of 70/30 random read/write at depth 32)..."
  (cd "$workdir" && fio --name="$tag" --ioengine=nbd --uri="${uri[$tag]}" --rw=randrw \
    --rwmixread=70 --bs=4k --iodepth=32 --numjobs=1 --size="$size_bytes" --time_based \
    --runtime="$death_runtime" --norandommap --randrepeat=0 --write_iops_log="$tag" \
    --log_avg_msec=1000 --output-format=json --output="$workdir/$tag.json" \
    2>"$workdir/$tag.stderr") &
  fio_pid=$!
  start=$(date +%s.%N)
  sleep "$kill_at"
  killed=$(date +%s.%N)
  echo "  $(remote_line "$tag")"
  echo "  kill -9 of a lender at ${kill_at}s"
  kill -KILL "${ml_pids[$tag-lender1]}"
  wait "${ml_pids[$tag-lender1]}" 2>/dev/null || true
  unset "ml_pids[$tag-lender1]"
  while kill -0 "$fio_pid" 2>/dev/null; do
    if [[ -z $rebuilt ]] && ((ticks++ % 10 == 9)); then echo "  $(remote_line "$tag")"; fi
    if [[ -z $rebuilt ]] && status_json "$tag-borrower" | python3 -c '
import json, sys
s = json.load(sys.stdin)
r = s["remote_store"]
down = [p for p in s["peers"] if p["state"] == "down"]
sys.exit(0 if down and down[0]["pages_stored"] == 0 and r["degraded_pages"] == 0 else 1)'; then
      rebuilt=$(date +%s.%N)
      echo "  rebuild done at $(python3 -c "print(f'{$rebuilt - $start:.1f}')")s: $(remote_line "$tag")"
    fi
    sleep 0.2
  done
  wait "$fio_pid" || fail "fio failed in death run $k: $(head -n 5 "$workdir/$tag.stderr")"
  [[ -n $rebuilt ]] || echo "  the rebuild did not finish within the run: $(remote_line "$tag")"
  echo "$start $killed ${rebuilt:-0}" >"$workdir/$tag.times"
  stop_mode "$tag"
}
kill_at=$((death_runtime / 3))
for ((k = 1; k <= deaths; k++)); do death_run "$k"; done

echo
echo "Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r)"
echo "Versions: $(fio --version), memlend $memlend"
echo "Setup: device $size; borrower with a 4 MiB local store and three lenders of $((lend_bytes >> 20)) MiB on 127.0.0.1 TCP; client over a unix socket; fio ioengine=nbd, 4 KiB, depth 32, one job"
python3 - "$workdir" "$repeat" "$deaths" <<'EOF'
import glob, json, statistics, sys
d, repeat, deaths = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def iops(name):
    job = json.load(open(f"{d}/{name}.json"))["jobs"][0]
    return job["read"]["iops"] + job["write"]["iops"]
print("\nSteady state (median of %d runs)" % repeat)
print("workload   qd  none IOPS  replicas:2 IOPS  ratio")
print("---------  --  ---------  ---------------  -----")
for workload in ("randread", "randwrite"):
    none = statistics.median(iops(f"{workload}-none-{r}") for r in range(1, repeat + 1))
    rep = statistics.median(iops(f"{workload}-replicas2-{r}") for r in range(1, repeat + 1))
    print(f"{workload:9}  32  {none:9.0f}  {rep:15.0f}  {rep / none:5.2f}")

def phases_of(k):
    start, killed, rebuilt = (float(x) for x in open(f"{d}/death{k}.times").read().split())
    # Per-second IOPS: read and write logs, summed per second.
    per_second = {}
    for path in glob.glob(f"{d}/death{k}_iops.*.log"):
        for line in open(path):
            fields = [f.strip() for f in line.split(",")]
            second = int(fields[0]) // 1000
            per_second[second] = per_second.get(second, 0) + int(fields[1])
    kill_s = killed - start
    rebuilt_s = rebuilt - start if rebuilt else None
    phases = {"before": [], "during": [], "after": []}
    for second, value in sorted(per_second.items()):
        t = second - 0.5  # the log's second N covers (N-1, N]
        if t < kill_s - 1:
            phases["before"].append(value)
        elif rebuilt_s is None or t < rebuilt_s + 1:
            if t > kill_s:
                phases["during"].append(value)
        else:
            phases["after"].append(value)
    job = json.load(open(f"{d}/death{k}.json"))["jobs"][0]
    slowest = max(job["read"]["clat_ns"]["max"], job["write"]["clat_ns"]["max"]) / 1e6
    return kill_s, rebuilt_s, phases, job["error"], slowest, per_second

print("\nA lender's death (replicas:2), per run: mean IOPS per phase and its change from before")
print("run  kill s  rebuilt s  before IOPS  during IOPS  change  after IOPS  change  errors  slowest ms")
print("---  ------  ---------  -----------  -----------  ------  ----------  ------  ------  ----------")
changes = {"during": [], "after": []}
lines = []
for k in range(1, deaths + 1):
    kill_s, rebuilt_s, phases, errors, slowest, per_second = phases_of(k)
    before = statistics.mean(phases["before"]) if phases["before"] else 0
    cells = []
    for name in ("during", "after"):
        if phases[name] and before:
            mean = statistics.mean(phases[name])
            change = 100 * (mean - before) / before
            changes[name].append(change)
            cells.append(f"{mean:11.0f}  {change:+5.1f}%")
        else:
            cells.append(f"{'-':>11}  {'-':>6}")
    rebuilt_text = f"{rebuilt_s:9.1f}" if rebuilt_s else f"{'-':>9}"
    print(f"{k:3}  {kill_s:6.1f}  {rebuilt_text}  {before:11.0f}  {cells[0]}  {cells[1]}  {errors:6}  {slowest:10.1f}")
    lines.append(f"run {k} per second: " + " ".join(str(v) for _, v in sorted(per_second.items())))
for name in ("during", "after"):
    if changes[name]:
        print(f"median change {name}: {statistics.median(changes[name]):+.1f}% "
              f"(runs: {', '.join(f'{c:+.1f}%' for c in changes[name])})")
for line in lines:
    print(line)
EOF
