//! Failure handling against scripted loopback upstreams: local failures before the first byte
//! fall back to the cloud; cloud failures become OpenAI-shaped 4xx/5xx with the upstream's words.

mod support;

use std::time::{Duration, Instant};

use async_openai::error::OpenAIError;
use serde_json::json;
use support::apis::{for_each_api, Api};
use support::{backend, chat_body, expect_error, header, local_and_cloud, sample, Gateway};
use wattgate_testkit::{refused_base_url, Behavior, ResetUpstream, ScriptedUpstream};

async fn cloud_ok() -> ScriptedUpstream {
    ScriptedUpstream::start(
        "cloud-upstream",
        vec![Behavior::Reply("cloud saved the day".to_owned())],
    )
    .await
    .expect("cloud upstream")
}

async fn local_with(script: Vec<Behavior>) -> ScriptedUpstream {
    ScriptedUpstream::start("local-upstream", script)
        .await
        .expect("local upstream")
}

/// Sends one non-streaming and one streaming request through a gateway whose local backend is
/// at `local_url`, and checks both were served by the cloud with `reason`.
async fn assert_falls_back(local_url: &str, local_extra: &str, reason: &str) {
    let cloud = cloud_ok().await;
    let gw = Gateway::start(&local_and_cloud(
        "",
        local_url,
        &cloud.base_url(),
        local_extra,
    ))
    .await;

    let started = Instant::now();
    let r = gw.post_chat(&chat_body("auto", "hi")).await;
    assert_eq!(r.status(), 200, "{reason}");
    assert_eq!(header(&r, "x-wattgate-route"), "cloud");
    assert_eq!(header(&r, "x-wattgate-backend"), "cloud");
    assert_eq!(header(&r, "x-wattgate-reason"), reason);
    assert_eq!(header(&r, "x-wattgate-fallback-from"), "local");
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "cloud saved the day"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fallback took {:?}",
        started.elapsed()
    );

    // The same through async-openai, streaming.
    let got = support::stream_with_usage(&gw, support::user_request("auto", "hi")).await;
    let (text, usage) = (got.text, got.usage);
    assert_eq!(text, "cloud saved the day");
    assert_eq!(usage.map(|u| u.completion_tokens), Some(4));
    assert_eq!(cloud.hits(), 2);

    let m = gw.metrics().await;
    let fallbacks: f64 = ["timeout", "unreachable", "protocol", "error_status"]
        .iter()
        .map(|k| {
            sample(
                &m,
                "wattgate_fallbacks_total",
                &[("from", "local"), ("to", "cloud"), ("kind", k)],
            )
        })
        .sum();
    assert_eq!(fallbacks, 2.0);
    assert_eq!(
        sample(
            &m,
            "wattgate_chat_requests_total",
            &[
                ("route", "cloud"),
                ("backend", "cloud"),
                ("reason", reason),
                ("outcome", "ok"),
                ("experiment", "none"),
                ("arm", "none")
            ]
        ),
        2.0
    );
}

#[tokio::test]
async fn local_500_falls_back_to_cloud() {
    let local = local_with(vec![Behavior::server_error("model crashed")]).await;
    assert_falls_back(&local.base_url(), "", "fallback_local_error").await;
    assert_eq!(local.hits(), 2);
}

#[tokio::test]
async fn local_429_falls_back_to_cloud() {
    let local = local_with(vec![Behavior::rate_limited(1)]).await;
    assert_falls_back(&local.base_url(), "", "fallback_local_error").await;
}

#[tokio::test]
async fn local_connection_refused_falls_back_to_cloud() {
    let url = refused_base_url().expect("port");
    assert_falls_back(&url, "", "fallback_local_unreachable").await;
}

#[tokio::test]
async fn local_connection_reset_falls_back_to_cloud() {
    let local = ResetUpstream::start().await.expect("reset upstream");
    assert_falls_back(&local.base_url(), "", "fallback_local_unreachable").await;
    assert!(local.hits() >= 2);
}

