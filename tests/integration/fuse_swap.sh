#!/bin/bash
# Swap on a memlend device attached through FUSE, with its pages on a peer.
#
# Usage: fuse_swap.sh PATH_TO_MEMLEND
#
# A lender (256 MiB) and a borrower daemon (16 MiB local store, that lender as its peer, no
# --device); `memlend attach swap0 --size 256M --frontend fuse` gives /dev/loopN; mkswap and
# swapon on it; a process in a memory cgroup limited to 32 MiB writes a pattern over 128 MiB,
# and while it waits /proc/swaps must show the device in use, `memlend status --json` pages of
# swap0 on the peer, and `memlend detach` must be refused; then it reads the pattern back intact.
# swapoff, detach, and nothing may be left: no loop device, no mount, no device in the daemon.
# A trap takes everything down even when a step fails.
#
# Exit status: 0 pass, 1 fail, 77 skipped (not root, no FUSE or loop, nbdfuse missing, no memory
# cgroup).

set -euo pipefail

memlend=${1:?usage: fuse_swap.sh PATH_TO_MEMLEND}
ml_prefix="fuse_swap.sh: "
# shellcheck source=attach_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/attach_lib.sh" memlend-fuse-swap
require_fuse_attach
require_swap_tools

port=$(free_port)
start_daemon lender --lend 256M --listen "127.0.0.1:$port"
start_daemon borrower --local-store 16M --peer "127.0.0.1:$port"
control=$workdir/borrower.control

device=$("$memlend" attach swap0 --size 256M --frontend fuse --control "$control")
attached_devices+=("$device")
echo "attached swap0 as $device"
[[ $device == /dev/loop* && -b $device ]] || fail "attach printed '$device', not a loop device"
swap_cycle swap0 "$control" "$device" fuse
check_nothing_attached "$control"
stop_daemon borrower
stop_daemon lender
[[ ! -e $control.fuse && ! -e $control.nbd ]] || fail "the borrower left $control.fuse or .nbd"
echo "PASS: swap through a FUSE-attached memlend device, pages on a peer, all cleaned up"
