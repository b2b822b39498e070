//! Training a router from labeled data in the shared schema, validated source by source.
//!
//! The head is an L2-regularised logistic regression on soft labels (a query half the small
//! models answer is a 0.5), fitted full-batch with Adam in a fixed order, so the same data gives
//! the same bytes on every run. Before the final fit, each source is held out in turn: the head
//! trained on the others scores it, which gives the per-source metrics, the Platt calibration
//! (fitted on those out-of-source logits, so p_local is honest about traffic unlike the training
//! data) and the validation curve that `max_quality_loss` reads.

use std::collections::BTreeMap;

use super::data::Example;
use super::evaluation::{self, Outcome};
use super::features::{self, Features, Query, DENSE_NAMES};
use super::fit::{fit, platt};
use super::model::{sigmoid, CurvePoint, RouterModel, SourceCount, SourceReport};

/// The pseudo-model name for "the mean correctness of the 7-9B-class models labeled in the row".
pub const SMALL_CLASS: &str = "8b-class";

/// Models averaged for [`SMALL_CLASS`]: the open 7-9B instruct/chat models of the shared data
/// (../shared/data/README.md lists which file labels which), plus Mixtral 8x7B, the only
/// non-frontier model RouteLLM's files label.
pub const SMALL_MODELS: [&str; 11] = [
    "mixtral-8x7b-instruct-v0.1",
    "meta-llama-3.1-8b-instruct",
    "llama-3.1-8b-instruct",
    "mistral-7b-instruct-v0.2",
    "mistral-7b-instruct-v0.3",
    "qwen1.5-7b-chat",
    "qwen2.5-7b-instruct",
    "gemma-7b",
    "gemma-2-9b-it",
    "phi-3-mini-4k-instruct",
    "yi-6b-chat",
];

/// The structure measures read by default: prompt length, digit share and operator share.
/// Within every shared source alone, longer prompts and prompts with more digits and operators
/// are answered less often by the 7-9B models (Spearman -0.08 to -0.22 for length, -0.01 to
/// -0.29 for the other two), so unlike source-typical measures (choice lines, LaTeX) they say
/// something about a kind of query never seen. With centred labels they raised the pooled
/// held-out APGR from 0.575 to 0.587 and share@1pt from 0.090 to 0.113 (router-models/README.md).
pub const DEFAULT_STRUCTURE: [&str; 3] = ["ln_chars", "digit_share", "operator_share"];

/// Training settings. The defaults were picked by leave-one-source-out validation on the shared
/// data, per source and pooled (router-models/README.md).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The router's name.
    pub name: String,
    /// Label preference: the first of these a row has is its local label ([`SMALL_CLASS`]
    /// allowed).
    pub local: Vec<String>,
    /// Cloud label preference; empty means each source's strongest labeled model.
    pub cloud: Vec<String>,
    /// Hash buckets (a power of two).
    pub buckets: u32,
    /// L2 penalty on the weights.
    pub l2: f64,
    /// Full-batch Adam steps.
    pub steps: usize,
    /// Adam step size.
    pub learning_rate: f64,
    /// The dense structure measures ([`DENSE_NAMES`]) the head reads; empty reads none.
    pub structure: Vec<String>,
    /// Train on labels with each source's mean replaced by the overall mean, so the head
    /// learns what makes a query harder than others *of its kind* rather than which source a
    /// query came from. A source's level says nothing about a source never seen.
    pub centre_sources: bool,
}

impl TrainOptions {
    /// Defaults for a router predicting `local`.
    pub fn new(name: &str, local: Vec<String>, cloud: Vec<String>) -> Self {
        Self {
            name: name.to_owned(),
            local,
            cloud,
            buckets: 1 << 16,
            l2: 1e-5,
            steps: 300,
            learning_rate: 0.05,
            structure: DEFAULT_STRUCTURE.iter().map(|s| (*s).to_owned()).collect(),
            centre_sources: true,
        }
    }
}

/// Which labels a row carries.
#[derive(Debug, Clone)]
pub struct Labels {
    local: Vec<String>,
    cloud: Vec<String>,
    /// Per source, the strongest model (used when `cloud` is empty).
    strongest: BTreeMap<String, String>,
}

