#!/usr/bin/env bash
# fio_lender_faults.sh — lenders frozen, removed, added, killed, drained and restarted while fio
# writes and verifies (crc32c) through a borrower with --redundancy replicas:2, run after run.
#
# Usage: fio_lender_faults.sh PATH_TO_MEMLEND freeze|membership|reclaim|chaos
#
#   freeze      three lenders; lender1 gets kill -STOP for $MEMLEND_FREEZE_S seconds (default 10;
#               the full form is 30) while fio runs. The borrower must show it suspect, then
#               down; no fio request may wait for the thaw (fio's max completion latency is
#               reported beside the 2 s goal); after kill -CONT it comes back up and takes
#               pages again.
#   membership  three lenders, the borrower started with two; while fio runs: `memlend peer add`
#               of the third, `memlend peer remove` of the first (which must end with nothing
#               left there), and `memlend peer add` of the first again.
#   reclaim     three lenders; while fio runs: `memlend lend --size 8M` of lender1 (its
#               borrower moves the pages off the superpages it asks back; the command exits 0
#               once the pool is down to 8 MiB), growth back to 64 MiB, then "memory pressure"
#               on lender2 (`memlend lend --reclaim-below 1T`: far above MemAvailable, so its
#               pool shrinks to nothing and everything there moves) and its end (`off`).
#   chaos       four lenders; for $MEMLEND_CHAOS_S seconds (default 30; the full form is 120) a
#               loop picks a random lender and a random fault (kill -9, kill -STOP for 6 s,
#               `memlend drain`, SIGTERM, a shrink to 16 MiB and back with `memlend lend`),
#               restarts the lender if it exited, and waits until the
#               borrower shows every lender up and no page degraded before the next fault.
# Every mode: every fio run and a final verify-only pass are clean, no page is lost, and the
# borrower's books add up (two copies of each remote page, as many as its peers hold, and the
# superpages it holds are what its lenders lend). Exit status: 0 pass, 1 fail, 77 skipped (fio
# without the nbd engine, or python3 missing).
set -euo pipefail

memlend=${1:?usage: fio_lender_faults.sh PATH_TO_MEMLEND freeze|membership|reclaim|chaos}
mode=${2:?usage: fio_lender_faults.sh PATH_TO_MEMLEND freeze|membership|reclaim|chaos}
ml_prefix="fio_lender_faults.sh ($mode): "
# shellcheck source=fio_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/fio_lib.sh" memlend-fio-faults
case $mode in freeze | membership | reclaim | chaos) ;; *) fail "unknown mode '$mode'" ;; esac

lender_count=3
[[ $mode != chaos ]] || lender_count=4
socket=$workdir/nbd.sock
ports=()
for i in $(seq "$lender_count"); do
  ports+=("$(free_port)")
  start_daemon "lender$i" --lend 64M --listen "127.0.0.1:${ports[-1]}"
done
peer_args=()
initial=$lender_count
[[ $mode != membership ]] || initial=2
for i in $(seq "$initial"); do peer_args+=(--peer "127.0.0.1:${ports[i - 1]}"); done
start_daemon borrower --device fio:64M --nbd "unix:$socket" --local-store 2M --compress none \
  --redundancy replicas:2 "${peer_args[@]}"

write_verify_job "nbd+unix:///fio?socket=$socket" 24m 32m 24m

# status_eval EXPR: EXPR, a Python expression over the borrower's status `s`, printed.
status_eval() {
  status_json borrower | python3 -c "import json,sys; s = json.load(sys.stdin); print($1)"
}
# peer_field N FIELD: FIELD of lenderN in the borrower's peers[] ("absent" if it is not there).
peer_field() {
  status_eval "next((p['$2'] for p in s['peers'] if p['address'].endswith(':${ports[$1 - 1]}')), 'absent')"
}
# wait_for SECONDS DESCRIPTION EXPR: polls status_eval EXPR until it prints True.
wait_for() {
  local seconds=$1 what=$2 expr=$3
  for _ in $(seq $((seconds * 10))); do
    [[ $(status_eval "$expr" 2>/dev/null) == True ]] && return 0
    sleep 0.1
  done
  fail "$what did not happen within $seconds s; borrower status: $(status_json borrower)"
}

