//! The quality guard against scripted loopback upstreams that return `logprobs` (only when asked,
//! as llama.cpp's server and vLLM do): doubtful local answers are replaced by the cloud's, sure
//! ones pass unchanged, and every request is accounted with both legs.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{chat_body, header, local_and_cloud, sample, Gateway};
use wattgate::ledger::Ledger;
use wattgate_testkit::{Behavior, ScriptedUpstream};

const LOCAL_TEXT: &str = "the local model guesses wildly";
const CLOUD_TEXT: &str = "the cloud knows";

async fn upstream(name: &str, script: Vec<Behavior>) -> ScriptedUpstream {
    ScriptedUpstream::start(name, script)
        .await
        .expect("upstream")
}

/// A local upstream whose every token has ln P = `logprob`, and a cloud that answers.
async fn pair(logprob: f32, gap: Duration) -> (ScriptedUpstream, ScriptedUpstream) {
    let local = upstream(
        "local-upstream",
        vec![Behavior::Confident {
            content: LOCAL_TEXT.to_owned(),
            logprob,
            gap,
        }],
    )
    .await;
    let cloud = upstream(
        "cloud-upstream",
        vec![Behavior::Reply(CLOUD_TEXT.to_owned())],
    )
    .await;
    (local, cloud)
}

/// The gateway over `local` (declared to return logprobs, as llama.cpp's server does) and
/// `cloud`, with `[guard]` lines `guard` (threshold 0.5 on the rule: exp(mean ln P)).
async fn gateway(local: &ScriptedUpstream, cloud: &ScriptedUpstream, guard: &str) -> Gateway {
    let head = format!("[resilience]\nmax_retries = 0\n[guard]\nthreshold = 0.5\n{guard}\n");
    Gateway::start(&local_and_cloud(
        &head,
        &local.base_url(),
        &cloud.base_url(),
        "supports_logprobs = true",
    ))
    .await
}

/// A streamed request.
fn streamed(text: &str) -> Value {
    let mut body = chat_body("auto", text);
    body["stream"] = json!(true);
    body
}

/// Stops the gateway and reads its ledger.
async fn ledger_rows(gw: Gateway) -> Vec<wattgate::ledger::LedgerRow> {
    let dir = gw.stop().await;
    Ledger::open(&dir.path().join("ledger.redb"))
        .expect("ledger")
        .rows_since(0)
        .expect("rows")
}

fn content(v: &Value) -> &str {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
}

/// Reads an SSE body: the data frames' JSON (without `[DONE]`), the comment lines, and whether
/// `[DONE]` ended it.
fn frames(body: &str) -> (Vec<Value>, Vec<String>, bool) {
    let mut data = Vec::new();
    let mut comments = Vec::new();
    let mut done = false;
    for line in body.lines() {
        if let Some(d) = line.strip_prefix("data: ") {
            if d == "[DONE]" {
                done = true;
            } else {
                data.push(serde_json::from_str(d).expect("frame is JSON"));
            }
        } else if let Some(c) = line.strip_prefix(':') {
            comments.push(c.trim().to_owned());
        }
    }
    (data, comments, done)
}

fn streamed_text(frames: &[Value]) -> String {
    frames
        .iter()
        .filter_map(|f| f["choices"][0]["delta"]["content"].as_str())
        .collect()
}

