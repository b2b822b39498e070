//! Chat completions through the real gateway on loopback, driven by async-openai, against
//! scripted loopback upstreams.

mod support;

use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessageArgs, ChatCompletionTool,
    ChatCompletionTools, CreateChatCompletionRequestArgs, FunctionObject, ResponseFormat,
    ResponseFormatJsonSchema,
};
use serde_json::{json, Value};
use support::{chat_body, header, local_and_cloud, sample, Gateway};
use wattgate_testkit::{Behavior, ScriptedUpstream};

async fn pair(local: &str, cloud: &str) -> (ScriptedUpstream, ScriptedUpstream) {
    let l = ScriptedUpstream::start("local-upstream", vec![Behavior::Reply(local.to_owned())])
        .await
        .expect("local upstream");
    let c = ScriptedUpstream::start("cloud-upstream", vec![Behavior::Reply(cloud.to_owned())])
        .await
        .expect("cloud upstream");
    (l, c)
}

#[tokio::test]
async fn non_streaming_auto_is_served_locally_with_usage_and_headers() {
    let (local, cloud) = pair("hello from the local model", "from the cloud").await;
    let gw = Gateway::pair(&local.base_url(), &cloud.base_url()).await;

    let reply = gw
        .openai()
        .chat()
        .create(support::user_request("auto", "say hi please"))
        .await
        .expect("completion");
    assert_eq!(reply.model, "local-upstream");
    assert_eq!(
        reply.choices[0].message.content.as_deref(),
        Some("hello from the local model")
    );
    let usage = reply.usage.expect("usage relayed");
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        (3, 5, 8)
    );
    assert_eq!((local.hits(), cloud.hits()), (1, 0));
    assert_eq!(
        local.requests()[0].body["model"],
        "local-upstream",
        "the backend's model is sent upstream"
    );

    let raw = gw.post_chat(&chat_body("auto", "again")).await;
    assert_eq!(raw.status(), 200);
    assert_eq!(header(&raw, "x-wattgate-route"), "local");
    assert_eq!(header(&raw, "x-wattgate-backend"), "local");
    assert_eq!(header(&raw, "x-wattgate-reason"), "prefer_local");
    assert_eq!(header(&raw, "x-request-id").len(), 36, "a fresh UUID");
    let overhead: f64 = header(&raw, "x-wattgate-overhead-ms")
        .parse()
        .expect("overhead is a number");
    assert!((0.0..1000.0).contains(&overhead), "overhead {overhead} ms");
    assert!(header(&raw, "x-wattgate-fallback-from").is_empty());
}

#[tokio::test]
async fn streaming_relays_chunks_and_the_usage_chunk_when_asked() {
    let (local, cloud) = pair("the quick brown fox", "cloud").await;
    let gw = Gateway::pair(&local.base_url(), &cloud.base_url()).await;

    let got =
        support::stream_with_usage(&gw, support::user_request("auto", "one two three four")).await;
    let (text, chunks, usage) = (got.text, got.chunks, got.usage);
    assert_eq!(text, "the quick brown fox");
    assert_eq!(chunks, 7, "role + 4 words + finish + usage");
    let usage = usage.expect("final usage chunk");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (4, 4));
    assert_eq!(
        local.requests()[0].body["stream_options"],
        json!({"include_usage": true})
    );
}