#[tokio::test]
async fn local_timeout_before_first_byte_falls_back_to_cloud() {
    let local = local_with(vec![Behavior::slow(Duration::from_secs(30), "too late")]).await;
    assert_falls_back(
        &local.base_url(),
        "first_byte_timeout_s = 0.3",
        "fallback_local_timeout",
    )
    .await;
}

#[tokio::test]
async fn local_garbage_falls_back_to_cloud() {
    let local = local_with(vec![Behavior::Garbage]).await;
    assert_falls_back(&local.base_url(), "", "fallback_local_error").await;
}

#[tokio::test]
async fn pinned_local_backend_does_not_fall_back() {
    let local = local_with(vec![Behavior::server_error("model crashed")]).await;
    let cloud = cloud_ok().await;
    let gw = Gateway::pair(&local.base_url(), &cloud.base_url()).await;
    let r = gw.post_chat(&chat_body("local", "hi")).await;
    assert_eq!(header(&r, "x-wattgate-reason"), "pinned");
    let e = expect_error(r, 502).await;
    assert_eq!(e["type"], "upstream_error");
    assert_eq!(e["code"], "upstream_http_500");
    assert!(support::message(&e).contains("model crashed"), "{e}");
    assert_eq!(cloud.hits(), 0);
}

#[tokio::test]
async fn fallback_can_be_disabled() {
    let local = local_with(vec![Behavior::server_error("model crashed")]).await;
    let cloud = cloud_ok().await;
    let gw = Gateway::start(&local_and_cloud(
        "[routing]\nfallback_to_cloud = false",
        &local.base_url(),
        &cloud.base_url(),
        "",
    ))
    .await;
    let r = gw.post_chat(&chat_body("auto", "hi")).await;
    assert_eq!(header(&r, "x-wattgate-route"), "local");
    expect_error(r, 502).await;
    assert_eq!(cloud.hits(), 0);
}

async fn cloud_only_gateway(script: Vec<Behavior>, extra: &str) -> (ScriptedUpstream, Gateway) {
    let cloud = ScriptedUpstream::start("cloud-upstream", script)
        .await
        .expect("cloud");
    let gw = Gateway::start(&backend("cloud", "cloud", &cloud.base_url(), extra)).await;
    (cloud, gw)
}

