//! Requests the edge cannot translate to chat, passed through natively: `/v1/messages` with tools
//! to a `kind = "anthropic"` cloud, `/v1/responses` with tools to an OpenAI cloud with
//! `api = "responses"`. The upstream must receive the client's body as it came (its own model
//! named), the client must get the upstream's answer as it came (tool calls included), whole and
//! streamed, and the ledger must count the native answer's own usage. Without a backend speaking
//! the API, the same request is a 400 naming the field; pinned to a local backend, a 400 naming
//! the backend.

mod support;

use serde_json::{json, Value};
use support::apis::Api;
use support::{backend, Gateway};
use wattgate_testkit::{Behavior, ScriptedUpstream};

/// A local backend and an Anthropic cloud, after `head`.
fn local_and_claude(head: &str, local: &str, cloud: &str) -> String {
    format!(
        "{head}\n{}{}",
        backend("local", "local", local, ""),
        claude(cloud)
    )
}

fn claude(url: &str) -> String {
    format!(
        "[[backends]]\nname = \"claude\"\nkind = \"anthropic\"\nrole = \"cloud\"\nbase_url = \"{url}\"\nmodel = \"claude-test\"\nparameters = 1e11\nusd_per_million_input_tokens = 3.0\nusd_per_million_output_tokens = 15.0\n"
    )
}

/// An OpenAI cloud that speaks the Responses API natively.
fn responses_cloud(url: &str) -> String {
    backend("cloud", "cloud", url, "api = \"responses\"")
}

