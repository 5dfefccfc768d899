#!/bin/bash
# fio with data verification against a real memlend daemon over NBD.
#
# Usage: fio_verify.sh PATH_TO_MEMLEND
#
# Three fio runs against one device on a unix socket, each over fresh NBD connections made by
# fio's nbd ioengine (libnbd):
#   1. the workload: two concurrent jobs doing random reads and writes at iodepth 16, one with
#      4 KiB blocks, one with 4-64 KiB blocks and half-compressible buffers; every block written
#      carries a crc32c header and is read back and checked (do_verify=1, verify_fatal=1);
#   2. --verify_only: the same jobs re-read everything from new connections and check it again;
#   3. a negative control: the daemon is restarted (its RAM store starts empty) and --verify_only
#      must now FAIL with verify errors, which proves that runs 1 and 2 really verified data.
# Each run must report error 0 for every job in fio's JSON output and no "verify:" complaints.
#
# Exit status: 0 pass, 1 fail, 77 skipped (fio without the nbd engine, or python3 missing).

set -euo pipefail

memlend=${1:?usage: fio_verify.sh PATH_TO_MEMLEND}

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

workdir=$(mktemp -d "${TMPDIR:-/tmp}/memlend-fio.XXXXXX")
socket=$workdir/nbd.sock
control=$workdir/control.sock
daemon_pid=

# Always stop the daemon and remove the temporary directory, however the script ends.
cleanup() {
  if [[ -n $daemon_pid ]]; then
    kill -KILL "$daemon_pid" 2>/dev/null || true
    wait "$daemon_pid" 2>/dev/null || true
  fi
  rm -rf "$workdir"
}
trap cleanup EXIT

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

start_daemon() {
  rm -f "$socket" "$control"
  "$memlend" daemon --device fio:96M --nbd "unix:$socket" --local-store 256M \
    --compress lz4 --control "$control" 2>>"$workdir/memlend.stderr" &
  daemon_pid=$!
  # Hang guard of about 10 s; readiness is polled, not assumed.
  for _ in $(seq 100); do
    kill -0 "$daemon_pid" 2>/dev/null ||
      fail "memlend exited during startup: $(cat "$workdir/memlend.stderr")"
    if socket_accepts "$socket" && socket_accepts "$control"; then
      return 0
    fi
    sleep 0.1
  done
  fail "memlend did not accept connections within 10 s: $(cat "$workdir/memlend.stderr")"
}

# SIGTERM must shut the daemon down cleanly with status 0.
stop_daemon() {
  kill -TERM "$daemon_pid"
  local status=0
  wait "$daemon_pid" || status=$?
  daemon_pid=
  [[ $status -eq 0 ]] || fail "memlend exited with status $status on SIGTERM"
}

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
size=32m

[rand-4k-64k]
bsrange=4k-64k
offset=40m
size=48m
buffer_compress_percentage=50
refill_buffers=1
EOF

# Runs fio with the extra arguments; leaves JSON in $workdir/NAME.json and stderr in
# $workdir/NAME.stderr; returns fio's exit status.
run_fio() {
  local name=$1
  shift
  local status=0
  # From inside $workdir, so that files fio leaves behind (e.g. verify state dumps after a failed
  # verification) go away with it.
  (cd "$workdir" && fio --output-format=json --output="$workdir/$name.json" "$@" \
    "$workdir/verify.fio" 2>"$workdir/$name.stderr") || status=$?
  return $status
}

# Succeeds if every job in the JSON file reports error 0, wrote or verified data, and fio's
# stderr has no verify complaints; prints a one-line summary per job.
check_fio_clean() {
  local name=$1
  if grep -q '^verify:' "$workdir/$name.stderr"; then
    head -n 20 "$workdir/$name.stderr"
    return 1
  fi
  python3 - "$workdir/$name.json" "$name" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
ok = True
for job in report["jobs"]:
    read_bytes, write_bytes = job["read"]["io_bytes"], job["write"]["io_bytes"]
    print(f"  {sys.argv[2]}: job {job['jobname']}: error {job['error']}, "
          f"read {read_bytes} bytes, written {write_bytes} bytes")
    # Every job must have moved data and ended without an error (84 = EILSEQ is fio's verify
    # failure).
    if job["error"] != 0 or read_bytes == 0:
        ok = False
sys.exit(0 if ok else 1)
EOF
}

start_daemon

echo "run 1: random read/write workload with verification"
run_fio workload || { cat "$workdir/workload.stderr"; fail "fio workload run failed"; }
check_fio_clean workload || fail "fio workload run reported errors"

echo "run 2: verify-only pass over new connections"
run_fio verify --verify_only || { cat "$workdir/verify.stderr"; fail "fio verify-only run failed"; }
check_fio_clean verify || fail "fio verify-only run reported errors"

echo "run 3: negative control - after a restart the data is gone and verification must fail"
stop_daemon
start_daemon
if run_fio control --verify_only; then
  fail "fio --verify_only passed on an empty device: verification is not really happening"
fi
grep -q '^verify:' "$workdir/control.stderr" ||
  fail "fio failed on an empty device, but not with verify errors: $(head -n 5 "$workdir/control.stderr")"
stop_daemon

echo "PASS: fio verified all data written through memlend"
