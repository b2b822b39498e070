#!/usr/bin/env bash
# The built-in savings page in a real browser: starts scripted local and cloud upstreams and the
# gateway, replays the shared chat prompts for LOAD_S seconds (default 30), opens
# /dashboard?since=2m&step=5s in headless Chromium, checks that the page loaded its data and drew
# chart points, and saves a screenshot.
#
#   scripts/dashboard_screenshot.sh [OUT.png]     (default target/dashboard.png; installs
#                                                  Debian's chromium if missing: root)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-target/dashboard.png}")
LOAD_S=${LOAD_S:-30}
CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$CHROMIUM" ]; then
  echo "installing Debian's chromium package"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  CHROMIUM=$(command -v chromium)
fi

cargo build --release -q -p wattgate -p wattgate-testkit --bins
BIN=target/release
source scripts/lib.sh
LOCAL_PORT=$(free_port); CLOUD_PORT=$(free_port); GW_PORT=$(free_port)
run_bg "$BIN/wattgate-upstream" --listen "127.0.0.1:$LOCAL_PORT" --model local-model \
  --reply "A short local answer." --delay-ms 20 --fail-every 12 >/dev/null
run_bg "$BIN/wattgate-upstream" --listen "127.0.0.1:$CLOUD_PORT" --model cloud-model \
  --reply "A longer cloud answer with a few more words in it." --delay-ms 40 >/dev/null
cat >"$work/wattgate.toml" <<TOML
[server]
listen = "127.0.0.1:$GW_PORT"
[ledger]
path = "$work/ledger.redb"
flush_interval_s = 0.5

[[backends]]
name = "local"
kind = "openai"
role = "local"
base_url = "http://127.0.0.1:$LOCAL_PORT/v1"
model = "local-model"
parameters = 8e9
max_context = 2048

[[backends]]
name = "cloud"
kind = "openai"
role = "cloud"
base_url = "http://127.0.0.1:$CLOUD_PORT/v1"
model = "cloud-model"
parameters = 235e9
active_parameters = 22e9
usd_per_million_input_tokens = 2.0
usd_per_million_output_tokens = 8.0
TOML
WATTGATE_LOG=error run_bg "$BIN/wattgate" serve --config "$work/wattgate.toml"
python3 scripts/wait_http.py "http://127.0.0.1:$GW_PORT/healthz" 20

PROMPTS=../shared/data/traffic/chat-prompts.jsonl
[ -f "$PROMPTS" ] || PROMPTS=""
echo "replaying load for ${LOAD_S}s"
"$BIN/wattgate-loadgen" --url "http://127.0.0.1:$GW_PORT/v1/chat/completions" --rate 20 \
  --duration "$LOAD_S" --warmup 0 ${PROMPTS:+--prompts "$PROMPTS"} >/dev/null &
routed=$!
"$BIN/wattgate-loadgen" --url "http://127.0.0.1:$GW_PORT/v1/chat/completions" --rate 5 \
  --duration "$LOAD_S" --warmup 0 --model cloud ${PROMPTS:+--prompts "$PROMPTS"} >/dev/null
wait "$routed"
sleep 1

URL="http://127.0.0.1:$GW_PORT/dashboard?since=2m&step=5s"
flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,900
       --virtual-time-budget=8000 --user-data-dir="$work/chromium")
"$CHROMIUM" "${flags[@]}" --dump-dom "$URL" 2>/dev/null >"$work/dom.html"
ready=$(grep -o 'data-ready="[a-z]*"' "$work/dom.html" | head -1)
drawn=$(grep -o 'data-points="[0-9]*"' "$work/dom.html" | grep -o '[0-9]*' | head -1)
if [ "$ready" != 'data-ready="true"' ] || [ "${drawn:-0}" -lt 10 ]; then
  echo "the dashboard did not render its data: $ready, ${drawn:-0} chart points" >&2
  exit 1
fi
mkdir -p "$(dirname "$OUT")"
"$CHROMIUM" "${flags[@]}" --screenshot="$OUT" "$URL" 2>/dev/null
[ -s "$OUT" ] || { echo "no screenshot written" >&2; exit 1; }
echo "dashboard rendered ${drawn} chart points; screenshot: $OUT"