/// Anthropic's answer calling a tool, whole and as its event stream.
fn tool_use_answer() -> Behavior {
    let tool_use =
        json!({"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}});
    Behavior::Native {
        whole: json!({"id": "msg_up", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [{"type": "text", "text": "Checking."}, tool_use],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 40, "cache_read_input_tokens": 2, "output_tokens": 9}}),
        events: vec![
            json!({"type": "message_start", "message": {"id": "msg_up", "type": "message", "role": "assistant",
                "model": "claude-test", "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 40, "cache_read_input_tokens": 2, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}}),
            json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Paris\"}"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                "usage": {"output_tokens": 9}}),
            json!({"type": "message_stop"}),
        ],
    }
}

/// OpenAI's Responses answer calling a function, whole and as its event stream.
fn function_call_answer() -> Behavior {
    let call = json!({"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "weather",
        "arguments": "{\"city\":\"Paris\"}", "status": "completed"});
    let response = |status: &str, output: Value| {
        json!({"id": "resp_up", "object": "response", "created_at": 1, "status": status,
            "model": "gpt-test", "output": output,
            "usage": {"input_tokens": 30, "output_tokens": 7, "total_tokens": 37}})
    };
    Behavior::Native {
        whole: response("completed", json!([call])),
        events: vec![
            json!({"type": "response.created", "sequence_number": 0, "response": response("in_progress", json!([]))}),
            json!({"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": call}),
            json!({"type": "response.function_call_arguments.done", "sequence_number": 2, "output_index": 0,
                "item_id": "fc_1", "arguments": "{\"city\":\"Paris\"}"}),
            json!({"type": "response.completed", "sequence_number": 3, "response": response("completed", json!([call]))}),
        ],
    }
}

fn messages_with_tools(stream: bool) -> Value {
    json!({"model": "auto", "max_tokens": 200, "stream": stream,
        "tools": [{"name": "weather", "description": "Weather now", "input_schema":
            {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "auto"},
        "messages": [{"role": "user", "content": "What's the weather in Paris?"}]})
}

fn responses_with_tools(stream: bool) -> Value {
    json!({"model": "auto", "stream": stream, "input": "What's the weather in Paris?",
        "tools": [{"type": "function", "name": "weather", "parameters":
            {"type": "object", "properties": {"city": {"type": "string"}}}}]})
}

/// Posts and reads the whole answer.
async fn post(gw: &Gateway, api: Api, body: &Value) -> support::apis::Sent {
    api.send_body(gw, body).await
}

/// The named events of an SSE body, in order.
fn events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|f| !f.trim().is_empty() && !f.starts_with(':'))
        .map(|f| {
            let (name, data) = f
                .strip_prefix("event: ")
                .and_then(|f| f.split_once("\ndata: "))
                .unwrap_or_else(|| panic!("not a named event: {f:?}"));
            (
                name.to_owned(),
                serde_json::from_str(data).expect("event JSON"),
            )
        })
        .collect()
}

#[tokio::test]
async fn messages_with_tools_pass_through_to_an_anthropic_cloud_whole_and_streamed() {
    let local = ScriptedUpstream::start("local", vec![Behavior::Reply("local".into())])
        .await
        .expect("local");
    let cloud = ScriptedUpstream::start("claude-test", vec![tool_use_answer()])
        .await
        .expect("cloud");
    let gw = Gateway::start(&local_and_claude(
        "[ledger]\nflush_interval_s = 0.05",
        &local.base_url(),
        &cloud.base_url(),
    ))
    .await;

    let r = post(&gw, Api::Messages, &messages_with_tools(false)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-wattgate-route"), "cloud");
    assert_eq!(r.header("x-wattgate-reason"), "needs_native_api");
    assert_eq!(r.header("x-wattgate-backend"), "claude");
    // The upstream's answer, as it came: the tool call and its usage.
    let answer: Value = serde_json::from_str(&r.body).expect("JSON");
    let Behavior::Native { whole, .. } = tool_use_answer() else {
        unreachable!()
    };
    assert_eq!(answer, whole);

    let r = post(&gw, Api::Messages, &messages_with_tools(true)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let got = events(&r.body);
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ],
        "{}",
        r.body
    );
    assert_eq!(got[2].1["delta"]["type"], "input_json_delta");
    assert!(!r.body.contains("[DONE]"), "{}", r.body);

    // The upstream got the client's body, its own model named, on its Messages path.
    let sent = cloud.requests();
    assert_eq!(sent.len(), 2);
    for (req, stream) in sent.iter().zip([false, true]) {
        assert_eq!(req.path, "/v1/messages");
        let mut expected = messages_with_tools(stream);
        expected["model"] = json!("claude-test");
        assert_eq!(req.body, expected);
    }
    assert_eq!(local.hits(), 0, "a native request is never served locally");

    // Metered from the native usage: 42 input tokens (cache reads count), 9 output.
    let path = gw.ledger.clone();
    let _dir = gw.stop().await;
    let rows = support::ledger_rows(&path);
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(
            (row.backend.as_str(), row.outcome.as_str()),
            ("claude", "ok")
        );
        assert_eq!((row.input_tokens, row.output_tokens), (42, 9), "{row:?}");
    }
}

#[tokio::test]
async fn responses_with_tools_pass_through_to_a_cloud_speaking_responses() {
    let cloud = ScriptedUpstream::start("gpt-test", vec![function_call_answer()])
        .await
        .expect("cloud");
    let gw = Gateway::start(&format!(
        "[ledger]\nflush_interval_s = 0.05\n{}",
        responses_cloud(&cloud.base_url())
    ))
    .await;

    let r = post(&gw, Api::Responses, &responses_with_tools(false)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let answer: Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(answer["output"][0]["type"], "function_call");
    assert_eq!(answer["id"], "resp_up", "the upstream's own response");

    let r = post(&gw, Api::Responses, &responses_with_tools(true)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let got = events(&r.body);
    assert_eq!(
        got.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        [
            "response.created",
            "response.output_item.added",
            "response.function_call_arguments.done",
            "response.completed"
        ]
    );
    for (name, data) in &got {
        assert_eq!(data["type"], name.as_str());
    }

    // The follow-up with the tool's output continues the upstream's own conversation: its
    // `previous_response_id` is the upstream's, passed through.
    let follow_up = json!({"model": "auto", "previous_response_id": "resp_up",
        "input": [{"type": "function_call_output", "call_id": "call_1", "output": "18C"}]});
    let r = post(&gw, Api::Responses, &follow_up).await;
    assert_eq!(r.status, 200, "{}", r.body);

    let sent = cloud.requests();
    assert_eq!(sent.len(), 3);
    assert!(sent.iter().all(|r| r.path == "/v1/responses"));
    let mut expected = responses_with_tools(false);
    expected["model"] = json!("cloud-upstream");
    assert_eq!(sent[0].body, expected);
    assert_eq!(sent[2].body["previous_response_id"], "resp_up");
    assert_eq!(sent[2].body["input"], follow_up["input"]);

    let path = gw.ledger.clone();
    let _dir = gw.stop().await;
    let rows = support::ledger_rows(&path);
    assert_eq!(rows.len(), 3);
    for row in &rows {
        assert_eq!((row.input_tokens, row.output_tokens), (30, 7), "{row:?}");
    }
}

#[tokio::test]
async fn a_conversation_the_gateway_kept_goes_to_the_native_upstream_as_input_items() {
    // The first turn is translated (plain text) and kept by the gateway; the second adds tools,
    // so it goes natively, and the upstream, which never saw the first turn, gets it as input.
    let cloud = ScriptedUpstream::start(
        "gpt-test",
        vec![
            Behavior::Reply("Hello there".into()),
            function_call_answer(),
        ],
    )
    .await
    .expect("cloud");
    let gw = Gateway::start(&responses_cloud(&cloud.base_url())).await;
    let r = post(
        &gw,
        Api::Responses,
        &json!({"model": "auto", "input": "Hi"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let first: Value = serde_json::from_str(&r.body).expect("JSON");
    let mut second = responses_with_tools(false);
    second["previous_response_id"] = first["id"].clone();
    let r = post(&gw, Api::Responses, &second).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let sent = cloud.requests();
    assert_eq!(sent[0].path, "/v1/chat/completions");
    assert_eq!(sent[1].path, "/v1/responses");
    assert!(sent[1].body.get("previous_response_id").is_none());
    assert_eq!(
        sent[1].body["input"],
        json!([{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "What's the weather in Paris?"}])
    );
}

#[tokio::test]
async fn a_native_stream_that_breaks_ends_in_the_apis_error_event() {
    // The upstream stops before its closing event: the client gets what came, then its API's
    // error event, and the ledger row is an error.
    let Behavior::Native { whole, mut events } = tool_use_answer() else {
        unreachable!()
    };
    events.truncate(3);
    let cloud = ScriptedUpstream::start("claude-test", vec![Behavior::Native { whole, events }])
        .await
        .expect("cloud");
    let gw = Gateway::start(&claude(&cloud.base_url())).await;
    let r = post(&gw, Api::Messages, &messages_with_tools(true)).await;
    assert_eq!(r.status, 200);
    let got = self::events(&r.body);
    assert_eq!(got.len(), 4, "{}", r.body);
    let (last, data) = &got[3];
    assert_eq!(last, "error");
    assert_eq!(Api::Messages.error_code(data), "upstream_protocol_error");

    let Behavior::Native { whole, mut events } = function_call_answer() else {
        unreachable!()
    };
    events.truncate(2);
    let cloud = ScriptedUpstream::start("gpt-test", vec![Behavior::Native { whole, events }])
        .await
        .expect("cloud");
    let gw = Gateway::start(&responses_cloud(&cloud.base_url())).await;
    let r = post(&gw, Api::Responses, &responses_with_tools(true)).await;
    let got = self::events(&r.body);
    assert_eq!(got.len(), 3, "{}", r.body);
    let (last, data) = &got[2];
    assert_eq!(last, "error");
    assert_eq!(data["code"], "upstream_protocol_error");
    assert_eq!(data["sequence_number"], 2, "continues the upstream's count");
}

#[tokio::test]
async fn without_a_backend_speaking_the_api_the_request_is_a_400_naming_the_field() {
    let up = ScriptedUpstream::start("u", vec![Behavior::Reply("ok".into())])
        .await
        .expect("upstream");
    // An OpenAI cloud speaking chat only: neither API can pass through.
    let gw = Gateway::start(&support::local_and_cloud(
        "",
        &up.base_url(),
        &up.base_url(),
        "",
    ))
    .await;
    for (api, body) in [
        (Api::Messages, messages_with_tools(false)),
        (Api::Responses, responses_with_tools(false)),
    ] {
        let r = post(&gw, api, &body).await;
        assert_eq!(r.status, 400, "{}", r.body);
        let v: Value = serde_json::from_str(&r.body).expect("JSON");
        assert_eq!(api.error_code(&v), "unsupported_parameter", "{v}");
        assert!(r.body.contains("`tools`") || r.body.contains("tool"), "{v}");
    }
    assert_eq!(up.hits(), 0);

    // With a cloud that speaks Messages, a request pinned to the local backend is refused
    // naming it, and never reaches either upstream.
    let cloud = ScriptedUpstream::start("claude-test", vec![tool_use_answer()])
        .await
        .expect("cloud");
    let gw = Gateway::start(&local_and_claude("", &up.base_url(), &cloud.base_url())).await;
    let mut pinned = messages_with_tools(false);
    pinned["model"] = json!("local");
    let r = post(&gw, Api::Messages, &pinned).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(Api::Messages.error_code(&v), "unsupported_by_backend");
    assert!(r.body.contains("`local`"), "{}", r.body);
    assert_eq!((up.hits(), cloud.hits()), (0, 0));
}
