#!/usr/bin/env bash
# /v1/embeddings throughput against the reference library on the same encoder, in one run:
# texts/s at batch 1 and batch 32, wattgate's release daemon (all-MiniLM-L6-v2 in-process,
# over HTTP on loopback) next to sentence-transformers (PyTorch, CPU) encoding the same texts
# from the same files, each on the machine's cores in turn (never at the same time).
#
#   scripts/bench_embeddings.sh [TEXTS]      (default 320 real chat prompts)
#
# sentence-transformers and PyTorch (with its CUDA runtime packages, about 3 GB, unused here)
# go into target/st-venv on first run.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-320}
source scripts/lib.sh
cargo build --release -q -p wattgate
MODEL_DIR=$(scripts/fetch_minilm.sh)
VENV=target/st-venv
if ! "$VENV/bin/python" -c 'import sentence_transformers, httpx' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check torch sentence-transformers httpx
fi
GW_PORT=$(free_port)
cat >"$work/bench.toml" <<TOML
[server]
listen = "127.0.0.1:$GW_PORT"
[ledger]
enabled = false
# A chat backend is required; this benchmark never calls it.
[[backends]]
name = "unused"
kind = "openai"
role = "cloud"
base_url = "http://127.0.0.1:9/v1"
model = "unused"
parameters = 1e9
TOML
WATTGATE_LOG=warn run_bg target/release/wattgate serve --config "$work/bench.toml"
python3 scripts/wait_http.py "http://127.0.0.1:$GW_PORT/healthz" 20
"$VENV/bin/python" scripts/bench_embeddings.py "http://127.0.0.1:$GW_PORT/v1" "$MODEL_DIR" "$N"
