#!/usr/bin/env bash
# Retrains one shipped router (default 8b-class) from ../shared/data/routing into a temporary
# directory and fails unless router.json, weights.bin, train.txt and card.md are byte for byte
# the committed ones: the shipped weights are what scripts/train_routers.sh makes from the
# shared data, not a hand-tuned artefact. CI runs it (about 4 minutes on 2 cores plus a release
# build).
#
# usage: scripts/check_router_reproducible.sh [NAME] [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-8b-class}
data=${2:-../shared/data/routing}
[[ -d router-models/$name ]] || { echo "no shipped router router-models/$name" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ONLY=$name OUT=$tmp scripts/train_routers.sh "$data"
[[ -f $tmp/$name/weights.bin ]] || { echo "$name: retraining wrote nothing (is it in scripts/train_routers.sh?)" >&2; exit 1; }
# train.txt names where it wrote; the committed one says router-models/NAME.
sed -i "1s|^router $name -> .*|router $name -> router-models/$name|" "$tmp/$name/train.txt"
status=0
for f in router.json weights.bin train.txt card.md; do
  if cmp -s "router-models/$name/$f" "$tmp/$name/$f"; then
    echo "$name/$f: identical ($(wc -c < "$tmp/$name/$f") bytes)"
  else
    echo "$name/$f: DIFFERS from the committed file" >&2
    diff <(head -c 4000 "router-models/$name/$f" | cat -v) <(head -c 4000 "$tmp/$name/$f" | cat -v) | head -20 >&2 || true
    status=1
  fi
done
exit $status
