#!/bin/bash
# `memlend attach` and `detach` given bad input or an unusable setup: each must fail with one
# clear `memlend: ...` line and a non-zero status, and leave nothing attached or created.
#
# Usage: attach_errors.sh PATH_TO_MEMLEND
#
# Cases: the daemon is down; size not a multiple of 4 KiB, zero, or not a size; a bad name or
# queue count;
# a duplicate name (the first stays attached and usable); a frontend this host lacks (nbd or
# ublk here); a daemon that only lends; detach of an unknown name or of a --device. Also: auto
# picks fuse on a host without ublk and nbd, and SIGTERM detaches what is still attached.
# Exit status: 0 pass, 1 fail, 77 skipped (not root, no FUSE or loop, nbdfuse missing).

set -euo pipefail

memlend=${1:?usage: attach_errors.sh PATH_TO_MEMLEND}
ml_prefix="attach_errors.sh: "
# shellcheck source=attach_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/attach_lib.sh" memlend-attach-errors
require_fuse_attach

# expect_error PATTERN COMMAND...: COMMAND must fail with exactly one stderr line that starts
# with "memlend: " and matches PATTERN (grep -E).
expect_error() {
  local pattern=$1 status=0
  shift
  "$@" >"$workdir/out" 2>"$workdir/err" || status=$?
  [[ $status -ne 0 ]] || fail "succeeded but should not have: $*"
  [[ ! -s $workdir/out ]] || fail "printed on stdout: $(cat "$workdir/out") ($*)"
  [[ $(wc -l <"$workdir/err") -eq 1 ]] || fail "not one line on stderr: $(cat "$workdir/err") ($*)"
  grep -qE "^memlend: .*$pattern" "$workdir/err" ||
    fail "the error does not match '$pattern': $(cat "$workdir/err") ($*)"
  echo "ok (status $status): $(cat "$workdir/err")"
}

control=$workdir/borrower.control
expect_error "cannot reach the daemon" "$memlend" attach a --size 16M --control "$control"
expect_error "cannot reach the daemon" "$memlend" detach a --control "$control"

start_daemon borrower --local-store 16M
expect_error "multiple of 4 KiB" "$memlend" attach a --size 10000 --control "$control"
expect_error "multiple of 4 KiB" "$memlend" attach a --size 0 --control "$control"
expect_error "not a size" "$memlend" attach a --size 12Q --control "$control"
expect_error "name" "$memlend" attach 'a/b' --size 16M --control "$control"
expect_error "frontend" "$memlend" attach a --size 16M --frontend floppy --control "$control"
expect_error "queues" "$memlend" attach a --size 16M --queues 0 --control "$control"
expect_error "replicas:N or replicas:N\+disk with N from 1 to 3" "$memlend" attach a --size 16M --redundancy replicas:9 --control "$control"
expect_error "needs at least 2 peers \(--peer\), and this daemon has 0" "$memlend" attach a --size 16M --redundancy replicas:2 --control "$control"
expect_error "there is none \(start the daemon with --backing-file\)" "$memlend" attach a --size 16M --redundancy disk --control "$control"
check_nothing_attached "$control"

# The daemon validates on its own too (other clients do not go through the CLI).
reply=$(python3 - "$control" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(json.dumps({"command": "attach", "name": "a", "size_bytes": 4097, "frontend": "fuse"}).encode() + b"\n")
print(s.makefile().readline().strip())
PY
)
grep -q '"ok":false' <<<"$reply" && grep -q "4 KiB" <<<"$reply" || fail "daemon accepted 4097 bytes: $reply"
reply=$(python3 - "$control" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(json.dumps({"command": "attach", "name": "a", "size_bytes": 4096, "queues": 100000}).encode() + b"\n")
print(s.makefile().readline().strip())
PY
)
grep -q '"ok":false' <<<"$reply" && grep -q "queues" <<<"$reply" || fail "daemon accepted 100000 queues: $reply"
check_nothing_attached "$control"

if [[ ! -e /dev/nbd0 && ! -e /sys/module/nbd ]] && ! modprobe -n nbd 2>/dev/null; then
  expect_error "nbd: .*nbd module" "$memlend" attach a --size 16M --frontend nbd --control "$control"
fi
if [[ ! -e /dev/ublk-control ]]; then
  expect_error "ublk" "$memlend" attach a --size 16M --frontend ublk --control "$control"
fi
check_nothing_attached "$control"

# auto: on a host without ublk and nbd that is fuse, a loop device.
device=$("$memlend" attach a --size 16M --control "$control")
attached_devices+=("$device")
if [[ ! -e /dev/ublk-control && ! -e /dev/nbd0 ]]; then
  [[ $device == /dev/loop* ]] || fail "auto attached '$device' on a host with only FUSE"
fi
expect_error "already exists" "$memlend" attach a --size 32M --control "$control"
expect_error "already exists" "$memlend" attach a --size 16M --frontend fuse --control "$control"
[[ $(losetup -a | grep -cF "$workdir") -eq 1 ]] || fail "not exactly one loop device: $(losetup -a)"
# The first one still works.
head -c 1M /dev/urandom >"$workdir/data"
dd if="$workdir/data" of="$device" bs=1M oflag=direct status=none
dd if="$device" of="$workdir/back" bs=1M count=1 iflag=direct status=none
cmp "$workdir/back" "$workdir/data" ||
  fail "$device does not read back what was written after a refused duplicate"
"$memlend" detach a --control "$control"
check_nothing_attached "$control"
expect_error "no attached device" "$memlend" detach a --control "$control"
stop_daemon borrower

# SIGTERM with a device still attached: the daemon detaches it and exits 0, leaving nothing.
start_daemon borrower --local-store 16M
device=$("$memlend" attach b --size 16M --frontend fuse --control "$control")
[[ -b $device ]] || fail "attach printed '$device'"
stop_daemon borrower
if losetup -a | grep -qF "$workdir"; then fail "SIGTERM left a loop device: $(losetup -a)"; fi
if grep -qF "$workdir" /proc/mounts; then fail "SIGTERM left a mount"; fi
[[ ! -e $control.fuse && ! -e $control.nbd ]] || fail "SIGTERM left $control.fuse or .nbd"
echo "ok: SIGTERM detached $device and left nothing"

start_daemon withdevice --device d0:16M --nbd "unix:$workdir/nbd.sock" --local-store 16M
expect_error "--device" "$memlend" detach d0 --control "$workdir/withdevice.control"
stop_daemon withdevice

start_daemon lender --lend 4M --listen "127.0.0.1:$(free_port)"
expect_error "local store" "$memlend" attach a --size 16M --control "$workdir/lender.control"
stop_daemon lender
echo "PASS: attach and detach refuse bad input with one clear line and leave nothing behind"
