# Helpers the bench scripts share (sourced, not run).

# wait_port PORT: returns once something accepts on 127.0.0.1:PORT, exits after 10 s.
wait_port() {
  for _ in $(seq 1 200); do
    if python3 -c "import socket; socket.create_connection(('127.0.0.1', $1), 0.1)" 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2
  exit 1
}
