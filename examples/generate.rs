//! Greedy generation with the embedded Gemma 3 model, for quick checks:
//! `cargo run --release --example generate -- PATH.gguf "prompt" [max_tokens]`

use std::time::Instant;

use candle_core::Device;
use wattgate::backends::candle::gemma3::{argmax, Gemma3};
use wattgate::backends::candle::tokenizer::GgufTokenizer;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() >= 3,
        "usage: generate PATH.gguf PROMPT [MAX_TOKENS]"
    );
    let max: usize = args.get(3).map_or(Ok(16), |s| s.parse())?;
    let started = Instant::now();
    let mut file = std::fs::File::open(&args[1])?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let tokenizer = GgufTokenizer::from_gguf(&content)?;
    let model = Gemma3::load(&content, &mut file, 8192, &Device::Cpu)?;
    eprintln!("loaded in {:?}", started.elapsed());
    let mut ids = vec![tokenizer.bos];
    ids.extend(tokenizer.encode(&args[2])?);
    let mut cache = model.new_cache();
    let t = Instant::now();
    let logits = model.forward(&ids, &mut cache)?;
    if let Ok(dump) = std::env::var("WATTGATE_DUMP_LOGITS") {
        let text: Vec<String> = logits.iter().map(|v| v.to_string()).collect();
        std::fs::write(dump, text.join("\n"))?;
    }
    let mut next = argmax(&logits);
    let prefill = t.elapsed();
    let mut out = vec![next];
    let t = Instant::now();
    for _ in 1..max {
        if next == tokenizer.eos {
            break;
        }
        next = argmax(&model.forward(&[next], &mut cache)?);
        out.push(next);
    }
    let decode = t.elapsed();
    println!("{out:?}");
    println!("{:?}", tokenizer.decode(&out)?);
    eprintln!(
        "prefill {} tokens: {:.1} tok/s; decode {} tokens: {:.1} tok/s",
        ids.len(),
        ids.len() as f64 / prefill.as_secs_f64(),
        out.len() - 1,
        (out.len() - 1) as f64 / decode.as_secs_f64()
    );
    Ok(())
}
