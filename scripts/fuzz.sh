#!/usr/bin/env bash
# Runs the libFuzzer targets of fuzz/ (see fuzz/README.md) under AddressSanitizer and
# UndefinedBehaviorSanitizer, one after the other, each on a copy of its seed corpus
# (fuzz/corpus/TARGET): nothing is ever written into the repository.
#
#   scripts/fuzz.sh [--build DIR] [--seconds N] [--jobs N] [--keep-corpus DIR] [TARGET...]
#
#   --build DIR   build directory (default build-asan). One without a CMakeCache.txt is
#                 configured with clang, -DMEMLEND_SANITIZE=ON and -DMEMLEND_FUZZ=ON; one
#                 configured with clang but without those options gets them; one configured
#                 with another compiler is refused. The targets are then brought up to date.
#   --seconds N   how long each target runs (default 60).
#   --jobs N      how many targets run at once (default 1; the test command runs 2, one per
#                 core of the machines it runs on).
#   --keep-corpus DIR   copy each target's final corpus to DIR/TARGET (outside fuzz/), e.g.
#                 for scripts/fuzz-coverage.sh --corpus DIR.
#   TARGET        nbd_handshake, nbd_transmission, peer_lender, peer_client, control_request
#                 (default: all of them, in that order).
#
# Prints one line per target: executions, libFuzzer's cov: and ft: figures once the seeds
# ran and at the end, and the size of the corpus it ends with. A target fails on any crash, sanitizer report, leak,
# timeout (one input running over 10 s), or a process over 4 GiB: the line names the target,
# the report follows, and the failing input and the whole log are kept in a directory the
# script names. Every target runs even when an earlier one failed; the exit status is 0
# when all passed, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

all_targets=(nbd_handshake nbd_transmission peer_lender peer_client control_request)
usage_error() {
  echo "fuzz.sh: $* (see --help)" >&2
  exit 2
}
build="build-asan"
seconds=60
jobs=1
keep_corpus=
targets=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --build) build=${2:?--build needs a directory}; shift 2 ;;
    --seconds) seconds=${2:?--seconds needs a number}; shift 2 ;;
    --jobs) jobs=${2:?--jobs needs a number}; shift 2 ;;
    --keep-corpus) keep_corpus=${2:?--keep-corpus needs a directory}; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) usage_error "unknown option $1" ;;
    *) targets+=("$1"); shift ;;
  esac
