#!/usr/bin/env bash
# Profiles the embedded default (Gemma 3 270M) on shared queries with reference answers and
# trains its router, router-models/gemma-3-270m. About 30 minutes on 2 cores (2,000 queries).
#
#   scripts/profile_gemma.sh            # profile (resumes) and train
#   SKIP_PROFILE=1 scripts/profile_gemma.sh   # retrain from the existing profiles only
#
# Profiles go to profiles/router-gemma-3-270m/*/ (not committed); the router's card records the
# numbers. Multiple-choice answers get 16 tokens (a bare letter or "The answer is X" fits;
# this base model never reasons first), GSM8K 256 (a worked answer).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${SHARED_DATA:-../shared/data}/routing
bin=target/release/wattgate
cargo build --release --quiet
# Not the default output directories of `wattgate profile`, so a hand-run profile of the same
# files never mixes its rows into the router's training data.
out=profiles/router-gemma-3-270m
if [ -z "${SKIP_PROFILE:-}" ]; then
  "$bin" profile --model gemma-3-270m --data "$data/routellm-mmlu.jsonl" --sample 1500 \
    --max-tokens 16 --out "$out/routellm-mmlu"
  "$bin" profile --model gemma-3-270m --data "$data/mmlupro-ori-mmlu.jsonl" --sample 400 \
    --max-tokens 16 --out "$out/mmlupro-ori-mmlu"
  "$bin" profile --model gemma-3-270m --data "$data/routellm-gsm8k.jsonl" --sample 100 \
    --max-tokens 256 --out "$out/routellm-gsm8k"
fi
mkdir -p router-models/gemma-3-270m
"$bin" router train \
  --data "$out/routellm-mmlu/queries.jsonl" \
         "$out/mmlupro-ori-mmlu/queries.jsonl" \
         "$out/routellm-gsm8k/queries.jsonl" \
  --local-model gemma-3-270m --out router-models/gemma-3-270m \
  > router-models/gemma-3-270m/train.txt.tmp 2> >(grep -v "^train:" >&2)
mv router-models/gemma-3-270m/train.txt.tmp router-models/gemma-3-270m/train.txt
python3 scripts/router/make_card.py router-models/gemma-3-270m "$out"/*/
