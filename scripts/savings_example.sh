#!/usr/bin/env bash
# Regenerates the README's `wattgate report` example: the release gateway between a scripted
# local upstream (20 ms, failing every 8th request with 500, so some requests fall back) and a
# scripted cloud priced like gpt-4.1, 10 s of replayed chat prompts (20/s routed, 5/s pinned
# to the cloud), then `wattgate report --since 1h` against the running daemon.
#
#   scripts/savings_example.sh [SECONDS=10]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
cargo build --release -q -p wattgate -p wattgate-testkit --bins
BIN=target/release
source scripts/lib.sh
start_priced_pair 8 500 0 0
replay_load "$secs" 20 5 >/dev/null
sleep 1.5
"$BIN/wattgate" report --since 1h --config "$work/wattgate.toml"
