# Real-kernel tests of `memlend attach`, run in the guest by the VM harness (tests/vm/run):
#   vm.nbd_swap   swap on a device attached through the kernel's NBD client, pages on a peer,
#                 a cgroup-v2 memory limit pushing a pattern through it; auto picks nbd; SIGTERM
#                 detaches
# They skip (77) when the harness is not there or cannot run here. Run with: ctest -L vm
set(MEMLEND_VM_HARNESS ${CMAKE_CURRENT_LIST_DIR}/run CACHE FILEPATH
    "The VM harness script that runs guest tests (tests/vm/run)")

add_test(NAME vm.nbd_swap
  COMMAND ${CMAKE_COMMAND} -E env MEMLEND_BINARY=$<TARGET_FILE:memlend>
    bash -c "[ -f \"$0\" ] || { echo \"SKIPPED: no VM harness at $0\"; exit 77; }; exec bash \"$0\" --mem 1024 --timeout 600 \"$@\""
    ${MEMLEND_VM_HARNESS} ${CMAKE_CURRENT_LIST_DIR}/nbd_swap.sh $<TARGET_FILE:memlend>)
set_tests_properties(vm.nbd_swap PROPERTIES
  LABELS vm
  SKIP_RETURN_CODE 77
  TIMEOUT 720)
