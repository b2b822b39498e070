//! Anthropic on both sides of the gateway: `/v1/messages` for Anthropic's clients, and
//! `kind = "anthropic"` backends (the Messages API as the cloud) behind every endpoint. The
//! cloud is a scripted upstream on loopback speaking Anthropic's protocol; the local backend a
//! scripted OpenAI-compatible one.

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use support::apis::{for_each_api, Api};
use support::{backend, header, Gateway};
use wattgate::ledger::Ledger;
use wattgate_testkit::{Behavior, ScriptedUpstream};

const KEY_VAR: &str = "WATTGATE_TEST_ANTHROPIC_KEY";

fn claude(url: &str, extra: &str) -> String {
    format!(
        "[[backends]]\nname = \"claude\"\nkind = \"anthropic\"\nrole = \"cloud\"\nbase_url = \"{url}\"\nmodel = \"claude-test\"\nparameters = 1e11\napi_key_env = \"{KEY_VAR}\"\nusd_per_million_input_tokens = 3.0\nusd_per_million_output_tokens = 15.0\n{extra}\n"
    )
}

async fn upstream(name: &str, script: Vec<Behavior>) -> ScriptedUpstream {
    ScriptedUpstream::start(name, script)
        .await
        .expect("upstream")
}

/// Posts `body` to `path`; returns the response and, for a stream, its whole text.
async fn post(gw: &Gateway, path: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, String) {
    let r = reqwest::Client::new()
        .post(gw.url(path))
        .json(body)
        .send()
        .await
        .expect("gateway reachable");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let mut text = String::new();
    let mut bytes = r.bytes_stream();
    while let Some(b) = bytes.next().await {
        text.push_str(&String::from_utf8_lossy(&b.expect("body")));
    }
    (status, headers, text)
}

fn api_of(path: &str) -> Api {
    match path {
        "/v1/chat/completions" => Api::Chat,
        "/v1/responses" => Api::Responses,
        _ => Api::Messages,
    }
}

fn body_for(path: &str, text: &str, stream: bool) -> Value {
    match path {
        "/v1/chat/completions" => json!({"model": "auto", "stream": stream,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]}),
        "/v1/responses" => {
            json!({"model": "auto", "stream": stream, "instructions": "Be brief.", "input": text})
        }
        _ => json!({"model": "auto", "stream": stream, "max_tokens": 100, "system": "Be brief.",
            "messages": [{"role": "user", "content": text}]}),
    }
}

