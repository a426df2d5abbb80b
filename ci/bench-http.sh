#!/usr/bin/env bash
# The server under load, next to nginx, on loopback. Not part of ci/test.sh: speed is
# shown here, never in timed tests. Installs wrk and nginx (Debian packages) if missing.
#
#   ci/bench-http.sh                 # every scenario at 1, 2 and 4 workers, 3 rounds of 5 s
#   ROUNDS=5 DURATION=10 WORKER_COUNTS="2" SCENARIOS="keepalive4 pipeline16" ci/bench-http.sh
#   BASELINE=/tmp/forkloop-main ci/bench-http.sh   # another forkloop build beside this one
#   SUPERVISION=0 ci/bench-http.sh                 # the load scenarios only
#
# Scenarios (each a wrk run on GET /, whose body is "Hello, World!" in both servers):
#   keepalive64   wrk -t2 -c64, keep-alive
#   close64       wrk -t2 -c64, Connection: close (a connection per request)
#   keepalive4    wrk -t1 -c4, keep-alive: latency-bound, low concurrency
#   pipeline16    wrk -t2 -c64 with 16 requests per write (TechEmpower's plaintext shape)
#   h2load64      h2load --h1 -t2 -c64, keep-alive (another client's view; its p99
#                 column is the mean time per request, which is what h2load reports)
# For every worker count, both servers (and BASELINE) run with that many workers; within
# a round, each scenario runs on each server in turn, so that the machine's noise hits
# them alike. Per run: requests/s, p99 latency, and the server's CPU time per request
# (user + system of the master and its workers, from /proc/PID/stat, over the run,
# divided by the requests wrk counted). The table at the end holds the medians over the
# rounds and the forkloop/nginx ratios.
#
# Then the supervision figures (SUPERVISION=1, the default): time from a worker's
# SIGKILL to its replacement answering, and failed requests during HUP and during TERM
# under load.
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/bench-common.sh

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
WORKER_COUNTS=${WORKER_COUNTS:-"1 2 4"}
SCENARIOS=${SCENARIOS:-"keepalive64 close64 keepalive4 pipeline16 h2load64"}
BASELINE=${BASELINE:-}
SUPERVISION=${SUPERVISION:-1}
WORKERS=${WORKERS:-2} # the supervision figures'
CONNECTIONS=${CONNECTIONS:-64}
FL_PORT=${FL_PORT:-18080}
NGINX_PORT=${NGINX_PORT:-18081}
BASE_PORT=${BASE_PORT:-18083}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx && [ ! -x /usr/sbin/nginx ]; then
  echo "installing wrk and nginx (Debian packages)"
  (apt-get install -y wrk nginx-light >/dev/null 2>&1 ||
    (apt-get update >/dev/null 2>&1 && apt-get install -y wrk nginx-light >/dev/null 2>&1))
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [[ " $SCENARIOS " == *" h2load64 "* ]] && ! need h2load; then
  echo "installing h2load (Debian's nghttp2-client)"
  (apt-get install -y nghttp2-client >/dev/null 2>&1 ||
    (apt-get update >/dev/null 2>&1 && apt-get install -y nghttp2-client >/dev/null 2>&1)) ||
    { echo "*** SKIPPED: the h2load64 scenario (no h2load) ***"; SCENARIOS=${SCENARIOS/h2load64/}; }
fi

cargo build --release -q -p forkloop-cli
BIN=target/release/forkloop
WORK=$(mktemp -d)
trap 'kill -9 $(cat "$WORK"/*.pid 2>/dev/null) 2>/dev/null || true; rm -rf "$WORK"' EXIT

# wrk's pipelining: one write of 16 requests per call (wrk counts each response).
cat >"$WORK/pipeline.lua" <<'LUA'
local depth = 16
init = function(args)
  local r = {}
  for i = 1, depth do r[i] = wrk.format(nil, "/") end
  batch = table.concat(r)
end
request = function() return batch end
LUA

# start_forkloop NAME BINARY PORT WORKERS
start_forkloop() {
  "$2" serve --listen "127.0.0.1:$3" --workers "$4" --pid-file "$WORK/$1.pid" \
    2>"$WORK/$1.log" &
  wait_port "$3"
}

# start_nginx WORKERS
start_nginx() {
  cat >"$WORK/nginx.conf" <<EOF
worker_processes $1;
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

# stop NAME: TERM to its master, waiting (bounded) for it to go.
stop() {
  local pid
  pid=$(cat "$WORK/$1.pid" 2>/dev/null) || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$WORK/$1.pid"
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

# run_h2load NAME PORT [SECONDS] -> prints "rps mean_ms cpu_us_per_request [errors]"
run_h2load() {
  local master out before after
  master=$(cat "$WORK/$1.pid")
  before=$(cpu_ticks "$master")
  out=$(h2load --h1 -t2 -c"$CONNECTIONS" -D"${3:-$DURATION}" "http://127.0.0.1:$2/" 2>&1)
  after=$(cpu_ticks "$master")
  python3 - "$before" "$after" "$(getconf CLK_TCK)" <<PY
import re, sys
out = """$out"""
before, after, hz = map(int, sys.argv[1:])
rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[mean.group(2)]
cpu_us = (after - before) / hz * 1e6 / max(int(done.group(1)), 1)
bad = "" if done.group(3) == done.group(4) == "0" else f"failed:{done.group(3)},errored:{done.group(4)}"
print(f"{rps:.0f} {float(mean.group(1)) * scale:.2f} {cpu_us:.2f} {bad}".strip())
PY
}

# run_wrk NAME PORT SCENARIO [SECONDS] -> prints "rps p99_ms cpu_us_per_request [errors]"
run_wrk() {
  local master out before after args
  if [ "$3" = h2load64 ]; then
    run_h2load "$1" "$2" "${4:-}"
    return
  fi
  case $3 in
    keepalive64) args=(-t2 -c"$CONNECTIONS") ;;
    close64) args=(-t2 -c"$CONNECTIONS" -H "Connection: close") ;;
    keepalive4) args=(-t1 -c4) ;;
    pipeline16) args=(-t2 -c"$CONNECTIONS" -s "$WORK/pipeline.lua") ;;
    *) echo "unknown scenario $3" >&2; exit 1 ;;
  esac
  master=$(cat "$WORK/$1.pid")
  before=$(cpu_ticks "$master")
  out=$(wrk "${args[@]}" -d"${4:-$DURATION}s" --latency "http://127.0.0.1:$2/")
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
bad = (errors.group(1).replace(" ", "") if errors else "") + (f"non-2xx:{non2xx.group(1)}" if non2xx else "")
print(f"{rps:.0f} {float(p99.group(1)) * scale:.2f} {cpu_us:.2f} {bad}".strip())
PY
}