impl Labels {
    /// Labels for `examples` under the given preferences.
    pub fn new(examples: &[Example], local: &[String], cloud: &[String]) -> Self {
        let mut totals: BTreeMap<&str, BTreeMap<&str, (f64, usize)>> = BTreeMap::new();
        let mut rows: BTreeMap<&str, usize> = BTreeMap::new();
        for e in examples {
            *rows.entry(&e.source).or_default() += 1;
            let source = totals.entry(&e.source).or_default();
            for (m, s) in &e.scores {
                let t = source.entry(m).or_default();
                t.0 += s;
                t.1 += 1;
            }
        }
        // The strongest model of a source: highest mean among models labeled on at least 90% of
        // its rows (a model scored on a sliver is no baseline).
        let strongest = totals
            .iter()
            .filter_map(|(source, models)| {
                let n = rows.get(source).copied().unwrap_or(0);
                models
                    .iter()
                    .filter(|(_, (_, c))| *c * 10 >= n * 9)
                    .max_by(|a, b| {
                        (a.1 .0 / a.1 .1 as f64)
                            .total_cmp(&(b.1 .0 / b.1 .1 as f64))
                            .then(b.0.cmp(a.0))
                    })
                    .map(|(m, _)| ((*source).to_owned(), (*m).to_owned()))
            })
            .collect();
        Self {
            local: local.to_vec(),
            cloud: cloud.to_vec(),
            strongest,
        }
    }

    /// The local label of a row.
    pub fn local(&self, e: &Example) -> Option<f64> {
        first_label(e, &self.local)
    }

    /// The cloud label of a row.
    pub fn cloud(&self, e: &Example) -> Option<f64> {
        if self.cloud.is_empty() {
            return e.scores.get(self.strongest.get(&e.source)?).copied();
        }
        first_label(e, &self.cloud)
    }

    /// What the cloud label is, for reports.
    pub fn cloud_description(&self) -> String {
        if self.cloud.is_empty() {
            let per: Vec<String> = self
                .strongest
                .iter()
                .map(|(s, m)| format!("{s}: {m}"))
                .collect();
            format!("strongest labeled model per source ({})", per.join("; "))
        } else {
            self.cloud.join(" | ")
        }
    }
}

fn first_label(e: &Example, names: &[String]) -> Option<f64> {
    names.iter().find_map(|name| {
        if name == SMALL_CLASS {
            let s: Vec<f64> = SMALL_MODELS
                .iter()
                .filter_map(|m| e.scores.get(*m).copied())
                .collect();
            (!s.is_empty()).then(|| s.iter().sum::<f64>() / s.len() as f64)
        } else {
            e.scores.get(name).copied()
        }
    })
}

/// A trained router and how it validated.
pub struct Trained {
    /// The router, ready to save.
    pub model: RouterModel,
    /// The cloud label used in validation, described.
    pub cloud: String,
}

/// How far a training run is: `done` of `total` fits (one per held-out group, then the final
/// fit on every row), and what is happening now.
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    /// Fits finished.
    pub done: usize,
    /// Fits in the whole run.
    pub total: usize,
    /// What is happening now.
    pub what: &'a str,
}

