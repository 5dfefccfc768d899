#!/usr/bin/env bash
# vm_bench.sh — memlend's kernel block devices in a real kernel: ublk against the kernel's NBD
# client, with a loop device on a tmpfs file as the reference, in the same run.
#
# Usage: bench/vm_bench.sh [--runtime SECONDS] [--repeat N] [--size MIB] [--memlend PATH]
#   --runtime SECONDS  time of each fio measurement (default 5)
#   --repeat N         measurements per device and workload, in turns; medians are shown (default 1)
#   --size MIB         size of each device in MiB (default 256)
#   --memlend PATH     memlend binary (default build/src/memlend next to this script)
#
# Boots the guest of tests/vm/run (Debian's 6.12 kernel under QEMU with TCG: no KVM here, so
# every instruction is emulated and absolute figures are far below a real machine's; compare
# the ratios) and runs bench/vm_bench_guest.sh there, which prints the table. IOPS ratio
# ublk/nbd above 1 means ublk is faster. Exits 77 (skipped) when the VM harness cannot run.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
runtime=5
repeat=1
size=256
memlend=$here/../build/src/memlend
while [[ $# -gt 0 ]]; do
  case $1 in
    --runtime) runtime=${2:?}; shift 2 ;;
    --repeat) repeat=${2:?}; shift 2 ;;
    --size) size=${2:?}; shift 2 ;;
    --memlend) memlend=${2:?}; shift 2 ;;
    -h | --help) sed -n '/^# Usage:/,/^#$/{/^#$/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    *) echo "vm_bench.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done
[[ $runtime =~ ^[1-9][0-9]*$ && $repeat =~ ^[1-9][0-9]*$ && $size =~ ^[1-9][0-9]*$ ]] ||
  { echo "vm_bench.sh: --runtime, --repeat and --size take positive numbers" >&2; exit 2; }
[[ -x $memlend ]] || { echo "vm_bench.sh: $memlend is not executable (build first)" >&2; exit 1; }
memlend=$(cd "$(dirname "$memlend")" && pwd)/$(basename "$memlend")
mem=$((size * 3 + 1024))
timeout=$((runtime * repeat * 12 * 3 + 600))
exec bash "$here/../tests/vm/run" --mem "$mem" --timeout "$timeout" \
  "$here/vm_bench_guest.sh" "$memlend" "$size" "$runtime" "$repeat"
