#!/bin/busybox sh
# shellcheck shell=sh disable=SC2013 # the words of /proc files are wanted
# /init of the memlend VM initramfs (built by tests/vm/run; runs under busybox sh as PID 1).
#
# Stage 1 (in the initramfs) loads the 9p modules, mounts the host's root file system (shared
# read-only by QEMU as "hostroot") on /root, gives it fresh proc, sysfs, devtmpfs, devpts,
# tmpfs and cgroup2 mounts, copies in the job that tests/vm/run wrote (its host path is
# memlend.job= on the kernel command line) and switch_roots into it. Stage 2 (this file again,
# as PID 1 in the host's root) prints
#     MEMLEND-VM-START <token>
# (token from memlend.token=), runs the job with bash, prints
#     MEMLEND-VM-EXIT <token> <status>
# for the host to parse, and powers the machine off (a guest that dies before the START line
# gets a second boot from the host). A setup failure prints "MEMLEND-VM-INIT-FAILED: <reason>"
# instead, and the host fails the run.
#
# PID 1 must end up in the host's root, not merely chroot a child there: the kernel's threads
# share PID 1's root, and the kernel's own module requests (/proc/sys/kernel/modprobe) run there.
# The initramfs holds only busybox, this file, and the modules the 9p mount needs
# (/modules/*.ko, loaded in the order of /modules/order).

# Waits until the console has sent everything written to it (stty sets the terminal with
# TCSADRAIN), so that nothing is lost when the machine powers off.
drain_console() {
  "$1" stty onlcr </dev/console
}

if [ "${1:-}" = stage2 ]; then
  bb=/run/memlend-vm/busybox
  echo "MEMLEND-VM-START $2"
  /bin/bash /run/memlend-vm/job.sh </dev/null
  status=$?
  drain_console $bb
  echo
  echo "MEMLEND-VM-EXIT $2 $status"
  drain_console $bb
  echo o >/proc/sysrq-trigger
  $bb sleep 10
  $bb poweroff -f
fi

/bin/busybox --install -s /bin
export PATH=/bin

mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys

token=none
job=
keep=
for arg in $(cat /proc/cmdline); do
  case $arg in
    memlend.token=*) token=${arg#*=} ;;
    memlend.job=*) job=${arg#*=} ;;
    memlend.keep=*) keep=${arg#*=} ;;
  esac
done

power_off() {
  echo o >/proc/sysrq-trigger
  sleep 10
  poweroff -f
}

die() {
  echo
  echo "MEMLEND-VM-INIT-FAILED: $*"
  drain_console /bin/busybox
  power_off
}

[ -n "$job" ] || die "no memlend.job= on the kernel command line"

while read -r module; do
  insmod "/modules/$module" || die "insmod $module failed"
done </modules/order

r=/root
mkdir -p $r
# cache=loose: the guest caches the host's files and does not look for changes the host makes
# while the guest runs; the share is read-only, so the guest itself changes nothing.
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=524288,cache=loose hostroot $r ||
  die "cannot mount the host root (9p)"
# Read the job before tmpfs covers /tmp and /run, where it may live.
cp "$r$job" /job.sh || die "cannot read the job $job"

# memlend.keep= names host directories, comma-separated (the kernel's modules, the repository),
# that must stay visible even if they are under /tmp, /run or /var/tmp: each is set aside now
# and put back after the tmpfs mounts.
n=0
for dir in $(echo "$keep" | tr ',' ' '); do
  mkdir -p /keep$n
  mount --bind "$r$dir" /keep$n || die "cannot bind $dir"
  n=$((n + 1))
done

mount -t proc proc $r/proc || die "cannot mount proc"
mount -t sysfs sysfs $r/sys || die "cannot mount sysfs"
mount -t devtmpfs devtmpfs $r/dev || die "cannot mount devtmpfs"
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $r/dev/pts || die "cannot mount devpts"
for dir in /dev/shm /tmp /run /var/tmp; do
  [ -d $r$dir ] || continue
  mount -t tmpfs -o mode=1777 tmpfs $r$dir || die "cannot mount tmpfs on $dir"
done
chmod 755 $r/run
n=0
for dir in $(echo "$keep" | tr ',' ' '); do
  mkdir -p "$r$dir" 2>/dev/null
  mount --move /keep$n "$r$dir" || die "cannot put $dir back"
  n=$((n + 1))
done
mount -t cgroup2 cgroup2 $r/sys/fs/cgroup || die "cannot mount cgroup2"
# Every controller the kernel has (memory among them) is enabled for child cgroups.
for controller in $(cat $r/sys/fs/cgroup/cgroup.controllers); do
  echo "+$controller" >$r/sys/fs/cgroup/cgroup.subtree_control ||
    die "cannot enable the $controller controller"
done
mount -t debugfs debugfs $r/sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs $r/sys/kernel/tracing 2>/dev/null

# A task stuck in D state for 20 s is reported (and the host then fails the run).
echo 20 >/proc/sys/kernel/hung_task_timeout_secs
# The boot is quiet (loglevel=4); from now on informational messages reach the console too, so
# that a hung task's or a warning's backtrace is seen, with the kernel's notes on devices.
dmesg -n 7
ip link set lo up || die "cannot bring up lo"
hostname memlend-vm

# Stage 2 runs as PID 1 in the new root: PID 1 shares its root with the kernel's threads, so
# the kernel's module requests (/proc/sys/kernel/modprobe) see the host's files too.
mkdir -p $r/run/memlend-vm
cp /job.sh $r/run/memlend-vm/job.sh
cp /bin/busybox $r/run/memlend-vm/busybox
cp /init $r/run/memlend-vm/init
# shellcheck disable=SC2093 # only a failed switch_root returns
exec switch_root $r /run/memlend-vm/busybox sh /run/memlend-vm/init stage2 "$token"
die "switch_root failed"