/// Trains on `examples`. `progress` hears of each fit as it starts and once when all are done.
pub fn train(
    examples: &[Example],
    options: &TrainOptions,
    progress: &mut dyn FnMut(Step<'_>),
) -> Result<Trained, String> {
    if !options.buckets.is_power_of_two() || options.buckets < 16 {
        return Err(format!(
            "buckets {} must be a power of two >= 16",
            options.buckets
        ));
    }
    if options.local.is_empty() {
        return Err("name at least one local model".to_owned());
    }
    for name in &options.structure {
        if !DENSE_NAMES.contains(&name.as_str()) {
            return Err(format!(
                "unknown structure feature {name:?}; known: {}",
                DENSE_NAMES.join(", ")
            ));
        }
    }
    let labels = Labels::new(examples, &options.local, &options.cloud);
    let rows: Vec<(&Example, f64)> = examples
        .iter()
        .filter_map(|e| Some((e, labels.local(e)?)))
        .collect();
    if rows.len() < 20 {
        return Err(format!(
            "only {} rows carry a label for {}; need at least 20",
            rows.len(),
            options.local.join(" | ")
        ));
    }
    let features: Vec<Features> = rows
        .iter()
        .map(|(e, _)| features::extract(&Query::from_prompt(&e.prompt), options.buckets))
        .collect();
    let y: Vec<f64> = rows.iter().map(|(_, y)| *y).collect();
    let mut sources: BTreeMap<&str, usize> = BTreeMap::new();
    for (e, _) in &rows {
        *sources.entry(&e.source).or_default() += 1;
    }
    // The labels the head is fitted to; calibration and validation use the raw `y`.
    let y_fit = if options.centre_sources {
        centred_by_source(&rows)
    } else {
        y.clone()
    };

    // Leave one source out: logits for each held-out row from a head that never saw its source.
    // With a single source there is nothing to hold out by source, so validation uses five
    // interleaved folds of its rows instead (named `fold N` in the report).
    let group: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, (e, _))| {
            if sources.len() > 1 {
                e.source.clone()
            } else {
                format!("fold {}", i % 5)
            }
        })
        .collect();
    let mut groups: Vec<&str> = group.iter().map(String::as_str).collect();
    groups.sort_unstable();
    groups.dedup();
    let total = groups.len() + 1;
    if sources.len() == 1 {
        progress(Step {
            done: 0,
            total,
            what: "one source only: validating on 5 folds of its rows instead of held-out sources",
        });
    }
    let mut held_out: Vec<(usize, f64)> = Vec::new();
    let mut held_sources: Vec<&str> = Vec::new();
    for (done, held) in groups.iter().enumerate() {
        progress(Step {
            done,
            total,
            what: &format!("holding out {held}"),
        });
        let train: Vec<usize> = (0..rows.len()).filter(|&i| group[i] != *held).collect();
        let head = fit(&features, &y_fit, &train, options);
        for i in (0..rows.len()).filter(|&i| group[i] == *held) {
            held_out.push((i, head.logit(&features[i])));
        }
        held_sources.push(held);
    }
    progress(Step {
        done: groups.len(),
        total,
        what: "final fit on all rows",
    });
    let all: Vec<usize> = (0..rows.len()).collect();
    let mut model = fit(&features, &y_fit, &all, options);
    let calibration = platt(&held_out.iter().map(|&(i, z)| (z, y[i])).collect::<Vec<_>>());
    let p = |z: f64| sigmoid(calibration.a * z + calibration.b);

    let mut validation = Vec::new();
    let mut pooled = Vec::new();
    for source in &held_sources {
        let outcomes: Vec<Outcome> = held_out
            .iter()
            .filter(|(i, _)| group[*i] == *source)
            .filter_map(|&(i, z)| {
                Some(Outcome {
                    p_local: p(z),
                    local: y[i],
                    cloud: labels.cloud(rows[i].0)?,
                })
            })
            .collect();
        if let Ok(report) = evaluation::evaluate(&outcomes) {
            validation.push(SourceReport {
                source: (*source).to_owned(),
                report,
            });
        }
        pooled.extend(outcomes);
    }

    // Score quantiles for `target_local_share`, from held-out predictions: in-sample scores
    // of the final fit are more extreme than what new traffic will get.
    let mut held_p: Vec<f64> = held_out.iter().map(|&(_, z)| p(z)).collect();
    held_p.sort_by(|a, b| b.total_cmp(a));
    model.meta.share_thresholds = share_thresholds(&held_p);
    model.meta.curve = validation_curve(&pooled);
    model.meta.pooled = if held_sources.len() > 1 {
        evaluation::evaluate(&pooled).ok()
    } else {
        None
    };
    model.meta.calibration = calibration;
    model.meta.validation = validation;
    model.meta.trained_on = sources
        .iter()
        .map(|(s, n)| SourceCount {
            source: (*s).to_owned(),
            rows: *n,
        })
        .collect();
    progress(Step {
        done: total,
        total,
        what: "trained",
    });
    Ok(Trained {
        model,
        cloud: labels.cloud_description(),
    })
}

/// Each row's label moved by the difference between the overall mean and its source's mean,
/// clamped to [0, 1].
fn centred_by_source(rows: &[(&Example, f64)]) -> Vec<f64> {
    let mut per: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for (e, y) in rows {
        let entry = per.entry(e.source.as_str()).or_default();
        entry.0 += y;
        entry.1 += 1;
    }
    let overall = rows.iter().map(|(_, y)| y).sum::<f64>() / rows.len().max(1) as f64;
    rows.iter()
        .map(|(e, y)| {
            let (sum, n) = per.get(e.source.as_str()).copied().unwrap_or((0.0, 1));
            (y - sum / n as f64 + overall).clamp(0.0, 1.0)
        })
        .collect()
}

/// `t[k]`: the p above which `k`% of `sorted_desc` lies (101 entries, non-increasing).
fn share_thresholds(sorted_desc: &[f64]) -> Vec<f64> {
    let n = sorted_desc.len();
    (0..=100)
        .map(|k| {
            if k == 0 || n == 0 {
                return 1.0;
            }
            let m = (k * n).div_ceil(100).max(1);
            sorted_desc[m - 1]
        })
        .collect()
}

