//! The guard's head: P(the local answer is acceptable | signals, p_local), and the thresholds
//! an operator asks for in quality or escalation terms.
//!
//! A head is a logistic regression on seven standardised features, fitted by the router CLI
//! (`wattgate router guard`) on profiled answers of the local model that carry their signals
//! (`wattgate profile` records them), and shipped as `guard.json` next to the model's router.
//! Its file also carries the validation curve (held-out-source predictions), from which
//! `max_quality_loss` and `max_escalation_share` are turned into a threshold.
//!
//! Without a head the guard uses a documented rule: the geometric-mean token probability,
//! `exp(mean ln P)`, a number in 0..1 that is high when the model was sure of every token.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::signals::Signals;

/// The file name of a head inside a router directory.
pub const GUARD_FILE: &str = "guard.json";

/// Names of the features, in the order of [`features`].
pub const FEATURES: [&str; 7] = [
    "mean_logprob",
    "min_logprob",
    "low_decile_logprob",
    "first_tokens_logprob",
    "ln_tokens",
    "truncated",
    "p_local_logit",
];

/// The feature vector of one answer; `p_local` is the router's estimate when it ran.
pub fn features(s: &Signals, p_local: Option<f64>) -> [f64; 7] {
    let logit = p_local.map_or(0.0, |p| {
        let p = p.clamp(1e-3, 1.0 - 1e-3);
        (p / (1.0 - p)).ln()
    });
    [
        s.mean,
        s.min,
        s.low_decile,
        s.first_mean,
        (1.0 + s.tokens as f64).ln(),
        f64::from(u8::from(s.truncated)),
        logit,
    ]
}

/// One point of a validation curve: escalating every answer whose confidence is below
/// `threshold` escalates `escalated` of them and leaves `quality` (local where kept, cloud where
/// escalated), `quality_loss` below cloud-only.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Confidence below which answers escalate.
    pub threshold: f64,
    /// Share of answers escalated.
    pub escalated: f64,
    /// Mean quality served.
    pub quality: f64,
    /// Cloud-only quality minus `quality` (0..1 scale: 0.01 is one point).
    pub quality_loss: f64,
}

/// A trained head as stored in `guard.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardHead {
    /// File format version.
    pub format: u32,
    /// The local model whose answers it judges.
    pub local_model: String,
    /// Feature names (must equal [`FEATURES`]).
    pub features: Vec<String>,
    /// Per-feature mean and standard deviation used to standardise.
    pub mean: Vec<f64>,
    /// See `mean`.
    pub scale: Vec<f64>,
    /// Weights on the standardised features.
    pub weights: Vec<f64>,
    /// Intercept.
    pub bias: f64,
    /// Held-out-source validation curve, thresholds ascending.
    pub curve: Vec<CurvePoint>,
    /// What it was trained on and how well it ranks held out (for the card).
    pub validation: Validation,
}

/// How a head did on rows of sources it was not fitted on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    /// Rows.
    pub n: usize,
    /// Sources (leave-one-source-out folds; 1 means a 5-fold split by id hash).
    pub sources: usize,
    /// ROC AUC of the held-out confidence for "answered right".
    pub auc: Option<f64>,
    /// ROC AUC of the rule (exp mean ln P) on the same rows.
    pub rule_auc: Option<f64>,
    /// ROC AUC of the router's p_local on the same rows, when the rows carry it.
    pub router_auc: Option<f64>,
}

/// The default rule without a head: exp(mean ln P), the geometric-mean token probability.
pub fn rule_confidence(s: &Signals) -> f64 {
    s.mean.exp()
}

impl GuardHead {
    /// P(acceptable) for one answer.
    pub fn confidence(&self, s: &Signals, p_local: Option<f64>) -> f64 {
        let x = features(s, p_local);
        let z = self.bias
            + x.iter()
                .zip(&self.mean)
                .zip(&self.scale)
                .zip(&self.weights)
                .map(|(((x, m), sd), w)| w * (x - m) / sd)
                .sum::<f64>();
        crate::router::model::sigmoid(z)
    }

