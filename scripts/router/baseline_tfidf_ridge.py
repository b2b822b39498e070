"""The issue's reference baseline, rebuilt: TF-IDF (word 1-2 grams) + ridge regression on the mean
correctness of the 7-9B-class models, under the same protocol, labels and measures as
`wattgate router train`: nested leave-one-source-out (the ridge penalty chosen on inner folds by the
mean of per-source mean AUC and APGR and pooled AUC and APGR; each outer source scored once), local
label 8b-class, cloud label the strongest labeled model of each source, judge grades of the chat
sources turned into success at 8/10; AUC, APGR, local share within 1 point, oracle share.

usage: baseline_tfidf_ridge.py [--graded-source S]... [--local-model M]... FILE.jsonl...
       (needs numpy, scikit-learn)

The ridge always fits the 8b-class mean, as the issue's baseline does; --local-model (repeatable,
first present wins, `8b-class` allowed, as for `wattgate router train`) names the label it is
scored against, so it can be compared with a router for one named model.
"""
import json
import sys
from collections import defaultdict

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import Ridge

# Same list as src/router/train.rs SMALL_MODELS.
SMALL = {
    "mixtral-8x7b-instruct-v0.1", "mistral-7b-instruct-v0.1", "openchat_3.5", "starling-lm-7b-alpha", "meta-llama-3.1-8b-instruct", "llama-3.1-8b-instruct",
    "mistral-7b-instruct-v0.2", "mistral-7b-instruct-v0.3", "qwen1.5-7b-chat",
    "qwen2.5-7b-instruct", "gemma-7b", "gemma-2-9b-it", "phi-3-mini-4k-instruct", "yi-6b-chat",
}


def strongest(rows):
    """Per source, the best-scoring model labeled on >= 90% of its rows (as train.rs does)."""
    tot = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    n = defaultdict(int)
    for r in rows:
        n[r["source"]] += 1
        for m, s in r["scores"].items():
            tot[r["source"]][m][0] += s
            tot[r["source"]][m][1] += 1
    out = {}
    for src, models in tot.items():
        ok = [(v[0] / v[1], m) for m, v in models.items() if v[1] * 10 >= n[src] * 9]
        out[src] = max(ok, key=lambda t: (t[0], [-ord(c) for c in t[1]]))[1]
    return out


def measures(p, local, cloud):
    """AUC, APGR, local share within 1 point, oracle share: tie-aware, as evaluation.rs."""
    order = np.argsort(-p, kind="stable")
    p, local, cloud = p[order], local[order], cloud[order]
    n = len(p)
    pts = [(0.0, cloud.mean())]
    gain = 0.0
    i = 0
    while i < n:
        j = i
        while j < n and p[j] == p[i]:
            j += 1
        gain += (local[i:j] - cloud[i:j]).sum()
        pts.append((j / n, (cloud.sum() + gain) / n))
        i = j
    lo, cl = local.mean(), cloud.mean()
    gap = cl - lo
    apgr = sum((s1 - s0) * ((q0 + q1) / 2 - lo) / gap for (s0, q0), (s1, q1) in zip(pts, pts[1:])) if gap > 0 else None
    target, best = cl - 0.01, 0.0
    for (s0, q0), (s1, q1) in zip(pts, pts[1:]):
        if q0 >= target - 1e-12:
            best = max(best, s1 if q1 >= target - 1e-12 else s0 + (s1 - s0) * (q0 - target) / (q0 - q1))
    pos = local >= 0.5
    ranks = np.empty(n)
    sp = np.argsort(p, kind="stable")
    ps = p[sp]
    k = 0
    while k < n:
        m = k
        while m < n and ps[m] == ps[k]:
            m += 1
        ranks[sp[k:m]] = (k + m - 1) / 2 + 1
        k = m
    npos, nneg = pos.sum(), (~pos).sum()
    auc = (ranks[pos].sum() - npos * (npos + 1) / 2) / (npos * nneg) if npos and nneg else None
    return auc, apgr, best, float((local >= cloud).mean())


# The penalties inner folds choose among.
ALPHAS = (0.3, 1.0, 3.0)
PASS_GRADE = 0.8


