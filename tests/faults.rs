//! The fault-injection matrix (docs/faults.md): the real gateway on loopback, scripted loopback
//! upstreams failing in one way each, and real clients sending a mix of whole and streamed
//! requests at once. For every scenario:
//! - every client request ends, within its deadline, in either a correct completion or an
//!   OpenAI-shaped error (a stream that broke after its first byte ends with an error frame);
//! - `wattgate_chat_requests_total` counts exactly the outcomes the clients saw;
//! - the ledger holds one row per request, with the status and outcome the client saw.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use support::apis::{error_code, for_each_api, Api};
use support::{backend, chat_body, header, sample, Gateway};
use wattgate::backends::openai::OpenAiBackend;
use wattgate::backends::{Backend, BackendError, BackendInfo, Reply};
use wattgate::ledger::Ledger;
use wattgate::wire::ChatRequest;
use wattgate_testkit::{Behavior, ResetUpstream, ScriptedUpstream};

/// Test-speed backoff: the matrix is about outcomes, not waiting.
const FAST_RETRIES: &str = "[resilience]\ninitial_backoff_s = 0.01\nmax_backoff_s = 0.05\n";

/// What one client saw.
#[derive(Debug, Clone)]
struct Seen {
    status: u16,
    /// A complete, well-formed completion (whole, or a stream ending in `[DONE]`).
    complete: bool,
    /// The error object's `code`, for errors (status >= 400 or a mid-stream error frame).
    code: Option<String>,
    reason: String,
    elapsed: Duration,
}

/// Sends `n` requests at once, every other one streamed, each with a deadline; checks each ends
/// in a completion or an OpenAI-shaped error.
async fn drive(gw: &Gateway, api: Api, n: usize, deadline: Duration) -> Vec<Seen> {
    let client = reqwest::Client::new();
    let url = gw.url(api.path());
    let requests = (0..n).map(|i| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let stream = i % 2 == 1;
            let body = api.body(&format!("question {i}"), stream);
            let started = Instant::now();
            let seen = tokio::time::timeout(deadline, one(&client, api, &url, &body, stream)).await;
            let mut seen = seen.unwrap_or_else(|_| panic!("request {i} hung past {deadline:?}"));
            seen.elapsed = started.elapsed();
            seen
        }
    });
    futures::future::join_all(requests).await
}

async fn one(client: &reqwest::Client, api: Api, url: &str, body: &Value, stream: bool) -> Seen {
    let r = client
        .post(url)
        .json(body)
        .send()
        .await
        .expect("gateway reachable");
    let status = r.status().as_u16();
    let reason = header(&r, "x-wattgate-reason");
    let mut seen = Seen {
        status,
        complete: false,
        code: None,
        reason,
        elapsed: Duration::ZERO,
    };
    if status != 200 {
        seen.code = Some(api.error_code(&r.json::<Value>().await.expect("error JSON")));
        return seen;
    }
    if !stream {
        let v: Value = r.json().await.expect("answer JSON");
        let text = match api {
            Api::Chat => &v["choices"][0]["message"]["content"],
            Api::Responses => &v["output"][0]["content"][0]["text"],
            Api::Messages => &v["content"][0]["text"],
        };
        assert!(text.as_str().is_some_and(|c| !c.is_empty()), "{v}");
        seen.complete = true;
        return seen;
    }
    let mut text = String::new();
    let mut frames = r.bytes_stream();
    while let Some(bytes) = frames.next().await {
        text.push_str(&String::from_utf8_lossy(&bytes.expect("stream bytes")));
    }
    if api != Api::Chat {
        let (complete, code) = api.read_events(&text);
        seen.complete = complete;
        seen.code = code;
        return seen;
    }
    let data: Vec<&str> = text
        .split("\n\n")
        .filter_map(|f| f.trim().strip_prefix("data: "))
        .collect();
    match data.last() {
        Some(&"[DONE]") => {
            for d in &data[..data.len() - 1] {
                let chunk: Value = serde_json::from_str(d).expect("chunk JSON");
                assert!(chunk.get("error").is_none(), "{d}");
            }
            seen.complete = data.len() > 1;
        }
        Some(last) => {
            seen.code = Some(error_code(
                &serde_json::from_str(last).expect("error frame JSON"),
            ));
        }
        None => panic!("empty stream: {text:?}"),
    }
    seen
}

