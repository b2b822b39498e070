#!/usr/bin/env bash
# The gateway's overhead at an earlier commit and at the working tree, side by side in one run:
# both release daemons in front of the same instant loopback upstream (ledger on), measured
# alternately with wrk at 1 and at 16 connections and with the open-loop load of
# scripts/bench_overhead.sh (2,000 requests/s), so a change to the serving path shows as a ratio
# rather than as two numbers from different days.
#
#   scripts/bench_overhead_vs_commit.sh REV [ROUNDS] [SECONDS]   (defaults: 2 rounds of 10 s)
#
# REV is built in a temporary worktree into target/bench-before (a target directory of its own,
# see scripts/bench_vs_commit.sh for why); BEFORE_BIN=path reuses a daemon built earlier from
# REV. Needs wrk (apt install wrk). Everything runs on 127.0.0.1 and shares the machine's cores.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: scripts/bench_overhead_vs_commit.sh REV [ROUNDS] [SECONDS]}
rounds=${2:-2}
secs=${3:-10}
here=$(pwd)
command -v wrk >/dev/null || { echo "wrk is needed (apt install wrk)" >&2; exit 1; }

cargo build --release -q -p wattgate -p wattgate-testkit --bins
BIN=target/release
after="$here/$BIN/wattgate"
if [ -z "${BEFORE_BIN:-}" ]; then
  tree=$(mktemp -d)/before
  git worktree add --detach "$tree" "$rev" >/dev/null
  (cd "$tree" && CARGO_TARGET_DIR="$here/target/bench-before" cargo build --release -q -p wattgate --bins)
  git worktree remove --force "$tree"
  BEFORE_BIN="$here/target/bench-before/release/wattgate"
fi
cmp -s "$BEFORE_BIN" "$after" && { echo "the two daemons are the same binary" >&2; exit 1; }

source scripts/lib.sh
UP_PORT=$(free_port)
run_bg "$BIN/wattgate-upstream" --listen "127.0.0.1:$UP_PORT" --model instant --reply "ok" >/dev/null
start_gateway() { # NAME BINARY -> sets port_NAME
  local port; port=$(free_port)
  cat >"$work/$1.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[ledger]
path = "$work/$1.redb"
[[backends]]
name = "instant"
kind = "openai"
role = "local"
base_url = "http://127.0.0.1:$UP_PORT/v1"
model = "instant"
parameters = 1e9
TOML
  WATTGATE_LOG=warn run_bg "$2" serve --config "$work/$1.toml"
  python3 scripts/wait_http.py "http://127.0.0.1:$port/healthz" 20
  printf -v "port_$1" '%s' "$port"
}
start_gateway before "$BEFORE_BIN"
start_gateway after "$after"

cat >"$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"instant","messages":[{"role":"user","content":"What is the capital of France?"}]}'
LUA
PROMPTS=../shared/data/traffic/chat-prompts.jsonl
prompts_arg=()
[ -f "$PROMPTS" ] && prompts_arg=(--prompts "$PROMPTS")

results=()
for round in $(seq "$rounds"); do
  for side in before after; do
    port_var="port_$side"; port=${!port_var}
    for c in 1 16; do
      line=$(wrk_json "$side" "$c" "$port"); echo "round $round $line"; results+=("$line")
    done
    line=$("$BIN/wattgate-loadgen" "${prompts_arg[@]}" --duration "$secs" --label "$side-open" \
      --url "http://127.0.0.1:$port/v1/chat/completions" --rate 2000)
    echo "round $round $line"; results+=("$line")
  done
done

python3 - "${results[@]}" <<'PY'
import json, statistics, sys
rows = [json.loads(a) for a in sys.argv[1:]]
def pick(side, c):
    return [r for r in rows if r.get("label") == side and r.get("connections") == c]
print()
print(f"{'':34}{'before':>10}{'after':>10}{'after/before':>14}")
for c in (1, 16):
    for key, name in (("rps", "requests/s"), ("p50", "p50 ms"), ("p99", "p99 ms")):
        b = statistics.median(r[key] for r in pick("before", c))
        a = statistics.median(r[key] for r in pick("after", c))
        print(f"wrk {c:>2} connection(s), {name:<14}{b:>10.3f}{a:>10.3f}{a / b:>14.2f}")
for q in ("p50", "p99"):
    b = statistics.median(r["latency_ms"][q] for r in rows if r.get("label") == "before-open")
    a = statistics.median(r["latency_ms"][q] for r in rows if r.get("label") == "after-open")
    print(f"open loop 2,000 rps, {q} ms{'':9}{b:>10.3f}{a:>10.3f}{a / b:>14.2f}")
errors = sum(r.get("errors", 0) for r in rows)
print(f"errors: {errors}; medians of {len(pick('before', 1))} rounds, alternating before/after")
PY