#[tokio::test]
async fn a_doubtful_local_answer_is_replaced_by_the_clouds() {
    // exp(-3) = 0.05 < 0.5.
    let (local, cloud) = pair(-3.0, Duration::ZERO).await;
    let gw = gateway(&local, &cloud, "").await;
    let r = gw
        .post_chat(&chat_body("auto", "what is the capital of Peru?"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-wattgate-route"), "cloud");
    assert_eq!(header(&r, "x-wattgate-backend"), "cloud");
    assert_eq!(header(&r, "x-wattgate-reason"), "escalated_low_confidence");
    assert_eq!(header(&r, "x-wattgate-fallback-from"), "local");
    assert_eq!(header(&r, "x-wattgate-guard"), "escalated");
    let confidence: f64 = header(&r, "x-wattgate-confidence")
        .parse()
        .expect("confidence");
    assert!((confidence - (-3.0f64).exp()).abs() < 1e-3, "{confidence}");
    let v: Value = r.json().await.expect("json");
    assert_eq!(content(&v), CLOUD_TEXT);
    // The gateway asked the local server for logprobs on the guard's behalf.
    let asked = local.requests();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].body["logprobs"], json!(true));
    assert_eq!(cloud.hits(), 1);

    let m = gw.metrics().await;
    let labels = [("backend", "local"), ("decision", "escalated")];
    assert_eq!(sample(&m, "wattgate_guard_decisions_total", &labels), 1.0);
    assert_eq!(
        sample(
            &m,
            "wattgate_guard_confidence_count",
            &[("backend", "local")]
        ),
        1.0
    );

    // The savings API the dashboard draws from counts the decision, in totals and per bucket
    // (polled: the ledger is written in batches).
    let mut seen = (Value::Null, Value::Null);
    for _ in 0..100 {
        let get = |path: &str| {
            let url = gw.url(path);
            async move {
                let r = reqwest::get(url).await.expect("savings");
                r.json::<Value>().await.expect("json")
            }
        };
        seen = (
            get("/v1/savings?since=1h").await,
            get("/v1/savings/series?since=10m&step=1m").await,
        );
        if seen.0["savings"]["total"]["requests"] == json!(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen.0["savings"]["total"]["guard_decisions"],
        json!({"escalated": 1}),
        "{}",
        seen.0
    );
    let buckets = seen.1["buckets"].as_array().cloned().unwrap_or_default();
    let escalated: u64 = buckets
        .iter()
        .filter_map(|b| b["guard"]["escalated"].as_u64())
        .sum();
    assert_eq!(escalated, 1, "{}", seen.1);

    // The ledger row carries both legs.
    let rows = ledger_rows(gw).await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.route, "cloud");
    assert_eq!(row.reason, "escalated_low_confidence");
    assert_eq!(row.fallback_from.as_deref(), Some("local"));
    let g = row.guard.as_ref().expect("guard part of the row");
    assert_eq!(g.decision, "escalated");
    assert_eq!(g.local_backend, "local");
    assert_eq!(
        g.local_output_tokens, 5,
        "the discarded local answer's tokens"
    );
    assert!(g.local_input_tokens > 0);
    let signals = g.signals.expect("signals");
    assert_eq!(signals.tokens, 5);
    assert!((signals.mean + 3.0).abs() < 1e-6);
    // The cloud leg is priced; compute is both legs: 2 x 1e9 params x tokens each.
    assert_eq!(row.output_tokens, 3, "the cloud answer's tokens");
    let cloud_flops = 2.0 * 1e9 * (row.input_tokens + row.output_tokens) as f64;
    let local_flops = 2.0 * 1e9 * (g.local_input_tokens + g.local_output_tokens) as f64;
    assert_eq!(g.local_flops, local_flops);
    assert_eq!(row.bill.flops, cloud_flops + local_flops);
}

#[tokio::test]
async fn a_sure_local_answer_passes_byte_for_byte() {
    // exp(-0.01) = 0.99.
    let (local, cloud) = pair(-0.01, Duration::ZERO).await;
    let gw = gateway(&local, &cloud, "").await;

    // The client asked for logprobs itself: the upstream's body is relayed unchanged.
    let mut body = chat_body("auto", "hello");
    body["logprobs"] = json!(true);
    let r = gw.post_chat(&body).await;
    assert_eq!(header(&r, "x-wattgate-route"), "local");
    assert_eq!(header(&r, "x-wattgate-reason"), "prefer_local");
    assert_eq!(header(&r, "x-wattgate-guard"), "pass");
    assert!(!header(&r, "x-wattgate-confidence").is_empty());
    let through_gateway = r.bytes().await.expect("body");
    let mut direct_body = body.clone();
    direct_body["model"] = json!("local-upstream");
    let direct = reqwest::Client::new()
        .post(format!("{}/chat/completions", local.base_url()))
        .json(&direct_body)
        .send()
        .await
        .expect("direct")
        .bytes()
        .await
        .expect("direct body");
    assert_eq!(through_gateway, direct, "relayed byte for byte");

    // The client did not ask: the logprobs the gateway asked for are gone (null, as OpenAI
    // answers such a client), and the rest equals the upstream's own answer without them.
    let r = gw.post_chat(&chat_body("auto", "hello")).await;
    assert_eq!(header(&r, "x-wattgate-guard"), "pass");
    let through_gateway = r.bytes().await.expect("body");
    let direct = reqwest::Client::new()
        .post(format!("{}/chat/completions", local.base_url()))
        .json(&chat_body("local-upstream", "hello"))
        .send()
        .await
        .expect("direct")
        .bytes()
        .await
        .expect("direct body");
    assert_eq!(
        through_gateway, direct,
        "the same bytes as an answer without logprobs"
    );
    let v: Value = serde_json::from_slice(&through_gateway).expect("json");
    assert_eq!(v["choices"][0]["logprobs"], Value::Null);
    assert_eq!(v["usage"]["completion_tokens"], 5, "usage unchanged");
    assert_eq!(cloud.hits(), 0);
    let m = gw.metrics().await;
    let labels = [("backend", "local"), ("decision", "pass")];
    assert_eq!(sample(&m, "wattgate_guard_decisions_total", &labels), 2.0);
}

