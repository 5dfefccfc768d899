#!/bin/bash
# fio with data verification through a borrower whose pages live mostly on two lenders.
#
# Usage: fio_peers_verify.sh PATH_TO_MEMLEND
#
# Three daemons on 127.0.0.1: two lenders (--lend 48M each) and a borrower with one 64 MiB
# device, a 2 MiB local store and both lenders as --peer, serving NBD on a unix socket. So
# nearly every page fio writes is evicted to a lender over TCP and read back from there.
# Two fio runs over fresh NBD connections made by fio's nbd ioengine (libnbd):
#   1. the workload: two concurrent jobs doing random reads and writes at iodepth 16, one with
#      4 KiB blocks, one with 4-64 KiB blocks; every block written carries a crc32c header and
#      is read back and checked (do_verify=1, verify_fatal=1);
#   2. --verify_only: the same jobs re-read everything from new connections and check it again;
#   3. a negative control: a fresh borrower on the same lenders (the old one's superpages were
#      freed when it left) must FAIL --verify_only with verify errors, which proves that runs 1
#      and 2 really verified data.
# Runs 1 and 2 must report error 0 for every job in fio's JSON output and no "verify:" complaints.
# After run 2, `memlend status --json` of the borrower must show more pages remote than local,
# on both lenders, with figures that agree with the lenders'. Every daemon must exit 0 on SIGTERM.
#
# Exit status: 0 pass, 1 fail, 77 skipped (fio without the nbd engine, or python3 missing).

set -euo pipefail

memlend=${1:?usage: fio_peers_verify.sh PATH_TO_MEMLEND}

skip() {
  echo "SKIPPED: $*"
  exit 77
}
fail() {
  echo "FAIL: $*"
  exit 1
}

command -v fio >/dev/null || skip "fio is not installed"
fio --enghelp=nbd 2>/dev/null | grep -q '^uri' || skip "fio has no nbd ioengine (built without libnbd)"
command -v python3 >/dev/null || skip "python3 is needed to read fio's JSON output"
[[ -x $memlend ]] || fail "memlend binary $memlend is not executable"

workdir=$(mktemp -d "${TMPDIR:-/tmp}/memlend-fio-peers.XXXXXX")
socket=$workdir/nbd.sock
pids=()

# Always stop every daemon and remove the temporary directory, however the script ends.
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$workdir"
}
trap cleanup EXIT

# Returns a TCP port on 127.0.0.1 that is free right now.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Returns 0 once the unix socket at $1 accepts connections.
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

# start_daemon NAME ARGS...: starts `memlend daemon ARGS --control $workdir/NAME.control` with
# stderr in $workdir/NAME.stderr and waits (about 10 s at most) for its "ready" line and control
# socket. Leaves the pid in $started_pid.
start_daemon() {
  local name=$1
  shift
  "$memlend" daemon "$@" --control "$workdir/$name.control" 2>"$workdir/$name.stderr" &
  started_pid=$!
  pids+=("$started_pid")
  for _ in $(seq 100); do
    kill -0 "$started_pid" 2>/dev/null ||
      fail "$name exited during startup: $(cat "$workdir/$name.stderr")"
    if grep -q 'memlend: ready:' "$workdir/$name.stderr" && socket_accepts "$workdir/$name.control"; then
      return 0
    fi
    sleep 0.1
  done
  fail "$name was not ready within 10 s: $(cat "$workdir/$name.stderr")"
}

# status_json NAME: the daemon's `memlend status --json`.
status_json() {
  "$memlend" status --control "$workdir/$1.control" --json
}

port1=$(free_port)
port2=$(free_port)
start_daemon lender1 --lend 48M --listen "127.0.0.1:$port1"
start_daemon lender2 --lend 48M --listen "127.0.0.1:$port2"
start_daemon borrower --device fio:64M --nbd "unix:$socket" --local-store 2M --compress none \
  --peer "127.0.0.1:$port1" --peer "127.0.0.1:$port2"

cat >"$workdir/verify.fio" <<EOF
[global]
ioengine=nbd
uri=nbd+unix:///fio?socket=$socket
rw=randrw
iodepth=16
verify=crc32c
do_verify=1
verify_fatal=1
randrepeat=1

[rand-4k]
bs=4k
offset=0
size=28m

[rand-4k-64k]
bsrange=4k-64k
offset=32m
size=32m
EOF

# Runs fio with the extra arguments; leaves JSON in $workdir/NAME.json and stderr in
# $workdir/NAME.stderr; returns fio's exit status.
run_fio() {
  local name=$1
  shift
  local status=0
  (cd "$workdir" && fio --output-format=json --output="$workdir/$name.json" "$@" \
    "$workdir/verify.fio" 2>"$workdir/$name.stderr") || status=$?
  return $status
}

