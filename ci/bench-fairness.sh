#!/usr/bin/env bash
# How evenly the workers of one shared listening socket share the load (BENCHMARKS.md,
# "Load across workers"). Not part of ci/test.sh: it measures, it asserts nothing.
#
#   ci/bench-fairness.sh                          # this tree's release build
#   BASELINE=/tmp/forkloop-main ci/bench-fairness.sh   # and another build, side by side
#   CONTENDERS=shared ci/bench-fairness.sh        # without the --reuse-port runs
#   ROUNDS=5 DURATION=10 ci/bench-fairness.sh
#   SCENARIOS="2,1,4" MODES=keepalive ci/bench-fairness.sh   # workers,wrk threads,connections
#
# Per round and scenario (2 workers under wrk -t1 -c4, 4 workers under wrk -t2 -c64;
# keep-alive and Connection: close), each contender in turn (this build sharing one
# socket per address, this build with --reuse-port, and the baseline if given):
#   - a counting run: wrk against GET /pid, whose body is the answering worker's pid,
#     with a Lua script that counts bodies: requests per worker, max/min, the largest
#     share. A worker that served nothing counts as 0 (max/min is then "inf"). One
#     second in, each worker's open fds beyond those it had before wrk began: its
#     share of the connections (keep-alive; with Connection: close, a snapshot).
#   - a throughput run: plain wrk against GET / (no Lua, which slows wrk): req/s, and
#     the server's CPU time (master and workers, user + system, from /proc/PID/stat)
#     and context switches (/proc/PID/status) per request: on 2 cores, where wrk takes
#     one, req/s mostly measures the machine.
# Installs wrk (Debian package) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/bench-common.sh

ROUNDS=${ROUNDS:-3}
SCENARIOS=${SCENARIOS:-"2,1,4 4,2,64"}
MODES=${MODES:-"keepalive close"}
DURATION=${DURATION:-5}
PORT=${PORT:-18090}
BASELINE=${BASELINE:-}
CONTENDERS=${CONTENDERS:-"shared reuse-port"}

if ! command -v wrk >/dev/null 2>&1; then
  echo "installing wrk (Debian package)"
  apt-get install -y wrk >/dev/null 2>&1 ||
    (apt-get update >/dev/null 2>&1 && apt-get install -y wrk >/dev/null 2>&1)
fi

cargo build --release -q -p forkloop-cli
THIS="${CARGO_TARGET_DIR:-target}/release/forkloop"
BINS=() NAMES=() FLAGS=()
if [ -n "$BASELINE" ]; then
  BINS+=("$BASELINE") NAMES+=(baseline) FLAGS+=("")
fi
for contender in $CONTENDERS; do
  BINS+=("$THIS") NAMES+=("$contender")
  case $contender in
    shared) FLAGS+=("") ;;
    reuse-port) FLAGS+=(--reuse-port) ;;
    *) echo "unknown contender $contender" >&2; exit 1 ;;
  esac
done

WORK=$(mktemp -d)
trap 'kill -9 $(cat "$WORK"/*.pid 2>/dev/null) 2>/dev/null || true; rm -rf "$WORK"' EXIT

# wrk runs one Lua state per thread: each counts, `done` adds up the threads' tables.
cat >"$WORK/count.lua" <<'LUA'
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) counts = {} end
function response(status, headers, body) counts[body] = (counts[body] or 0) + 1 end
function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for pid, n in pairs(t:get("counts")) do total[pid] = (total[pid] or 0) + n end
  end
  for pid, n in pairs(total) do io.write(string.format("worker %s %d\n", pid, n)) end
end
LUA


# start BIN WORKERS [FLAG]: a server whose every worker has started (so that none is
# still starting when wrk begins).
start() {
  "$1" serve --listen "127.0.0.1:$PORT" --workers "$2" --pid-file "$WORK/server.pid" \
    ${3:+"$3"} 2>"$WORK/server.log" &
  wait_port "$PORT"
  local master
  master=$(cat "$WORK/server.pid")
  for _ in $(seq 1 200); do
    [ "$(wc -w <"/proc/$master/task/$master/children")" -ge "$2" ] && return 0
    sleep 0.05
  done
  echo "the server did not start $2 workers" >&2
  exit 1
}

