# shellcheck shell=bash
# lib.sh — shell helpers shared by scripts/demo.sh, the fio integration tests and the
# benchmarks: SKIPPED/FAIL messages with their exit codes, a work directory that is always
# cleaned up, starting memlend daemons (and other servers) and waiting until they are ready,
# stopping them with SIGTERM, free TCP ports, socket probes, and the check that a borrower's
# pages are where its lenders say they are.
#
# Source it from bash; it sets no shell options (the scripts use set -euo pipefail):
#     source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
#
# Exit codes, as CTest expects them (SKIP_RETURN_CODE 77): 0 pass, 1 fail, 77 skipped.
# A script may set ml_prefix (e.g. "nbd_bench.sh: ") to put in front of its SKIPPED/FAIL lines.
# The daemon helpers run "$memlend", which the sourcing script sets.
# Every helper that starts something needs make_workdir first: logs, sockets and control
# sockets live in $workdir, and everything started is stopped when the script exits.

ml_prefix=${ml_prefix:-}
# The repository root (this file is in scripts/), for the scripts that source this file.
# shellcheck disable=SC2034
ml_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Processes started through start_daemon or start_server, by name; cleanup stops them.
declare -A ml_pids=()

# skip REASON...: says why the script cannot run here and exits 77.
skip() {
  echo "${ml_prefix}SKIPPED: $*"
  exit 77
}

# fail MESSAGE...: says what went wrong (on stderr) and exits 1.
fail() {
  echo "${ml_prefix}FAIL: $*" >&2
  exit 1
}

# Skips (exit 77) unless fio with its nbd ioengine and python3 are installed.
require_fio_nbd() {
  command -v fio >/dev/null || skip "fio is not installed"
  fio --enghelp=nbd 2>/dev/null | grep -q '^uri' || skip "fio has no nbd ioengine (built without libnbd)"
  command -v python3 >/dev/null || skip "python3 is needed to read fio's JSON output"
}

# make_workdir NAME: creates $workdir (a fresh ${TMPDIR:-/tmp}/NAME.XXXXXX) and arranges that,
# however the script ends (including Ctrl-C and SIGTERM, which exit 130), every process started
# through this library is stopped and $workdir removed. Call it in the script itself, not in a
# subshell: it sets the traps and $workdir.
make_workdir() {
  workdir=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
  trap ml_cleanup EXIT
  trap 'exit 130' INT TERM
}

