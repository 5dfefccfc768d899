#!/usr/bin/env bash
# The main job, end to end on one machine: install dependencies, build, start a memlend
# daemon serving one device over NBD, write 96 MiB through it (more than its 32 MiB local
# store, so pages spill to the backing file; half the data compresses with lz4), read it
# all back and compare, show where the pages are, and shut the daemon down cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh

memlend=build/src/memlend
work=$(mktemp -d /tmp/memlend-demo.XXXXXX)
daemon_pid=
cleanup() {
  if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then kill -TERM "$daemon_pid"; fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== starting: memlend daemon --device demo:256M --local-store 32M --backing-file ... --compress lz4"
"$memlend" daemon --device demo:256M --nbd "unix:$work/nbd.sock" --local-store 32M \
  --backing-file "$work/spill" --compress lz4 --control "$work/control.sock" &
daemon_pid=$!
for _ in $(seq 100); do
  "$memlend" status --control "$work/control.sock" >/dev/null 2>&1 && break
  sleep 0.1
done
uri="nbd+unix:///demo?socket=$work/nbd.sock"
nbdinfo "$uri" | grep -E "export-size|can_multi_conn|block_size_preferred"

echo "== writing 48 MiB of text and 48 MiB of random data through NBD"
(set +o pipefail; yes "memlend keeps this page in RAM, compressed" | head -c 48M) > "$work/data"
head -c 48M /dev/urandom >> "$work/data"
nbdcopy "$work/data" "$uri"

echo "== reading it back and comparing"
nbdcopy "$uri" "$work/back"
cmp -n $((96 << 20)) "$work/back" "$work/data"
echo "all 96 MiB read back intact"

echo "== memlend status"
"$memlend" status --control "$work/control.sock"

echo "== stopping the daemon (SIGTERM)"
kill -TERM "$daemon_pid"
wait "$daemon_pid"
daemon_pid=
echo "demo finished: daemon exited cleanly"
