//! A/B experiments end to end: the real gateway on loopback, scripted upstreams, real clients.
//! Sticky assignment across restarts and replicas, feedback validation and idempotency, shadow
//! sampling and its budget, and a replayed experiment on the shared labeled data whose report
//! recovers each arm's true quality and local share within its confidence intervals.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;

use futures::StreamExt;
use serde_json::{json, Value};
use support::{backend, expect_error, header, sample, Gateway};
use wattgate::ledger::{Ledger, OutcomeSource};
use wattgate_testkit::upstream::{Behavior, ScriptedUpstream};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

async fn upstream(name: &str, reply: &str) -> ScriptedUpstream {
    ScriptedUpstream::start(name, vec![Behavior::Reply(reply.to_owned())])
        .await
        .expect("upstream")
}

/// Local and cloud backends (cloud priced at $1,000 per million tokens so budgets bind at
/// test sizes), after `head`.
fn config(head: &str, local: &ScriptedUpstream, cloud: &ScriptedUpstream, tail: &str) -> String {
    format!(
        "{head}\n{}{}{tail}",
        backend("local", "local", &local.base_url(), ""),
        backend(
            "cloud",
            "cloud",
            &cloud.base_url(),
            "usd_per_million_input_tokens = 1000.0\nusd_per_million_output_tokens = 1000.0"
        ),
    )
}

/// Two experiments: by session header first, then by user; each with a local arm and a
/// cloud-only control.
const STICKY: &str = r#"
[[experiments]]
name = "by-session"
unit = "header"
[[experiments.arms]]
name = "control"
policy = "cloud_only"
[[experiments.arms]]
name = "local"
policy = "prefer_local"

[[experiments]]
name = "by-user"
unit = "user"
control = "cloud"
[[experiments.arms]]
name = "cloud"
weight = 1.0
policy = "cloud_only"
[[experiments.arms]]
name = "local"
weight = 3.0
policy = "prefer_local"
"#;

async fn arm_of(
    gw: &Gateway,
    user: Option<&str>,
    session: Option<&str>,
) -> (String, String, String) {
    let mut body = support::chat_body("auto", "hello there");
    if let Some(u) = user {
        body["user"] = json!(u);
    }
    let mut request = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(&body);
    if let Some(s) = session {
        request = request.header("x-wattgate-session", s);
    }
    let response = request.send().await.expect("gateway");
    assert_eq!(response.status(), 200);
    (
        header(&response, "x-wattgate-experiment"),
        header(&response, "x-wattgate-arm"),
        header(&response, "x-wattgate-route"),
    )
}

