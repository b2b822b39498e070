"""How well does a full sentence encoder rank queries, under the router's protocol?

The shipped router reads hashed word n-grams because it must score in microseconds. This study
asks whether a far heavier prompt-only representation, all-MiniLM-L6-v2 sentence embeddings
(milliseconds per query), ranks unseen kinds of traffic better: if it does not, the STEM targets
of issue 21 are out of reach for prompt-only routers of either kind, and the next lever is labels
from the operator's own traffic, not representations.

Same protocol, labels and measures as scripts/router/baseline_tfidf_ridge.py (imported): nested
leave-one-source-out, every penalty chosen on inner folds by the mean of per-source mean AUC and
APGR and pooled AUC and APGR, each outer source scored once; the fit is on the 8b-class mean, the
score against --local-model. Three representations, each a ridge regression:
  tfidf     word 1-2 gram TF-IDF (the issue's baseline)
  minilm    the 384-d sentence embedding
  both      the two side by side (the embedding scaled to the TF-IDF rows' unit norm)

usage: encoder_study.py EMBEDDINGS.f32 [--graded-source S]... [--local-model M]... FILE.jsonl...
"""
import sys

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import Ridge

import baseline_tfidf_ridge as base

ALPHAS = {"tfidf": (0.3, 1.0, 3.0), "minilm": (1.0, 10.0, 100.0), "both": (0.3, 1.0, 3.0)}


def make_fit(kind, prompts, emb):
    def fit_predict(train, test, alpha):
        if kind == "minilm":
            xtr, xte = emb[train], emb[test]
        else:
            vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
            xtr = vec.fit_transform([prompts[i] for i in train])
            xte = vec.transform([prompts[i] for i in test])
            if kind == "both":
                xtr = sp.hstack([xtr, sp.csr_matrix(emb[train])]).tocsr()
                xte = sp.hstack([xte, sp.csr_matrix(emb[test])]).tocsr()
        return Ridge(alpha=alpha).fit(xtr, Y[train]).predict(xte)
    return fit_predict


def main():
    global Y
    args = sys.argv[1:]
    emb_path, args = args[0], args[1:]
    graded, local = [], []
    while args and args[0] in ("--graded-source", "--local-model"):
        (graded if args[0] == "--graded-source" else local).append(args[1])
        args = args[2:]
    local = local or ["8b-class"]
    import json
    rows = [json.loads(line) for f in args for line in open(f) if line.strip()]
    emb = np.fromfile(emb_path, dtype="<f4").reshape(len(rows), -1)
    for r in rows:
        if r["source"] in graded:
            r["scores"] = {m: float(v + 1e-9 >= base.PASS_GRADE) for m, v in r["scores"].items()}
    cloud_of = base.strongest(rows)
    keep = [i for i, r in enumerate(rows) if any(m in base.SMALL for m in r["scores"])]
    rows, emb = [rows[i] for i in keep], emb[keep]
    prompts = [r["prompt"] for r in rows]
    src = np.array([r["source"] for r in rows])
    Y = np.array([np.mean([v for m, v in r["scores"].items() if m in base.SMALL]) for r in rows])

    def label(r):
        for name in local:
            if name == "8b-class":
                return np.mean([v for m, v in r["scores"].items() if m in base.SMALL])
            if name in r["scores"]:
                return r["scores"][name]
        return np.nan

    y_eval = np.array([label(r) for r in rows])
    cloud = np.array([r["scores"].get(cloud_of[r["source"]], np.nan) for r in rows])
    everything = np.arange(len(rows))
    summary = []
    for kind in ("tfidf", "minilm", "both"):
        fit_predict = make_fit(kind, prompts, emb)

        def loso(rest, alpha):
            pred = np.zeros(len(rows))
            for s in sorted(set(src[rest])):
                te = rest[src[rest] == s]
                pred[te] = fit_predict(rest[src[rest] != s], te, alpha)
            return pred

        print(f"\n== {kind}")
        print(f"{'held-out source':<22} {'rows':>6} {'auc':>6} {'apgr':>6} {'share@1pt':>9}  alpha")
        outer = np.zeros(len(rows))
        per = []
        for s in sorted(set(src)):
            rest, te = everything[src != s], everything[src == s]
            scored = rest[~np.isnan(cloud[rest]) & ~np.isnan(y_eval[rest])]
            alpha = max(ALPHAS[kind], key=lambda a: base.score(loso(rest, a), y_eval, cloud, src, scored))
            outer[te] = fit_predict(rest, te, alpha)
            ok = te[~np.isnan(cloud[te]) & ~np.isnan(y_eval[te])]
            auc, apgr, share, _ = base.measures(outer[ok], y_eval[ok], cloud[ok])
            per.append((auc, apgr, share))
            print(f"{s:<22} {len(ok):>6} {auc:>6.3f} {apgr:>6.3f} {share:>9.3f}  {alpha}", flush=True)
        ok = everything[~np.isnan(cloud) & ~np.isnan(y_eval)]
        auc, apgr, share, _ = base.measures(outer[ok], y_eval[ok], cloud[ok])
        print(f"{'(all held out, pooled)':<22} {len(ok):>6} {auc:>6.3f} {apgr:>6.3f} {share:>9.3f}")
        mean = [float(np.mean([p[k] for p in per if p[k] is not None])) for k in range(3)]
        summary.append((kind, *mean, auc, apgr))
    print("\n| representation | mean AUC | mean APGR | mean share@1pt | pooled AUC | pooled APGR |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, a, b, c, d, e in summary:
        print(f"| {kind} | {a:.3f} | {b:.3f} | {c:.3f} | {d:.3f} | {e:.3f} |")


if __name__ == "__main__":
    main()
