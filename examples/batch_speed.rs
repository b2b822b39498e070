//! Decode-step time of the embedded model by batch size, and of the output head alone:
//! `cargo run --release --example batch_speed -- PATH.gguf`
use std::time::Instant;

use candle_core::{Device, Tensor};
use wattgate::backends::candle::backend::Model;
use wattgate::backends::candle::linear::Linear;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() >= 2, "usage: batch_speed PATH.gguf");
    let mut file = std::fs::File::open(&args[1])?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let model = Model::load(&content, &mut file, 2048, &Device::Cpu)?;
    let head = Linear::load(&content, &mut file, "token_embd.weight", &Device::Cpu)?;
    let prompt: Vec<u32> = (0..200).map(|i| 1000 + i * 7).collect();
    for b in [1usize, 4, 8, 16] {
        let mut caches: Vec<_> = (0..b).map(|_| model.new_cache()).collect();
        for c in caches.iter_mut() {
            model.forward(&prompt, c)?;
        }
        let steps = 20;
        let t = Instant::now();
        for _ in 0..steps {
            let tokens = [107u32];
            let mut batch: Vec<_> = caches.iter_mut().map(|c| (&tokens[..], c, true)).collect();
            model.forward_batch(&mut batch)?;
        }
        let step = t.elapsed().as_secs_f64() / steps as f64;
        let x = Tensor::randn(0f32, 1.0, (1, b, 640), &Device::Cpu)?;
        let t = Instant::now();
        for _ in 0..steps {
            head.forward(&x)?;
        }
        let h = t.elapsed().as_secs_f64() / steps as f64;
        println!(
            "batch {b:>2}: step {:.1} ms ({:.0} tok/s), head alone {:.1} ms",
            step * 1e3,
            b as f64 / step,
            h * 1e3
        );
    }
    Ok(())
}
