"""The issue's reference baseline, rebuilt: TF-IDF (word 1-2 grams) + ridge regression on the mean
correctness of the 7-9B-class models, validated leave-one-source-out with the same labels and
measures as `wattgate router train` (local label 8b-class, cloud label the strongest labeled model
of each source; AUC, APGR, local share within 1 point, oracle share).

usage: baseline_tfidf_ridge.py FILE.jsonl...     (needs numpy, scikit-learn)
"""
import json
import sys
from collections import defaultdict

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import Ridge

# Same list as src/router/train.rs SMALL_MODELS.
SMALL = {
    "mixtral-8x7b-instruct-v0.1", "meta-llama-3.1-8b-instruct", "llama-3.1-8b-instruct",
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


def main():
    rows = [json.loads(line) for f in sys.argv[1:] for line in open(f) if line.strip()]
    cloud_of = strongest(rows)
    rows = [r for r in rows if any(m in SMALL for m in r["scores"]) and cloud_of[r["source"]] in r["scores"]]
    prompts = [r["prompt"] for r in rows]
    src = np.array([r["source"] for r in rows])
    y = np.array([np.mean([v for m, v in r["scores"].items() if m in SMALL]) for r in rows])
    cloud = np.array([r["scores"][cloud_of[r["source"]]] for r in rows])
    print(f"{'held-out source':<22} {'rows':>6} {'auc':>6} {'apgr':>6} {'share@1pt':>9} {'oracle':>8}")
    pooled = np.zeros(len(rows))
    for s in sorted(set(src)):
        te, tr = src == s, src != s
        vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
        xtr = vec.fit_transform([prompts[i] for i in np.where(tr)[0]])
        xte = vec.transform([prompts[i] for i in np.where(te)[0]])
        p = Ridge(alpha=1.0).fit(xtr, y[tr]).predict(xte)
        pooled[te] = p
        auc, apgr, share, oracle = measures(p, y[te], cloud[te])
        print(f"{s:<22} {te.sum():>6} {auc:>6.3f} {apgr:>6.3f} {share:>9.3f} {oracle:>8.3f}")
    # Every held-out row ranked together, each scored by the head that did not see its source.
    auc, apgr, share, oracle = measures(pooled, y, cloud)
    print(f"{'(all held out, pooled)':<22} {len(rows):>6} {auc:>6.3f} {apgr:>6.3f} {share:>9.3f} {oracle:>8.3f}")


if __name__ == "__main__":
    main()
