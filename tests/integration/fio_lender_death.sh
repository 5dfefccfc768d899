#!/usr/bin/env bash
# fio_lender_death.sh — kill -9 of one of three lenders while fio writes and verifies through a
# borrower; what is lost depends on the borrower's redundancy.
#
# Usage: fio_lender_death.sh PATH_TO_MEMLEND replicas:2|disk|replicas:1+disk|none
#
# Three lenders of 48 MiB and a borrower with one 64 MiB device, a 2 MiB local store, a backing
# file and --redundancy MODE, serving NBD on a unix socket. fio writes random data with crc32c headers
# (the job of fio_peers_verify.sh) while this script waits until a good part of the pages are on
# the lenders and then kills the first lender with SIGKILL.
#   replicas:2  the workload run, and a verify-only pass after it, must both be clean: every page
#               the dead lender held had a copy on another; `memlend status` must show no lost
#               page and, once the rebuilder is done, no degraded one (two copies of each page
#               again, on the two lenders left).
#   disk        the same clean runs: every evicted page went to the backing file first, and what
#               the lenders held were cached copies; nothing is lost or degraded.
#   replicas:1+disk  the same clean runs: each page has one copy on a lender and one on disk;
#               once the rebuilder is done every page has its lender copy again.
#   none        the kill comes after the workload run; status must count as lost exactly the
#               pages the dead lender held, and the verify-only pass must then fail with EIO.
# Exit status: 0 pass, 1 fail, 77 skipped (fio without the nbd engine, or python3 missing).
set -euo pipefail

memlend=${1:?usage: fio_lender_death.sh PATH_TO_MEMLEND replicas:2|disk|replicas:1+disk|none}
mode=${2:?usage: fio_lender_death.sh PATH_TO_MEMLEND replicas:2|disk|replicas:1+disk|none}
ml_prefix="fio_lender_death.sh ($mode): "
# shellcheck source=fio_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/fio_lib.sh" memlend-fio-death
case $mode in replicas:2 | disk | replicas:1+disk | none) ;; *) fail "unknown mode '$mode'" ;; esac

socket=$workdir/nbd.sock
ports=()
for i in 1 2 3; do
  ports+=("$(free_port)")
  start_daemon "lender$i" --lend 48M --listen "127.0.0.1:${ports[-1]}"
done
start_daemon borrower --device fio:64M --nbd "unix:$socket" --local-store 2M --compress none \
  --backing-file "$workdir/backing.img" --redundancy "$mode" --peer "127.0.0.1:${ports[0]}" --peer "127.0.0.1:${ports[1]}" \
  --peer "127.0.0.1:${ports[2]}"

write_verify_job "nbd+unix:///fio?socket=$socket" 28m 32m 32m

# remote_field FIELD: a number of the borrower's remote_store.
remote_field() {
  status_json borrower | python3 -c "import json,sys; print(json.load(sys.stdin)['remote_store']['$1'])"
}
# held_by_first: pages the borrower keeps on lender1 (passive and cached), as it says.
held_by_first() {
  status_json borrower | python3 -c "
import json, sys
s = json.load(sys.stdin)
print(next(p['pages_stored'] + p['pages_cached'] for p in s['peers']
           if p['address'].endswith(':${ports[0]}')))"
}
# on_lenders: pages with a copy on the lenders (passive placements, or cached clean pages).
on_lenders() {
  status_json borrower | python3 -c "
import json, sys
r = json.load(sys.stdin)['remote_store']
print(r['pages'] + r['cached_pages'])"
}
kill_first() {
  kill -KILL "${ml_pids[lender1]}"
  wait "${ml_pids[lender1]}" 2>/dev/null || true
  unset 'ml_pids[lender1]'
}

