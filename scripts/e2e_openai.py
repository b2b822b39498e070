"""End-to-end checks of a running wattgate with the official `openai` Python package.

Usage: e2e_openai.py BASE_URL FALLBACK_URL MINILM_DIR NATIVE_URL
  BASE_URL      the gateway configured by scripts/e2e_openai_python.sh (local and cloud upstreams)
  FALLBACK_URL  a gateway whose local upstream fails every request and whose cloud is a
                kind = "anthropic" backend
  MINILM_DIR    all-MiniLM-L6-v2's files (scripts/fetch_minilm.sh), for the numpy reference
  NATIVE_URL    a gateway with a cloud backend "gpt" speaking Responses natively
                (api = "responses"), on an upstream answering every request with
                scripts/fixtures/native_responses_function_call.json
Prints one line per check and a closing "N passed, M failed" line; exits 1 on any failure.
"""
import json
import math
import sys
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).parent))
from e2e_checks import run  # noqa: E402
from minilm_reference import MiniLM  # noqa: E402

base_url, fallback_url, minilm_dir, native_url = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key="unused-by-the-gateway", max_retries=0)
fallback = openai.OpenAI(base_url=fallback_url, api_key="unused-by-the-gateway", max_retries=0)
native = openai.OpenAI(base_url=native_url, api_key="unused-by-the-gateway", max_retries=0)

WEATHER = {"type": "function", "name": "weather", "description": "The weather now",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def responses_tools_pass_through():
    raw = native.responses.with_raw_response.create(model="gpt", input="Weather in Paris?", tools=[WEATHER])
    response = raw.parse()
    assert raw.headers["x-wattgate-backend"] == "gpt", dict(raw.headers)
    call = response.output[0]
    assert call.type == "function_call" and call.name == "weather", response
    assert json.loads(call.arguments) == {"city": "Paris"}, call
    assert response.usage.input_tokens == 30 and response.usage.output_tokens == 7, response.usage
    with native.responses.stream(model="gpt", input="Weather in Paris?", tools=[WEATHER]) as s:
        kinds = [event.type for event in s]
        final = s.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert "response.function_call_arguments.delta" in kinds, kinds
    assert json.loads(final.output[0].arguments) == {"city": "Paris"}, final
    # The tool's output goes back on the upstream's own response id.
    follow = native.responses.create(
        model="gpt", previous_response_id=response.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C"}],
    )
    assert follow.output[0].type == "function_call", follow


def non_streaming():
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "say hello"}]
    )
    reply = raw.parse()
    assert reply.choices[0].message.content == "local says hello", reply
    assert reply.model == "local-model", reply.model
    assert reply.usage.prompt_tokens == 2 and reply.usage.completion_tokens == 3, reply.usage
    assert raw.headers["x-wattgate-route"] == "local", dict(raw.headers)
    assert raw.headers["x-wattgate-reason"] == "prefer_local"
    assert float(raw.headers["x-wattgate-overhead-ms"]) >= 0
    assert raw.headers.get("x-request-id")


def streaming_with_usage():
    stream = client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == "local says hello", text
    assert usage is not None and usage.completion_tokens == 3, usage


def streaming_without_usage():
    stream = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "stream"}], stream=True
    )
    chunks = list(stream)
    assert all(getattr(c, "usage", None) is None for c in chunks), "usage leaked into the stream"
    assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices) == "local says hello"