for_each_api!(
    cloud_500s_are_retried_until_they_succeed,
    cloud_500s_that_persist_end_in_502s_then_the_breaker_fails_fast,
    cloud_429_waits_the_retry_after_then_succeeds,
    a_slow_cloud_times_out_within_the_deadline,
    a_cloud_that_resets_connections_is_a_502_after_retries,
    garbage_from_the_cloud_is_a_502_and_not_retried,
    a_truncated_stream_ends_in_an_error_frame_and_is_never_retried,
    a_local_backend_that_panics_falls_back_to_the_cloud,
    a_local_backend_that_panics_mid_stream_ends_the_stream_with_an_error_frame,
    a_held_stream_that_breaks_before_the_client_saw_it_is_answered_by_the_cloud,
    a_hanging_local_backend_falls_back_at_its_first_byte_timeout,
    an_open_local_breaker_routes_to_the_cloud_until_a_probe_succeeds,
    an_open_cloud_breaker_serves_locally_whatever_the_policy_says,
);

/// Checks the counters and the ledger against what the clients saw; stops the gateway.
async fn reconcile(gw: Gateway, seen: &[Seen]) {
    let metrics = gw.metrics().await;
    let counted = |outcome: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("wattgate_chat_requests_total{"))
            .filter(|l| l.contains(&format!("outcome=\"{outcome}\"")))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let ok = seen.iter().filter(|s| s.complete).count();
    assert_eq!(counted("ok"), ok as f64, "ok count\n{seen:?}");
    assert_eq!(
        counted("error"),
        (seen.len() - ok) as f64,
        "error count\n{seen:?}"
    );
    assert_eq!(counted("cancelled"), 0.0);
    let dir = gw.stop().await;
    let rows = Ledger::open(&dir.path().join("ledger.redb"))
        .expect("ledger")
        .rows_since(0)
        .expect("rows");
    assert_eq!(rows.len(), seen.len(), "one ledger row per request");
    let mut from_ledger: Vec<(u16, bool)> =
        rows.iter().map(|r| (r.status, r.outcome == "ok")).collect();
    let mut from_clients: Vec<(u16, bool)> = seen.iter().map(|s| (s.status, s.complete)).collect();
    from_ledger.sort_unstable();
    from_clients.sort_unstable();
    assert_eq!(from_ledger, from_clients, "ledger statuses and outcomes");
}

fn cloud_only(url: &str, extra_head: &str) -> String {
    format!(
        "{FAST_RETRIES}{extra_head}\n{}",
        backend("cloud", "cloud", url, "")
    )
}

async fn upstream(script: Vec<Behavior>) -> ScriptedUpstream {
    ScriptedUpstream::start("up", script)
        .await
        .expect("upstream")
}

async fn cycling(script: Vec<Behavior>) -> ScriptedUpstream {
    ScriptedUpstream::start_cycling("127.0.0.1:0".parse().expect("addr"), "up", script)
        .await
        .expect("upstream")
}

async fn cloud_500s_are_retried_until_they_succeed(api: Api) {
    // Every third attempt fails (below the breaker's 50%): with 2 retries, every request
    // succeeds.
    let cloud = cycling(vec![
        Behavior::server_error("flaky"),
        Behavior::Reply("fine".into()),
        Behavior::Reply("fine".into()),
    ])
    .await;
    let gw = Gateway::start(&cloud_only(&cloud.base_url(), "")).await;
    // Two at a time (one whole, one streamed): the failures are shared out in script order, so
    // no request can meet three in a row.
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.extend(drive(&gw, api, 2, Duration::from_secs(5)).await);
    }
    assert!(seen.iter().all(|s| s.complete), "{seen:?}");
    let m = gw.metrics().await;
    let retries = sample(
        &m,
        "wattgate_upstream_retries_total",
        &[("backend", "cloud"), ("kind", "error_status")],
    );
    assert!(retries >= 1.0, "some attempts failed and were retried");
    // Attempts = requests + retries: nothing was sent twice after success.
    assert_eq!(cloud.hits() as f64, 20.0 + retries);
    reconcile(gw, &seen).await;
}

