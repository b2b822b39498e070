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
start_priced_pair 8 500 10 429
PROM_PORT=$(free_port)

sed -e "s|127.0.0.1:8080|127.0.0.1:$GW_PORT|" -e "s|scrape_interval: 15s|scrape_interval: 1s|" \
    -e "s|evaluation_interval: 15s|evaluation_interval: 1s|" \
    -e "s|rules/|$PWD/deploy/prometheus/rules/|" deploy/prometheus/prometheus.yml >"$work/prometheus.yml"
run_bg prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn
python3 scripts/wait_http.py "http://127.0.0.1:$PROM_PORT/-/ready" 30

echo "replaying load for ${LOAD_S}s (routed and cloud-pinned)"
replay_load "$LOAD_S" 40 10
sleep 3  # a few more scrapes and rule evaluations
python3 scripts/prometheus/check_queries.py "http://127.0.0.1:$PROM_PORT" \
  deploy/grafana/wattgate-savings.json
