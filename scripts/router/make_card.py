"""Writes router-models/<name>/card.md from the router.json that `wattgate router train` wrote.

usage: make_card.py ROUTER_DIR [PROFILE_DIR ...]

With PROFILE_DIRs (outputs of `wattgate profile`), the router was trained on the model's own
profiled answers: the card then reports what was profiled (queries, accuracy, energy, IPW, IPJ)
and how to reproduce it with scripts/profile_gemma.sh.
"""
import json
import sys
from pathlib import Path

# Latency and memory: `cargo bench --bench router` on the 2-core development VM (see
# router-models/README.md for the full run, next to an all-MiniLM-L6-v2 encoder pass).
LATENCY = Path(__file__).with_name("latency.md")


def choice(c):
    """One validation candidate, in words."""
    structure = ",".join(c["structure"]) or "none"
    return f"{'centred' if c['centre_sources'] else 'raw'} labels, structure {structure}, l2 {c['l2']:g}"


def fmt(v):
    return "-" if v is None else f"{v:.3f}"


def profiled(dirs):
    """The card section on what `wattgate profile` measured."""
    out = [
        "",
        "Every row is this model's own answer, measured with `wattgate profile` (greedy, one query "
        "at a time, one warm-up excluded) and graded against the public answer keys "
        "(MMLU test and GSM8K test, fetched from PyPI by SHA-256): multiple choice by the letter "
        "the answer commits to, GSM8K by its final number.",
        "",
        "| profile | queries | accuracy | J/query | mean W | IPW | IPJ | energy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    total = right = 0
    for d in sorted(dirs):
        s = json.loads((Path(d) / "summary.json").read_text())
        o = s["overall"]
        total += o["queries"]
        right += round(o["accuracy"] * o["queries"])
        kind = "measured" if s["measured"] else "estimated"
        for source in s["by_source"]:
            out.append(
                f"| {source} | {o['queries']} | {100 * o['accuracy']:.1f}% | "
                f"{o['joules_per_query']:.2f} | {o['mean_watts']:.2f} | {o['ipw']:.5f} | "
                f"{o['ipj']:.5f} | {s['energy_source']} ({kind}) |"
            )
    out += [
        "",
        f"{total} queries profiled in all; {right} answered right. With so few right answers the "
        "router can learn little beyond the base rate: read the validation below with that in "
        "mind. A router is only as useful as the model it predicts is sometimes right.",
    ]
    return out


def main():
    d = Path(sys.argv[1])
    profiles = sys.argv[2:]
    m = json.loads((d / "router.json").read_text())
    # The measures the head reads: a measure left out was fed as zero, so its weight is 0.
    dense = [n for n, w in zip(m["dense_names"], m["dense_weights"]) if m["structure"] and w != 0]
    rows = sum(s["rows"] for s in m["trained_on"])
    sel = m.get("selection")
    out = [f"# Router `{m['name']}`", ""]
    if profiles:
        out += [
            f"Predicts p_local = P(the local model answers well) for **{m['label']}**, from its "
            "own profiled answers.",
            "",
            "## Training data",
            "",
            f"{rows} rows: queries of ../shared/data/routing, answered by the model itself:",
        ]
        out += profiled(profiles)
        out += ["", "| source | rows |", "| --- | ---: |"]
    else:
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
        + (f"Dense structure measures read: {', '.join(dense)}. " if dense else
           "No dense structure measures. ")
        + (("Labels are centred by source before fitting (each source's mean moved to 0.5), so the "
            "head learns what makes a query hard among its own kind rather than which source is "
            "easy. ") if sel and sel["chosen"]["centre_sources"] else "Labels are fitted as they are. ")
        + f"Platt calibration on the shipped setting's held-out-source logits: a = "
        f"{m['calibration']['a']:.4f}, b = {m['calibration']['b']:.4f}. Why this representation: "
        "router-models/README.md.",
        "",
    ]
    if sel:
        out += [
            f"Settings chosen by validation ({sel['protocol']}, {len(sel['candidates'])} candidates: "
            + "; ".join(choice(c) for c in sel["candidates"])
            + f"). The shipped head uses **{choice(sel['chosen'])}**, the best on leave-one-source-out "
            "over every source. Each outer fold below made its own choice, on its inner folds only:",
            "",
            "| outer held-out source | chosen on its inner folds | inner score |",
            "| --- | --- | ---: |",
        ]
        out += [f"| {o['source']} | {choice(o['choice'])} | {fmt(o.get('inner_score'))} |" for o in sel["outer"]]
        out += [
            "",
            "Inner score: the mean of the per-source mean AUC, mean APGR, pooled AUC and pooled APGR.",
            "",
        ]
    out += [
        "## Validation: " + (sel["protocol"] if sel else "leave one source out (not nested)"),
        "",
        ("Each source scored once, by a head whose settings were chosen and whose weights were fitted "
         "on the other sources only (outer numbers; nothing was selected on them). " if sel else
         "Each source scored by a head trained on the other sources only; the settings were chosen "
         "on these same numbers. ")
        + "Local label as above; cloud label: the strongest model labeled on each source "
        "(routellm and the chat files: gpt-4-1106-preview; mmlu-pro: gemini-1.5-pro-002; dcrouter: "
        "llama-3.1-nemotron-51b-instruct). Chat grades count as success at 8/10 or above. "
        "`share@1pt`: largest local share within 1 point of cloud-only quality.",
        "",
        "| held-out source | rows | AUC | APGR | share@1pt | oracle share |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    v = m["validation"]
    pooled = m.get("pooled")
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
    if pooled:
        out.append(
            f"| **all held-out rows pooled** | {pooled['n']} | **{fmt(pooled['auc'])}** | "
            f"**{fmt(pooled['apgr'])}** | **{pooled['local_share_at_1pt']:.3f}** | "
            f"{pooled['oracle_local_share']:.3f} |"
        )
        out += [
            "",
            "The pooled row ranks every held-out row together, each scored by the head that did not "
            "see its source, on the heads' own logit scale: a mixture of unseen kinds, as mixed "
            "traffic is, so it also measures whether the router puts an unseen easy kind above an "
            "unseen hard one.",
        ]
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
        "`scripts/profile_gemma.sh` (profiles, then trains; `SKIP_PROFILE=1` retrains from the "
        "existing profiles byte for byte)." if profiles else
        "`scripts/train_routers.sh` (all shipped routers, byte-identical output).",
        "",
    ]
    (d / "card.md").write_text("\n".join(out))


if __name__ == "__main__":
    main()