#[tokio::test]
async fn a_held_doubtful_stream_delivers_only_the_clouds_chunks() {
    // Local chunks 150 ms apart, keep-alives every 50 ms while held.
    let (local, cloud) = pair(-3.0, Duration::from_millis(150)).await;
    let gw = gateway(&local, &cloud, "keepalive_s = 0.05").await;
    let r = gw.post_chat(&streamed("tell me")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-wattgate-guard"), "hold");
    let text = r.text().await.expect("body");
    let (data, comments, done) = frames(&text);
    assert!(done, "{text}");
    assert_eq!(streamed_text(&data), CLOUD_TEXT, "{text}");
    assert!(
        data.iter().all(|f| f["model"] == "cloud-upstream"),
        "only the cloud's chunks reach the client: {text}"
    );
    assert!(
        comments.iter().filter(|c| *c == "keep-alive").count() >= 3,
        "keep-alives while the answer was held: {comments:?}"
    );
    assert!(
        comments
            .iter()
            .any(|c| c.starts_with("wattgate-guard decision=escalated")),
        "{comments:?}"
    );
    let m = gw.metrics().await;
    let labels = [("backend", "local"), ("decision", "escalated")];
    assert_eq!(sample(&m, "wattgate_guard_decisions_total", &labels), 1.0);
    let rows = ledger_rows(gw).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].reason, "escalated_low_confidence");
    assert_eq!(rows[0].route, "cloud");
    assert_eq!(rows[0].outcome, "ok");
    let g = rows[0].guard.as_ref().expect("guard");
    assert_eq!(
        (g.decision.as_str(), g.local_output_tokens),
        ("escalated", 5)
    );
}

#[tokio::test]
async fn a_held_sure_stream_is_released_unchanged() {
    let (local, cloud) = pair(-0.01, Duration::ZERO).await;
    let gw = gateway(&local, &cloud, "").await;
    let text = gw
        .post_chat(&streamed("tell me"))
        .await
        .text()
        .await
        .expect("body");
    let (data, comments, done) = frames(&text);
    assert!(done);
    assert_eq!(streamed_text(&data), LOCAL_TEXT);
    assert!(data
        .iter()
        .all(|f| f["choices"].get(0).is_none_or(|c| c["logprobs"].is_null())));
    assert!(comments
        .iter()
        .any(|c| c.starts_with("wattgate-guard decision=pass")));
    assert_eq!(cloud.hits(), 0);
}

#[tokio::test]
async fn the_guard_header_off_skips_the_check_and_pass_streams_are_counted() {
    let (local, cloud) = pair(-3.0, Duration::ZERO).await;
    let gw = gateway(&local, &cloud, "stream = \"pass\"").await;
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .header("x-wattgate-guard", "off")
        .json(&chat_body("auto", "hi"))
        .send()
        .await
        .expect("gateway");
    assert_eq!(header(&r, "x-wattgate-route"), "local");
    assert_eq!(header(&r, "x-wattgate-guard"), "");
    assert_eq!(content(&r.json::<Value>().await.expect("json")), LOCAL_TEXT);
    assert!(
        local.requests()[0].body.get("logprobs").is_none(),
        "no logprobs asked for when the guard is off"
    );
    let bad = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .header("x-wattgate-guard", "maybe")
        .json(&chat_body("auto", "hi"))
        .send()
        .await
        .expect("gateway");
    let e = support::expect_error(bad, 400).await;
    assert_eq!(e["param"], "x-wattgate-guard");

    // stream = "pass": streamed unchecked, counted.
    let r = gw.post_chat(&streamed("tell me")).await;
    assert_eq!(header(&r, "x-wattgate-guard"), "unchecked");
    let (data, _, _) = frames(&r.text().await.expect("body"));
    assert_eq!(streamed_text(&data), LOCAL_TEXT);
    assert_eq!(cloud.hits(), 0);
    let m = gw.metrics().await;
    let labels = [("backend", "local"), ("decision", "unchecked")];
    assert_eq!(sample(&m, "wattgate_guard_decisions_total", &labels), 1.0);
}

