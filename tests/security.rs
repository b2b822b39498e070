//! Security: client keys (401 before any upstream call), the admin key, per-client rate limits
//! (429 with Retry-After, then recovery), the concurrency cap, and logs that never contain a key
//! or a prompt at the default level (the real binary's stderr, grepped).

mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use support::{backend, chat_body, expect_error, header, sample, Gateway};
use wattgate::server::key_digest;
use wattgate_testkit::{Behavior, ScriptedUpstream};

const KEY_A: &str = "wg-test-key-aaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const KEY_B: &str = "wg-test-key-bbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const ADMIN: &str = "wg-test-admin-key-cccccccccccccccccccccc";

fn hex(key: &str) -> String {
    key_digest(key).iter().map(|b| format!("{b:02x}")).collect()
}

fn auth_config(extra: &str, cloud_url: &str) -> String {
    format!(
        "{extra}\n[auth]\nadmin_key_sha256 = \"{}\"\n[[auth.keys]]\nname = \"team-a\"\nsha256 = \"{}\"\n[[auth.keys]]\nname = \"team-b\"\nsha256 = \"{}\"\n{}",
        hex(ADMIN),
        hex(KEY_A),
        hex(KEY_B),
        backend("cloud", "cloud", cloud_url, "")
    )
}

async fn post(gw: &Gateway, key: Option<&str>, body: &serde_json::Value) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(body);
    if let Some(key) = key {
        r = r.bearer_auth(key);
    }
    r.send().await.expect("gateway reachable")
}

async fn get(gw: &Gateway, path: &str, key: Option<&str>) -> reqwest::Response {
    let mut r = reqwest::Client::new().get(gw.url(path));
    if let Some(key) = key {
        r = r.bearer_auth(key);
    }
    r.send().await.expect("gateway reachable")
}

#[tokio::test]
async fn requests_without_a_valid_key_get_401_and_never_reach_an_upstream() {
    let cloud = ScriptedUpstream::start("c", vec![Behavior::Reply("answer".into())])
        .await
        .expect("cloud");
    let gw = Gateway::start(&auth_config("", &cloud.base_url())).await;
    let body = chat_body("auto", "hello");

    let e = expect_error(post(&gw, None, &body).await, 401).await;
    assert_eq!(e["code"], "invalid_api_key");
    assert!(support::message(&e).contains("No API key"), "{e}");
    for wrong in [
        "wg-wrong".to_owned(),
        hex(KEY_A), // the digest is not the key
        KEY_A[..KEY_A.len() - 1].to_owned(),
        format!("{KEY_A}x"),
    ] {
        let e = expect_error(post(&gw, Some(&wrong), &body).await, 401).await;
        assert!(
            !support::message(&e).contains(&wrong),
            "the error repeats the key"
        );
    }
    // Not a bearer token at all.
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", format!("Basic {KEY_A}"))
        .json(&body)
        .send()
        .await
        .expect("reachable");
    expect_error(r, 401).await;
    // Other client endpoints are closed too, probes stay open.
    expect_error(get(&gw, "/v1/models", None).await, 401).await;
    assert_eq!(get(&gw, "/healthz", None).await.status(), 200);
    assert_eq!(cloud.hits(), 0, "no upstream call without a valid key");

    // Valid keys work, through the official-shaped client too.
    assert_eq!(post(&gw, Some(KEY_A), &body).await.status(), 200);
    assert_eq!(post(&gw, Some(KEY_B), &body).await.status(), 200);
    assert_eq!(get(&gw, "/v1/models", Some(KEY_A)).await.status(), 200);
    assert_eq!(cloud.hits(), 2);

    // Admin endpoints: a client key is forbidden, the admin key is accepted.
    let e = expect_error(get(&gw, "/metrics", Some(KEY_A)).await, 403).await;
    assert_eq!(e["code"], "insufficient_permissions");
    expect_error(get(&gw, "/metrics", None).await, 401).await;
    expect_error(get(&gw, "/v1/savings", Some(KEY_B)).await, 403).await;
    expect_error(get(&gw, "/v1/experiments", Some(KEY_B)).await, 403).await;
    let metrics = get(&gw, "/metrics", Some(ADMIN)).await;
    assert_eq!(metrics.status(), 200);
    let m = metrics.text().await.expect("metrics");
    assert_eq!(
        sample(
            &m,
            "wattgate_rejected_requests_total",
            &[("reason", "unauthorized")]
        ),
        8.0
    );
    assert_eq!(
        sample(
            &m,
            "wattgate_rejected_requests_total",
            &[("reason", "forbidden")]
        ),
        3.0
    );
    assert_eq!(get(&gw, "/v1/savings", Some(ADMIN)).await.status(), 200);

    // The graded-rows export (prompt text under store_prompts) and router reload are admin's.
    expect_error(get(&gw, "/v1/ledger/graded", Some(KEY_A)).await, 403).await;
    assert_eq!(
        get(&gw, "/v1/ledger/graded", Some(ADMIN)).await.status(),
        200
    );
    let reload = |key: &'static str| {
        reqwest::Client::new()
            .post(gw.url("/v1/router/reload"))
            .bearer_auth(key)
            .send()
    };
    let refused = reload(KEY_A).await.expect("gateway reachable");
    expect_error(refused, 403).await;
    let reloaded = reload(ADMIN).await.expect("gateway reachable");
    assert_eq!(reloaded.status(), 200);
}

