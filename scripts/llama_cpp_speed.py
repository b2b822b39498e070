"""One measurement of llama.cpp (llama-cpp-python) for scripts/bench_embedded.sh, same protocol as
examples/bench_embedded.rs: load, prefill, greedy decode, peak RSS, as one JSON line.
Usage: llama_cpp_speed.py PATH.gguf PROMPT DECODE_TOKENS THREADS"""
import sys, time, json, resource
import numpy as np
from llama_cpp import Llama
path, prompt, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0 = time.time()
llm = Llama(model_path=path, n_ctx=4096, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
load = time.time() - t0
toks = llm.tokenize(prompt.encode(), add_bos=True, special=True)
# Prefill timed 5 times from an empty cache, median kept (as examples/bench_embedded.rs does).
times = []
for _ in range(5):
    llm.reset()
    t = time.time(); llm.eval(toks); times.append(time.time() - t)
prefill = sorted(times)[len(times) // 2]
vocab = llm.n_vocab()
out = []
t = time.time()
for _ in range(n):
    # The last evaluated token's logits (llm.scores is only filled with logits_all=True).
    tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
    out.append(tok); llm.eval([tok])
decode = time.time() - t
print(json.dumps({"engine": "llama.cpp", "load_s": load, "prompt_tokens": len(toks), "prefill_tok_s": len(toks)/prefill, "decode_tok_s": n/decode, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024, "greedy_ids": out}))