def fit_predict(prompts, y, train, test, alpha):
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    xtr = vec.fit_transform([prompts[i] for i in train])
    xte = vec.transform([prompts[i] for i in test])
    return Ridge(alpha=alpha).fit(xtr, y[train]).predict(xte)


def loso(prompts, y, src, rows, alpha):
    """Held-out predictions for `rows`, each source's by a ridge fitted on the other sources."""
    pred = np.zeros(len(y))
    for s in sorted(set(src[rows])):
        test = rows[src[rows] == s]
        pred[test] = fit_predict(prompts, y, rows[src[rows] != s], test, alpha)
    return pred


def score(pred, y, cloud, src, rows):
    """The inner criterion: mean of per-source mean AUC, mean APGR, pooled AUC, pooled APGR."""
    per = [measures(pred[rows[src[rows] == s]], y[rows[src[rows] == s]], cloud[rows[src[rows] == s]])
           for s in sorted(set(src[rows]))]
    pooled = measures(pred[rows], y[rows], cloud[rows])
    parts = [np.mean([m[0] for m in per if m[0] is not None]), np.mean([m[1] for m in per if m[1] is not None]),
             pooled[0], pooled[1]]
    return float(np.mean([p for p in parts if p is not None]))


def main():
    args, graded, local = sys.argv[1:], [], []
    while args and args[0] in ("--graded-source", "--local-model"):
        (graded if args[0] == "--graded-source" else local).append(args[1])
        args = args[2:]
    local = local or ["8b-class"]
    rows = [json.loads(line) for f in args for line in open(f) if line.strip()]
    for r in rows:
        if r["source"] in graded:
            r["scores"] = {m: float(v + 1e-9 >= PASS_GRADE) for m, v in r["scores"].items()}
    cloud_of = strongest(rows)
    rows = [r for r in rows if any(m in SMALL for m in r["scores"])]
    prompts = [r["prompt"] for r in rows]
    src = np.array([r["source"] for r in rows])
    y = np.array([np.mean([v for m, v in r["scores"].items() if m in SMALL]) for r in rows])

    def label(r):
        for name in local:
            if name == "8b-class":
                return np.mean([v for m, v in r["scores"].items() if m in SMALL])
            if name in r["scores"]:
                return r["scores"][name]
        return np.nan

    # What a row is scored against (the fit always uses y, the 8b-class mean).
    y_eval = np.array([label(r) for r in rows])
    # Rows without the cloud label are trained on but not scored (as train.rs does).
    cloud = np.array([r["scores"].get(cloud_of[r["source"]], np.nan) for r in rows])
    print(f"{'held-out source':<22} {'rows':>6} {'auc':>6} {'apgr':>6} {'share@1pt':>9} {'oracle':>8}  alpha")
    outer = np.zeros(len(rows))
    everything = np.arange(len(rows))
    for s in sorted(set(src)):
        rest, te = everything[src != s], everything[src == s]
        scored = rest[~np.isnan(cloud[rest]) & ~np.isnan(y_eval[rest])]
        alpha = max(ALPHAS, key=lambda a: score(loso(prompts, y, src, rest, a), y_eval, cloud, src, scored))
        outer[te] = fit_predict(prompts, y, rest, te, alpha)
        ok = te[~np.isnan(cloud[te]) & ~np.isnan(y_eval[te])]
        auc, apgr, share, oracle = measures(outer[ok], y_eval[ok], cloud[ok])
        print(f"{s:<22} {len(ok):>6} {auc:>6.3f} {apgr:>6.3f} {share:>9.3f} {oracle:>8.3f}  {alpha}")
    # Every held-out row ranked together, each scored by the ridge that did not see its source.
    ok = everything[~np.isnan(cloud) & ~np.isnan(y_eval)]
    auc, apgr, share, oracle = measures(outer[ok], y_eval[ok], cloud[ok])
    print(f"{'(all held out, pooled)':<22} {len(ok):>6} {auc:>6.3f} {apgr:>6.3f} {share:>9.3f} {oracle:>8.3f}")


if __name__ == "__main__":
    main()
