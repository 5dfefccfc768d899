#!/usr/bin/env bash
# swap_bench_guest.sh — the guest half of bench/swap_bench.sh; runs inside the VM:
#     tests/vm/run --mem MIB bench/swap_bench_guest.sh MEMLEND SIZE_MIB LIMIT_MIB ROWS
# For each row of ROWS (comma-separated, from: zram brd local lender lenders2 nbdkit) makes a
# swap device of 2 x SIZE_MIB, swapon's it alone, and times two workloads in a cgroup-v2
# memory cgroup with memory.high = LIMIT_MIB: memory_pattern writing and verifying SIZE_MIB in
# one thread ("single"), then the same with 4 threads, each on its own quarter, faulting at
# once ("4threads"). Prints one machine-readable line per measurement:
#     SWAPBENCH row=ROW workload=W seconds=S swapin=PAGES swapout=PAGES trips=N write_s=S read_s=S ok=0|1
# (trips: memlend's peer round trips during the workload, - for other devices; write_s and
# read_s: how long the pattern took to write its memory and to read it back, the slowest
# process's).
# Rows: zram (lz4), brd (the kernel's RAM disk), local (memlend ublk, every page in its local
# store), lender (memlend ublk, 16 MiB local store, one lender in the guest, --redundancy
# none), lenders2 (two lenders, replicas:2), nbdkit (kernel NBD to `nbdkit memory`; not locked
# in memory, so it may hang as swap: it runs with the hung-task check off and gives up after
# 300 s, reported as ok=0).
# With MEMLEND_SWAP_DISCARD=pages|once|both, every device is swapon'd with --discard=that.
# With MEMLEND_SWAP_PERF=1, each memlend row's single workload (and nbdkit's) runs under `perf record -a -g`
# (software clock sampling: TCG has no PMU) and a report by process and symbol follows it;
# with MEMLEND_SWAP_PERF=sched, under `perf sched record`, and the time each thread spent
# asleep is summed by the kernel stack it slept in.
set -euo pipefail
ml_prefix="swap_bench_guest.sh: "
source "$(dirname "${BASH_SOURCE[0]}")/../tests/vm/guest_lib.sh"
require_vm