# stop_fio: ends the loop after its current run and checks every run was clean; prints the runs'
# maximum completion latency (ms) as $max_latency_ms.
stop_fio() {
  end_fio_loop "under faults"
  local runs=$fio_runs
  max_latency_ms=$(python3 - "$workdir" "$runs" <<'EOF'
import json, sys
worst = 0
for n in range(1, int(sys.argv[2]) + 1):
    text = open(f"{sys.argv[1]}/run{n}.json").read()
    for job in json.loads(text[text.index("{"):])["jobs"]:
        for side in ("read", "write"):
            worst = max(worst, job[side]["clat_ns"]["max"])
print(worst // 1000000)
EOF
)
  echo "  fio: $runs runs, all clean; max completion latency ${max_latency_ms} ms"
}

# final_checks: a verify-only pass, then the books.
final_checks() {
  echo "verify-only pass over everything the runs wrote"
  run_fio verify --verify_only || { cat "$workdir/verify.stderr"; fail "fio verify-only run failed"; }
  check_fio_clean verify || fail "fio verify-only run reported errors"
  wait_for 60 "the rebuild" "s['remote_store']['degraded_pages'] == 0"
  # The lenders' books and the borrower's are separate snapshots: take them until they agree
  # (a superpage given back is freed a moment later), for 5 s at most.
  local lent i
  for _ in $(seq 50); do
    lent=0
    for i in $(seq "$lender_count"); do
      lent=$((lent + $(status_json "lender$i" | python3 -c "import json,sys; print(json.load(sys.stdin)['lending']['used_bytes'])")))
    done
    status_json borrower >"$workdir/status.json"
    [[ $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['remote_store']['used_bytes'])" "$workdir/status.json") == "$lent" ]] && break
    sleep 0.1
  done
  for i in $(seq "$lender_count"); do
    echo "  lender$i lends $(status_json "lender$i" | python3 -c "import json,sys; print(json.load(sys.stdin)['lending']['used_bytes'])") bytes; the borrower holds $(peer_field "$i" superpages_held) superpages there"
  done
  python3 - "$workdir/status.json" "$lent" <<'EOF' || fail "the borrower's books do not add up"
import json, sys
s = json.load(open(sys.argv[1]))
r = s["remote_store"]
pages = s["devices"][0]["pages"]
print(f"  status: {r['pages']} remote pages, {r['copies']} copies, {r['degraded_pages']} degraded, "
      f"{r['lost_pages']} lost, {r['rebuilt_copies']} rebuilt, {r['moved_copies']} moved; "
      f"lenders lend {int(sys.argv[2])} bytes to it")
assert r["lost_pages"] == 0, "pages were lost"
assert r["pages"] == pages["remote"] + pages["remote_copies"], "remote pages disagree with the device's"
assert pages["mapped"] == pages["zero"] + pages["local"] + pages["disk"] + pages["remote"]
assert r["copies"] == 2 * r["pages"], "not two copies of every remote page"
assert r["copies"] == sum(p["pages_stored"] for p in s["peers"]), "copies disagree with peers'"
assert r["used_bytes"] == int(sys.argv[2]), "superpages held disagree with what lenders lend"
EOF
}

# restart_lender N: starts lenderN again on its port (after it exited or was killed).
restart_lender() {
  wait "${ml_pids[lender$1]}" 2>/dev/null || true
  unset "ml_pids[lender$1]"
  start_daemon "lender$1" --lend 64M --listen "127.0.0.1:${ports[$1 - 1]}"
}

all_up="all(p['state'] == 'up' for p in s['peers']) and len(s['peers']) == $lender_count"
settled="$all_up and s['remote_store']['degraded_pages'] == 0 and s['remote_store']['lost_pages'] == 0"

case $mode in
freeze)
  freeze_s=${MEMLEND_FREEZE_S:-10}
  start_fio_loop
  wait_for 60 "pages reaching lender1" "$(printf '%s' "next(p['pages_stored'] for p in s['peers'] if p['address'].endswith(':${ports[0]}')) > 500")"
  echo "lender1 holds $(peer_field 1 pages_stored) copies: kill -STOP for $freeze_s s"
  kill -STOP "${ml_pids[lender1]}"
  frozen_at=$SECONDS
  saw_suspect=no
  saw_down=no
  while ((SECONDS - frozen_at < freeze_s)); do
    case $(peer_field 1 state) in
    suspect) saw_suspect=yes ;;
    down) saw_down=yes ;;
    esac
    sleep 0.1
  done
  echo "  while frozen the borrower showed lender1 suspect: $saw_suspect, down: $saw_down ($(peer_field 1 error))"
  kill -CONT "${ml_pids[lender1]}"
  [[ $saw_suspect == yes ]] || fail "lender1 never showed as suspect while frozen"
  ((freeze_s < 6)) || [[ $saw_down == yes ]] || fail "lender1 never showed as down while frozen for $freeze_s s"
  wait_for 30 "lender1 coming back up" "$all_up"
  wait_for 60 "new pages placed on lender1" "next(p['pages_stored'] for p in s['peers'] if p['address'].endswith(':${ports[0]}')) > 0"
  echo "  lender1 is up again and holds $(peer_field 1 pages_stored) copies"
  stop_fio
  echo "  max completion latency ${max_latency_ms} ms (goal: under 2000 ms with the default 500 ms --peer-timeout)"
  ((max_latency_ms < freeze_s * 1000)) || fail "a request waited ${max_latency_ms} ms: for the frozen lender"
  ;;
