//! Sentence embeddings of labeled prompts with all-MiniLM-L6-v2, for the offline study of how
//! well a full sentence encoder ranks queries (scripts/router/encoder_study.sh). Not a router: one
//! encoder pass costs milliseconds, the router's budget is microseconds.
//!
//! usage: embed_prompts MODEL_DIR OUT.f32 FILE.jsonl...
//!
//! Writes one row of 384 little-endian f32 per input line with a prompt, in input order
//! (mean-pooled over tokens and L2-normalised, as sentence-transformers does), truncated to
//! `WATTGATE_EMBED_MAX_TOKENS` word pieces (default 256, the length the model was trained at).

use std::io::{BufRead, Write};

use candle_core::{DType, Device, Tensor};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, out, files @ ..] = args.as_slice() else {
        return Err("usage: embed_prompts MODEL_DIR OUT.f32 FILE.jsonl...".to_owned());
    };
    let max_tokens: usize = std::env::var("WATTGATE_EMBED_MAX_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let dir = std::path::Path::new(dir);
    let config: candle_transformers::models::bert::Config = serde_json::from_str(
        &std::fs::read_to_string(dir.join("config.json")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    // SAFETY: the weights file is only read, and not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .map_err(|e| e.to_string())?;
    let model = candle_transformers::models::bert::BertModel::load(vb, &config)
        .map_err(|e| e.to_string())?;
    let mut tokenizer =
        tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| e.to_string())?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: max_tokens,
            ..Default::default()
        }))
        .map_err(|e| e.to_string())?;
    let mut prompts = Vec::new();
    for f in files {
        let file = std::fs::File::open(f).map_err(|e| format!("{f}: {e}"))?;
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| format!("{f}:{}: {e}", i + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            let row: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| format!("{f}:{}: {e}", i + 1))?;
            let prompt = row["prompt"]
                .as_str()
                .ok_or_else(|| format!("{f}:{}: no prompt", i + 1))?;
            prompts.push(prompt.to_owned());
        }
    }
    let mut w = std::io::BufWriter::new(std::fs::File::create(out).map_err(|e| e.to_string())?);
    let started = std::time::Instant::now();
    for (n, text) in prompts.iter().enumerate() {
        let enc = tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| e.to_string())?;
        let ids = Tensor::new(enc.get_ids(), &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .map_err(|e| e.to_string())?;
        let types = ids.zeros_like().map_err(|e| e.to_string())?;
        let v: Vec<f32> = model
            .forward(&ids, &types, None)
            .and_then(|h| h.mean(1))
            .and_then(|h| h.flatten_all())
            .and_then(|h| h.to_vec1())
            .map_err(|e| e.to_string())?;
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        for x in v {
            w.write_all(&(x / norm).to_le_bytes())
                .map_err(|e| e.to_string())?;
        }
        if (n + 1) % 1000 == 0 {
            eprintln!(
                "embedded {}/{} ({:.0} s)",
                n + 1,
                prompts.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    w.flush().map_err(|e| e.to_string())?;
    eprintln!(
        "{} prompts -> {out} in {:.0} s",
        prompts.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