#[tokio::test]
async fn streaming_without_include_usage_hides_the_metering_chunk_but_counts_tokens() {
    let (local, cloud) = pair("alpha beta gamma", "cloud").await;
    let gw = Gateway::pair(&local.base_url(), &cloud.base_url()).await;

    let mut body = chat_body("auto", "count these five words please");
    body["stream"] = json!(true);
    let response = gw.post_chat(&body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), "text/event-stream");
    assert_eq!(header(&response, "x-wattgate-route"), "local");
    let text = response.text().await.expect("stream body");
    // SSE comments (the quality guard's verdict line) are not frames.
    let frames: Vec<&str> = text
        .split("\n\n")
        .filter(|f| !f.is_empty() && !f.starts_with(':'))
        .collect();
    assert_eq!(frames.last(), Some(&"data: [DONE]"));
    assert!(
        !text.contains("usage"),
        "no usage the client did not ask for:\n{text}"
    );
    assert_eq!(
        frames.len(),
        6,
        "role + 3 words + finish + [DONE], no usage chunk:\n{text}"
    );
    let content: String = frames[..frames.len() - 1]
        .iter()
        .map(|f| {
            let v: Value =
                serde_json::from_str(f.trim_start_matches("data: ")).expect("chunk JSON");
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(content, "alpha beta gamma");

    // The gateway asked the upstream for usage on its own behalf, and metered it.
    assert_eq!(
        local.requests()[0].body["stream_options"],
        json!({"include_usage": true})
    );
    let m = gw.metrics().await;
    assert_eq!(
        sample(
            &m,
            "wattgate_tokens_total",
            &[("backend", "local"), ("kind", "input")]
        ),
        5.0
    );
    assert_eq!(
        sample(
            &m,
            "wattgate_tokens_total",
            &[("backend", "local"), ("kind", "output")]
        ),
        3.0
    );
    assert_eq!(
        sample(
            &m,
            "wattgate_chat_requests_total",
            &[
                ("route", "local"),
                ("backend", "local"),
                ("reason", "prefer_local"),
                ("outcome", "ok"),
                ("experiment", "none"),
                ("arm", "none")
            ]
        ),
        1.0
    );
}

#[tokio::test]
async fn stream_usage_can_be_turned_off_per_backend() {
    let (local, cloud) = pair("a b", "cloud").await;
    let gw = Gateway::start(&local_and_cloud(
        "",
        &local.base_url(),
        &cloud.base_url(),
        "stream_usage = false",
    ))
    .await;
    let mut body = chat_body("auto", "x");
    body["stream"] = json!(true);
    let text = gw.post_chat(&body).await.text().await.expect("body");
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert!(local.requests()[0].body.get("stream_options").is_none());
}

#[tokio::test]
async fn models_lists_the_alias_and_every_backend() {
    let (local, cloud) = pair("a", "b").await;
    let gw = Gateway::pair(&local.base_url(), &cloud.base_url()).await;
    let list = gw.openai().models().list().await.expect("models");
    let ids: Vec<&str> = list.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["auto", "local", "cloud", "all-minilm-l6-v2"]);
    assert_eq!(list.data[2].owned_by, "wattgate-cloud");
    assert_eq!(list.data[3].owned_by, "wattgate-embeddings");
    let raw: serde_json::Value = reqwest::get(gw.url("/v1/models"))
        .await
        .expect("get")
        .json()
        .await
        .expect("JSON");
    let kinds: Vec<&str> = raw["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["chat", "chat", "chat", "embeddings"]);
    let one = gw
        .openai()
        .models()
        .retrieve("local")
        .await
        .expect("retrieve");
    assert_eq!(one.id, "local");
    let missing = reqwest::get(gw.url("/v1/models/nope")).await.expect("get");
    let e = support::expect_error(missing, 404).await;
    assert_eq!(e["code"], "model_not_found");
}

#[tokio::test]
async fn tools_response_format_and_unknown_fields_pass_through_untouched() {
    let (local, cloud) = pair("{\"ok\":true}", "b").await;
    // A local server that declares tools and response_format support (llama.cpp's does).
    let gw = Gateway::start(&support::local_and_cloud(
        "",
        &local.base_url(),
        &cloud.base_url(),
        "supports_tools = true\nsupports_response_format = true",
    ))
    .await;

    let system: ChatCompletionRequestMessage = ChatCompletionRequestSystemMessageArgs::default()
        .content("Answer in JSON.")
        .build()
        .expect("system")
        .into();
    let tool = ChatCompletionTools::Function(ChatCompletionTool {
        function: FunctionObject {
            name: "get_weather".to_owned(),
            description: Some("Weather for a city".to_owned()),
            parameters: Some(
                json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
            ),
            strict: Some(true),
        },
    });
    let req = CreateChatCompletionRequestArgs::default()
        .model("auto")
        .messages(vec![system, support::user_message("Weather in Paris?")])
        .tools(vec![tool])
        .response_format(ResponseFormat::JsonSchema {
            json_schema: ResponseFormatJsonSchema {
                description: None,
                name: "answer".to_owned(),
                schema: json!({"type": "object", "properties": {"ok": {"type": "boolean"}}}),
                strict: Some(true),
            },
        })
        .seed(7)
        .temperature(0.0)
        .stop(vec!["END".to_owned()])
        .build()
        .expect("request");
    let sent = serde_json::to_value(&req).expect("serialize");
    let reply = gw.openai().chat().create(req).await.expect("completion");
    assert_eq!(
        reply.choices[0].message.content.as_deref(),
        Some("{\"ok\":true}")
    );

    let mut expected = sent;
    expected["model"] = json!("local-upstream");
    // The one field the gateway adds: the quality guard asks the local server for logprobs
    // (and removes them from the reply the client gets).
    expected["logprobs"] = json!(true);
    assert_eq!(
        local.requests()[0].body,
        expected,
        "upstream saw exactly what the client sent"
    );

    // Fields no SDK knows yet reach the upstream too, in the client's key order. (Pinned: with
    // the alias, `logprobs` would route to the cloud, reason needs_logprobs.)
    let raw = json!({"vendor_extension": {"x": [1, 2, 3]}, "model": "local", "logprobs": true, "top_logprobs": 2, "n": 1, "user": "u-1", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(gw.post_chat(&raw).await.status(), 200);
    let got = &local.requests()[1].body;
    let keys: Vec<&str> = got
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "vendor_extension",
            "model",
            "logprobs",
            "top_logprobs",
            "n",
            "user",
            "messages"
        ]
    );
    assert_eq!(got["vendor_extension"], json!({"x": [1, 2, 3]}));
}

#[tokio::test]
async fn naming_a_backend_pins_it() {
    let (local, cloud) = pair("local answer", "cloud answer").await;
    let gw = Gateway::pair(&local.base_url(), &cloud.base_url()).await;

    let reply = gw
        .openai()
        .chat()
        .create(support::user_request("cloud", "hi"))
        .await
        .expect("pinned cloud");
    assert_eq!(
        reply.choices[0].message.content.as_deref(),
        Some("cloud answer")
    );
    assert_eq!(cloud.requests()[0].body["model"], "cloud-upstream");

    let raw = gw.post_chat(&chat_body("local", "hi")).await;
    assert_eq!(header(&raw, "x-wattgate-backend"), "local");
    assert_eq!(header(&raw, "x-wattgate-reason"), "pinned");
    assert_eq!((local.hits(), cloud.hits()), (1, 1));
}

#[tokio::test]
async fn long_prompts_and_policies_route_to_the_cloud() {
    let (local, cloud) = pair("l", "c").await;
    let head = "[routing]\nmax_local_prompt_chars = 20";
    let gw = Gateway::start(&local_and_cloud(
        head,
        &local.base_url(),
        &cloud.base_url(),
        "",
    ))
    .await;
    let raw = gw
        .post_chat(&chat_body(
            "auto",
            "this prompt is longer than twenty characters",
        ))
        .await;
    assert_eq!(header(&raw, "x-wattgate-route"), "cloud");
    assert_eq!(header(&raw, "x-wattgate-reason"), "prompt_too_long");
    let raw = gw.post_chat(&chat_body("auto", "short")).await;
    assert_eq!(header(&raw, "x-wattgate-route"), "local");

    let gw = Gateway::start(&local_and_cloud(
        "[routing]\npolicy = \"cloud_only\"",
        &local.base_url(),
        &cloud.base_url(),
        "",
    ))
    .await;
    let raw = gw.post_chat(&chat_body("auto", "short")).await;
    assert_eq!(header(&raw, "x-wattgate-reason"), "cloud_only");
    assert_eq!(
        raw.json::<Value>().await.expect("json")["choices"][0]["message"]["content"],
        "c"
    );
}

#[tokio::test]
async fn client_request_ids_are_kept_and_bad_ones_replaced() {
    let (local, cloud) = pair("x", "y").await;
    let gw = Gateway::pair(&local.base_url(), &cloud.base_url()).await;
    let client = reqwest::Client::new();
    let r = client
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "trace-abc-123")
        .json(&chat_body("auto", "hi"))
        .send()
        .await
        .expect("send");
    assert_eq!(header(&r, "x-request-id"), "trace-abc-123");
    let r = client
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "has space")
        .json(&chat_body("auto", "hi"))
        .send()
        .await
        .expect("send");
    assert_eq!(header(&r, "x-request-id").len(), 36);
}