#[tokio::test]
async fn the_same_unit_lands_in_the_same_arm_across_restarts_and_replicas() {
    let local = upstream("local", "hi from local").await;
    let cloud = upstream("cloud", "hi from cloud").await;
    let toml = config("", &local, &cloud, STICKY);
    let a = Gateway::start(&toml).await;
    let b = Gateway::start(&toml).await;
    let users: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
    let mut first = HashMap::new();
    for user in &users {
        let (experiment, arm, route) = arm_of(&a, Some(user), None).await;
        assert_eq!(experiment, "by-user");
        // The arm decides the route: the control is cloud-only.
        assert_eq!(
            route,
            if arm == "cloud" { "cloud" } else { "local" },
            "{user}"
        );
        assert_eq!(
            arm_of(&b, Some(user), None).await.1,
            arm,
            "{user} on replica b"
        );
        first.insert(user.clone(), arm);
    }
    // Both arms are used, roughly 1:3.
    let cloud_users = first.values().filter(|a| *a == "cloud").count();
    assert!(
        (5..=27).contains(&cloud_users),
        "{cloud_users} of 60 in the 25% arm"
    );

    // A restart (new process state, same config) keeps every assignment.
    let _ledger = a.stop().await;
    let a = Gateway::start(&toml).await;
    for user in &users {
        assert_eq!(
            arm_of(&a, Some(user), None).await.1,
            first[user],
            "{user} after restart"
        );
    }

    // The header experiment comes first in config, so it takes requests carrying the header.
    let (experiment, arm, _) = arm_of(&a, Some("user-1"), Some("session-9")).await;
    assert_eq!(experiment, "by-session");
    for _ in 0..3 {
        assert_eq!(arm_of(&b, None, Some("session-9")).await.1, arm);
    }
    // Neither key: not enrolled, no arm headers, arm "none" in the metrics.
    assert_eq!(
        arm_of(&a, None, None).await,
        (String::new(), String::new(), "local".to_owned())
    );
    let metrics = a.metrics().await;
    let none = sample(
        &metrics,
        "wattgate_chat_requests_total",
        &[
            ("route", "local"),
            ("backend", "local"),
            ("reason", "prefer_local"),
            ("outcome", "ok"),
            ("experiment", "none"),
            ("arm", "none"),
        ],
    );
    assert_eq!(none, 1.0);
    let enrolled: f64 = ["cloud", "local"]
        .iter()
        .map(|arm| {
            let (route, reason) = if *arm == "cloud" {
                ("cloud", "cloud_only")
            } else {
                ("local", "prefer_local")
            };
            sample(
                &metrics,
                "wattgate_chat_requests_total",
                &[
                    ("route", route),
                    ("backend", route),
                    ("reason", reason),
                    ("outcome", "ok"),
                    ("experiment", "by-user"),
                    ("arm", arm),
                ],
            )
        })
        .sum();
    assert_eq!(enrolled, 60.0);

    // Ledger rows carry experiment and arm.
    let dir = a.stop().await;
    let rows = Ledger::open(&dir.path().join("ledger.redb"))
        .expect("ledger")
        .rows_since(0)
        .expect("rows");
    assert_eq!(rows.len(), 60 + 1 + 1);
    let by_user: Vec<_> = rows
        .iter()
        .filter(|r| r.experiment.as_deref() == Some("by-user"))
        .collect();
    assert_eq!(by_user.len(), 60);
    for row in by_user {
        let arm = row.arm.as_deref().unwrap_or_default();
        assert_eq!(row.route, if arm == "cloud" { "cloud" } else { "local" });
    }
    assert_eq!(rows.iter().filter(|r| r.arm.is_none()).count(), 1);
    drop(b);
}

async fn post_feedback(gw: &Gateway, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.url("/v1/feedback"))
        .json(body)
        .send()
        .await
        .expect("gateway")
}