[[ $# -eq 4 ]] || fail "usage: swap_bench_guest.sh MEMLEND SIZE_MIB LIMIT_MIB ROWS"
memlend=$1
size_mib=$2
limit_mib=$3
IFS=, read -r -a rows <<<"$4"
pattern=$(dirname "$memlend")/../tests/tools/memory_pattern
[[ -x $pattern ]] || fail "memory_pattern is not built next to $memlend ($pattern)"
grep -qw memory /sys/fs/cgroup/cgroup.controllers || skip "no memory cgroup controller"
swap_mib=$((size_mib * 2))

make_workdir swap-bench
memcg=/sys/fs/cgroup/swap-bench
swap_device=
bench_cleanup() {
  [[ -z $swap_device ]] || swapoff "$swap_device" 2>/dev/null || true
  rmdir "$memcg" 2>/dev/null || true
  ml_cleanup
}
trap bench_cleanup EXIT
grep -qw memory /sys/fs/cgroup/cgroup.subtree_control || echo +memory >/sys/fs/cgroup/cgroup.subtree_control
mkdir -p "$memcg"
echo $((limit_mib << 20)) >"$memcg/memory.high"
# The daemons talk over sockets whose buffers the kernel allocates without waiting for
# reclaim; keep a reserve for them (docs/attach.md).
echo 16384 >/proc/sys/vm/min_free_kbytes

vmstat_field() { awk -v f="$1" '$1 == f {print $2}' /proc/vmstat; }

# memlend's peer round trips so far (reads and writes, every device), or - without a daemon.
trips() {
  [[ -n ${control:-} ]] || { echo -; return; }
  "$memlend" status --json --control "$control" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(sum(d["io"]["remote_read_trips"] + d["io"]["remote_write_trips"] for d in s["devices"]))'
}

# run_workload ROW NAME DEADLINE_S COMMAND...: runs COMMAND (which starts the pattern
# processes) in the memory cgroup, times it, and prints the SWAPBENCH line.
run_workload() {
  local row=$1 name=$2 deadline=$3 per=$4 count=$5 threads=${6:-1} start end in0 out0 t0 t1 ok=1 pids=() pid
  local perf_pid= watchdog
  in0=$(vmstat_field pswpin)
  out0=$(vmstat_field pswpout)
  t0=$(trips)
  local perf_mode=${MEMLEND_SWAP_PERF:-0}
  rm -f "$workdir"/pattern.*
  if [[ $perf_mode != 0 && $name == single && ($t0 != - || $row == nbdkit) ]] && command -v perf >/dev/null; then
    if [[ $perf_mode == sched ]]; then
      perf sched record -g -o "$workdir/perf.data" >/dev/null 2>"$workdir/perf.log" &
    else
      perf record -a -g -F 499 -o "$workdir/perf.data" >/dev/null 2>"$workdir/perf.log" &
    fi
    perf_pid=$!
    sleep 1
  fi
  start=$(date +%s.%N)
  for ((i = 0; i < count; i++)); do
    bash -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$memcg" "$pattern" "$per" $((i + 1)) 1 "$threads" >"$workdir/pattern.$i" 2>&1 &
    pids+=($!)
  done
  # No polling loop (a process started every 0.2 s costs the guest's one emulated CPU
  # thread a few percent): one sleeping watchdog kills the workload at its deadline.
  (sleep "$deadline" && kill -KILL "${pids[@]}" 2>/dev/null) &
  watchdog=$!
  for pid in "${pids[@]}"; do
    wait "$pid" || ok=0
  done
  end=$(date +%s.%N)
  kill "$watchdog" 2>/dev/null || true
  wait "$watchdog" 2>/dev/null || true
  if [[ -n $perf_pid ]]; then
    kill -INT "$perf_pid"
    wait "$perf_pid" || true
    if [[ $perf_mode == sched ]]; then
      # Off-CPU time by thread and the kernel stack it slept in (perf sched timehist).
      echo "PERF row=$row: time asleep, by thread and where it slept"
      perf sched timehist -i "$workdir/perf.data" -g --state 2>/dev/null |
        python3 "$(dirname "${BASH_SOURCE[0]}")/offcpu_summary.py" | head -60 | sed 's/^/PERF /'
    else
      echo "PERF row=$row: by process"
      perf report -i "$workdir/perf.data" --stdio --no-children --sort comm -g none 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -20 | sed 's/^/PERF /'
      echo "PERF row=$row: by process and symbol"
      perf report -i "$workdir/perf.data" --stdio --no-children --sort comm,sym -g none 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -70 | sed 's/^/PERF /'
    fi
    rm -f "$workdir/perf.data"
  fi
  t1=$(trips)
  [[ $t0 == - ]] || t1=$((t1 - t0))
  # The pattern's two phases (the slowest process's, for several): writing (swap-out) and
  # reading back (swap-in).
  local phases
  phases=$(sed -n 's/.*(writing \([0-9.]*\) s, reading back \([0-9.]*\) s).*/\1 \2/p' "$workdir"/pattern.* |
    awk 'BEGIN {w = 0; r = 0} {if ($1 > w) w = $1; if ($2 > r) r = $2} END {printf "write_s=%.1f read_s=%.1f", w, r}')
  echo "SWAPBENCH row=$row workload=$name seconds=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.1f", b - a}') swapin=$(($(vmstat_field pswpin) - in0)) swapout=$(($(vmstat_field pswpout) - out0)) trips=$t1 $phases ok=$ok"
  if ((ok == 0)); then
    cat "$workdir"/pattern.* >&2 || true
    return 1
  fi
}

measure() {
  local row=$1 deadline=${2:-1200} t0 discard=()
  [[ -z ${MEMLEND_SWAP_DISCARD:-} ]] || discard=("--discard=$MEMLEND_SWAP_DISCARD")
  mkswap "$swap_device" >/dev/null
  swapon "${discard[@]}" "$swap_device"
  echo "$row: swap on $swap_device ($(awk -v d="$swap_device" '$1 == d {print $3}' /proc/swaps) KiB)"
  run_workload "$row" single "$deadline" "$size_mib" 1 || return 1
  run_workload "$row" 4threads "$deadline" "$size_mib" 1 4 || return 1
  t0=$(date +%s.%N)
  swapoff "$swap_device"
  echo "$row: swapoff took $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s"
  swap_device=
}

for row in "${rows[@]}"; do
  control=
  case $row in
    zram)
      vm_require_module zram
      vm_wait_path /dev/zram0 || fail "no /dev/zram0"
      echo lz4 >/sys/block/zram0/comp_algorithm
      echo "${swap_mib}M" >/sys/block/zram0/disksize
      swap_device=/dev/zram0
      measure zram
      echo 1 >/sys/block/zram0/reset
      ;;
    brd)
      vm_require_module brd rd_nr=1 rd_size=$((swap_mib * 1024))
      vm_wait_path /dev/ram0 || fail "no /dev/ram0"
      swap_device=/dev/ram0
      measure brd
      # The RAM disk keeps every page written to it until the module goes: give it back
      # before the next rows lock their memory.
      vm_modprobe -r brd || echo "brd: could not unload it; its pages stay in use"
      ;;
    local | lender | lenders2)
      vm_require_module ublk_drv
      vm_wait_path /dev/ublk-control || fail "no /dev/ublk-control"
      peers=()
      attach=()
      store=$((swap_mib + 64))M
      if [[ $row != local ]]; then
        store=16M
        port=$(free_port)
        start_daemon "lend1-$row" --lend "$((swap_mib + 32))M" --listen "127.0.0.1:$port"
        peers=(--peer "127.0.0.1:$port" --redundancy none)
      fi
      if [[ $row == lenders2 ]]; then
        port=$(free_port)
        start_daemon "lend2-$row" --lend "$((swap_mib + 32))M" --listen "127.0.0.1:$port"
        peers+=(--peer "127.0.0.1:$port")
        attach=(--redundancy replicas:2)
      fi
      start_daemon "borrow-$row" --local-store "$store" "${peers[@]}"
      control=$workdir/borrow-$row.control
      swap_device=$("$memlend" attach swap0 --size "${swap_mib}M" --frontend ublk "${attach[@]}" --control "$control")
      measure "$row"
      "$memlend" status --json --control "$control" >"$workdir/status-$row.json"
      python3 - "$workdir/status-$row.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
