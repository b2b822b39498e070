#!/usr/bin/env bash
# The embedded model through the gateway against llama.cpp's own server (llama-server), side by
# side in one run: same Gemma 3 270M GGUF, same thread count, same prompts (the shared chat
# traffic), streaming MAX_TOKENS tokens per request, at each concurrency N with
# `llama-server --parallel N` and the gateway's `max_batch = N`. Prints aggregate output tok/s,
# TTFT p50/p99 and single-stream decode tok/s for both, with the ratios; then the gateway's
# single-stream decode at temperature 1.0 against greedy.
#
#   scripts/bench_vs_llama_server.sh [CONCURRENCIES="1 4 8 16"] [MAX_TOKENS=128] [THREADS=2]
#
# llama-server is built once by ../shared/tools/build_llama_server.sh into target/llama-server
# (about 7 minutes on 2 cores); a run after that takes about 10 minutes. Not run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
LEVELS=${1:-"1 4 8 16"}; TOKENS=${2:-128}; THREADS=${3:-2}
PROMPTS_SRC=../shared/data/traffic/chat-prompts.jsonl

cargo build -q --release -p wattgate --bins
BIN=target/release
MODEL=$("$BIN/wattgate" models pull 2>/dev/null | tail -1)
LLAMA=$(../shared/tools/build_llama_server.sh "$PWD/target/llama-server")
source scripts/lib.sh
openai_venv
# Short single-turn prompts (under 600 characters), in file order: both servers get the same.
python3 - "$PROMPTS_SRC" "$work/prompts.jsonl" <<'PY'
import json, sys
out = open(sys.argv[2], "w")
for line in open(sys.argv[1]):
    m = json.loads(line)["messages"]
    if len(m) == 1 and len(m[0]["content"]) < 600:
        out.write(json.dumps({"messages": m}) + "\n")
PY

run_level() { # SERVER N REQUESTS TEMPERATURE
  local port pid
  port=$(free_port)
  if [ "$1" = llama ]; then
    "$LLAMA" -m "$MODEL" -t "$THREADS" -np "$2" -c $(( $2 * 1024 )) --port "$port" \
      --host 127.0.0.1 >"$work/llama.log" 2>&1 &
    pid=$!
  else
    cat >"$work/gw.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[routing]
policy = "prefer_local"
[ledger]
path = "$work/ledger-$2.redb"
[[backends]]
name = "gemma"
kind = "embedded"
role = "local"
model = "gemma-3-270m"
parameters = 268e6
max_batch = $2
queue_depth = 64
queue_timeout_s = 600
first_byte_timeout_s = 600
max_tokens = $TOKENS
TOML
    RAYON_NUM_THREADS=$THREADS WATTGATE_LOG=error "$BIN/wattgate" serve --config "$work/gw.toml" &
    pid=$!
  fi
  local health=/readyz model=auto
  [ "$1" = llama ] && health=/health model=gemma
  python3 scripts/wait_http.py "http://127.0.0.1:$port$health" 120 >/dev/null
  local requests=$(( $2 * 3 < 8 ? 8 : $2 * 3 ))
  "$VENV/bin/python" scripts/bench_streams.py "http://127.0.0.1:$port" "$model" "$2" \
    "$requests" "$TOKENS" "$4" "$work/prompts.jsonl"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

results=()
for n in $LEVELS; do
  for server in llama wattgate; do
    line=$(run_level "$server" "$n" "" 0)
    echo "$server $line"
    results+=("$server" "$line")
  done
done
greedy=$(run_level wattgate 1 "" 0); sampled=$(run_level wattgate 1 "" 1.0)
echo "wattgate-greedy $greedy"; echo "wattgate-t1.0 $sampled"
python3 - "$greedy" "$sampled" "${results[@]}" <<'PY'
import json, sys
greedy, sampled = json.loads(sys.argv[1]), json.loads(sys.argv[2])
a = sys.argv[3:]
rows = {}
for i in range(0, len(a), 2):
    r = json.loads(a[i + 1])
    rows.setdefault(r["concurrency"], {})[a[i]] = r
print(f"\n{'streams':>7} | {'llama-server tok/s':>18} | {'wattgate tok/s':>14} | {'ratio':>5} | TTFT p50 llama/wattgate | TTFT p99 llama/wattgate")
for n, r in sorted(rows.items()):
    l, w = r["llama"], r["wattgate"]
    print(f"{n:>7} | {l['tok_s']:>18} | {w['tok_s']:>14} | {w['tok_s'] / l['tok_s']:>5.2f} | "
          f"{l['ttft_p50_s']:.2f} / {w['ttft_p50_s']:.2f} s | {l['ttft_p99_s']:.2f} / {w['ttft_p99_s']:.2f} s")
if 1 in rows:
    l, w = rows[1]["llama"], rows[1]["wattgate"]
    print(f"single-stream decode: llama-server {l['decode_tok_s_p50']} tok/s, wattgate {w['decode_tok_s_p50']} tok/s, ratio {w['decode_tok_s_p50'] / l['decode_tok_s_p50']:.2f}")
    if 8 in rows:
        print(f"wattgate 8 streams / 1 stream aggregate: {rows[8]['wattgate']['tok_s'] / w['tok_s']:.2f}x")
print(f"wattgate single-stream decode, temperature 1.0 vs greedy: {sampled['decode_tok_s_p50']} / {greedy['decode_tok_s_p50']} = {sampled['decode_tok_s_p50'] / greedy['decode_tok_s_p50']:.2f}")
PY