done
[[ $seconds =~ ^[1-9][0-9]*$ ]] || usage_error "--seconds wants a positive integer, not '$seconds'"
[[ $jobs =~ ^[1-9][0-9]*$ ]] || usage_error "--jobs wants a positive integer, not '$jobs'"
[[ ${#targets[@]} -gt 0 ]] || targets=("${all_targets[@]}")
if [[ -n $keep_corpus ]]; then
  keep_corpus=$(realpath -m "$keep_corpus")
  [[ $keep_corpus/ != "$root/fuzz/"* ]] || usage_error "--keep-corpus must be outside fuzz/"
  mkdir -p "$keep_corpus"
fi
for t in "${targets[@]}"; do
  [[ " ${all_targets[*]} " == *" $t "* ]] ||
    usage_error "unknown target '$t' (the targets: ${all_targets[*]})"
done

scripts/install-deps.sh

# Configure (if needed) and build the targets.
cache=$build/CMakeCache.txt
configure=(cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo
           -DMEMLEND_SANITIZE=ON -DMEMLEND_FUZZ=ON)
if [[ ! -f $cache ]]; then
  echo "fuzz.sh: configuring $build with clang, ASan, UBSan and libFuzzer"
  CC=clang CXX=clang++ "${configure[@]}" >/dev/null
elif [[ $(basename "$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$cache")") != *clang* ]]; then
  echo "fuzz.sh: $build was configured with another compiler than clang; libFuzzer needs" \
       "clang: give another --build directory, or remove $build" >&2
  exit 2
elif ! grep -q '^MEMLEND_FUZZ:BOOL=ON$' "$cache" ||
     ! grep -q '^MEMLEND_SANITIZE:BOOL=ON$' "$cache"; then
  echo "fuzz.sh: turning on MEMLEND_SANITIZE and MEMLEND_FUZZ in $build"
  "${configure[@]}" >/dev/null
fi
build_log=$(mktemp "${TMPDIR:-/tmp}/memlend-fuzz-build.XXXXXX")
if ! cmake --build "$build" --target "${targets[@]/%/_fuzz}" -j"$(nproc)" >"$build_log" 2>&1; then
  tail -n 40 "$build_log" >&2
  echo "fuzz.sh: FAIL: the fuzz targets do not build (log: $build_log)" >&2
  exit 1
fi
rm -f "$build_log"

work=$(mktemp -d "${TMPDIR:-/tmp}/memlend-fuzz.XXXXXX")
keep_work=false
cleanup() { $keep_work || rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# Sanitizer settings: every report is fatal (the build says so too), UBSan shows where.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=0:handle_abort=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# libFuzzer's last status line: "#RUNS DONE cov: N ft: N corp: N/SIZE lim: N exec/s: N rss: NMb".
done_pattern='^#([0-9]+).*cov: ([0-9]+) ft: ([0-9]+) corp: ([0-9]+)/([^ ]+)'
done_pattern+='.*exec/s: ([0-9]+).*rss: ([0-9]+Mb)'
# What marks a report in a fuzzer's log (the targets' own checks print "NAME_fuzz: ...").
report_pattern='ERROR: (Address|Leak|UndefinedBehavior)Sanitizer|runtime error:|ERROR: libFuzzer'
report_pattern+='|DEADLYSIGNAL|ALARM: working on the last Unit|terminate called|^[a-z_]+_fuzz: '

# run_target TARGET: fuzzes TARGET in $work/TARGET and leaves its report lines in
# $work/TARGET/report and, if it failed, the file $work/TARGET/failed.
run_target() {
  local t=$1 dir=$work/$1 seeds args log status inited_line done_line why first seeds_cov
  mkdir -p "$dir/corpus" "$dir/tmp"
  cp -r "$root/fuzz/corpus/$t/." "$dir/corpus/"
  seeds=$(find "$dir/corpus" -type f | wc -l)
  args=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1
        -artifact_prefix="$dir/")
  [[ -f $root/fuzz/$t.dict ]] && args+=(-dict="$root/fuzz/$t.dict")
  log=$dir/log
  status=0
  # The targets make their sockets under TMPDIR; an outer timeout catches a fuzzer that
  # does not stop by itself.
  (cd "$dir" && TMPDIR=$dir/tmp timeout --kill-after=10 $((seconds + 120)) \
     "$root/$build/fuzz/${t}_fuzz" "${args[@]}" "$dir/corpus") >"$log" 2>&1 || status=$?
  inited_line=$(grep -a -E '^#[0-9]+[[:space:]]+INITED' "$log" | tail -n 1 || true)
  done_line=$(grep -a -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
  exec >"$dir/report"
  if [[ $status -ne 0 ]] || grep -a -q -E "$report_pattern" "$log"; then
    touch "$dir/failed"
    why="libFuzzer exit status $status"
    [[ $status -eq 124 || $status -eq 137 ]] && why="did not stop within $((seconds + 120)) s"
    echo "fuzz.sh: FAIL: $t ($why); the report:"
    # From the first report line on, without the daemon's own log lines.
    first=$(grep -a -n -m 1 -E "$report_pattern" "$log" | cut -d: -f1 || true)
    if [[ -n $first ]]; then
      tail -n "+$first" "$log" | grep -a -v '^memlend: [a-z]' | head -n 120 | sed 's/^/    /'
    else
      grep -a -v '^memlend: [a-z]' "$log" | tail -n 40 | sed 's/^/    /'
    fi
    echo "fuzz.sh: $t: the failing input (crash-*, leak-*, timeout-*, oom-*) and the log" \
         "are in $dir"
    return
  fi
  seeds_cov="?"
  [[ $inited_line =~ cov:\ ([0-9]+)\ ft:\ ([0-9]+) ]] &&
    seeds_cov="cov: ${BASH_REMATCH[1]} ft: ${BASH_REMATCH[2]}"
  if [[ ! $done_line =~ $done_pattern ]]; then
    touch "$dir/failed"
    echo "fuzz.sh: FAIL: $t: no final statistics in its log ($log)"
    return
  fi
  printf 'fuzz.sh: %-16s ok: %s executions in %s s (%s/s); seeds %s, end cov: %s ft: %s; ' \
    "$t" "${BASH_REMATCH[1]}" "$seconds" "${BASH_REMATCH[6]}" "$seeds_cov" \
    "${BASH_REMATCH[2]}" "${BASH_REMATCH[3]}"
  printf 'corpus: %s inputs of %s (from %s seeds); rss %s\n' \
    "${BASH_REMATCH[4]}" "${BASH_REMATCH[5]}" "$seeds" "${BASH_REMATCH[7]}"
  if [[ -n $keep_corpus ]]; then
    rm -rf "${keep_corpus:?}/$t"
    cp -r "$dir/corpus" "$keep_corpus/$t"
  fi
}

running=0
for t in "${targets[@]}"; do
  if [[ $running -ge $jobs ]]; then
    wait -n || true
    running=$((running - 1))
  fi
  run_target "$t" &
  running=$((running + 1))
done
wait
failed=()
for t in "${targets[@]}"; do
  cat "$work/$t/report"
  if [[ -f $work/$t/failed ]]; then
    failed+=("$t")
    keep_work=true
  fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzz.sh: FAIL: ${failed[*]} (logs and inputs kept in $work)"
  exit 1
fi
echo "fuzz.sh: all ${#targets[@]} targets ran ${seconds} s each without a finding"
