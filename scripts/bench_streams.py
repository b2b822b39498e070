"""Concurrent streaming clients for scripts/bench_vs_llama_server.sh.

bench_streams.py BASE_URL MODEL CONCURRENCY REQUESTS MAX_TOKENS TEMPERATURE PROMPTS_FILE

CONCURRENCY clients (the official `openai` package, no retries) share REQUESTS streaming chat
requests, each asking MAX_TOKENS tokens; prompts are taken in order from PROMPTS_FILE (JSON
lines with `messages`). Prints one JSON line: aggregate output tokens/s over the wall time, time
to first content p50/p99, per-request decode tokens/s (after the first token) p50, and the
number of requests and tokens. Output tokens come from each stream's usage chunk."""
import asyncio
import json
import statistics
import sys
import time

from openai import AsyncOpenAI

base, model = sys.argv[1], sys.argv[2]
concurrency, requests, max_tokens = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
temperature, prompts_file = float(sys.argv[6]), sys.argv[7]

with open(prompts_file) as f:
    prompts = [json.loads(line)["messages"] for line in f if line.strip()]


def pct(values, p):
    values = sorted(values)
    if not values:
        return None
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


async def one(client, i):
    started = time.monotonic()
    stream = await client.chat.completions.create(
        model=model,
        messages=prompts[i % len(prompts)],
        max_tokens=max_tokens,
        temperature=temperature,
        stream=True,
        stream_options={"include_usage": True},
    )
    first = last = None
    tokens = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.monotonic()
            first = first or now
            last = now
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    ttft = (first or time.monotonic()) - started
    decode = (tokens - 1) / (last - first) if first and last and last > first and tokens > 1 else None
    return ttft, tokens, decode


async def main():
    client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
    queue = list(range(requests))
    results = []

    async def worker():
        while queue:
            i = queue.pop(0)
            results.append(await one(client, i))

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.monotonic() - started
    ttfts = [r[0] for r in results]
    decodes = [r[2] for r in results if r[2]]
    tokens = sum(r[1] for r in results)
    print(json.dumps({
        "concurrency": concurrency, "requests": len(results), "tokens": tokens,
        "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 1),
        "ttft_p50_s": round(pct(ttfts, 50), 3), "ttft_p99_s": round(pct(ttfts, 99), 3),
        "decode_tok_s_p50": round(statistics.median(decodes), 1) if decodes else None,
    }))


asyncio.run(main())
