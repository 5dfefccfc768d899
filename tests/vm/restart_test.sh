#!/usr/bin/env bash
# restart_test.sh MEMLEND — runs in the VM (tests/vm/run): a ublk device outlives its daemon
# (docs/restart.md). The daemon runs with --state-dir, a small local store, a small lender
# (one copy per page) and a backing file, so pages are in RAM, on the lender and on disk;
# `memlend attach --frontend ublk` makes /dev/ublkbN.
#   1. fio (io_uring, O_DIRECT, randwrite then verify with crc32c) runs on the device; 2 s in,
#      the daemon is killed with -9 and started again on the same state directory: it takes
#      the device over (user recovery), the requests the kernel kept are reissued, and fio
#      ends with no error; the device node never disappears meanwhile.
#   2. The same with an upgrade restart: SIGTERM to a daemon started with --on-exit keep.
#   3. A verify-only pass over everything, a detach, and a stop that leaves nothing behind.
# It reports the time from kill -9 to the first completed I/O after the restart, and fio's
# maximum completion latency across each restart.
set -euo pipefail

memlend=${1:?usage: restart_test.sh MEMLEND}
source "${MEMLEND_VM_REPO:?run this through tests/vm/run}/tests/vm/guest_lib.sh"
require_vm
make_workdir memlend-restart-vm
command -v fio >/dev/null || fail "fio is missing in the guest"
vm_require_module ublk_drv
vm_wait_path /dev/ublk-control || fail "no /dev/ublk-control"

# Pages in three places: a 16 MiB local store, a lender of 32 MiB (one copy each), and the
# backing file for what neither holds.
port=$(free_port)
start_daemon lender --lend 32M --listen "127.0.0.1:$port"
state=$workdir/state
args=(--local-store 16M --backing-file "$workdir/backing.img" --peer "127.0.0.1:$port"
  --redundancy none --state-dir "$state")
start_daemon borrower "${args[@]}"
control=$workdir/borrower.control
attach_began=$(date +%s.%N)
dev=$("$memlend" attach d0 --size 128M --frontend ublk --control "$control")
[[ -b $dev ]] || fail "attach printed '$dev', which is not a block device"
echo "attached d0 as $dev in $(python3 -c "import sys,time; print(int((time.time() - float(sys.argv[1])) * 1000))" "$attach_began") ms (for comparison with a restart's time)"

# watch_node: in the background, notes in $workdir/node_gone any moment the node is missing.
watch_node() {
  while [[ ! -e $workdir/stop_watch ]]; do
    [[ -b $dev ]] || date +%s.%N >>"$workdir/node_gone"
    sleep 0.05
  done
}
watch_node &
watcher=$!

# run_fio NAME ARGS...: fio on the device with crc32c verification, JSON in $workdir/NAME.json.
run_fio() {
  local name=$1
  shift
  fio --name="$name" --filename="$dev" --ioengine=io_uring --direct=1 --iodepth=16 \
    --bsrange=4k-64k --size=96M --verify=crc32c --verify_fatal=1 --verify_state_save=0 \
    --randrepeat=1 --clocksource=clock_gettime --eta=never --output-format=json --output="$workdir/$name.json" "$@"
}
# check_fio NAME [LATENCY]: no error; with LATENCY, the completion latencies too (fio's
# figures for a --verify_only pass are not the reads' own, so that one shows none).
check_fio() {
  python3 - "$workdir/$1.json" "$1" "${2:-}" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
worst = max(job["read"]["clat_ns"]["max"], job["write"]["clat_ns"]["max"]) // 1000000
p99 = max(job["read"]["clat_ns"].get("percentile", {}).get("99.000000", 0),
          job["write"]["clat_ns"].get("percentile", {}).get("99.000000", 0)) // 1000
latency = f", completion latency p99 {p99} us, max {worst} ms" if sys.argv[3] else ""
print(f"  fio {sys.argv[2]}: error {job['error']}, read {job['read']['io_bytes']} bytes, "
      f"written {job['write']['io_bytes']} bytes{latency}")
sys.exit(0 if job["error"] == 0 else 1)
EOF
}
# probe NAME: in the background until $workdir/NAME.stop exists, reads one 4 KiB block
# (O_DIRECT) every 20 ms and logs each read's start and end (epoch seconds) to $workdir/NAME.log.
probe() {
  python3 - "$dev" "$workdir/$1.log" "$workdir/$1.stop" <<'EOF' &
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
with open(sys.argv[2], "w") as log:
    while not os.path.exists(sys.argv[3]):
        began = time.time()
        os.preadv(fd, [buf], 0)
        log.write(f"{began} {time.time()}\n")
        log.flush()
        time.sleep(0.02)
EOF
  probe_pid=$!
}
# probe_report NAME SINCE: stops the probe; prints the longest read and when the first read
# that ended after SINCE (the kill) ended, in ms after SINCE.
probe_report() {
  touch "$workdir/$1.stop"
  wait "$probe_pid"
  python3 - "$workdir/$1.log" "$2" <<'EOF'
import sys
since = float(sys.argv[2])
reads = [tuple(map(float, line.split())) for line in open(sys.argv[1])]
longest = max(end - began for began, end in reads)
first = min(end for began, end in reads if end > since)
print(f"  first read completed {int((first - since) * 1000)} ms after the daemon was stopped; "
      f"the longest read took {int(longest * 1000)} ms ({len(reads)} reads)")
EOF
}
# wait_pages CONTROL N: until the device holds N pages (fio has written that much).
wait_pages() {
  for _ in $(seq 600); do
    (($("$memlend" status --json --control "$1" | python3 -c "import json,sys; print(json.load(sys.stdin)['devices'][0]['pages']['mapped'])") >= $2)) && return 0
    sleep 0.1
  done
  fail "the device never held $2 pages"
}