/// Quality loss against cloud-only at each whole-percent local share of `outcomes`.
fn validation_curve(outcomes: &[Outcome]) -> Vec<CurvePoint> {
    let mut sorted: Vec<&Outcome> = outcomes.iter().collect();
    sorted.sort_by(|a, b| b.p_local.total_cmp(&a.p_local));
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let mut prefix = vec![0.0f64; n + 1];
    for (i, o) in sorted.iter().enumerate() {
        prefix[i + 1] = prefix[i] + (o.local - o.cloud);
    }
    (0..=100)
        .map(|k| {
            let m = (k * n).div_ceil(100);
            let threshold = if m == 0 { 1.0 } else { sorted[m - 1].p_local };
            CurvePoint {
                threshold,
                local_share: m as f64 / n as f64,
                quality_loss: -prefix[m] / n as f64,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(id: usize, source: &str, prompt: &str, scores: &[(&str, f64)]) -> Example {
        Example {
            id: id.to_string(),
            source: source.to_owned(),
            category: None,
            prompt: prompt.to_owned(),
            scores: scores.iter().map(|(m, s)| ((*m).to_owned(), *s)).collect(),
        }
    }

    #[test]
    fn labels_take_the_first_present_name_and_the_small_class_mean() {
        let e = example(
            0,
            "s",
            "p",
            &[
                ("gemma-2-9b-it", 1.0),
                ("qwen2.5-7b-instruct", 0.0),
                ("big", 1.0),
            ],
        );
        let l = Labels::new(
            std::slice::from_ref(&e),
            &["absent".into(), SMALL_CLASS.into()],
            &[],
        );
        assert_eq!(l.local(&e), Some(0.5));
        assert_eq!(l.cloud(&e), Some(1.0));
    }

    #[test]
    fn centring_moves_each_source_to_the_overall_mean_and_keeps_its_order() {
        let a = example(0, "a", "p", &[]);
        let b = example(1, "b", "p", &[]);
        // Source a: mean 0.8; source b: mean 0.2; overall 0.5.
        let rows = vec![(&a, 0.6), (&a, 1.0), (&b, 0.0), (&b, 0.4)];
        let c = centred_by_source(&rows);
        let want = [0.3, 0.7, 0.3, 0.7];
        for (got, want) in c.iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{c:?}");
        }
        // Clamped to [0, 1] where a shift would leave it.
        let rows = vec![(&a, 1.0), (&b, 0.0), (&b, 0.0), (&b, 1.0)];
        assert!(centred_by_source(&rows)
            .iter()
            .all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn an_unknown_structure_measure_is_refused_by_name() {
        let rows: Vec<Example> = (0..30)
            .map(|i| example(i, "s", "q", &[(SMALL_CLASS, 1.0), ("gemma-2-9b-it", 1.0)]))
            .collect();
        let mut o = TrainOptions::new("t", vec!["gemma-2-9b-it".into()], Vec::new());
        o.structure = vec!["ln_chars".into(), "lenght".into()];
        let err = train(&rows, &o, &mut |_| {}).map(|_| ()).unwrap_err();
        assert!(
            err.contains("\"lenght\"") && err.contains("ln_chars"),
            "{err}"
        );
    }

    #[test]
    fn platt_recovers_a_known_scaling() {
        // Labels drawn exactly from sigmoid(2 z - 1) as soft targets, many of them so the
        // smoothing pseudo-observations barely pull.
        let pts: Vec<(f64, f64)> = (-20_000..=20_000)
            .map(|i| {
                let z = f64::from(i) / 5_000.0;
                (z, sigmoid(2.0 * z - 1.0))
            })
            .collect();
        let c = platt(&pts);
        assert!(
            (c.a - 2.0).abs() < 1e-3 && (c.b + 1.0).abs() < 1e-3,
            "{c:?}"
        );
        // Perfectly separated held-out logits still give a finite slope and p below 1.
        let separable: Vec<(f64, f64)> = (0..80)
            .map(|i| (if i % 2 == 0 { 3.0 } else { -3.0 }, f64::from(i % 2 == 0)))
            .collect();
        let c = platt(&separable);
        let top = sigmoid(c.a * 3.0 + c.b);
        assert!(c.a.is_finite() && top < 0.99 && top > 0.9, "{c:?} {top}");
    }

    #[test]
    fn thresholds_and_curve_are_monotone_and_exact_on_small_sets() {
        let t = share_thresholds(&[0.9, 0.8, 0.7, 0.6]);
        assert_eq!((t[0], t[25], t[50], t[100]), (1.0, 0.9, 0.8, 0.6));
        let o = |p, local, cloud| Outcome {
            p_local: p,
            local,
            cloud,
        };
        let curve = validation_curve(&[o(0.9, 1.0, 1.0), o(0.1, 0.0, 1.0)]);
        assert_eq!(curve[50].quality_loss, 0.0);
        assert_eq!(curve[100].quality_loss, 0.5);
    }
}
