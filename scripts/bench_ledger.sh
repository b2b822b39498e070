#!/usr/bin/env bash
# The ledger's cost to the request path: two daemons from the same release build, one with the
# ledger on and one with it off, side by side in front of one instant loopback upstream, router
# on (policy = "router", a local and a cloud backend), measured alternately with wrk at one
# connection (and 16), so the ratio is from one run on one machine.
#
#   scripts/bench_ledger.sh [ROUNDS] [SECONDS]      (defaults: 3 rounds of 10 s)
#
# Needs wrk (apt install wrk). Everything runs on 127.0.0.1 and shares the machine's cores.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-10}
command -v wrk >/dev/null || { echo "wrk is needed (apt install wrk)" >&2; exit 1; }

cargo build --release -q -p wattgate -p wattgate-testkit --bins
BIN=target/release
source scripts/lib.sh
LOCAL_PORT=$(free_port); CLOUD_PORT=$(free_port)
run_bg "$BIN/wattgate-upstream" --listen "127.0.0.1:$LOCAL_PORT" --model local --reply "ok" >/dev/null
run_bg "$BIN/wattgate-upstream" --listen "127.0.0.1:$CLOUD_PORT" --model cloud --reply "ok" >/dev/null
start_gateway() { # NAME LEDGER_ENABLED -> sets port_NAME
  local port; port=$(free_port)
  cat >"$work/$1.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[routing]
policy = "router"
router_dir = "$(pwd)/router-models"
[ledger]
enabled = $2
path = "$work/$1.redb"
[[backends]]
name = "local"
kind = "openai"
role = "local"
base_url = "http://127.0.0.1:$LOCAL_PORT/v1"
model = "local"
parameters = 1e9
router = "gemma-3-270m"
[[backends]]
name = "cloud"
kind = "openai"
role = "cloud"
base_url = "http://127.0.0.1:$CLOUD_PORT/v1"
model = "cloud"
parameters = 1e11
usd_per_million_input_tokens = 2.0
usd_per_million_output_tokens = 8.0
TOML
  WATTGATE_LOG=warn run_bg "$BIN/wattgate" serve --config "$work/$1.toml"
  python3 scripts/wait_http.py "http://127.0.0.1:$port/healthz" 20
  printf -v "port_$1" '%s' "$port"
}
start_gateway on true
start_gateway off false

cat >"$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"auto","messages":[{"role":"user","content":"What is the capital of France?"}]}'
LUA

results=()
for round in $(seq "$rounds"); do
  for side in off on; do
    port_var="port_$side"; port=${!port_var}
    for c in 1 16; do
      line=$(wrk_json "$side" "$c" "$port"); echo "round $round $line"; results+=("$line")
    done
  done
done
rows=$(curl -s "http://127.0.0.1:$port_on/metrics" | awk '/^wattgate_ledger_rows_total\{result="queued"\}/ {print $2}')
dropped=$(curl -s "http://127.0.0.1:$port_on/metrics" | awk '/^wattgate_ledger_rows_dropped_total/ {print $2}')
routed=$(curl -s "http://127.0.0.1:$port_on/metrics" | grep -c 'reason="router_' || true)

python3 - "$rows" "$dropped" "$routed" "${results[@]}" <<'PY'
import json, statistics, sys
rows_queued, dropped, routed = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [json.loads(a) for a in sys.argv[4:]]
def pick(side, c):
    return [r for r in rows if r["label"] == side and r["connections"] == c]
print()
print(f"{'':34}{'ledger off':>12}{'ledger on':>12}{'on/off':>9}")
for c in (1, 16):
    for key, name in (("rps", "requests/s"), ("p50", "p50 ms"), ("p90", "p90 ms"), ("p99", "p99 ms")):
        off = statistics.median(r[key] for r in pick("off", c))
        on = statistics.median(r[key] for r in pick("on", c))
        print(f"wrk {c:>2} connection(s), {name:<14}{off:>12.3f}{on:>12.3f}{on / off:>9.2f}")
# The machine's own noise moves both sides' tails from round to round (the ledger-off side
# alone has ranged 0.6-2.7 ms), so the ratio is also given per round, each from two adjacent
# runs (off, then on).
per_round = [on["p99"] / off["p99"] for off, on in zip(pick("off", 1), pick("on", 1))]
print("p99 on/off at 1 connection, per round:", " ".join(f"{r:.2f}" for r in per_round),
      f"(median {statistics.median(per_round):.2f})")
errors = sum(r["errors"] for r in rows)
print(f"errors: {errors}; medians of {len(pick('on', 1))} rounds, alternating off/on")
print(f"ledger rows queued {rows_queued}, dropped {dropped or 0}; router reasons seen in /metrics: {routed}")
PY
