//! Times one Q8_0 and one Q5_0 matrix-vector product at Gemma 3 270M's output-head shape and
//! reports GB/s of weights streamed: `cargo run --release -p wattgate-kernels --example gemv_speed`.
//! Threads: CANDLE_NUM_THREADS / RAYON_NUM_THREADS.
use std::time::Instant;
use wattgate_kernels::{BlockFormat, BlockMatrix, QuantizedActivations};

fn main() -> Result<(), String> {
    let (rows, cols) = (262_144, 640);
    for format in [BlockFormat::Q8_0, BlockFormat::Q5_0] {
        let bytes = rows * cols / 32 * format.block_bytes();
        let mut data = vec![0u8; bytes];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        for block in data.chunks_exact_mut(format.block_bytes()) {
            block[..2].copy_from_slice(&[0x00, 0x3c]); // f16 1.0
        }
        let m = BlockMatrix::new(format, rows, cols, data)?;
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let xq = QuantizedActivations::new(&x, 1, cols)?;
        let mut out = vec![0f32; rows];
        let mut best = f64::MAX;
        for _ in 0..10 {
            let t = Instant::now();
            m.matmul(&xq, &mut out)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        let streamed = rows * cols / 32 * (format.block_bytes() + 2);
        println!(
            "{format:?}: {:.2} ms, {:.1} GB/s (checksum {:.3})",
            best * 1e3,
            streamed as f64 / best / 1e9,
            out.iter().sum::<f32>()
        );
    }
    Ok(())
}