def pinned_cloud():
    reply = client.chat.completions.create(
        model="cloud", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content == "cloud says hello", reply


def models_list():
    ids = [m.id for m in client.models.list()]
    assert ids == ["auto", "local", "cloud", "all-minilm-l6-v2"], ids


def unknown_model_is_not_found():
    try:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found", e.body
        return
    raise AssertionError("expected NotFoundError")


def missing_messages_is_bad_request():
    try:
        client.chat.completions.create(model="auto", messages=[])
    except openai.BadRequestError as e:
        assert e.body["param"] == "messages", e.body
        return
    raise AssertionError("expected BadRequestError")


def responses_create():
    raw = client.responses.with_raw_response.create(model="auto", input="say hello")
    reply = raw.parse()
    assert reply.output_text == "local says hello", reply
    assert reply.status == "completed" and reply.id.startswith("resp_"), reply
    assert reply.usage.input_tokens == 2 and reply.usage.output_tokens == 3, reply.usage
    assert raw.headers["x-wattgate-route"] == "local", dict(raw.headers)
    assert raw.headers["x-wattgate-reason"] == "prefer_local"


def responses_stream():
    seen = []
    with client.responses.stream(model="auto", input="stream please", instructions="Be brief.") as stream:
        for event in stream:
            seen.append(event.type)
        final = stream.get_final_response()
    assert final.output_text == "local says hello", final
    assert final.usage is not None and final.usage.output_tokens == 3, final.usage
    assert seen[0] == "response.created" and seen[-1] == "response.completed", seen
    assert seen.count("response.output_text.delta") == 3, seen


def responses_follow_up():
    first = client.responses.create(model="auto", input="name a colour")
    second = client.responses.create(model="auto", input="another", previous_response_id=first.id)
    assert second.output_text == "local says hello" and second.previous_response_id == first.id, second
    try:
        client.responses.create(model="auto", input="x", previous_response_id="resp_unknown")
    except openai.NotFoundError as e:
        assert e.body["code"] == "previous_response_not_found", e.body
    else:
        raise AssertionError("expected NotFoundError for an unknown previous_response_id")
    unstored = client.responses.create(model="auto", input="forget me", store=False)
    try:
        client.responses.create(model="auto", input="x", previous_response_id=unstored.id)
    except openai.NotFoundError:
        return
    raise AssertionError("a store=False response was kept")


def responses_tools_refused():
    try:
        client.responses.create(
            model="auto", input="x",
            tools=[{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}],
        )
    except openai.BadRequestError as e:
        assert e.body["param"] == "tools", e.body
        return
    raise AssertionError("expected BadRequestError")


def responses_fall_back_to_the_cloud():
    raw = fallback.responses.with_raw_response.create(model="auto", input="say hello")
    reply = raw.parse()
    assert reply.output_text == "cloud says hello"
    assert reply.usage.input_tokens == 2 and reply.usage.output_tokens == 3, reply.usage
    assert raw.headers["x-wattgate-backend"] == "claude", "the fallback gateway's cloud is Anthropic's protocol"
    assert raw.headers["x-wattgate-route"] == "cloud", dict(raw.headers)
    assert raw.headers["x-wattgate-reason"] == "fallback_local_error"
    assert raw.headers["x-wattgate-fallback-from"] == "local"
    with fallback.responses.stream(model="auto", input="stream please") as stream:
        final = stream.get_final_response()
    assert final.output_text == "cloud says hello", final


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def embeddings():
    texts = [
        "A man is playing a guitar.",
        "Someone is playing the guitar.",
        "The central bank raised interest rates again.",
    ]
    # The SDK asks for base64 unless told otherwise, and decodes it.
    raw = client.embeddings.with_raw_response.create(model="all-minilm-l6-v2", input=texts)
    reply = raw.parse()
    vectors = [d.embedding for d in reply.data]
    assert [len(v) for v in vectors] == [384, 384, 384], [len(v) for v in vectors]
    same, other = cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2])
    assert same > other, (same, other)
    reference = MiniLM(minilm_dir).embed(texts)
    worst = max(abs(a - b) for v, r in zip(vectors, reference) for a, b in zip(v, r))
    assert worst < 1e-4, f"largest difference from the numpy reference: {worst}"
    tokens = sum(len(MiniLM.tokens(minilm_dir, t)) for t in texts)
    assert reply.usage.prompt_tokens == tokens, (reply.usage, tokens)
    assert raw.headers["x-wattgate-energy"] in ("measured", "estimated"), dict(raw.headers)
    assert float(raw.headers["x-wattgate-energy-joules"]) >= 0
    floats = client.embeddings.create(model="all-minilm-l6-v2", input=texts[0], encoding_format="float")
    assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, vectors[0])) < 1e-6
    print(f"      cosine paraphrase {same:.4f} > unrelated {other:.4f}; max |wattgate - numpy| = {worst:.2e}")


def embeddings_refusals():
    try:
        client.embeddings.create(model="all-minilm-l6-v2", input="x", dimensions=256)
    except openai.BadRequestError as e:
        assert e.body["param"] == "dimensions", e.body
    else:
        raise AssertionError("dimensions=256 accepted by a 384-dimension model")
    try:
        client.embeddings.create(model="auto", input="x")
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found", e.body
        return
    raise AssertionError("a chat model embedded")


run(
    [
        ("non-streaming completion, routed local, headers", non_streaming),
        ("streaming completion with include_usage", streaming_with_usage),
        ("streaming completion without usage", streaming_without_usage),
        ("pinned cloud model", pinned_cloud),
        ("models list", models_list),
        ("unknown model -> NotFoundError", unknown_model_is_not_found),
        ("empty messages -> BadRequestError", missing_messages_is_bad_request),
        ("responses.create, routed local, usage, headers", responses_create),
        ("responses.stream: events, text, usage", responses_stream),
        ("responses previous_response_id, unknown id, store=False", responses_follow_up),
        ("responses with tools -> BadRequestError naming tools (no cloud speaks Responses)", responses_tools_refused),
        ("responses with tools pass through to a cloud speaking Responses, whole and streamed", responses_tools_pass_through),
        ("responses fall back from a failing local to an Anthropic cloud", responses_fall_back_to_the_cloud),
        ("embeddings: 384 dims, paraphrases closer, equal to a numpy reference to 1e-4", embeddings),
        ("embeddings: dimensions refused, chat model not found", embeddings_refusals),
    ]
)
