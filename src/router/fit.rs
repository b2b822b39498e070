//! Fitting a router head: L2-regularised logistic regression on soft labels, full-batch Adam in
//! a fixed order (the same data gives the same bytes), and Platt calibration of its logits.

use super::features::{Features, DENSE, DENSE_NAMES};
use super::model::{sigmoid, Calibration, RouterMeta, RouterModel, FORMAT};
use super::train::{Choice, TrainOptions};

/// Fits the head on the rows `train` under `choice` (`y` already centred where it says so),
/// each row's loss scaled by its `weight` (the mean loss is over the weights' sum, so rows of
/// weight 1 fit exactly as an unweighted fit does).
pub(super) fn fit(
    features: &[Features],
    y: &[f64],
    weight: &[f64],
    train: &[usize],
    o: &TrainOptions,
    choice: &Choice,
) -> RouterModel {
    let buckets = o.buckets as usize;
    let n = train.len().max(1) as f64;
    let total_weight: f64 = train.iter().map(|&i| weight[i]).sum();
    let mass = if total_weight > 0.0 { total_weight } else { n };
    let mut df = vec![0u32; buckets];
    for &i in train {
        for &(b, _) in &features[i].sparse {
            df[b as usize] += 1;
        }
    }
    let idf: Vec<f32> = df
        .iter()
        .map(|&d| ((1.0 + n) / (1.0 + f64::from(d))).ln() as f32 + 1.0)
        .collect();
    let mut mean = [0f64; DENSE];
    let mut var = [0f64; DENSE];
    for &i in train {
        for (m, x) in mean.iter_mut().zip(features[i].dense) {
            *m += f64::from(x) / n;
        }
    }
    for &i in train {
        for ((v, m), x) in var.iter_mut().zip(mean).zip(features[i].dense) {
            *v += (f64::from(x) - m).powi(2) / n;
        }
    }
    let dense_mean: Vec<f32> = mean.iter().map(|m| *m as f32).collect();
    let dense_std: Vec<f32> = var
        .iter()
        .map(|v| if *v > 1e-12 { v.sqrt() as f32 } else { 1.0 })
        .collect();

    // The rows as the scorer will see them: IDF-weighted, L2-normalised; dense standardised.
    let sparse: Vec<Vec<(u32, f32)>> = train
        .iter()
        .map(|&i| {
            let x: Vec<(u32, f32)> = features[i]
                .sparse
                .iter()
                .map(|&(b, v)| (b, v * idf[b as usize]))
                .collect();
            let norm = x.iter().map(|(_, v)| v * v).sum::<f32>().sqrt();
            x.into_iter()
                .map(|(b, v)| (b, if norm > 0.0 { v / norm } else { 0.0 }))
                .collect()
        })
        .collect();
    // Dense inputs not chosen are zero, so their weights stay zero.
    let on: Vec<f32> = DENSE_NAMES
        .iter()
        .map(|n| f32::from(u8::from(choice.structure.iter().any(|s| s == n))))
        .collect();
    let dense: Vec<[f32; DENSE]> = train
        .iter()
        .map(|&i| {
            let mut d = [0f32; DENSE];
            for k in 0..DENSE {
                d[k] = (features[i].dense[k] - dense_mean[k]) / dense_std[k] * on[k];
            }
            d
        })
        .collect();

    // Parameters: bucket weights, then dense weights, then the bias.
    let p_len = buckets + DENSE + 1;
    let mut w = vec![0f64; p_len];
    let mut m1 = vec![0f64; p_len];
    let mut m2 = vec![0f64; p_len];
    let mut g = vec![0f64; p_len];
    let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    for step in 1..=o.steps {
        g.iter_mut().for_each(|v| *v = 0.0);
        for (r, &i) in train.iter().enumerate() {
            let mut z = w[p_len - 1];
            for &(b, v) in &sparse[r] {
                z += w[b as usize] * f64::from(v);
            }
            for k in 0..DENSE {
                z += w[buckets + k] * f64::from(dense[r][k]);
            }
            let err = weight[i] * (sigmoid(z) - y[i]) / mass;
            for &(b, v) in &sparse[r] {
                g[b as usize] += err * f64::from(v);
            }
            for k in 0..DENSE {
                g[buckets + k] += err * f64::from(dense[r][k]);
            }
            g[p_len - 1] += err;
        }
        let c1 = 1.0 - beta1.powi(step as i32);
        let c2 = 1.0 - beta2.powi(step as i32);
        for k in 0..p_len {
            let grad = g[k] + if k + 1 < p_len { choice.l2 * w[k] } else { 0.0 };
            m1[k] = beta1 * m1[k] + (1.0 - beta1) * grad;
            m2[k] = beta2 * m2[k] + (1.0 - beta2) * grad * grad;
            w[k] -= o.learning_rate * (m1[k] / c1) / ((m2[k] / c2).sqrt() + eps);
        }
    }
    RouterModel {
        meta: RouterMeta {
            format: FORMAT,
            name: o.name.clone(),
            label: o.local.join(" | "),
            buckets: o.buckets,
            structure: !choice.structure.is_empty(),
            dense_names: DENSE_NAMES.iter().map(|s| (*s).to_owned()).collect(),
            dense_mean,
            dense_std,
            dense_weights: w[buckets..buckets + DENSE]
                .iter()
                .map(|v| *v as f32)
                .collect(),
            bias: w[p_len - 1] as f32,
            calibration: Calibration { a: 1.0, b: 0.0 },
            share_thresholds: vec![1.0, 0.0],
            curve: Vec::new(),
            validation: Vec::new(),
            pooled: None,
            selection: None,
            trained_on: Vec::new(),
        },
        idf,
        weights: w[..buckets].iter().map(|v| *v as f32).collect(),
        path: std::path::PathBuf::new(),
    }
}