if [[ $mode != none ]]; then
  echo "run 1: fio writes and verifies; lender1 is killed (-9) while it runs"
  run_fio workload &
  fio_pid=$!
  killed_during=no
  for _ in $(seq 200); do
    if ! kill -0 "$fio_pid" 2>/dev/null; then break; fi
    if (($(on_lenders) > 2000)); then
      echo "  $(on_lenders) pages on the lenders ($(held_by_first) copies on lender1): kill -9"
      kill_first
      killed_during=yes
      break
    fi
    sleep 0.05
  done
  fio_status=0
  wait "$fio_pid" || fio_status=$?
  [[ $killed_during == yes ]] || { echo "  fio ended before enough pages were remote; killing now"; kill_first; }
  ((fio_status == 0)) || { cat "$workdir/workload.stderr"; fail "fio workload run failed"; }
  check_fio_clean workload || fail "fio workload run reported errors after the lender's death"
  echo "run 2: verify-only pass"
  run_fio verify --verify_only || { cat "$workdir/verify.stderr"; fail "fio verify-only run failed"; }
  check_fio_clean verify || fail "fio verify-only run reported errors"
  # The rebuilder makes the missing copies again on the two lenders left.
  for _ in $(seq 100); do
    status_json borrower >"$workdir/status.json"
    if python3 - "$workdir/status.json" <<'EOF'; then break; fi
import json, sys
s = json.load(open(sys.argv[1]))
r = s["remote_store"]
dead = [p for p in s["peers"] if p["state"] == "down"]
sys.exit(0 if dead and dead[0]["pages_stored"] == 0 and r["degraded_pages"] == 0 else 1)
EOF
    sleep 0.1
  done
  python3 - "$workdir/status.json" "$mode" <<'EOF' || fail "the borrower's status after the rebuild is wrong"
import json, sys
s = json.load(open(sys.argv[1]))
mode = sys.argv[2]
r = s["remote_store"]
device = s["devices"][0]
pages = device["pages"]
print(f"  after the rebuild: {r['pages']} remote pages, {r['copies']} copies, "
      f"{r['disk_copies']} disk copies, {pages['disk']} disk pages ({pages['cached']} cached), "
      f"{r['degraded_pages']} degraded, {r['lost_pages']} lost, {r['rebuilt_copies']} copies rebuilt")
assert device["redundancy"] == mode, device["redundancy"]
assert r["lost_pages"] == 0, "pages were lost"
assert r["degraded_pages"] == 0, "the rebuild did not finish"
assert r["pages"] == pages["remote"] + pages["remote_copies"]
assert r["copies"] == sum(p["pages_stored"] for p in s["peers"])
assert s["disk_store"]["pages"] == pages["disk"] + pages["clean"] + r["disk_copies"]
if mode == "replicas:2":
    assert r["copies"] == 2 * r["pages"], "not two copies of every page"
elif mode == "replicas:1+disk":
    assert r["pages"] > 0 and r["copies"] == r["pages"], "not one lender copy of every page"
    assert r["disk_copies"] == r["pages"], "not one disk copy of every page"
else:  # disk: every evicted page is on disk; the lenders only cached them
    assert r["pages"] == 0, "pages were placed on lenders alone"
    assert pages["disk"] > 0
EOF
else
  echo "run 1: fio writes and verifies"
  verify_workload ""
  held=$(held_by_first)
  echo "  lender1 holds $held of the borrower's pages: kill -9"
  ((held > 0)) || fail "lender1 holds no page, so nothing is tested"
  kill_first
  for _ in $(seq 100); do
    (($(remote_field lost_pages) == held)) && break
    sleep 0.1
  done
  lost=$(remote_field lost_pages)
  echo "  status counts $lost pages lost"
  ((lost == held)) || fail "status counts $lost pages lost, lender1 held $held"
  echo "run 2: verify-only pass, which must fail reading the lost pages (EIO)"
  if run_fio lost --verify_only; then fail "fio read every page back although $held were lost"; fi
  grep -q 'Input/output error' "$workdir/lost.stderr" ||
    fail "fio failed, but not with EIO: $(head -n 5 "$workdir/lost.stderr")"
  echo "  fio: $(grep -c 'Input/output error' "$workdir/lost.stderr") reads failed with EIO"
fi

for name in borrower lender2 lender3; do stop_daemon "$name"; done
echo "PASS: kill -9 of a lender under fio, redundancy $mode"
