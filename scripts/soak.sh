#!/usr/bin/env bash
# Load and soak on loopback: the release gateway between a scripted local upstream (20 ms per
# answer) and a scripted cloud one (40 ms, priced like gpt-4.1), routed traffic split half local,
# half cloud by an experiment (prefer-local against a cloud-only control), shadow checks on a
# tenth of local answers, the shared chat prompts replayed open-loop. Reports throughput, p50/p99
# latency and gateway overhead, errors (target 0), and the gateway's RSS after start, after a
# warm-up at full rate and at the end (growth over the measured run must stay under 10%).
#
#   scripts/soak.sh [SECONDS=600] [RPS=1000] [WARMUP_SECONDS=60]
#
# The warm-up lets caches (redb's 16 MiB page cache, allocator arenas) reach their working size;
# growth is measured from its end.
#
# Exits non-zero when any request failed or RSS grew by 10% or more.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN=${1:-600}
RPS=${2:-1000}
WARMUP=${3:-60}

cargo build -q --release -p wattgate -p wattgate-testkit --bins
BIN=target/release
source scripts/lib.sh
start_priced_pair 0 0 0 0
GW_PID=${_wattgate_pids[-1]}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$GW_PID/status"; }
prompts=../shared/data/traffic/chat-prompts.jsonl
[ -f "$prompts" ] || prompts=""
load() {
  "$BIN/wattgate-loadgen" --url "http://127.0.0.1:$GW_PORT/v1/chat/completions" --rate "$RPS" \
    --duration "$1" --warmup 0 --label "$2" ${prompts:+--prompts "$prompts"}
}

rss_idle=$(rss_kib)
load "$WARMUP" warmup > "$work/warmup.json"
rss_start=$(rss_kib)
# RSS once a minute during the run, to show the trend rather than two points.
( while sleep 60; do echo "$(date +%s) $(rss_kib)"; done ) > "$work/rss.log" 2>/dev/null &
sampler=$!
cpu_start=$(awk '{print $14 + $15}' "/proc/$GW_PID/stat")
load "$SECONDS_TO_RUN" soak > "$work/soak.json"
cpu_end=$(awk '{print $14 + $15}' "/proc/$GW_PID/stat")
kill "$sampler" 2>/dev/null || true
rss_end=$(rss_kib)
metrics=$(curl -s "http://127.0.0.1:$GW_PORT/metrics")

python3 - "$work/soak.json" "$rss_idle" "$rss_start" "$rss_end" "$work/rss.log" \
  "$cpu_start" "$cpu_end" "$SECONDS_TO_RUN" "$(getconf CLK_TCK)" <<PY
import json, sys
soak = json.load(open(sys.argv[1]))
idle, start, end = (int(x) for x in sys.argv[2:5])
trend = [int(l.split()[1]) for l in open(sys.argv[5]) if l.strip()]
cpu_s = (int(sys.argv[7]) - int(sys.argv[6])) / int(sys.argv[9])
metrics = """$metrics"""
def total(name, match):
    return sum(float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines()
               if l.startswith(name + "{") and all(m in l for m in match))
local = total("wattgate_chat_requests_total", ['route="local"'])
cloud = total("wattgate_chat_requests_total", ['route="cloud"'])
errors_counted = total("wattgate_chat_requests_total", ['outcome="error"'])
growth = (end - start) / start
report = {
    "duration_s": float(sys.argv[8]),
    "target_rps": soak["target_rps"],
    "achieved_rps": round(soak["achieved_rps"], 1),
    "requests": soak["requests"],
    "client_errors": soak["errors"],
    "gateway_error_outcomes": errors_counted,
    "refused_over_concurrency_cap": total("wattgate_rejected_requests_total", ['reason="too_many_concurrent"']),
    "served_local": local, "served_cloud": cloud,
    "latency_ms": soak["latency_ms"],
    "gateway_overhead_ms": soak["reported_overhead_ms"],
    "gateway_cpu_cores": round(cpu_s / float(sys.argv[8]), 3),
    "rss_mib": {"after_start": round(idle / 1024, 1), "after_warmup": round(start / 1024, 1),
                "end": round(end / 1024, 1), "per_minute": [round(x / 1024, 1) for x in trend]},
    "rss_growth_over_run": round(growth, 4),
}
print(json.dumps(report, indent=2))
ok = soak["errors"] == 0 and errors_counted == 0 and growth < 0.10
print("PASS" if ok else "FAIL", "(errors must be 0, RSS growth under 10%)")
sys.exit(0 if ok else 1)
PY
