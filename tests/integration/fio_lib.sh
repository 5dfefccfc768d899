# shellcheck shell=bash source-path=SCRIPTDIR
# fio_lib.sh — what fio_verify.sh and fio_peers_verify.sh share on top of scripts/lib.sh: the
# fio job file with crc32c verification, running fio on it, and judging fio's output.
#
# Source it after setting $memlend; it sources scripts/lib.sh, skips (77) unless fio with the nbd
# ioengine and python3 are there, fails (1) unless $memlend is executable, and makes $workdir.
#     source "$(dirname "${BASH_SOURCE[0]}")/fio_lib.sh" WORKDIR_NAME

# shellcheck source=../../scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"

require_fio_nbd
[[ -x $memlend ]] || fail "memlend binary $memlend is not executable"
make_workdir "$1"

# write_verify_job URI SIZE OFFSET2 SIZE2 [OPTION...]: writes $workdir/verify.fio, two concurrent
# jobs through fio's nbd ioengine on URI doing random reads and writes at iodepth 16, every block
# carrying a crc32c header that is read back and checked (do_verify=1, verify_fatal=1):
# rand-4k with 4 KiB blocks on [0, SIZE), and rand-4k-64k with 4-64 KiB blocks on SIZE2 bytes from
# OFFSET2, with the extra job OPTIONs (fio's name=value lines).
write_verify_job() {
  local uri=$1 size=$2 offset2=$3 size2=$4
  shift 4
  {
    printf '%s\n' "[global]" "ioengine=nbd" "uri=$uri" "rw=randrw" "iodepth=16" "verify=crc32c" \
      "do_verify=1" "verify_fatal=1" "randrepeat=1"
    printf '%s\n' "" "[rand-4k]" "bs=4k" "offset=0" "size=$size"
    printf '%s\n' "" "[rand-4k-64k]" "bsrange=4k-64k" "offset=$offset2" "size=$size2" "$@"
  } >"$workdir/verify.fio"
}

# run_fio NAME FIO_OPTIONS...: runs fio on $workdir/verify.fio; leaves JSON in $workdir/NAME.json
# and stderr in $workdir/NAME.stderr; returns fio's exit status.
run_fio() {
  local name=$1
  shift
  local status=0
  # From inside $workdir, so that files fio leaves behind (e.g. verify state dumps after a failed
  # verification) go away with it.
  (cd "$workdir" && fio --output-format=json --output="$workdir/$name.json" "$@" \
    "$workdir/verify.fio" 2>"$workdir/$name.stderr") || status=$?
  return $status
}

# check_fio_clean NAME: succeeds if every job in $workdir/NAME.json reports error 0 and read
# data, and fio's stderr has no verify complaints; prints a one-line summary per job.
check_fio_clean() {
  local name=$1
  if grep -q '^verify:' "$workdir/$name.stderr"; then
    head -n 20 "$workdir/$name.stderr"
    return 1
  fi
  python3 - "$workdir/$name.json" "$name" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
report = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
ok = True
for job in report["jobs"]:
    read_bytes, write_bytes = job["read"]["io_bytes"], job["write"]["io_bytes"]
    print(f"  {sys.argv[2]}: job {job['jobname']}: error {job['error']}, "
          f"read {read_bytes} bytes, written {write_bytes} bytes")
    # Every job must have moved data and ended without an error (84 = EILSEQ is fio's verify
    # failure).
    if job["error"] != 0 or read_bytes == 0:
        ok = False
sys.exit(0 if ok else 1)
EOF
}

# verify_workload DESCRIPTION: run 1, the workload with verification (DESCRIPTION says where the
# data goes), then run 2, a verify-only pass over new connections. Fails unless both are clean.
verify_workload() {
  echo "run 1: random read/write workload with verification$1"
  run_fio workload || { cat "$workdir/workload.stderr"; fail "fio workload run failed"; }
  check_fio_clean workload || fail "fio workload run reported errors"

  echo "run 2: verify-only pass over new connections"
  run_fio verify --verify_only || { cat "$workdir/verify.stderr"; fail "fio verify-only run failed"; }
  check_fio_clean verify || fail "fio verify-only run reported errors"
}

# expect_verify_failure: the negative control. A --verify_only pass over a device that has lost
# the data must fail with verify errors; if it passes, verification is not really happening.
expect_verify_failure() {
  if run_fio control --verify_only; then
    fail "fio --verify_only passed on an empty device: verification is not really happening"
  fi
  grep -q '^verify:' "$workdir/control.stderr" ||
    fail "fio failed on an empty device, but not with verify errors: $(head -n 5 "$workdir/control.stderr")"
}

# fio_loop: runs fio on $workdir/verify.fio back to back (run1, run2, ...) until $workdir/stop
# exists, each writing and verifying; a run that fails is named in $workdir/fio_failed, and the
# number of runs goes to $workdir/fio_runs at the end. Run it in the background.
fio_loop() {
  local n=0
  while [[ ! -e $workdir/stop ]]; do
    n=$((n + 1))
    if ! run_fio "run$n" || ! check_fio_clean "run$n" >/dev/null; then
      echo "run$n" >>"$workdir/fio_failed"
    fi
  done
  echo "$n" >"$workdir/fio_runs"
}

# start_fio_loop: runs fio_loop in the background, afresh, as $fio_loop_pid.
start_fio_loop() {
  rm -f "$workdir/stop" "$workdir/fio_failed" "$workdir/fio_runs"
  fio_loop &
  fio_loop_pid=$!
}

# end_fio_loop WHILE: ends the loop after its current run and sets $fio_runs; fails, saying
# that runs failed while WHILE, if one did (showing the first one's errors and the borrower's
# log), else says how many runs were clean.
end_fio_loop() {
  touch "$workdir/stop"
  wait "$fio_loop_pid"
  fio_runs=$(cat "$workdir/fio_runs")
  if [[ -e $workdir/fio_failed ]]; then
    head -n 20 "$workdir/$(head -n 1 "$workdir/fio_failed").stderr"
    [[ -e $workdir/borrower.stderr ]] && tail -n 30 "$workdir/borrower.stderr"
    fail "fio runs failed while $1: $(tr '\n' ' ' <"$workdir/fio_failed")(of $fio_runs)"
  fi
}
