#!/usr/bin/env bash
# The test command: installs dependencies, builds, and runs every test (unit tests,
# integration tests with real daemons and real NBD clients, fio verification, and the
# real-kernel tests of tests/vm/ under QEMU, one guest at a time).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
cd build
ctest --output-on-failure --timeout 600 -j2
