#!/bin/bash
# lender_death_bench.sh — a borrower on three lenders with --redundancy replicas:2 and with
# none, in the same run: steady-state IOPS of each, and replicas:2's throughput before, during
# and after one lender's death (kill -9) in the middle of a run.
#
# Usage: bench/lender_death_bench.sh [--runtime SECONDS] [--repeat N] [--size SIZE] [--death-runtime SECONDS] [--rebuild-rate PAGES] [--memlend PATH]
#   --runtime SECONDS        time of each steady-state fio measurement (default 5)
#   --repeat N               steady-state measurements per mode and workload, interleaved;
#                            medians are shown (default 3)
#   --size SIZE              device size, with an optional K/M/G/T suffix (default 256M)
#   --death-runtime SECONDS  length of the run in which a lender dies, a third of the way in
#                            (default 30)
#   --rebuild-rate PAGES     the borrowers' --rebuild-rate (default: the daemon's, 5000)
#   --memlend PATH           memlend binary (default build/src/memlend next to this script)
#
# For each mode, three lenders (`--lend`, each with room for the whole device plus 16 MiB, so
# that the two copies of every page still fit on the two lenders left after one dies) and a borrower with a 4 MiB local store
# run on this host, on free 127.0.0.1 TCP ports; clients reach the borrower over a unix socket.
# The device is prefilled sequentially, so nearly every page lives on the lenders. Steady state:
# fio's nbd ioengine measures 4 KiB random reads and random writes at queue depth 32, one job,
# the two modes taking turns. Then, with replicas:2, one time-based 4 KiB random read/write run
# (70% reads) at depth 32 with a per-second IOPS log; a third of the way in, one lender is killed
# with SIGKILL. Its seconds are split into before the kill, during the rebuild (until `memlend
# status` shows no degraded page) and after it; the table shows each phase's mean IOPS and its
# change from before. fio verifies nothing here (the fault tests do); its error count is shown.
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
rebuild_rate=
memlend=$ml_root/build/src/memlend
while [[ $# -gt 0 ]]; do
  case $1 in
    --runtime) runtime=${2:?--runtime needs a value} ;;
    --repeat) repeat=${2:?--repeat needs a value} ;;
    --size) size=${2:?--size needs a value} ;;
    --death-runtime) death_runtime=${2:?--death-runtime needs a value} ;;
    --rebuild-rate) rebuild_rate=${2:?--rebuild-rate needs a value} ;;
    --memlend) memlend=${2:?--memlend needs a value} ;;
    -h | --help) sed -n '/^# Usage:/,/^#$/{/^#$/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    *) echo "${ml_prefix}unknown argument: $1" >&2; exit 2 ;;
  esac
  shift 2
done
require_fio_nbd
[[ -x $memlend ]] || fail "memlend binary '$memlend' is not executable (build it, or pass --memlend)"
for number in "$runtime" "$repeat" "$death_runtime"; do
  [[ $number =~ ^[1-9][0-9]*$ ]] || fail "--runtime, --repeat and --death-runtime take positive numbers"
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

