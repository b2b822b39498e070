//! Criterion benches of the gateway's own work.
//!
//! - `parse_and_forward`: validating a real chat request and writing the upstream body, the CPU
//!   work the gateway adds to every request (prompts from ../shared/data/traffic when present).
//! - `round_trip`: one sequential non-streaming request to an instant loopback upstream, sent
//!   `direct`ly and `via_gateway`, in the same run: their difference is the added latency.
//!
//! - `guard_check`: what the quality guard adds after generation: reading the finish reason,
//!   computing the signals of 128 tokens and scoring them with a head (`embedded`, whose
//!   log-probabilities arrive on the side), plus reading and removing `logprobs` from an
//!   OpenAI-compatible server's JSON body (`openai_json`).
//! - `guard_round_trip`: the same request through the gateway with the guard `off` and
//!   `check` (the local upstream returns sure logprobs, so every answer passes), next to
//!   `direct`, in one run: the guarded path's added latency and the unguarded path's.
//!
//! Run: `cargo bench --bench pipeline`. The load-level figures (p99 at 2,000 requests/s, maximum
//! throughput) come from `scripts/bench_overhead.sh`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::{json, Value};
use wattgate::config::Config;
use wattgate::wire::ChatRequest;
use wattgate_testkit::{Behavior, ScriptedUpstream};

fn sample_bodies() -> Vec<Vec<u8>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/traffic/chat-prompts.jsonl"
    );
    let from_file: Vec<Vec<u8>> = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("messages").cloned())
        .take(200)
        .map(|m| {
            json!({"model": "auto", "messages": m, "temperature": 0.7})
                .to_string()
                .into_bytes()
        })
        .collect();
    if from_file.is_empty() {
        eprintln!("note: {path} not found; benchmarking a synthetic prompt");
        return vec![json!({"model": "auto", "messages": [{"role": "user", "content": "Explain TCP slow start. ".repeat(40)}]}).to_string().into_bytes()];
    }
    from_file
}

fn parse_and_forward(c: &mut Criterion) {
    let bodies = sample_bodies();
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    let mut group = c.benchmark_group("parse_and_forward");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function(format!("{}_real_prompts", bodies.len()), |b| {
        b.iter(|| {
            for body in &bodies {
                if let Ok(request) = ChatRequest::parse(body) {
                    std::hint::black_box(request.upstream_body("upstream-model", true, false));
                }
            }
        })
    });
    group.finish();
}

fn round_trip(c: &mut Criterion) {
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    else {
        eprintln!("cannot start a tokio runtime; skipping round_trip");
        return;
    };
    let setup = rt.block_on(async {
        let upstream = ScriptedUpstream::start_on("127.0.0.1:0".parse().ok()?, "instant", vec![Behavior::Reply("ok".into())], false)
            .await
            .ok()?;
        // The ledger is part of the measured path; its directory is removed when the bench ends.
        let data = tempfile::tempdir().ok()?;
        let config = Config::parse(&format!(
            "[ledger]\npath = \"{}\"\n[[backends]]\nname = \"instant\"\nkind = \"openai\"\nrole = \"local\"\nbase_url = \"{}\"\nmodel = \"instant\"\nparameters = 1e9\n",
            data.path().join("ledger.redb").display(),
            upstream.base_url()
        ))
        .ok()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.ok()?;
        let addr = listener.local_addr().ok()?;
        tokio::spawn(async move { wattgate::server::serve(&config, listener, std::future::pending()).await });
        Some((upstream, addr, data))
    });
    let Some((upstream, gateway, _data)) = setup else {
        eprintln!("cannot start loopback servers; skipping round_trip");
        return;
    };
    let client = reqwest::Client::new();
    let body = json!({"model": "auto", "messages": [{"role": "user", "content": "Write one sentence about the sea."}]});
    let direct = format!("{}/chat/completions", upstream.base_url());
    let via = format!("http://{gateway}/v1/chat/completions");

    let mut group = c.benchmark_group("round_trip");
    group.measurement_time(Duration::from_secs(5));
    for (name, url) in [("direct", &direct), ("via_gateway", &via)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let r = client.post(url).json(&body).send().await;
                    if let Ok(r) = r {
                        std::hint::black_box(r.bytes().await.ok());
                    }
                })
            })
        });
    }
    group.finish();
}