async fn cloud_500s_that_persist_end_in_502s_then_the_breaker_fails_fast(api: Api) {
    let cloud = upstream(vec![Behavior::server_error("down")]).await;
    let gw = Gateway::start(&cloud_only(
        &cloud.base_url(),
        "breaker_min_requests = 9\nbreaker_open_s = 60.0\n",
    ))
    .await;
    // Sequential, so the breaker's opening point is exact: 3 requests x 3 attempts = 9 failures.
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.extend(drive(&gw, api, 1, Duration::from_secs(5)).await);
    }
    assert!(
        seen.iter().all(|s| s.status == 502),
        "upstream 500 -> 502: {seen:?}"
    );
    assert_eq!(cloud.hits(), 9);
    // Now open: no attempt is made; a fast 503 with Retry-After names the breaker.
    let started = Instant::now();
    let r = reqwest::Client::new()
        .post(gw.url(api.path()))
        .json(&api.body("more", false))
        .send()
        .await
        .expect("gateway reachable");
    assert_eq!(r.status().as_u16(), 503);
    let retry_after: u64 = header(&r, "retry-after").parse().expect("Retry-After");
    assert!((55..=60).contains(&retry_after), "{retry_after}");
    let code = api.error_code(&r.json().await.expect("JSON"));
    assert_eq!(code, "backend_unhealthy");
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(cloud.hits(), 9, "no upstream call while open");
    let more = drive(&gw, api, 6, Duration::from_secs(2)).await;
    assert!(more.iter().all(|s| s.status == 503), "{more:?}");
    let m = gw.metrics().await;
    assert_eq!(
        sample(
            &m,
            "wattgate_backend_circuit_state",
            &[("backend", "cloud")]
        ),
        2.0
    );
    seen.push(Seen {
        status: 503,
        complete: false,
        code: Some(code),
        reason: String::new(),
        elapsed: Duration::ZERO,
    });
    seen.extend(more);
    reconcile(gw, &seen).await;
}

async fn cloud_429_waits_the_retry_after_then_succeeds(api: Api) {
    let cloud = upstream(vec![
        Behavior::rate_limited(1),
        Behavior::Reply("after the wait".into()),
    ])
    .await;
    let gw = Gateway::start(&cloud_only(&cloud.base_url(), "")).await;
    let seen = drive(&gw, api, 1, Duration::from_secs(5)).await;
    assert!(seen[0].complete, "{seen:?}");
    assert!(
        seen[0].elapsed >= Duration::from_secs(1),
        "Retry-After: 1 was honoured: {:?}",
        seen[0].elapsed
    );
    assert_eq!(cloud.hits(), 2);
    reconcile(gw, &seen).await;
}

async fn a_slow_cloud_times_out_within_the_deadline(api: Api) {
    let cloud = upstream(vec![Behavior::slow(Duration::from_secs(60), "late")]).await;
    let gw = Gateway::start(&format!(
        "{FAST_RETRIES}\n{}",
        backend(
            "cloud",
            "cloud",
            &cloud.base_url(),
            "first_byte_timeout_s = 0.3"
        )
    ))
    .await;
    let seen = drive(&gw, api, 6, Duration::from_secs(3)).await;
    for s in &seen {
        assert_eq!(s.status, 504, "{s:?}");
        assert_eq!(s.code.as_deref(), Some("upstream_timeout"));
        // 3 attempts of 0.3 s plus backoff.
        assert!(s.elapsed < Duration::from_secs(2), "{s:?}");
    }
    reconcile(gw, &seen).await;
}