# start_mode MODE: three lenders and a borrower for `--redundancy MODE`, named after it.
declare -A uri=()
start_mode() {
  local mode=$1 tag=${1//:/} ports=() i
  for i in 1 2 3; do
    ports+=("$(free_port)")
    start_daemon "$tag-lender$i" --lend "$lend_bytes" --listen "127.0.0.1:${ports[-1]}"
  done
  start_daemon "$tag-borrower" --device "bench:$size_bytes" --nbd "unix:$workdir/$tag.sock" \
    --local-store 4M --compress none --redundancy "$mode" ${rebuild_rate:+--rebuild-rate "$rebuild_rate"} \
    --peer "127.0.0.1:${ports[0]}" --peer "127.0.0.1:${ports[1]}" --peer "127.0.0.1:${ports[2]}"
  uri[$mode]="nbd+unix:///bench?socket=$workdir/$tag.sock"
}
# run_fio MODE RESULT FIO_OPTIONS...
run_fio() {
  local mode=$1 result=$2
  shift 2
  fio --name="$result" --ioengine=nbd --uri="${uri[$mode]}" --output-format=json \
    --output="$workdir/$result.json" "$@" 2>"$workdir/$result.stderr" ||
    fail "fio failed for $result: $(cat "$workdir/$result.stderr")"
}
# remote_line MODE: where the borrower's pages are.
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

echo "A lender's death (replicas:2, ${death_runtime}s of 70/30 random read/write at depth 32)..."
kill_at=$((death_runtime / 3))
(cd "$workdir" && fio --name=death --ioengine=nbd --uri="${uri[replicas:2]}" --rw=randrw \
  --rwmixread=70 --bs=4k --iodepth=32 --numjobs=1 --size="$size_bytes" --time_based \
  --runtime="$death_runtime" --norandommap --randrepeat=0 --write_iops_log=death \
  --log_avg_msec=1000 --output-format=json --output="$workdir/death.json" \
  2>"$workdir/death.stderr") &
fio_pid=$!
start=$(date +%s.%N)
sleep "$kill_at"
killed=$(date +%s.%N)
echo "  $(remote_line replicas:2)"
echo "  kill -9 of a lender at ${kill_at}s"
kill -KILL "${ml_pids[replicas2-lender1]}"
wait "${ml_pids[replicas2-lender1]}" 2>/dev/null || true
unset 'ml_pids[replicas2-lender1]'
rebuilt=
ticks=0
while kill -0 "$fio_pid" 2>/dev/null; do
  if [[ -z $rebuilt ]] && ((ticks++ % 10 == 9)); then echo "  $(remote_line replicas:2)"; fi
  if [[ -z $rebuilt ]] && status_json replicas2-borrower | python3 -c '
import json, sys
s = json.load(sys.stdin)
r = s["remote_store"]
down = [p for p in s["peers"] if p["state"] == "down"]
sys.exit(0 if down and down[0]["pages_stored"] == 0 and r["degraded_pages"] == 0 else 1)'; then
    rebuilt=$(date +%s.%N)
    echo "  rebuild done at $(python3 -c "print(f'{$rebuilt - $start:.1f}')")s: $(remote_line replicas:2)"
  fi
  sleep 0.2
done
wait "$fio_pid" || fail "fio failed in the death run: $(head -n 5 "$workdir/death.stderr")"
[[ -n $rebuilt ]] || echo "  the rebuild did not finish within the run: $(remote_line replicas:2)"

echo
echo "Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r)"
echo "Versions: $(fio --version), memlend $memlend"
echo "Setup: device $size; borrower with a 4 MiB local store and three lenders of $((lend_bytes >> 20)) MiB on 127.0.0.1 TCP; client over a unix socket; fio ioengine=nbd, 4 KiB, depth 32, one job"
python3 - "$workdir" "$repeat" "$start" "$killed" "${rebuilt:-0}" <<'EOF'
import glob, json, statistics, sys
d, repeat = sys.argv[1], int(sys.argv[2])
start, killed, rebuilt = float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
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
# Per-second IOPS of the death run: read and write logs, summed per second.
per_second = {}
for path in glob.glob(f"{d}/death_iops.*.log"):
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
death = json.load(open(f"{d}/death.json"))["jobs"][0]
print("\nA lender's death (replicas:2): kill -9 at %.1f s, rebuild done at %s"
      % (kill_s, "%.1f s" % rebuilt_s if rebuilt_s else "(not within the run)"))
print("phase    seconds  mean IOPS  vs before")
print("-------  -------  ---------  ---------")
before = statistics.mean(phases["before"]) if phases["before"] else 0
for name, values in phases.items():
    if not values:
        print(f"{name:7}  {0:7}  {'-':>9}  {'-':>9}")
        continue
    mean = statistics.mean(values)
    change = f"{100 * (mean - before) / before:+.1f}%" if before else "-"
    print(f"{name:7}  {len(values):7}  {mean:9.0f}  {change:>9}")
print(f"fio errors in the death run: {death['error']}; slowest completion "
      f"{max(death['read']['clat_ns']['max'], death['write']['clat_ns']['max']) / 1e6:.1f} ms")
print("per second: " + " ".join(str(v) for _, v in sorted(per_second.items())))
EOF