d = s["devices"][0]
print(f"  status: pages {d['pages']}, io {d['io']}")
EOF
      "$memlend" detach swap0 --control "$control"
      for name in "borrow-$row" "lend1-$row" "lend2-$row"; do
        [[ -z ${ml_pids[$name]:-} ]] || stop_daemon "$name"
      done
      control=
      ;;
    nbdkit)
      command -v nbdkit >/dev/null || { echo "SWAPBENCH row=nbdkit workload=single skipped=no-nbdkit"; continue; }
      command -v nbd-client >/dev/null || { echo "SWAPBENCH row=nbdkit workload=single skipped=no-nbd-client"; continue; }
      vm_require_module nbd nbds_max=2
      vm_wait_path /dev/nbd0 || fail "no /dev/nbd0"
      port=$(free_port)
      start_server nbdkit "127.0.0.1:$port" nbdkit -f -i 127.0.0.1 -p "$port" memory "${swap_mib}M"
      nbd-client 127.0.0.1 "$port" /dev/nbd0 -b 4096 >/dev/null
      # It may stall for minutes as swap; that is a result, not kernel trouble.
      echo 0 >/proc/sys/kernel/hung_task_timeout_secs
      swap_device=/dev/nbd0
      if measure nbdkit 300; then
        nbd-client -d /dev/nbd0 >/dev/null
        kill "${ml_pids[nbdkit]}"
        wait "${ml_pids[nbdkit]}" 2>/dev/null || true
        unset 'ml_pids[nbdkit]'
      else
        echo "nbdkit: gave up after 300 s; leaving it as it is"
        trap - EXIT
        exit 0
      fi
      ;;
    *) fail "unknown row '$row'" ;;
  esac
done