#[tokio::test]
async fn every_endpoint_falls_back_from_a_failing_local_to_an_anthropic_cloud() {
    std::env::set_var(KEY_VAR, "sk-ant-test");
    let local = upstream("local-model", vec![Behavior::server_error("local down")]).await;
    let cloud = upstream(
        "claude-test",
        vec![Behavior::Reply("claude says hello".into())],
    )
    .await;
    let toml = format!(
        "[resilience]\nbreaker_min_requests = 1000\n{}{}",
        backend("local", "local", &local.base_url(), ""),
        claude(&cloud.base_url(), "")
    );
    let gw = Gateway::start(&toml).await;
    let paths = ["/v1/chat/completions", "/v1/responses", "/v1/messages"];
    for path in paths {
        for stream in [false, true] {
            let (status, headers, body) =
                post(&gw, path, &body_for(path, "say hello please", stream)).await;
            assert_eq!(status, 200, "{path} stream={stream}: {body}");
            let h = |n: &str| {
                headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            assert_eq!(h("x-wattgate-route"), "cloud", "{path}");
            assert_eq!(h("x-wattgate-backend"), "claude");
            assert_eq!(h("x-wattgate-reason"), "fallback_local_error");
            assert_eq!(h("x-wattgate-fallback-from"), "local");
            assert_eq!(
                api_of(path).text_of(stream, &body),
                "claude says hello",
                "{path} {stream}"
            );
        }
    }
    // What Anthropic received: its own protocol, key and version headers.
    let seen = cloud.requests();
    assert_eq!(seen.len(), 6);
    for r in &seen {
        assert_eq!(r.path, "/v1/messages");
        assert_eq!(r.headers["x-api-key"], "sk-ant-test");
        assert_eq!(r.headers["anthropic-version"], "2023-06-01");
        assert!(r.headers.get("authorization").is_none());
        assert_eq!(r.body["model"], "claude-test");
        assert_eq!(r.body["system"], "Be brief.");
        assert_eq!(
            r.body["messages"],
            json!([{"role": "user", "content": "say hello please"}])
        );
        assert!(r.body["max_tokens"].as_u64().is_some(), "{}", r.body);
    }
    // Every request metered with the upstream's usage: 3 prompt words (+2 of system), 3 out.
    let dir = gw.stop().await;
    let rows = Ledger::open(&dir.path().join("ledger.redb"))
        .expect("ledger")
        .rows_since(0)
        .expect("rows");
    assert_eq!(rows.len(), 6);
    for row in &rows {
        assert_eq!(row.backend, "claude");
        assert_eq!(row.outcome, "ok", "{row:?}");
        assert_eq!((row.input_tokens, row.output_tokens), (5, 3), "{row:?}");
        assert!(row.bill.cloud_usd > 0.0, "priced: {row:?}");
    }
}

async fn an_overloaded_anthropic_529_is_retried_after_its_retry_after(api: Api) {
    std::env::set_var(KEY_VAR, "sk-ant-test");
    let cloud = upstream(
        "claude-test",
        vec![
            Behavior::Status {
                status: 529,
                body: json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
                retry_after: Some("1".into()),
            },
            Behavior::Reply("fine now".into()),
        ],
    )
    .await;
    let gw = Gateway::start(&claude(&cloud.base_url(), "")).await;
    let started = Instant::now();
    let path = api.path();
    let (status, _, body) = post(&gw, path, &body_for(path, "hi", false)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(api.text_of(false, &body), "fine now");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited its Retry-After"
    );
    assert_eq!(cloud.hits(), 2);
    // A persistent 529 ends as an error in the API's shape naming the upstream's message.
    let down = upstream(
        "claude-test",
        vec![Behavior::Status {
            status: 529,
            body: json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            retry_after: None,
        }],
    )
    .await;
    let gw = Gateway::start(&format!(
        "[resilience]\ninitial_backoff_s = 0.01\nmax_backoff_s = 0.02\n{}",
        claude(&down.base_url(), "")
    ))
    .await;
    let (status, _, body) = post(&gw, path, &body_for(path, "hi", false)).await;
    assert_eq!(status, 502, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(api.error_code(&v), "upstream_http_529", "{v}");
    if api == Api::Messages {
        assert_eq!(v["error"]["type"], "api_error");
    }
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("529") && message.contains("Overloaded"),
        "{message}"
    );
    assert_eq!(down.hits(), 3, "tried three times");
}

for_each_api!(an_overloaded_anthropic_529_is_retried_after_its_retry_after);

#[tokio::test]
async fn an_anthropic_stream_that_breaks_ends_in_each_apis_error_event() {
    std::env::set_var(KEY_VAR, "sk-ant-test");
    let cloud = upstream(
        "claude-test",
        vec![Behavior::InBandError {
            chunks: 2,
            message: "Overloaded mid-stream".into(),
        }],
    )
    .await;
    let gw = Gateway::start(&claude(&cloud.base_url(), "")).await;
    let (_, _, chat) = post(
        &gw,
        "/v1/chat/completions",
        &body_for("/v1/chat/completions", "x", true),
    )
    .await;
    assert!(chat.contains("Overloaded mid-stream"), "{chat}");
    let (_, _, messages) = post(&gw, "/v1/messages", &body_for("/v1/messages", "x", true)).await;
    assert!(
        messages.contains("event: error") && messages.contains("Overloaded mid-stream"),
        "{messages}"
    );
    assert!(!messages.contains("message_stop"), "{messages}");
    let (_, _, responses) = post(&gw, "/v1/responses", &body_for("/v1/responses", "x", true)).await;
    assert!(responses.contains("event: response.failed"), "{responses}");
    assert!(!responses.contains("response.completed"), "{responses}");
}

#[tokio::test]
async fn messages_clients_authenticate_with_x_api_key_and_get_anthropic_errors() {
    let local = upstream("local-model", vec![Behavior::Reply("local hello".into())]).await;
    let digest: String = wattgate::server::key_digest("sk-client")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let gw = Gateway::start(&format!(
        "[[auth.keys]]\nname = \"team\"\nsha256 = \"{digest}\"\n{}",
        backend("local", "local", &local.base_url(), "")
    ))
    .await;
    let client = reqwest::Client::new();
    let send = |key: Option<&'static str>, body: Value| {
        let mut r = client.post(gw.url("/v1/messages")).json(&body);
        if let Some(k) = key {
            r = r
                .header("x-api-key", k)
                .header("anthropic-version", "2023-06-01");
        }
        r.send()
    };
    let ok = send(Some("sk-client"), body_for("/v1/messages", "hi", false))
        .await
        .expect("send");
    assert_eq!(ok.status(), 200);
    assert_eq!(header(&ok, "x-wattgate-route"), "local");
    let v: Value = ok.json().await.expect("JSON");
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["text"], "local hello");
    assert_eq!(v["usage"], json!({"input_tokens": 3, "output_tokens": 2}));
    for (key, status, kind) in [
        (None, 401, "authentication_error"),
        (Some("sk-wrong"), 401, "authentication_error"),
    ] {
        let r = send(key, body_for("/v1/messages", "hi", false))
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), status);
        let v: Value = r.json().await.expect("JSON");
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], kind, "{v}");
    }
    // A bad request names the field, in Anthropic's shape.
    let r = send(
        Some("sk-client"),
        json!({"model": "auto", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await
    .expect("send");
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("`max_tokens`"),
        "{v}"
    );
    // Unknown paths under /v1/messages are Anthropic-shaped 404s too.
    let r = client
        .post(gw.url("/v1/messages/count_tokens"))
        .header("x-api-key", "sk-client")
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(v["error"]["type"], "not_found_error", "{v}");
}

#[tokio::test]
async fn an_image_block_routes_to_the_cloud_as_an_image_part() {
    let local = upstream("local-model", vec![Behavior::Reply("local".into())]).await;
    let cloud = upstream("cloud-model", vec![Behavior::Reply("a red square".into())]).await;
    let gw = Gateway::start(&support::local_and_cloud(
        "",
        &local.base_url(),
        &cloud.base_url(),
        "",
    ))
    .await;
    let body = json!({"model": "auto", "max_tokens": 50, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]});
    let sent = Api::Messages.send_body(&gw, &body).await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    assert_eq!(sent.header("x-wattgate-route"), "cloud");
    assert_eq!(sent.header("x-wattgate-reason"), "needs_images");
    assert_eq!(Api::Messages.text_of(false, &sent.body), "a red square");
    assert_eq!(local.hits(), 0);
    assert_eq!(
        cloud.requests()[0].body["messages"][0]["content"][1],
        json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}})
    );
}
