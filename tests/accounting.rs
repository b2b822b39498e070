//! Every request is counted as it ended: an in-band error is an error, a request whose client
//! leaves before its first byte is `abandoned`, one cut at the end of the shutdown grace is
//! `shutdown`, and each of them carries its share of the energy meter, in the ledger, the
//! counters and `/v1/savings`.
//!
//! Energy is the `estimate` counter with `idle_watts = 100` and no per-core watts: the counter
//! then grows 100 J per second of wall time, so a request alone on the meter is charged
//! 100 W x its own duration, and a meter that charged it nothing fails these tests.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::apis::{for_each_api, Api};
use support::{sample, Gateway};
use wattgate::ledger::{Ledger, LedgerRow};
use wattgate_testkit::{Behavior, ScriptedUpstream};

const WATTS: f64 = 100.0;

fn config(local: &str, cloud: &str, grace_s: f64) -> String {
    format!(
        r#"
[server]
shutdown_grace_s = {grace_s}

[metering]
energy_meter = "estimate"
cpu_watts_per_core = 0.0
idle_watts = {WATTS}
sample_interval_ms = 20

[ledger]
flush_interval_s = 0.05

{}
{}
"#,
        support::backend("local", "local", local, ""),
        support::backend(
            "cloud",
            "cloud",
            cloud,
            "usd_per_million_input_tokens = 2.0\nusd_per_million_output_tokens = 8.0"
        ),
    )
}

async fn upstreams(local: Vec<Behavior>) -> (ScriptedUpstream, ScriptedUpstream) {
    let local = ScriptedUpstream::start("local-upstream", local)
        .await
        .expect("local upstream");
    let cloud = ScriptedUpstream::start("cloud-upstream", vec![Behavior::Reply("cloud".into())])
        .await
        .expect("cloud upstream");
    (local, cloud)
}

/// The rows of a stopped gateway's ledger.
fn rows(path: &std::path::Path) -> Vec<LedgerRow> {
    Ledger::open(path)
        .expect("ledger free after stop")
        .rows_since(0)
        .expect("rows")
}

/// The sum of `name`'s samples whose labels include `label="value"`.
fn sum_where(metrics: &str, name: &str, label: &str, value: &str) -> f64 {
    let wanted = format!("{label}=\"{value}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&wanted))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Polls `/metrics` until `wattgate_chat_requests_total{outcome}` reaches 1 (10 s at most).
async fn wait_for_outcome(gw: &Gateway, outcome: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = gw.metrics().await;
        if sum_where(&metrics, "wattgate_chat_requests_total", "outcome", outcome) >= 1.0 {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "no request counted `{outcome}`:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The energy charged to a request alone on the meter: 100 W over its duration, within the
/// meter's interpolation error (a sample interval either side).
fn assert_charged_for(row: &LedgerRow) {
    let expected = WATTS * row.latency_s;
    let got = row.bill.local_joules;
    assert!(
        (got - expected).abs() <= WATTS * 0.05 + expected * 0.2,
        "request {} ({}) charged {got} J over {:.3} s; expected about {expected} J",
        row.request_id,
        row.outcome,
        row.latency_s
    );
}

#[tokio::test]
async fn an_in_band_error_chunk_makes_the_stream_an_error() {
    let (local, cloud) = upstreams(vec![Behavior::InBandError {
        chunks: 2,
        message: "CUDA out of memory".into(),
    }])
    .await;
    let gw = Gateway::start(&config(&local.base_url(), &cloud.base_url(), 5.0)).await;
    let response = gw
        .post_chat(&json!({
            "model": "local",
            "stream": true,
            "messages": [{"role": "user", "content": "Count to eight."}],
        }))
        .await;
    assert_eq!(response.status(), 200);
    let body = response.text().await.expect("stream");
    assert!(body.contains("CUDA out of memory"), "{body}");
    let metrics = wait_for_outcome(&gw, "error").await;
    assert_eq!(
        sum_where(&metrics, "wattgate_chat_requests_total", "outcome", "ok"),
        0.0,
        "{metrics}"
    );
    let path = gw.ledger.clone();
    let _dir = gw.stop().await;
    let rows = rows(&path);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].outcome, "error", "{:?}", rows[0]);
    assert_eq!(rows[0].status, 200, "the client saw the stream's 200");
}

/// A request of `api` to the `local` backend, whole.
fn to_local(api: Api, text: &str) -> serde_json::Value {
    let mut body = api.body(text, false);
    body["model"] = json!("local");
    body
}

async fn a_client_that_leaves_before_the_first_byte_is_recorded_abandoned_with_its_energy(
    api: Api,
) {
    let (local, cloud) = upstreams(vec![Behavior::Delay(
        Duration::from_secs(2),
        Box::new(Behavior::Reply("too late".into())),
    )])
    .await;
    let gw = Gateway::start(&config(&local.base_url(), &cloud.base_url(), 5.0)).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .expect("client");
    let sent = Instant::now();
    let result = impatient
        .post(gw.url(api.path()))
        .header("x-request-id", "leaves-early")
        .json(&to_local(api, "What is the capital of France?"))
        .send()
        .await;
    assert!(result.is_err(), "the client gave up: {result:?}");
    let metrics = wait_for_outcome(&gw, "abandoned").await;
    assert!(
        sent.elapsed() < Duration::from_millis(1900),
        "recorded when the client left, not when the upstream answered"
    );
    assert!(
        sample(
            &metrics,
            "wattgate_energy_joules_total",
            &[("backend", "local"), ("source", "estimate")]
        ) > 0.0,
        "{metrics}"
    );
    let path = gw.ledger.clone();
    let _dir = gw.stop().await;
    let rows = rows(&path);
    let row = rows
        .iter()
        .find(|r| r.request_id == "leaves-early")
        .expect("a row for the abandoned request");
    assert_eq!(row.outcome, "abandoned");
    assert_eq!(row.status, 0, "no status line was sent");
    assert_eq!(row.backend, "local");
    assert!(
        (0.15..1.0).contains(&row.latency_s),
        "latency is the time until the client left: {}",
        row.latency_s
    );
    assert!(row.input_tokens > 0, "the prompt went upstream: {row:?}");
    assert_eq!(row.output_tokens, 0);
    assert_charged_for(row);
}

async fn a_request_cut_at_the_end_of_the_shutdown_grace_is_recorded_shutdown(api: Api) {
    let (local, cloud) = upstreams(vec![Behavior::Delay(
        Duration::from_secs(30),
        Box::new(Behavior::Reply("never".into())),
    )])
    .await;
    let gw = Gateway::start(&config(&local.base_url(), &cloud.base_url(), 0.3)).await;
    let url = gw.url(api.path());
    let pending = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .header("x-request-id", "cut-off")
            .json(&to_local(api, "Write a long essay."))
            .send()
            .await
    });
    // In flight before shutdown begins.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sample(&gw.metrics().await, "wattgate_chat_in_flight_requests", &[]) < 1.0 {
        assert!(Instant::now() < deadline, "the request never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let path = gw.ledger.clone();
    let stopping = Instant::now();
    let _dir = gw.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "stopped after the grace, not after the upstream: {:?}",
        stopping.elapsed()
    );
    let answer = pending.await.expect("client task");
    assert!(answer.is_err(), "the connection was closed: {answer:?}");
    let rows = rows(&path);
    let row = rows
        .iter()
        .find(|r| r.request_id == "cut-off")
        .expect("a row for the request cut at shutdown");
    assert_eq!(row.outcome, "shutdown", "{row:?}");
    assert_eq!(row.status, 0);
    assert!(row.latency_s >= 0.3, "{}", row.latency_s);
    assert!(row.input_tokens > 0);
    assert_charged_for(row);
}