    /// Reads `dir/guard.json`; `Ok(None)` when there is none, an error naming the file when it
    /// is unreadable or inconsistent.
    pub fn load(dir: &Path) -> Result<Option<Self>, String> {
        let path = dir.join(GUARD_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let head: Self =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let n = FEATURES.len();
        let names_ok = head.features.iter().map(String::as_str).eq(FEATURES);
        let sizes_ok = head.mean.len() == n && head.scale.len() == n && head.weights.len() == n;
        let finite = head
            .mean
            .iter()
            .chain(&head.weights)
            .chain(std::iter::once(&head.bias))
            .all(|v| v.is_finite())
            && head.scale.iter().all(|s| s.is_finite() && *s > 0.0);
        if head.format != 1 || !names_ok || !sizes_ok || !finite {
            return Err(format!(
                "{}: not a guard head of format 1 with features {FEATURES:?} and finite weights",
                path.display()
            ));
        }
        Ok(Some(head))
    }

    /// Writes `dir/guard.json` (pretty, stable key order).
    pub fn save(&self, dir: &Path) -> Result<(), String> {
        let path = dir.join(GUARD_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(&path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The lowest threshold whose validation quality loss is at most `max_loss`: the fewest
    /// escalations that keep quality within `max_loss` of cloud-only. If none does, every
    /// answer escalates (threshold 1).
    pub fn threshold_for_quality_loss(&self, max_loss: f64) -> f64 {
        self.curve
            .iter()
            .find(|p| p.quality_loss <= max_loss + 1e-12)
            .map_or(1.0, |p| p.threshold)
    }

    /// The highest threshold that escalates at most `share` of the validation answers.
    pub fn threshold_for_escalation_share(&self, share: f64) -> f64 {
        self.curve
            .iter()
            .rev()
            .find(|p| p.escalated <= share + 1e-12)
            .map_or(0.0, |p| p.threshold)
    }
}

/// One labeled answer for fitting and validating a head.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Its signals.
    pub signals: Signals,
    /// The router's p_local for the prompt, when known.
    pub p_local: Option<f64>,
    /// 1 when the local answer was right (0..1).
    pub local: f64,
    /// The cloud model's score on the same query (0..1).
    pub cloud: f64,
    /// Source (the validation unit).
    pub source: String,
}

/// The curve of escalating below each distinct confidence, thresholds ascending; starts at
/// "escalate nothing" (threshold 0) and ends at "escalate everything" (threshold above 1).
pub fn curve(confidence: &[f64], local: &[f64], cloud: &[f64]) -> Vec<CurvePoint> {
    let n = confidence.len();
    if n == 0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| confidence[a].total_cmp(&confidence[b]));
    let cloud_only = cloud.iter().sum::<f64>() / n as f64;
    let mut quality_sum: f64 = local.iter().sum();
    let mut points = vec![CurvePoint {
        threshold: 0.0,
        escalated: 0.0,
        quality: quality_sum / n as f64,
        quality_loss: cloud_only - quality_sum / n as f64,
    }];
    let mut i = 0;
    while i < n {
        let c = confidence[order[i]];
        while i < n && confidence[order[i]] == c {
            quality_sum += cloud[order[i]] - local[order[i]];
            i += 1;
        }
        // Escalating below the next distinct value (or above everything) escalates these.
        let threshold = if i < n {
            confidence[order[i]]
        } else {
            1.0 + f64::EPSILON
        };
        let quality = quality_sum / n as f64;
        points.push(CurvePoint {
            threshold,
            escalated: i as f64 / n as f64,
            quality,
            quality_loss: cloud_only - quality,
        });
    }
    points
}

/// Each example's confidence from a head fitted without its fold (its source, or one of five
/// folds when there is one source): the predictions validation and replays use.
pub fn held_out_confidence(
    examples: &[Example],
    local_model: &str,
    l2: f64,
) -> Result<Vec<f64>, String> {
    let folds = folds(examples);
    let fold_count = folds.iter().max().map_or(1, |m| m + 1);
    let mut held_out = vec![0.0; examples.len()];
    for fold in 0..fold_count {
        let train: Vec<&Example> = examples
            .iter()
            .zip(&folds)
            .filter(|(_, f)| **f != fold)
            .map(|(e, _)| e)
            .collect();
        let head = fit(&train, local_model, l2)?;
        for (i, e) in examples.iter().enumerate() {
            if folds[i] == fold {
                held_out[i] = head.confidence(&e.signals, e.p_local);
            }
        }
    }
    Ok(held_out)
}

/// The validation fold of each example: its source's index, or row order mod 5 with one source.
fn folds(examples: &[Example]) -> Vec<usize> {
    let mut sources: Vec<&str> = examples.iter().map(|e| e.source.as_str()).collect();
    sources.sort_unstable();
    sources.dedup();
    if sources.len() > 1 {
        examples
            .iter()
            .map(|e| sources.iter().position(|s| *s == e.source).unwrap_or(0))
            .collect()
    } else {
        (0..examples.len()).map(|i| i % 5).collect()
    }
}

/// Fits a head on all `examples` and validates it out of source (leave one source out; with a
/// single source, five folds by row order). `l2` is the ridge penalty on standardised weights.
pub fn train(examples: &[Example], local_model: &str, l2: f64) -> Result<GuardHead, String> {
    if examples.len() < 20 {
        return Err(format!(
            "{} labeled answers with signals: at least 20 are needed",
            examples.len()
        ));
    }
    let positives = examples.iter().filter(|e| e.local >= 0.5).count();
    if positives == 0 || positives == examples.len() {
        return Err(format!(
            "all {} answers have the same grade: nothing to learn a confidence from",
            examples.len()
        ));
    }
    let mut sources: Vec<&str> = examples.iter().map(|e| e.source.as_str()).collect();
    sources.sort_unstable();
    sources.dedup();
    let held_out = held_out_confidence(examples, local_model, l2)?;
    let all: Vec<&Example> = examples.iter().collect();
    let mut head = fit(&all, local_model, l2)?;
    let local: Vec<f64> = examples.iter().map(|e| e.local).collect();
    let cloud: Vec<f64> = examples.iter().map(|e| e.cloud).collect();
    head.curve = curve(&held_out, &local, &cloud);
    let auc_of = |scores: &[f64]| {
        let rows: Vec<crate::router::evaluation::Outcome> = scores
            .iter()
            .zip(examples)
            .map(|(&p, e)| crate::router::evaluation::Outcome {
                p_local: p,
                local: e.local,
                cloud: e.cloud,
            })
            .collect();
        crate::router::evaluation::auc(&rows)
    };
    let rule: Vec<f64> = examples
        .iter()
        .map(|e| rule_confidence(&e.signals))
        .collect();
    let router: Option<Vec<f64>> = examples.iter().map(|e| e.p_local).collect();
    head.validation = Validation {
        n: examples.len(),
        sources: sources.len(),
        auc: auc_of(&held_out),
        rule_auc: auc_of(&rule),
        router_auc: router.as_deref().and_then(auc_of),
    };
    Ok(head)
}

/// Logistic regression by Newton's method with an L2 penalty on the standardised weights (not
/// the intercept): a 8x8 system per step, converged in a few steps, deterministic.
fn fit(examples: &[&Example], local_model: &str, l2: f64) -> Result<GuardHead, String> {
    let d = FEATURES.len();
    let xs: Vec<[f64; 7]> = examples
        .iter()
        .map(|e| features(&e.signals, e.p_local))
        .collect();
    let n = xs.len() as f64;
    let mut mean = vec![0.0; d];
    for x in &xs {
        for j in 0..d {
            mean[j] += x[j] / n;
        }
    }
    let mut scale = vec![0.0; d];
    for x in &xs {
        for j in 0..d {
            scale[j] += (x[j] - mean[j]).powi(2) / n;
        }
    }
    // A constant feature (e.g. no p_local in the rows) gets scale 1 and learns weight 0.
    let scale: Vec<f64> = scale
        .iter()
        .map(|v| if v.sqrt() > 1e-9 { v.sqrt() } else { 1.0 })
        .collect();
    let rows: Vec<Vec<f64>> = xs
        .iter()
        .map(|x| {
            std::iter::once(1.0)
                .chain((0..d).map(|j| (x[j] - mean[j]) / scale[j]))
                .collect()
        })
        .collect();
    let y: Vec<f64> = examples.iter().map(|e| e.local.clamp(0.0, 1.0)).collect();
    let mut w = vec![0.0; d + 1];
    for _ in 0..50 {
        let mut grad = vec![0.0; d + 1];
        let mut hess = vec![vec![0.0; d + 1]; d + 1];
        for (r, &t) in rows.iter().zip(&y) {
            let z: f64 = r.iter().zip(&w).map(|(a, b)| a * b).sum();
            let p = crate::router::model::sigmoid(z);
            let s = (p * (1.0 - p)).max(1e-12);
            for a in 0..=d {
                grad[a] += (p - t) * r[a];
                for b in 0..=d {
                    hess[a][b] += s * r[a] * r[b];
                }
            }
        }
        for a in 1..=d {
            grad[a] += l2 * w[a];
            hess[a][a] += l2;
        }
        let step = solve(hess, grad).ok_or("the guard head's Newton system is singular")?;
        let mut largest = 0f64;
        for (wi, si) in w.iter_mut().zip(&step) {
            *wi -= si;
            largest = largest.max(si.abs());
        }
        if largest < 1e-10 {
            break;
        }
    }
    if !w.iter().all(|v| v.is_finite()) {
        return Err("the guard head did not converge to finite weights".to_owned());
    }
    Ok(GuardHead {
        format: 1,
        local_model: local_model.to_owned(),
        features: FEATURES.iter().map(|s| (*s).to_owned()).collect(),
        mean,
        scale,
        weights: w[1..].to_vec(),
        bias: w[0],
        curve: Vec::new(),
        validation: Validation {
            n: examples.len(),
            sources: 0,
            auc: None,
            rule_auc: None,
            router_auc: None,
        },
    })
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (upper, lower) = a.split_at_mut(col + 1);
        let pivot_row = &upper[col];
        for (offset, row) in lower.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[col + 1 + offset] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signals(mean: f64) -> Signals {
        Signals {
            tokens: 10,
            mean,
            min: mean * 3.0,
            low_decile: mean * 2.0,
            first_mean: mean,
            truncated: false,
        }
    }

    #[test]
    fn curve_points_by_hand() {
        // Confidences 0.1 (wrong), 0.5 (right), 0.9 (right); cloud right on all.
        let c = curve(&[0.5, 0.1, 0.9], &[1.0, 0.0, 1.0], &[1.0, 1.0, 1.0]);
        let q: Vec<(f64, f64, f64)> = c
            .iter()
            .map(|p| (p.threshold, p.escalated, p.quality))
            .collect();
        assert_eq!(q[0], (0.0, 0.0, 2.0 / 3.0));
        assert_eq!(q[1], (0.5, 1.0 / 3.0, 1.0));
        assert_eq!(q[2], (0.9, 2.0 / 3.0, 1.0));
        assert_eq!((q[3].1, q[3].2), (1.0, 1.0));
        let head = GuardHead {
            format: 1,
            local_model: "m".into(),
            features: FEATURES.iter().map(|s| (*s).to_owned()).collect(),
            mean: vec![0.0; 7],
            scale: vec![1.0; 7],
            weights: vec![0.0; 7],
            bias: 0.0,
            curve: c,
            validation: Validation {
                n: 3,
                sources: 1,
                auc: None,
                rule_auc: None,
                router_auc: None,
            },
        };
        assert_eq!(head.threshold_for_quality_loss(0.0), 0.5);
        assert_eq!(head.threshold_for_quality_loss(0.5), 0.0);
        assert_eq!(head.threshold_for_escalation_share(0.5), 0.5);
        assert_eq!(head.threshold_for_escalation_share(0.0), 0.0);
    }

    #[test]
    fn a_head_learns_that_sure_answers_are_right_and_round_trips() {
        // Right answers are sure (mean ln P near 0), wrong ones unsure, with overlap.
        let examples: Vec<Example> = (0..200)
            .map(|i| {
                let right = i % 3 != 0;
                let noise = ((i * 37) % 17) as f64 / 17.0;
                let mean = if right { -0.2 - noise } else { -0.9 - noise };
                Example {
                    signals: signals(mean),
                    p_local: None,
                    local: f64::from(u8::from(right)),
                    cloud: 1.0,
                    source: if i % 2 == 0 { "a".into() } else { "b".into() },
                }
            })
            .collect();
        let head = train(&examples, "m", 1.0).unwrap();
        assert!(head.validation.auc.unwrap() > 0.8, "{:?}", head.validation);
        assert_eq!(head.validation.sources, 2);
        assert!(head.confidence(&signals(-0.1), None) > head.confidence(&signals(-1.5), None));
        let dir = tempfile::tempdir().unwrap();
        head.save(dir.path()).unwrap();
        assert_eq!(GuardHead::load(dir.path()).unwrap(), Some(head));
        assert_eq!(GuardHead::load(&dir.path().join("none")).unwrap(), None);
        std::fs::write(dir.path().join(GUARD_FILE), "{\"format\": 2}").unwrap();
        assert!(GuardHead::load(dir.path())
            .unwrap_err()
            .contains("guard.json"));
        let same: Vec<Example> = examples
            .iter()
            .map(|e| Example {
                local: 1.0,
                ..e.clone()
            })
            .collect();
        assert!(train(&same, "m", 1.0).unwrap_err().contains("same grade"));
    }
}