#[tokio::test]
async fn feedback_is_validated_idempotent_and_stored_in_the_ledger() {
    let local = upstream("local", "four").await;
    let cloud = upstream("cloud", "4").await;
    let toml = config("", &local, &cloud, STICKY);
    let gw = Gateway::start(&toml).await;
    let mut body = support::chat_body("auto", "two plus two?");
    body["user"] = json!("alice");
    let response = gw.post_chat(&body).await;
    let id = header(&response, "x-request-id");
    let arm = header(&response, "x-wattgate-arm");
    assert!(!id.is_empty() && !arm.is_empty());

    let created = post_feedback(&gw, &json!({"request_id": id, "thumbs": "up"})).await;
    assert_eq!(created.status(), 200);
    let created: Value = created.json().await.expect("json");
    assert_eq!(created["status"], "created");
    assert_eq!(
        (created["experiment"].as_str(), created["arm"].as_str()),
        (Some("by-user"), Some(arm.as_str()))
    );
    // The same again changes nothing; a different grade replaces it (one outcome per request).
    let again: Value = post_feedback(&gw, &json!({"request_id": id, "thumbs": "up"}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(again["status"], "unchanged");
    let replaced: Value = post_feedback(
        &gw,
        &json!({"request_id": id, "score": 0.2, "comment": "wrong"}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(replaced["status"], "replaced");

    // Unknown ids are 404; bad bodies are 400 naming the field.
    let unknown = expect_error(
        post_feedback(&gw, &json!({"request_id": "no-such-id", "score": 1})).await,
        404,
    )
    .await;
    assert_eq!(
        (unknown["param"].as_str(), unknown["code"].as_str()),
        (Some("request_id"), Some("request_not_found"))
    );
    for (bad, param) in [
        (json!({"request_id": id, "score": 1.5}), "score"),
        (json!({"request_id": id, "score": "high"}), "score"),
        (json!({"request_id": id, "thumbs": "meh"}), "thumbs"),
        (json!({"request_id": id}), "score"),
        (json!({"score": 1}), "request_id"),
        (json!({"request_id": id, "score": 1, "stars": 5}), "stars"),
    ] {
        let error = expect_error(post_feedback(&gw, &bad).await, 400).await;
        assert_eq!(error["param"].as_str(), Some(param), "{bad}");
    }
    let not_json = reqwest::Client::new()
        .post(gw.url("/v1/feedback"))
        .body("{not json")
        .send()
        .await
        .expect("gateway");
    assert_eq!(expect_error(not_json, 400).await["code"], "invalid_json");

    // A stream's row is queued before its [DONE]: feedback right after the stream finds it.
    let mut stream_body = support::chat_body("auto", "count to three");
    stream_body["stream"] = json!(true);
    stream_body["user"] = json!("bob");
    let response = gw.post_chat(&stream_body).await;
    let stream_id = header(&response, "x-request-id");
    let text = response.text().await.expect("stream");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let fast = post_feedback(&gw, &json!({"request_id": stream_id, "score": 1})).await;
    assert_eq!(fast.status(), 200, "{:?}", fast.text().await);

    // Prometheus counts the first outcome per request.
    let metrics = gw.metrics().await;
    let counted: f64 = ["success", "failure"]
        .iter()
        .flat_map(|r| ["cloud", "local"].map(|a| (a, *r)))
        .map(|(a, r)| {
            sample(
                &metrics,
                "wattgate_experiment_outcomes_total",
                &[
                    ("experiment", "by-user"),
                    ("arm", a),
                    ("source", "feedback"),
                    ("result", r),
                ],
            )
        })
        .sum();
    assert_eq!(counted, 2.0);

    let dir = gw.stop().await;
    let ledger = Ledger::open(&dir.path().join("ledger.redb")).expect("ledger");
    let outcomes = ledger.outcomes().expect("outcomes");
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    let first = outcomes
        .iter()
        .find(|o| o.request_id == id)
        .expect("stored");
    assert_eq!(
        (first.score, first.comment.as_deref(), first.source),
        (0.2, Some("wrong"), OutcomeSource::Feedback)
    );
}

#[tokio::test]
async fn shadow_checks_sample_at_the_configured_rate_off_the_client_path() {
    // The cloud answers the same as the local model on every other request.
    let local = upstream("local", "The answer is 7").await;
    let cloud = ScriptedUpstream::start("cloud", vec![Behavior::Reply("The answer is 7".into())])
        .await
        .expect("upstream");
    let toml = config(
        "[shadow]\nsample_rate = 0.25\nbudget_usd_per_hour = 1000.0\nmax_concurrent = 64",
        &local,
        &cloud,
        "",
    );
    let gw = Gateway::start(&toml).await;
    let n = 400;
    let ids: Vec<String> = (0..n).map(|i| format!("req-{i}")).collect();
    let client = reqwest::Client::new();
    for id in &ids {
        let response = client
            .post(gw.url("/v1/chat/completions"))
            .header("x-request-id", id)
            .json(&support::chat_body("auto", "what is 3 + 4?"))
            .send()
            .await
            .expect("gateway");
        assert_eq!(header(&response, "x-wattgate-route"), "local");
        assert_eq!(
            response
                .text()
                .await
                .ok()
                .map(|t| t.contains("The answer is 7")),
            Some(true)
        );
    }
    // Sampling is a stable hash of the request id against the rate.
    let expected = ids
        .iter()
        .filter(|id| wattgate::experiments::unit_hash(&["shadow", id.as_str()]) < 0.25)
        .count();
    let sd = (n as f64 * 0.25 * 0.75).sqrt();
    assert!(
        (expected as f64 - 100.0).abs() < 4.0 * sd,
        "{expected} of {n}"
    );
    let settled = wait_for(|| cloud.hits() >= expected).await;
    assert!(
        settled,
        "{} shadow calls, expected {expected}",
        cloud.hits()
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(cloud.hits(), expected);
    // The shadow request is the client's request, unstreamed, to the cloud model.
    let asked = &cloud.requests()[0].body;
    assert_eq!(
        (asked["model"].as_str(), asked["stream"].as_bool()),
        (Some("cloud-upstream"), Some(false))
    );
    let metrics = gw.metrics().await;
    let agree = sample(
        &metrics,
        "wattgate_shadow_checks_total",
        &[("experiment", "none"), ("arm", "none"), ("result", "agree")],
    );
    assert_eq!(agree, expected as f64);
    // Metered as shadow spend: 5 prompt words + 4 answer words at $1,000 per million tokens.
    let spent = sample(
        &metrics,
        "wattgate_shadow_cost_dollars_total",
        &[("backend", "cloud")],
    );
    assert!(
        (spent - expected as f64 * 9.0 * 1e-3).abs() < 1e-9,
        "{spent}"
    );
    // Never as requests or savings: the cloud served no client request.
    assert_eq!(
        sample(
            &metrics,
            "wattgate_cost_dollars_total",
            &[("backend", "cloud"), ("kind", "cloud")]
        ),
        0.0
    );
    let dir = gw.stop().await;
    let ledger = Ledger::open(&dir.path().join("ledger.redb")).expect("ledger");
    let outcomes = ledger.outcomes().expect("outcomes");
    assert_eq!(outcomes.len(), expected);
    assert!(outcomes
        .iter()
        .all(|o| o.source == OutcomeSource::Shadow && o.score == 1.0));
    assert!(ledger
        .rows_since(0)
        .expect("rows")
        .iter()
        .all(|r| r.route == "local"));
}

#[tokio::test]
async fn the_shadow_budget_caps_spend_per_rolling_hour() {
    let local = upstream("local", "Paris is the capital").await;
    let cloud = upstream("cloud", "Paris is the capital").await;
    let toml = config(
        "[shadow]\nsample_rate = 1.0\nbudget_usd_per_hour = 0.05",
        &local,
        &cloud,
        "",
    );
    let gw = Gateway::start(&toml).await;
    // Each check: 4 prompt + 4 answer words = 8 tokens at $0.001 = $0.008, estimated (from the
    // local answer's tokens) exactly as spent. $0.05 admits 6 checks ($0.048); a 7th would
    // make $0.056.
    for i in 0..20 {
        let response = gw
            .post_chat(&support::chat_body(
                "auto",
                &format!("capital of France {i}?"),
            ))
            .await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-wattgate-route"), "local");
        let _ = response.text().await;
    }
    wait_for(|| cloud.hits() >= 6).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(cloud.hits(), 6, "checks within the budget");
    let metrics = gw.metrics().await;
    let count = |result: &str| {
        sample(
            &metrics,
            "wattgate_shadow_checks_total",
            &[("experiment", "none"), ("arm", "none"), ("result", result)],
        )
    };
    assert_eq!((count("agree"), count("skipped_budget")), (6.0, 14.0));
    let spent = sample(
        &metrics,
        "wattgate_shadow_cost_dollars_total",
        &[("backend", "cloud")],
    );
    assert!((spent - 0.048).abs() < 1e-9 && spent <= 0.05, "{spent}");
    let dir = gw.stop().await;
    let outcomes = Ledger::open(&dir.path().join("ledger.redb"))
        .expect("ledger")
        .outcomes()
        .expect("outcomes");
    assert_eq!(outcomes.len(), 6);
    let stored: f64 = outcomes.iter().filter_map(|o| o.spend).map(|s| s.usd).sum();
    assert!((stored - spent).abs() < 1e-9, "{stored} vs {spent}");
}

#[tokio::test]
async fn a_configured_judge_grades_local_against_cloud_in_both_orders() {
    let local = upstream("local", "Paris is the capital").await;
    let cloud = upstream("cloud", "Lyon").await;
    // A judge that always prefers the answer shown first: the local answer wins one order and
    // loses the other, a score of 0.5.
    let judge = upstream("judge", "The first is better. [[A]]").await;
    let toml = format!(
        "[shadow]\nsample_rate = 1.0\njudge = \"judge\"\n{}{}{}",
        backend("local", "local", &local.base_url(), ""),
        backend(
            "cloud",
            "cloud",
            &cloud.base_url(),
            "usd_per_million_input_tokens = 2.0\nusd_per_million_output_tokens = 8.0"
        ),
        backend(
            "judge",
            "cloud",
            &judge.base_url(),
            "usd_per_million_input_tokens = 1.0\nusd_per_million_output_tokens = 1.0"
        ),
    );
    let gw = Gateway::start(&toml).await;
    for i in 0..3 {
        let response = gw
            .post_chat(&support::chat_body(
                "auto",
                &format!("capital of France {i}?"),
            ))
            .await;
        assert_eq!(header(&response, "x-wattgate-route"), "local");
        let _ = response.text().await;
    }
    assert!(
        wait_for(|| judge.hits() >= 6).await,
        "{} judge calls",
        judge.hits()
    );
    let asks: Vec<String> = judge
        .requests()
        .iter()
        .map(|r| {
            r.body["messages"][0]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    let local_first = asks
        .iter()
        .filter(|a| a.find("Paris is the capital") < a.find("Lyon"))
        .count();
    assert_eq!(local_first, 3, "each check asks in both orders");
    let dir = gw.stop().await;
    let outcomes = Ledger::open(&dir.path().join("ledger.redb"))
        .expect("ledger")
        .outcomes()
        .expect("outcomes");
    assert_eq!(outcomes.len(), 3);
    for o in &outcomes {
        assert_eq!(o.score, 0.5);
        assert!(
            o.detail.as_deref().is_some_and(|d| d.contains("win/loss")),
            "{:?}",
            o.detail
        );
        assert!(o.spend.is_some_and(|s| s.usd > 0.0));
    }
}

async fn wait_for(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if done() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    done()
}

/// One labeled row of the shared data.
struct Row {
    id: String,
    prompt: String,
    local: f64,
    cloud: f64,
    p: f64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    wattgate_no_shared_data,
    ignore = "needs ../shared/data/routing/routellm-mmlu.jsonl, absent beside this checkout"
)]
async fn a_replayed_experiment_recovers_each_arms_labels_within_its_intervals() {
    let data = repo().join("../shared/data/routing/routellm-mmlu.jsonl");
    let examples = wattgate::router::data::read_examples(&data).unwrap_or_else(|e| {
        panic!(
            "the shared routing data is needed ({}): {e}",
            data.display()
        )
    });
    let router_dir = repo().join("router-models");
    let model =
        wattgate::router::model::RouterModel::load(&router_dir.join("mixtral-8x7b-instruct"))
            .expect("shipped router");
    // Every 10th row: 1,405 real MMLU prompts with mixtral (local) and GPT-4 (cloud) labels.
    let rows: Vec<Row> = examples
        .iter()
        .step_by(10)
        .map(|e| Row {
            id: e.id.clone(),
            prompt: e.prompt.clone(),
            local: e.scores["mixtral-8x7b-instruct-v0.1"],
            cloud: e.scores["gpt-4-1106-preview"],
            p: model.score(&wattgate::router::features::Query::from_prompt(&e.prompt)),
        })
        .collect();
    // Thresholds at the 40th and 70th percentiles of p: about 60% and 30% local.
    let mut ps: Vec<f64> = rows.iter().map(|r| r.p).collect();
    ps.sort_by(f64::total_cmp);
    let low = ps[ps.len() * 40 / 100];
    let high = ps[ps.len() * 70 / 100];
    // The truth per threshold, over every replayed row: what routing at it would give.
    let truth = |t: f64| {
        let n = rows.len() as f64;
        let local = rows.iter().filter(|r| r.p >= t).count() as f64 / n;
        let quality = rows
            .iter()
            .map(|r| if r.p >= t { r.local } else { r.cloud })
            .sum::<f64>()
            / n;
        (local, quality)
    };

    let local = upstream("mixtral", "B").await;
    let cloud = upstream("gpt-4", "B").await;
    let toml = format!(
        "[routing]\nrouter_dir = \"{}\"\n[[experiments]]\nname = \"threshold\"\nunit = \"user\"\ncontrol = \"low\"\n[[experiments.arms]]\nname = \"low\"\nthreshold = {low}\n[[experiments.arms]]\nname = \"high\"\nthreshold = {high}\n{}{}",
        router_dir.display(),
        backend("mixtral", "local", &local.base_url(), "router = \"mixtral-8x7b-instruct\""),
        backend("gpt-4", "cloud", &cloud.base_url(), "usd_per_million_input_tokens = 10.0\nusd_per_million_output_tokens = 30.0"),
    );
    let gw = Gateway::start(&toml).await;
    let client = reqwest::Client::new();
    // Each row is a user's request; the user's feedback is the label of the model that served.
    let served: Vec<(String, String)> = futures::stream::iter(&rows)
        .map(|row| {
            let client = client.clone();
            let url = gw.url("/v1/chat/completions");
            let feedback = gw.url("/v1/feedback");
            async move {
                let body = json!({"model": "auto", "user": row.id, "messages": [{"role": "user", "content": row.prompt}]});
                let response = client.post(&url).json(&body).send().await.expect("gateway");
                let id = header(&response, "x-request-id");
                let arm = header(&response, "x-wattgate-arm");
                let route = header(&response, "x-wattgate-route");
                let p: f64 = header(&response, "x-wattgate-p-local").parse().unwrap_or(f64::NAN);
                assert_eq!(p, row.p, "{}", row.id);
                let _ = response.bytes().await;
                let score = if route == "local" { row.local } else { row.cloud };
                let posted = client
                    .post(&feedback)
                    .json(&json!({"request_id": id, "score": score}))
                    .send()
                    .await
                    .expect("feedback");
                assert_eq!(posted.status(), 200);
                (arm, route)
            }
        })
        .buffered(8)
        .collect()
        .await;
    let report: Value = reqwest::get(gw.url("/v1/experiments/threshold"))
        .await
        .expect("report")
        .json()
        .await
        .expect("json");
    let arms = report["arms"].as_array().cloned().unwrap_or_default();
    assert_eq!(arms.len(), 2, "{report}");
    for (arm, t) in [("low", low), ("high", high)] {
        let a = arms
            .iter()
            .find(|a| a["arm"] == arm)
            .unwrap_or_else(|| panic!("{arm}: {report}"));
        let (true_local, true_quality) = truth(t);
        let n = served.iter().filter(|(x, _)| x == arm).count() as u64;
        assert_eq!(a["requests"].as_u64(), Some(n));
        assert_eq!(
            a["feedback"]["success"]["n"].as_u64(),
            Some(n),
            "every request graded"
        );
        let within = |rate: &Value, truth: f64, what: &str| {
            let lo = rate["ci95"][0].as_f64().unwrap_or(2.0);
            let hi = rate["ci95"][1].as_f64().unwrap_or(-1.0);
            assert!(
                lo <= truth && truth <= hi,
                "{arm} {what}: truth {truth:.4} outside [{lo:.4}, {hi:.4}]"
            );
            eprintln!("{arm} (threshold {t:.4}, n {n}) {what}: truth {truth:.4}, observed {:.4} [{lo:.4}, {hi:.4}]", rate["rate"].as_f64().unwrap_or(f64::NAN));
        };
        within(&a["local_share"], true_local, "local share");
        within(&a["feedback"]["success"], true_quality, "quality");
    }
    // The higher threshold keeps less local, and the report says so against the control.
    let high = arms
        .iter()
        .find(|a| a["arm"] == "high")
        .cloned()
        .unwrap_or_default();
    let vs = &high["vs_control"]["local_share"];
    assert!(
        vs["difference"].as_f64().unwrap_or(0.0) < -0.2
            && vs["p_value"].as_f64().unwrap_or(1.0) < 1e-6,
        "{vs}"
    );
    let verdict = high["verdict"].as_str().unwrap_or_default();
    assert!(
        verdict.contains("feedback success") && verdict.contains("Local share"),
        "{verdict}"
    );
    eprintln!("verdict for `high`: {verdict}");

    // The CLI reads the same report from the ledger file once the daemon has stopped.
    let dir = gw.stop().await;
    let config_file = dir.path().join("wattgate.toml");
    std::fs::write(&config_file, &toml).expect("write config");
    let cli = |format: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wattgate"))
            .args([
                "experiments",
                "report",
                "threshold",
                "--format",
                format,
                "--config",
            ])
            .arg(&config_file)
            .arg("--ledger")
            .arg(dir.path().join("ledger.redb"))
            .output()
            .expect("run wattgate");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let from_file: Value = serde_json::from_str(&cli("json")).expect("json report");
    assert_eq!(from_file["arms"], report["arms"]);
    let table = cli("table");
    assert!(
        table.contains("experiment threshold (enabled, unit user), control `low`"),
        "{table}"
    );
    assert!(table.contains(&format!("high: {verdict}")), "{table}");
    eprintln!("{table}");
    let unknown = std::process::Command::new(env!("CARGO_BIN_EXE_wattgate"))
        .args(["experiments", "report", "nope", "--config"])
        .arg(&config_file)
        .arg("--ledger")
        .arg(dir.path().join("ledger.redb"))
        .output()
        .expect("run wattgate");
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no experiment `nope`"));
}
