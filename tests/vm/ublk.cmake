# The ublk frontend against the real ublk driver of the VM harness's kernel:
#   ublk_serve     serves a memlend Device (LocalStore-backed Tiering) through AttachUblk
#   vm.ublk        tests/vm/ublk_test.sh in the VM: dd + cmp, blkdiscard, fio verify, ext4,
#                  Detach while mounted (-EBUSY), Detach and SIGTERM teardown
# Run with: ctest -L vm --output-on-failure. Skipped (77) when the harness is missing or
# cannot run here. MEMLEND_VM_RUN names the harness (default: tests/vm/run of this tree).
add_executable(ublk_serve ${CMAKE_CURRENT_LIST_DIR}/ublk_serve_main.cc)
target_link_libraries(ublk_serve PRIVATE memlend_core)

set(MEMLEND_VM_RUN "${PROJECT_SOURCE_DIR}/tests/vm/run" CACHE FILEPATH
  "The VM harness (tests/vm/run) that runs guest scripts under a real kernel")

# With the harness's helper (tests/vm/CMakeLists.txt, which must come first) the test is
# registered through it; without it, directly, skipping when there is no harness.
if(COMMAND memlend_vm_test)
  memlend_vm_test(ublk ${CMAKE_CURRENT_LIST_DIR}/ublk_test.sh TIMEOUT 900
    ARGS $<TARGET_FILE:ublk_serve>)
else()
  add_test(NAME vm.ublk
    COMMAND sh -c "if [ ! -x \"$0\" ]; then echo \"SKIPPED: no VM harness at $0\"; exit 77; fi; exec \"$0\" --timeout 900 \"$@\""
      ${MEMLEND_VM_RUN} ${CMAKE_CURRENT_LIST_DIR}/ublk_test.sh $<TARGET_FILE:ublk_serve>)
  set_tests_properties(vm.ublk PROPERTIES TIMEOUT 1020 SKIP_RETURN_CODE 77 LABELS vm)
endif()
