//! One token's draw from Gemma 3's 262,144 logits, per sampling setting, next to the sort-based
//! sampler it replaced (every finite logit collected and sorted per token), in the same run.
//!
//! - `sampling/greedy`: argmax, the floor any sampler is compared with;
//! - `sampling/temperature_1.0`: the OpenAI default a client that sets nothing gets;
//! - `sampling/top_p_0.9`, `sampling/top_k_40`: the truncations;
//! - `sampling/sort_based_temperature_1.0`: the previous implementation, as the anchor.
//!
//! Logits are synthetic but shaped like a language model's: mostly noise around -5 with a few
//! hundred plausible tokens above it. Run: `cargo bench --bench sampling`.

use criterion::{criterion_group, criterion_main, Criterion};
use rand::{Rng, SeedableRng};
use std::hint::black_box;
use wattgate::backends::candle::gemma3::argmax;
use wattgate::backends::candle::sampling::{Sampler, SamplingParams};

const VOCAB: usize = 262_144;

fn logits() -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    (0..VOCAB)
        .map(|i| {
            let noise: f32 = (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0;
            let plausible = if i % 997 == 0 { 9.0 } else { 0.0 };
            -5.0 + 2.0 * noise + plausible
        })
        .collect()
}

/// The previous sampler: every finite logit collected, sorted, softmaxed, truncated, drawn.
fn sort_based(logits: &[f32], temperature: f32, rng: &mut rand::rngs::StdRng) -> u32 {
    let mut candidates: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i as u32, l))
        .collect();
    candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    let max = candidates[0].1;
    let probs: Vec<f32> = candidates
        .iter()
        .map(|(_, l)| ((l - max) / temperature).exp())
        .collect();
    let total: f32 = probs.iter().sum();
    let mut draw = rng.random::<f32>() * total;
    for (i, p) in probs.iter().enumerate() {
        draw -= p;
        if draw <= 0.0 {
            return candidates[i].0;
        }
    }
    candidates[candidates.len() - 1].0
}

fn bench(c: &mut Criterion) {
    let logits = logits();
    let mut group = c.benchmark_group("sampling");
    group.bench_function("greedy", |b| b.iter(|| argmax(black_box(&logits))));
    let settings = [
        ("temperature_1.0", 1.0, 1.0, 0),
        ("top_p_0.9", 1.0, 0.9, 0),
        ("top_k_40", 1.0, 1.0, 40),
    ];
    for (name, temperature, top_p, top_k) in settings {
        let mut sampler = Sampler::new(SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: Some(1),
        });
        group.bench_function(name, |b| b.iter(|| sampler.sample(black_box(&logits))));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    group.bench_function("sort_based_temperature_1.0", |b| {
        b.iter(|| sort_based(black_box(&logits), 1.0, &mut rng))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