# SIGTERM to everything still running, up to 5 s for it to exit, SIGKILL for what is left; then
# removes $workdir.
ml_cleanup() {
  local name pid
  for pid in "${ml_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for _ in $(seq 50); do
    for name in "${!ml_pids[@]}"; do
      kill -0 "${ml_pids[$name]}" 2>/dev/null || unset "ml_pids[$name]"
    done
    [[ ${#ml_pids[@]} -eq 0 ]] && break
    sleep 0.1
  done
  for pid in "${ml_pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  ml_pids=()
  [[ -z ${workdir:-} ]] || rm -rf "$workdir"
}

# Prints a TCP port on 127.0.0.1 that is free right now.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# socket_accepts ADDRESS: returns 0 if a connection to ADDRESS succeeds right now. ADDRESS is a
# unix socket (unix:PATH, or a PATH with a slash), HOST:PORT, or a PORT on 127.0.0.1.
socket_accepts() {
  python3 - "$1" <<'EOF'
import socket, sys
address = sys.argv[1]
if address.startswith("unix:") or "/" in address:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    target = address[5:] if address.startswith("unix:") else address
else:
    host, _, port = address.rpartition(":")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    target = (host or "127.0.0.1", int(port))
try:
    s.connect(target)
except OSError:
    sys.exit(1)
EOF
}

# start_daemon NAME ARGS...: runs `"$memlend" daemon ARGS --control $workdir/NAME.control` in the
# background with its stderr in $workdir/NAME.stderr, and waits (about 10 s at most) until it has
# printed its "memlend: ready:" line and its control socket accepts connections. Fails, showing
# the daemon's stderr, if it exits first or is not ready in time. With MEMLEND_TEST_SANITIZED=1
# (a sanitized build, whose shadow memory cannot be locked) the daemon gets --no-mlock.
start_daemon() {
  local name=$1
  shift
  [[ ${MEMLEND_TEST_SANITIZED:-0} != 1 ]] || set -- "$@" --no-mlock
  ml_launch "$name" "${memlend:?set memlend first}" daemon "$@" --control "$workdir/$name.control"
  ml_wait_ready "$name" "$workdir/$name.control" 'memlend: ready:'
}

# start_server NAME ADDRESS COMMAND...: runs COMMAND in the background (it must stay in the
# foreground, e.g. nbdkit -f) with its stderr in $workdir/NAME.stderr, and waits (about 10 s at
# most) until ADDRESS (see socket_accepts) accepts connections.
start_server() {
  local name=$1 address=$2
  shift 2
  ml_launch "$name" "$@"
  ml_wait_ready "$name" "$address" ''
}

ml_launch() {
  local name=$1
  shift
  [[ -z ${ml_pids[$name]:-} ]] || fail "internal: a process named $name is already running"
  rm -f "$workdir/$name.stderr"
  "$@" 2>"$workdir/$name.stderr" &
  ml_pids[$name]=$!
}

# ml_wait_ready NAME ADDRESS READY_LINE: ready when READY_LINE (if not empty) is in NAME's stderr
# and ADDRESS accepts connections.
ml_wait_ready() {
  local name=$1 address=$2 ready_line=$3
  for _ in $(seq 100); do
    kill -0 "${ml_pids[$name]}" 2>/dev/null ||
      fail "$name exited during startup: $(cat "$workdir/$name.stderr")"
    if { [[ -z $ready_line ]] || grep -q "$ready_line" "$workdir/$name.stderr"; } &&
      socket_accepts "$address"; then
      return 0
    fi
    sleep 0.1
  done
  fail "$name was not ready within 10 s: $(cat "$workdir/$name.stderr")"
}

# stop_daemon NAME: SIGTERM; the daemon must then exit with status 0.
stop_daemon() {
  local name=$1 status=0
  local pid=${ml_pids[$1]:?stop_daemon: no process named $1}
  kill -TERM "$pid"
  wait "$pid" || status=$?
  unset "ml_pids[$name]"
  [[ $status -eq 0 ]] || fail "$name (pid $pid) exited with status $status on SIGTERM: $(cat "$workdir/$name.stderr")"
}

# status_json NAME: the `memlend status --json` of the daemon started as NAME.
status_json() {
  "$memlend" status --control "$workdir/$1.control" --json
}

# check_placement [--mapped PAGES] BORROWER LENDER...: waits (about 10 s at most) for the
# borrower's eviction to settle into this state, read from `memlend status --json` of each:
#   - the device's page counts add up: mapped = zero + local + disk + remote (and = PAGES if given);
#   - more pages are remote than local, none on disk, the local store is under its high watermark;
#   - every lender holds some of the borrower's pages;
#   - the borrower's books agree with the lenders': its remote pages (and local pages fetched
#     ahead, which keep their remote slots) = remote_store.pages, its
#     copies of them (as many per page as the redundancy asks, none degraded) = the sum of its
#     peers' pages, and the bytes of superpages it holds = what the lenders say they lend.
# Prints one summary line and each check (ok, or not (yet) true); returns 1 unless all hold.
check_placement() {
  local mapped=-1
  if [[ $1 == --mapped ]]; then
    mapped=$2
    shift 2
  fi
  local borrower=$1 name ok=1
  shift
  for _ in $(seq 40); do
    status_json "$borrower" >"$workdir/placement-borrower.json"
    for name in "$@"; do status_json "$name" >"$workdir/placement-lender-$name.json"; done
    if python3 - "$workdir" "$mapped" "$@" <<'EOF'; then
import json, sys
d, expected_mapped, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
b = json.load(open(f"{d}/placement-borrower.json"))
lenders = [json.load(open(f"{d}/placement-lender-{name}.json")) for name in names]
pages = b["devices"][0]["pages"]
remote = b["remote_store"]
local = b["local_store"]
lent = sum(l["lending"]["used_bytes"] for l in lenders)
checks = {
    "mapped = zero + local + disk + remote":
        pages["mapped"] == pages["zero"] + pages["local"] + pages["disk"] + pages["remote"],
}
if expected_mapped >= 0:
    checks[f"mapped = {expected_mapped}, the pages written"] = pages["mapped"] == expected_mapped
checks.update({
    "remote > local": pages["remote"] > pages["local"],
    "no pages on disk": pages["disk"] == 0,
    "local store under the high watermark": local["used_bytes"] * 100 <= local["total_bytes"] * 90,
    "remote pages = remote_store.pages":
        pages["remote"] + pages["remote_copies"] == remote["pages"],
    "remote_store.copies = sum of peers' pages_stored":
        remote["copies"] == sum(p["pages_stored"] for p in b["peers"]),
    "no degraded page": remote["degraded_pages"] == 0,
    "copies = pages x the device's replicas":
        remote["copies"] == remote["pages"] * (int(b["devices"][0]["redundancy"].split(":")[1])
                                               if b["devices"][0]["redundancy"] != "none" else 1),
    "remote_store.used_bytes = lenders' used_bytes = superpages held * 2 MiB":
        remote["used_bytes"] == lent == sum(p["superpages_held"] for p in b["peers"]) * 2 * 1024 * 1024,
    f"all {len(names)} lenders hold pages":
        len(b["peers"]) == len(names) and all(p["pages_stored"] > 0 for p in b["peers"]),
})
with open(f"{d}/placement.txt", "w") as out:
    print(f"  borrower: mapped {pages['mapped']}, local {pages['local']}, remote {pages['remote']}, "
          f"disk {pages['disk']}; local store {local['used_bytes']} of {local['total_bytes']} bytes; "
          f"lenders lend {lent} bytes; peers: " +
          ", ".join(f"{p['address']} {p['state']} {p['pages_stored']} pages" for p in b["peers"]),
          file=out)
    for name, ok in checks.items():
        print(f"  {'ok:' if ok else 'not (yet) true:'} {name}", file=out)
sys.exit(0 if all(checks.values()) else 1)
EOF
      ok=0
      break
    fi
    sleep 0.25
  done
  cat "$workdir/placement.txt"
  return $ok
}