#[tokio::test]
async fn cloud_500_is_a_502_with_the_upstream_message() {
    let (cloud, gw) =
        cloud_only_gateway(vec![Behavior::server_error("overloaded, try later")], "").await;
    let r = gw.post_chat(&chat_body("auto", "hi")).await;
    // The first attempt and the default 2 retries all failed.
    assert_eq!(cloud.hits(), 3);
    assert_eq!(header(&r, "x-wattgate-route"), "cloud");
    assert_eq!(header(&r, "x-wattgate-reason"), "no_local_backend");
    let e = expect_error(r, 502).await;
    assert_eq!(e["type"], "upstream_error");
    assert!(
        support::message(&e).contains("overloaded, try later"),
        "{e}"
    );

    // async-openai sees the same status and error object.
    let req = support::user_request("auto", "hi");
    match gw.openai().chat().create(req).await {
        Err(OpenAIError::ApiError(e)) => {
            assert_eq!(e.status_code.as_u16(), 502);
            // async-openai keeps 5xx bodies raw in `message`: it must be our JSON error object.
            let body: serde_json::Value =
                serde_json::from_str(&e.api_error.message).expect("JSON error body");
            assert_eq!(body["error"]["type"], "upstream_error");
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn cloud_429_is_relayed_with_retry_after() {
    // Waiting the upstream's 7 s would pass the 5 s retry deadline: relayed at once instead.
    let cloud = ScriptedUpstream::start("c", vec![Behavior::rate_limited(7)])
        .await
        .expect("cloud");
    let gw = Gateway::start(&format!(
        "[resilience]\nretry_deadline_s = 5.0\n{}",
        backend("cloud", "cloud", &cloud.base_url(), "")
    ))
    .await;
    let started = Instant::now();
    let r = gw.post_chat(&chat_body("auto", "hi")).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(cloud.hits(), 1);
    assert_eq!(header(&r, "retry-after"), "7");
    let e = expect_error(r, 429).await;
    assert_eq!(e["type"], "rate_limit_error");
    assert!(support::message(&e).contains("Rate limit reached"), "{e}");
}

#[tokio::test]
async fn cloud_timeout_is_a_504() {
    let (_cloud, gw) = cloud_only_gateway(
        vec![Behavior::slow(Duration::from_secs(30), "late")],
        "first_byte_timeout_s = 0.3",
    )
    .await;
    let started = Instant::now();
    let e = expect_error(gw.post_chat(&chat_body("auto", "hi")).await, 504).await;
    assert_eq!(e["code"], "upstream_timeout");
    assert!(support::message(&e).contains("first_byte_timeout_s"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn cloud_unreachable_is_a_502() {
    let url = refused_base_url().expect("port");
    let gw = Gateway::start(&backend("cloud", "cloud", &url, "")).await;
    let e = expect_error(gw.post_chat(&chat_body("auto", "hi")).await, 502).await;
    assert_eq!(e["code"], "upstream_unreachable");
    assert!(
        support::message(&e).to_lowercase().contains("refused"),
        "{e}"
    );
}

#[tokio::test]
async fn local_and_cloud_both_failing_reports_the_cloud_failure() {
    let local = local_with(vec![Behavior::server_error("local down")]).await;
    let cloud = ScriptedUpstream::start("c", vec![Behavior::server_error("cloud down too")])
        .await
        .expect("cloud");
    let gw = Gateway::pair(&local.base_url(), &cloud.base_url()).await;
    let r = gw.post_chat(&chat_body("auto", "hi")).await;
    assert_eq!(header(&r, "x-wattgate-route"), "cloud");
    assert_eq!(header(&r, "x-wattgate-reason"), "fallback_local_error");
    let e = expect_error(r, 502).await;
    assert!(support::message(&e).contains("cloud down too"), "{e}");
    let m = gw.metrics().await;
    assert_eq!(
        sample(
            &m,
            "wattgate_upstream_errors_total",
            &[("backend", "local"), ("kind", "error_status")]
        ),
        1.0
    );
    // The cloud attempt was retried twice (local attempts never are).
    assert_eq!(
        sample(
            &m,
            "wattgate_upstream_errors_total",
            &[("backend", "cloud"), ("kind", "error_status")]
        ),
        3.0
    );
    assert_eq!(
        sample(
            &m,
            "wattgate_upstream_retries_total",
            &[("backend", "cloud"), ("kind", "error_status")]
        ),
        2.0
    );
    assert_eq!(local.hits(), 1);
}

#[tokio::test]
async fn a_stream_cut_after_the_first_byte_ends_with_an_error_frame() {
    let (_cloud, gw) = cloud_only_gateway(vec![Behavior::TruncatedStream { chunks: 2 }], "").await;
    let mut body = chat_body("auto", "hi");
    body["stream"] = json!(true);
    let r = gw.post_chat(&body).await;
    assert_eq!(r.status(), 200, "headers were already committed");
    let text = r.text().await.expect("body");
    let frames: Vec<&str> = text
        .split("\n\n")
        .filter(|f| !f.is_empty() && !f.starts_with(':'))
        .collect();
    assert_eq!(frames.len(), 4, "role, two words, error:\n{text}");
    let last: serde_json::Value =
        serde_json::from_str(frames[3].trim_start_matches("data: ")).expect("error frame");
    assert_eq!(last["error"]["code"], "upstream_protocol_error");
    assert!(support::message(&last["error"]).contains("[DONE]"));
    assert!(!text.contains("[DONE]\n"), "no [DONE] after a failure");
    let m = gw.metrics().await;
    assert_eq!(
        sample(
            &m,
            "wattgate_chat_requests_total",
            &[
                ("route", "cloud"),
                ("backend", "cloud"),
                ("reason", "no_local_backend"),
                ("outcome", "error"),
                ("experiment", "none"),
                ("arm", "none")
            ]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_stream_that_stalls_is_cut_at_the_total_timeout() {
    // The first chunk arrives in time, then the upstream goes silent with the connection open.
    let (_cloud, gw) = cloud_only_gateway(
        vec![Behavior::StalledStream { chunks: 1 }],
        "total_timeout_s = 0.5\nfirst_byte_timeout_s = 0.5",
    )
    .await;
    let mut body = chat_body("auto", "hi");
    body["stream"] = json!(true);
    let started = Instant::now();
    let text = gw.post_chat(&body).await.text().await.expect("body");
    let elapsed = started.elapsed();
    let frames: Vec<&str> = text
        .split("\n\n")
        .filter(|f| !f.is_empty() && !f.starts_with(':'))
        .collect();
    assert_eq!(frames.len(), 3, "role, one word, error:\n{text}");
    let last: serde_json::Value =
        serde_json::from_str(frames[2].trim_start_matches("data: ")).expect("error frame");
    assert_eq!(last["error"]["code"], "upstream_timeout");
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_is_counted_as_cancelled() {
    let (_cloud, gw) = cloud_only_gateway(vec![Behavior::StalledStream { chunks: 2 }], "").await;
    let mut body = chat_body("auto", "hi");
    body["stream"] = json!(true);
    let mut response = gw.post_chat(&body).await;
    assert_eq!(response.status(), 200);
    let first = response
        .chunk()
        .await
        .expect("read")
        .expect("a first frame");
    assert!(first.starts_with(b"data: "));
    assert_eq!(
        sample(&gw.metrics().await, "wattgate_chat_in_flight_requests", &[]),
        1.0
    );
    drop(response);

    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let m = gw.metrics().await;
        let cancelled = sample(
            &m,
            "wattgate_chat_requests_total",
            &[
                ("route", "cloud"),
                ("backend", "cloud"),
                ("reason", "no_local_backend"),
                ("outcome", "cancelled"),
                ("experiment", "none"),
                ("arm", "none"),
            ],
        );
        if cancelled == 1.0 {
            assert_eq!(sample(&m, "wattgate_chat_in_flight_requests", &[]), 0.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the abandoned stream was never released:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// The rows above, per API: `/v1/responses` and `/v1/messages` (and chat again, through the
// same helper) fall back, fail and break off mid-stream exactly as chat does, each in its own
// shape. One module per scenario, one test per API (`support::apis::for_each_api`).

/// Every local failure before the first byte is served by the cloud, whole and streamed.
async fn every_local_failure_falls_back(api: Api) {
    let slow = local_with(vec![Behavior::slow(Duration::from_secs(30), "too late")]).await;
    let failing = [
        (
            local_with(vec![Behavior::server_error("model crashed")]).await,
            "",
            "fallback_local_error",
        ),
        (
            local_with(vec![Behavior::rate_limited(1)]).await,
            "",
            "fallback_local_error",
        ),
        (
            local_with(vec![Behavior::Garbage]).await,
            "",
            "fallback_local_error",
        ),
    ];
    let reset = ResetUpstream::start().await.expect("reset upstream");
    let refused = refused_base_url().expect("port");
    let mut cases: Vec<(String, &str, &str)> = failing
        .iter()
        .map(|(u, extra, reason)| (u.base_url(), *extra, *reason))
        .collect();
    cases.push((reset.base_url(), "", "fallback_local_unreachable"));
    cases.push((refused, "", "fallback_local_unreachable"));
    cases.push((
        slow.base_url(),
        "first_byte_timeout_s = 0.3",
        "fallback_local_timeout",
    ));
    for (url, extra, reason) in cases {
        let cloud = cloud_ok().await;
        let gw = Gateway::start(&local_and_cloud("", &url, &cloud.base_url(), extra)).await;
        for stream in [false, true] {
            let sent = api.send(&gw, "hi", stream).await;
            assert_eq!(
                sent.status, 200,
                "{api:?} {reason} stream={stream}: {}",
                sent.body
            );
            assert_eq!(sent.header("x-wattgate-route"), "cloud");
            assert_eq!(sent.header("x-wattgate-reason"), reason);
            assert_eq!(sent.header("x-wattgate-fallback-from"), "local");
            assert_eq!(api.text_of(stream, &sent.body), "cloud saved the day");
        }
        assert_eq!(cloud.hits(), 2);
    }
}

/// Cloud failures before the first byte: the status and code chat gives, in the API's shape.
async fn every_cloud_failure_keeps_its_status_and_code(api: Api) {
    let refused = refused_base_url().expect("port");
    let cases: Vec<(Vec<Behavior>, &str, &str, u16, &str)> = vec![
        (
            vec![Behavior::server_error("overloaded, try later")],
            "",
            "",
            502,
            "upstream_http_500",
        ),
        (
            vec![Behavior::rate_limited(7)],
            "[resilience]\nretry_deadline_s = 5.0\n",
            "",
            429,
            "upstream_http_429",
        ),
        (
            vec![Behavior::slow(Duration::from_secs(30), "late")],
            "",
            "first_byte_timeout_s = 0.3",
            504,
            "upstream_timeout",
        ),
    ];
    for (script, head, extra, status, code) in cases {
        let cloud = ScriptedUpstream::start("cloud-upstream", script)
            .await
            .expect("cloud");
        let gw = Gateway::start(&format!(
            "{head}{}",
            backend("cloud", "cloud", &cloud.base_url(), extra)
        ))
        .await;
        for stream in [false, true] {
            let sent = api.send(&gw, "hi", stream).await;
            assert_eq!(
                sent.status, status,
                "{api:?} {code} stream={stream}: {}",
                sent.body
            );
            assert_eq!(
                api.failure_code(&sent, stream).as_deref(),
                Some(code),
                "{}",
                sent.body
            );
            if status == 429 {
                assert_eq!(sent.header("retry-after"), "7");
            }
        }
    }
    let gw = Gateway::start(&backend("cloud", "cloud", &refused, "")).await;
    for stream in [false, true] {
        let sent = api.send(&gw, "hi", stream).await;
        assert_eq!(sent.status, 502);
        assert_eq!(
            api.failure_code(&sent, stream).as_deref(),
            Some("upstream_unreachable")
        );
        assert!(
            sent.body.to_lowercase().contains("refused"),
            "{}",
            sent.body
        );
    }
}

/// A stream that breaks after its first byte (truncated, stalled past `total_timeout_s`, an
/// in-band error) ends in the API's error event with the code chat's error frame carries.
async fn a_stream_that_breaks_ends_in_the_apis_error_event(api: Api) {
    for (script, extra, code) in [
        (
            vec![Behavior::TruncatedStream { chunks: 2 }],
            "",
            "upstream_protocol_error",
        ),
        (
            vec![Behavior::StalledStream { chunks: 1 }],
            "total_timeout_s = 0.5\nfirst_byte_timeout_s = 0.5",
            "upstream_timeout",
        ),
    ] {
        let (_cloud, gw) = cloud_only_gateway(script, extra).await;
        let sent = api.send(&gw, "hi", true).await;
        assert_eq!(sent.status, 200, "headers were already committed");
        assert_eq!(
            api.failure_code(&sent, true).as_deref(),
            Some(code),
            "{}",
            sent.body
        );
    }
}

/// A client that leaves mid-stream is counted `cancelled` whichever API it spoke.
async fn a_client_that_leaves_mid_stream_is_cancelled(api: Api) {
    let (_cloud, gw) = cloud_only_gateway(vec![Behavior::StalledStream { chunks: 2 }], "").await;
    let mut response = reqwest::Client::new()
        .post(gw.url(api.path()))
        .json(&api.body("hi", true))
        .send()
        .await
        .expect("gateway reachable");
    assert_eq!(response.status(), 200);
    assert!(response.chunk().await.expect("read").is_some());
    drop(response);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let m = gw.metrics().await;
        let cancelled: f64 = m
            .lines()
            .filter(|l| l.starts_with("wattgate_chat_requests_total{"))
            .filter(|l| l.contains("outcome=\"cancelled\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        if cancelled == 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "never counted cancelled:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Failures that are not fallen back from (a pinned backend, fallback off) and a cloud that
/// fails after the local did: the upstream's status and words, in the API's shape.
async fn failures_that_do_not_fall_back_keep_the_upstreams_words(api: Api) {
    let local = local_with(vec![Behavior::server_error("model crashed")]).await;
    let cloud = cloud_ok().await;
    let gw = Gateway::pair(&local.base_url(), &cloud.base_url()).await;
    for stream in [false, true] {
        let mut body = api.body("hi", stream);
        body["model"] = json!("local");
        let sent = api.send_body(&gw, &body).await;
        assert_eq!(sent.status, 502, "pinned: {}", sent.body);
        assert_eq!(sent.header("x-wattgate-reason"), "pinned");
        assert_eq!(
            api.failure_code(&sent, stream).as_deref(),
            Some("upstream_http_500")
        );
        assert!(sent.body.contains("model crashed"), "{}", sent.body);
    }
    assert_eq!(cloud.hits(), 0);
    let off = Gateway::start(&local_and_cloud(
        "[routing]\nfallback_to_cloud = false",
        &local.base_url(),
        &cloud.base_url(),
        "",
    ))
    .await;
    let sent = api.send(&off, "hi", false).await;
    assert_eq!(
        (sent.status, sent.header("x-wattgate-route")),
        (502, "local")
    );
    assert_eq!(cloud.hits(), 0);
    let down = ScriptedUpstream::start("c", vec![Behavior::server_error("cloud down too")])
        .await
        .expect("cloud");
    let both = Gateway::start(&format!(
        "[resilience]\ninitial_backoff_s = 0.01\nmax_backoff_s = 0.02\n{}",
        local_and_cloud("", &local.base_url(), &down.base_url(), "")
    ))
    .await;
    let sent = api.send(&both, "hi", false).await;
    assert_eq!(sent.status, 502);
    assert_eq!(sent.header("x-wattgate-reason"), "fallback_local_error");
    assert!(sent.body.contains("cloud down too"), "{}", sent.body);
}

/// An upstream's in-band `{"error": ...}` chunk: chat relays it as sent; Responses and
/// Messages end their stream with their failure event carrying its message. The ledger row is
/// an error either way.
async fn an_in_band_error_chunk_fails_the_stream(api: Api) {
    let (_cloud, gw) = cloud_only_gateway(
        vec![Behavior::InBandError {
            chunks: 2,
            message: "CUDA out of memory".into(),
        }],
        "",
    )
    .await;
    let sent = api.send(&gw, "hi", true).await;
    assert_eq!(sent.status, 200);
    assert!(sent.body.contains("CUDA out of memory"), "{}", sent.body);
    if api != Api::Chat {
        assert!(api.failure_code(&sent, true).is_some(), "{}", sent.body);
        let completed = ["response.completed", "message_stop"];
        assert!(
            !completed.iter().any(|e| sent.body.contains(e)),
            "{}",
            sent.body
        );
    }
    let path = gw.ledger.clone();
    let _dir = gw.stop().await;
    let rows = wattgate::ledger::Ledger::open(&path)
        .expect("ledger")
        .rows_since(0)
        .expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].status, rows[0].outcome.as_str()), (200, "error"));
}

for_each_api!(
    failures_that_do_not_fall_back_keep_the_upstreams_words,
    an_in_band_error_chunk_fails_the_stream,
    every_local_failure_falls_back,
    every_cloud_failure_keeps_its_status_and_code,
    a_stream_that_breaks_ends_in_the_apis_error_event,
    a_client_that_leaves_mid_stream_is_cancelled,
);