# Succeeds if every job in the JSON file reports error 0 and read data, and fio's stderr has no
# verify complaints; prints a one-line summary per job.
check_fio_clean() {
  local name=$1
  if grep -q '^verify:' "$workdir/$name.stderr"; then
    head -n 20 "$workdir/$name.stderr"
    return 1
  fi
  python3 - "$workdir/$name.json" "$name" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
report = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
ok = True
for job in report["jobs"]:
    read_bytes, write_bytes = job["read"]["io_bytes"], job["write"]["io_bytes"]
    print(f"  {sys.argv[2]}: job {job['jobname']}: error {job['error']}, "
          f"read {read_bytes} bytes, written {write_bytes} bytes")
    if job["error"] != 0 or read_bytes == 0:
        ok = False
sys.exit(0 if ok else 1)
EOF
}

echo "run 1: random read/write workload with verification (local store 2 MiB, two lenders)"
run_fio workload || { cat "$workdir/workload.stderr"; fail "fio workload run failed"; }
check_fio_clean workload || fail "fio workload run reported errors"

echo "run 2: verify-only pass over new connections"
run_fio verify --verify_only || { cat "$workdir/verify.stderr"; fail "fio verify-only run failed"; }
check_fio_clean verify || fail "fio verify-only run reported errors"

# Where the pages are: wait (at most 10 s) for eviction to settle, then check that most pages
# are remote, that both lenders hold some, and that the borrower's books match the lenders'.
echo "placement:"
placement_ok=1
for _ in $(seq 40); do
  status_json borrower >"$workdir/borrower.json"
  status_json lender1 >"$workdir/lender1.json"
  status_json lender2 >"$workdir/lender2.json"
  if python3 - "$workdir" <<'EOF'; then
import json, sys
d = sys.argv[1]
b = json.load(open(f"{d}/borrower.json"))
lenders = [json.load(open(f"{d}/lender{i}.json")) for i in (1, 2)]
pages = b["devices"][0]["pages"]
remote = b["remote_store"]
local = b["local_store"]
lent = sum(l["lending"]["used_bytes"] for l in lenders)
checks = {
    "mapped = zero + local + disk + remote":
        pages["mapped"] == pages["zero"] + pages["local"] + pages["disk"] + pages["remote"],
    "remote > local": pages["remote"] > pages["local"],
    "no pages on disk (there is no backing file)": pages["disk"] == 0,
    "local store under the high watermark": local["used_bytes"] * 100 <= local["total_bytes"] * 90,
    "remote pages = remote_store.pages = sum of peers' pages_stored":
        pages["remote"] == remote["pages"] == sum(p["pages_stored"] for p in b["peers"]),
    "remote_store.used_bytes = lenders' used_bytes = superpages held * 2 MiB":
        remote["used_bytes"] == lent == sum(p["superpages_held"] for p in b["peers"]) * 2 * 1024 * 1024,
    "both lenders hold pages": all(p["pages_stored"] > 0 for p in b["peers"]),
}
failed = [name for name, ok in checks.items() if not ok]
with open(f"{d}/placement.txt", "w") as out:
    print(f"  borrower: mapped {pages['mapped']}, local {pages['local']}, remote {pages['remote']}, "
          f"disk {pages['disk']}; local store {local['used_bytes']} of {local['total_bytes']} bytes; "
          f"lenders lend {lent} bytes; peers: " +
          ", ".join(f"{p['address']} {p['state']} {p['pages_stored']} pages" for p in b["peers"]),
          file=out)
    for name in failed:
        print(f"  not (yet) true: {name}", file=out)
sys.exit(1 if failed else 0)
EOF
    placement_ok=0
    break
  fi
  sleep 0.25
done
cat "$workdir/placement.txt"
[[ $placement_ok -eq 0 ]] || fail "placement checks failed after 10 s (status in the lines above)"

# stop_daemon PID: SIGTERM must shut the daemon down cleanly with status 0.
stop_daemon() {
  kill -TERM "$1"
  local status=0
  wait "$1" || status=$?
  [[ $status -eq 0 ]] || fail "a memlend daemon (pid $1) exited with status $status on SIGTERM"
}

echo "run 3: negative control - a fresh borrower on the same lenders has none of the data"
stop_daemon "${pids[2]}"
pids=("${pids[@]:0:2}")
rm -f "$socket"
start_daemon borrower2 --device fio:64M --nbd "unix:$socket" --local-store 2M --compress none \
  --peer "127.0.0.1:$port1" --peer "127.0.0.1:$port2"
if run_fio control --verify_only; then
  fail "fio --verify_only passed on an empty device: verification is not really happening"
fi
grep -q '^verify:' "$workdir/control.stderr" ||
  fail "fio failed on an empty device, but not with verify errors: $(head -n 5 "$workdir/control.stderr")"

for pid in "${pids[@]:2}" "${pids[@]:0:2}"; do stop_daemon "$pid"; done
pids=()

echo "PASS: fio verified all data written through a borrower onto two lenders"
