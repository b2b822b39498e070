//! Load generator for loopback benchmarks.
//!
//! Open-loop mode (`--rate`) sends requests on a fixed schedule, each in its own task, so a slow
//! server cannot slow the sender down and hide its queueing (no coordinated omission). Latency is
//! timed from the moment each request is handed to the client: tokio's timer fires at 1 ms
//! granularity, and timing from the scheduled instant would add that jitter to every figure.
//! Closed-loop mode (`--concurrency` without `--rate`) finds the maximum sustained throughput.
//! When responses carry `x-wattgate-overhead-ms`, its distribution is reported too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Open- or closed-loop load against an OpenAI-compatible endpoint on loopback")]
struct Args {
    /// Chat completions URL, e.g. http://127.0.0.1:8080/v1/chat/completions.
    #[arg(long)]
    url: String,
    /// Requests per second (open loop). Omit for closed loop.
    #[arg(long)]
    rate: Option<u64>,
    /// Concurrent workers in closed-loop mode.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of unmeasured warm-up before.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// `model` field of the requests.
    #[arg(long, default_value = "auto")]
    model: String,
    /// JSONL file with OpenAI `messages` arrays (e.g. ../shared/data/traffic/chat-prompts.jsonl),
    /// cycled through; without it a short fixed prompt is sent.
    #[arg(long)]
    prompts: Option<std::path::PathBuf>,
    /// A label for the report line.
    #[arg(long, default_value = "run")]
    label: String,
}

struct Stats {
    latency_us: Histogram<u64>,
    overhead_us: Histogram<u64>,
}

fn bodies(args: &Args) -> anyhow::Result<Vec<Bytes>> {
    let messages: Vec<Value> = match &args.prompts {
        None => vec![json!([{"role": "user", "content": "Write one sentence about the sea."}])],
        Some(path) => std::fs::read_to_string(path)?
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v.get("messages").cloned())
            .take(2000)
            .collect(),
    };
    anyhow::ensure!(!messages.is_empty(), "no prompts with `messages` found");
    Ok(messages
        .into_iter()
        .map(|m| Bytes::from(json!({"model": args.model, "messages": m}).to_string()))
        .collect())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bodies = Arc::new(bodies(&args)?);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let uri: hyper::Uri = args.url.parse()?;
    let stats = Arc::new(Mutex::new(Stats {
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        overhead_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
    }));
    let errors = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));

    let warmup = Duration::from_secs_f64(args.warmup);
    let measure = Duration::from_secs_f64(args.duration);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measure;

    let one = {
        let (client, uri, bodies, stats, errors, sent) = (
            client.clone(),
            uri.clone(),
            bodies.clone(),
            stats.clone(),
            errors.clone(),
            sent.clone(),
        );
        move |i: u64, scheduled: Instant| {
            let (client, uri, bodies, stats, errors, sent) = (
                client.clone(),
                uri.clone(),
                bodies.clone(),
                stats.clone(),
                errors.clone(),
                sent.clone(),
            );
            async move {
                let body = bodies[(i as usize) % bodies.len()].clone();
                let request = hyper::Request::post(uri)
                    .header("content-type", "application/json")
                    .body(Full::new(body));
                let Ok(request) = request else { return };
                let sent_at = Instant::now();
                let result = client.request(request).await;
                let measured = scheduled >= measure_from && scheduled < end;
                match result {
                    Ok(response) => {
                        let ok = response.status().is_success();
                        let overhead = response
                            .headers()
                            .get("x-wattgate-overhead-ms")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<f64>().ok());
                        let body_ok = response.into_body().collect().await.is_ok();
                        let latency = sent_at.elapsed();
                        if !measured {
                            return;
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                        if !(ok && body_ok) {
                            errors.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        if let Ok(mut s) = stats.lock() {
                            let _ = s.latency_us.record((latency.as_micros() as u64).max(1));
                            if let Some(ms) = overhead {
                                let _ = s.overhead_us.record(((ms * 1000.0) as u64).max(1));
                            }
                        }
                    }
                    Err(_) => {
                        if measured {
                            sent.fetch_add(1, Ordering::Relaxed);
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    };

    match args.rate {
        Some(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let mut tasks = tokio::task::JoinSet::new();
            let mut i = 0u64;
            loop {
                let scheduled = start + interval.mul_f64(i as f64);
                if scheduled >= end {
                    break;
                }
                tokio::time::sleep_until(scheduled.into()).await;
                tasks.spawn(one(i, scheduled));
                i += 1;
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        }
        None => {
            let counter = Arc::new(AtomicU64::new(0));
            let mut workers = tokio::task::JoinSet::new();
            for _ in 0..args.concurrency {
                let (one, counter) = (one.clone(), counter.clone());
                workers.spawn(async move {
                    loop {
                        let now = Instant::now();
                        if now >= end {
                            break;
                        }
                        one(counter.fetch_add(1, Ordering::Relaxed), now).await;
                    }
                });
            }
            while workers.join_next().await.is_some() {}
        }
    }

    let s = stats
        .lock()
        .map_err(|_| anyhow::anyhow!("stats lock poisoned"))?;
    let n = sent.load(Ordering::Relaxed);
    let report = json!({
        "label": args.label,
        "mode": if args.rate.is_some() { "open" } else { "closed" },
        "target_rps": args.rate,
        "achieved_rps": n as f64 / measure.as_secs_f64(),
        "requests": n,
        "errors": errors.load(Ordering::Relaxed),
        "latency_ms": {
            "p50": s.latency_us.value_at_quantile(0.50) as f64 / 1000.0,
            "p90": s.latency_us.value_at_quantile(0.90) as f64 / 1000.0,
            "p99": s.latency_us.value_at_quantile(0.99) as f64 / 1000.0,
            "max": s.latency_us.max() as f64 / 1000.0,
        },
        "reported_overhead_ms": if s.overhead_us.is_empty() { Value::Null } else { json!({
            "p50": s.overhead_us.value_at_quantile(0.50) as f64 / 1000.0,
            "p99": s.overhead_us.value_at_quantile(0.99) as f64 / 1000.0,
            "max": s.overhead_us.max() as f64 / 1000.0,
        })},
    });
    println!("{report}");
    Ok(())
}
