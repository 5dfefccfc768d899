#!/usr/bin/env bash
# Line coverage of the code each fuzz target drives (fuzz/README.md), as reached by a
# corpus: the targets are built once more with clang's source-based coverage
# (-fprofile-instr-generate -fcoverage-mapping, no sanitizers) into a scratch build
# directory, each replays its corpus once (-runs=0), and llvm-cov reports the lines of the
# files that target is about.
#
#   scripts/fuzz-coverage.sh [--build DIR] [--corpus DIR] [TARGET...]
#
#   --build DIR    scratch build directory (default build-cov; ignored by git).
#   --corpus DIR   holds one directory per target (default fuzz/corpus, the seeds); e.g.
#                  what scripts/fuzz.sh --keep-corpus DIR left after a run.
#   TARGET         as for scripts/fuzz.sh (default: all of them).
#
# Prints, per target and file, lines covered of lines with code, and functions likewise.
# Nothing is written into the corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

all_targets=(nbd_handshake nbd_transmission peer_lender peer_client control_request)
# The files each target is about.
declare -A target_files=(
  [nbd_handshake]="src/nbd/handshake.cc src/nbd/codec.cc"
  [nbd_transmission]="src/nbd/transmission.cc src/nbd/codec.cc"
  [peer_lender]="src/peer/lender_service.cc src/peer/codec.cc src/peer/lender_pool.cc"
  [peer_client]="src/peer/peer_client.cc src/peer/codec.cc"
  [control_request]="src/daemon/control_request.cc"
)
usage_error() {
  echo "fuzz-coverage.sh: $* (see --help)" >&2
  exit 2
}
build="build-cov"
corpus=$root/fuzz/corpus
targets=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --build) build=${2:?--build needs a directory}; shift 2 ;;
    --corpus) corpus=$(realpath "${2:?--corpus needs a directory}"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) usage_error "unknown option $1" ;;
    *) targets+=("$1"); shift ;;
  esac
done
[[ ${#targets[@]} -gt 0 ]] || targets=("${all_targets[@]}")
for t in "${targets[@]}"; do
  [[ -n ${target_files[$t]:-} ]] ||
    usage_error "unknown target '$t' (the targets: ${all_targets[*]})"
  [[ -d $corpus/$t ]] || usage_error "no corpus for $t in $corpus"
done
profdata=${LLVM_PROFDATA:-llvm-profdata-14}
cov=${LLVM_COV:-llvm-cov-14}
for tool in clang++ "$profdata" "$cov"; do
  command -v "$tool" >/dev/null ||
    { echo "fuzz-coverage.sh: $tool is missing (scripts/install-deps.sh installs it)" >&2; exit 1; }
done

if [[ ! -f $build/CMakeCache.txt ]]; then
  echo "fuzz-coverage.sh: configuring $build with clang's source-based coverage"
  CC=clang CXX=clang++ cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DMEMLEND_FUZZ=ON -DMEMLEND_TESTS=OFF \
    -DCMAKE_CXX_FLAGS="-fprofile-instr-generate -fcoverage-mapping" \
    -DCMAKE_EXE_LINKER_FLAGS="-fprofile-instr-generate" >/dev/null
fi
cmake --build "$build" --target "${targets[@]/%/_fuzz}" -j"$(nproc)" >/dev/null

work=$(mktemp -d "${TMPDIR:-/tmp}/memlend-fuzz-coverage.XXXXXX")
trap 'rm -rf "$work"' EXIT
# report TARGET-LABEL INPUTS FILE... -- BINARY...: llvm-cov's figures for FILEs under
# $work/profdata, one line per file and a total.
report() {
  local label=$1 inputs=$2 files=() objects=()
  shift 2
  while [[ $1 != -- ]]; do files+=("$1"); shift; done
  shift
  objects=("$1"); shift
  for binary in "$@"; do objects+=(-object "$binary"); done
  # Several binaries each have their own LLVMFuzzerTestOneInput: llvm-cov warns that those
  # differ, which does not concern the files reported.
  "$cov" report "${objects[@]}" -instr-profile="$work/profdata" "${files[@]}" \
      2> >(grep -v 'functions have mismatched data' >&2) |
    awk -v label="$label" -v n="$inputs" -v files="${files[*]}" -v root="$root/" '
      BEGIN { count = split(files, list, " ") }
      # llvm-cov columns: Filename Regions Missed Cover Functions Missed Executed Lines
      # Missed Cover Branches Missed Cover. It names files relative to their common
      # directory: give them their path in the repository.
      $1 ~ /\.cc$/ || $1 == "TOTAL" {
        name = $1
        sub("^" root, "", name)
        for (i = 1; i <= count; ++i) {
          if (list[i] == name || substr(list[i], length(list[i]) - length(name)) == "/" name) {
            name = list[i]
          }
        }
        if (name == "TOTAL" && count == 1) next
        lines = $8; missed_lines = $9; functions = $5; missed_functions = $6
        printf "fuzz-coverage.sh: %-16s %-30s lines %4d/%-4d %5.1f%%  functions %2d/%-2d  (%s)\n",
               label, name, lines - missed_lines, lines,
               lines ? 100 * (lines - missed_lines) / lines : 0,
               functions - missed_functions, functions, n
      }'
}

echo "fuzz-coverage.sh: corpus $corpus"
for t in "${targets[@]}"; do
  mkdir -p "$work/$t/tmp"
  # -runs=0 only replays: libFuzzer writes nothing into the corpus.
  (cd "$work/$t" && TMPDIR=$work/$t/tmp LLVM_PROFILE_FILE=$work/$t/%p.profraw \
     "$root/$build/fuzz/${t}_fuzz" -runs=0 "$corpus/$t") >"$work/$t/log" 2>&1 ||
    { tail -n 30 "$work/$t/log" >&2; echo "fuzz-coverage.sh: $t failed on its corpus" >&2; exit 1; }
  "$profdata" merge -sparse "$work/$t"/*.profraw -o "$work/profdata"
  # shellcheck disable=SC2086  # the file list splits on purpose
  report "$t" "$(find "$corpus/$t" -type f | wc -l) inputs" ${target_files[$t]} -- \
    "$root/$build/fuzz/${t}_fuzz"
done

# A codec serves both ends, or both phases: its coverage by the targets together.
declare -A shared=(
  [src/nbd/codec.cc]="nbd_handshake nbd_transmission"
  [src/peer/codec.cc]="peer_lender peer_client"
)
for file in src/nbd/codec.cc src/peer/codec.cc; do
  read -r -a users <<<"${shared[$file]}"
  binaries=()
  profiles=()
  for t in "${users[@]}"; do
    [[ " ${targets[*]} " == *" $t "* ]] || continue 2
    binaries+=("$root/$build/fuzz/${t}_fuzz")
    profiles+=("$work/$t"/*.profraw)
  done
  "$profdata" merge -sparse "${profiles[@]}" -o "$work/profdata"
  report "${users[0]%%_*} together" "${users[*]}" "$file" -- "${binaries[@]}"
done
