"""End-to-end check of the embedded model's `logprobs` with the official `openai` package.

Usage: e2e_logprobs.py BASE_URL   (a gateway whose `auto` is served by the embedded model)
Prints one line per check and a closing "N passed, M failed" line; exits 1 on any failure.
"""
import math
import sys
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).parent))
from e2e_checks import run  # noqa: E402

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused-by-the-gateway", max_retries=0)
ASK = [{"role": "user", "content": "Name three colours of the rainbow."}]


def assert_greedy_entries(entries, answer):
    assert entries, "no logprobs.content entries"
    joined = "".join(t.token for t in entries)
    assert joined == answer, (joined, answer)
    for t in entries:
        assert t.logprob <= 0.0 and math.isfinite(t.logprob), t
        assert bytes(t.bytes) == t.token.encode(), t
        assert len(t.top_logprobs) == 3, t
        # Greedy: the sampled token is the most likely one, with the same log-probability.
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6, t
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob


def json_logprobs():
    reply = client.chat.completions.create(
        model="auto", messages=ASK, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3
    )
    choice = reply.choices[0]
    assert_greedy_entries(choice.logprobs.content, choice.message.content)
    assert len(choice.logprobs.content) <= reply.usage.completion_tokens


def stream_logprobs():
    stream = client.chat.completions.create(
        model="auto", messages=ASK, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3,
        stream=True,
    )
    text, entries = "", []
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None and choice.logprobs.content:
                entries.extend(choice.logprobs.content)
    assert_greedy_entries(entries, text)


def no_logprobs_unless_asked():
    reply = client.chat.completions.create(model="auto", messages=ASK, temperature=0, max_tokens=4)
    assert reply.choices[0].logprobs is None, reply.choices[0].logprobs


def too_many_top_logprobs():
    try:
        client.chat.completions.create(
            model="auto", messages=ASK, max_tokens=4, logprobs=True, top_logprobs=21
        )
    except openai.BadRequestError as e:
        assert e.body["param"] == "top_logprobs", e.body
        assert "20" in e.body["message"], e.body
        return
    raise AssertionError("expected BadRequestError")


run(
    [
        ("embedded logprobs, JSON: tokens join to the answer, top-1 = sampled at T=0", json_logprobs),
        ("embedded logprobs, stream: the same over chunks", stream_logprobs),
        ("no logprobs unless asked", no_logprobs_unless_asked),
        ("top_logprobs = 21 -> BadRequestError naming the field", too_many_top_logprobs),
    ]
)
