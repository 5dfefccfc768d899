#!/usr/bin/env bash
# swap_test.sh — swap on a memlend device in a real kernel, pages on a peer; runs in the VM:
#     tests/vm/run [--mem MIB] [--disk MIB] tests/vm/swap_test.sh MEMLEND FRONTEND MODE
# MEMLEND is the memlend binary (memory_pattern is found in the same build tree); FRONTEND is
# ublk or nbd (what `memlend attach --frontend` takes); MODE is one of
#   cgroup    a lender (256 MiB) and a borrower (16 MiB local store, no --device) in the guest;
#             the device is attached, mkswap, swapon; a process in a cgroup-v2 memory cgroup
#             limited to a quarter of what it allocates writes a pattern over 128 MiB, and
#             before it reads it back /proc/swaps must show the device in use, `memlend status`
#             pages on the peer, and detach must be refused (attach_lib.sh's swap_cycle).
#   pressure  boot with little RAM (tests/vm/run --mem 512 --disk 1024): a lender of 64 MiB and
#             a borrower whose backing file is the guest's disk itself; no cgroup: memory_pattern
#             allocates twice the guest's RAM, so the whole system, the daemons included, is
#             under memory pressure. Pages go to the local store, then the lender, then the
#             backing file. It must finish with its data intact and no hung task (the harness
#             fails the run on one); status must show pages on the peer and on disk.
# Then swapoff and detach; the device must be gone and both daemons exit 0 on SIGTERM.
set -euo pipefail

memlend=${1:-}
frontend=${2:-}
mode=${3:-}
ml_prefix="swap_test.sh: "
[[ ${MEMLEND_VM:-} == 1 && -n ${MEMLEND_VM_MODDIR:-} ]] ||
  { echo "${ml_prefix}FAIL: this script runs only inside the VM: tests/vm/run ${0##*/} ..." >&2; exit 1; }
[[ $# -eq 3 ]] || { echo "usage: swap_test.sh MEMLEND ublk|nbd cgroup|pressure" >&2; exit 2; }
# shellcheck source=../integration/attach_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../integration/attach_lib.sh" memlend-swap-test
source "$(dirname "${BASH_SOURCE[0]}")/guest_lib.sh"
require_swap_tools

case $frontend in
  ublk) vm_require_module ublk_drv; vm_wait_path /dev/ublk-control || fail "no /dev/ublk-control" ;;
  nbd) vm_require_module nbd nbds_max=4; vm_wait_path /dev/nbd0 || fail "no /dev/nbd0" ;;
  *) fail "unknown frontend '$frontend'" ;;
esac

backing=()
case $mode in
  cgroup)
    lend=256M
    swap_size=256M
    ;;
  pressure)
    pattern=$(dirname "$memlend")/../tests/tools/memory_pattern
    [[ -x $pattern ]] || fail "memory_pattern is not built next to $memlend ($pattern)"
    vm_require_module virtio_blk
    vm_wait_path /dev/vda || fail "pressure mode needs the guest's disk: tests/vm/run --disk 1024"
    lend=64M
    swap_size=1536M
    # The daemons talk over sockets, whose buffers the kernel allocates without waiting for
    # reclaim; keep a reserve free for them, as docs/attach.md advises for swap hosts.
    echo 32768 >/proc/sys/vm/min_free_kbytes
    # The whole disk is the backing file: no file system between the daemon and the disk.
    backing=(--backing-file /dev/vda --backing-size 1000M --backing-direct)
    ;;
  *) fail "unknown mode '$mode'" ;;
esac

port=$(free_port)
start_daemon lender --lend "$lend" --listen "127.0.0.1:$port"
start_daemon borrower --local-store 16M --peer "127.0.0.1:$port" "${backing[@]}"
control=$workdir/borrower.control
device=$("$memlend" attach swap0 --size "$swap_size" --frontend "$frontend" --control "$control")
attached_devices+=("$device")
[[ -b $device ]] || fail "attach printed '$device', which is not a block device"
echo "attached swap0 as $device ($frontend)"

case $mode in
  cgroup)
    swap_cycle swap0 "$control" "$device" "$frontend"
    ;;
  pressure)
    mkswap "$device" >/dev/null
    swapon "$device"
    ram_mib=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
    size_mib=$((ram_mib * 2))
    echo "memory_pattern over $size_mib MiB on a guest with $ram_mib MiB of RAM, no cgroup"
    # Samples the device's swap use while the pattern runs and keeps the largest.
    (
      peak=0
      while :; do
        used=$(swap_used_kib "$device")
        ((used <= peak)) || { peak=$used; echo "$peak" >"$workdir/swap-peak"; }
        sleep 0.5
      done
    ) &
    watcher=$!
    # Every 10 s, the device's completed I/Os and each daemon thread's state, system call and
    # CPU ticks (TID:STATE:SYSCALL:TICKS): if the run hangs, the console shows what the daemons
    # were doing. Shell builtins only, so it works when fork cannot.
    mkfifo "$workdir/idle"
    (
      exec {idle}<>"$workdir/idle"  # read -t on a pipe nobody writes to: a sleep without fork
      while :; do
        read -r -t 10 -u "$idle" _ || true
        read -r -a io <"/sys/block/${device#/dev/}/stat"
        echo "  [$device: ${io[0]} reads, ${io[4]} writes done, ${io[8]} in flight]"
        for name in borrower lender; do
          line="  [$name"
          for task in /proc/"${ml_pids[$name]}"/task/*; do
            read -r stat <"$task/stat" || continue
            read -r syscall _ <"$task/syscall" || syscall=?
            read -r -a fields <<<"${stat#*) }"
            line+=" ${task##*/}:${fields[0]}:$syscall:$((fields[11] + fields[12]))"
          done
          echo "$line]"
        done
      done
    ) &
    monitor=$!
    "$pattern" "$size_mib" 11 || fail "memory_pattern found damaged pages (or could not run)"
    kill "$watcher" "$monitor" 2>/dev/null || true
    wait "$watcher" "$monitor" 2>/dev/null || true
    peak_kib=$(cat "$workdir/swap-peak" 2>/dev/null || echo 0)
    echo "peak swap use on $device: $((peak_kib / 1024)) MiB"
    ((peak_kib > ram_mib * 1024 / 2)) || fail "$device held only $peak_kib KiB of swap"
    "$memlend" status --json --control "$control" >"$workdir/status.json"
    python3 - "$workdir/status.json" <<'EOF' || fail "the borrower's status does not add up"
import json, sys
status = json.load(open(sys.argv[1]))
pages = next(d for d in status["devices"] if d["name"] == "swap0")["pages"]
print(f"swap0: mapped {pages['mapped']}, local {pages['local']}, remote {pages['remote']}, "
      f"disk {pages['disk']}, zero {pages['zero']}")
assert pages["mapped"] == pages["zero"] + pages["local"] + pages["disk"] + pages["remote"]
assert pages["remote"] > 0, "no page is on the lender"
assert pages["disk"] > 0, "no page reached the backing file"
EOF
    swapoff "$device"
    "$memlend" detach swap0 --control "$control"
    attached_devices=()
    ;;
esac
check_nothing_attached "$control"
if [[ $frontend == ublk ]]; then
  [[ ! -e $device ]] || fail "$device still exists after detach"
else
  [[ ! -e /sys/block/${device#/dev/}/pid ]] || fail "$device is still connected after detach"
fi
stop_daemon borrower
stop_daemon lender
echo "PASS: swap through a $frontend-attached memlend device ($mode)"
