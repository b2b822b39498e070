//! Learning from the operator's own traffic, end to end on loopback: what the ledger keeps of a
//! prompt (`[ledger] store_prompts`), `wattgate router train --from-ledger` on shadow verdicts and
//! feedback read from the running daemon, and `router reload` swapping routers under load.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{backend, header, sample, Gateway};
use wattgate::router::features::Query;
use wattgate::router::model::RouterModel;
use wattgate_testkit::{Behavior, ScriptedUpstream};

const BIN: &str = env!("CARGO_BIN_EXE_wattgate");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

async fn upstream(name: &str, reply: &str) -> ScriptedUpstream {
    ScriptedUpstream::start(name, vec![Behavior::Reply(reply.to_owned())])
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A local backend `small` and a cloud backend, after `head`; shadow checks on every local
/// answer (the similarity rule grades them, so identical replies pass).
fn shadowed(head: &str, local: &ScriptedUpstream, cloud: &ScriptedUpstream) -> String {
    format!(
        "{head}\n[shadow]\nsample_rate = 1.0\nbudget_usd_per_hour = 1000.0\nmax_concurrent = 64\n{}{}",
        backend("small", "local", &local.base_url(), ""),
        backend(
            "frontier",
            "cloud",
            &cloud.base_url(),
            "usd_per_million_input_tokens = 2.0\nusd_per_million_output_tokens = 8.0"
        ),
    )
}

async fn post(gw: &Gateway, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.url(path))
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Graded rows as the daemon exports them, once `n` of them carry a shadow verdict (shadow
/// checks run after the client has its answer).
async fn wait_for_shadow(gw: &Gateway, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body: Value = reqwest::get(gw.url("/v1/ledger/graded"))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let rows = body["data"].as_array().cloned().unwrap_or_default();
        let shadowed = rows
            .iter()
            .filter(|g| {
                g["outcomes"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|o| o["source"] == "shadow"))
            })
            .count();
        if shadowed >= n {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "{shadowed} of {n} shadow verdicts after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Serves a marked conversation (plain and streamed, with a system prompt), has it shadow-checked
/// and given feedback, stops the daemon and returns the ledger file's bytes and its rows.
async fn ledger_after_marked_traffic(store_prompts: bool, marker: &str) -> (Vec<u8>, Vec<Value>) {
    let local = upstream("local", "A short answer").await;
    let cloud = upstream("cloud", "A short answer").await;
    let head = format!("[ledger]\nstore_prompts = {store_prompts}\n");
    let gw = Gateway::start(&shadowed(&head, &local, &cloud)).await;
    let mut ids = Vec::new();
    for stream in [false, true] {
        let body = json!({
            "model": "auto",
            "stream": stream,
            "messages": [
                {"role": "system", "content": format!("You are {marker}-system.")},
                {"role": "user", "content": [{"type": "text", "text": format!("Tell me about {marker}-user.")}]},
            ],
        });
        let response = post(&gw, "/v1/chat/completions", &body).await;
        assert_eq!(response.status(), 200);
        ids.push(header(&response, "x-request-id"));
        let text = response.text().await.unwrap_or_default();
        assert!(text.contains("answer"), "{text}");
    }
    wait_for_shadow(&gw, 2).await;
    let feedback = post(
        &gw,
        "/v1/feedback",
        &json!({"request_id": ids[0], "thumbs": "down"}),
    )
    .await;
    assert_eq!(feedback.status(), 200);
    let ledger = gw.ledger.clone();
    let dir = gw.stop().await;
    let bytes = std::fs::read(&ledger).unwrap_or_else(|e| panic!("{e}"));
    let rows = wattgate::ledger::Ledger::open(&ledger)
        .and_then(|l| l.rows_since(0))
        .unwrap_or_else(|e| panic!("{e}"));
    drop(dir);
    let rows = rows
        .iter()
        .map(|r| serde_json::to_value(r).unwrap_or_default())
        .collect();
    (bytes, rows)
}

#[tokio::test]
async fn without_store_prompts_the_ledger_file_holds_no_prompt_text() {
    let marker = "quokka7731zanzibar";
    let (bytes, rows) = ledger_after_marked_traffic(false, marker).await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.get("prompt").is_none()), "{rows:?}");
    assert!(
        !contains(&bytes, marker),
        "the ledger file contains the prompt text"
    );

    // The same traffic with the option on: the text is in the file, as the router reads it
    // (text parts joined, roles kept), so the grep above can find it when it is there.
    let (bytes, rows) = ledger_after_marked_traffic(true, marker).await;
    assert!(contains(&bytes, marker));
    for row in &rows {
        assert_eq!(
            row["prompt"],
            json!([
                {"role": "system", "content": format!("You are {marker}-system.")},
                {"role": "user", "content": format!("Tell me about {marker}-user.")},
            ]),
            "{row}"
        );
    }
}

fn train(args: &[&str]) -> (String, String) {
    let out = Command::new(BIN)
        .args(["router", "train"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stderr}");
    (stdout, stderr)
}

fn p_local(router: &Path, text: &str) -> f64 {
    RouterModel::load(router)
        .unwrap_or_else(|e| panic!("{e}"))
        .score(&Query::from_prompt(text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_ledger_learns_the_local_models_failures_from_feedback_and_shadow_checks() {
    // The local model's answers all look like the cloud's (shadow checks pass), but users mark
    // its translations into Klingon wrong; the public data knows nothing of Klingon.
    let local = upstream("local", "Here you go").await;
    let cloud = upstream("cloud", "Here you go").await;
    let gw = Gateway::start(&shadowed(
        "[ledger]\nstore_prompts = true\n",
        &local,
        &cloud,
    ))
    .await;
    let mut klingon = Vec::new();
    for i in 0..30 {
        for (kind, text) in [
            (
                "klingon",
                format!("Translate sentence {i} into Klingon verse"),
            ),
            ("haiku", format!("Write a haiku about harbour {i}")),
        ] {
            let body = support::chat_body("auto", &text);
            let response = post(&gw, "/v1/chat/completions", &body).await;
            assert_eq!(header(&response, "x-wattgate-route"), "local");
            if kind == "klingon" {
                klingon.push(header(&response, "x-request-id"));
            }
        }
    }
    let graded = wait_for_shadow(&gw, 60).await;
    assert_eq!(graded.len(), 60);
    for id in &klingon {
        let response = post(&gw, "/v1/feedback", &json!({"request_id": id, "score": 0})).await;
        assert_eq!(response.status(), 200);
    }

    // The daemon holds the ledger: the trainer reads the graded rows from it.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = dir.path().join("wattgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{}\"\n[ledger]\npath = \"{}\"\n",
            gw.addr,
            gw.ledger.display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let data = dir.path().join("public.jsonl");
    support::labeled_file(&data, 60);
    let (own_dir, public_dir) = (dir.path().join("own"), dir.path().join("public"));
    let common = |out: &Path| {
        vec![
            "--data".to_owned(),
            data.display().to_string(),
            "--local-model".to_owned(),
            "small-model".to_owned(),
            "--cloud-model".to_owned(),
            "big-model".to_owned(),
            "--structure-features".to_owned(),
            "none".to_owned(),
            "--keep-source-levels".to_owned(),
            "--out".to_owned(),
            out.display().to_string(),
        ]
    };
    // The same flags, reading the daemon's ledger for local backend `backend`.
    let from_ledger = |out: &Path, backend: &str| {
        let mut args = common(out);
        args.extend(["--from-ledger", "--local-backend", backend, "--config"].map(str::to_owned));
        args.push(config.display().to_string());
        args
    };
    let args = from_ledger(&own_dir, "small");
    let (stdout, stderr) = train(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(stderr.contains("held by the running daemon"), "{stderr}");
    assert!(
        stderr.contains("60 graded rows; 60 answered locally by small, 0 of them without text; 60 used (30 by feedback, 30 by shadow checks), weight 5 each"),
        "{stderr}"
    );
    // The own rows are a source of their own in validation.
    assert!(stdout.contains("own-traffic"), "{stdout}");
    let (_, _) = train(
        &common(&public_dir)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );

    let new_klingon = "Translate sentence 999 into Klingon verse";
    let new_haiku = "Write a haiku about harbour 999";
    let (own_k, own_h) = (p_local(&own_dir, new_klingon), p_local(&own_dir, new_haiku));
    let public_k = p_local(&public_dir, new_klingon);
    eprintln!("p_local: Klingon {own_k:.3} (own) {public_k:.3} (public only); haiku {own_h:.3}");
    assert!(
        own_k + 0.2 < public_k && own_k + 0.2 < own_h,
        "p_local of a Klingon translation: {own_k:.3} with own traffic, {public_k:.3} without; \
         of a haiku {own_h:.3}"
    );

    // A backend the ledger has no graded answers of is refused, naming the ones it has.
    let args = from_ledger(&dir.path().join("none"), "nobody");
    let out = Command::new(BIN)
        .args(["router", "train"])
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no graded row was answered locally by `nobody`")
            && stderr.contains("local backends with graded rows: small"),
        "{stderr}"
    );
    drop(gw.stop().await);

    // An experiment A/Bs the retrained router against the public one on live traffic: each
    // arm's requests carry its own router's p_local.
    let head = format!(
        "[routing]\npolicy = \"router\"\nrouter_dir = \"{}\"\n\
         [[experiments]]\nname = \"own-router\"\nunit = \"header\"\nheader = \"x-session\"\n\
         [[experiments.arms]]\nname = \"public\"\n\
         [[experiments.arms]]\nname = \"retrained\"\nrouter = \"own\"\n",
        dir.path().display()
    );
    let ab = Gateway::start(&format!(
        "{head}{}{}",
        backend("small", "local", &local.base_url(), "router = \"public\""),
        backend("frontier", "cloud", &cloud.base_url(), ""),
    ))
    .await;
    let mut seen = std::collections::BTreeMap::new();
    for session in 0..40 {
        let response = reqwest::Client::new()
            .post(ab.url("/v1/chat/completions"))
            .header("x-session", format!("s{session}"))
            .json(&support::chat_body("auto", new_klingon))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(response.status(), 200);
        let p = header(&response, "x-wattgate-p-local").parse::<f64>().ok();
        let expected = match header(&response, "x-wattgate-arm").as_str() {
            "public" => public_k,
            "retrained" => own_k,
            other => panic!("arm {other:?}"),
        };
        assert_eq!(p, Some(expected));
        *seen.entry(header(&response, "x-wattgate-arm")).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    drop(ab.stop().await);
}

/// The `x-wattgate-p-local` the gateway answers `text` with.
async fn served_p_local(gw: &Gateway, text: &str) -> Option<f64> {
    let response = post(
        gw,
        "/v1/chat/completions",
        &support::chat_body("auto", text),
    )
    .await;
    assert_eq!(response.status(), 200);
    header(&response, "x-wattgate-p-local").parse::<f64>().ok()
}

/// `wattgate router reload --url <gw>`: (exit code, stdout, stderr).
fn reload_cli(gw: &Gateway) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .args(["router", "reload", "--url", &gw.url("")])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn copy_router(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{e}"));
    for f in ["router.json", "weights.bin"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_drops_nothing_and_a_corrupt_router_is_refused() {
    let text = "Explain how a bicycle stays upright.";
    let shipped = repo().join("router-models");
    let (old, new) = (
        shipped.join("8b-class"),
        shipped.join("llama-3.1-8b-instruct"),
    );
    let (p_old, p_new) = (p_local(&old, text), p_local(&new, text));
    assert!((p_old - p_new).abs() > 1e-6, "{p_old} {p_new}");

    let routers = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let live = routers.path().join("live");
    copy_router(&old, &live);
    let local = upstream("local", "local answer").await;
    let cloud = upstream("cloud", "cloud answer").await;
    let head = format!(
        "[routing]\npolicy = \"router\"\nthreshold = 0.5\nrouter_dir = \"{}\"\n",
        routers.path().display()
    );
    let gw = Gateway::start(&support::local_and_cloud(
        &head,
        &local.base_url(),
        &cloud.base_url(),
        "router = \"live\"",
    ))
    .await;

    // 100 requests a second for 10 seconds; the router is swapped after 5.
    let started = Instant::now();
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut reloaded: Option<(Instant, Instant)> = None;
    for i in 0..1000 {
        tick.tick().await;
        if i == 500 {
            copy_router(&new, &live);
            let before = Instant::now();
            let response = post(&gw, "/v1/router/reload", &json!({})).await;
            let after = Instant::now();
            let status = response.status();
            let body: Value = response.json().await.unwrap_or_default();
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                body["routers"][0]["name"], "llama-3.1-8b-instruct",
                "{body}"
            );
            reloaded = Some((before, after));
        }
        let (client, url) = (client.clone(), gw.url("/v1/chat/completions"));
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let response = client
                .post(url)
                .json(&support::chat_body("auto", text))
                .send()
                .await;
            let (status, p) = match response {
                Ok(r) => (
                    r.status().as_u16(),
                    header(&r, "x-wattgate-p-local").parse::<f64>().ok(),
                ),
                Err(_) => (0, None),
            };
            (sent, status, p)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap_or_else(|e| panic!("{e}")));
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(15),
        "the load took {elapsed:?}"
    );
    let (before, after) = reloaded.unwrap_or_else(|| panic!("no reload"));
    let failed = results.iter().filter(|r| r.1 != 200).count();
    assert_eq!(
        failed, 0,
        "{failed} of 1000 requests failed across the reload"
    );
    let old_after = results
        .iter()
        .filter(|r| r.0 > after && r.2 != Some(p_new))
        .count();
    let new_before = results
        .iter()
        .filter(|r| r.0 < before && r.2 != Some(p_old))
        .count();
    assert_eq!((old_after, new_before), (0, 0));
    assert!(results.iter().filter(|r| r.0 > after).count() >= 400);

    // A truncated weights file: refused with the reason, and the loaded router keeps serving.
    std::fs::write(live.join("weights.bin"), b"not weights").unwrap_or_else(|e| panic!("{e}"));
    let (code, _, stderr) = reload_cli(&gw);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("422")
            && stderr.contains("router_reload_refused")
            && stderr.contains("weights.bin")
            && stderr.contains("11 bytes, expected"),
        "{stderr}"
    );
    assert_eq!(served_p_local(&gw, text).await, Some(p_new));
    let metrics = gw.metrics().await;
    let reloads = |result| {
        sample(
            &metrics,
            "wattgate_router_reloads_total",
            &[("result", result)],
        )
    };
    assert_eq!((reloads("ok"), reloads("refused")), (1.0, 1.0));

    // Reload through the CLI once the files are whole again.
    copy_router(&old, &live);
    let (code, stdout, stderr) = reload_cli(&gw);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("local: 8b-class") && stdout.contains("reloaded 1 router(s)"),
        "{stdout}"
    );
    assert_eq!(served_p_local(&gw, text).await, Some(p_old));
    drop(gw.stop().await);
}
