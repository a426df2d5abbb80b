#!/usr/bin/env bash
# HTTP/1.1 conformance of the real server binary: ci/http-conformance.py sends it fixed
# normal, malformed and request-smuggling requests and lints every response with httplint
# (Mark Nottingham's linter behind REDbot, from PyPI). A finding not accepted in
# ci/http-conformance.expected fails; if httplint cannot be installed, SKIPPED.
#   ci/http-conformance.sh [SERVER_BINARY]   (default target/release/forkloop)
set -euo pipefail
bin=$(realpath -m "${1:-$(dirname "$0")/../target/release/forkloop}")
cd "$(dirname "$0")/.."

# Pinned: a new httplint may add notes, which must not fail CI on its own.
pins="httplint==2026.10.4 thor==0.17.0"
venv=target/http-conformance-venv
skipped() { printf '\n*** SKIPPED: http-conformance: %s ***\n\n' "$*"; exit 0; }

[[ -x $bin ]] || { echo "http-conformance: no server binary at $bin" >&2; exit 1; }
if [[ $(cat "$venv/pins" 2>/dev/null) != "$pins" ]]; then  # cached once installed
  rm -rf "$venv"
  python3 -m venv "$venv" >/dev/null 2>&1 || skipped "python3 -m venv failed (python3-venv?)"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet --disable-pip-version-check $pins >"$venv/pip.log" 2>&1 \
    || skipped "pip could not install $pins: $(tail -n 1 "$venv/pip.log")"
  echo "$pins" >"$venv/pins"
fi

port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
log=$(mktemp)
# Its own session, so the master and its workers are one process group we can end.
setsid "$bin" serve --listen "127.0.0.1:$port" --workers 1 >"$log" 2>&1 &
server=$!
driver=
stop() {
  [[ -z $driver ]] || kill "$driver" 2>/dev/null || true
  kill -TERM "$server" 2>/dev/null || true  # graceful: the master ends its workers
  for _ in $(seq 50); do kill -0 -- "-$server" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  rm -f "$log"
}
trap stop EXIT
trap "exit 143" INT TERM

answers() {
  (exec 3<>"/dev/tcp/127.0.0.1/$port" &&
    printf 'GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3 &&
    IFS= read -r -t 2 line <&3 && [[ $line == "HTTP/1.1 200"* ]]) 2>/dev/null
}
fail() { echo "http-conformance: $*; its output:" >&2; cat "$log" >&2; exit 1; }
deadline=$((SECONDS + 10))
until answers; do
  kill -0 "$server" 2>/dev/null || fail "the server exited"
  ((SECONDS < deadline)) || fail "the server did not answer GET / on port $port within 10 s"
  sleep 0.1
done

# In the background, so that a signal to this script ends the run at once.
"$venv/bin/python" ci/http-conformance.py "127.0.0.1:$port" ci/http-conformance.expected &
driver=$!
wait "$driver"