echo "1. kill -9 of the daemon while fio writes and verifies"
run_fio crash --rw=randwrite --do_verify=1 &
fio_pid=$!
wait_pages "$control" 4000
kill -0 "$fio_pid" 2>/dev/null || fail "fio ended before the daemon was killed; make the job longer"
probe crash
killed_at=$(date +%s.%N)
kill -KILL "${ml_pids[borrower]}"
wait "${ml_pids[borrower]}" 2>/dev/null || true
unset "ml_pids[borrower]"
echo "  the daemon was gone $(python3 -c "import sys,time; print(int((time.time() - float(sys.argv[1])) * 1000))" "$killed_at") ms after kill -9"
start_daemon borrower2 "${args[@]}" --on-exit keep
grep -E 'recover|took over|taken over|resumed' "$workdir/borrower2.stderr" | sed 's/^/  borrower2: /'
probe_report crash "$killed_at"
wait "$fio_pid" || { cat "$workdir/crash.json"; fail "fio failed across kill -9 and restart"; }
check_fio crash latency || fail "fio reported an error across the restart"

echo "2. an upgrade restart: SIGTERM with --on-exit keep while fio runs"
run_fio upgrade --rw=randwrite --do_verify=1 --offset=0 &
fio_pid=$!
sleep 1
kill -0 "$fio_pid" 2>/dev/null || fail "fio ended before the daemon was stopped"
probe upgrade
stopped_at=$(date +%s.%N)
stop_daemon borrower2
grep -q "leaving d0" "$workdir/borrower2.stderr" || fail "the daemon did not leave d0: $(cat "$workdir/borrower2.stderr")"
start_daemon borrower3 "${args[@]}"
probe_report upgrade "$stopped_at"
wait "$fio_pid" || { cat "$workdir/upgrade.json"; fail "fio failed across the upgrade restart"; }
check_fio upgrade latency || fail "fio reported an error across the upgrade restart"

echo "3. verify-only over everything, detach, stop"
run_fio verify --rw=randwrite --verify_only || { cat "$workdir/verify.json"; fail "fio --verify_only failed"; }
check_fio verify || fail "fio --verify_only reported an error"
touch "$workdir/stop_watch"
wait "$watcher"
[[ ! -e $workdir/node_gone ]] || fail "$dev disappeared during the restarts ($(wc -l <"$workdir/node_gone") samples)"
echo "  $dev was there throughout"
"$memlend" status --control "$workdir/borrower3.control" | grep -q "d0" || fail "status does not show d0"
line=$("$memlend" status --control "$workdir/borrower3.control" | grep '^state:')
echo "  $line"
[[ $line == *"taken over 2 time(s)"* ]] || fail "status does not count the two restarts: $line"
line=$("$memlend" status --control "$workdir/borrower3.control" | grep '^d0: served across')
echo "  $line"
[[ $line == *"across 2 restart(s)"* ]] || fail "status does not count d0's two restarts: $line"
lost=$("$memlend" status --json --control "$workdir/borrower3.control" | python3 -c "import json,sys; print(json.load(sys.stdin)['remote_store']['lost_pages'])")
[[ $lost == 0 ]] || fail "$lost pages were lost across the restarts"
"$memlend" detach d0 --control "$workdir/borrower3.control" >/dev/null || fail "detach failed"
stop_daemon borrower3
[[ ! -e $state/state.json ]] || fail "state.json is still there after a stop"
[[ ! -e $dev ]] || fail "$dev is still there after detach and stop"
grep -v "^memlend: ready" "$workdir/borrower3.stderr" | tail -n 5 | sed 's/^/  borrower3: /'

echo "4. a restart whose state is corrupt: one line, and the device can be removed"
start_daemon lost "${args[@]}"
orphan=$("$memlend" attach d1 --size 16M --frontend ublk --control "$workdir/lost.control")
kill -KILL "${ml_pids[lost]}"
wait "${ml_pids[lost]}" 2>/dev/null || true
unset "ml_pids[lost]"
read -r -a ids <<<"$(python3 -c "import json,sys; s = json.load(open(sys.argv[1])); print(' '.join(str(i) for i in [s['arena_segment_id']] + [d['segment_id'] for d in s['attached']] + s.get('placement_chunks', [])))" "$state/state.json")"
echo '{"version": 1}' >"$state/state.json"
if "$memlend" daemon "${args[@]}" --control "$workdir/bad.control" 2>"$workdir/bad.stderr"; then
  fail "a daemon started on a corrupt state.json"
fi
[[ $(grep -c . "$workdir/bad.stderr") -le 2 ]] || fail "more than one line of complaint: $(cat "$workdir/bad.stderr")"
echo "  refused: $(grep -o 'state.json is not.*' "$workdir/bad.stderr" | head -c 100)"
[[ -b $orphan ]] || fail "$orphan went away with its daemon"
rm -rf "$state"
for id in "${ids[@]}"; do ipcrm -m "$id"; done
start_daemon fresh "${args[@]}"
"$memlend" detach "${orphan#/dev/}" --control "$workdir/fresh.control" >/dev/null ||
  fail "memlend detach ${orphan#/dev/} did not remove the orphaned device"
vm_wait_path_gone() { for _ in $(seq 50); do [[ -e $1 ]] || return 0; sleep 0.1; done; return 1; }
vm_wait_path_gone "$orphan" || fail "$orphan is still there after memlend detach"
echo "  memlend detach ${orphan#/dev/} removed $orphan, which no daemon served"
stop_daemon fresh
stop_daemon lender
echo "PASS: a ublk device survived kill -9 and an upgrade restart with fio verifying"
