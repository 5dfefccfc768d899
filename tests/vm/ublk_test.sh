#!/usr/bin/env bash
# ublk_test.sh — the ublk frontend against the real ublk driver; runs inside the VM:
#     tests/vm/run tests/vm/ublk_test.sh [MEMLEND] UBLK_SERVE
# UBLK_SERVE is the ublk_serve test program (or a build directory holding
# tests/ublk_serve); MEMLEND (the memlend binary, which CTest's memlend_vm_test passes
# first) is not used. It serves a 256 MiB memlend Device as /dev/ublkbN and this script
# checks, in order:
#   1. the block device: size, 512-byte logical and 4096-byte physical blocks
#   2. dd writes a random pattern (whole MiBs and odd 512-byte sectors) and cmp reads it back
#   3. blkdiscard and blkdiscard -z (write zeroes) ranges read back as zeros, and the
#      Device's page counts drop
#   4. fio randrw with crc32c verification, io_uring engine, iodepth 32, O_DIRECT; then two
#      jobs at once with mixed request sizes
#   5. mkfs.ext4, mount, files written, umount, mount again, checksums verified
#   6. Detach while mounted returns -EBUSY and changes nothing; swap: mkswap, swapon,
#      Detach returns -EBUSY, a process in a 48 MiB memory cgroup swaps 160 MiB out to the
#      device and back intact; after swapoff Detach returns 0 and /dev/ublkbN and
#      /dev/ublkcN are gone
#   7. SIGTERM to a serving process removes its device and it exits 0
#   8. more queues than CPUs and queue depth 4 work (fio verify), and destroying the
#      frontend without a Detach removes the device
set -euo pipefail
ml_prefix="ublk_test.sh: "
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -f $here/guest_lib.sh ]]; then
  source "$here/guest_lib.sh"
else
  source "${MEMLEND_VM_REPO:?run this through tests/vm/run}/tests/vm/guest_lib.sh"
fi
require_vm

