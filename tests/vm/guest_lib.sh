# shellcheck shell=bash source-path=SCRIPTDIR
# guest_lib.sh — helpers for scripts that tests/vm/run runs inside the VM. Source it from bash:
#     source "$(dirname "${BASH_SOURCE[0]}")/guest_lib.sh"
# It also sources scripts/lib.sh (skip, fail, make_workdir, start_daemon, ...), and sets no
# shell options.
#
# What tests/vm/run exports in the guest:
#   MEMLEND_VM=1               the script runs in the VM
#   MEMLEND_VM_KERNEL          the guest kernel's version (uname -r)
#   MEMLEND_VM_MODDIR          the unpacked kernel package: modules are in
#                              $MEMLEND_VM_MODDIR/lib/modules/$MEMLEND_VM_KERNEL, indexed by depmod
#   MEMLEND_VM_REPO            the repository root (also the working directory at start)
#   MEMLEND_*                  every other MEMLEND_* variable of the host, unchanged

# shellcheck source=../../scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"

# Exits 1 unless this runs in the VM: guest scripts change the kernel (modules, devices).
require_vm() {
  [[ ${MEMLEND_VM:-} == 1 && -n ${MEMLEND_VM_MODDIR:-} ]] ||
    fail "this script runs only inside the VM: tests/vm/run ${0##*/} ..."
}

# vm_modprobe MODULE [PARAM=VALUE...]: loads MODULE and its dependencies from the guest
# kernel's package. Returns modprobe's status (its message is on stderr).
vm_modprobe() {
  modprobe -d "${MEMLEND_VM_MODDIR:?not in the VM}" "$@"
}

# vm_require_module MODULE [PARAM=VALUE...]: vm_modprobe, or fail naming the module.
vm_require_module() {
  vm_modprobe "$@" || fail "cannot load the kernel module $1"
}

# vm_wait_path PATH [SECONDS]: waits (default 5 s) until PATH exists; returns 1 if it does not.
# There is no udev in the guest; devtmpfs creates device nodes, but not at once.
vm_wait_path() {
  local path=$1 tenths=$((${2:-5} * 10))
  for _ in $(seq "$tenths"); do
    [[ -e $path ]] && return 0
    sleep 0.1
  done
  [[ -e $path ]]
}
