"""Clients for scripts/load_embedded.sh: load_embedded.py GATEWAY_URL CLIENTS PER_CLIENT QUEUE_TIMEOUT_S.

Each client sends PER_CLIENT streaming chat requests one after another with the official `openai`
package (no retries). Every request must end with a complete stream; each is served locally or
falls back to the cloud with reason `local_busy`; the time to the first content chunk must stay
under the queue deadline plus 0.25 s for a fallback (the loopback cloud's reply) or plus 1 s for a
local answer (prefill of a short prompt and the first token).
Exits non-zero, naming the failures, when any check fails."""
import asyncio
import json
import re
import sys
import time
import urllib.request

from openai import AsyncOpenAI

base, clients, per_client, queue_timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
PROMPTS = [
    "Write a haiku about autumn.",
    "Name three primary colors.",
    "What is the boiling point of water in Celsius?",
    "Give one tip for writing clear emails.",
]


async def one(client, i, j):
    started = time.monotonic()
    raw = await client.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": PROMPTS[(i + j) % len(PROMPTS)]}],
        max_tokens=32,
        temperature=0,
        stream=True,
    )
    first = None
    text = []
    finish = None
    async for chunk in raw.parse():
        if chunk.choices:
            delta = chunk.choices[0].delta.content or ""
            if delta and first is None:
                first = time.monotonic() - started
            text.append(delta)
            finish = chunk.choices[0].finish_reason or finish
    return {
        "client": i, "request": j, "route": raw.headers.get("x-wattgate-route"),
        "reason": raw.headers.get("x-wattgate-reason"), "status": raw.status_code,
        "first_content_s": first, "total_s": time.monotonic() - started,
        "chars": len("".join(text)), "finish_reason": finish,
    }


async def client_loop(i):
    client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    results = []
    for j in range(per_client):
        try:
            results.append(await one(client, i, j))
        except Exception as e:  # a lost request is a failure to report, not a crash
            results.append({"client": i, "request": j, "error": repr(e)})
    await client.close()
    return results


async def main():
    started = time.monotonic()
    per = await asyncio.gather(*(client_loop(i) for i in range(clients)))
    wall = time.monotonic() - started
    results = [r for rs in per for r in rs]
    failures = []
    for r in results:
        if "error" in r:
            failures.append(f"client {r['client']} request {r['request']} failed: {r['error']}")
            continue
        if r["status"] != 200 or r["finish_reason"] is None or r["chars"] == 0:
            failures.append(f"incomplete: {r}")
        if not (r["route"] == "local" or (r["route"] == "cloud" and r["reason"] == "local_busy")):
            failures.append(f"neither local nor a local_busy fallback: {r}")
        # A fallback answers from the loopback cloud within milliseconds of giving up on the
        # queue; a local answer also includes the prompt's prefill and the first token.
        allowed = queue_timeout + (0.25 if r["route"] == "cloud" else 1.0)
        if r["first_content_s"] is None or r["first_content_s"] > allowed:
            failures.append(f"waited past the queue deadline: {r}")
    local = [r for r in results if r.get("route") == "local"]
    busy = [r for r in results if r.get("reason") == "local_busy"]
    with urllib.request.urlopen(base + "/metrics", timeout=5) as m:
        metrics = m.read().decode()
    counted = sum(float(v) for v in re.findall(r'wattgate_fallbacks_total\{[^}]*kind="busy"[^}]*\} (\S+)', metrics))
    if counted != len(busy):
        failures.append(f"metrics count {counted} busy fallbacks, clients saw {len(busy)}")

    def dist(rs, key):
        xs = sorted(r[key] for r in rs if r.get(key) is not None)
        if not xs:
            return "-"
        return f"p50 {xs[len(xs) // 2]:.2f}s max {xs[-1]:.2f}s"

    print(json.dumps({
        "requests": len(results), "completed": len(results) - sum("error" in r for r in results),
        "local": len(local), "cloud_local_busy": len(busy), "wall_s": round(wall, 2),
        "metrics_busy_fallbacks": counted,
    }))
    print(f"first content, local: {dist(local, 'first_content_s')}; cloud: {dist(busy, 'first_content_s')}; "
          f"queue deadline {queue_timeout:.1f}s")
    print(f"total per request, local: {dist(local, 'total_s')}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("ok: no request lost; excess went to the cloud with local_busy; none waited past the deadline")


asyncio.run(main())
