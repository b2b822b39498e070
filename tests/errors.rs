//! Bad input: every case gets the right status and an OpenAI-shaped error naming what was wrong,
//! and no upstream is called.

mod support;

use async_openai::error::OpenAIError;
use async_openai::types::chat::CreateChatCompletionRequestArgs;
use serde_json::{json, Value};
use support::apis::{for_each_api, Api};
use support::{chat_body, expect_error, header, local_and_cloud, Gateway};
use wattgate_testkit::{Behavior, ScriptedUpstream};

async fn setup(head: &str) -> (ScriptedUpstream, Gateway) {
    let up = ScriptedUpstream::start("u", vec![Behavior::Reply("ok".to_owned())])
        .await
        .expect("upstream");
    let gw = Gateway::start(&local_and_cloud(head, &up.base_url(), &up.base_url(), "")).await;
    (up, gw)
}

async fn post_raw(gw: &Gateway, body: impl Into<reqwest::Body>) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("send")
}

#[tokio::test]
async fn malformed_json_is_400_invalid_json() {
    let (up, gw) = setup("").await;
    for body in [
        &b"{\"model\": \"auto\", \"messages\": ["[..],
        b"",
        b"\xff\xfe\xfd",
        b"nul",
    ] {
        let e = expect_error(post_raw(&gw, body.to_vec()).await, 400).await;
        assert_eq!(e["code"], "invalid_json", "{e}");
        assert_eq!(e["type"], "invalid_request_error");
        assert!(support::message(&e).contains("JSON"), "{e}");
    }
    let e = expect_error(post_raw(&gw, "[1,2]").await, 400).await;
    assert!(
        support::message(&e).contains("must be a JSON object"),
        "{e}"
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn missing_or_wrong_fields_are_400_naming_the_field() {
    let (up, gw) = setup("").await;
    let cases = [
        (json!({"model": "auto"}), "messages"),
        (json!({"model": "auto", "messages": "hi"}), "messages"),
        (json!({"model": "auto", "messages": []}), "messages"),
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (
            json!({"model": 42, "messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (
            json!({"model": "auto", "messages": [{"content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "auto", "messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "auto", "messages": [{"role": "user", "content": "x"}], "stream": "true"}),
            "stream",
        ),
        (
            json!({"model": "auto", "messages": [{"role": "user", "content": "x"}], "stream_options": 3}),
            "stream_options",
        ),
    ];
    for (body, param) in cases {
        let e = expect_error(gw.post_chat(&body).await, 400).await;
        assert_eq!(e["param"], param, "{body} -> {e}");
        assert!(support::message(&e).contains(param), "{e}");
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn empty_messages_through_async_openai_is_400() {
    let (_up, gw) = setup("").await;
    let req = CreateChatCompletionRequestArgs::default()
        .model("auto")
        .messages(vec![])
        .build()
        .expect("request");
    match gw.openai().chat().create(req).await {
        Err(OpenAIError::ApiError(e)) => {
            assert_eq!(e.status_code.as_u16(), 400);
            assert_eq!(e.api_error.param.as_deref(), Some("messages"));
            assert_eq!(e.api_error.r#type.as_deref(), Some("invalid_request_error"));
        }
        other => panic!("expected a 400, got {other:?}"),
    }
}

#[tokio::test]
async fn unknown_model_is_404_listing_the_available_ones() {
    let (up, gw) = setup("").await;
    let req = support::user_request("gpt-9-ultra", "hi");
    match gw.openai().chat().create(req).await {
        Err(OpenAIError::ApiError(e)) => {
            assert_eq!(e.status_code.as_u16(), 404);
            assert_eq!(e.api_error.code.as_deref(), Some("model_not_found"));
            assert_eq!(e.api_error.param.as_deref(), Some("model"));
            assert!(e.api_error.message.contains("gpt-9-ultra"));
            assert!(
                e.api_error.message.contains("auto, local, cloud"),
                "{}",
                e.api_error.message
            );
        }
        other => panic!("expected a 404, got {other:?}"),
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let (up, gw) = setup("[server]\nmax_body_bytes = 65536").await;
    let big = "x".repeat(1024 * 1024);
    let e = expect_error(gw.post_chat(&chat_body("auto", &big)).await, 413).await;
    assert_eq!(e["code"], "request_too_large");
    assert!(support::message(&e).contains("65536"), "{e}");
    // A chunked body without Content-Length is limited too.
    let chunks = futures::stream::iter((0..40).map(|_| Ok::<_, std::io::Error>(vec![b' '; 4096])));
    let r = post_raw(&gw, reqwest::Body::wrap_stream(chunks)).await;
    expect_error(r, 413).await;
    // Just under the limit is fine.
    let ok = "y".repeat(60_000);
    assert_eq!(gw.post_chat(&chat_body("auto", &ok)).await.status(), 200);
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn a_10_mb_body_gets_413_under_the_default_limit() {
    let (up, gw) = setup("").await;
    let big = "z".repeat(10 * 1024 * 1024);
    let e = expect_error(gw.post_chat(&chat_body("auto", &big)).await, 413).await;
    assert!(support::message(&e).contains("server.max_body_bytes"));
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn unknown_endpoints_are_404_and_wrong_methods_405() {
    let (_up, gw) = setup("").await;
    let client = reqwest::Client::new();
    let e = expect_error(
        client
            .post(gw.url("/v1/audio/speech"))
            .json(&json!({}))
            .send()
            .await
            .expect("send"),
        404,
    )
    .await;
    assert_eq!(e["code"], "unknown_url");
    assert!(
        support::message(&e).contains("POST /v1/audio/speech"),
        "{e}"
    );
    expect_error(client.get(gw.url("/")).send().await.expect("send"), 404).await;
    let e = expect_error(
        client
            .get(gw.url("/v1/chat/completions"))
            .send()
            .await
            .expect("send"),
        405,
    )
    .await;
    assert!(support::message(&e).contains("GET"), "{e}");
    expect_error(
        client
            .delete(gw.url("/v1/models"))
            .send()
            .await
            .expect("send"),
        405,
    )
    .await;
}

/// The malformed-request corpus: each body gets the right 4xx, names what was wrong, and never
/// reaches an upstream (docs/faults.md lists it).
#[tokio::test]
async fn the_malformed_request_corpus_gets_the_right_4xx() {
    let (up, gw) = setup("[limits]\nmax_messages = 64\nmax_output_tokens = 4096").await;
    let msg = json!([{"role": "user", "content": "hi"}]);
    let deep_array = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_object = format!(
        "{{\"model\":\"auto\",\"messages\":[{{\"role\":\"user\",\"content\":\"x\"}}],\"metadata\":{}1{}}}",
        "{\"a\":".repeat(5_000),
        "}".repeat(5_000)
    );
    let many: Vec<_> = (0..65)
        .map(|i| json!({"role": "user", "content": format!("m{i}")}))
        .collect();
    let mut invalid_utf8 = br#"{"model":"auto","messages":[{"role":"user","content":""#.to_vec();
    invalid_utf8.extend_from_slice(b"\xc3\x28 \xed\xa0\x80");
    invalid_utf8.extend_from_slice(br#""}]}"#);
    // (what, body, status, code or "" when any, param)
    type Case<'a> = (&'a str, Vec<u8>, u16, &'a str, Option<&'a str>);
    let cases: Vec<Case> = vec![
        ("deeply nested array", deep_array.into_bytes(), 400, "invalid_json", None),
        ("deeply nested object", deep_object.into_bytes(), 400, "invalid_json", None),
        ("invalid UTF-8 in a string", invalid_utf8, 400, "invalid_json", None),
        ("lone surrogate escape", br#"{"model":"auto","messages":[{"role":"user","content":"\ud800"}]}"#.to_vec(), 400, "invalid_json", None),
        ("number too large for any type", br#"{"model":"auto","messages":[{"role":"user","content":"x"}],"max_tokens":1e999}"#.to_vec(), 400, "invalid_json", None),
        ("max_tokens past u64", br#"{"model":"auto","messages":[{"role":"user","content":"x"}],"max_tokens":18446744073709551616}"#.to_vec(), 400, "", Some("max_tokens")),
        ("negative max_tokens", json!({"model":"auto","messages":msg,"max_tokens":-5}).to_string().into_bytes(), 400, "", Some("max_tokens")),
        ("zero max_tokens", json!({"model":"auto","messages":msg,"max_tokens":0}).to_string().into_bytes(), 400, "", Some("max_tokens")),
        ("fractional max_tokens", json!({"model":"auto","messages":msg,"max_tokens":1.5}).to_string().into_bytes(), 400, "", Some("max_tokens")),
        ("string max_completion_tokens", json!({"model":"auto","messages":msg,"max_completion_tokens":"10"}).to_string().into_bytes(), 400, "", Some("max_completion_tokens")),
        ("max_tokens over the ceiling", json!({"model":"auto","messages":msg,"max_tokens":4097}).to_string().into_bytes(), 400, "max_tokens_too_large", Some("max_tokens")),
        ("too many messages", json!({"model":"auto","messages":many}).to_string().into_bytes(), 400, "too_many_messages", Some("messages")),
        ("messages is an object", json!({"model":"auto","messages":{"role":"user"}}).to_string().into_bytes(), 400, "", Some("messages")),
        ("a message is a string", json!({"model":"auto","messages":["hi"]}).to_string().into_bytes(), 400, "", Some("messages[0]")),
        ("role is a number", json!({"model":"auto","messages":[{"role":1,"content":"x"}]}).to_string().into_bytes(), 400, "", Some("messages[0].role")),
        ("model is null", json!({"model":null,"messages":msg}).to_string().into_bytes(), 400, "", Some("model")),
        ("model is an array", json!({"model":["auto"],"messages":msg}).to_string().into_bytes(), 400, "", Some("model")),
        ("stream is a number", json!({"model":"auto","messages":msg,"stream":1}).to_string().into_bytes(), 400, "", Some("stream")),
        ("include_usage is a string", json!({"model":"auto","messages":msg,"stream":true,"stream_options":{"include_usage":"yes"}}).to_string().into_bytes(), 400, "", Some("stream_options.include_usage")),
        ("a NUL byte body", vec![0u8; 64], 400, "invalid_json", None),
        ("trailing garbage", br#"{"model":"auto","messages":[{"role":"user","content":"x"}]} trailing"#.to_vec(), 400, "invalid_json", None),
        ("a huge model name", json!({"model":"m".repeat(1_000_000),"messages":msg}).to_string().into_bytes(), 404, "model_not_found", Some("model")),
        ("10 MB of whitespace", vec![b' '; 10 * 1024 * 1024], 413, "request_too_large", None),
    ];
    for (name, body, status, code, param) in cases {
        let e = expect_error(post_raw(&gw, body).await, status).await;
        if !code.is_empty() {
            assert_eq!(e["code"], code, "{name}: {e}");
        }
        if let Some(param) = param {
            assert_eq!(e["param"], param, "{name}: {e}");
        }
        // The message never echoes a megabyte of input back.
        assert!(
            support::message(&e).len() < 2_000,
            "{name}: {}",
            support::message(&e).len()
        );
    }
    assert_eq!(up.hits(), 0, "no malformed request reached an upstream");
}

/// The malformed-request corpus in each API's words (its own field names), on `/v1/responses`
/// and `/v1/messages`: the right status and code, in the API's error shape, naming the field,
/// and no upstream called. (Chat's corpus is the test above.)
async fn the_corpus_gets_the_right_4xx_in_each_apis_shape(api: Api) {
    let (up, gw) = setup("[limits]\nmax_messages = 64\nmax_output_tokens = 4096").await;
    // This API's names for chat's fields.
    let (list, max) = match api {
        Api::Chat => ("messages", "max_tokens"),
        Api::Responses => ("input", "max_output_tokens"),
        Api::Messages => ("messages", "max_tokens"),
    };
    let base = api.body("hi", false);
    let with = |key: &str, value: Value| {
        let mut body = base.clone();
        body[key] = value;
        body.to_string().into_bytes()
    };
    let deep_array = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_metadata = {
        let mut body = base.to_string();
        body.pop();
        format!(
            "{body},\"metadata\":{}1{}}}",
            "{\"a\":".repeat(5_000),
            "}".repeat(5_000)
        )
    };
    let mut invalid_utf8 = base.to_string().into_bytes();
    let at = invalid_utf8
        .windows(2)
        .position(|w| w == b"hi")
        .expect("hi");
    invalid_utf8.splice(at..at + 2, b"\xc3\x28 \xed\xa0\x80".iter().copied());
    let many: Vec<Value> = (0..65)
        .map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": format!("m{i}")}))
        .collect();
    let raw = |s: &str| s.as_bytes().to_vec();
    let base_text = base.to_string();
    let trailing = format!("{base_text} trailing");
    let surrogate = base_text.replace("\"hi\"", "\"\\ud800\"");
    let huge_number = {
        let mut b = base_text.clone();
        b.pop();
        format!("{b},\"temperature\":1e999}}")
    };
    let past_u64 = {
        let mut b = base.clone();
        b.as_object_mut().expect("object").remove(max);
        let mut b = b.to_string();
        b.pop();
        format!("{b},\"{max}\":18446744073709551616}}")
    };
    // (what, body, status, code or "" when any, the field it must name)
    type Case = (&'static str, Vec<u8>, u16, &'static str, Option<String>);
    let cases: Vec<Case> = vec![
        (
            "deeply nested array",
            deep_array.into_bytes(),
            400,
            "invalid_json",
            None,
        ),
        (
            "deeply nested metadata",
            deep_metadata.into_bytes(),
            400,
            "invalid_json",
            None,
        ),
        (
            "invalid UTF-8 in a string",
            invalid_utf8,
            400,
            "invalid_json",
            None,
        ),
        (
            "lone surrogate escape",
            raw(&surrogate),
            400,
            "invalid_json",
            None,
        ),
        (
            "number too large for any type",
            raw(&huge_number),
            400,
            "invalid_json",
            None,
        ),
        ("a NUL byte body", vec![0u8; 64], 400, "invalid_json", None),
        (
            "trailing garbage",
            raw(&trailing),
            400,
            "invalid_json",
            None,
        ),
        ("not an object", raw("[1,2]"), 400, "", None),
        (
            "max tokens past u64",
            raw(&past_u64),
            400,
            "",
            Some(max.to_owned()),
        ),
        (
            "negative max tokens",
            with(max, json!(-5)),
            400,
            "",
            Some(max.to_owned()),
        ),
        (
            "zero max tokens",
            with(max, json!(0)),
            400,
            "",
            Some(max.to_owned()),
        ),
        (
            "fractional max tokens",
            with(max, json!(1.5)),
            400,
            "",
            Some(max.to_owned()),
        ),
        (
            "string max tokens",
            with(max, json!("10")),
            400,
            "",
            Some(max.to_owned()),
        ),
        (
            "max tokens over the ceiling",
            with(max, json!(4097)),
            400,
            "max_tokens_too_large",
            Some(max.to_owned()),
        ),
        (
            "too many messages",
            with(list, json!(many)),
            400,
            "too_many_messages",
            Some(list.to_owned()),
        ),
        (
            "the list is an object",
            with(list, json!({"role": "user"})),
            400,
            "",
            Some(list.to_owned()),
        ),
        (
            "the list is empty",
            with(list, json!([])),
            400,
            "",
            Some(list.to_owned()),
        ),
        (
            "an item is a number",
            with(list, json!([7])),
            400,
            "",
            Some(format!("{list}[0]")),
        ),
        (
            "role is a number",
            with(list, json!([{"role": 1, "content": "x"}])),
            400,
            "",
            Some(format!("{list}[0].role")),
        ),
        (
            "content is a number",
            with(list, json!([{"role": "user", "content": 5}])),
            400,
            "",
            Some(format!("{list}[0].content")),
        ),
        (
            "model is null",
            with("model", Value::Null),
            400,
            "",
            Some("model".to_owned()),
        ),
        (
            "model is an array",
            with("model", json!(["auto"])),
            400,
            "",
            Some("model".to_owned()),
        ),
        (
            "stream is a number",
            with("stream", json!(1)),
            400,
            "",
            Some("stream".to_owned()),
        ),
        (
            "temperature is a string",
            with("temperature", json!("hot")),
            400,
            "",
            Some("temperature".to_owned()),
        ),
        (
            "an unknown field",
            with("frobnicate", json!(true)),
            400,
            "unknown_parameter",
            Some("frobnicate".to_owned()),
        ),
        (
            "a huge model name",
            with("model", json!("m".repeat(1_000_000))),
            404,
            "model_not_found",
            Some("model".to_owned()),
        ),
        (
            "10 MB of whitespace",
            vec![b' '; 10 * 1024 * 1024],
            413,
            "request_too_large",
            None,
        ),
    ];
    let http = reqwest::Client::new();
    for (name, body, status, code, param) in cases {
        if api == Api::Chat && name == "an unknown field" {
            // Chat passes fields it does not know through to the upstream, by design.
            continue;
        }
        let r = http
            .post(gw.url(api.path()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), status, "{api:?} {name}");
        assert_eq!(header(&r, "content-type"), "application/json", "{name}");
        let v: Value = r.json().await.expect("error JSON");
        // The API's shape (OpenAI's four fields, or Anthropic's), with the gateway's code.
        let got = api.error_code(&v);
        if !code.is_empty() {
            assert_eq!(got, code, "{api:?} {name}: {v}");
        }
        let message = v["error"]["message"].as_str().unwrap_or_default();
        if let Some(param) = param {
            if api == Api::Messages {
                // Anthropic's shape has no `param`: the message names the field.
                assert!(
                    message.contains(&format!("`{param}`")) || message.contains(&param),
                    "{name}: {message}"
                );
            } else {
                assert_eq!(v["error"]["param"], param.as_str(), "{api:?} {name}: {v}");
            }
        }
        assert!(message.len() < 2_000, "{name}: {}", message.len());
    }
    assert_eq!(up.hits(), 0, "no malformed request reached an upstream");
}

for_each_api!(the_corpus_gets_the_right_4xx_in_each_apis_shape);