membership)
  start_fio_loop
  sleep 2
  echo "memlend peer add lender3"
  "$memlend" peer add "127.0.0.1:${ports[2]}" --control "$workdir/borrower.control" ||
    fail "peer add failed"
  wait_for 60 "pages reaching lender3 and lender1" "$(printf '%s' "all(p['pages_stored'] > 200 for p in s['peers']) and len(s['peers']) == 3")"
  echo "memlend peer remove lender1 (it holds $(peer_field 1 pages_stored) copies)"
  "$memlend" peer remove "127.0.0.1:${ports[0]}" --deadline 60 --control "$workdir/borrower.control" |
    tail -n 1 || fail "peer remove failed"
  [[ $(peer_field 1 state) == absent ]] || fail "lender1 is still a peer after its removal"
  used=$(status_json lender1 | python3 -c "import json,sys; print(json.load(sys.stdin)['lending']['used_bytes'])")
  for _ in $(seq 50); do
    ((used == 0)) && break
    sleep 0.1
    used=$(status_json lender1 | python3 -c "import json,sys; print(json.load(sys.stdin)['lending']['used_bytes'])")
  done
  ((used == 0)) || fail "lender1 still lends $used bytes to the borrower after the removal"
  sleep 2
  echo "memlend peer add lender1 again"
  "$memlend" peer add "127.0.0.1:${ports[0]}" --control "$workdir/borrower.control" ||
    fail "peer add of lender1 again failed"
  wait_for 60 "pages reaching lender1 again" "next(p['pages_stored'] for p in s['peers'] if p['address'].endswith(':${ports[0]}')) > 0"
  stop_fio
  ;;
