#!/usr/bin/env bash
# Configures and builds memlend into build/ (warnings are errors). Extra arguments go to
# the CMake configure step.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMEMLEND_WERROR=ON "$@" >/dev/null
cmake --build build -j"$(nproc)"