async fn a_cloud_that_resets_connections_is_a_502_after_retries(api: Api) {
    let cloud = ResetUpstream::start().await.expect("reset upstream");
    let gw = Gateway::start(&cloud_only(&cloud.base_url(), "")).await;
    let seen = drive(&gw, api, 4, Duration::from_secs(5)).await;
    for s in &seen {
        assert_eq!(s.status, 502, "{s:?}");
        assert_eq!(s.code.as_deref(), Some("upstream_unreachable"));
    }
    assert_eq!(cloud.hits(), 12, "each request tried 3 times");
    reconcile(gw, &seen).await;
}

async fn garbage_from_the_cloud_is_a_502_and_not_retried(api: Api) {
    let cloud = upstream(vec![Behavior::Garbage]).await;
    let gw = Gateway::start(&cloud_only(&cloud.base_url(), "")).await;
    let seen = drive(&gw, api, 6, Duration::from_secs(5)).await;
    for s in &seen {
        assert_eq!(s.status, 502, "{s:?}");
        assert_eq!(s.code.as_deref(), Some("upstream_protocol_error"));
    }
    assert_eq!(cloud.hits(), 6);
    reconcile(gw, &seen).await;
}

async fn a_truncated_stream_ends_in_an_error_frame_and_is_never_retried(api: Api) {
    let cloud = upstream(vec![Behavior::TruncatedStream { chunks: 2 }]).await;
    let gw = Gateway::start(&cloud_only(&cloud.base_url(), "")).await;
    let seen = drive(&gw, api, 8, Duration::from_secs(5)).await;
    for (i, s) in seen.iter().enumerate() {
        if i % 2 == 1 {
            // Streamed: the client had bytes already, so the failure is an error frame.
            assert_eq!(s.status, 200);
            assert!(!s.complete);
            assert_eq!(s.code.as_deref(), Some("upstream_protocol_error"), "{s:?}");
        } else {
            // Whole: the same upstream answers a truncated SSE body to a JSON request.
            assert!(s.status == 502 || s.complete, "{s:?}");
        }
    }
    let m = gw.metrics().await;
    assert_eq!(
        sample(
            &m,
            "wattgate_upstream_retries_total",
            &[("backend", "cloud"), ("kind", "protocol")]
        ),
        0.0
    );
    assert_eq!(cloud.hits(), 8, "after the first byte there is no retry");
    reconcile(gw, &seen).await;
}

/// A local backend whose code panics: in `chat`, or after its stream opened.
struct PanickingBackend {
    info: BackendInfo,
    inner: OpenAiBackend,
    mid_stream: bool,
}

#[async_trait::async_trait]
impl Backend for PanickingBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    async fn chat(&self, request: &ChatRequest) -> Result<Reply, BackendError> {
        if !self.mid_stream || !request.stream {
            panic!("injected fault: local model crashed");
        }
        match self.inner.chat(request).await? {
            Reply::Stream(mut opened) => {
                opened.rest = opened
                    .rest
                    .map(|_| -> Result<_, BackendError> { panic!("injected fault mid-stream") })
                    .boxed();
                Ok(Reply::Stream(opened))
            }
            other => Ok(other),
        }
    }

    async fn probe(&self) -> Result<(), String> {
        Ok(())
    }
}

async fn panicking_local(
    mid_stream: bool,
    guard: &str,
) -> (ScriptedUpstream, ScriptedUpstream, Gateway) {
    let local = upstream(vec![Behavior::Reply("local words here".into())]).await;
    let cloud = upstream(vec![Behavior::Reply("cloud words here".into())]).await;
    let toml = format!(
        "{FAST_RETRIES}\n[guard]\n{guard}\n{}{}",
        backend("local", "local", &local.base_url(), ""),
        backend("cloud", "cloud", &cloud.base_url(), "")
    );
    let gw = Gateway::start_with_backends(&toml, |config| {
        let local: Arc<dyn Backend> = Arc::new(PanickingBackend {
            info: BackendInfo::from_config(&config.backends[0]),
            inner: OpenAiBackend::new(&config.backends[0]).expect("local"),
            mid_stream,
        });
        let cloud: Arc<dyn Backend> =
            Arc::new(OpenAiBackend::new(&config.backends[1]).expect("cloud"));
        vec![local, cloud]
    })
    .await;
    (local, cloud, gw)
}

