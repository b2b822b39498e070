//! Training a router from labeled data in the shared schema, validated by nested
//! leave-one-source-out.
//!
//! The head is an L2-regularised logistic regression on soft labels (a query half the small
//! models answer is a 0.5), fitted full-batch with Adam in a fixed order, so the same data gives
//! the same bytes on every run. Every setting that is chosen (label centring, structure
//! measures, penalty: a [`Choice`]) is chosen on inner folds only, and each source is scored
//! once by a head that never saw it nor chose anything on it: those outer numbers are what the
//! router records and its card reports. A single level of leave-one-source-out, used both to
//! pick settings and to report them, overstated how the shipped routers did on kinds of traffic
//! no file here holds (measured outside this repository, below a plain TF-IDF baseline).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use super::data::Example;
use super::evaluation::{self, Outcome};
use super::features::{self, Features, DENSE_NAMES};
use super::fit::{fit, platt};
use super::model::{sigmoid, Calibration, CurvePoint, RouterModel, SourceCount, SourceReport};

/// The pseudo-model name for "the mean correctness of the 7-9B-class models labeled in the row".
pub const SMALL_CLASS: &str = "8b-class";

/// Models averaged for [`SMALL_CLASS`]: the open 7-9B instruct/chat models of the shared data
/// (../shared/data/README.md lists which file labels which), plus Mixtral 8x7B, the only
/// non-frontier model RouteLLM's files label.
pub const SMALL_MODELS: [&str; 14] = [
    "mixtral-8x7b-instruct-v0.1",
    "mistral-7b-instruct-v0.1",
    "openchat_3.5",
    "starling-lm-7b-alpha",
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

/// The structure measures validation may add: prompt length, digit share and operator share.
/// Within every shared source alone, longer prompts and prompts with more digits and operators
/// are answered less often by the 7-9B models (Spearman -0.08 to -0.22 for length, -0.01 to
/// -0.29 for the other two), so unlike source-typical measures (choice lines, LaTeX) they may
/// say something about a kind of query never seen. Whether they are read is a [`Choice`].
pub const DEFAULT_STRUCTURE: [&str; 3] = ["ln_chars", "digit_share", "operator_share"];

/// One setting of every choice validation makes. Each is picked on inner folds only (see
/// [`train`]), never on the numbers a router reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// Train on labels with each source's mean moved to [`CENTRE_LEVEL`], so the head learns
    /// what makes a query harder than others *of its kind* rather than which source a query
    /// came from. A source's level says nothing about a source never seen.
    pub centre_sources: bool,
    /// The dense structure measures ([`DENSE_NAMES`]) the head reads; empty reads none.
    pub structure: Vec<String>,
    /// L2 penalty on the weights.
    pub l2: f64,
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let structure = if self.structure.is_empty() {
            "none".to_owned()
        } else {
            self.structure.join(",")
        };
        write!(
            f,
            "{} labels, structure {structure}, l2 {:e}",
            if self.centre_sources {
                "centred"
            } else {
                "raw"
            },
            self.l2
        )
    }
}

/// The candidates [`TrainOptions::new`] offers validation: labels centred or not, and the
/// [`DEFAULT_STRUCTURE`] measures or none, at [`DEFAULT_L2`], in a fixed order (ties go to the
/// first).
pub fn default_choices() -> Vec<Choice> {
    grid(&[true, false], &default_structures(), &DEFAULT_L2)
}

/// The structure options validation chooses between by default: [`DEFAULT_STRUCTURE`], none.
pub fn default_structures() -> Vec<Vec<String>> {
    vec![
        DEFAULT_STRUCTURE.iter().map(|s| (*s).to_owned()).collect(),
        Vec::new(),
    ]
}

/// Every combination of the options, centring outermost and the penalty innermost (the order
/// is part of the result: ties go to the earlier candidate).
pub fn grid(centring: &[bool], structures: &[Vec<String>], l2: &[f64]) -> Vec<Choice> {
    let mut out = Vec::new();
    for &centre_sources in centring {
        for structure in structures {
            for &l2 in l2 {
                out.push(Choice {
                    centre_sources,
                    structure: structure.clone(),
                    l2,
                });
            }
        }
    }
    out
}

