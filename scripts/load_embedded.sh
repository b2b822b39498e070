#!/usr/bin/env bash
# Load test of the embedded model's continuous batching: CLIENTS concurrent streaming clients
# (official Python `openai` package) against the real gateway with the embedded Gemma 3 270M on
# one worker running up to MAX_BATCH requests together, a queue of QUEUE_DEPTH and a queue
# deadline of QUEUE_TIMEOUT_S, and a scripted cloud upstream on loopback. Checks that no request
# is lost, that the excess goes to the cloud with reason `local_busy`, and that no request waited
# longer than the queue deadline. MAX_BATCH=1 is the worker that ran one request at a time.
#
#   scripts/load_embedded.sh [CLIENTS=8] [REQUESTS_PER_CLIENT=4] [MAX_BATCH=8] [QUEUE_DEPTH=2] [QUEUE_TIMEOUT_S=3]
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${1:-8}; PER_CLIENT=${2:-4}; MAX_BATCH=${3:-8}; DEPTH=${4:-2}; QUEUE_TIMEOUT=${5:-3}

cargo build -q --release -p wattgate -p wattgate-testkit --bins
BIN=target/release
"$BIN/wattgate" models pull >/dev/null
source scripts/lib.sh
openai_venv
CLOUD_PORT=$(free_port); GW_PORT=$(free_port)
run_bg "$BIN/wattgate-upstream" --listen "127.0.0.1:$CLOUD_PORT" --model cloud-model \
  --reply "The cloud model answers this one because every local worker is busy." >/dev/null
cat >"$work/wattgate.toml" <<TOML
[server]
listen = "127.0.0.1:$GW_PORT"
# Every request local (the measurement is of the local path), not routed by the default policy.
[routing]
policy = "prefer_local"
[ledger]
path = "$work/ledger.redb"

[[backends]]
name = "gemma"
kind = "embedded"
role = "local"
model = "gemma-3-270m"
parameters = 268e6
workers = 1
max_batch = $MAX_BATCH
queue_depth = $DEPTH
queue_timeout_s = $QUEUE_TIMEOUT

[[backends]]
name = "cloud"
kind = "openai"
role = "cloud"
base_url = "http://127.0.0.1:$CLOUD_PORT/v1"
model = "cloud-model"
parameters = 1e11
TOML
WATTGATE_LOG=error run_bg "$BIN/wattgate" serve --config "$work/wattgate.toml"
python3 scripts/wait_http.py "http://127.0.0.1:$GW_PORT/readyz" 60 2>/dev/null \
  || python3 scripts/wait_http.py "http://127.0.0.1:$GW_PORT/healthz" 5

"$VENV/bin/python" scripts/load_embedded.py "http://127.0.0.1:$GW_PORT" "$CLIENTS" "$PER_CLIENT" "$QUEUE_TIMEOUT"