/// Platt scaling: `a`, `b` minimising the cross-entropy of `sigmoid(a z + b)` against soft
/// labels, by Newton's method on the two parameters. Targets are pulled toward 1/2 by one
/// pseudo-observation each way, `(n y + 1) / (n + 2)` (Platt 1999 does the same for hard
/// labels), so held-out logits that separate perfectly give a finite slope and no p of exactly
/// 0 or 1; with the 27,779 shared rows the pull is under 0.0001.
pub(super) fn platt(points: &[(f64, f64)]) -> Calibration {
    let (mut a, mut b) = (1.0f64, 0.0f64);
    if points.is_empty() {
        return Calibration { a, b };
    }
    let n = points.len() as f64;
    let smooth = |y: f64| (n * y + 1.0) / (n + 2.0);
    // Cross-entropy against the smoothed targets, written to stay finite for large |a z + b|.
    let loss = |a: f64, b: f64| -> f64 {
        points
            .iter()
            .map(|&(z, y)| {
                let s = a * z + b;
                let t = smooth(y);
                // -t ln sigmoid(s) - (1 - t) ln (1 - sigmoid(s)) = ln(1 + e^s) - t s
                s.max(0.0) + (-s.abs()).exp().ln_1p() - t * s
            })
            .sum()
    };
    let mut current = loss(a, b);
    for _ in 0..100 {
        let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (0.0, 0.0, 1e-9, 0.0, 1e-9);
        for &(z, y) in points {
            let p = sigmoid(a * z + b);
            let (e, w) = (p - smooth(y), p * (1.0 - p));
            ga += e * z;
            gb += e;
            haa += w * z * z;
            hab += w * z;
            hbb += w;
        }
        let det = haa * hbb - hab * hab;
        if det.abs() < 1e-18 {
            break;
        }
        let da = (hbb * ga - hab * gb) / det;
        let db = (haa * gb - hab * ga) / det;
        // Newton's step, halved until it lowers the loss (a full step can overshoot when the
        // logits barely vary).
        let mut step = 1.0;
        let mut moved = false;
        for _ in 0..40 {
            let next = loss(a - step * da, b - step * db);
            if next <= current {
                a -= step * da;
                b -= step * db;
                current = next;
                moved = true;
                break;
            }
            step /= 2.0;
        }
        if !moved || (step * da).abs() < 1e-10 && (step * db).abs() < 1e-10 {
            break;
        }
    }
    Calibration { a, b }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rows_weight_counts_like_that_many_copies_in_the_loss() {
        // Two rows the head cannot tell apart, one a success and one a failure: the fitted
        // probability is the weighted share of successes.
        let row = Features {
            sparse: vec![(3, 1.0)],
            dense: [0.0; DENSE],
        };
        let features = vec![row.clone(), row.clone()];
        let mut o = TrainOptions::new("t", vec!["small".into()], Vec::new());
        o.buckets = 16;
        o.steps = 2000;
        let choice = Choice {
            centre_sources: false,
            structure: Vec::new(),
            l2: 0.0,
        };
        let p = |weights: &[f64]| {
            sigmoid(fit(&features, &[1.0, 0.0], weights, &[0, 1], &o, &choice).logit(&row))
        };
        let (even, tilted) = (p(&[1.0, 1.0]), p(&[3.0, 1.0]));
        assert!((even - 0.5).abs() < 0.01, "{even}");
        assert!((tilted - 0.75).abs() < 0.01, "{tilted}");
    }
}
