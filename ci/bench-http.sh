#!/usr/bin/env bash
# The server under load, next to nginx, on loopback. Not part of ci/test.sh: speed is
# shown here, never in timed tests. Installs wrk and nginx (Debian packages) if missing.
#
#   ci/bench-http.sh                 # 3 rounds of 5 s per mode, 2 workers each
#   ROUNDS=5 DURATION=10 WORKERS=2 CONNECTIONS=64 ci/bench-http.sh
#
# Prints, per round and mode (keep-alive, Connection: close): requests/s, p99 latency,
# server CPU time per request (master + workers, from /proc/<pid>/stat), and the
# forkloop/nginx ratios. Then the supervision figures: time from a worker's SIGKILL to
# its replacement answering, and failed requests during HUP and during TERM under load.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
WORKERS=${WORKERS:-2}
CONNECTIONS=${CONNECTIONS:-64}
FL_PORT=${FL_PORT:-18080}
NGINX_PORT=${NGINX_PORT:-18081}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx && [ ! -x /usr/sbin/nginx ]; then
  echo "installing wrk and nginx (Debian packages)"
  (apt-get install -y wrk nginx-light >/dev/null 2>&1 ||
    (apt-get update >/dev/null 2>&1 && apt-get install -y wrk nginx-light >/dev/null 2>&1))
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release -q
BIN=target/release/forkloop
WORK=$(mktemp -d)
trap 'kill -9 $(cat "$WORK"/*.pid 2>/dev/null) 2>/dev/null || true; rm -rf "$WORK"' EXIT

start_forkloop() {
  "$BIN" serve --listen "127.0.0.1:$FL_PORT" --workers "$WORKERS" --pid-file "$WORK/forkloop.pid" \
    2>"$WORK/forkloop.log" &
  wait_port "$FL_PORT"
}

start_nginx() {
  cat >"$WORK/nginx.conf" <<EOF
worker_processes $WORKERS;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / { default_type text/plain; return 200 "Hello, World!"; }
  }
}
EOF
  "$NGINX" -c "$WORK/nginx.conf" -p "$WORK"
  wait_port "$NGINX_PORT"
}

wait_port() {
  for _ in $(seq 1 200); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 0.1)" 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2
  exit 1
}

# Sum of utime+stime (clock ticks) of a master and its children.
cpu_ticks() {
  local master=$1 total=0
  for pid in "$master" $(cat "/proc/$master/task/$master/children" 2>/dev/null); do
    if [ -r "/proc/$pid/stat" ]; then
      total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
    fi
  done
  echo "$total"
}

# run_wrk NAME PORT MODE -> prints "rps p99_ms cpu_us_per_request"
run_wrk() {
  local port=$2 mode=$3 master header=()
  master=$(cat "$WORK/$1.pid")
  [ "$mode" = close ] && header=(-H "Connection: close")
  local before after out
  before=$(cpu_ticks "$master")
  out=$(wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency "${header[@]}" "http://127.0.0.1:$port/")
  after=$(cpu_ticks "$master")
  python3 - "$before" "$after" "$(getconf CLK_TCK)" <<PY
import re, sys
out = """$out"""
before, after, hz = map(int, sys.argv[1:])
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
total = int(re.search(r"(\d+) requests in", out).group(1))
p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
cpu_us = (after - before) / hz * 1e6 / max(total, 1)
errors = re.search(r"Socket errors: (.*)", out)
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
bad = (errors.group(1) if errors else "") + (f" non-2xx {non2xx.group(1)}" if non2xx else "")
print(f"{rps:.0f} {float(p99.group(1)) * scale:.2f} {cpu_us:.1f} {bad}".strip())
PY
}

