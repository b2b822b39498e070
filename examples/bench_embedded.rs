//! One measurement of the embedded engine for scripts/bench_embedded.sh: model load, prefill and
//! greedy decode speed, and peak RSS, as one JSON line.
//! `cargo run --release --example bench_embedded -- PATH.gguf PROMPT DECODE_TOKENS`
//! Threads: candle reads RAYON_NUM_THREADS.

use std::time::Instant;

use candle_core::Device;
use wattgate::backends::candle::backend::Model;
use wattgate::backends::candle::gemma3::argmax;
use wattgate::backends::candle::tokenizer::GgufTokenizer;

/// Prefill repetitions (the median is reported); the same in scripts/llama_cpp_speed.py.
const PREFILL_RUNS: usize = 5;

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 4,
        "usage: bench_embedded PATH.gguf PROMPT DECODE_TOKENS"
    );
    let decode_tokens: usize = args[3].parse()?;
    let started = Instant::now();
    let mut file = std::fs::File::open(&args[1])?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let tokenizer = GgufTokenizer::from_gguf(&content)?;
    let model = Model::load(&content, &mut file, 8192, &Device::Cpu)?;
    let load_s = started.elapsed().as_secs_f64();
    let mut ids = if tokenizer.add_bos {
        vec![tokenizer.bos]
    } else {
        Vec::new()
    };
    ids.extend(tokenizer.encode(&args[2])?);
    // Prefill is timed PREFILL_RUNS times on a fresh cache and the median kept: one run of a
    // short prompt lasts tens of milliseconds, too short to trust alone on a shared machine.
    let mut times = Vec::with_capacity(PREFILL_RUNS);
    let mut run = || -> anyhow::Result<_> {
        let mut cache = model.new_cache();
        let t = Instant::now();
        let next = argmax(&model.forward(&ids, &mut cache)?);
        times.push(t.elapsed().as_secs_f64());
        Ok((cache, next))
    };
    for _ in 1..PREFILL_RUNS {
        run()?;
    }
    let (mut cache, mut next) = run()?;
    times.sort_by(f64::total_cmp);
    let prefill_s = times[times.len() / 2];
    let mut greedy = vec![next];
    let t = Instant::now();
    for _ in 0..decode_tokens {
        next = argmax(&model.forward(&[next], &mut cache)?);
        greedy.push(next);
    }
    let decode_s = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "engine": "wattgate", "load_s": load_s, "prompt_tokens": ids.len(),
            "prefill_tok_s": ids.len() as f64 / prefill_s, "decode_tok_s": decode_tokens as f64 / decode_s,
            "peak_rss_mb": peak_rss_mb(), "greedy_ids": greedy,
        })
    );
    Ok(())
}
