#!/usr/bin/env bash
# fio_peer_reconnect.sh — a borrower's connections to its lenders break while fio writes and
# verifies (crc32c) through it with --redundancy none, so that each remote page has one copy:
# the sessions are resumed and nothing is lost. Then a borrower that dies and does not come back:
# its lender keeps its memory for --borrower-grace, then zeroes and frees it.
#
# Usage: fio_peer_reconnect.sh PATH_TO_MEMLEND
#
# Connections are broken with `ss -K` (the kernel aborts the borrower's socket and sends a
# reset): $MEMLEND_BREAKS times (default 4), 1.5 s apart. Every fio run and a final verify-only
# pass must be clean, the borrower must count no lost page and must have resumed (its log says
# so), and the lenders must keep no parked session at the end. Exit status: 0 pass, 1 fail,
# 77 skipped (fio without the nbd engine, python3 missing, or `ss -K` not supported here).
set -euo pipefail

memlend=${1:?usage: fio_peer_reconnect.sh PATH_TO_MEMLEND}
ml_prefix="fio_peer_reconnect.sh: "
# shellcheck source=fio_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/fio_lib.sh" memlend-fio-reconnect

# Can this host's kernel abort a socket (SOCK_DESTROY, CONFIG_INET_DIAG_DESTROY, as root)?
probe=$(python3 - <<'EOF'
import socket, subprocess
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
port = server.getsockname()[1]
client = socket.create_connection(("127.0.0.1", port))
accepted, _ = server.accept()
subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", str(port)], capture_output=True)
client.settimeout(1)
try:
    print("kept" if client.recv(1) != b"" else "closed")
except OSError:
    print("aborted")
EOF
) || true
[[ $probe == aborted ]] || skip "ss -K cannot abort a TCP connection here (needs root and CONFIG_INET_DIAG_DESTROY; got '$probe')"

socket=$workdir/nbd.sock
ports=("$(free_port)" "$(free_port)")
start_daemon lender1 --lend 64M --listen "127.0.0.1:${ports[0]}"
start_daemon lender2 --lend 64M --listen "127.0.0.1:${ports[1]}"
# A backing file for what finds no room while a lender is away (writes then go to disk, as
# users run it); pages on lenders keep one copy.
start_daemon borrower --device fio:64M --nbd "unix:$socket" --local-store 2M --compress none \
  --redundancy none --backing-file "$workdir/backing.img" \
  --peer "127.0.0.1:${ports[0]}" --peer "127.0.0.1:${ports[1]}"
write_verify_job "nbd+unix:///fio?socket=$socket" 24m 32m 24m

status_eval() {
  status_json "$1" | python3 -c "import json,sys; s = json.load(sys.stdin); print($2)"
}
wait_for() {
  local seconds=$1 what=$2 name=$3 expr=$4
  for _ in $(seq $((seconds * 10))); do
    [[ $(status_eval "$name" "$expr" 2>/dev/null) == True ]] && return 0
    sleep 0.1
  done
  fail "$what did not happen within $seconds s; $name status: $(status_json "$name")"
}

start_fio_loop
wait_for 60 "pages reaching both lenders" borrower "all(p['pages_stored'] > 500 for p in s['peers'])"
breaks=${MEMLEND_BREAKS:-4}
for i in $(seq "$breaks"); do
  port=${ports[$((i % 2))]}
  held=$(status_eval borrower "next(p['pages_stored'] for p in s['peers'] if p['address'].endswith(':$port'))")
  echo "break $i: aborting the borrower's connection to 127.0.0.1:$port ($held pages there, their only copy)"
  ss -K dst 127.0.0.1 dport = "$port" >/dev/null
  sleep 1.5
done
wait_for 30 "every lender up again" borrower "all(p['state'] == 'up' for p in s['peers'])"
end_fio_loop "connections broke"
echo "  fio: $fio_runs runs, all clean"
echo "verify-only pass over everything the runs wrote"
run_fio verify --verify_only || { cat "$workdir/verify.stderr"; fail "fio verify-only run failed"; }
check_fio_clean verify || fail "fio verify-only run reported errors"

resumed=$(grep -c "session resumed" "$workdir/borrower.stderr" || true)
echo "  the borrower resumed $resumed session(s); its log:"
grep -E "resum|is down|lost" "$workdir/borrower.stderr" | sed 's/^/    /' | head -n 20
((resumed >= 1)) || fail "the borrower never resumed a session"
[[ $(status_eval borrower "s['remote_store']['lost_pages']") == 0 ]] || fail "pages were lost"
for name in lender1 lender2; do
  wait_for 10 "$name keeping no session for a borrower that is back" "$name" "s['lending']['parked'] == []"
done

# One lender and no backing file: a write that finds the connection broken has nowhere else
# to go, and waits for the session to come back.
echo "one lender, no backing file: writes wait for the session to come back"
stop_daemon borrower
start_daemon borrower --device fio:64M --nbd "unix:$socket" --local-store 2M --compress none \
  --redundancy none --peer "127.0.0.1:${ports[0]}"
start_fio_loop
wait_for 60 "pages reaching lender1" borrower "s['peers'][0]['pages_stored'] > 500"
for i in $(seq "$breaks"); do
  echo "break $i: aborting the borrower's only lender connection"
  ss -K dst 127.0.0.1 dport = "${ports[0]}" >/dev/null
  sleep 1.5
done
wait_for 30 "lender1 up again" borrower "s['peers'][0]['state'] == 'up'"
end_fio_loop "the only lender's connection broke"
echo "  fio: $fio_runs runs, all clean"
[[ $(status_eval borrower "s['remote_store']['lost_pages']") == 0 ]] || fail "pages were lost"

# A borrower that dies and does not come back within --borrower-grace.
echo "a borrower killed with -9, on a lender with --borrower-grace 2"
stop_daemon borrower
stop_daemon lender1
start_daemon lender1 --lend 64M --listen "127.0.0.1:${ports[0]}" --borrower-grace 2
start_daemon borrower --device fio:64M --nbd "unix:$socket" --local-store 2M --compress none \
  --redundancy none --peer "127.0.0.1:${ports[0]}"
run_fio fill --rw=write --do_verify=0 --size=16m >/dev/null || fail "filling the device failed"
used=$(status_eval lender1 "s['lending']['used_bytes']")
((used > 0)) || fail "nothing reached lender1"
kill -KILL "${ml_pids[borrower]}"
wait "${ml_pids[borrower]}" 2>/dev/null || true
unset "ml_pids[borrower]"
wait_for 5 "lender1 keeping the dead borrower's memory" lender1 "len(s['lending']['parked']) == 1"
echo "  lender1 keeps $(status_eval lender1 "s['lending']['parked'][0]['pages']") pages for it ($used bytes lent)"
[[ $("$memlend" status --control "$workdir/lender1.control") == *"unless it comes back"* ]] ||
  fail "memlend status on lender1 does not show the memory it keeps"
wait_for 10 "lender1 freeing it after the grace period" lender1 \
  "s['lending']['parked'] == [] and s['lending']['used_bytes'] == 0"
grep -q "did not come back within 2 s" "$workdir/lender1.stderr" ||
  fail "lender1 did not log what it freed: $(cat "$workdir/lender1.stderr")"
echo "  freed and zeroed: $(grep "did not come back" "$workdir/lender1.stderr" | tail -n 1)"

stop_daemon lender1
stop_daemon lender2
echo "PASS: $breaks broken connections resumed under fio with redundancy none, with two lenders and a backing file and with one lender alone; a dead borrower's memory freed after its grace period"