#[tokio::test]
async fn metrics_count_requests_and_latency_by_route_and_model() {
    let (local, cloud) = pair("x", "y").await;
    let gw = Gateway::pair(&local.base_url(), &cloud.base_url()).await;
    for model in ["auto", "auto", "cloud"] {
        assert_eq!(gw.post_chat(&chat_body(model, "hi")).await.status(), 200);
    }
    let _ = reqwest::get(gw.url("/no/such/path")).await.expect("get");
    let m = gw.metrics().await;
    let by_route = |route: &str, backend: &str, reason: &str| {
        sample(
            &m,
            "wattgate_chat_requests_total",
            &[
                ("route", route),
                ("backend", backend),
                ("reason", reason),
                ("outcome", "ok"),
                ("experiment", "none"),
                ("arm", "none"),
            ],
        )
    };
    assert_eq!(by_route("local", "local", "prefer_local"), 2.0);
    assert_eq!(by_route("cloud", "cloud", "pinned"), 1.0);
    assert_eq!(
        sample(
            &m,
            "wattgate_chat_request_duration_seconds_count",
            &[("route", "local"), ("backend", "local")]
        ),
        2.0
    );
    assert_eq!(
        sample(
            &m,
            "wattgate_gateway_overhead_seconds_count",
            &[("route", "local")]
        ),
        2.0
    );
    assert_eq!(
        sample(
            &m,
            "wattgate_http_requests_total",
            &[
                ("endpoint", "/v1/chat/completions"),
                ("method", "POST"),
                ("status", "200")
            ]
        ),
        3.0
    );
    assert_eq!(
        sample(
            &m,
            "wattgate_http_requests_total",
            &[
                ("endpoint", "unmatched"),
                ("method", "GET"),
                ("status", "404")
            ]
        ),
        1.0
    );
    assert!(m.contains("wattgate_http_request_duration_seconds_bucket{endpoint=\"/v1/chat/completions\",method=\"POST\",le=\"0.005\"}"));
    assert_eq!(sample(&m, "wattgate_chat_in_flight_requests", &[]), 0.0);
}

