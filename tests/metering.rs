//! Metering end to end: a scripted sequence of local, cloud, streamed, escalated and failed
//! requests through the real server, then every ledger row, every Prometheus counter and the
//! `/v1/savings` and `wattgate report` totals checked against values computed by hand from the
//! config constants below.
//!
//! Local energy is metered with the `estimate` counter at 0 W, so local joules are exactly 0
//! and every other figure is exact arithmetic on tokens; the attribution of non-zero joules
//! among overlapping requests is covered by `metering::attribution`'s scripted-counter tests.

mod support;

use serde_json::{json, Value};
use support::{sample, Gateway};
use wattgate::ledger::{Ledger, LedgerRow};
use wattgate_testkit::{Behavior, ScriptedUpstream};

/// Cloud constants (per token): $2 / $8 per million, 0.5 / 1.5 J, PUE 1.2, 2e10 active params.
const CLOUD_IN_J: f64 = 0.5 * 1.2;
const CLOUD_OUT_J: f64 = 1.5 * 1.2;
const CLOUD_IN_USD: f64 = 2.0 / 1e6;
const CLOUD_OUT_USD: f64 = 8.0 / 1e6;
const CLOUD_ACTIVE: f64 = 2e10;
const LOCAL_PARAMS: f64 = 1e9;

fn config(local: &str, raw: &str, cloud: &str) -> String {
    format!(
        r#"
[metering]
energy_meter = "estimate"
cpu_watts_per_core = 0.0
idle_watts = 0.0
cloud_pue = 1.2

[ledger]
flush_interval_s = 0.05

[[backends]]
name = "local"
kind = "openai"
role = "local"
base_url = "{local}"
model = "local-model"
parameters = 1e9

[[backends]]
name = "local-raw"
kind = "openai"
role = "local"
base_url = "{raw}"
model = "raw-model"
parameters = 1e9
stream_usage = false

[[backends]]
name = "cloud"
kind = "openai"
role = "cloud"
base_url = "{cloud}"
model = "cloud-model"
parameters = 1e11
active_parameters = 2e10
usd_per_million_input_tokens = 2.0
usd_per_million_output_tokens = 8.0
joules_per_input_token = 0.5
joules_per_output_token = 1.5
"#
    )
}

/// What one row must say, computed by hand.
struct Expected {
    route: &'static str,
    backend: &'static str,
    reason: &'static str,
    outcome: &'static str,
    status: u16,
    stream: bool,
    input: u64,
    output: u64,
    tokens_source: &'static str,
    fallback_from: Option<&'static str>,
}

impl Expected {
    fn params(&self) -> f64 {
        if self.route == "local" {
            LOCAL_PARAMS
        } else {
            CLOUD_ACTIVE
        }
    }
    fn tokens(&self) -> f64 {
        (self.input + self.output) as f64
    }
    fn cloud_joules(&self) -> f64 {
        self.input as f64 * CLOUD_IN_J + self.output as f64 * CLOUD_OUT_J
    }
    fn cloud_usd(&self) -> f64 {
        self.input as f64 * CLOUD_IN_USD + self.output as f64 * CLOUD_OUT_USD
    }
}

fn close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-9 * b.abs().max(1e-9),
        "{what}: got {a}, expected {b}"
    );
}

async fn chat(gw: &Gateway, body: Value) -> (u16, String) {
    let response = gw.post_chat(&body).await;
    let status = response.status().as_u16();
    let id = support::header(&response, "x-request-id");
    // Read to the end: a stream is only accounted once it is over.
    let _ = response.bytes().await;
    (status, id)
}

