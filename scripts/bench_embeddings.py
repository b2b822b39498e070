"""Embeddings throughput: wattgate's /v1/embeddings against sentence-transformers, same texts.

usage: bench_embeddings.py BASE_URL MODEL_DIR N   (run by scripts/bench_embeddings.sh)
Prints one line per measurement and the ratios. Both sides get the same units of work: at batch
B, requests (wattgate) or encode calls (sentence-transformers) of B texts each. Texts are the first N chat prompts of
../shared/data/traffic/chat-prompts.jsonl (cut at 256 word pieces by both, as the model was
trained). Each side gets a warm-up pass first.
"""
import json
import sys
import time

import httpx
import torch
from sentence_transformers import SentenceTransformer

base_url, model_dir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open("../shared/data/traffic/chat-prompts.jsonl") as f:
    texts = [json.loads(line)["messages"][0]["content"] for line in f][:n]
client = httpx.Client(base_url=base_url, timeout=600)


def wattgate(batch, texts=texts):
    for i in range(0, len(texts), batch):
        r = client.post("/embeddings", json={"model": "all-minilm-l6-v2", "input": texts[i : i + batch], "encoding_format": "base64"})
        r.raise_for_status()


torch.set_num_threads(2)
st = SentenceTransformer(model_dir, device="cpu")


def reference(batch, texts=texts):
    # The same unit of work as a request: `batch` texts per call, sorted and padded by the
    # library within the call.
    for i in range(0, len(texts), batch):
        st.encode(texts[i : i + batch], batch_size=batch, normalize_embeddings=True)


results = {}
for name, run in (("wattgate", wattgate), ("sentence-transformers", reference)):
    run(8, texts[:32])  # warm-up: the first request loads the encoder
    for batch in (1, 32):
        started = time.perf_counter()
        run(batch)
        seconds = time.perf_counter() - started
        results[(name, batch)] = len(texts) / seconds
        print(f"{name:<22} batch {batch:>2}: {len(texts) / seconds:8.1f} texts/s ({len(texts)} texts in {seconds:.2f} s)")
for batch in (1, 32):
    ratio = results[("wattgate", batch)] / results[("sentence-transformers", batch)]
    print(f"batch {batch:>2}: wattgate / sentence-transformers = {ratio:.2f}x")
import sentence_transformers
print(f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}")
