#!/usr/bin/env bash
# Gateway overhead against an instant loopback upstream, next to the same load sent straight to
# that upstream, measured in one run on this machine.
#
#   scripts/bench_overhead.sh [RATE] [SECONDS]      (defaults: 2000 requests/s, 10 s)
#
# Prints one JSON line per phase and a summary table. Everything runs on 127.0.0.1; the load
# generator, the upstream and the gateway share the machine's cores, as they would in a
# single-host deployment.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-2000}
SECS=${2:-10}
PROMPTS=../shared/data/traffic/chat-prompts.jsonl

cargo build --release -q -p wattgate -p wattgate-testkit --bins
BIN=target/release
source scripts/lib.sh
UP_PORT=$(free_port); GW_PORT=$(free_port)
run_bg "$BIN/wattgate-upstream" --listen "127.0.0.1:$UP_PORT" --model instant --reply "ok" >/dev/null
cat >"$work/wattgate.toml" <<TOML
[server]
listen = "127.0.0.1:$GW_PORT"
[ledger]
path = "$work/ledger.redb"
[[backends]]
name = "instant"
kind = "openai"
role = "local"
base_url = "http://127.0.0.1:$UP_PORT/v1"
model = "instant"
parameters = 1e9
TOML
WATTGATE_LOG=warn run_bg "$BIN/wattgate" serve --config "$work/wattgate.toml"
python3 scripts/wait_http.py "http://127.0.0.1:$GW_PORT/healthz" 20

prompts_arg=()
[ -f "$PROMPTS" ] && prompts_arg=(--prompts "$PROMPTS")
load() { "$BIN/wattgate-loadgen" "${prompts_arg[@]}" --duration "$SECS" "$@"; }

direct_open=$(load --label direct --url "http://127.0.0.1:$UP_PORT/v1/chat/completions" --rate "$RATE")
echo "$direct_open"
gateway_open=$(load --label gateway --url "http://127.0.0.1:$GW_PORT/v1/chat/completions" --rate "$RATE")
echo "$gateway_open"
direct_max=$(load --label direct-max --url "http://127.0.0.1:$UP_PORT/v1/chat/completions" --concurrency 32)
echo "$direct_max"
gateway_max=$(load --label gateway-max --url "http://127.0.0.1:$GW_PORT/v1/chat/completions" --concurrency 32)
echo "$gateway_max"

python3 - "$direct_open" "$gateway_open" "$direct_max" "$gateway_max" <<'PY'
import json, sys
d, g, dm, gm = (json.loads(a) for a in sys.argv[1:])
print()
print(f"{'':28}{'direct':>12}{'via gateway':>14}{'added':>10}")
for q in ("p50", "p99"):
    a, b = d["latency_ms"][q], g["latency_ms"][q]
    print(f"latency {q} at {d['target_rps']} rps (ms){a:>12.3f}{b:>14.3f}{b - a:>10.3f}")
print(f"achieved rps (open loop)    {d['achieved_rps']:>12.0f}{g['achieved_rps']:>14.0f}")
print(f"errors                      {d['errors']:>12}{g['errors']:>14}")
print(f"max rps (closed loop, 32)   {dm['achieved_rps']:>12.0f}{gm['achieved_rps']:>14.0f}   ratio {gm['achieved_rps'] / dm['achieved_rps']:.2f}")
o = g["reported_overhead_ms"] or {}
print(f"gateway-reported overhead (x-wattgate-overhead-ms): p50 {o.get('p50', float('nan')):.3f} ms, p99 {o.get('p99', float('nan')):.3f} ms")
ok = o.get("p99", 99) < 1.0 and g["errors"] == 0
print("target p99 overhead < 1 ms at", d["target_rps"], "rps:", "MET" if ok else "MISSED")
PY
