#!/usr/bin/env bash
# A local multi-node Ray cluster on 127.0.0.1 for development: one head and N worker nodes,
# each a separate `ray start` (its own raylet, object store and CPUs), like the nodes of a
# real cluster. Token authentication is on (Ray 2.60's default for local clusters).
#
#   cluster/local.sh start [N_WORKER_NODES]   # default 1 worker node
#   cluster/local.sh status
#   cluster/local.sh stop
#
# Settings (environment):
#   OSMD_CLUSTER_DIR   state, logs and Ray temp dirs (default /tmp/osmd-cluster-$USER)
#   HEAD_CPUS          logical CPUs of the head (default 2: the job driver and Ray Data)
#   WORKER_CPUS        logical CPUs of each worker node (default 2)
#   RAY                the ray executable (default: .venv/bin/ray if present, else ray)
#   RAY_AUTH_TOKEN_PATH  token file (default ~/.ray/auth_token, made by
#                      `ray get-auth-token --generate` when missing)
#
# `stop` ends only the processes this script started (each node runs in its own process
# group, recorded in $OSMD_CLUSTER_DIR); it never calls `ray stop`, which would end every
# Ray instance on the machine.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${OSMD_CLUSTER_DIR:-/tmp/osmd-cluster-${USER:-$(id -un)}}"
HEAD_CPUS="${HEAD_CPUS:-2}"
WORKER_CPUS="${WORKER_CPUS:-2}"
if [[ -z "${RAY:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/ray" ]]; then RAY="$REPO/.venv/bin/ray"; else RAY=ray; fi
fi
PYTHON="$(dirname "$(command -v "$RAY")")/python"
[[ -x "$PYTHON" ]] || PYTHON=python3
# A job's entrypoint (`python jobs/train.py`) runs with the PATH of the node that runs it:
# put Ray's own environment (e.g. .venv/bin) first, as an activated venv would.
export PATH="$(dirname "$(command -v "$RAY")"):$PATH"

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Every port a node would otherwise take from a fixed default (6379, 8265, 10001, 52365, ...)
# is chosen free, so the cluster runs beside other Ray instances on the same machine.
node_ports() {
  echo --node-manager-port "$(free_port)" --object-manager-port "$(free_port)" \
    --dashboard-agent-listen-port "$(free_port)" --dashboard-agent-grpc-port "$(free_port)" \
    --runtime-env-agent-port "$(free_port)" --metrics-export-port "$(free_port)"
}

# Start one node in its own session (setsid), so `stop` can end exactly its process group.
# --block keeps `ray start` in the foreground as the group's leader; Ray's processes are its
# children.
start_node() {
  local name="$1"; shift
  mkdir -p "$DIR/$name"
  setsid "$RAY" start --block --disable-usage-stats --node-ip-address 127.0.0.1 \
    --temp-dir "$DIR/$name" "$@" >"$DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$DIR/$name.pid"
  local waited=0
  until grep -q "Ray runtime started" "$DIR/$name.log"; do
    if ! kill -0 "$(cat "$DIR/$name.pid")" 2>/dev/null || (( waited >= 180 )); then
      echo "local.sh: node $name did not start; its log, $DIR/$name.log, ends with:" >&2
      tail -n 20 "$DIR/$name.log" >&2
      exit 1
    fi
    sleep 1; waited=$((waited + 1))
  done
  echo "started $name (pid $(cat "$DIR/$name.pid"))"
}

setup_auth() {
  export RAY_AUTH_MODE=token
  local token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  if [[ ! -s "$token_file" ]]; then
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
      mkdir -p "$(dirname "$token_file")"
      (umask 077; "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$token_file")
    else
      "$RAY" get-auth-token --generate >/dev/null
    fi
  fi
}

print_env() {
  local dash
  dash="$(cat "$DIR/dashboard_port")"
  echo "export RAY_ADDRESS=http://127.0.0.1:$dash"
  echo "export RAY_AUTH_MODE=token"
  [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]] && echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
  echo "# jobs:      ray job submit --working-dir . -- python jobs/train.py --config configs/osmd_synth.yaml --out $DIR/runs/a"
  echo "# dashboard: http://127.0.0.1:$dash (token: ray get-auth-token)"
  echo "# drivers in this shell (osmd train) may use RAY_ADDRESS=127.0.0.1:$(cat "$DIR/gcs_port")"
}

cmd_start() {
  local n="${1:-1}"
  if [[ -f "$DIR/head.pid" ]] && kill -0 "$(cat "$DIR/head.pid")" 2>/dev/null; then
    echo "local.sh: a cluster is already running from $DIR; run '$0 stop' first" >&2
    exit 1
  fi
  mkdir -p "$DIR"
  setup_auth
  local gcs dash
  gcs="$(free_port)"; dash="$(free_port)"
  echo "$gcs" >"$DIR/gcs_port"; echo "$dash" >"$DIR/dashboard_port"
  # shellcheck disable=SC2046  # node_ports prints flags meant to split
  start_node head --head --port "$gcs" --dashboard-host 127.0.0.1 --dashboard-port "$dash" \
    --num-cpus "$HEAD_CPUS" $(node_ports)
  for ((i = 1; i <= n; i++)); do
    # shellcheck disable=SC2046
    start_node "worker$i" --address "127.0.0.1:$gcs" --num-cpus "$WORKER_CPUS" $(node_ports)
  done
  print_env
}

# Every process still holding this cluster's temp dir in its command line (workers that
# left their group); the path is unique to this cluster.
leftovers() {
  local pid
  for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    if { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "$DIR/"; then echo "$pid"; fi
  done
}

cmd_stop() {
  local f pid
  shopt -s nullglob
  # Worker nodes first, then the head.
  for f in "$DIR"/worker*.pid "$DIR"/head.pid; do
    pid="$(cat "$f")"
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$f"
    echo "stopped $(basename "$f" .pid)"
  done
  for pid in $(leftovers); do kill -KILL "$pid" 2>/dev/null || true; done
}

cmd_status() {
  local f pid
  shopt -s nullglob
  local files=("$DIR"/head.pid "$DIR"/worker*.pid)
  if (( ${#files[@]} == 0 )); then echo "no cluster in $DIR"; exit 1; fi
  for f in "${files[@]}"; do
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then state=running; else state=dead; fi
    echo "$(basename "$f" .pid): pid $pid $state"
  done
  RAY_AUTH_MODE=token "$RAY" status --address "127.0.0.1:$(cat "$DIR/gcs_port")" || true
  print_env
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
