#!/usr/bin/env bash
# restart.sh — a daemon with --state-dir that is killed (-9) or stopped with --on-exit keep
# serves the same pages when started again on the same state directory (docs/restart.md).
#
# Usage: restart.sh PATH_TO_MEMLEND
#
#   1. pages in the local store (lz4): fio writes with crc32c headers, kill -9, start again,
#      fio --verify_only over new NBD connections is clean;
#   2. pages spilled to a backing file (a 2 MiB local store, no peers): the same;
#   3. SIGTERM with --on-exit keep, start again: the same; then SIGTERM without it: the state
#      (state.json and its shared memory segments) is gone, and a daemon started afresh has
#      lost the data (fio --verify_only must fail: the negative control);
#   4. a restart with another --local-store, or with a state.json that is not one, stops at once
#      with one line naming the difference, and leaves the state for a daemon that matches.
# Exit status: 0 pass, 1 fail, 77 skipped (fio without the nbd engine, python3 missing, or no
# System V shared memory).
set -euo pipefail

memlend=${1:?usage: restart.sh PATH_TO_MEMLEND}
ml_prefix="restart.sh: "
# shellcheck source=fio_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/fio_lib.sh" memlend-restart
command -v ipcs >/dev/null || skip "ipcs (util-linux) is missing"
# Whatever happens, no segment a state.json here names outlives the test (after lib.sh's
# cleanup has stopped the daemons).
remove_segments() {
  local file id
  for file in "$workdir"/*/state.json "$workdir"/state.json.good; do
    [[ -e $file ]] || continue
    for id in $(python3 -c "import json,sys; s = json.load(open(sys.argv[1])); print(' '.join(str(i) for i in [s.get('arena_segment_id', -1)] + [d['segment_id'] for d in s.get('devices', []) + s.get('attached', [])] + s.get('placement_chunks', [])))" "$file" 2>/dev/null); do
      ipcrm -m "$id" 2>/dev/null || true
    done
  done
}
trap 'remove_segments; ml_cleanup' EXIT

socket=$workdir/nbd.sock
state=$workdir/state
write_verify_job "nbd+unix:///fio?socket=$socket" 16m 24m 24m buffer_compress_percentage=50 \
  refill_buffers=1

# segment_ids: the shared memory segments state.json names, one per line.
segment_ids() {
  python3 -c "import json,sys; s = json.load(open(sys.argv[1])); print(s['arena_segment_id']); [print(d['segment_id']) for d in s['devices']]" "$state/state.json"
}
# kill9 NAME: the daemon dies as in a crash.
kill9() {
  kill -KILL "${ml_pids[$1]}"
  wait "${ml_pids[$1]}" 2>/dev/null || true
  unset "ml_pids[$1]"
}
# device_pages NAME FIELD: FIELD of the device's page counts in NAME's status.
device_pages() {
  status_json "$1" | python3 -c "import json,sys; print(json.load(sys.stdin)['devices'][0]['pages']['$2'])"
}
# written_then_verified NAME ARGS...: fio writes, the daemon is killed, a new one started with
# ARGS (as NAME2) finds the pages, and fio verifies them.
written_then_verified() {
  local name=$1
  shift
  start_daemon "$name" "$@"
  run_fio "$name-write" || { cat "$workdir/$name-write.stderr"; fail "fio workload failed"; }
  check_fio_clean "$name-write" >/dev/null || fail "fio workload reported errors"
  echo "  written: $(device_pages "$name" mapped) pages, $(device_pages "$name" local) local, $(device_pages "$name" disk) on disk; kill -9"
  kill9 "$name"
  start_daemon "$name-again" "$@"
  grep "recovered" "$workdir/$name-again.stderr" | sed 's/^/  /'
  run_fio "$name-verify" --verify_only || { cat "$workdir/$name-verify.stderr"; fail "fio --verify_only failed after the restart"; }
  check_fio_clean "$name-verify" || fail "fio --verify_only reported errors after the restart"
}

echo "1. pages in the local store, kill -9, restart"
args=(--device fio:64M --nbd "unix:$socket" --local-store 128M --compress lz4 --state-dir "$state")
written_then_verified local "${args[@]}"
restarts=$(status_json local-again | python3 -c "
import json, sys
s = json.load(sys.stdin)
d = [d for d in s['devices'] if d['name'] == 'fio'][0]
print(s['state']['restarts'], d['restarts'], d['last_gap_ms'])")
read -r state_restarts device_restarts device_gap <<<"$restarts"
[[ $state_restarts == 1 && $device_restarts == 1 ]] || fail "status does not count the restart: $restarts"
((device_gap > 0)) || fail "status gives the device no time without a server: $restarts"
text=$("$memlend" status --control "$workdir/local-again.control")
echo "  $(grep '^state:' <<<"$text")"
grep -q "^fio: served across 1 restart(s) of the daemon, the last $device_gap ms without a server" <<<"$text" ||
  fail "status does not show the device's restart: $text"
echo "  $(grep '^fio: served across' <<<"$text")"
stop_daemon local-again
[[ ! -e $state/state.json ]] || fail "state.json is still there after a stop without --on-exit keep"

echo "2. pages on a backing file, kill -9, restart"
args=(--device fio:64M --nbd "unix:$socket" --local-store 2M --compress none
  --backing-file "$workdir/backing.img" --state-dir "$state")
written_then_verified disk "${args[@]}"
(($(device_pages disk-again disk) > 1000)) || fail "the pages were not on disk: $(status_json disk-again)"

echo "3. SIGTERM with --on-exit keep, restart"
stop_daemon disk-again  # frees the state of step 2
args=(--device fio:64M --nbd "unix:$socket" --local-store 32M --compress lz4
  --backing-file "$workdir/backing.img" --state-dir "$state")
start_daemon keep "${args[@]}" --on-exit keep
run_fio keep-write || fail "fio workload failed"
check_fio_clean keep-write >/dev/null || fail "fio workload reported errors"
stop_daemon keep
[[ -e $state/state.json ]] || fail "--on-exit keep removed state.json"
grep -q "stay in $state" "$workdir/keep.stderr" || fail "the daemon did not say it kept the pages"
start_daemon keep-again "${args[@]}"
run_fio keep-verify --verify_only || { cat "$workdir/keep-verify.stderr"; fail "fio --verify_only failed after a kept stop"; }
check_fio_clean keep-verify || fail "fio --verify_only reported errors after a kept stop"
mapfile -t ids < <(segment_ids)
stop_daemon keep-again
[[ ! -e $state/state.json ]] || fail "state.json is still there after a stop without --on-exit keep"
for id in "${ids[@]}"; do
  ! ipcs -m | awk '{print $2}' | grep -qx "$id" || fail "shared memory segment $id is still there"
done
echo "  stopped without keep: state.json and segments ${ids[*]} are gone"
start_daemon afresh "${args[@]}"
expect_verify_failure
echo "  a daemon started afresh has none of the data (verification fails, as it must)"
kill9 afresh

echo "4. pages on a lender (one copy each, sealed), kill -9 of the borrower, restart"
port=$(free_port)
start_daemon lender --lend 128M --listen "127.0.0.1:$port"
# Sealed: the key and the seal counter must outlive the process with the rest of the state.
args=(--device fio:64M --nbd "unix:$socket" --local-store 2M --compress none --redundancy none
  --peer "127.0.0.1:$port" --state-dir "$workdir/state2" --seal-pages)
start_daemon remote "${args[@]}"
run_fio remote-write || { cat "$workdir/remote-write.stderr"; fail "fio workload failed"; }
check_fio_clean remote-write >/dev/null || fail "fio workload reported errors"
echo "  written: $(device_pages remote mapped) pages, $(device_pages remote remote) on the lender; kill -9"
kill9 remote
start_daemon remote-again "${args[@]}"
grep -E "recovered|resum" "$workdir/remote-again.stderr" | sed 's/^/  /'
run_fio remote-verify --verify_only || { cat "$workdir/remote-verify.stderr"; fail "fio --verify_only failed after the restart"; }
check_fio_clean remote-verify || fail "fio --verify_only reported errors after the restart"
lost=$(status_json remote-again | python3 -c "import json,sys; print(json.load(sys.stdin)['remote_store']['lost_pages'])")
[[ $lost == 0 ]] || fail "$lost pages were lost across the restart"
sealing=$(status_json remote-again | python3 -c "import json,sys; r = json.load(sys.stdin)['remote_store']; print(r['sealed'], r['integrity_failures'])")
[[ $sealing == "True 0" ]] || fail "sealed pages did not all open after the restart (sealed, failures: $sealing)"
echo "  SIGTERM with --on-exit keep, restart"
stop_daemon remote-again  # frees it all: start again with keep
start_daemon remote-keep "${args[@]}" --on-exit keep
run_fio remote-write2 || fail "fio workload failed"
check_fio_clean remote-write2 >/dev/null || fail "fio workload reported errors"
stop_daemon remote-keep
start_daemon remote-kept "${args[@]}"
run_fio remote-verify2 --verify_only || { cat "$workdir/remote-verify2.stderr"; fail "fio --verify_only failed after a kept stop"; }
check_fio_clean remote-verify2 || fail "fio --verify_only reported errors after a kept stop"
used=$(status_json lender | python3 -c "import json,sys; l = json.load(sys.stdin)['lending']; print(l['used_bytes'], len(l['parked']))")
echo "  the lender lends ${used% *} bytes, keeps ${used#* } parked session(s)"
[[ ${used#* } == 0 ]] || fail "the lender still keeps a session nobody resumed"
stop_daemon remote-kept
stop_daemon lender

echo "5. a restart that does not match the state"
args=(--device fio:64M --nbd "unix:$socket" --local-store 32M --compress lz4
  --backing-file "$workdir/backing.img" --state-dir "$state")
if "$memlend" daemon --device fio:64M --nbd "unix:$socket" --local-store 64M --compress lz4 \
  --backing-file "$workdir/backing.img" --state-dir "$state" --control "$workdir/bad.control" \
  2>"$workdir/bad.stderr"; then
  fail "a daemon with another --local-store started on the state"
fi
grep -q "another configuration: it was made with --local-store" "$workdir/bad.stderr" ||
  fail "the refusal does not name the difference: $(cat "$workdir/bad.stderr")"
echo "  refused: $(grep -o 'another configuration.*' "$workdir/bad.stderr" | head -c 120)"
start_daemon matching "${args[@]}"  # the state is still there for a daemon that matches
grep -q "recovered" "$workdir/matching.stderr" || fail "the matching daemon did not recover"
kill9 matching
mapfile -t ids < <(segment_ids)
cp "$state/state.json" "$workdir/state.json.good"
echo '{"version": 1, "nonsense": true}' >"$state/state.json"
if "$memlend" daemon "${args[@]}" --control "$workdir/bad2.control" 2>"$workdir/bad2.stderr"; then
  fail "a daemon started on a corrupt state.json"
fi
grep -q "is not a memlend state file" "$workdir/bad2.stderr" ||
  fail "the refusal does not say what is wrong: $(cat "$workdir/bad2.stderr")"
echo "  refused: $(grep -o 'state.json is not.*' "$workdir/bad2.stderr" | head -c 120)"
for id in "${ids[@]}"; do ipcrm -m "$id" 2>/dev/null || true; done
echo "PASS: pages survive kill -9 and --on-exit keep restarts; mismatched and corrupt state is refused"
