#!/usr/bin/env bash
# A local multi-node Ray cluster on this machine for development: one head and N worker
# nodes, each a separate `ray start` (its own raylet, object store and CPUs), like the nodes
# of a real cluster. Token authentication is on (Ray 2.60's default for local clusters).
# Nodes are started on 127.0.0.1, but Ray on Linux registers them under the machine's own
# address when it has one (`ray status` shows it); their traffic never leaves the machine.
#
#   cluster/local.sh start [N_WORKER_NODES]   # default 1 worker node
#   cluster/local.sh add [N_WORKER_NODES]     # more worker nodes for a running cluster
#   cluster/local.sh kill NODE                # SIGKILL a node (e.g. worker1): a node failure
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
#   RAY_health_check_period_ms, RAY_health_check_failure_threshold
#                      how soon the head declares a lost node dead: after about period x
#                      threshold (default 1000 x 5: 5 s; Ray's own defaults take 15 s)
#   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S  how long a node drains on `stop` (default 0 here:
#                      nothing on a dev cluster needs it, and the head would wait out 30 s)
#   RAY_agent_register_timeout_ms  how long a raylet waits for its dashboard agent (default
#                      120000 here; Ray's 30 s is too short on a busy machine)
#   START_TRIES        how often a node that did not start is started again (default 2)
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
# Read by every node's Ray processes at start (the head's GCS does the health checks).
export RAY_health_check_period_ms="${RAY_health_check_period_ms:-1000}"
export RAY_health_check_failure_threshold="${RAY_health_check_failure_threshold:-5}"
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
# How long a raylet waits for its node's dashboard agent (Ray's default, 30 s, is too short
# for a busy 2-core machine: the raylet then aborts).
export RAY_agent_register_timeout_ms="${RAY_agent_register_timeout_ms:-120000}"
START_TRIES="${START_TRIES:-2}"
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
# children. On a machine too busy for Ray's fixed start-up timeouts (the raylet waits 30 s
# for the GCS to list it), the node is started again, up to START_TRIES times.
start_node() {
  local name="$1"; shift
  local try pid
  for ((try = 1; try <= START_TRIES; try++)); do
    if start_node_once "$name" "$@"; then
      echo "started $name (pid $(cat "$DIR/$name.pid"))"
      return 0
    fi
    echo "local.sh: node $name did not start (try $try of $START_TRIES); its log," \
      "$DIR/$name.log, ends with:" >&2
    tail -n 20 "$DIR/$name.log" >&2
    end_group "$(cat "$DIR/$name.pid")"
    for pid in $(leftovers "$DIR/$name/"); do kill -KILL "$pid" 2>/dev/null || true; done
  done
  return 1
}

start_node_once() {
  local name="$1"; shift
  mkdir -p "$DIR/$name"
  setsid "$RAY" start --block --disable-usage-stats --node-ip-address 127.0.0.1 \
    --temp-dir "$DIR/$name" "$@" >"$DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$DIR/$name.pid"
  local waited=0
  until grep -q "Ray runtime started" "$DIR/$name.log"; do
    if ! kill -0 "$(cat "$DIR/$name.pid")" 2>/dev/null || (( waited >= 180 )); then
      return 1
    fi
    sleep 1; waited=$((waited + 1))
  done
}

# SIGTERM for a process group, SIGKILL after 30 s.
end_group() {
  local pid="$1"
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
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
  add_workers "$n"
  print_env
}

# Start N more worker nodes, numbered after the highest existing one (dead ones included).
add_workers() {
  local n="${1:-1}" last=0 f i
  shopt -s nullglob
  for f in "$DIR"/worker*.pid; do
    i="${f##*/worker}"; i="${i%.pid}"
    (( i > last )) && last="$i"
  done
  for ((i = last + 1; i <= last + n; i++)); do
    # shellcheck disable=SC2046  # node_ports prints flags meant to split
    start_node "worker$i" --address "127.0.0.1:$(cat "$DIR/gcs_port")" \
      --num-cpus "$WORKER_CPUS" $(node_ports)
  done
}

cmd_add() {
  if ! [[ -f "$DIR/head.pid" ]] || ! kill -0 "$(cat "$DIR/head.pid")" 2>/dev/null; then
    echo "local.sh: no running cluster in $DIR; run '$0 start' first" >&2
    exit 1
  fi
  setup_auth
  add_workers "${1:-1}"
}

# A node failure, as a crash or power loss would be: SIGKILL for the node's whole process
# group and for any of its processes that left the group (no draining, no goodbye to the
# head, which notices from its health checks). The pid file stays: `status` shows it dead.
cmd_kill() {
  local name="${1:-}" pid
  if [[ -z "$name" || ! -f "$DIR/$name.pid" ]]; then
    echo "local.sh: usage: $0 kill NODE, where NODE is a node of '$0 status' (e.g. worker1)" >&2
    exit 2
  fi
  pid="$(cat "$DIR/$name.pid")"
  kill -KILL -- "-$pid" 2>/dev/null || true
  for pid in $(leftovers "$DIR/$name/"); do kill -KILL "$pid" 2>/dev/null || true; done
  echo "killed $name"
}

# Every process still holding this cluster's temp dir (or the folder given) in its command
# line (workers that left their group); the path is unique to this cluster.
leftovers() {
  local pid dir="${1:-$DIR/}"
  for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    if { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "$dir"; then echo "$pid"; fi
  done
}

cmd_stop() {
  local f pid
  shopt -s nullglob
  # Worker nodes first, then the head.
  for f in "$DIR"/worker*.pid "$DIR"/head.pid; do
    end_group "$(cat "$f")"
    rm -f "$f"
    echo "stopped $(basename "$f" .pid)"
  done
  for pid in $(leftovers); do kill -KILL "$pid" 2>/dev/null || true; done
}

cmd_status() {
  local f pid
  shopt -s nullglob
  local files=("$DIR"/head.pi[d] "$DIR"/worker*.pid)
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
  add) shift; cmd_add "$@" ;;
  kill) shift; cmd_kill "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