# memlend_vm_test passes the memlend binary first; ublk_serve is the last argument.
[[ $# -ge 1 ]] || fail "usage: ublk_test.sh [MEMLEND] UBLK_SERVE"
serve=${!#}
[[ -d $serve ]] && serve=$serve/tests/ublk_serve
[[ -x $serve ]] || fail "no ublk_serve program at $serve"
for tool in fio mkfs.ext4 blkdiscard blockdev cmp sha256sum; do
  command -v "$tool" >/dev/null || skip "$tool is not installed"
done

vm_require_module ublk_drv
vm_wait_path /dev/ublk-control || fail "/dev/ublk-control did not appear"

workdir=$(mktemp -d /tmp/ublk_test.XXXXXX)
serve_pid=
cleanup() {
  if [[ -n $serve_pid ]] && kill -0 "$serve_pid" 2>/dev/null; then
    umount "$workdir/mnt" 2>/dev/null || true
    kill -TERM "$serve_pid" 2>/dev/null || true
    wait "$serve_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT

# start_serve NAME SIZE_MIB: starts ublk_serve with its stdin on fd 7 (a fifo) and its
# output in $workdir/NAME.out; sets serve_pid and dev (the /dev/ublkbN path).
start_serve() {
  local name=$1 size=$2
  rm -f "$workdir/$name.in"
  mkfifo "$workdir/$name.in"
  "$serve" "$size" <"$workdir/$name.in" >"$workdir/$name.out" 2>"$workdir/$name.err" &
  serve_pid=$!
  exec 7>"$workdir/$name.in"
  for _ in $(seq 100); do
    grep -q '^attached ' "$workdir/$name.out" && break
    kill -0 "$serve_pid" 2>/dev/null || fail "ublk_serve exited: $(cat "$workdir/$name.err")"
    sleep 0.1
  done
  dev=$(awk '/^attached / {print $2}' "$workdir/$name.out")
  [[ -n $dev ]] || fail "ublk_serve did not attach within 10 s: $(cat "$workdir/$name.err")"
  vm_wait_path "$dev" || fail "$dev did not appear"
  out=$workdir/$name.out
}

# ask COMMAND EXPECTED_PREFIX: sends a command to ublk_serve, prints its answer line.
ask() {
  local before
  before=$(wc -l <"$out")
  echo "$1" >&7
  for _ in $(seq 300); do
    [[ $(wc -l <"$out") -gt $before ]] && break
    sleep 0.1
  done
  sed -n "$((before + 1))p" "$out"
}

# read_mib SKIP COUNT: copies COUNT MiB of $dev from MiB SKIP (O_DIRECT) to $workdir/range.
read_mib() {
  dd if="$dev" of="$workdir/range" bs=1M skip="$1" count="$2" iflag=direct status=none
}
head -c $((8 << 20)) /dev/zero >"$workdir/zeros"

# --- 1. The block device ----------------------------------------------------------------------
start_serve main 256
id=${dev#/dev/ublkb}
cdev=/dev/ublkc$id
[[ -e $cdev ]] || fail "$cdev is missing"
[[ $(blockdev --getsize64 "$dev") -eq $((256 << 20)) ]] || fail "$dev is not 256 MiB"
[[ $(blockdev --getss "$dev") -eq 512 ]] || fail "logical block size is not 512"
[[ $(blockdev --getpbsz "$dev") -eq 4096 ]] || fail "physical block size is not 4096"
[[ $(cat /sys/block/ublkb$id/queue/discard_granularity) -eq 4096 ]] || fail "no 4 KiB discard granularity"
[[ $(cat /sys/block/ublkb$id/queue/write_zeroes_max_bytes) -gt 0 ]] || fail "write zeroes is off"
echo "ok: $dev: 256 MiB, 512/4096-byte blocks, discard and write zeroes"

# --- 2. dd pattern, read back ----------------------------------------------------------------
head -c $((8 << 20)) /dev/urandom >"$workdir/pattern"
dd if="$workdir/pattern" of="$dev" bs=1M seek=3 oflag=direct conv=fsync status=none
dd if="$dev" of="$workdir/back" bs=1M skip=3 count=8 iflag=direct status=none
cmp "$workdir/pattern" "$workdir/back" || fail "the 8 MiB pattern did not read back"
# Odd 512-byte sectors straddling pages, through the page cache and without it.
head -c 1536 /dev/urandom >"$workdir/sectors"
dd if="$workdir/sectors" of="$dev" bs=512 seek=$(((100 << 20) / 512 + 7)) oflag=direct status=none
dd if="$dev" of="$workdir/sectors.back" bs=512 skip=$(((100 << 20) / 512 + 7)) count=3 iflag=direct status=none
cmp "$workdir/sectors" "$workdir/sectors.back" || fail "512-byte sectors did not read back"
dd if="$workdir/pattern" of="$dev" bs=64K seek=$(((200 << 20) / 65536)) count=16 status=none
sync
echo 3 >/proc/sys/vm/drop_caches
dd if="$dev" of="$workdir/range" bs=64K skip=$(((200 << 20) / 65536)) count=16 status=none
cmp -n $((1 << 20)) "$workdir/pattern" "$workdir/range" || fail "buffered writes did not read back"
echo "ok: dd pattern (direct 1 MiB, 512-byte sectors, buffered) reads back"

# --- 3. Discard and write zeroes ---------------------------------------------------------------
local_before=$(ask stats | awk '{print $4}')
blkdiscard -o $((4 << 20)) -l $((4 << 20)) "$dev"
read_mib 4 4
cmp -n $((4 << 20)) "$workdir/zeros" "$workdir/range" || fail "discarded range does not read as zeros"
read_mib 3 1
cmp -n $((1 << 20)) "$workdir/pattern" "$workdir/range" || fail "discard touched the MiB before its range"
read_mib 8 3
tail -c $((3 << 20)) "$workdir/pattern" >"$workdir/tail"
cmp "$workdir/tail" "$workdir/range" || fail "discard touched the MiB after its range"
local_after=$(ask stats | awk '{print $4}')
[[ $local_after -le $((local_before - 1024)) ]] ||
  fail "discarding 4 MiB did not free 1024 pages (local pages $local_before -> $local_after)"
blkdiscard -z -o $((8 << 20)) -l $((1 << 20)) "$dev"
read_mib 8 1
cmp -n $((1 << 20)) "$workdir/zeros" "$workdir/range" || fail "write-zeroes range does not read as zeros"
echo "ok: blkdiscard and blkdiscard -z read back zeros (local pages $local_before -> $local_after)"

# --- 4. fio with verification ------------------------------------------------------------------
# The job as asked, then two jobs at once on disjoint ranges, so both queues serve at once.
fio --name=verify --filename="$dev" --rw=randrw --bs=4k --iodepth=32 --ioengine=io_uring \
  --direct=1 --verify=crc32c --verify_fatal=1 --size=64M --offset=128M \
  --eta=never --verify_state_save=0 --output="$workdir/fio.txt" || { cat "$workdir/fio.txt"; fail "fio verify failed"; }
grep -qi 'verify.*fail\|bad magic\|crc32c.*wanted' "$workdir/fio.txt" && { cat "$workdir/fio.txt"; fail "fio reported verify errors"; }
grep -E '^ *(read|write):' "$workdir/fio.txt" || true
fio --name=verify2 --filename="$dev" --rw=randrw --bs=4k --iodepth=32 --ioengine=io_uring \
  --direct=1 --verify=crc32c --verify_fatal=1 --size=32M --offset=128M --offset_increment=32M \
  --numjobs=2 --bssplit=4k/50:16k/25:128k/25 \
  --eta=never --verify_state_save=0 --output="$workdir/fio.txt" || { cat "$workdir/fio.txt"; fail "fio verify failed"; }
grep -qi 'verify.*fail\|bad magic\|crc32c.*wanted' "$workdir/fio.txt" && { cat "$workdir/fio.txt"; fail "fio reported verify errors"; }
grep -E '^ *(read|write):' "$workdir/fio.txt" || true
echo "ok: fio randrw 4k iodepth 32 io_uring direct, crc32c verified; and two jobs with mixed sizes"

# --- 5. ext4 -----------------------------------------------------------------------------------
mkdir -p "$workdir/mnt"
mkfs.ext4 -q -F "$dev" || fail "mkfs.ext4 failed"
mount "$dev" "$workdir/mnt" || fail "mount failed"
head -c $((20 << 20)) /dev/urandom >"$workdir/mnt/big"
for i in $(seq 50); do head -c $((i * 1000)) /dev/urandom >"$workdir/mnt/small$i"; done
mkdir "$workdir/mnt/dir" && cp "$workdir/pattern" "$workdir/mnt/dir/pattern"
(cd "$workdir/mnt" && find . -type f | sort | xargs sha256sum) >"$workdir/sums"
umount "$workdir/mnt"
echo 3 >/proc/sys/vm/drop_caches
mount "$dev" "$workdir/mnt" || fail "second mount failed"
(cd "$workdir/mnt" && sha256sum --quiet -c "$workdir/sums") || fail "checksums differ after remount"
echo "ok: ext4 mkfs, mount, write, umount, remount: $(wc -l <"$workdir/sums") files verified"

# --- 6. Detach: busy while mounted, then clean ---------------------------------------------------
answer=$(ask detach)
[[ $answer == "detach -16" ]] || fail "Detach while mounted answered '$answer', not 'detach -16' (EBUSY)"
[[ -e $dev && -e $cdev ]] || fail "Detach while mounted removed the device"
(cd "$workdir/mnt" && sha256sum --quiet -c "$workdir/sums") || fail "files unreadable after the refused Detach"
umount "$workdir/mnt"

# Swap: swapon holds the disk as a mount does; a process in a memory cgroup limited to 48 MiB
# fills 160 MiB, so most of it goes out to the device, and reads it back intact.
mkswap -q "$dev" >/dev/null || fail "mkswap failed"
swapon "$dev" || fail "swapon failed"
answer=$(ask detach)
[[ $answer == "detach -16" ]] || { swapoff "$dev"; fail "Detach while swapped on answered '$answer', not 'detach -16'"; }
cgroup=/sys/fs/cgroup/ublk-swap-test
mkdir -p "$cgroup"
echo $((48 << 20)) >"$cgroup/memory.max"
pswpout_before=$(awk '$1 == "pswpout" {print $2}' /proc/vmstat)
swap_status=0
(echo $BASHPID >"$cgroup/cgroup.procs" && exec python3 -c '
import hashlib, sys
size = 160 << 20
chunk = hashlib.sha256(b"memlend").digest() * (1 << 15)  # 1 MiB, not zero, not repeating by page
data = bytearray()
for i in range(size // len(chunk)):
    data += i.to_bytes(8, "little") + chunk[8:]
want = hashlib.sha256(data).hexdigest()
for _ in range(2):  # touch everything twice, so pages go out and come back in
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        sys.exit("swapped memory came back different")
print("swap workload: 160 MiB verified twice")
') || swap_status=$?
swapped_kib=$((($(awk '$1 == "pswpout" {print $2}' /proc/vmstat) - pswpout_before) * 4))
swapoff "$dev" || fail "swapoff failed"
rmdir "$cgroup" 2>/dev/null || true
[[ $swap_status -eq 0 ]] || fail "the swap workload failed (status $swap_status)"
[[ ${swapped_kib:-0} -gt $((32 << 10)) ]] ||
  fail "less than 32 MiB went out to swap on $dev (${swapped_kib:-0} KiB)"
echo "ok: swap on $dev: Detach refused while swapped on; $((swapped_kib >> 10)) MiB swapped out and back intact"

answer=$(ask detach)
[[ $answer == "detach 0" ]] || fail "Detach after umount and swapoff answered '$answer', not 'detach 0'"
[[ ! -e $dev && ! -e $cdev ]] || fail "$dev or $cdev still exists after Detach"
[[ ! -e /sys/block/ublkb$id ]] || fail "/sys/block/ublkb$id still exists after Detach"
answer=$(ask detach)
[[ $answer == "detach 0" ]] || fail "a second Detach answered '$answer', not 'detach 0'"
echo quit >&7
exec 7>&-
wait "$serve_pid" || fail "ublk_serve exited with status $? after quit"
serve_pid=
echo "ok: Detach returns -EBUSY while mounted, 0 after umount; $dev and $cdev are gone"

# --- 7. SIGTERM --------------------------------------------------------------------------------
start_serve term 64
id=${dev#/dev/ublkb}
head -c $((1 << 20)) /dev/urandom | dd of="$dev" bs=1M oflag=direct status=none
kill -TERM "$serve_pid"
status=0
wait "$serve_pid" || status=$?
serve_pid=
[[ $status -eq 0 ]] || fail "ublk_serve exited with status $status after SIGTERM"
grep -q '^stopped$' "$out" || fail "ublk_serve did not report stopping"
[[ ! -e $dev && ! -e /dev/ublkc$id ]] || fail "$dev still exists after SIGTERM"
exec 7>&-
echo "ok: SIGTERM removes $dev and the server exits 0"

# --- 8. Odd geometry, and the destructor's forced detach -----------------------------------------
# More queues than CPUs (the kernel lowers the count) and a queue depth of 4; end of input
# makes ublk_serve destroy the frontend, which stops the device even though nothing asked.
rm -f "$workdir/small.in"
mkfifo "$workdir/small.in"
"$serve" 16 8 4 <"$workdir/small.in" >"$workdir/small.out" 2>"$workdir/small.err" &
serve_pid=$!
exec 7>"$workdir/small.in"
for _ in $(seq 100); do
  grep -q '^attached ' "$workdir/small.out" && break
  sleep 0.1
done
dev=$(awk '/^attached / {print $2}' "$workdir/small.out")
[[ -n $dev ]] || fail "ublk_serve with 8 queues of depth 4 did not attach: $(cat "$workdir/small.err")"
id=${dev#/dev/ublkb}
vm_wait_path "$dev" || fail "$dev did not appear"
queues=$(ls -d /sys/block/ublkb$id/mq/* | wc -l)
[[ $queues -ge 1 && $queues -le $(nproc) ]] || fail "$dev has $queues hardware queues for $(nproc) CPUs"
fio --name=small --filename="$dev" --rw=randrw --bs=4k --iodepth=16 --ioengine=io_uring \
  --direct=1 --verify=crc32c --verify_fatal=1 --size=16M --numjobs=1 \
  --eta=never --verify_state_save=0 --output="$workdir/fio-small.txt" ||
  { cat "$workdir/fio-small.txt"; fail "fio verify on the depth-4 device failed"; }
exec 7>&-
status=0
wait "$serve_pid" || status=$?
serve_pid=
[[ $status -eq 0 ]] || fail "ublk_serve exited with status $status at end of input"
[[ ! -e $dev && ! -e /dev/ublkc$id ]] || fail "$dev still exists after the frontend was destroyed"
echo "ok: $queues queue(s) of depth 4 verified; destroying the frontend removes $dev"

# --- 9. A failed attach leaves nothing behind ------------------------------------------------------
# 4096 tags of 1 MiB buffers is 4 GiB per queue, more than this VM can map: AttachUblk fails
# after ADD_DEV and SET_PARAMS, and must delete the device it added.
status=0
"$serve" 16 1 4096 1048576 >"$workdir/fail.out" 2>"$workdir/fail.err" </dev/null || status=$?
[[ $status -eq 1 ]] || fail "ublk_serve with 4 GiB of buffers exited $status, not 1: $(cat "$workdir/fail.err")"
grep -q 'ublk_serve: ublk: queue 0: cannot allocate' "$workdir/fail.err" ||
  fail "unexpected failure message: $(cat "$workdir/fail.err")"
leftover=$(ls /dev/ublkb* /dev/ublkc* 2>/dev/null || true)
[[ -z $leftover ]] || fail "a failed attach left $leftover behind"
echo "ok: a failed attach ($(cat "$workdir/fail.err")) leaves no device"

echo "ublk_test.sh: all checks passed"
