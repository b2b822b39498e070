#!/usr/bin/env bash
# Decode speed of the embedded Gemma 3 270M through the daemon, greedy against temperature 1.0
# (OpenAI's default, which clients that set nothing get), in the same run: the same prompts,
# streamed, alternating settings, ROUNDS times each. Decode tokens/s is (completion tokens - 1)
# over the time from the first to the last content chunk, so prefill does not count.
#
#   scripts/bench_sampling.sh [MAX_TOKENS=200] [ROUNDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
MAX_TOKENS=${1:-200}; ROUNDS=${2:-3}
cargo build -q --release -p wattgate --bins
BIN=target/release
"$BIN/wattgate" models pull >/dev/null
source scripts/lib.sh
openai_venv
GW_PORT=$(free_port)
cat >"$work/wattgate.toml" <<TOML
[server]
listen = "127.0.0.1:$GW_PORT"
[ledger]
enabled = false

[[backends]]
name = "gemma"
kind = "embedded"
role = "local"
model = "gemma-3-270m"
parameters = 268e6
max_tokens = $MAX_TOKENS
TOML
WATTGATE_LOG=error run_bg "$BIN/wattgate" serve --config "$work/wattgate.toml"
python3 scripts/wait_http.py "http://127.0.0.1:$GW_PORT/readyz" 120
"$VENV/bin/python" - "http://127.0.0.1:$GW_PORT/v1" "$MAX_TOKENS" "$ROUNDS" <<'PY'
import json, statistics, sys, time
import openai

base, max_tokens, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
with open("../shared/data/traffic/chat-prompts.jsonl") as f:
    prompts = [json.loads(l)["messages"][0]["content"][:400] for l in f][:6]

def decode(prompt, temperature):
    first = last = None
    tokens = 0
    stream = client.chat.completions.create(
        model="gemma", stream=True, max_tokens=max_tokens, temperature=temperature, seed=7,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": prompt}])
    for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
    return tokens, (last - first) if first and last else 0.0

decode(prompts[0], 0.0)  # warm-up
totals = {0.0: [0, 0.0], 1.0: [0, 0.0]}
for _ in range(rounds):
    for p in prompts:
        for t in (0.0, 1.0):
            n, s = decode(p, t)
            if n > 1 and s > 0:
                totals[t][0] += n - 1
                totals[t][1] += s
rate = {t: n / s for t, (n, s) in totals.items()}
for t, r in rate.items():
    print(f"temperature {t}: {totals[t][0]} decode tokens in {totals[t][1]:.2f} s = {r:.1f} tok/s")
print(f"temperature 1.0 / greedy = {rate[1.0] / rate[0.0]:.3f}x (target >= 0.95x)")
PY
