//! Criterion benches of the gateway's own work.
//!
//! - `parse_and_forward`: validating a real chat request and writing the upstream body, the CPU
//!   work the gateway adds to every request (prompts from ../shared/data/traffic when present).
//! - `round_trip`: one sequential non-streaming request to an instant loopback upstream, sent
//!   `direct`ly and `via_gateway`, in the same run: their difference is the added latency.
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
                    std::hint::black_box(request.upstream_body("upstream-model", true));
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

criterion_group!(benches, parse_and_forward, round_trip);
criterion_main!(benches);
