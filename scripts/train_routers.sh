#!/usr/bin/env bash
# Retrains every shipped router in router-models/ from ../shared/data/routing (nested
# leave-one-source-out, about 3 minutes per router on 2 cores) and rewrites its card.
# Deterministic: on the same data the output is identical byte for byte (check with
# `git diff --stat router-models/` afterwards).
#
# usage: scripts/train_routers.sh [DATA_DIR]     (default ../shared/data/routing)
#   ONLY=8b-class OUT=/tmp/dir scripts/train_routers.sh   one router, written under OUT instead
#   (scripts/check_router_reproducible.sh compares that with the committed one)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/routing}
files=("$data/routellm-mmlu.jsonl" "$data/routellm-gsm8k.jsonl" "$data/mmlupro-ori-mmlu.jsonl" "$data/dcrouter-train.jsonl"
       "$data/arenabench-chat.jsonl" "$data/mtbench-chat.jsonl")
# The chat files carry judge grades / 10; a grade of 8 or more is a success (see router-models/README.md).
graded=(--graded-source arena-bench-v1 --graded-source mt-bench)
for f in "${files[@]}"; do [[ -f $f ]] || { echo "missing $f" >&2; exit 1; }; done
cargo build --release --quiet
bin=target/release/wattgate

# name | local-model labels, first present wins (8b-class: mean of the 7-9B models in the row)
routers=(
  "8b-class|8b-class"
  "llama-3.1-8b-instruct|llama-3.1-8b-instruct meta-llama-3.1-8b-instruct 8b-class"
  "qwen2.5-7b-instruct|qwen2.5-7b-instruct 8b-class"
  "mistral-7b-instruct|mistral-7b-instruct-v0.3 mistral-7b-instruct-v0.2 8b-class"
  "gemma-2-9b-it|gemma-2-9b-it 8b-class"
  "mixtral-8x7b-instruct|mixtral-8x7b-instruct-v0.1 8b-class"
)
outdir=${OUT:-router-models}
for entry in "${routers[@]}"; do
  name=${entry%%|*}
  [[ -z ${ONLY:-} || $ONLY == "$name" ]] || continue
  args=()
  for m in ${entry#*|}; do args+=(--local-model "$m"); done
  echo "== $name" >&2
  mkdir -p "$outdir/$name"
  "$bin" router train --data "${files[@]}" "${graded[@]}" "${args[@]}" --out "$outdir/$name" \
    > "$outdir/$name/train.txt.tmp" 2> >(grep -v '^train:' >&2)
  mv "$outdir/$name/train.txt.tmp" "$outdir/$name/train.txt"
  python3 scripts/router/make_card.py "$outdir/$name"
done
