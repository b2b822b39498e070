//! Bad input: every case gets the right status and an OpenAI-shaped error naming what was wrong,
//! and no upstream is called.

mod support;

use async_openai::error::OpenAIError;
use async_openai::types::chat::CreateChatCompletionRequestArgs;
use serde_json::json;
use support::{chat_body, expect_error, local_and_cloud, Gateway};
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
            .post(gw.url("/v1/embeddings"))
            .json(&json!({}))
            .send()
            .await
            .expect("send"),
        404,
    )
    .await;
    assert_eq!(e["code"], "unknown_url");
    assert!(support::message(&e).contains("POST /v1/embeddings"), "{e}");
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