// Both accounting rows hold on every API: the meter sees the chat request the edge made.
for_each_api!(
    a_client_that_leaves_before_the_first_byte_is_recorded_abandoned_with_its_energy,
    a_request_cut_at_the_end_of_the_shutdown_grace_is_recorded_shutdown,
);

#[tokio::test]
async fn an_answered_request_is_charged_its_share_of_the_meter() {
    let (local, cloud) = upstreams(vec![Behavior::Delay(
        Duration::from_millis(400),
        Box::new(Behavior::Reply("Paris.".into())),
    )])
    .await;
    let gw = Gateway::start(&config(&local.base_url(), &cloud.base_url(), 5.0)).await;
    let response = gw
        .post_chat(&json!({
            "model": "local",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        }))
        .await;
    assert_eq!(response.status(), 200);
    let _ = response.bytes().await;
    let metrics = wait_for_outcome(&gw, "ok").await;
    let counted = sample(
        &metrics,
        "wattgate_energy_joules_total",
        &[("backend", "local"), ("source", "estimate")],
    );
    let path = gw.ledger.clone();
    let _dir = gw.stop().await;
    let rows = rows(&path);
    assert_eq!(rows.len(), 1);
    assert!(rows[0].latency_s >= 0.4);
    assert_charged_for(&rows[0]);
    assert!(
        (counted - rows[0].bill.local_joules).abs() < 1e-6,
        "Prometheus {counted} J, ledger {} J",
        rows[0].bill.local_joules
    );
}

#[tokio::test]
async fn savings_are_reported_gross_and_net_of_the_idle_machine() {
    let (local, cloud) = upstreams(vec![Behavior::Reply("Paris.".into())]).await;
    // Hardware at $3.60/h is $0.001 per second, idle or not.
    let toml = config(&local.base_url(), &cloud.base_url(), 5.0).replace(
        "sample_interval_ms = 20",
        "sample_interval_ms = 20\nhardware_usd_per_hour = 3.6",
    );
    let gw = Gateway::start(&toml).await;
    let response = gw
        .post_chat(&json!({
            "model": "local",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        }))
        .await;
    assert_eq!(response.status(), 200);
    let _ = response.bytes().await;
    // Nobody uses the machine for a second: 100 J and $0.001 of idle.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let metrics = gw.metrics().await;
    assert!(
        sample(&metrics, "wattgate_idle_cost_dollars", &[]) > 0.0005,
        "{metrics}"
    );
    let path = gw.ledger.clone();
    let _dir = gw.stop().await;
    let savings = Ledger::open(&path)
        .expect("ledger")
        .savings_since(0)
        .expect("savings");
    let idle = savings.idle;
    assert!(
        idle.seconds >= 0.9 && (idle.joules - WATTS * idle.seconds).abs() < 5.0,
        "{idle:?}"
    );
    let per_second = 0.165 / 3.6e6 * WATTS + 0.001;
    assert!(
        (idle.usd - per_second * idle.seconds).abs() < 1e-4,
        "{idle:?}"
    );
    let gross = savings
        .total
        .energy_joules
        .saved
        .expect("a baseline is configured");
    let net = savings.net.energy_joules.expect("net energy");
    assert!(
        (gross - idle.joules - net).abs() < 1e-9,
        "{gross} - {idle:?} != {net}"
    );
    let gross_usd = savings.total.cost_usd.saved.expect("gross $");
    let net_usd = savings.net.cost_usd.expect("net $");
    assert!((gross_usd - idle.usd - net_usd).abs() < 1e-12);
}