#[tokio::test]
async fn every_row_and_counter_matches_the_config_constants() {
    let local = ScriptedUpstream::start(
        "local-model",
        vec![
            Behavior::Reply("one two three".into()),
            Behavior::Reply("four five".into()),
            Behavior::server_error("local model crashed"),
        ],
    )
    .await
    .expect("local upstream");
    let raw = ScriptedUpstream::start(
        "raw-model",
        vec![Behavior::Reply("six seven eight nine".into())],
    )
    .await
    .expect("raw upstream");
    let cloud = ScriptedUpstream::start(
        "cloud-model",
        vec![
            Behavior::Reply("ten eleven".into()),
            Behavior::Reply("twelve".into()),
            Behavior::rate_limited(3),
        ],
    )
    .await
    .expect("cloud upstream");
    let gw = Gateway::start(&config(
        &local.base_url(),
        &raw.base_url(),
        &cloud.base_url(),
    ))
    .await;

    let user = |model: &str, text: &str| json!({"model": model, "messages": [{"role": "user", "content": text}]});
    let stream = |model: &str, text: &str| json!({"model": model, "stream": true, "messages": [{"role": "user", "content": text}]});
    let mut ids = Vec::new();
    // A: routed local, whole reply with usage (3 prompt words, 3 reply words).
    ids.push(chat(&gw, user("auto", "alpha beta gamma")).await);
    // B: routed local, streamed with the usage chunk the gateway asks for.
    ids.push(chat(&gw, stream("auto", "alpha beta")).await);
    // C: pinned local backend that is not asked for usage and sends none: counted at ~4
    // characters per token (no tokenizer loaded): "hello there world" = 17 chars -> 5,
    // "six seven eight nine" = 20 chars -> 5.
    ids.push(chat(&gw, stream("local-raw", "hello there world")).await);
    // D: pinned cloud.
    ids.push(chat(&gw, user("cloud", "x y")).await);
    // E: routed local, local 500, escalated to the cloud (4 prompt words, 1 reply word).
    ids.push(chat(&gw, user("auto", "p q r s")).await);
    // F: pinned cloud, 429: nothing produced, nothing paid.
    ids.push(chat(&gw, user("cloud", "u v")).await);
    let statuses: Vec<u16> = ids.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);

    let expected = [
        Expected {
            route: "local",
            backend: "local",
            reason: "prefer_local",
            outcome: "ok",
            status: 200,
            stream: false,
            input: 3,
            output: 3,
            tokens_source: "upstream",
            fallback_from: None,
        },
        Expected {
            route: "local",
            backend: "local",
            reason: "prefer_local",
            outcome: "ok",
            status: 200,
            stream: true,
            input: 2,
            output: 2,
            tokens_source: "upstream",
            fallback_from: None,
        },
        Expected {
            route: "local",
            backend: "local-raw",
            reason: "pinned",
            outcome: "ok",
            status: 200,
            stream: true,
            input: 5,
            output: 5,
            tokens_source: "chars_estimate",
            fallback_from: None,
        },
        Expected {
            route: "cloud",
            backend: "cloud",
            reason: "pinned",
            outcome: "ok",
            status: 200,
            stream: false,
            input: 2,
            output: 2,
            tokens_source: "upstream",
            fallback_from: None,
        },
        Expected {
            route: "cloud",
            backend: "cloud",
            reason: "fallback_local_error",
            outcome: "ok",
            status: 200,
            stream: false,
            input: 4,
            output: 1,
            tokens_source: "upstream",
            fallback_from: Some("local"),
        },
        Expected {
            route: "cloud",
            backend: "cloud",
            reason: "pinned",
            outcome: "error",
            status: 429,
            stream: false,
            input: 0,
            output: 0,
            tokens_source: "none",
            fallback_from: None,
        },
    ];

    // Prometheus, per backend, against the same hand computation.
    let m = gw.metrics().await;
    for backend in ["local", "local-raw", "cloud"] {
        let rows: Vec<&Expected> = expected.iter().filter(|e| e.backend == backend).collect();
        let flops: f64 = rows.iter().map(|e| 2.0 * e.params() * e.tokens()).sum();
        let cf_flops: f64 = rows.iter().map(|e| 2.0 * CLOUD_ACTIVE * e.tokens()).sum();
        let cf_joules: f64 = rows.iter().map(|e| e.cloud_joules()).sum();
        let cf_usd: f64 = rows.iter().map(|e| e.cloud_usd()).sum();
        let label = [("backend", backend)];
        close(
            sample(&m, "wattgate_flops_total", &label),
            flops,
            &format!("{backend} flops"),
        );
        close(
            sample(&m, "wattgate_counterfactual_flops_total", &label),
            cf_flops,
            &format!("{backend} counterfactual flops"),
        );
        close(
            sample(&m, "wattgate_counterfactual_energy_joules_total", &label),
            cf_joules,
            &format!("{backend} counterfactual joules"),
        );
        close(
            sample(&m, "wattgate_counterfactual_cost_dollars_total", &label),
            cf_usd,
            &format!("{backend} counterfactual $"),
        );
        let input: u64 = rows.iter().map(|e| e.input).sum();
        let output: u64 = rows.iter().map(|e| e.output).sum();
        assert_eq!(
            sample(
                &m,
                "wattgate_tokens_total",
                &[("backend", backend), ("kind", "input")]
            ),
            input as f64,
            "{backend} input tokens"
        );
        assert_eq!(
            sample(
                &m,
                "wattgate_tokens_total",
                &[("backend", backend), ("kind", "output")]
            ),
            output as f64,
            "{backend} output tokens"
        );
        assert_eq!(
            sample(
                &m,
                "wattgate_energy_joules_total",
                &[("backend", backend), ("source", "estimate")]
            ),
            0.0,
            "{backend} local joules at 0 W"
        );
    }
    let cloud_rows = expected.iter().filter(|e| e.route == "cloud");
    let (cloud_j, cloud_usd) = cloud_rows.fold((0.0, 0.0), |(j, u), e| {
        (j + e.cloud_joules(), u + e.cloud_usd())
    });
    close(
        sample(
            &m,
            "wattgate_energy_joules_total",
            &[("backend", "cloud"), ("source", "cloud_estimate")],
        ),
        cloud_j,
        "cloud joules",
    );
    close(
        sample(
            &m,
            "wattgate_cost_dollars_total",
            &[("backend", "cloud"), ("kind", "cloud")],
        ),
        cloud_usd,
        "cloud $",
    );
    let ttft_count = sample(
        &m,
        "wattgate_time_to_first_token_seconds_count",
        &[("route", "local"), ("backend", "local")],
    );
    assert_eq!(ttft_count, 2.0, "TTFT observed for both local replies");

    // /v1/savings from the ledger, once the writer has committed every row (a flush interval
    // of 50 ms; up to 5 s on a loaded machine).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let savings = loop {
        let savings: Value = reqwest::get(gw.url("/v1/savings"))
            .await
            .expect("savings")
            .json()
            .await
            .expect("json");
        if savings["savings"]["total"]["requests"] == 6 || std::time::Instant::now() > deadline {
            break savings;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let total = &savings["savings"]["total"];
    assert_eq!(total["requests"], 6, "{savings:#}");
    assert_eq!(total["local_requests"], 3);
    assert_eq!(total["escalated_requests"], 1);
    assert_eq!(savings["energy_meter"]["source"], "estimate");
    assert_eq!(savings["energy_meter"]["measured"], false);
    assert_eq!(savings["baseline_backend"], "cloud");
    let cf_j: f64 = expected.iter().map(Expected::cloud_joules).sum();
    close(
        total["energy_joules"]["counterfactual"]
            .as_f64()
            .unwrap_or(-1.0),
        cf_j,
        "savings counterfactual J",
    );
    close(
        total["energy_joules"]["actual"].as_f64().unwrap_or(-1.0),
        cloud_j,
        "savings actual J",
    );
    close(
        total["energy_joules"]["saved_percent"]
            .as_f64()
            .unwrap_or(-1.0),
        (cf_j - cloud_j) / cf_j * 100.0,
        "energy saved %",
    );
    let bad = reqwest::get(gw.url("/v1/savings?since=yesterday"))
        .await
        .expect("savings");
    let error = support::expect_error(bad, 400).await;
    assert_eq!(error["param"], "since");

    // Every ledger row, after a graceful stop flushed the ledger.
    let path = gw.ledger.clone();
    let _data = gw.stop().await;
    let rows = read_rows(&path).await;
    assert_eq!(rows.len(), expected.len());
    for ((row, e), (_, id)) in rows.iter().zip(&expected).zip(&ids) {
        let what = format!("row {} ({} {})", row.request_id, e.backend, e.reason);
        assert_eq!(&row.request_id, id, "{what}: request id");
        assert_eq!(row.route, e.route, "{what}");
        assert_eq!(row.backend, e.backend, "{what}");
        assert_eq!(row.reason, e.reason, "{what}");
        assert_eq!(row.outcome, e.outcome, "{what}");
        assert_eq!(row.status, e.status, "{what}");
        assert_eq!(row.stream, e.stream, "{what}");
        assert_eq!(row.input_tokens, e.input, "{what}: input tokens");
        assert_eq!(row.output_tokens, e.output, "{what}: output tokens");
        assert_eq!(row.tokens_source, e.tokens_source, "{what}");
        assert_eq!(row.fallback_from.as_deref(), e.fallback_from, "{what}");
        assert_eq!(row.energy_source, "estimate", "{what}");
        assert!(row.latency_s > 0.0, "{what}: latency");
        assert_eq!(row.ttft_s.is_some(), e.status == 200, "{what}: ttft");
        let bill = &row.bill;
        assert_eq!(bill.local_joules, 0.0, "{what}");
        close(
            bill.flops,
            2.0 * e.params() * e.tokens(),
            &format!("{what}: flops"),
        );
        let (cj, cu) = if e.route == "cloud" {
            (e.cloud_joules(), e.cloud_usd())
        } else {
            (0.0, 0.0)
        };
        close(bill.cloud_joules, cj, &format!("{what}: cloud J"));
        close(bill.cloud_usd, cu, &format!("{what}: cloud $"));
        let cf = bill.counterfactual.unwrap_or_default();
        close(cf.joules, e.cloud_joules(), &format!("{what}: cf J"));
        close(
            cf.flops,
            2.0 * CLOUD_ACTIVE * e.tokens(),
            &format!("{what}: cf flops"),
        );
        close(cf.usd, e.cloud_usd(), &format!("{what}: cf $"));
    }

    // `wattgate report` over the same file: totals are the sums of the rows.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wattgate"))
        .args(["report", "--format", "json", "--ledger"])
        .arg(&path)
        .output()
        .expect("run report");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("report JSON");
    let sum = |f: &dyn Fn(&LedgerRow) -> f64| rows.iter().map(f).sum::<f64>();
    close(
        report["total"]["cost_usd"]["actual"]
            .as_f64()
            .unwrap_or(-1.0),
        sum(&|r| r.bill.usd()),
        "report $",
    );
    close(
        report["total"]["compute_flops"]["counterfactual"]
            .as_f64()
            .unwrap_or(-1.0),
        sum(&|r| r.bill.counterfactual.unwrap_or_default().flops),
        "report cf flops",
    );
    assert_eq!(report["by_backend"]["local-raw"]["requests"], 1);
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_wattgate"))
        .args(["report", "--ledger"])
        .arg(&path)
        .output()
        .expect("run report");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("requests 6") && text.contains("(estimated)"),
        "{text}"
    );
}