/// The penalty [`default_choices`] uses: the one the routers shipped with before validation was
/// nested, fixed rather than chosen (each candidate multiplies the fits: 6 sources and 4
/// candidates are 151 fits, about 3 minutes on 2 cores). Give `--l2 a,b,...` to let the inner
/// folds choose among several.
pub const DEFAULT_L2: [f64; 1] = [1e-5];

/// Training settings.
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
    /// Full-batch Adam steps.
    pub steps: usize,
    /// Adam step size.
    pub learning_rate: f64,
    /// The candidates validation chooses among (at least one).
    pub choices: Vec<Choice>,
    /// Threads fitting candidates and folds side by side (results do not depend on it).
    pub threads: usize,
    /// The own-traffic study: this many rows of each outer held-out source join its training
    /// (as an operator's own labeled traffic would) and the rest of the source is scored. A
    /// source without 50 rows left to score is left out of the report. 0: plain validation.
    pub own_rows: usize,
    /// The study's own rows count this much each in the fit (1: like any other row).
    pub own_weight: f64,
}

impl TrainOptions {
    /// Defaults for a router predicting `local`.
    pub fn new(name: &str, local: Vec<String>, cloud: Vec<String>) -> Self {
        Self {
            name: name.to_owned(),
            local,
            cloud,
            buckets: 1 << 16,
            steps: 300,
            learning_rate: 0.05,
            choices: default_choices(),
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            own_rows: 0,
            own_weight: 1.0,
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

/// How far a training run is: `done` of `total` fits (the inner and outer fits of every outer
/// group, the selection for the shipped head, its final fit), and what is happening now.
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    /// Fits finished.
    pub done: usize,
    /// Fits in the whole run.
    pub total: usize,
    /// What is happening now.
    pub what: &'a str,
}

/// Trains on `examples` under nested leave-one-source-out validation.
///
/// Outer loop: each source is held out once. On the other sources alone, every candidate
/// [`Choice`] is scored by an inner leave-one-source-out (a head per inner source, trained on
/// the rest); the best candidate is fitted on all of them and scores the outer source once,
/// calibrated by the Platt fit of its inner held-out logits. Those outer predictions are the
/// only numbers reported (`validation`, `pooled`), so no choice was made on what they measure.
/// The shipped head then repeats the inner step on every source: the candidate that wins
/// leave-one-source-out over all of them is fitted on all rows, and its held-out logits give
/// the calibration, share thresholds and validation curve.
///
/// With fewer than three sources there is no inner source to hold out, so the groups are five
/// interleaved folds of the rows instead (named `fold N`; the report then says so).
/// `progress` hears of each fit as it starts and once when all are done.
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
    if options.choices.is_empty() {
        return Err("give validation at least one candidate to choose".to_owned());
    }
    for choice in &options.choices {
        for name in &choice.structure {
            if !DENSE_NAMES.contains(&name.as_str()) {
                return Err(format!(
                    "unknown structure feature {name:?}; known: {}",
                    DENSE_NAMES.join(", ")
                ));
            }
        }
        if !(choice.l2.is_finite() && choice.l2 >= 0.0) {
            return Err(format!(
                "l2 penalty {} must be a finite number >= 0",
                choice.l2
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
    let mut sources: BTreeMap<&str, usize> = BTreeMap::new();
    for (e, _) in &rows {
        *sources.entry(&e.source).or_default() += 1;
    }
    let by_source = sources.len() >= 3;
    let ctx = Context {
        features: std::sync::Arc::new(
            rows.iter()
                .map(|(e, _)| features::extract(&e.query(), options.buckets))
                .collect(),
        ),
        y: rows.iter().map(|(_, y)| *y).collect(),
        weight: rows.iter().map(|(e, _)| e.weight).collect(),
        cloud: rows.iter().map(|(e, _)| labels.cloud(e)).collect(),
        source: rows.iter().map(|(e, _)| e.source.as_str()).collect(),
        group: rows
            .iter()
            .enumerate()
            .map(|(i, (e, _))| {
                if by_source {
                    e.source.clone()
                } else {
                    format!("fold {}", i % 5)
                }
            })
            .collect(),
        options,
    };
    let all: Vec<usize> = (0..rows.len()).collect();
    let groups = ctx.groups(&all);
    let c = options.choices.len();
    // Per outer group: (groups - 1) inner folds per candidate (none with a single candidate:
    // nothing to choose) and one fit; then every group per candidate for the shipped head
    // (its held-out logits give the calibration), and its final fit. The own-traffic study
    // adds the own rows as one more inner group.
    let inner_groups = groups.len() - usize::from(options.own_rows == 0);
    let inner_fits = if c == 1 { 0 } else { inner_groups * c };
    let total = groups.len() * (inner_fits + 1) + groups.len() * c + 1;
    let mut done = 0usize;
    if !by_source {
        progress(Step {
            done,
            total,
            what: "fewer than 3 sources: validating on 5 folds of the rows instead of held-out sources",
        });
    }

    // Outer loop: each group scored once, by a head whose every choice was made without it.
    let mut outer: Vec<Outcome> = Vec::new();
    let mut validation = Vec::new();
    let mut outer_choices = Vec::new();
    for held in &groups {
        progress(Step {
            done,
            total,
            what: &format!("outer: holding out {held}"),
        });
        let held_rows: Vec<usize> = all
            .iter()
            .copied()
            .filter(|&i| ctx.group[i] == *held)
            .collect();
        let k = options.own_rows;
        if k > 0 && held_rows.len() < k + MIN_SCORED {
            done += inner_fits + 1;
            continue;
        }
        // Own rows, spread evenly over the source; they join training as one more inner group.
        let own: Vec<usize> = (0..k).map(|j| held_rows[j * held_rows.len() / k]).collect();
        let mut rest: Vec<usize> = all
            .iter()
            .copied()
            .filter(|&i| ctx.group[i] != *held)
            .chain(own.iter().copied())
            .collect();
        rest.sort_unstable();
        // This fold's own rows carry the study's weight (everywhere else, their own).
        let mut fold = ctx.clone();
        for &i in &own {
            fold.weight[i] = options.own_weight;
        }
        let (index, inner_score) = if c == 1 {
            (0, None)
        } else {
            let selected = fold.select(&rest);
            (selected.index, Some(selected.score))
        };
        let head = fold.fit(&rest, &options.choices[index]);
        done += inner_fits + 1;
        // The head's own scale, not a calibration: a Platt fit per outer fold would move each
        // held-out source by the base rate of the *other* sources (a big easy source held out
        // leaves a hard remainder, so it would come out low), and the pooled numbers would
        // measure that artefact. One scale for every head ranks what they learned.
        let p = sigmoid;
        let outcomes: Vec<Outcome> = held_rows
            .iter()
            .copied()
            .filter(|i| own.binary_search(i).is_err())
            .filter_map(|i| {
                Some(Outcome {
                    p_local: p(head.logit(&ctx.features[i])),
                    local: ctx.y[i],
                    cloud: ctx.cloud[i]?,
                })
            })
            .collect();
        if let Ok(report) = evaluation::evaluate(&outcomes) {
            validation.push(SourceReport {
                source: held.clone(),
                report,
            });
        }
        outer_choices.push(OuterChoice {
            source: held.clone(),
            choice: options.choices[index].clone(),
            inner_score,
        });
        outer.extend(outcomes);
    }

    // The shipped head: the same selection on every group, then one fit on all rows.
    progress(Step {
        done,
        total,
        what: "choosing on all groups",
    });
    let selected = ctx.select(&all);
    done += groups.len() * c;
    progress(Step {
        done,
        total,
        what: "final fit on all rows",
    });
    let chosen = options.choices[selected.index].clone();
    let mut model = ctx.fit(&all, &chosen);
    let calibration = selected.calibration;
    let p = |z: f64| sigmoid(calibration.a * z + calibration.b);
    let held: Vec<Outcome> = selected
        .held_out
        .iter()
        .filter_map(|&(i, z)| {
            Some(Outcome {
                p_local: p(z),
                local: ctx.y[i],
                cloud: ctx.cloud[i]?,
            })
        })
        .collect();
    // Score quantiles for `target_local_share`, from held-out predictions: in-sample scores
    // of the final fit are more extreme than what new traffic will get.
    let mut held_p: Vec<f64> = selected.held_out.iter().map(|&(_, z)| p(z)).collect();
    held_p.sort_by(|a, b| b.total_cmp(a));
    model.meta.share_thresholds = share_thresholds(&held_p);
    model.meta.curve = validation_curve(&held);
    model.meta.pooled = if by_source {
        evaluation::evaluate(&outer).ok()
    } else {
        None
    };
    model.meta.calibration = calibration;
    model.meta.validation = validation;
    model.meta.selection = Some(Selection {
        protocol: if by_source {
            "nested leave-one-source-out".to_owned()
        } else {
            "nested 5-fold (fewer than 3 sources)".to_owned()
        },
        candidates: options.choices.clone(),
        chosen,
        inner_score: selected.score,
        outer: outer_choices,
        own_rows: options.own_rows,
        // Recorded only for the study it applies to, so a plain training's file is unchanged.
        own_weight: if options.own_rows > 0 {
            options.own_weight
        } else {
            1.0
        },
    });
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

/// What one outer fold chose on its inner folds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OuterChoice {
    /// The outer held-out group.
    pub source: String,
    /// The candidate its inner folds chose.
    pub choice: Choice,
    /// That candidate's score on the inner folds (the mean of the four measures [`train`]
    /// selects by); absent with a single candidate, where nothing was chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner_score: Option<f64>,
}

/// How a router's settings were chosen, recorded in `router.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// The validation protocol.
    pub protocol: String,
    /// Every candidate considered.
    pub candidates: Vec<Choice>,
    /// The candidate the shipped head uses (chosen on all groups).
    pub chosen: Choice,
    /// Its score there.
    pub inner_score: f64,
    /// What each outer fold chose without seeing its held-out group.
    pub outer: Vec<OuterChoice>,
    /// Rows of each outer source that joined its training ([`TrainOptions::own_rows`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub own_rows: usize,
    /// The weight of each of those rows ([`TrainOptions::own_weight`]).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub own_weight: f64,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn one() -> f64 {
    1.0
}

fn is_one(w: &f64) -> bool {
    *w == 1.0
}

/// Rows an outer source must have left to score in the own-traffic study.
pub const MIN_SCORED: usize = 50;

/// Everything the fits share: one entry per labeled row.
#[derive(Clone)]
struct Context<'a> {
    features: std::sync::Arc<Vec<Features>>,
    y: Vec<f64>,
    /// Each row's weight in the loss ([`Example::weight`]).
    weight: Vec<f64>,
    cloud: Vec<Option<f64>>,
    source: Vec<&'a str>,
    group: Vec<String>,
    options: &'a TrainOptions,
}

/// The winner of a selection.
struct Selected {
    /// Index into the candidates.
    index: usize,
    /// Platt calibration of its held-out logits.
    calibration: Calibration,
    /// Its held-out logits, `(row, z)`.
    held_out: Vec<(usize, f64)>,
    /// The mean of its per-group mean AUC, per-group mean APGR, pooled AUC and pooled APGR:
    /// the four numbers a router's acceptance reads, weighted alike.
    score: f64,
}

impl Context<'_> {
    /// The groups among `rows`, sorted.
    fn groups(&self, rows: &[usize]) -> Vec<String> {
        let mut g: Vec<String> = rows.iter().map(|&i| self.group[i].clone()).collect();
        g.sort_unstable();
        g.dedup();
        g
    }

    /// A head fitted on `train` under `choice`; centring reads the training rows only.
    fn fit(&self, train: &[usize], choice: &Choice) -> RouterModel {
        let y_fit = if choice.centre_sources {
            centred_by_source(&self.source, &self.y, train)
        } else {
            self.y.clone()
        };
        fit(
            &self.features,
            &y_fit,
            &self.weight,
            train,
            self.options,
            choice,
        )
    }

    /// Leave-one-group-out over `rows` for every candidate (the fits side by side on
    /// `threads`), and the candidate that scores best; ties go to the earlier one.
    fn select(&self, rows: &[usize]) -> Selected {
        let groups = self.groups(rows);
        let tasks: Vec<(usize, &String)> = (0..self.options.choices.len())
            .flat_map(|c| groups.iter().map(move |g| (c, g)))
            .collect();
        let logits = parallel_map(&tasks, self.options.threads, |&(c, held)| {
            let train: Vec<usize> = rows
                .iter()
                .copied()
                .filter(|&i| self.group[i] != *held)
                .collect();
            let head = self.fit(&train, &self.options.choices[c]);
            rows.iter()
                .copied()
                .filter(|&i| self.group[i] == *held)
                .map(|i| (i, head.logit(&self.features[i])))
                .collect::<Vec<_>>()
        });
        let mut best: Option<Selected> = None;
        for c in 0..self.options.choices.len() {
            let held_out: Vec<(usize, f64)> = tasks
                .iter()
                .zip(&logits)
                .filter(|((tc, _), _)| *tc == c)
                .flat_map(|(_, l)| l.iter().copied())
                .collect();
            let calibration = platt(
                &held_out
                    .iter()
                    .map(|&(i, z)| (z, self.y[i]))
                    .collect::<Vec<_>>(),
            );
            let score = self.score(&held_out);
            if best.as_ref().is_none_or(|b| score > b.score) {
                best = Some(Selected {
                    index: c,
                    calibration,
                    held_out,
                    score,
                });
            }
        }
        best.unwrap_or(Selected {
            index: 0,
            calibration: Calibration { a: 1.0, b: 0.0 },
            held_out: Vec::new(),
            score: f64::NEG_INFINITY,
        })
    }

    /// See [`Selected::score`]; a measure no group can give (one label only) is left out.
    /// Logits are ranked on the heads' own scale, as the outer report does.
    fn score(&self, held_out: &[(usize, f64)]) -> f64 {
        let mut by_group: BTreeMap<&str, Vec<Outcome>> = BTreeMap::new();
        for &(i, z) in held_out {
            if let Some(cloud) = self.cloud[i] {
                by_group
                    .entry(self.group[i].as_str())
                    .or_default()
                    .push(Outcome {
                        p_local: sigmoid(z),
                        local: self.y[i],
                        cloud,
                    });
            }
        }
        let mean = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        let reports: Vec<_> = by_group
            .values()
            .filter_map(|o| evaluation::evaluate(o).ok())
            .collect();
        let pooled: Vec<Outcome> = by_group.into_values().flatten().collect();
        let pooled = evaluation::evaluate(&pooled).ok();
        let parts = [
            mean(reports.iter().filter_map(|r| r.auc).collect()),
            mean(reports.iter().filter_map(|r| r.apgr).collect()),
            pooled.as_ref().and_then(|r| r.auc),
            pooled.as_ref().and_then(|r| r.apgr),
        ];
        mean(parts.iter().flatten().copied().collect()).unwrap_or(f64::NEG_INFINITY)
    }
}

/// `f` over `items` on up to `threads` threads, results in the items' order.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return items.iter().map(&f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut out: Vec<(usize, R)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(k) else { break };
                        mine.push((k, f(item)));
                    }
                    mine
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    out.sort_by_key(|(k, _)| *k);
    out.into_iter().map(|(_, r)| r).collect()
}

