#!/bin/bash
# seal_bench.sh — how fast one core seals and opens 4 KiB pages with AES-256-GCM (the sealing
# of pages that leave the host, docs/security.md), next to memcpy of the same pages, in the
# same run.
#
# Usage: bench/seal_bench.sh [--seconds S] [--repeat N]
#   --seconds S   time of each measurement (default 1)
#   --repeat N    runs; each prints its own lines (default 3)
#
# Runs build/tests/tools/seal_speed (built with the tests: scripts/build.sh) on one core
# (taskset -c 0 when taskset is there). Prints MB/s of pages and the ratio to memcpy.
set -euo pipefail
ml_prefix="seal_bench.sh: "
# shellcheck source=../scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

seconds=1
repeat=3
while [[ $# -gt 0 ]]; do
  case $1 in
    --seconds) seconds=${2:?}; shift 2 ;;
    --repeat) repeat=${2:?}; shift 2 ;;
    -h|--help) sed -n '/^# Usage:/,/^#$/{/^#$/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    *) echo "${ml_prefix}unknown argument $1" >&2; exit 2 ;;
  esac
done
tool=$ml_root/build/tests/tools/seal_speed
[[ -x $tool ]] || skip "$tool is not built (run scripts/build.sh)"
pin=()
command -v taskset >/dev/null && pin=(taskset -c 0)
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'); AES-NI: $(grep -qw aes /proc/cpuinfo && echo yes || echo no)"
for i in $(seq "$repeat"); do
  echo "run $i:"
  "${pin[@]}" "$tool" "$seconds" | sed 's/^/  /'
done