/// Opens the ledger once the stopped daemon's writer thread has let go of it.
async fn read_rows(path: &std::path::Path) -> Vec<LedgerRow> {
    for _ in 0..100 {
        match Ledger::open(path) {
            Ok(ledger) => return ledger.rows_since(0).expect("rows"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    panic!("ledger {} stayed locked", path.display());
}

#[tokio::test]
async fn dashboard_page_and_series_are_served_without_external_resources() {
    let up = ScriptedUpstream::start("local-model", vec![Behavior::Reply("fine".into())])
        .await
        .expect("upstream");
    let gw = Gateway::start(&format!(
        "[ledger]\nflush_interval_s = 0.05\n{}",
        support::backend("local", "local", &up.base_url(), "")
    ))
    .await;
    for _ in 0..3 {
        chat(
            &gw,
            json!({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    }
    let page = reqwest::get(gw.url("/dashboard")).await.expect("dashboard");
    assert_eq!(page.status(), 200);
    assert!(support::header(&page, "content-type").starts_with("text/html"));
    let html = page.text().await.expect("html");
    assert!(
        html.contains("/v1/savings/series"),
        "the page reads the daemon's own endpoints"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external resources (CDNs) in the page"
    );
    // Once the writer has committed the three rows (up to 5 s on a loaded machine).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let buckets = loop {
        let series: Value = reqwest::get(gw.url("/v1/savings/series?since=10m&step=1m"))
            .await
            .expect("series")
            .json()
            .await
            .expect("json");
        let buckets = series["buckets"].as_array().cloned().unwrap_or_default();
        let seen: u64 = buckets.iter().filter_map(|b| b["requests"].as_u64()).sum();
        if seen == 3 || std::time::Instant::now() > deadline {
            break buckets;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        buckets.len(),
        11,
        "10 minutes in 1-minute buckets, both ends included"
    );
    let requests: u64 = buckets.iter().filter_map(|b| b["requests"].as_u64()).sum();
    assert_eq!(requests, 3);
    let routed: u64 = buckets
        .iter()
        .filter_map(|b| b["reasons"]["no_cloud_backend"].as_u64())
        .sum();
    assert_eq!(routed, 3);
    let bad = reqwest::get(gw.url("/v1/savings/series?step=fast"))
        .await
        .expect("series");
    let error = support::expect_error(bad, 400).await;
    assert_eq!(error["param"], "step");
}