#[tokio::test]
async fn health_and_readiness_report_each_backend() {
    let (local, _) = pair("x", "y").await;
    let refused = wattgate_testkit::refused_base_url().expect("port");
    let gw = Gateway::start(&local_and_cloud(
        "[server]\nreadiness_cache_s = 0",
        &local.base_url(),
        &refused,
        "",
    ))
    .await;
    let health = reqwest::get(gw.url("/healthz")).await.expect("healthz");
    assert_eq!(health.status(), 200);

    let ready = reqwest::get(gw.url("/readyz")).await.expect("readyz");
    assert_eq!(ready.status(), 200, "one usable backend is enough to serve");
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["status"], "ready");
    assert_eq!(
        body["backends"][0],
        json!({"name": "local", "role": "local", "ready": true})
    );
    assert_eq!(body["backends"][1]["ready"], false);
    assert!(
        body["backends"][1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("could not connect")),
        "{body}"
    );

    let gw = Gateway::start(&local_and_cloud(
        "[server]\nreadiness_cache_s = 0",
        &refused,
        &refused,
        "",
    ))
    .await;
    let ready = reqwest::get(gw.url("/readyz")).await.expect("readyz");
    assert_eq!(ready.status(), 503);
}

#[tokio::test]
async fn a_missing_cloud_key_is_reported_not_sent() {
    let (local, cloud) = pair("x", "y").await;
    let config = format!(
        "{}{}",
        support::backend("local", "local", &local.base_url(), ""),
        support::backend(
            "cloud",
            "cloud",
            &cloud.base_url(),
            "api_key_env = \"WATTGATE_TEST_UNSET_KEY_VAR\""
        )
    );
    let gw = Gateway::start(&config).await;
    let e = support::expect_error(gw.post_chat(&chat_body("cloud", "hi")).await, 503).await;
    assert!(
        support::message(&e).contains("WATTGATE_TEST_UNSET_KEY_VAR"),
        "{e}"
    );
    assert_eq!(cloud.hits(), 0);
}

#[tokio::test]
async fn the_api_key_is_sent_as_a_bearer_token() {
    let (local, cloud) = pair("x", "y").await;
    // The variable name is unique to this test, so parallel tests cannot see it change.
    std::env::set_var("WATTGATE_TEST_CLOUD_KEY", "sk-test-123");
    let config = format!(
        "{}{}",
        support::backend("local", "local", &local.base_url(), ""),
        support::backend(
            "cloud",
            "cloud",
            &cloud.base_url(),
            "api_key_env = \"WATTGATE_TEST_CLOUD_KEY\""
        )
    );
    let gw = Gateway::start(&config).await;
    let client = reqwest::Client::new();
    let r = client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("client-key-must-not-leak")
        .json(&chat_body("cloud", "hi"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let seen = &cloud.requests()[0].headers;
    assert_eq!(
        seen.get("authorization").and_then(|v| v.to_str().ok()),
        Some("Bearer sk-test-123")
    );
    let _ = gw.post_chat(&chat_body("local", "hi")).await;
    assert!(
        local.requests()[0].headers.get("authorization").is_none(),
        "no key configured, none sent"
    );
}