#[tokio::test]
async fn rate_limits_return_429_with_retry_after_and_recover() {
    let cloud = ScriptedUpstream::start("c", vec![Behavior::Reply("answer".into())])
        .await
        .expect("cloud");
    // 60 requests per minute: a minute's allowance at once, then one per second.
    let gw = Gateway::start(&auth_config(
        "[limits]\nrequests_per_minute = 60\ntokens_per_minute = 100000",
        &cloud.base_url(),
    ))
    .await;
    let body = chat_body("auto", "hello");
    for i in 0..60 {
        assert_eq!(post(&gw, Some(KEY_A), &body).await.status(), 200, "{i}");
    }
    let r = post(&gw, Some(KEY_A), &body).await;
    let retry_after: u64 = header(&r, "retry-after").parse().expect("Retry-After");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let e = expect_error(r, 429).await;
    assert_eq!(e["code"], "rate_limit_exceeded");
    assert!(
        support::message(&e).contains("key:team-a on requests per minute"),
        "{e}"
    );
    assert_eq!(cloud.hits(), 60, "refused requests never reach an upstream");
    // Another key has its own allowance.
    assert_eq!(post(&gw, Some(KEY_B), &body).await.status(), 200);
    // Recovery: after the Retry-After, the key is served again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(post(&gw, Some(KEY_A), &body).await.status(), 200);

    // Tokens: max_tokens counts on arrival; 100,000 per minute.
    let mut big = chat_body("auto", "hello");
    big["max_tokens"] = json!(30000);
    for _ in 0..3 {
        assert_eq!(post(&gw, Some(KEY_B), &big).await.status(), 200);
    }
    let r = post(&gw, Some(KEY_B), &big).await;
    assert!(!header(&r, "retry-after").is_empty());
    let e = expect_error(r, 429).await;
    assert!(support::message(&e).contains("tokens per minute"), "{e}");
    // Larger than a whole minute's allowance: can never pass, and says so.
    big["max_tokens"] = json!(32000);
    big["messages"][0]["content"] = json!("x".repeat(300_000));
    let e = expect_error(post(&gw, Some(KEY_B), &big).await, 429).await;
    assert!(support::message(&e).contains("Request too large"), "{e}");
    let m = get(&gw, "/metrics", Some(ADMIN))
        .await
        .text()
        .await
        .expect("metrics");
    assert_eq!(
        sample(
            &m,
            "wattgate_rejected_requests_total",
            &[("reason", "rate_limited_requests")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "wattgate_rejected_requests_total",
            &[("reason", "rate_limited_tokens")]
        ),
        2.0
    );
}

#[tokio::test]
async fn the_concurrency_cap_answers_429_and_frees_slots_when_streams_end() {
    let cloud = ScriptedUpstream::start(
        "c",
        vec![Behavior::slow(Duration::from_millis(800), "slow answer")],
    )
    .await
    .expect("cloud");
    let gw = Gateway::start(&format!(
        "[limits]\nmax_concurrent_requests = 2\n{}",
        backend("cloud", "cloud", &cloud.base_url(), "")
    ))
    .await;
    let client = reqwest::Client::new();
    let url = gw.url("/v1/chat/completions");
    let mut streamed = chat_body("auto", "a");
    streamed["stream"] = json!(true);
    let held: Vec<_> = [streamed, chat_body("auto", "b")]
        .into_iter()
        .map(|body| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let r = client.post(url).json(&body).send().await?;
                let status = r.status().as_u16();
                let mut bytes = r.bytes_stream();
                while bytes.next().await.is_some() {}
                Ok::<_, reqwest::Error>(status)
            })
        })
        .collect();
    while cloud.hits() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = gw.post_chat(&chat_body("auto", "c")).await;
    assert_eq!(header(&r, "retry-after"), "1");
    let e = expect_error(r, 429).await;
    assert_eq!(e["code"], "too_many_concurrent_requests");
    assert_eq!(cloud.hits(), 2);
    for h in held {
        assert_eq!(h.await.expect("join").expect("request"), 200);
    }
    // Both slots are free again once the stream has ended.
    let started = Instant::now();
    let d = chat_body("auto", "d");
    let again = futures::future::join_all((0..2).map(|_| gw.post_chat(&d))).await;
    assert!(again.iter().all(|r| r.status() == 200));
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// The real daemon's stderr at the default level, after keyed requests (good, wrong, failing
/// upstream, streamed) whose prompts carry a marker.
fn daemon_logs(extra_env: &[(&str, &str)], extra_server: &str) -> String {
    const PROMPT_MARKER: &str = "PROMPT-MARKER-7f3a";
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let cloud = runtime.block_on(async {
        ScriptedUpstream::start(
            "c",
            vec![
                Behavior::Reply("fine".into()),
                Behavior::server_error("upstream broke"),
                Behavior::Reply("fine".into()),
            ],
        )
        .await
        .expect("cloud")
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let data = tempfile::tempdir().expect("dir");
    let mut config = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("config");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n{extra_server}\n[resilience]\nmax_retries = 0\n{}",
        auth_config("", &cloud.base_url())
    );
    config.write_all(text.as_bytes()).expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wattgate"))
        .env("XDG_DATA_HOME", data.path())
        .env_remove("WATTGATE_LOG")
        .envs(extra_env.iter().copied())
        .args(["serve", "--config"])
        .arg(config.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    runtime.block_on(async {
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while reqwest::get(format!("{base}/healthz")).await.is_err() {
            assert!(Instant::now() < deadline, "daemon did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let client = reqwest::Client::new();
        let url = format!("{base}/v1/chat/completions");
        let body = chat_body("auto", &format!("my secret {PROMPT_MARKER} question"));
        for key in [KEY_A, "wg-wrong-key-dddddddddddddddddddd", KEY_B, KEY_A] {
            let _ = client.post(&url).bearer_auth(key).json(&body).send().await;
        }
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        if let Ok(r) = client
            .post(&url)
            .bearer_auth(KEY_B)
            .json(&streamed)
            .send()
            .await
        {
            let _ = r.bytes().await;
        }
        let _ = client
            .get(format!("{base}/metrics"))
            .bearer_auth(ADMIN)
            .send()
            .await;
    });
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let mut logs = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut logs);
    }
    drop(cloud);
    logs
}

#[test]
fn no_key_or_prompt_appears_in_the_logs_at_the_default_level() {
    let logs = daemon_logs(&[], "");
    // The access log is there, with request ids and the client's key name.
    let chat_lines = logs.lines().filter(|l| l.contains(" chat ")).count();
    assert_eq!(
        chat_lines, 4,
        "one access-log line per served request:\n{logs}"
    );
    assert!(logs.contains("request_id="), "{logs}");
    assert!(logs.contains("client=key:team-a"), "{logs}");
    assert!(logs.contains("refused: invalid_api_key"), "{logs}");
    for secret in [
        "PROMPT-MARKER-7f3a",
        "wg-test-key",
        "wg-wrong-key",
        "wg-test-admin",
        &hex(KEY_A),
        &hex(ADMIN),
    ] {
        assert!(!logs.contains(secret), "`{secret}` in the logs:\n{logs}");
    }
}

#[test]
fn prompts_are_logged_only_when_enabled_and_at_debug() {
    // The grep above can fail: with log_prompts on and debug logs, the marker shows up.
    let logs = daemon_logs(&[("WATTGATE_LOG", "wattgate=debug")], "log_prompts = true");
    assert!(logs.contains("PROMPT-MARKER-7f3a"), "{logs}");
    for key in [KEY_A, KEY_B, ADMIN] {
        assert!(!logs.contains(key), "a key in the debug logs:\n{logs}");
    }
}
