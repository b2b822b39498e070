#!/usr/bin/env bash
# Does a full sentence encoder (all-MiniLM-L6-v2) rank unseen kinds of queries better than the
# router's hashed n-grams? Nested leave-one-source-out on the six shared files, each large source
# thinned to every k-th row (at most MAX_ROWS, default 4000, so the encoder pass takes minutes);
# the TF-IDF baseline, the encoder and both side by side (scripts/router/encoder_study.py), and
# `wattgate router train` on the same rows, for the 8b-class and the Llama 3.1 8B labels.
#
# usage: scripts/router/encoder_study.sh [DATA_DIR]     (needs numpy, scikit-learn)
set -euo pipefail
cd "$(dirname "$0")/../.."
data=${1:-../shared/data/routing}
max=${MAX_ROWS:-4000}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
files=(routellm-mmlu mmlupro-ori-mmlu dcrouter-train routellm-gsm8k arenabench-chat mtbench-chat)
thinned=()
for f in "${files[@]}"; do
  python3 - "$data/$f.jsonl" "$tmp/$f.jsonl" "$max" <<'PY'
import sys
rows = [l for l in open(sys.argv[1]) if l.strip()]
step = max(1, -(-len(rows) // int(sys.argv[3])))
open(sys.argv[2], "w").writelines(rows[::step])
print(f"{sys.argv[1]}: {len(rows[::step])} of {len(rows)} rows", file=sys.stderr)
PY
  thinned+=("$tmp/$f.jsonl")
done
model=$(scripts/fetch_minilm.sh)
cargo build --release --quiet --example embed_prompts
cargo build --release --quiet
target/release/examples/embed_prompts "$model" "$tmp/emb.f32" "${thinned[@]}"
graded=(--graded-source arena-bench-v1 --graded-source mt-bench)
for label in "8b-class" "llama-3.1-8b-instruct meta-llama-3.1-8b-instruct 8b-class"; do
  largs=()
  for m in $label; do largs+=(--local-model "$m"); done
  echo "#### local label: $label"
  (cd scripts/router && python3 encoder_study.py "$tmp/emb.f32" "${graded[@]}" "${largs[@]}" "${thinned[@]}")
  echo "== wattgate router (hashed n-grams, nested), same rows"
  target/release/wattgate router train --data "${thinned[@]}" "${graded[@]}" "${largs[@]}" \
    --out "$tmp/router" 2> >(grep -v '^train:\|^read ' >&2) | sed -n '/^held-out source/,/^(all held out/p'
done
