#!/usr/bin/env bash
# Installs everything memlend needs to build, test and benchmark, from Debian's packages.
# Idempotent: installs only what is missing, and runs apt-get update only then.
set -euo pipefail

packages=(
  cmake g++ make pkg-config
  liburing-dev libnbd-dev libcli11-dev nlohmann-json3-dev doctest-dev liblz4-dev
  # libcrypto (OpenSSL 3): sealing pages that leave the host (docs/security.md)
  libssl-dev
  fio nbdkit libnbd-bin python3
  # memlend attach --frontend fuse: nbdfuse (libnbd-bin, above) and fusermount3
  fuse3
  # scripts/fuzz.sh: clang with libFuzzer and the sanitizer runtimes; llvm-profdata and
  # llvm-cov for scripts/fuzz-coverage.sh
  clang libclang-rt-14-dev llvm-14
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages already installed"
  exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  sudo=(sudo)
fi
echo "install-deps: installing ${missing[*]}"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