async fn a_local_backend_that_panics_falls_back_to_the_cloud(api: Api) {
    let (_local, cloud, gw) = panicking_local(false, "").await;
    let seen = drive(&gw, api, 10, Duration::from_secs(5)).await;
    for s in &seen {
        assert!(s.complete, "{s:?}");
        assert_eq!(s.reason, "fallback_local_error");
    }
    assert_eq!(cloud.hits(), 10);
    let m = gw.metrics().await;
    assert_eq!(
        sample(
            &m,
            "wattgate_upstream_errors_total",
            &[("backend", "local"), ("kind", "internal")]
        ),
        10.0
    );
    // The gateway is still serving after ten panics.
    assert_eq!(
        gw.post_chat(&chat_body("cloud", "still up?"))
            .await
            .status()
            .as_u16(),
        200
    );
    let mut seen = seen;
    seen.push(Seen {
        status: 200,
        complete: true,
        code: None,
        reason: "pinned".into(),
        elapsed: Duration::ZERO,
    });
    reconcile(gw, &seen).await;
}

async fn a_local_backend_that_panics_mid_stream_ends_the_stream_with_an_error_frame(api: Api) {
    // Unguarded, the stream is relayed as it comes: the failure reaches the client.
    let (_local, _cloud, gw) = panicking_local(true, "mode = \"off\"").await;
    let seen = drive(&gw, api, 10, Duration::from_secs(5)).await;
    for (i, s) in seen.iter().enumerate() {
        if i % 2 == 1 {
            assert_eq!(s.status, 200);
            assert_eq!(s.code.as_deref(), Some("internal_error"), "{s:?}");
        } else {
            assert!(s.complete, "{s:?}");
            assert_eq!(s.reason, "fallback_local_error");
        }
    }
    reconcile(gw, &seen).await;
}

async fn a_held_stream_that_breaks_before_the_client_saw_it_is_answered_by_the_cloud(api: Api) {
    // Under the guard's hold nothing of the local stream has reached the client when it
    // breaks, so the cloud answers the whole request.
    let (_local, cloud, gw) = panicking_local(true, "stream = \"hold\"").await;
    let seen = drive(&gw, api, 10, Duration::from_secs(5)).await;
    for (i, s) in seen.iter().enumerate() {
        assert!(s.complete, "{s:?}");
        // A held stream's headers leave before the verdict, with the route as decided.
        let header_reason = if i % 2 == 1 {
            "prefer_local"
        } else {
            "fallback_local_error"
        };
        assert_eq!(s.reason, header_reason, "{s:?}");
    }
    assert_eq!(cloud.hits(), 10);
    let m = gw.metrics().await;
    let served = [
        ("route", "cloud"),
        ("backend", "cloud"),
        ("reason", "fallback_local_error"),
        ("outcome", "ok"),
        ("experiment", "none"),
        ("arm", "none"),
    ];
    assert_eq!(sample(&m, "wattgate_chat_requests_total", &served), 10.0);
    reconcile(gw, &seen).await;
}

async fn a_hanging_local_backend_falls_back_at_its_first_byte_timeout(api: Api) {
    let local = upstream(vec![Behavior::slow(Duration::from_secs(60), "never")]).await;
    let cloud = upstream(vec![Behavior::Reply("cloud answer".into())]).await;
    let gw = Gateway::start(&format!(
        "{FAST_RETRIES}\n{}{}",
        backend(
            "local",
            "local",
            &local.base_url(),
            "first_byte_timeout_s = 0.3"
        ),
        backend("cloud", "cloud", &cloud.base_url(), "")
    ))
    .await;
    let seen = drive(&gw, api, 8, Duration::from_secs(3)).await;
    for s in &seen {
        assert!(s.complete, "{s:?}");
        assert_eq!(s.reason, "fallback_local_timeout");
        assert!(s.elapsed < Duration::from_secs(1), "{s:?}");
    }
    reconcile(gw, &seen).await;
}

