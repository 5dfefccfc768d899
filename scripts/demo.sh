#!/usr/bin/env bash
# The main job, end to end on one machine: install dependencies, build, then borrow RAM from
# peers over TCP on loopback.
#   1. two lender daemons each lend 64 MiB of RAM (--lend 64M --listen 127.0.0.1:PORT);
#   2. a borrower daemon serves a 128 MiB NBD device with a 16 MiB local store, both lenders as
#      --peer;
#   3. 96 MiB of random data (six times the local store) is written through NBD with nbdcopy;
#   4. once the borrower's evictor has moved the cold pages out, the page counts must add up:
#      mapped = local + remote, most pages remote, both lenders hold some, and the borrower's
#      books agree with what the lenders say they lend;
#   5. `memlend status` and `memlend peers` of the borrower and `memlend status` of the lenders
#      are shown;
#   6. the data is read back through NBD (mostly from the lenders) and its SHA-256 compared;
#   7. every daemon is stopped with SIGTERM and must exit 0.
# Exits 0 when every step passed, 1 with a "demo: FAIL: ..." line otherwise; whatever it
# started is stopped and its temporary directory removed however it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh

ml_prefix="demo: "
# shellcheck source=lib.sh
source scripts/lib.sh
memlend=$ml_root/build/src/memlend

# Any command that fails unexpectedly ends the demo with a line saying which.
on_error() {
  [[ $BASHPID == "$$" ]] || exit "$1"  # in a $(...) subshell: the parent reports it
  fail "this command failed with status $1 (scripts/demo.sh line $2): $3"
}
set -E
trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR

for tool in nbdcopy nbdinfo python3 sha256sum; do
  command -v "$tool" >/dev/null || fail "$tool is missing (scripts/install-deps.sh should install it)"
done
make_workdir memlend-demo

step() {
  echo
  echo "== $*"
}

# run_daemon NAME ARGS...: shows the command, starts it (start_daemon adds --control
# $workdir/NAME.control), waits until it is ready, and shows its ready line.
run_daemon() {
  local name=$1
  shift
  echo "  $name\$ memlend daemon $* --control $workdir/$name.control"
  start_daemon "$name" "$@"
  echo "  $name: $(grep 'memlend: ready:' "$workdir/$name.stderr")"
}

# show NAME COMMAND...: runs `memlend COMMAND --control` of the daemon NAME, output indented.
show() {
  local name=$1
  shift
  echo "  $name\$ memlend $*"
  "$memlend" "$@" --control "$workdir/$name.control" | sed 's/^/    /'
}

data_mib=96
device_mib=128
local_store_mib=16
lend_mib=64

step "Step 1/7: two lenders, each lending $lend_mib MiB of its RAM to peers over TCP"
port1=$(free_port)
port2=$(free_port)
run_daemon lender1 --lend "${lend_mib}M" --listen "127.0.0.1:$port1"
run_daemon lender2 --lend "${lend_mib}M" --listen "127.0.0.1:$port2"

step "Step 2/7: a borrower serving a $device_mib MiB device over NBD, with a" \
  "$local_store_mib MiB local store and both lenders as peers"
echo "  Pages are written to the local store; once it is 90% full, the coldest pages move to"
echo "  the lenders until it is down to 80%."
socket=$workdir/nbd.sock
run_daemon borrower --device "demo:${device_mib}M" --nbd "unix:$socket" \
  --local-store "${local_store_mib}M" --peer "127.0.0.1:$port1" --peer "127.0.0.1:$port2"
uri="nbd+unix:///demo?socket=$socket"
echo "  NBD export: $uri, $(nbdinfo --size "$uri") bytes (nbdinfo --size)"

step "Step 3/7: writing $data_mib MiB of random data through NBD" \
  "($((data_mib / local_store_mib)) times the local store)"
head -c "${data_mib}M" /dev/urandom >"$workdir/data"
written_sum=$(sha256sum <"$workdir/data" | cut -d' ' -f1)
echo "  sha256 of the data: $written_sum"
echo "  \$ nbdcopy $workdir/data '$uri'"
nbdcopy "$workdir/data" "$uri"

step "Step 4/7: waiting for the evictor to settle, then checking that the page counts add up"
check_placement --mapped $((data_mib * 256)) borrower lender1 lender2 ||
  fail "the page counts do not add up after 10 s (see the lines above)"

step "Step 5/7: where the pages are"
show borrower status
echo
show borrower peers
echo
show lender1 status
echo
show lender2 status

step "Step 6/7: reading the whole device back through NBD (most pages come from the lenders)"
echo "  \$ nbdcopy '$uri' $workdir/readback"
nbdcopy "$uri" "$workdir/readback"
read_sum=$(head -c "${data_mib}M" "$workdir/readback" | sha256sum | cut -d' ' -f1)
echo "  sha256 of the first $data_mib MiB read back: $read_sum"
[[ $read_sum == "$written_sum" ]] || fail "the data read back differs from the data written"
cmp -s -n $(((device_mib - data_mib) << 20)) <(tail -c +$(((data_mib << 20) + 1)) "$workdir/readback") \
  /dev/zero || fail "the $((device_mib - data_mib)) MiB never written do not read back as zeros"
echo "  identical to what was written; the $((device_mib - data_mib)) MiB never written read as zeros"

step "Step 7/7: stopping every daemon with SIGTERM (each must exit 0)"
for name in borrower lender1 lender2; do
  stop_daemon "$name"
  echo "  $name exited 0"
done

echo
echo "Demo passed: $data_mib MiB went through a borrower with a $local_store_mib MiB local store" \
  "onto two lenders over TCP and came back intact."