fn guard_check(c: &mut Criterion) {
    use wattgate::guard::head::{self, Example};
    use wattgate::guard::{Guard, Signals};
    // A head fitted on synthetic answers (the arithmetic is the same for any weights).
    let examples: Vec<Example> = (0..200)
        .map(|i| {
            let right = i % 3 != 0;
            let lp: Vec<f32> = (0..16)
                .map(|t| -((i * 7 + t * 13) % 29) as f32 / if right { 40.0 } else { 12.0 })
                .collect();
            Example {
                signals: Signals::from_logprobs(&lp, Some("stop")).unwrap_or(Signals {
                    tokens: 1,
                    mean: 0.0,
                    min: 0.0,
                    low_decile: 0.0,
                    first_mean: 0.0,
                    truncated: false,
                }),
                p_local: Some(0.6),
                local: f64::from(u8::from(right)),
                cloud: 1.0,
                source: format!("s{}", i % 2),
            }
        })
        .collect();
    let Ok(trained) = head::train(&examples, "bench", 1.0) else {
        eprintln!("cannot fit a head; skipping guard_check");
        return;
    };
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let router_dir = dir.path().join("local");
    if std::fs::create_dir_all(&router_dir).is_err() || trained.save(&router_dir).is_err() {
        return;
    }
    let toml = format!(
        "[routing]\nrouter_dir = \"{}\"\n[[backends]]\nname = \"local\"\nkind = \"openai\"\nrole = \"local\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\nparameters = 1e9\nrouter = \"local\"\n[[backends]]\nname = \"cloud\"\nkind = \"openai\"\nrole = \"cloud\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"c\"\nparameters = 1e9\n",
        dir.path().display()
    );
    let Ok(guard) = Config::parse(&toml)
        .map_err(|e| e.to_string())
        .and_then(|c| Guard::new(&c))
    else {
        eprintln!("cannot build the guard; skipping guard_check");
        return;
    };
    let plan = guard.plan(None, None);
    let logprobs: Vec<f32> = (0..128).map(|i| -((i * 31) % 17) as f32 / 10.0).collect();
    let tokens: Vec<Value> = logprobs
        .iter()
        .map(|l| json!({"token": " word", "logprob": l, "bytes": [32, 119, 111, 114, 100], "top_logprobs": []}))
        .collect();
    let content = " word".repeat(128);
    let body = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": {"content": tokens, "refusal": null}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 128, "total_tokens": 148}})
    .to_string()
    .into_bytes();
    let embedded_body = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 128, "total_tokens": 148}})
    .to_string()
    .into_bytes();
    let mut group = c.benchmark_group("guard_check");
    group.bench_function("embedded_128_tokens", |b| {
        b.iter(|| {
            let finish = wattgate::wire::answer_peek(&embedded_body).finish_reason;
            std::hint::black_box(guard.judge(
                0,
                &plan,
                Some(&logprobs),
                finish.as_deref(),
                Some(0.6),
            ))
        })
    });
    group.bench_function("openai_json_128_tokens", |b| {
        b.iter(|| {
            let (peek, stripped) = wattgate::wire::read_answer(&body, true);
            let verdict = guard.judge(
                0,
                &plan,
                peek.logprobs.as_deref(),
                peek.finish_reason.as_deref(),
                Some(0.6),
            );
            std::hint::black_box((stripped, verdict))
        })
    });
    group.finish();
}

fn guard_round_trip(c: &mut Criterion) {
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    else {
        eprintln!("cannot start a tokio runtime; skipping guard_round_trip");
        return;
    };
    let setup = rt.block_on(async {
        let local = ScriptedUpstream::start_on(
            "127.0.0.1:0".parse().ok()?,
            "local",
            vec![Behavior::confident("The sea is wide and deep tonight.", -0.05)],
            false,
        )
        .await
        .ok()?;
        let cloud = ScriptedUpstream::start_on("127.0.0.1:0".parse().ok()?, "cloud", vec![Behavior::Reply("ok".into())], false)
            .await
            .ok()?;
        let data = tempfile::tempdir().ok()?;
        let config = Config::parse(&format!(
            "[ledger]\npath = \"{}\"\n[guard]\nthreshold = 0.5\n[[backends]]\nname = \"local\"\nkind = \"openai\"\nrole = \"local\"\nbase_url = \"{}\"\nmodel = \"local\"\nparameters = 1e9\n[[backends]]\nname = \"cloud\"\nkind = \"openai\"\nrole = \"cloud\"\nbase_url = \"{}\"\nmodel = \"cloud\"\nparameters = 1e9\n",
            data.path().join("ledger.redb").display(),
            local.base_url(),
            cloud.base_url()
        ))
        .ok()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.ok()?;
        let addr = listener.local_addr().ok()?;
        tokio::spawn(async move { wattgate::server::serve(&config, listener, std::future::pending()).await });
        Some((local, cloud, addr, data))
    });
    let Some((local, _cloud, gateway, _data)) = setup else {
        eprintln!("cannot start loopback servers; skipping guard_round_trip");
        return;
    };
    let client = reqwest::Client::new();
    let body = json!({"model": "auto", "messages": [{"role": "user", "content": "Write one sentence about the sea."}]});
    let direct = format!("{}/chat/completions", local.base_url());
    let via = format!("http://{gateway}/v1/chat/completions");
    let mut group = c.benchmark_group("guard_round_trip");
    group.measurement_time(Duration::from_secs(5));
    for (name, url, guard) in [
        ("direct", &direct, "off"),
        ("via_gateway_guard_off", &via, "off"),
        ("via_gateway_guard_check", &via, "check"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let r = client
                        .post(url)
                        .header("x-wattgate-guard", guard)
                        .json(&body)
                        .send()
                        .await;
                    if let Ok(r) = r {
                        std::hint::black_box(r.bytes().await.ok());
                    }
                })
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    parse_and_forward,
    round_trip,
    guard_check,
    guard_round_trip
);
criterion_main!(benches);
