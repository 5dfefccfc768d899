#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# smoke.sh — the VM harness's own test; runs inside the VM:
#     tests/vm/run tests/vm/smoke.sh [MEMLEND]
# MEMLEND is the memlend binary or a build directory (default: $MEMLEND_BINARY, then
# build/src/memlend). Checks that the kernel modules memlend needs load (ublk_drv, nbd, loop,
# rdma_rxe with a soft-RoCE device on lo), that their device nodes appear, that the guest's
# mounts are as documented, and that memlend runs in the guest.
set -euo pipefail
# shellcheck disable=SC2034 # used by skip and fail
ml_prefix="smoke.sh: "
# shellcheck source=guest_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/guest_lib.sh"
require_vm

memlend=${1:-${MEMLEND_BINARY:-$MEMLEND_VM_REPO/build/src/memlend}}
[[ -d $memlend ]] && memlend=$memlend/src/memlend

echo "kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print $2 / 1024 " MiB"}' /proc/meminfo)"

# Mounts: the host root read-only, scratch space writable, cgroup2 with the memory controller.
touch "$MEMLEND_VM_REPO/.vm-write-test" 2>/dev/null && fail "the host root is writable in the guest"
for dir in /tmp /run /var/tmp /dev/shm; do
  touch "$dir/write-test" || fail "$dir is not writable"
done
grep -qw memory /sys/fs/cgroup/cgroup.subtree_control ||
  fail "the memory controller is not enabled for child cgroups"
[[ $(cat /proc/sys/kernel/hung_task_timeout_secs) -le 30 ]] || fail "the hung-task timeout is not low"
ip -o link show lo | grep -q 'state UNKNOWN\|UP' || fail "lo is down"
echo "ok: mounts, cgroup2 memory controller, hung-task timeout, lo"

vm_require_module ublk_drv
vm_wait_path /dev/ublk-control || fail "/dev/ublk-control did not appear after loading ublk_drv"
echo "ok: ublk_drv, /dev/ublk-control"

vm_require_module nbd nbds_max=4
vm_wait_path /dev/nbd0 || fail "/dev/nbd0 did not appear after loading nbd"
echo "ok: nbd, /dev/nbd0"

vm_require_module loop
loop=$(losetup -f) || fail "losetup -f found no free loop device"
truncate -s 16M /tmp/loop-backing
losetup "$loop" /tmp/loop-backing
[[ $(blockdev --getsize64 "$loop") -eq $((16 << 20)) ]] || fail "$loop does not have 16 MiB"
losetup -d "$loop"
echo "ok: loop ($loop attached and detached)"

# rdma_rxe asks the crypto API for crc32 (its ICRC) when a link is added; it does not depend on
# the module by name. The kernel would load it through /proc/sys/kernel/modprobe (which
# tests/vm/run points at the guest kernel's modules); load it, and crc32c, first anyway.
vm_require_module crc32_generic
vm_require_module crc32c_generic
vm_require_module libcrc32c
vm_require_module rdma_rxe
if command -v rdma >/dev/null; then
  rdma link add rxe0 type rxe netdev lo || fail "rdma link add rxe0 type rxe netdev lo failed"
  rdma link show rxe0/1 || fail "rdma link show rxe0/1 failed"
  [[ -e /sys/class/infiniband/rxe0 ]] || fail "/sys/class/infiniband/rxe0 is missing"
  rdma link delete rxe0
  echo "ok: rdma_rxe, rxe0 on lo"
else
  echo "ok: rdma_rxe loaded; the rdma tool (iproute2) is missing, so no rxe0 link was made"
fi

[[ -x $memlend ]] || fail "memlend is not at $memlend (pass the binary or the build directory)"
"$memlend" --help >/tmp/memlend-help || fail "$memlend --help failed"
grep -q daemon /tmp/memlend-help || fail "$memlend --help does not mention the daemon"
echo "ok: $memlend --help runs in the guest"
echo "smoke.sh: all checks passed"