/// The level every source's mean label is moved to when labels are centred. A constant, not the
/// training rows' mean: that mean depends on which sources are in training, so heads fitted
/// without an easy source would start lower, and an unseen source would inherit the level of
/// the others.
pub const CENTRE_LEVEL: f64 = 0.5;

/// Each training row's label moved by [`CENTRE_LEVEL`] minus its source's mean among the
/// training rows, clamped to [0, 1]; rows outside `train` keep theirs.
fn centred_by_source(source: &[&str], y: &[f64], train: &[usize]) -> Vec<f64> {
    let mut per: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for &i in train {
        let entry = per.entry(source[i]).or_default();
        entry.0 += y[i];
        entry.1 += 1;
    }
    let mut out = y.to_vec();
    for &i in train {
        let (sum, n) = per.get(source[i]).copied().unwrap_or((0.0, 1));
        out[i] = (y[i] - sum / n as f64 + CENTRE_LEVEL).clamp(0.0, 1.0);
    }
    out
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
    use crate::router::model::RouterMeta;

    fn example(id: usize, source: &str, prompt: &str, scores: &[(&str, f64)]) -> Example {
        Example {
            id: id.to_string(),
            source: source.to_owned(),
            category: None,
            prompt: prompt.to_owned(),
            scores: scores.iter().map(|(m, s)| ((*m).to_owned(), *s)).collect(),
            messages: None,
            weight: 1.0,
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
    fn centring_moves_each_training_source_to_one_level_and_keeps_its_order() {
        // Source a: mean 0.9; source b: mean 0.2; both move to 0.5. The fifth row is not
        // trained on: it neither moves the means nor is moved.
        let source = ["a", "a", "b", "b", "b"];
        let y = [0.8, 1.0, 0.0, 0.4, 1.0];
        let c = centred_by_source(&source, &y, &[0, 1, 2, 3]);
        let want = [0.4, 0.6, 0.3, 0.7, 1.0];
        for (got, want) in c.iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{c:?}");
        }
        // Clamped to [0, 1] where a shift would leave it.
        let c = centred_by_source(&["a", "b", "b", "b"], &[1.0, 0.0, 0.0, 1.0], &[0, 1, 2, 3]);
        assert!(c.iter().all(|v| (0.0..=1.0).contains(v)), "{c:?}");
    }

    /// Three sources whose labels follow one word ("hard"), plus noise words; `flip` inverts
    /// the labels of source `c` only.
    fn three_sources(flip: bool) -> Vec<Example> {
        (0..90)
            .map(|i| {
                let source = ["a", "b", "c"][i % 3];
                let hard = (i / 3) % 2 == 0;
                let mut y = if hard { 0.0 } else { 1.0 };
                if flip && source == "c" {
                    y = 1.0 - y;
                }
                let prompt = format!(
                    "{} question {} about topic{}",
                    if hard { "hard" } else { "easy" },
                    i,
                    i % 7
                );
                example(i, source, &prompt, &[("small", y), ("big", 1.0)])
            })
            .collect()
    }

    #[test]
    fn an_outer_fold_chooses_without_its_held_out_source() {
        let mut o = TrainOptions::new("t", vec!["small".into()], vec!["big".into()]);
        o.buckets = 1 << 10;
        o.choices = vec![
            Choice {
                centre_sources: true,
                structure: Vec::new(),
                l2: 1e-5,
            },
            Choice {
                centre_sources: false,
                structure: DEFAULT_STRUCTURE.iter().map(|s| (*s).to_owned()).collect(),
                l2: 1.0,
            },
        ];
        let run = |flip| {
            train(&three_sources(flip), &o, &mut |_| {})
                .unwrap_or_else(|e| panic!("{e}"))
                .model
                .meta
        };
        let (plain, flipped) = (run(false), run(true));
        let outer_c = |m: &RouterMeta| {
            let sel = m
                .selection
                .clone()
                .unwrap_or_else(|| panic!("no selection"));
            sel.outer
                .into_iter()
                .find(|o| o.source == "c")
                .unwrap_or_else(|| panic!("no outer fold c"))
        };
        // What fold c chose, and on what score, cannot depend on c's labels...
        assert_eq!(outer_c(&plain), outer_c(&flipped));
        // ...though c's own outer numbers do (they are measured on them), and so does every
        // choice that had c among its inner folds.
        let auc_c = |m: &RouterMeta| {
            m.validation
                .iter()
                .find(|v| v.source == "c")
                .and_then(|v| v.report.auc)
        };
        assert_ne!(auc_c(&plain), auc_c(&flipped));
        let shipped = |m: &RouterMeta| m.selection.as_ref().map(|s| s.inner_score);
        assert_ne!(shipped(&plain), shipped(&flipped));
        // The word that decides the label is learned: c held out, scored by a and b only.
        assert!(auc_c(&plain).unwrap_or(0.0) > 0.9, "{:?}", auc_c(&plain));
        assert_eq!(plain.selection.map(|s| s.outer.len()), Some(3));
    }

    #[test]
    fn an_unknown_structure_measure_is_refused_by_name() {
        let rows: Vec<Example> = (0..30)
            .map(|i| example(i, "s", "q", &[(SMALL_CLASS, 1.0), ("gemma-2-9b-it", 1.0)]))
            .collect();
        let mut o = TrainOptions::new("t", vec!["gemma-2-9b-it".into()], Vec::new());
        o.choices[1].structure = vec!["ln_chars".into(), "lenght".into()];
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