SERVERS=(forkloop nginx)
declare -A PORT=([forkloop]=$FL_PORT [nginx]=$NGINX_PORT [baseline]=$BASE_PORT)
[ -n "$BASELINE" ] && SERVERS=(baseline "${SERVERS[@]}")
RESULTS="$WORK/results"
: >"$RESULTS"

echo "machine: $(nproc) cores, $(uname -sr), $(date -u +%Y-%m-%dT%H:%MZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "nginx: $("$NGINX" -v 2>&1 | sed 's/.*: //'); wrk: $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2); forkloop: $(git rev-parse --short HEAD)${BASELINE:+; baseline: $BASELINE}"
echo "$ROUNDS rounds of ${DURATION}s per scenario and server"
printf '%-8s %-6s %-12s %-9s %10s %9s %11s   %s\n' workers round scenario server req/s p99_ms cpu_us/req errors
for workers in $WORKER_COUNTS; do
  start_forkloop forkloop "$BIN" "$FL_PORT" "$workers"
  [ -n "$BASELINE" ] && start_forkloop baseline "$BASELINE" "$BASE_PORT" "$workers"
  start_nginx "$workers"
  for server in "${SERVERS[@]}"; do # every worker up and warm
    run_wrk "$server" "${PORT[$server]}" keepalive64 1 >/dev/null
  done
  for round in $(seq 1 "$ROUNDS"); do
    for scenario in $SCENARIOS; do
      for server in "${SERVERS[@]}"; do
        r=$(run_wrk "$server" "${PORT[$server]}" "$scenario")
        printf '%-8s %-6s %-12s %-9s %10s %9s %11s   %s\n' "$workers" "$round" "$scenario" "$server" $r
        echo "$workers $scenario $server $r" >>"$RESULTS"
      done
    done
  done
  for server in "${SERVERS[@]}"; do stop "$server"; done
done

echo
echo "medians over $ROUNDS rounds (req/s, CPU µs per request; ratio = forkloop / nginx):"
python3 - "$RESULTS" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    w, scenario, server, rps, p99, cpu, *_ = line.split()
    runs.setdefault((int(w), scenario), {}).setdefault(server, []).append((float(rps), float(p99), float(cpu)))
med = lambda xs: statistics.median(xs)
base = any("baseline" in s for s in runs.values())
head = f"{'workers':>7} {'scenario':<12} {'forkloop':>9} {'nginx':>9} {'ratio':>6}   {'fl µs':>6} {'ng µs':>6} {'ratio':>6}   {'fl p99':>7} {'ng p99':>7}"
print(head + ("   baseline req/s  µs/req" if base else ""))
for (w, scenario), by in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1])):
    f, n = by["forkloop"], by["nginx"]
    fr, nr = med([r[0] for r in f]), med([r[0] for r in n])
    fc, nc = med([r[2] for r in f]), med([r[2] for r in n])
    fp, np_ = med([r[1] for r in f]), med([r[1] for r in n])
    line = f"{w:>7} {scenario:<12} {fr:>9.0f} {nr:>9.0f} {fr / nr:>6.2f}   {fc:>6.2f} {nc:>6.2f} {fc / nc:>6.2f}   {fp:>7.2f} {np_:>7.2f}"
    if "baseline" in by:
        b = by["baseline"]
        line += f"   {med([r[0] for r in b]):>14.0f} {med([r[2] for r in b]):>7.2f}"
    print(line)
PY

[ "$SUPERVISION" = 1 ] || exit 0

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

hup_under_load() { # SERVER MODE
  local header=() out
  [ "$2" = close ] && header=(-H "Connection: close")
  (for _ in 1 2 3; do sleep 1; kill -HUP "$(cat "$WORK/$1.pid")"; done) &
  local hups=$!
  out=$(wrk -t2 -c"$CONNECTIONS" -d4s "${header[@]}" "http://127.0.0.1:${PORT[$1]}/")
  wait "$hups"
  echo "  $1, 3 HUPs during wrk ($2): $(echo "$out" | grep -E 'requests in') ; errors: $(echo "$out" | grep -E 'Socket errors|Non-2xx' | tr '\n' ' ')"
}
start_forkloop forkloop "$BIN" "$FL_PORT" "$WORKERS"
hup_under_load forkloop keepalive
hup_under_load forkloop close
start_nginx "$WORKERS" # the anchor: nginx reloads its workers on HUP
hup_under_load nginx keepalive
hup_under_load nginx close
stop nginx

for mode in keepalive close; do
  [ -s "$WORK/forkloop.pid" ] && kill -TERM "$(cat "$WORK/forkloop.pid")" 2>/dev/null || true
  sleep 0.5
  start_forkloop forkloop "$BIN" "$FL_PORT" "$WORKERS"
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