start_forkloop
start_nginx
echo "machine: $(nproc) cores, $(uname -sr); $WORKERS workers each; wrk -t2 -c$CONNECTIONS -d${DURATION}s"
printf '%-6s %-10s %-9s %10s %9s %12s   %s\n' round mode server req/s p99_ms cpu_us/req errors
for round in $(seq 1 "$ROUNDS"); do
  for mode in keepalive close; do
    fl=$(run_wrk forkloop "$FL_PORT" "$mode")
    ng=$(run_wrk nginx "$NGINX_PORT" "$mode")
    printf '%-6s %-10s %-9s %10s %9s %12s   %s\n' "$round" "$mode" forkloop $fl
    printf '%-6s %-10s %-9s %10s %9s %12s   %s\n' "$round" "$mode" nginx $ng
    python3 -c "
f, n = '$fl'.split(), '$ng'.split()
print(f'       ratio forkloop/nginx: req/s {float(f[0])/float(n[0]):.2f}, cpu/req {float(f[2])/float(n[2]):.2f}')"
  done
done
kill "$(cat "$WORK/nginx.pid")"

echo
echo "supervision:"
# Replacement latency on a one-worker server, so the first answer after a kill must come
# from the replacement. Kills are 1.2 s apart: a worker that dies within 1 s of its start
# counts as crash-looping and is respawned with backoff, which is not what this measures.
"$BIN" serve --listen "127.0.0.1:$((FL_PORT + 2))" --workers 1 --pid-file "$WORK/single.pid" 2>/dev/null &
wait_port $((FL_PORT + 2))
python3 - "$((FL_PORT + 2))" <<'PYTHON'
import os, signal, socket, statistics, sys, time
port = int(sys.argv[1])

def pid(timeout):
    s = socket.create_connection(("127.0.0.1", port), timeout)
    s.settimeout(timeout)
    s.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return int(data.split(b"\r\n\r\n", 1)[1])

samples = []
for _ in range(20):
    time.sleep(1.2)
    victim = pid(2.0)
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    while True:
        try:
            if pid(2.0) != victim:
                break
        except OSError:
            pass
    samples.append((time.monotonic() - t0) * 1000)
samples.sort()
print(f"  SIGKILL of a worker -> its replacement answering: median {statistics.median(samples):.2f} ms, "
      f"max {samples[-1]:.2f} ms over {len(samples)} kills (one-worker server)")
PYTHON
kill -TERM "$(cat "$WORK/single.pid")"

hup_under_load() { # MODE
  local header=() out
  [ "$1" = close ] && header=(-H "Connection: close")
  (for _ in 1 2 3; do sleep 1; kill -HUP "$(cat "$WORK/forkloop.pid")"; done) &
  local hups=$!
  out=$(wrk -t2 -c"$CONNECTIONS" -d4s "${header[@]}" "http://127.0.0.1:$FL_PORT/")
  wait "$hups"
  echo "  3 HUPs during wrk ($1): $(echo "$out" | grep -E 'requests in') ; errors: $(echo "$out" | grep -E 'Socket errors|Non-2xx' | tr '\n' ' ')"
}
hup_under_load keepalive
hup_under_load close

for mode in keepalive close; do
  [ -s "$WORK/forkloop.pid" ] && kill -TERM "$(cat "$WORK/forkloop.pid")" 2>/dev/null || true
  sleep 0.5
  start_forkloop
  header=()
  [ "$mode" = close ] && header=(-H "Connection: close")
  (sleep 1.5; kill -TERM "$(cat "$WORK/forkloop.pid")") &
  term=$!
  out=$(wrk -t2 -c"$CONNECTIONS" -d3s "${header[@]}" "http://127.0.0.1:$FL_PORT/")
  wait "$term"
  echo "  TERM during wrk ($mode): $(echo "$out" | grep -E 'requests in') ; errors: $(echo "$out" | grep -E 'Socket errors|Non-2xx' | tr '\n' ' ')"
  echo "    (after the listeners close, wrk's reconnects are refused; it counts a refused non-blocking"
  echo "     connect as a write error. Lost requests would show as read or timeout errors.)"
done