#[tokio::test]
async fn a_server_without_logprobs_is_served_as_no_signal() {
    let local = upstream(
        "local-upstream",
        vec![Behavior::Reply(LOCAL_TEXT.to_owned())],
    )
    .await;
    let cloud = upstream(
        "cloud-upstream",
        vec![Behavior::Reply(CLOUD_TEXT.to_owned())],
    )
    .await;
    let gw = gateway(&local, &cloud, "").await;
    for stream in [false, true] {
        let mut body = chat_body("auto", "hi");
        body["stream"] = json!(stream);
        let r = gw.post_chat(&body).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-wattgate-route"), "local");
        let text = r.text().await.expect("body");
        if stream {
            let (data, comments, done) = frames(&text);
            assert!(done);
            assert_eq!(streamed_text(&data), LOCAL_TEXT);
            assert!(comments
                .iter()
                .any(|c| c.starts_with("wattgate-guard decision=no_signal")));
        } else {
            let v: Value = serde_json::from_str(&text).expect("json");
            assert_eq!(content(&v), LOCAL_TEXT);
        }
    }
    assert_eq!(cloud.hits(), 0);
    let m = gw.metrics().await;
    let labels = [("backend", "local"), ("decision", "no_signal")];
    assert_eq!(sample(&m, "wattgate_guard_decisions_total", &labels), 2.0);
    let ok = [
        ("route", "local"),
        ("backend", "local"),
        ("reason", "prefer_local"),
        ("outcome", "ok"),
        ("experiment", "none"),
        ("arm", "none"),
    ];
    assert_eq!(sample(&m, "wattgate_chat_requests_total", &ok), 2.0);
}

#[tokio::test]
async fn a_failed_escalation_serves_the_held_local_answer() {
    let local = upstream(
        "local-upstream",
        vec![Behavior::confident(LOCAL_TEXT, -3.0)],
    )
    .await;
    let cloud = upstream(
        "cloud-upstream",
        vec![Behavior::server_error("cloud is down")],
    )
    .await;
    let gw = gateway(&local, &cloud, "").await;
    let r = gw.post_chat(&chat_body("auto", "hi")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-wattgate-route"), "local");
    assert_eq!(header(&r, "x-wattgate-reason"), "escalation_failed");
    assert_eq!(header(&r, "x-wattgate-guard"), "escalation_failed");
    assert_eq!(content(&r.json::<Value>().await.expect("json")), LOCAL_TEXT);

    let text = gw
        .post_chat(&streamed("hi"))
        .await
        .text()
        .await
        .expect("body");
    let (data, comments, done) = frames(&text);
    assert!(done, "{text}");
    assert_eq!(streamed_text(&data), LOCAL_TEXT, "{text}");
    assert!(comments
        .iter()
        .any(|c| c.starts_with("wattgate-guard decision=escalation_failed")));
    assert_eq!(cloud.hits(), 2);
    let m = gw.metrics().await;
    let labels = [("backend", "local"), ("decision", "escalation_failed")];
    assert_eq!(sample(&m, "wattgate_guard_decisions_total", &labels), 2.0);
    let rows = ledger_rows(gw).await;
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert_eq!(
            (row.route.as_str(), row.reason.as_str()),
            ("local", "escalation_failed")
        );
        assert_eq!(row.outcome, "ok");
        assert_eq!(row.bill.cloud_usd, 0.0);
    }
}

#[tokio::test]
async fn an_experiment_arm_can_turn_the_guard_off() {
    let (local, cloud) = pair(-3.0, Duration::ZERO).await;
    let head = "[resilience]\nmax_retries = 0\n[guard]\nthreshold = 0.5\n\
        [[experiments]]\nname = \"guard-ab\"\nunit = \"user\"\n\
        [[experiments.arms]]\nname = \"router-alone\"\nguard = \"off\"\n\
        [[experiments.arms]]\nname = \"router-guard\"\nweight = 0.0\n";
    let gw = Gateway::start(&local_and_cloud(
        head,
        &local.base_url(),
        &cloud.base_url(),
        "",
    ))
    .await;
    let mut body = chat_body("auto", "hi");
    body["user"] = json!("u1");
    let r = gw.post_chat(&body).await;
    assert_eq!(header(&r, "x-wattgate-arm"), "router-alone");
    assert_eq!(header(&r, "x-wattgate-route"), "local");
    assert_eq!(header(&r, "x-wattgate-guard"), "");
    // Not enrolled (no user): the configured guard escalates.
    let r = gw.post_chat(&chat_body("auto", "hi")).await;
    assert_eq!(header(&r, "x-wattgate-guard"), "escalated");
    assert_eq!(cloud.hits(), 1);
}
