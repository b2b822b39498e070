"""End-to-end checks of a running wattgate with the official `anthropic` Python package.

Usage: e2e_anthropic.py BASE_URL FALLBACK_URL NATIVE_URL   (gateway roots, without /v1)
  BASE_URL      the gateway configured by scripts/e2e_openai_python.sh (local and cloud upstreams)
  FALLBACK_URL  a gateway whose local upstream fails every request and whose cloud is a
                kind = "anthropic" backend ("claude") on a scripted Messages upstream
  NATIVE_URL    a gateway whose cloud is a kind = "anthropic" backend on an upstream answering
                every request with scripts/fixtures/native_messages_tool_use.json
Prints one line per check and a closing "N passed, M failed" line; exits 1 on any failure.
"""
import json
import sys
from pathlib import Path
import time
import urllib.request

import anthropic

sys.path.insert(0, str(Path(__file__).parent))
from e2e_checks import run  # noqa: E402

base_url, fallback_url, native_url = sys.argv[1], sys.argv[2], sys.argv[3]
client = anthropic.Anthropic(base_url=base_url, api_key="unused-by-the-gateway", max_retries=0)
fallback = anthropic.Anthropic(base_url=fallback_url, api_key="unused-by-the-gateway", max_retries=0)
native = anthropic.Anthropic(base_url=native_url, api_key="unused-by-the-gateway", max_retries=0)

WEATHER = {"name": "weather", "description": "The weather now",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def tools_pass_through_to_an_anthropic_cloud():
    ask = [{"role": "user", "content": "What's the weather in Paris?"}]
    raw = native.messages.with_raw_response.create(model="auto", max_tokens=200, tools=[WEATHER], messages=ask)
    message = raw.parse()
    assert raw.headers["x-wattgate-reason"] == "needs_native_api", dict(raw.headers)
    assert raw.headers["x-wattgate-backend"] == "claude", dict(raw.headers)
    assert message.stop_reason == "tool_use", message
    call = next(b for b in message.content if b.type == "tool_use")
    assert call.name == "weather" and call.input == {"city": "Paris"}, call
    assert message.usage.input_tokens == 40 and message.usage.output_tokens == 9, message.usage
    with native.messages.stream(model="auto", max_tokens=200, tools=[WEATHER], messages=ask) as s:
        final = s.get_final_message()
    call = next(b for b in final.content if b.type == "tool_use")
    assert call.name == "weather" and call.input == {"city": "Paris"}, final
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 9, final


def create():
    raw = client.messages.with_raw_response.create(
        model="auto", max_tokens=64, messages=[{"role": "user", "content": "say hello"}]
    )
    message = raw.parse()
    assert message.content[0].text == "local says hello", message
    assert message.role == "assistant" and message.stop_reason == "end_turn", message
    assert message.usage.input_tokens == 2 and message.usage.output_tokens == 3, message.usage
    assert raw.headers["x-wattgate-route"] == "local", dict(raw.headers)
    assert raw.headers["x-wattgate-reason"] == "prefer_local"


def stream():
    with client.messages.stream(
        model="auto",
        max_tokens=64,
        system="Be brief.",
        messages=[{"role": "user", "content": [{"type": "text", "text": "stream please"}]}],
    ) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "local says hello", text
    assert final.content[0].text == "local says hello", final
    assert final.usage.output_tokens == 3 and final.stop_reason == "end_turn", final


def unknown_model_is_not_found():
    try:
        client.messages.create(model="claude-nope", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    except anthropic.NotFoundError as e:
        assert e.body["type"] == "error" and e.body["error"]["type"] == "not_found_error", e.body
        assert "model_not_found" in e.body["error"]["message"], e.body
        return
    raise AssertionError("expected NotFoundError")


def tools_are_refused():
    try:
        client.messages.create(
            model="auto", max_tokens=8, messages=[{"role": "user", "content": "x"}],
            tools=[{"name": "f", "input_schema": {"type": "object"}}],
        )
    except anthropic.BadRequestError as e:
        assert e.body["error"]["type"] == "invalid_request_error", e.body
        assert "`tools`" in e.body["error"]["message"], e.body
        return
    raise AssertionError("expected BadRequestError")


def savings_by_backend():
    with urllib.request.urlopen(f"{fallback_url}/v1/savings") as r:
        return json.load(r)["savings"]["by_backend"]


def falls_back_to_an_anthropic_cloud():
    before = savings_by_backend().get("claude", {"requests": 0, "input_tokens": 0, "output_tokens": 0})
    raw = fallback.messages.with_raw_response.create(
        model="auto", max_tokens=64, messages=[{"role": "user", "content": "say hello"}]
    )
    message = raw.parse()
    assert message.content[0].text == "cloud says hello", message
    assert message.usage.input_tokens == 2 and message.usage.output_tokens == 3, message.usage
    assert raw.headers["x-wattgate-route"] == "cloud", dict(raw.headers)
    assert raw.headers["x-wattgate-backend"] == "claude"
    assert raw.headers["x-wattgate-reason"] == "fallback_local_error"
    assert raw.headers["x-wattgate-fallback-from"] == "local"
    with fallback.messages.stream(
        model="auto", max_tokens=64, messages=[{"role": "user", "content": "stream please"}]
    ) as s:
        assert "".join(s.text_stream) == "cloud says hello"
        final = s.get_final_message()
    assert final.usage.input_tokens == 2 and final.usage.output_tokens == 3, final.usage
    # Both requests are in the ledger with Claude's usage (it is flushed every 0.2 s).
    deadline = time.time() + 5
    while True:
        after = savings_by_backend().get("claude", {"requests": 0})
        if after["requests"] - before["requests"] >= 2:
            break
        assert time.time() < deadline, after
        time.sleep(0.1)
    assert after["input_tokens"] - before["input_tokens"] == 4, after
    assert after["output_tokens"] - before["output_tokens"] == 6, after


run(
    [
        ("messages.create, routed local, usage, headers", create),
        ("messages.stream with a system prompt: text, usage, stop reason", stream),
        ("unknown model -> NotFoundError in Anthropic's shape", unknown_model_is_not_found),
        ("tools -> BadRequestError naming tools (no cloud speaks Messages)", tools_are_refused),
        ("tools pass through to an Anthropic cloud: tool_use whole and streamed", tools_pass_through_to_an_anthropic_cloud),
        ("messages fall back from a failing local to an Anthropic cloud: headers, usage, ledger", falls_back_to_an_anthropic_cloud),
    ]
)
