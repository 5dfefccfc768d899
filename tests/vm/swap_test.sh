#!/usr/bin/env bash
# swap_test.sh — swap on a memlend device in a real kernel; runs inside the VM:
#     tests/vm/run [--mem MIB] [--disk MIB] tests/vm/swap_test.sh MEMLEND FRONTEND MODE
# MEMLEND is the memlend binary (memory_pattern is found in the same build tree); FRONTEND is
# ublk or nbd; MODE is one of
#   cgroup    a process in a memory cgroup limited to a quarter of what it allocates writes a
#             pattern over 256 MiB, reads it all back and checks it, while /proc/swaps shows the
#             memlend device in use. The borrower's local store is 16 MiB and a lender daemon in
#             the same guest takes the rest, so swapped pages really live on the peer.
#   pressure  no cgroup: the process allocates twice the guest's RAM (boot the guest with
#             --mem 512 --disk 1024), so the whole system, the daemons included, is under memory
#             pressure. Pages go to the local store, the lender, then the borrower's backing file
#             on the guest's disk. It must finish with its data intact and no hung task (the
#             harness fails the run on one).
# Then swapoff, detach, and check that the device is gone and both daemons exit cleanly.
set -euo pipefail
ml_prefix="swap_test.sh: "
source "$(dirname "${BASH_SOURCE[0]}")/guest_lib.sh"
require_vm

[[ $# -eq 3 ]] || fail "usage: swap_test.sh MEMLEND ublk|nbd cgroup|pressure"
memlend=$1
frontend=$2
mode=$3
pattern=$(dirname "$memlend")/../tests/tools/memory_pattern
[[ -x $pattern ]] || fail "memory_pattern is not built next to $memlend ($pattern)"
case $frontend in
  ublk) vm_require_module ublk_drv; vm_wait_path /dev/ublk-control || fail "no /dev/ublk-control" ;;
  nbd) vm_require_module nbd nbds_max=4; vm_wait_path /dev/nbd0 || fail "no /dev/nbd0" ;;
  *) fail "unknown frontend '$frontend'" ;;
esac

make_workdir swap-test
device=""
swap_cleanup() {
  [[ -z $device ]] || swapoff "$device" 2>/dev/null || true
  ml_cleanup
}
trap swap_cleanup EXIT

backing=()
case $mode in
  cgroup)
    lend=512M
    swap_size=512M
    ;;
  pressure)
    vm_require_module virtio_blk
    vm_require_module ext4
    vm_wait_path /dev/vda || fail "pressure mode needs the guest disk: tests/vm/run --disk 1024"
    mkfs.ext4 -q -F /dev/vda
    mkdir -p /mnt/disk
    mount /dev/vda /mnt/disk
    lend=64M
    swap_size=1536M
    backing=(--backing-file /mnt/disk/memlend.spill)
    ;;
  *) fail "unknown mode '$mode'" ;;
esac

port=$(free_port)
start_daemon lender --lend "$lend" --listen "127.0.0.1:$port"
start_daemon borrower --local-store 16M --peer "127.0.0.1:$port" "${backing[@]}"
device=$("$memlend" attach swap0 --size "$swap_size" --frontend "$frontend" \
  --control "$workdir/borrower.control")
[[ -b $device ]] || fail "attach printed '$device', which is not a block device"
echo "attached swap0 as $device ($frontend)"

mkswap "$device" >/dev/null
swapon "$device"
grep -q "^$device " /proc/swaps || fail "$device is not in /proc/swaps after swapon"

# Samples how much swap the device holds while the pattern runs; keeps the largest.
peak_file=$workdir/swap-peak
echo 0 >"$peak_file"
watch_swap() {
  local peak=0 used
  while :; do
    used=$(awk -v d="$device" '$1 == d {print $4}' /proc/swaps)
    if [[ -n $used && $used -gt $peak ]]; then
      peak=$used
      echo "$peak" >"$peak_file"
    fi
    sleep 0.5
  done
}
watch_swap &
watcher=$!

case $mode in
  cgroup)
    size_mib=256
    group=/sys/fs/cgroup/memlend-swap-test
    mkdir -p "$group"
    echo $(((size_mib << 20) / 4)) >"$group/memory.max"
    echo "running memory_pattern $size_mib MiB in a cgroup limited to $((size_mib / 4)) MiB"
    # The subshell moves itself into the cgroup, then becomes memory_pattern.
    (echo "$BASHPID" >"$group/cgroup.procs" && exec "$pattern" "$size_mib" 7) ||
      fail "memory_pattern found damaged pages (or could not run)"
    ;;
  pressure)
    ram_mib=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
    size_mib=$((ram_mib * 2))
    echo "running memory_pattern $size_mib MiB on a guest with $ram_mib MiB of RAM, no cgroup"
    "$pattern" "$size_mib" 11 || fail "memory_pattern found damaged pages (or could not run)"
    ;;
esac
kill "$watcher" 2>/dev/null || true
wait "$watcher" 2>/dev/null || true
peak_kib=$(cat "$peak_file")
echo "peak swap use on $device: $((peak_kib / 1024)) MiB"
((peak_kib > 0)) || fail "$device was never used for swap"

status_json borrower >"$workdir/status.json"
python3 - "$workdir/status.json" "$mode" <<'EOF' || fail "the borrower's status does not show swapped pages where expected"
import json, sys
status, mode = json.load(open(sys.argv[1])), sys.argv[2]
device = next(d for d in status["devices"] if d["name"] == "swap0")
pages = device["pages"]
print(f"swap0: mapped {pages['mapped']}, local {pages['local']}, remote {pages['remote']}, "
      f"disk {pages['disk']}, zero {pages['zero']}")
assert pages["mapped"] == pages["zero"] + pages["local"] + pages["disk"] + pages["remote"]
assert pages["remote"] > 0, "no page is on the lender"
if mode == "pressure":
    assert pages["disk"] > 0, "no page reached the backing file"
EOF

swapoff "$device"
"$memlend" detach swap0 --control "$workdir/borrower.control"
device_name=${device#/dev/}
for _ in $(seq 50); do
  [[ -e $device && -e /sys/block/$device_name/size && $(cat "/sys/block/$device_name/size") != 0 ]] || break
  sleep 0.1
done
if [[ $frontend == ublk ]]; then
  [[ ! -e $device ]] || fail "$device still exists after detach"
fi
device=""
stop_daemon borrower
stop_daemon lender
echo "swap_test.sh: PASS ($frontend, $mode)"
