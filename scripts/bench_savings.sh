#!/usr/bin/env bash
# /v1/savings over a large ledger: builds one of ROWS rows spread over 90 days (once, cached in
# target/bench-ledger-ROWS.redb), starts the release daemon on it, and times
# `GET /v1/savings?since=90d` and `GET /v1/savings/series?since=24h&step=1h`, with the daemon's
# resident memory before and its peak (VmHWM) after each call.
#
#   scripts/bench_savings.sh [ROWS=5000000]
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-5000000}
cargo build --release -q -p wattgate --bins --example make_ledger
BIN=target/release
ledger="target/bench-ledger-$rows.redb"
[ -f "$ledger" ] || "$BIN/examples/make_ledger" "$ledger" "$rows" 90
source scripts/lib.sh
port=$(free_port)
cat >"$work/wattgate.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[ledger]
path = "$(pwd)/$ledger"
retention_days = 0
max_rows = 0
[[backends]]
name = "gemma"
kind = "openai"
role = "local"
base_url = "http://127.0.0.1:9/v1"
model = "gemma"
parameters = 2.7e8
TOML
WATTGATE_LOG=warn "$BIN/wattgate" serve --config "$work/wattgate.toml" & pid=$!
_wattgate_pids+=($pid)
python3 scripts/wait_http.py "http://127.0.0.1:$port/healthz" 120
kb() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$pid/status"; }
for q in "/v1/savings?since=90d" "/v1/savings/series?since=24h&step=1h" "/v1/savings?since=90d"; do
  before=$(kb VmRSS); hwm_before=$(kb VmHWM)
  t=$(curl -s -o "$work/out.json" -w '%{time_total}' "http://127.0.0.1:$port$q")
  hwm=$(kb VmHWM)
  python3 - "$q" "$t" "$before" "$hwm_before" "$hwm" "$work/out.json" <<'PY'
import json, sys
q, t, rss, hwm0, hwm, out = sys.argv[1:]
body = json.load(open(out))
n = body.get("savings", {}).get("total", {}).get("requests")
if n is None:
    n = sum(b["requests"] for b in body.get("buckets", []))
print(f"{q:42} {float(t):7.3f} s  rows counted {n:>9}  RSS before {int(rss)/1024:6.1f} MB  peak {int(hwm)/1024:6.1f} MB (peak before {int(hwm0)/1024:6.1f} MB)")
PY
done
