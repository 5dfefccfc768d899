#!/usr/bin/env bash
# The test command: installs dependencies, builds, and runs every test — unit tests,
# integration tests with real daemons and real NBD clients, fio verification, and the
# real-kernel tests of tests/vm/ under QEMU, one guest at a time — then the sanitizer run
# (scripts/sanitize.sh: the unit and integration tests built with ASan and UBSan, and each
# fuzz target for 30 s).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
(cd build && ctest --output-on-failure --timeout 600 -j2)
scripts/sanitize.sh --fuzz-seconds "${MEMLEND_FUZZ_SECONDS:-30}"
