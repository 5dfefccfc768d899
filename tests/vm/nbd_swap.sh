#!/usr/bin/env bash
# nbd_swap.sh — swap on a memlend device attached through the kernel's NBD client, with its
# pages on a peer. Runs inside the VM (the host kernel has no nbd module):
#     tests/vm/run tests/vm/nbd_swap.sh MEMLEND
# MEMLEND is the memlend binary (default: $MEMLEND_BINARY).
#
# In the guest: load nbd; a lender (256 MiB) and a borrower daemon (16 MiB local store, that
# lender as its peer, no --device); `memlend attach swap0 --size 256M --frontend nbd` must give
# /dev/nbdN; mkswap and swapon; a process in a cgroup-v2 memory cgroup limited to 32 MiB writes
# a pattern over 128 MiB, and while it waits /proc/swaps must show the device in use, `memlend
# status --json` pages of swap0 on the peer, and detach must be refused; then it reads the
# pattern back intact. swapoff, detach (the nbd device must be disconnected); `auto` must pick
# nbd here when ublk is absent; ext4 on it, detach refused while mounted; SIGTERM with the
# device still attached detaches it. A trap takes everything down even when a step fails.
set -euo pipefail

memlend=${1:-${MEMLEND_BINARY:-}}
ml_prefix="nbd_swap.sh: "
[[ ${MEMLEND_VM:-} == 1 && -n ${MEMLEND_VM_MODDIR:-} ]] ||
  { echo "${ml_prefix}FAIL: this script runs only inside the VM: tests/vm/run ${0##*/} MEMLEND" >&2; exit 1; }
# shellcheck source=../integration/attach_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../integration/attach_lib.sh" memlend-nbd-swap
require_swap_tools

modprobe -d "$MEMLEND_VM_MODDIR" nbd nbds_max=4 || fail "cannot load the nbd module"
for _ in $(seq 50); do [[ -e /dev/nbd0 ]] && break; sleep 0.1; done
[[ -e /dev/nbd0 ]] || fail "/dev/nbd0 did not appear after loading nbd"

port=$(free_port)
start_daemon lender --lend 256M --listen "127.0.0.1:$port"
start_daemon borrower --local-store 16M --peer "127.0.0.1:$port"
control=$workdir/borrower.control
grep -q "warning" "$workdir/borrower.stderr" &&
  echo "borrower warned: $(grep warning "$workdir/borrower.stderr")"

device=$("$memlend" attach swap0 --size 256M --frontend nbd --control "$control")
attached_devices+=("$device")
echo "attached swap0 as $device"
[[ $device =~ ^/dev/nbd[0-9]+$ && -b $device ]] || fail "attach printed '$device', not an nbd device"
nbd=${device#/dev/}
[[ -e /sys/block/$nbd/pid ]] || fail "$device is not connected (no /sys/block/$nbd/pid)"
[[ $(blockdev --getsize64 "$device") -eq $((256 << 20)) ]] ||
  fail "$device has $(blockdev --getsize64 "$device") bytes, not 256 MiB"
# Connected through the nbd netlink interface, which names the backend; no I/O scheduler.
backend=$(cat "/sys/block/$nbd/backend" 2>/dev/null || true)
[[ $backend == memlend:swap0 ]] || fail "/sys/block/$nbd/backend is '$backend', not memlend:swap0"
grep -q '\[none\]' "/sys/block/$nbd/queue/scheduler" ||
  fail "$device's I/O scheduler is $(cat "/sys/block/$nbd/queue/scheduler"), not none"
swap_cycle swap0 "$control" "$device" nbd
[[ ! -e /sys/block/$nbd/pid ]] || fail "$device is still connected after detach"
check_nothing_attached "$control"

# auto picks ublk where the driver is loaded, else the kernel NBD client: ublk is not loaded.
[[ ! -e /dev/ublk-control ]] || fail "ublk_drv is loaded; this check expects it absent"
device=$("$memlend" attach auto0 --size 64M --control "$control")
attached_devices+=("$device")
[[ $device =~ ^/dev/nbd[0-9]+$ ]] || fail "auto attached '$device', not an nbd device"
head -c 4M /dev/urandom >"$workdir/data"
dd if="$workdir/data" of="$device" bs=1M oflag=direct status=none
dd if="$device" of="$workdir/back" bs=1M count=4 iflag=direct status=none
cmp "$workdir/back" "$workdir/data" ||
  fail "$device does not read back what was written"
# A mounted file system holds the device too: detach is refused until it is unmounted.
mkfs.ext4 -q -F "$device" || fail "mkfs.ext4 on $device failed"
mkdir -p "$workdir/mnt"
mount "$device" "$workdir/mnt"
cp "$workdir/data" "$workdir/mnt/data"
if "$memlend" detach auto0 --control "$control" 2>"$workdir/detach.err"; then
  umount "$workdir/mnt"
  fail "detach succeeded while $device is mounted"
fi
grep -q "in use" "$workdir/detach.err" || fail "detach while mounted: $(cat "$workdir/detach.err")"
echo "detach while mounted is refused: $(cat "$workdir/detach.err")"
umount "$workdir/mnt"
mount "$device" "$workdir/mnt"
cmp "$workdir/mnt/data" "$workdir/data" || fail "the file on $device changed across a remount"
umount "$workdir/mnt"
# SIGTERM with a device still attached: the daemon detaches it and exits 0.
stop_daemon borrower
attached_devices=()
[[ ! -e /sys/block/${device#/dev/}/pid ]] || fail "$device is still connected after SIGTERM"
stop_daemon lender
echo "PASS: swap through a kernel-NBD-attached memlend device, pages on a peer; auto picks nbd"
