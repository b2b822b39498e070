#!/usr/bin/env bash
# A real Prometheus against a real daemon: starts scripted local and cloud upstreams (the local
# one fails every 8th request, the cloud one rate-limits every 10th), the gateway, and Debian's
# Prometheus scraping it every second with deploy/prometheus/rules loaded; replays the shared
# chat prompts as load for LOAD_S seconds (default 45); then runs `promtool check rules` and
# evaluates every PromQL expression of deploy/grafana/wattgate-savings.json and of the
# recording and alert rules, failing if any returns no data.
#
#   scripts/check_prometheus.sh            (installs the `prometheus` package if missing: root)
set -euo pipefail
cd "$(dirname "$0")/.."
LOAD_S=${LOAD_S:-45}

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "installing Debian's prometheus package"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool check rules deploy/prometheus/rules/*.yml
promtool check config deploy/prometheus/prometheus.yml >/dev/null

cargo build --release -q -p wattgate -p wattgate-testkit --bins
BIN=target/release
source scripts/lib.sh
LOCAL_PORT=$(free_port); CLOUD_PORT=$(free_port); GW_PORT=$(free_port); PROM_PORT=$(free_port)
run_bg "$BIN/wattgate-upstream" --listen "127.0.0.1:$LOCAL_PORT" --model local-model \
  --reply "A short local answer to the question." --delay-ms 20 --fail-every 8 --fail-status 500 >/dev/null
run_bg "$BIN/wattgate-upstream" --listen "127.0.0.1:$CLOUD_PORT" --model cloud-model \
  --reply "A longer cloud answer to the question, with more words in it." --delay-ms 40 \
  --fail-every 10 --fail-status 429 >/dev/null
cat >"$work/wattgate.toml" <<TOML
[server]
listen = "127.0.0.1:$GW_PORT"
[ledger]
path = "$work/ledger.redb"

[[backends]]
name = "local"
kind = "openai"
role = "local"
base_url = "http://127.0.0.1:$LOCAL_PORT/v1"
model = "local-model"
parameters = 8e9

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

sed -e "s|127.0.0.1:8080|127.0.0.1:$GW_PORT|" -e "s|scrape_interval: 15s|scrape_interval: 1s|" \
    -e "s|evaluation_interval: 15s|evaluation_interval: 1s|" \
    -e "s|rules/|$PWD/deploy/prometheus/rules/|" deploy/prometheus/prometheus.yml >"$work/prometheus.yml"
run_bg prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn
python3 scripts/wait_http.py "http://127.0.0.1:$PROM_PORT/-/ready" 30

PROMPTS=../shared/data/traffic/chat-prompts.jsonl
[ -f "$PROMPTS" ] || PROMPTS=""
echo "replaying load for ${LOAD_S}s (routed and cloud-pinned)"
"$BIN/wattgate-loadgen" --url "http://127.0.0.1:$GW_PORT/v1/chat/completions" --rate 40 \
  --duration "$LOAD_S" --warmup 1 --label routed ${PROMPTS:+--prompts "$PROMPTS"} &
routed=$!
"$BIN/wattgate-loadgen" --url "http://127.0.0.1:$GW_PORT/v1/chat/completions" --rate 10 \
  --duration "$LOAD_S" --warmup 1 --model cloud --label cloud ${PROMPTS:+--prompts "$PROMPTS"}
wait "$routed"
sleep 3  # a few more scrapes and rule evaluations
python3 scripts/prometheus/check_queries.py "http://127.0.0.1:$PROM_PORT" \
  deploy/grafana/wattgate-savings.json
