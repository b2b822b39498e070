"""Writes router-models/<name>/card.md from the router.json that `wattgate router train` wrote.

usage: make_card.py ROUTER_DIR
"""
import json
import sys
from pathlib import Path

# Latency and memory: `cargo bench --bench router` on the 2-core development VM (see
# router-models/README.md for the full run, next to an all-MiniLM-L6-v2 encoder pass).
LATENCY = Path(__file__).with_name("latency.md")


def fmt(v):
    return "-" if v is None else f"{v:.3f}"


def main():
    d = Path(sys.argv[1])
    m = json.loads((d / "router.json").read_text())
    rows = sum(s["rows"] for s in m["trained_on"])
    out = [f"# Router `{m['name']}`", ""]
    out += [
        f"Predicts p_local = P(the local model answers well) for **{m['label']}** "
        "(labels in order of preference: the first a row carries is used; `8b-class` is the mean "
        "correctness of the 7-9B models the row labels, a proxy where the named model is not labeled).",
        "",
        "## Training data",
        "",
        f"{rows} rows of ../shared/data/routing (real public labels; see its README):",
        "",
        "| source | rows |",
        "| --- | ---: |",
    ]
    out += [f"| {s['source']} | {s['rows']} |" for s in m["trained_on"]]
    out += [
        "",
        "## Method",
        "",
        f"Word unigrams and bigrams (plus single symbols such as `=`, `$`, `\\`) of the user turns "
        f"(last turn weight 1, earlier 0.5, system prompt 0.3), hashed (FNV-1a) into {m['buckets']} "
        "buckets, sublinear TF x IDF, L2-normalised; a logistic head on soft labels with L2 "
        "penalty, fitted full-batch with Adam (300 steps, deterministic). "
        + ("Dense structure features are on. " if m["structure"] else
           "Dense structure features are off (they lowered held-out-source AUC). ")
        + f"Platt calibration on held-out-source logits: a = {m['calibration']['a']:.4f}, "
        f"b = {m['calibration']['b']:.4f}. Why this representation: router-models/README.md.",
        "",
        "## Validation: leave one source out",
        "",
        "Each source scored by a head trained on the other sources only. Local label as above; cloud "
        "label: the strongest model labeled on each source (routellm: gpt-4-1106-preview; mmlu-pro: "
        "gemini-1.5-pro-002; dcrouter: llama-3.1-nemotron-51b-instruct). `share@1pt`: largest local "
        "share within 1 point of cloud-only quality.",
        "",
        "| held-out source | rows | AUC | APGR | share@1pt | oracle share |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    v = m["validation"]
    for s in v:
        out.append(
            f"| {s['source']} | {s['n']} | {fmt(s['auc'])} | {fmt(s['apgr'])} | "
            f"{s['local_share_at_1pt']:.3f} | {s['oracle_local_share']:.3f} |"
        )
    if v:
        mean = lambda k: sum(s[k] or 0 for s in v) / len(v)
        out.append(
            f"| **mean** | | **{mean('auc'):.3f}** | **{mean('apgr'):.3f}** | "
            f"**{mean('local_share_at_1pt'):.3f}** | {mean('oracle_local_share'):.3f} |"
        )
    out += [
        "",
        "Note: routellm/mmlu and mmlu-pro/ori_mmlu are both drawn from MMLU, and dcrouter contains "
        "MMLU and GSM8K items, so no held-out source is fully unseen in topic; the hidden sources "
        "the issue judges on (harder STEM, open-ended chat) are further away.",
        "",
        "## Latency and memory",
        "",
        LATENCY.read_text().strip() if LATENCY.exists() else "Not measured yet.",
        "",
        "## Reproduce",
        "",
        "`scripts/train_routers.sh` (all shipped routers, byte-identical output).",
        "",
    ]
    (d / "card.md").write_text("\n".join(out))


if __name__ == "__main__":
    main()
