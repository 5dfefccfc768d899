# shellcheck shell=bash source-path=SCRIPTDIR
# attach_lib.sh — what the `memlend attach` tests share on top of scripts/lib.sh: checks for
# what attaching needs, a memory cgroup to push a process into swap, the pattern program that
# runs there, and a cleanup that takes down whatever the test attached (swapoff, loop devices,
# FUSE mounts) before lib.sh stops the daemons.
#
# Source it after setting $memlend; it sources scripts/lib.sh and makes $workdir:
#     source "$(dirname "${BASH_SOURCE[0]}")/attach_lib.sh" WORKDIR_NAME

# shellcheck source=../../scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"

[[ -x ${memlend:-} ]] || fail "memlend binary ${memlend:-} is not executable"
[[ $(id -u) -eq 0 ]] || skip "attaching block devices needs root"
command -v python3 >/dev/null || skip "python3 is needed for the pattern program and JSON"
make_workdir "$1"
trap 'attach_cleanup; ml_cleanup' EXIT
attach_lib_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Block devices this test attached (swapoff'd on cleanup) and the memory cgroup it made.
attached_devices=()
memcg_dir=

# require_fuse_attach: skips (77) unless this host can attach with --frontend fuse.
require_fuse_attach() {
  [[ -e /dev/fuse ]] || skip "/dev/fuse is missing (no FUSE in this kernel)"
  [[ -e /dev/loop-control ]] || skip "/dev/loop-control is missing (no loop devices)"
  command -v nbdfuse >/dev/null || skip "nbdfuse is not installed (Debian package libnbd-bin)"
  command -v fusermount3 >/dev/null || skip "fusermount3 is not installed (Debian package fuse3)"
  command -v losetup >/dev/null || skip "losetup is not installed (util-linux)"
}

# require_swap_tools: skips (77) unless mkswap and swapon exist and a memory cgroup can be made.
require_swap_tools() {
  command -v mkswap >/dev/null && command -v swapon >/dev/null || skip "mkswap/swapon missing"
  if [[ -e /sys/fs/cgroup/memory/memory.limit_in_bytes ]]; then
    return 0
  fi
  grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null ||
    skip "no memory cgroup controller (neither v1 /sys/fs/cgroup/memory nor v2 with memory)"
}

# make_memcg LIMIT_BYTES: creates a memory cgroup limited to LIMIT_BYTES (v1 if mounted, else
# v2's memory.high) and sets $memcg_dir; attach_cleanup removes it.
make_memcg() {
  local limit=$1
  if [[ -e /sys/fs/cgroup/memory/memory.limit_in_bytes ]]; then
    memcg_dir=/sys/fs/cgroup/memory/memlend-test-$$
    mkdir "$memcg_dir"
    echo "$limit" >"$memcg_dir/memory.limit_in_bytes"
    [[ -e $memcg_dir/memory.swappiness ]] && echo 100 >"$memcg_dir/memory.swappiness"
  else
    grep -qw memory /sys/fs/cgroup/cgroup.subtree_control ||
      echo +memory >/sys/fs/cgroup/cgroup.subtree_control
    memcg_dir=/sys/fs/cgroup/memlend-test-$$
    mkdir "$memcg_dir"
    # memory.high, not memory.max: above it the kernel reclaims and slows the process down
    # rather than killing it. With memory.max a slow swap device (an emulated guest) can have
    # the whole cgroup under writeback at once, and the OOM killer ends the test.
    echo "$limit" >"$memcg_dir/memory.high"
  fi
}

# run_in_memcg COMMAND...: runs COMMAND (in the background, pid in $!) inside $memcg_dir.
run_in_memcg() {
  local dir=$memcg_dir
  bash -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$dir" "$@" &
}

# swap_used_kib DEVICE: the Used column of DEVICE's line in /proc/swaps (0 when absent).
swap_used_kib() {
  awk -v dev="$1" '$1 == dev { print $4; found = 1 } END { if (!found) print 0 }' /proc/swaps
}

# swap_pattern_check NAME CONTROL DEVICE SIZE_MIB LIMIT_MIB: runs the pattern program on SIZE_MIB
# in a memory cgroup of LIMIT_MIB and, once it has written everything and before it reads it
# back, checks that DEVICE (swap, attached as NAME to the daemon at CONTROL) holds some of it,
# that the daemon has pages on peers, and that detach is refused while DEVICE is swapped on.
swap_pattern_check() {
  local name=$1 control=$2 device=$3 size_mib=$4 limit_mib=$5 pid used remote
  make_memcg $((limit_mib << 20))
  rm -f "$workdir/filled" "$workdir/go"
  run_in_memcg python3 "$attach_lib_dir/swap_pattern.py" "$size_mib" "$workdir/filled" \
    "$workdir/go"
  pid=$!
  for _ in $(seq 600); do
    [[ -e $workdir/filled ]] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  [[ -e $workdir/filled ]] || fail "the pattern program did not finish writing within 60 s"
  cat "$workdir/filled"
  used=$(swap_used_kib "$device")
  echo "/proc/swaps: $device holds $used KiB"
  [[ $used -gt 0 ]] || fail "$device is not used as swap: $(cat /proc/swaps)"
  remote=$("$memlend" status --json --control "$control" | python3 -c '
import json, sys
status = json.load(sys.stdin)
print(next(d for d in status["devices"] if d["name"] == sys.argv[1])["pages"]["remote"])' "$name")
  echo "memlend status: $name has $remote pages on peers"
  [[ $remote -gt 0 ]] || fail "no page of $name is on a peer"
  if "$memlend" detach "$name" --control "$control" 2>"$workdir/detach.err"; then
    fail "detach succeeded while $device is swapped on"
  fi
  grep -q "in use" "$workdir/detach.err" || fail "detach while in use: $(cat "$workdir/detach.err")"
  echo "detach while swapped on is refused: $(cat "$workdir/detach.err")"
  # A test may act here, with the pattern written and not yet read back.
  if declare -F swap_pattern_midway >/dev/null; then swap_pattern_midway; fi
  touch "$workdir/go"
  wait "$pid" || fail "the pattern program failed (status $?)"
}

# swap_cycle NAME CONTROL DEVICE FRONTEND [discard]: the swap check every frontend gets.
# `memlend status` must show NAME attached as DEVICE through FRONTEND; then mkswap and swapon
# on DEVICE, swap_pattern_check over 128 MiB in a 32 MiB memory cgroup, swapoff and detach.
# With `discard`, swapon --discard=pages, and once the pattern program has exited (its swap
# slots freed) the device must let go of its pages within 20 s: the kernel's discards of the
# freed clusters reach memlend, which frees their pages. (Not every page: the kernel keeps a
# few clusters it was filling, about 10 MiB in the VM, undiscarded; without discards all of
# the pattern's 24,000 or more swapped pages would stay mapped.)
swap_cycle() {
  local name=$1 control=$2 device=$3 frontend=$4 discard=${5:-} mapped=
  "$memlend" status --control "$control" | grep -E "^$name .*$device \($frontend\)" ||
    fail "status does not show $name attached: $("$memlend" status --control "$control")"
  mkswap "$device" >/dev/null
  if [[ $discard == discard ]]; then
    swapon --discard=pages "$device"
  else
    swapon "$device"
  fi
  swap_pattern_check "$name" "$control" "$device" 128 32
  if [[ $discard == discard ]]; then
    for _ in $(seq 200); do
      mapped=$("$memlend" status --json --control "$control" | python3 -c '
import json, sys
status = json.load(sys.stdin)
print(next(d for d in status["devices"] if d["name"] == sys.argv[1])["pages"]["mapped"])' "$name")
      ((mapped < 8192)) && break
      sleep 0.1
    done
    echo "after the pattern program exited: $name maps $mapped pages (swapon --discard=pages)"
    ((mapped < 8192)) || fail "the freed swap slots were not discarded: $mapped pages still mapped"
  fi
  swapoff "$device"
  "$memlend" detach "$name" --control "$control"
  attached_devices=()
}

# attach_cleanup: swapoff what the test attached, kill what runs in its memory cgroup and remove
# it, detach loop devices over files in $workdir and unmount FUSE mounts in it. Runs before
# lib.sh's cleanup stops the daemons; safe to run when nothing is left.
attach_cleanup() {
  local device loop mount
  for device in "${attached_devices[@]}"; do
    grep -q "^$device " /proc/swaps && swapoff "$device" 2>/dev/null
  done
  if [[ -n $memcg_dir && -d $memcg_dir ]]; then
    xargs -r kill -KILL <"$memcg_dir/cgroup.procs" 2>/dev/null || true
    sleep 0.2
    rmdir "$memcg_dir" 2>/dev/null || true
  fi
  [[ -n ${workdir:-} ]] || return 0
  for loop in $(losetup -a 2>/dev/null | grep -F "$workdir" | cut -d: -f1); do
    losetup -d "$loop" 2>/dev/null || true
  done
  for mount in $(awk -v dir="$workdir" 'index($2, dir) == 1 { print $2 }' /proc/mounts | sort -r); do
    fusermount3 -u -z "$mount" 2>/dev/null || umount -l "$mount" 2>/dev/null || true
  done
}

# check_nothing_attached CONTROL: fails if a loop device, a mount or a socket-side file of the
# daemon at CONTROL is left in $workdir, or the daemon still lists a device.
check_nothing_attached() {
  local control=$1 devices
  if losetup -a | grep -qF "$workdir"; then fail "a loop device is left: $(losetup -a)"; fi
  if grep -qF "$workdir" /proc/mounts; then fail "a mount is left: $(grep -F "$workdir" /proc/mounts)"; fi
  devices=$("$memlend" status --json --control "$control" |
    python3 -c 'import json, sys; print(len(json.load(sys.stdin)["devices"]))')
  [[ $devices -eq 0 ]] || fail "the daemon still lists $devices device(s)"
  if [[ -d $control.fuse ]] && [[ -n $(ls -A "$control.fuse") ]]; then
    fail "left in $control.fuse: $(ls -A "$control.fuse")"
  fi
}
