#!/usr/bin/env bash
# The time-to-first-token cost of the quality guard's `stream = "hold"`, measured: the daemon
# (release build) serves the embedded default, with a scripted cloud so the guard is on, and
# threshold 0 so every answer passes (what is measured is the hold, not an escalation).
# Streams alternate `x-wattgate-guard: check` and `off` on the same prompts.
#
#   scripts/guard_ttft.sh [N=10] [MAX_TOKENS=128]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p wattgate -p wattgate-testkit --bins
source scripts/lib.sh
CLOUD_PORT=$(free_port); GW_PORT=$(free_port)
run_bg target/release/wattgate-upstream --listen "127.0.0.1:$CLOUD_PORT" --model cloud --reply "cloud answer" >/dev/null
cat >"$work/guard.toml" <<TOML
[server]
listen = "127.0.0.1:$GW_PORT"
# Every request local (the measurement is of the local path), not routed by the default policy.
[routing]
policy = "prefer_local"
[ledger]
enabled = false
[guard]
threshold = 0.0

[[backends]]
name = "gemma-3-270m"
kind = "embedded"
role = "local"
model = "gemma-3-270m"
parameters = 268e6
workers = 1

[[backends]]
name = "cloud"
kind = "openai"
role = "cloud"
base_url = "http://127.0.0.1:$CLOUD_PORT/v1"
model = "cloud"
parameters = 1e11
TOML
WATTGATE_LOG=warn run_bg target/release/wattgate serve --config "$work/guard.toml"
python3 scripts/wait_http.py "http://127.0.0.1:$GW_PORT/healthz" 120
python3 scripts/guard_ttft.py "http://127.0.0.1:$GW_PORT/v1" "${1:-10}" "${2:-128}"
