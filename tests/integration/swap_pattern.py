#!/usr/bin/env python3
"""Writes a known pattern over SIZE_MIB of anonymous memory, says so, waits, reads it back.

Usage: swap_pattern.py SIZE_MIB FILLED_FILE GO_FILE

Run in a memory cgroup smaller than SIZE_MIB, most of the pattern has to go to swap. Every
4 KiB page holds its own index and a seed, repeated. After writing everything it writes its
VmRSS and VmSwap to FILLED_FILE, waits (at most 60 s) for GO_FILE to exist, reads every page
back and exits 0 only if all are intact.
"""
import os
import struct
import sys
import time

PAGE = 4096
SEED = 0x6D656D6C656E64  # any constant


def page(i):
    return struct.pack("<QQ", i, SEED ^ (i * 0x9E3779B97F4A7C15 & (2**64 - 1))) * (PAGE // 16)


def vm_status():
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmSwap"):
                fields[key] = value.strip()
    return fields


def main():
    size_mib, filled, go = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    pages = size_mib * 1024 * 1024 // PAGE
    memory = bytearray(pages * PAGE)
    for i in range(pages):
        memory[i * PAGE:(i + 1) * PAGE] = page(i)
    status = vm_status()
    with open(filled + ".tmp", "w") as out:
        print(f"pattern: wrote {size_mib} MiB; VmRSS {status.get('VmRSS')}, "
              f"VmSwap {status.get('VmSwap')}", file=out)
    os.rename(filled + ".tmp", filled)
    deadline = time.monotonic() + 60
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            print("pattern: nobody said go within 60 s", file=sys.stderr)
            return 1
        time.sleep(0.05)
    bad = [i for i in range(pages) if memory[i * PAGE:(i + 1) * PAGE] != page(i)]
    if bad:
        print(f"pattern: {len(bad)} of {pages} pages differ, first {bad[:8]}", file=sys.stderr)
        return 1
    print(f"pattern: read back all {pages} pages intact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
