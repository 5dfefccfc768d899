#!/usr/bin/env python3
"""offcpu_summary.py: reads `perf sched timehist -g --state` on stdin and prints, per thread
name and kernel stack, how long threads of that name waited to run again after switching out
there (the next line's "wait time" of the same thread is what its previous switch cost), and
how long each CPU was idle. Used by bench/swap_bench_guest.sh with MEMLEND_SWAP_PERF=sched.
"""
import collections
import re
import sys

LINE = re.compile(
    r"^\s*(?P<time>\d+\.\d+)\s+\[(?P<cpu>\d+)\]\s+(?P<task>.+?)\s+(?P<wait>\d+\.\d+)\s+"
    r"(?P<delay>\d+\.\d+)\s+(?P<run>\d+\.\d+)\s+(?P<state>\S+)\s*(?P<stack>.*)$")
TASK = re.compile(r"^(?P<name>.*?)(\[(?P<tid>\d+)(/\d+)?\])?$")

waits = collections.Counter()   # (name, state, stack) -> ms
runs = collections.Counter()    # name -> ms on a CPU
last = {}                       # tid -> (name, state, stack)
idle_ms = 0.0
first = last_time = None
for line in sys.stdin:
    m = LINE.match(line)
    if not m:
        continue
    t = float(m["time"])
    first = t if first is None else first
    last_time = t
    task = TASK.match(m["task"].strip())
    name, tid = task["name"], task["tid"] or task["name"]
    if name == "<idle>":
        idle_ms += float(m["run"])
        continue
    # Thread names carry numbers (ml-lend-1, ublk-queue0, kworker/0:1H): group them.
    group = re.sub(r"\d+", "N", name)
    runs[group] += float(m["run"])
    if tid in last:
        waits[last[tid]] += float(m["wait"])
    stack = " <- ".join(m["stack"].split(" <- ")[:4])
    last[tid] = (group, m["state"], stack)

span = (last_time - first) * 1000 if first is not None else 0
print(f"span {span:.0f} ms; idle {idle_ms:.0f} ms of the CPUs' {2 * span:.0f} ms")
print("on CPU, ms, by thread:")
for name, ms in runs.most_common(12):
    print(f"  {ms:9.0f}  {name}")
print("waiting to run again, ms, by thread, state and where it switched out:")
for (name, state, stack), ms in waits.most_common(40):
    print(f"  {ms:9.0f}  {name} {state}  {stack}")