reclaim)
  # lending_field N FIELD: FIELD of lenderN's own lending status.
  lending_field() {
    status_json "lender$1" | python3 -c "import json,sys; print(json.load(sys.stdin)['lending']['$2'])"
  }
  # lend N ARGS...: memlend lend on lenderN; it must end with the pool at its new size.
  lend() {
    local n=$1
    shift
    echo "memlend lend $* on lender$n (the borrower keeps $(peer_field "$n" pages_stored) copies there)"
    "$memlend" lend "$@" --deadline 30 --control "$workdir/lender$n.control" | tail -n 1 ||
      fail "memlend lend $* on lender$n did not end with the pool at its size"
  }
  start_fio_loop
  wait_for 60 "pages reaching every lender" "all(p['pages_stored'] > 500 for p in s['peers'])"
  lend 1 --size 8M
  (($(lending_field 1 total_bytes) == 8 << 20)) || fail "lender1's pool is not 8 MiB"
  wait_for 10 "the borrower freeing what lender1 asked back" \
    "next(p['superpages_held'] for p in s['peers'] if p['address'].endswith(':${ports[0]}')) <= 4"
  echo "  lender1 lends 8 MiB; the borrower keeps $(peer_field 1 pages_stored) copies there"
  lend 1 --size 64M
  lend 2 --reclaim-below 1T
  (($(lending_field 2 total_bytes) == 0)) || fail "lender2's pool did not shrink to nothing"
  wait_for 10 "every copy leaving lender2" \
    "next(p['pages_stored'] for p in s['peers'] if p['address'].endswith(':${ports[1]}')) == 0"
  lend 2 --reclaim-below off
  (($(lending_field 2 total_bytes) == 64 << 20)) || fail "lender2's pool did not grow back"
  wait_for 60 "pages reaching lender2 again" \
    "next(p['pages_stored'] for p in s['peers'] if p['address'].endswith(':${ports[1]}')) > 0"
  stop_fio
  ;;
chaos)
  chaos_s=${MEMLEND_CHAOS_S:-30}
  seed=${MEMLEND_CHAOS_SEED:-$RANDOM}
  echo "chaos for $chaos_s s, seed $seed (MEMLEND_CHAOS_SEED repeats it)"
  RANDOM=$seed
  start_fio_loop
  wait_for 60 "pages reaching every lender" "all(p['pages_stored'] > 200 for p in s['peers'])"
  started=$SECONDS
  faults=0
  while ((SECONDS - started < chaos_s)); do
    n=$((RANDOM % lender_count + 1))
    fault=$((RANDOM % 5))
    faults=$((faults + 1))
    case $fault in
    0)
      echo "  fault $faults: kill -9 lender$n"
      kill -KILL "${ml_pids[lender$n]}"
      restart_lender "$n"
      ;;
    1)
      echo "  fault $faults: kill -STOP lender$n for 6 s"
      kill -STOP "${ml_pids[lender$n]}"
      sleep 6
      kill -CONT "${ml_pids[lender$n]}"
      ;;
    2)
      echo "  fault $faults: memlend drain lender$n"
      "$memlend" drain --deadline 30 --control "$workdir/lender$n.control" | tail -n 1 ||
        fail "memlend drain of lender$n did not end with nothing left behind"
      restart_lender "$n"
      ;;
    3)
      echo "  fault $faults: SIGTERM lender$n"
      stop_daemon "lender$n"
      start_daemon "lender$n" --lend 64M --listen "127.0.0.1:${ports[n - 1]}"
      ;;
    4)
      echo "  fault $faults: memlend lend --size 16M on lender$n, then back to 64M"
      "$memlend" lend --size 16M --deadline 30 --control "$workdir/lender$n.control" | tail -n 1 ||
        fail "lender$n's pool did not shrink to 16 MiB"
      "$memlend" lend --size 64M --control "$workdir/lender$n.control" | tail -n 1 ||
        fail "lender$n's pool did not grow back"
      ;;
    esac
    wait_for 90 "recovery from fault $faults" "$settled"
  done
  echo "  $faults faults in $((SECONDS - started)) s"
  stop_fio
  ;;
esac

final_checks
stop_daemon borrower
for i in $(seq "$lender_count"); do stop_daemon "lender$i"; done
echo "PASS: $mode under fio with replicas:2"
