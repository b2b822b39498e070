#!/usr/bin/env bash
# The value of own-traffic labels, measured under the outer protocol: for k = 0, 100, 300, 1000,
# k rows of each outer held-out source join its training (as an operator's own labeled traffic
# would: shadow verdicts, feedback) and the rest of that source is scored; everything else is
# nested leave-one-source-out as in scripts/train_routers.sh. Prints one table per k and a
# summary (about 4 minutes per k on 2 cores).
#
# usage: scripts/router/own_rows_study.sh [ROUTER] [DATA_DIR]    (default llama-3.1-8b-instruct)
#   OWN_WEIGHT=5 KS="0 300 1000" ...   weight each own row 5x (default 1), and only these k
set -euo pipefail
cd "$(dirname "$0")/../.."
name=${1:-llama-3.1-8b-instruct}
data=${2:-../shared/data/routing}
line=$(grep -o "\"$name|[^\"]*\"" scripts/train_routers.sh | tr -d '"') || { echo "unknown router $name" >&2; exit 1; }
args=()
for m in ${line#*|}; do args+=(--local-model "$m"); done
cargo build --release --quiet
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ks=${KS:-0 100 300 1000}
for k in $ks; do
  echo "== k = $k"
  target/release/wattgate router train \
    --data "$data/routellm-mmlu.jsonl" "$data/routellm-gsm8k.jsonl" "$data/mmlupro-ori-mmlu.jsonl" \
           "$data/dcrouter-train.jsonl" "$data/arenabench-chat.jsonl" "$data/mtbench-chat.jsonl" \
    --graded-source arena-bench-v1 --graded-source mt-bench "${args[@]}" --own-rows "$k" --own-weight "${OWN_WEIGHT:-1}" \
    --out "$tmp/k$k" 2> >(grep -v '^train:\|^read ' >&2) | tee "$tmp/k$k.txt" \
    | sed -n '/^held-out source/,/^(all held out/p'
done
python3 - "$tmp" $ks <<'PY'
import json, sys
from pathlib import Path
tmp = Path(sys.argv[1])
runs = {k: json.loads((tmp / f"k{k}" / "router.json").read_text()) for k in map(int, sys.argv[2:])}
# Means over the sources scored at every k, so the rows compare like with like (a source too
# small to spare k rows drops out of the larger k).
common = set.intersection(*({s["source"] for s in m["validation"]} for m in runs.values()))
print(f"\nMeans over the {len(common)} sources scored at every k ({', '.join(sorted(common))}):")
print("\n| k own rows | mean AUC | mean APGR | mean share@1pt | pooled AUC (all scored) | pooled APGR |")
print("| ---: | ---: | ---: | ---: | ---: | ---: |")
for k, m in runs.items():
    v = [s for s in m["validation"] if s["source"] in common]
    p = m.get("pooled") or {}
    mean = lambda key: sum(s[key] or 0 for s in v) / len(v)
    f = lambda x: "-" if x is None else f"{x:.3f}"
    print(f"| {k} | {mean('auc'):.3f} | {mean('apgr'):.3f} | {mean('local_share_at_1pt'):.3f} | "
          f"{f(p.get('auc'))} | {f(p.get('apgr'))} |")
print("\nPer source and k (AUC / APGR / share@1pt):")
for k, m in runs.items():
    print(f"k={k}: " + "; ".join(f"{s['source']} {s['auc']:.3f}/{s['apgr']:.3f}/{s['local_share_at_1pt']:.3f}"
                                 for s in m["validation"] if s["auc"] is not None and s["apgr"] is not None))
PY
