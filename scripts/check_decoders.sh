#!/usr/bin/env bash
# Agreement of wattgate's llama / qwen2 / qwen3 decoder and byte-level BPE tokenizer with llama.cpp:
# writes tiny random-weight GGUF files of each architecture (scripts/make_tiny_decoders.py), then
# compares prompt token counts and greedy token ids of the two engines on the same file.
#
#   scripts/check_decoders.sh [TOKENS=24]
#
# Uses the llama.cpp build of scripts/bench_embedded.sh (target/llamacpp-venv; run that first).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-24}
VENV=target/llamacpp-venv
[ -x "$VENV/bin/python" ] || { echo "run scripts/bench_embedded.sh first (it builds llama.cpp)"; exit 1; }
"$VENV/bin/python" -m pip install -q --disable-pip-version-check gguf numpy
cargo build --release -q --example bench_embedded
dir=$(mktemp -d); trap 'rm -rf "$dir"' EXIT
"$VENV/bin/python" scripts/make_tiny_decoders.py "$dir" >/dev/null
PROMPT="the cat sat on the mat and then the dog ran at the sun"
status=0
for arch in llama qwen2 qwen3; do
  ours=$(RAYON_NUM_THREADS=1 target/release/examples/bench_embedded "$dir/tiny-$arch.gguf" "$PROMPT" "$N")
  ref=$("$VENV/bin/python" scripts/llama_cpp_speed.py "$dir/tiny-$arch.gguf" "$PROMPT" "$((N + 1))" 1 2>/dev/null)
  python3 - "$arch" "$ours" "$ref" <<'PY' || status=1
import json, sys
arch, o, r = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
same = 0
for a, b in zip(o["greedy_ids"], r["greedy_ids"]):
    if a != b:
        break
    same += 1
n = min(len(o["greedy_ids"]), len(r["greedy_ids"]))
print(f"{arch:>6}: prompt tokens {o['prompt_tokens']} vs {r['prompt_tokens']}; greedy ids identical for {same} of {n}")
sys.exit(0 if same == n and o["prompt_tokens"] == r["prompt_tokens"] else 1)
PY
done
exit $status
