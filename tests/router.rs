//! The learned router end to end: the `wattgate router` CLI contract (the real binary), the
//! gateway routing with a shipped router against scripted loopback upstreams, and threshold
//! calibration on held-out rows.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use support::{chat_body, expect_error, header, sample, Gateway};
use wattgate::router::data::Example;
use wattgate::router::features::Query;
use wattgate::router::model::RouterModel;
use wattgate::router::train::{train, TrainOptions};
use wattgate_testkit::{Behavior, ScriptedUpstream};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shipped(name: &str) -> PathBuf {
    repo().join("router-models").join(name)
}

fn wattgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wattgate"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("run wattgate: {e}"))
}

fn arg(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

/// `wattgate router score --router 8b-class --input IN --output OUT`.
fn score_cli(input: &Path, output: &Path) -> std::process::Output {
    wattgate(&[
        "router",
        "score",
        "--router",
        "8b-class",
        "--input",
        arg(input),
        "--output",
        arg(output),
    ])
}

/// `wattgate router eval` of `router` on `data` against `big-model`.
fn eval_cli(router: &Path, data: &Path, local: &str) -> std::process::Output {
    wattgate(&[
        "router",
        "eval",
        "--router",
        arg(router),
        "--data",
        arg(data),
        "--local-model",
        local,
        "--cloud-model",
        "big-model",
    ])
}

/// `router train` on `data` for the label `small-model`, written to `out`, plus `extra` flags.
fn train_cli(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "router",
        "train",
        "--data",
        arg(data),
        "--local-model",
        "small-model",
        "--out",
        arg(out),
    ];
    args.extend_from_slice(extra);
    wattgate(&args)
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

const MATH: &str = "Prove that there are infinitely many primes p such that p + 2 is also prime, or explain why this is open.";
const CHAT: &str = "What is the capital of France?";

#[test]
fn score_writes_one_line_per_input_in_order_with_prompt_or_messages() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let rows = [
        json!({"id": "a", "prompt": MATH}),
        json!({"id": 7, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": CHAT}]}),
        json!({"id": "c", "prompt": CHAT}),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n\n")).collect();
    write(&input, &text);
    let out = score_cli(&input, &output);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = lines(&output);
    let ids: Vec<&Value> = got.iter().map(|l| &l["id"]).collect();
    assert_eq!(ids, [&json!("a"), &json!(7), &json!("c")]);
    let model = RouterModel::load(&shipped("8b-class")).unwrap_or_else(|e| panic!("{e}"));
    for line in &got {
        let p = line["p_local"].as_f64().unwrap_or(-1.0);
        assert!(p > 0.0 && p < 1.0, "{line}");
        assert_eq!(line.as_object().map(|o| o.len()), Some(2), "{line}");
    }
    // The library gives the same numbers, and a system prompt changes the score.
    assert_eq!(
        got[0]["p_local"].as_f64(),
        Some(model.score(&Query::from_prompt(MATH)))
    );
    assert_eq!(
        got[2]["p_local"].as_f64(),
        Some(model.score(&Query::from_prompt(CHAT)))
    );
    assert_ne!(got[1]["p_local"], got[2]["p_local"]);
}

#[test]
fn score_rejects_malformed_lines_with_their_number_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let output = dir.path().join("out.jsonl");
    let cases = [
        (
            "{\"id\": 1, \"prompt\": \"ok\"}\n{\"id\": 2, \"prompt\": \"ok\"}\n{broken\n",
            ":3:",
            "not JSON",
        ),
        ("{\"prompt\": \"no id\"}\n", ":1:", "missing `id`"),
        ("{\"id\": 1}\n", ":1:", "needs `prompt` or `messages`"),
        (
            "{\"id\": 1, \"prompt\": 5}\n",
            ":1:",
            "`prompt` must be a string",
        ),
        (
            "{\"id\": 1, \"prompt\": \"x\"}\n{\"id\": 2, \"messages\": [\"hi\"]}\n",
            ":2:",
            "messages[0]",
        ),
        ("[1, 2]\n", ":1:", "JSON object"),
    ];
    for (text, line, what) in cases {
        let input = dir.path().join("in.jsonl");
        write(&input, text);
        let out = score_cli(&input, &output);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {stderr}");
        assert!(
            stderr.contains(&format!("in.jsonl{line}")) && stderr.contains(what),
            "{stderr}"
        );
        assert!(!output.exists(), "a failed run left {}", output.display());
    }
    let out = wattgate(&[
        "router", "score", "--router", "no-such", "--input", "x", "--output", "y",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no router `no-such`"));
}

#[test]
fn train_then_eval_round_trip_through_the_cli() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = dir.path().join("data.jsonl");
    support::labeled_file(&data, 90);
    let out_dir = dir.path().join("my-router");
    // Two candidates (centred or raw labels; no structure measures), chosen on inner folds.
    let out = train_cli(
        &data,
        &out_dir,
        &["--cloud-model", "big-model", "--structure-features", "none"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Stderr is a pipe here: plain progress lines, the last with all done. 3 outer sources x
    // (2 inner sources x 2 candidates + 1), then 3 sources x 2 candidates and the final fit.
    assert!(stderr.contains("train: 0/22 (0%)"), "{stderr}");
    assert!(stderr.contains("train: 22/22 (100%)"), "{stderr}");
    assert!(
        stdout.contains("set-a")
            && stdout.contains("set-c")
            && stdout.contains("(all held out, pooled)")
            && stdout.contains("nested leave-one-source-out")
            && stdout.contains("without set-b")
            && stdout.contains("inner folds chose"),
        "{stdout}"
    );
    assert!(out_dir.join("router.json").is_file() && out_dir.join("weights.bin").is_file());
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("router.json")).unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(meta["pooled"]["n"], 90, "{}", meta["pooled"]);
    let selection = &meta["selection"];
    assert_eq!(selection["candidates"].as_array().map(Vec::len), Some(2));
    assert_eq!(selection["outer"].as_array().map(Vec::len), Some(3));

    // A structure measure that does not exist is refused by name, and nothing is written.
    let refused_dir = dir.path().join("refused");
    let out = train_cli(
        &data,
        &refused_dir,
        &["--structure-features", "ln_chars,lenght"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("\"lenght\""), "{stderr}");
    assert!(!refused_dir.exists());

    let out = eval_cli(&out_dir, &data, "small-model");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    for key in ["auc", "apgr", "local_share_at_1pt", "oracle_local_share"] {
        assert!(report[key].is_number(), "{key} in {report}");
    }
    // Sums vs proofs is learnable: the router separates them on its own training data.
    assert!(report["auc"].as_f64().unwrap_or(0.0) > 0.95, "{report}");
    assert!((report["oracle_local_share"].as_f64().unwrap_or(0.0) - 60.0 / 90.0).abs() < 1e-9);

    // A label nobody carries is an error that names it.
    let out = eval_cli(&out_dir, &data, "nobody");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nobody"));
}

#[test]
fn training_is_reproducible_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = dir.path().join("data.jsonl");
    support::labeled_file(&data, 60);
    let run = |name: &str| {
        let out_dir = dir.path().join(name);
        let out = train_cli(
            &data,
            &out_dir,
            // One candidate keeps this debug-build test short; the fits still run side by side.
            &[
                "--name",
                "same",
                "--structure-features",
                "none",
                "--keep-source-levels",
            ],
        );
        assert!(out.status.success());
        let read = |f: &str| std::fs::read(out_dir.join(f)).unwrap_or_default();
        (read("router.json"), read("weights.bin"))
    };
    let (a, b) = (run("one"), run("two"));
    assert!(!a.1.is_empty());
    assert!(a == b, "two trainings on the same data differ");
}

/// The shared RouteLLM MMLU rows (real prompts, real labels).
fn shared_rows() -> Vec<Example> {
    let path = repo().join("../shared/data/routing/routellm-mmlu.jsonl");
    wattgate::router::data::read_examples(&path).unwrap_or_else(|e| {
        panic!(
            "this test needs the shared routing data ({}): {e}",
            path.display()
        )
    })
}

/// Rows with a pattern a hashed-feature model can learn ("prove" and "integral" fail locally),
/// from a 40-word vocabulary in a fixed pseudo-random order, so scores spread out as real ones
/// do (a handful of distinct prompts would tie, and no threshold could split a tie).
fn synthetic_rows() -> Vec<Example> {
    let words: Vec<String> = [
        "sum", "prove", "list", "capital", "integral", "poem", "code", "bug",
    ]
    .iter()
    .map(|w| (*w).to_owned())
    .chain((0..32).map(|i| format!("w{i}")))
    .collect();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..8000)
        .map(|i: usize| {
            let n = 4 + (next() % 8) as usize;
            let prompt: Vec<&str> = (0..n)
                .map(|_| words[(next() % words.len() as u64) as usize].as_str())
                .collect();
            let hard = prompt
                .iter()
                .filter(|w| **w == "prove" || **w == "integral")
                .count();
            let label = if hard == 0 { 1.0 } else { 0.0 };
            Example {
                id: i.to_string(),
                source: format!("s{}", i % 2),
                category: None,
                prompt: prompt.join(" "),
                scores: [("small".to_owned(), label), ("big".to_owned(), 1.0)].into(),
                messages: None,
                weight: 1.0,
            }
        })
        .collect()
}

#[test]
#[cfg_attr(
    wattgate_no_shared_data,
    ignore = "needs ../shared/data/routing/routellm-mmlu.jsonl, absent beside this checkout"
)]
fn target_local_share_is_hit_within_two_points_on_held_out_real_rows() {
    calibration_holds(shared_rows());
}

#[test]
fn target_local_share_is_hit_within_two_points_on_held_out_synthetic_rows() {
    calibration_holds(synthetic_rows());
}

/// Fits on the even rows; each target share is kept local within 2 points on the odd ones.
fn calibration_holds(rows: Vec<Example>) {
    let local = rows[0]
        .scores
        .keys()
        .find(|k| k.contains("mixtral") || k.as_str() == "small")
        .cloned()
        .unwrap_or_default();
    let (fit_rows, held): (Vec<_>, Vec<_>) =
        rows.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let fit_rows: Vec<Example> = fit_rows.into_iter().map(|(_, e)| e).collect();
    let held: Vec<Example> = held.into_iter().map(|(_, e)| e).collect();
    let mut options = TrainOptions::new("calibration", vec![local], Vec::new());
    options.buckets = 1 << 12;
    options.steps = 60;
    // One candidate: this test is about the share thresholds, not the choice.
    options.choices.truncate(1);
    let trained = train(&fit_rows, &options, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    let model = trained.model;
    let scores: Vec<f64> = held
        .iter()
        .map(|e| model.score(&Query::from_prompt(&e.prompt)))
        .collect();
    for target in [0.1, 0.25, 0.5, 0.75, 0.9] {
        let t = model.threshold_for_share(target);
        let share = scores.iter().filter(|p| **p >= t).count() as f64 / scores.len() as f64;
        assert!(
            (share - target).abs() <= 0.02,
            "target {target}: threshold {t} keeps {share:.4} of {} held-out rows local",
            scores.len()
        );
    }
}

/// A gateway routing with the shipped 8b-class router, a scripted local and cloud upstream.
async fn post_with_header(
    gw: &Gateway,
    name: &str,
    value: &str,
    body: &Value,
) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .header(name, value)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn routed_gateway(routing: &str) -> (Gateway, ScriptedUpstream, ScriptedUpstream) {
    let local = ScriptedUpstream::start(
        "local-upstream",
        vec![Behavior::Reply("local says hi".into())],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let cloud = ScriptedUpstream::start(
        "cloud-upstream",
        vec![Behavior::Reply("cloud says hi".into())],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let dir = repo().join("router-models");
    let head = format!(
        "[routing]\npolicy = \"router\"\nrouter_dir = \"{}\"\n{routing}\n",
        dir.display()
    );
    let toml = support::local_and_cloud(
        &head,
        &local.base_url(),
        &cloud.base_url(),
        "router = \"8b-class\"",
    );
    (Gateway::start(&toml).await, local, cloud)
}

/// Posts `text` and checks its route against the router's own score: `x-wattgate-p-local` is the
/// score, and the request went local (`router_local`) exactly when it cleared `threshold`.
/// Returns whether it did.
async fn expect_routed(gw: &Gateway, model: &RouterModel, text: &str, threshold: f64) -> bool {
    let p = model.score(&Query::from_prompt(text));
    let response = gw.post_chat(&chat_body("auto", text)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "x-wattgate-p-local").parse::<f64>().ok(),
        Some(p)
    );
    let local = p >= threshold;
    let (route, reason) = if local {
        ("local", "router_local")
    } else {
        ("cloud", "router_cloud")
    };
    let context = format!("{text}: p = {p}, threshold {threshold}");
    assert_eq!(header(&response, "x-wattgate-route"), route, "{context}");
    assert_eq!(header(&response, "x-wattgate-reason"), reason, "{context}");
    local
}

#[tokio::test]
async fn the_p_local_header_equals_router_score_and_decides_the_route() {
    let (gw, local, cloud) = routed_gateway("threshold = 0.5").await;
    let model = RouterModel::load(&shipped("8b-class")).unwrap_or_else(|e| panic!("{e}"));
    let mut seen_local = 0;
    for text in [MATH, CHAT] {
        seen_local += usize::from(expect_routed(&gw, &model, text, 0.5).await);
    }
    assert_eq!(local.hits(), seen_local);
    assert_eq!(cloud.hits(), 2 - seen_local);

    // The per-request threshold overrides the configured one both ways.
    for (threshold, route, reason) in [
        ("0", "local", "router_local"),
        ("1", "cloud", "router_cloud"),
    ] {
        let response = post_with_header(
            &gw,
            "x-wattgate-threshold",
            threshold,
            &chat_body("auto", CHAT),
        )
        .await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-wattgate-route"), route);
        assert_eq!(header(&response, "x-wattgate-reason"), reason);
    }

    let metrics = gw.metrics().await;
    assert!(
        sample(
            &metrics,
            "wattgate_router_decisions_total",
            &[("reason", "router_local")]
        ) >= 1.0
    );
    assert!(
        sample(
            &metrics,
            "wattgate_router_decisions_total",
            &[("reason", "router_cloud")]
        ) >= 1.0
    );
    assert!(metrics.contains("wattgate_router_decision_duration_seconds_bucket"));
}

#[tokio::test]
async fn forced_routes_and_bad_routing_headers() {
    let (gw, local, cloud) = routed_gateway("").await;
    for (force, route, reason) in [
        ("cloud", "cloud", "forced_cloud"),
        ("LOCAL", "local", "forced_local"),
    ] {
        let response =
            post_with_header(&gw, "x-wattgate-route", force, &chat_body("auto", CHAT)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-wattgate-route"), route);
        assert_eq!(header(&response, "x-wattgate-reason"), reason);
    }
    assert_eq!((local.hits(), cloud.hits()), (1, 1));

    for (name, value) in [
        ("x-wattgate-route", "gpu"),
        ("x-wattgate-threshold", "1.5"),
        ("x-wattgate-threshold", "high"),
    ] {
        let response = post_with_header(&gw, name, value, &chat_body("auto", CHAT)).await;
        let error = expect_error(response, 400).await;
        assert_eq!(error["param"], name, "{error}");
        assert!(support::message(&error).contains(value), "{error}");
    }
    assert_eq!(
        (local.hits(), cloud.hits()),
        (1, 1),
        "a bad header reached an upstream"
    );

    // Hard constraints come before the router: tools go to the cloud without a p_local.
    let mut body = chat_body("auto", CHAT);
    body["tools"] = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    let response = gw.post_chat(&body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-wattgate-reason"), "needs_tools");
    assert_eq!(header(&response, "x-wattgate-p-local"), "");
}

#[tokio::test]
async fn target_local_share_and_quality_loss_configure_the_threshold() {
    let model = RouterModel::load(&shipped("8b-class")).unwrap_or_else(|e| panic!("{e}"));
    let p = model.score(&Query::from_prompt(CHAT));
    // Share 0 keeps nothing local; the other settings give the thresholds the router's own
    // tables say, and the gateway applies them.
    let cases = [
        ("target_local_share = 0.0", 1.0),
        ("target_local_share = 0.6", model.threshold_for_share(0.6)),
        (
            "max_quality_loss = 0.01",
            model.threshold_for_quality_loss(0.01),
        ),
        (
            "max_quality_loss = 1.0",
            model.threshold_for_quality_loss(1.0),
        ),
    ];
    assert!(model.threshold_for_quality_loss(1.0) <= model.threshold_for_quality_loss(0.01));
    for (routing, threshold) in cases {
        let (gw, _local, _cloud) = routed_gateway(routing).await;
        let response = gw.post_chat(&chat_body("auto", CHAT)).await;
        let route = if p >= threshold { "local" } else { "cloud" };
        assert_eq!(
            header(&response, "x-wattgate-route"),
            route,
            "{routing}: p {p}, t {threshold}"
        );
    }
}

#[test]
fn the_embedded_default_routes_with_its_own_shipped_router() {
    // Default backends (embedded gemma-3-270m naming no router, and the cloud) under the
    // learned router: the embedded model's own router is loaded from router-models/.
    let mut config = wattgate::config::Config::parse("[routing]\npolicy = \"router\"\n")
        .unwrap_or_else(|e| panic!("{e}"));
    config.routing.router_dir = repo().join("router-models");
    wattgate::router::Router::new(&config.routing, &config.backends)
        .unwrap_or_else(|e| panic!("the gemma-3-270m router should load: {e}"));
    let card = std::fs::read_to_string(shipped("gemma-3-270m").join("card.md"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(card.contains("queries profiled"), "{card}");
    // Proof that it is that router: without it, the error names it.
    let empty = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    config.routing.router_dir = empty.path().to_owned();
    let err = wattgate::router::Router::new(&config.routing, &config.backends)
        .err()
        .unwrap_or_default();
    assert!(
        err.contains("backends[0].router") && err.contains("gemma-3-270m"),
        "{err}"
    );
}

/// With no `policy` set, a usable cloud (no key variable to miss) makes the gateway route with
/// the local backend's router at the threshold its validation curve gives for one point of
/// quality loss; a cloud whose key variable is unset leaves it local first, unrouted.
#[tokio::test]
async fn the_default_policy_routes_when_the_cloud_is_usable_and_stays_local_when_not() {
    let local = ScriptedUpstream::start("local-upstream", vec![Behavior::Reply("local".into())])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let cloud = ScriptedUpstream::start("cloud-upstream", vec![Behavior::Reply("cloud".into())])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let head = format!(
        "[routing]\nrouter_dir = \"{}\"\n",
        repo().join("router-models").display()
    );
    let local_backend =
        support::backend("local", "local", &local.base_url(), "router = \"8b-class\"");
    let model = RouterModel::load(&shipped("8b-class")).unwrap_or_else(|e| panic!("{e}"));
    let threshold = model.threshold_for_quality_loss(0.01);

    let usable = format!(
        "{head}{local_backend}{}",
        support::backend("cloud", "cloud", &cloud.base_url(), "")
    );
    let gw = Gateway::start(&usable).await;
    for text in [MATH, CHAT] {
        expect_routed(&gw, &model, text, threshold).await;
    }

    let keyless = format!(
        "{head}{local_backend}{}",
        support::backend(
            "cloud",
            "cloud",
            &cloud.base_url(),
            "api_key_env = \"WATTGATE_TEST_KEY_THAT_IS_NEVER_SET\""
        )
    );
    let gw = Gateway::start(&keyless).await;
    let before = local.hits();
    let response = gw.post_chat(&chat_body("auto", MATH)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-wattgate-reason"), "prefer_local");
    assert_eq!(header(&response, "x-wattgate-p-local"), "");
    assert_eq!(local.hits(), before + 1);
}