stop() {
  local master
  master=$(cat "$WORK/server.pid")
  kill -TERM "$master"
  while kill -0 "$master" 2>/dev/null; do sleep 0.05; done
  rm -f "$WORK/server.pid"
}

fds() { # PID...: how many fds each has open
  for pid in "$@"; do ls "/proc/$pid/fd" | wc -l; done | xargs
}

ticks() { # PID...: their utime + stime, in clock ticks
  for pid in "$@"; do awk '{print $14 + $15}' "/proc/$pid/stat"; done | awk '{s += $1} END {print s}'
}

switches() { # PID...: their context switches, voluntary and not
  cat $(printf '/proc/%s/status ' "$@") | awk '/ctxt_switches/ {s += $2} END {print s}'
}

# measure BIN FLAG WORKERS THREADS CONNECTIONS MODE -> one line of the table
measure() {
  local bin=$1 flag=$2 workers=$3 threads=$4 conns=$5 mode=$6 header=() master pids before during
  [ "$mode" = close ] && header=(-H "Connection: close")
  start "$bin" "$workers" "$flag"
  master=$(cat "$WORK/server.pid")
  pids=$(cat "/proc/$master/task/$master/children")
  before=$(fds $pids)
  wrk -t"$threads" -c"$conns" -d"${DURATION}s" "${header[@]}" -s "$WORK/count.lua" \
    "http://127.0.0.1:$PORT/pid" >"$WORK/counted" &
  sleep 1
  during=$(fds $pids)
  wait $!
  local cpu_before cpu_after cs_before cs_after
  cpu_before=$(ticks "$master" $pids)
  cs_before=$(switches "$master" $pids)
  wrk -t"$threads" -c"$conns" -d"${DURATION}s" "${header[@]}" "http://127.0.0.1:$PORT/" \
    >"$WORK/plain"
  cpu_after=$(ticks "$master" $pids)
  cs_after=$(switches "$master" $pids)
  stop
  python3 - "$pids" "$before" "$during" "$WORK" "$((cpu_after - cpu_before))" "$(getconf CLK_TCK)" \
    "$((cs_after - cs_before))" <<'PY'
import re, sys
pids, before, during = (a.split() for a in sys.argv[1:4])
cpu_ticks, hz, cs = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
counted, plain = (open(f"{sys.argv[4]}/{f}").read() for f in ("counted", "plain"))
per = {pid: 0 for pid in pids}
for pid, n in re.findall(r"^worker (\d+) (\d+)$", counted, re.M):
    per[pid] = per.get(pid, 0) + int(n)
# Each worker's requests with its connections, most requests first.
rows = sorted(((per[p], int(d) - int(b)) for p, b, d in zip(pids, before, during)), reverse=True)
total = sum(r for r, _ in rows)
ratio = f"{rows[0][0] / rows[-1][0]:.2f}" if rows[-1][0] else "inf"
share = f"{100 * rows[0][0] / max(total, 1):.0f}%"
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", plain).group(1))
done = int(re.search(r"(\d+) requests in", plain).group(1))
cpu_us = cpu_ticks / hz * 1e6 / max(done, 1)
cs_per = cs / max(done, 1)
bad = " ".join(m.group(0) for m in re.finditer(r"(Socket errors: .*|Non-2xx or 3xx responses: \d+)", counted + plain))
cells = " ".join(f"{r}({c})" for r, c in rows)
print(f"{cells:<48} {ratio:>7} {share:>6} {rps:>9.0f} {cpu_us:>10.1f} {cs_per:>7.2f}   {bad}".rstrip())
PY
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -sr)"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-5s %-10s %-22s %-10s %-48s %7s %6s %9s %10s %7s\n' \
  round binary scenario mode "requests(connections) per worker" max/min max% req/s cpu_us/req cs/req
for round in $(seq 1 "$ROUNDS"); do
  for scenario in $SCENARIOS; do
    IFS=, read -r workers threads conns <<<"$scenario"
    for mode in $MODES; do
      for i in "${!BINS[@]}"; do
        line=$(measure "${BINS[$i]}" "${FLAGS[$i]}" "$workers" "$threads" "$conns" "$mode")
        printf '%-5s %-10s %-22s %-10s %s\n' "$round" "${NAMES[$i]}" \
          "$workers workers, -t$threads -c$conns" "$mode" "$line"
      done
    done
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
