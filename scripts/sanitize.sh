#!/usr/bin/env bash
# The sanitizer run: builds memlend with clang, AddressSanitizer and UndefinedBehaviorSanitizer
# (every finding fatal) into build-asan/, runs the unit and integration tests there, then runs
# each libFuzzer target of fuzz/ for a bounded time on its seed corpus.
#
#     scripts/sanitize.sh [--fuzz-seconds N]      (default 60; 0 skips the fuzzing)
#
# AddressSanitizer's shadow memory cannot be locked, so daemons of this build run with
# --no-mlock (CTest gives the tests MEMLEND_TEST_SANITIZED=1 in such a build); the tests that
# are about locked memory say so and run in the normal build (scripts/test.sh runs both).
# Expects the dependencies of scripts/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

fuzz_seconds=60
while [[ $# -gt 0 ]]; do
  case $1 in
    --fuzz-seconds) fuzz_seconds=${2:?--fuzz-seconds needs a number}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "sanitize.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $fuzz_seconds =~ ^[0-9]+$ ]] || { echo "sanitize.sh: --fuzz-seconds takes a number" >&2; exit 2; }

command -v clang++ >/dev/null || { echo "sanitize.sh: clang++ is missing (scripts/install-deps.sh installs it)" >&2; exit 1; }
CC=clang CXX=clang++ cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMEMLEND_WERROR=ON -DMEMLEND_SANITIZE=ON -DMEMLEND_FUZZ=ON >/dev/null
cmake --build build-asan -j"$(nproc)"

export ASAN_OPTIONS=detect_leaks=1:strict_string_checks=1:check_initialization_order=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd build-asan && ctest -L 'unit|integration' --output-on-failure --timeout 600 -j2)

if [[ $fuzz_seconds -gt 0 ]]; then
  scripts/fuzz.sh --build build-asan --seconds "$fuzz_seconds" --jobs 2
fi
