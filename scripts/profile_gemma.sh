#!/usr/bin/env bash
# Profiles the embedded default (Gemma 3 270M) on shared queries with reference answers and
# trains its router, router-models/gemma-3-270m. About 30 minutes on 2 cores.
#
#   scripts/profile_gemma.sh            # profile (resumes) and train
#   SKIP_PROFILE=1 scripts/profile_gemma.sh   # retrain from the existing profiles only
#
# Profiles go to profiles/gemma-3-270m-*/ (not committed); the router's card records the
# numbers. Multiple-choice answers get 16 tokens (a bare letter or "The answer is X" fits;
# this base model never reasons first), GSM8K 256 (a worked answer).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${SHARED_DATA:-../shared/data}/routing
bin=target/release/wattgate
cargo build --release --quiet
out=profiles
if [ -z "${SKIP_PROFILE:-}" ]; then
  "$bin" profile --model gemma-3-270m --data "$data/routellm-mmlu.jsonl" --sample 1500 \
    --max-tokens 16 --out "$out/gemma-3-270m-routellm-mmlu"
  "$bin" profile --model gemma-3-270m --data "$data/mmlupro-ori-mmlu.jsonl" --sample 1000 \
    --max-tokens 16 --out "$out/gemma-3-270m-mmlupro-ori-mmlu"
  "$bin" profile --model gemma-3-270m --data "$data/routellm-gsm8k.jsonl" --sample 150 \
    --max-tokens 256 --out "$out/gemma-3-270m-routellm-gsm8k"
fi
"$bin" router train \
  --data "$out/gemma-3-270m-routellm-mmlu/queries.jsonl" \
         "$out/gemma-3-270m-mmlupro-ori-mmlu/queries.jsonl" \
         "$out/gemma-3-270m-routellm-gsm8k/queries.jsonl" \
  --local-model gemma-3-270m --out router-models/gemma-3-270m \
  | tee router-models/gemma-3-270m.train.txt