async fn an_open_local_breaker_routes_to_the_cloud_until_a_probe_succeeds(api: Api) {
    // The local backend fails 6 times, then recovers.
    let mut script: Vec<Behavior> = (0..6).map(|_| Behavior::server_error("boom")).collect();
    script.push(Behavior::Reply("local is back".into()));
    let local = upstream(script).await;
    let cloud = upstream(vec![Behavior::Reply("cloud answer".into())]).await;
    let gw = Gateway::start(&format!(
        "{FAST_RETRIES}breaker_min_requests = 6\nbreaker_open_s = 0.5\n{}{}",
        backend("local", "local", &local.base_url(), ""),
        backend("cloud", "cloud", &cloud.base_url(), "")
    ))
    .await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.extend(drive(&gw, api, 1, Duration::from_secs(3)).await);
    }
    assert!(seen.iter().all(|s| s.reason == "fallback_local_error"));
    // Open: the router's local choice is overridden without trying the local backend.
    let open = drive(&gw, api, 6, Duration::from_secs(3)).await;
    for s in &open {
        assert!(s.complete, "{s:?}");
        assert_eq!(s.reason, "local_unhealthy");
    }
    assert_eq!(local.hits(), 6);
    // After the open period one request probes the local backend, which has recovered.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let probe = drive(&gw, api, 1, Duration::from_secs(3)).await;
    assert_eq!(probe[0].reason, "prefer_local");
    let closed = drive(&gw, api, 4, Duration::from_secs(3)).await;
    assert!(
        closed.iter().all(|s| s.reason == "prefer_local"),
        "{closed:?}"
    );
    let m = gw.metrics().await;
    for (state, n) in [("open", 1.0), ("half_open", 1.0), ("closed", 1.0)] {
        assert_eq!(
            sample(
                &m,
                "wattgate_circuit_transitions_total",
                &[("backend", "local"), ("state", state)]
            ),
            n,
            "{state}"
        );
    }
    seen.extend(open);
    seen.extend(probe);
    seen.extend(closed);
    reconcile(gw, &seen).await;
}

async fn an_open_cloud_breaker_serves_locally_whatever_the_policy_says(api: Api) {
    let local = upstream(vec![Behavior::Reply("local answer".into())]).await;
    let cloud = upstream(vec![Behavior::server_error("cloud down")]).await;
    let gw = Gateway::start(&format!(
        "{FAST_RETRIES}breaker_min_requests = 3\nmax_retries = 0\n[routing]\npolicy = \"cloud_only\"\n{}{}",
        backend("local", "local", &local.base_url(), ""),
        backend("cloud", "cloud", &cloud.base_url(), "")
    ))
    .await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.extend(drive(&gw, api, 1, Duration::from_secs(3)).await);
    }
    assert!(seen.iter().all(|s| s.status == 502), "{seen:?}");
    let served = drive(&gw, api, 6, Duration::from_secs(3)).await;
    for s in &served {
        assert!(s.complete, "{s:?}");
        assert_eq!(s.reason, "cloud_unhealthy");
    }
    assert_eq!(cloud.hits(), 3);
    // A request only the cloud can serve (tools) is not sent to the local model: it fails fast.
    let mut tools = chat_body("auto", "call it");
    tools["tools"] = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    let r = gw.post_chat(&tools).await;
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(header(&r, "x-wattgate-reason"), "cloud_only");
    let code = error_code(&r.json().await.expect("JSON"));
    assert_eq!(code, "backend_unhealthy");
    seen.extend(served);
    seen.push(Seen {
        status: 503,
        complete: false,
        code: Some(code),
        reason: "cloud_only".into(),
        elapsed: Duration::ZERO,
    });
    reconcile(gw, &seen).await;
}
