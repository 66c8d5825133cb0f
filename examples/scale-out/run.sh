#!/usr/bin/env bash
# Start Redis, N mcpopt replicas and HAProxy on this machine (Ctrl-C stops everything).
#
#   examples/scale-out/run.sh [N]        # N replicas (default 3; haproxy.cfg lists three)
#
# Clients connect to http://127.0.0.1:${LB_PORT:-8080}/mcp with `Authorization: Bearer <key>`
# (the key is printed below, or set MCPOPT_API_KEYS / MCPOPT_CLIENT_KEY yourself).
# Try: SIGTERM one replica (kill -TERM <pid>): it drains (health 503, in-flight calls finish) and
# exits; SIGKILL one: clients go on through the others, sessions included.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=examples/scale-out
N=${1:-3}
LB_PORT=${LB_PORT:-8080}
REDIS_PORT=${REDIS_PORT:-6390}
BASE_PORT=${BASE_PORT:-8081}
RUN=${RUN_DIR:-$(mktemp -d /tmp/mcpopt-scale-out.XXXXXX)}
MCPOPT=${MCPOPT:-$(command -v mcpopt || echo .venv/bin/mcpopt)}
[ -x .servers/py/bin/mcp-server-time ] && export MCPOPT_TIME_SERVER=$PWD/.servers/py/bin/mcp-server-time
export MCPOPT_MEMORY_FILE=${MCPOPT_MEMORY_FILE:-$RUN/memory.jsonl}
REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
export MCPOPT_GATEWAY__SHARED__REDIS_URL=$REDIS_URL MCPOPT_GATEWAY__CACHE__REDIS_URL=$REDIS_URL
export MCPOPT_GATEWAY__LIMITS__STORAGE=$REDIS_URL
export MCPOPT_GATEWAY__AUTH__RESOURCE=http://127.0.0.1:$LB_PORT/mcp

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

new_key() {  # prints "<key> <line>"
  "$MCPOPT" auth new-key "$1" 2>&1 | awk 'NR==2{k=$1} NR==4{l=$0} END{print k" "l}'
}
if [ -z "${MCPOPT_API_KEYS:-}" ]; then
  read -r CLIENT_KEY CLIENT_LINE < <(new_key client)
  read -r HEALTH_KEY HEALTH_LINE < <(new_key health)
  export MCPOPT_API_KEYS="$CLIENT_LINE,$HEALTH_LINE"
  echo "client API key: $CLIENT_KEY"
fi
export MCPOPT_HEALTH_KEY=${MCPOPT_HEALTH_KEY:-${HEALTH_KEY:-}}

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$RUN" >"$RUN/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

for i in $(seq 1 "$N"); do
  port=$((BASE_PORT + i - 1))
  MCPOPT_GATEWAY__SHARED__REPLICA=r$i "$MCPOPT" serve -c $HERE/replicas.yaml -t http --host 127.0.0.1 --port "$port" \
    >"$RUN/r$i.log" 2>&1 &
  pids+=($!)
  export "MCPOPT_R$i=127.0.0.1:$port"
  echo "replica r$i: pid $! port $port (log $RUN/r$i.log)"
done
for i in $(seq 1 "$N"); do   # ready = /healthz 200 (its MCP servers are up)
  port=$((BASE_PORT + i - 1))
  for _ in $(seq 600); do
    curl -fs -H "Authorization: Bearer $MCPOPT_HEALTH_KEY" "http://127.0.0.1:$port/healthz" >/dev/null && break
    sleep 0.1
  done
done
for i in $(seq "$((N + 1))" 3); do export "MCPOPT_R$i=127.0.0.1:1"; done   # unused slots: down, never chosen

export MCPOPT_LB_BIND=127.0.0.1:$LB_PORT
haproxy -f $HERE/haproxy.cfg -db >"$RUN/haproxy.log" 2>&1 &
lb=$!
pids+=($lb)
echo "HAProxy: pid $lb -> http://127.0.0.1:$LB_PORT/mcp (logs in $RUN)"
wait "$lb"   # a replica that exits (killed, drained) leaves the rest running
