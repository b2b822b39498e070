"""Time to first token of streamed embedded answers with the quality guard's hold and without it.

Usage: guard_ttft.py BASE_URL [N] [MAX_TOKENS]
Alternates `x-wattgate-guard: check` (held until the answer ends) and `off` on the same prompts
(real chat prompts from ../shared/data/traffic when present), greedy, one at a time, and prints
TTFT p50/p90 and whole-answer time for both.
"""
import json
import os
import statistics
import sys
import time
import urllib.request

base, n, max_tokens = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10, int(sys.argv[3]) if len(sys.argv) > 3 else 128
path = os.path.join(os.path.dirname(__file__), "../../shared/data/traffic/chat-prompts.jsonl")
prompts = []
if os.path.exists(path):
    with open(path) as f:
        for line in f:
            m = json.loads(line)["messages"]
            if len(m[0]["content"]) < 400:
                prompts.append(m)
            if len(prompts) >= n:
                break
while len(prompts) < n:
    prompts.append([{"role": "user", "content": "Write a short poem about the sea."}])


def one(messages, guard):
    body = json.dumps({"model": "auto", "messages": messages, "stream": True, "temperature": 0,
                       "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(base + "/chat/completions", data=body, method="POST",
                                 headers={"content-type": "application/json", "x-wattgate-guard": guard})
    start = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if first is None and line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter() - start
    return first if first is not None else float("nan"), time.perf_counter() - start


results = {"check": [], "off": []}
one(prompts[0], "off")  # warm-up
for m in prompts:
    for guard in ("check", "off"):
        results[guard].append(one(m, guard))
for guard, rows in results.items():
    ttft = sorted(r[0] for r in rows)
    total = [r[1] for r in rows]
    p90 = ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))]
    print(f"guard={guard:5}  n={len(rows)}  TTFT p50 {statistics.median(ttft):.3f} s  p90 {p90:.3f} s  "
          f"whole answer p50 {statistics.median(total):.3f} s")
