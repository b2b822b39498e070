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

pub mod grade;
pub mod references;
pub mod summary;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::backends::{count_tokens, Backend, BackendError, Reply};
use crate::config::{Config, Role};
use crate::metering::{EnergySource, Metering, Tokens};
use crate::wire::{generated_text, text_parts, ChatRequest};
use grade::{Grade, GraderKind};
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

#[derive(Deserialize)]
struct InputRow {
    id: Value,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<Value>>,
    #[serde(default)]
    scores: BTreeMap<String, f64>,
    #[serde(default)]
    answer: Option<AnswerField>,
    #[serde(default)]
    grader: Option<GraderKind>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum AnswerField {
    One(String),
    Many(Vec<String>),
}

/// A row ready to run.
struct Query {
    id: String,
    source: String,
    category: Option<String>,
    prompt: String,
    messages: Vec<Value>,
    scores: BTreeMap<String, f64>,
    answers: Vec<String>,
    grader: Option<GraderKind>,
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

/// Everything one query needs, shared by the concurrent queries.
struct Runner<'a> {
    backends: &'a Backends,
    metering: &'a Metering,
    index: usize,
    backend: &'a dyn Backend,
    max_tokens: Option<u32>,
    source: EnergySource,
    model: &'a str,
    router: Option<&'a crate::router::model::RouterModel>,
    guard_head: Option<&'a crate::guard::GuardHead>,
}

impl Runner<'_> {
    async fn profile_one(
        &self,
        q: Query,
        grader: GraderKind,
        reference: Option<Reference>,
    ) -> Result<QueryRecord, (String, anyhow::Error)> {
        let id = q.id.clone();
        self.profile(q, grader, reference)
            .await
            .map_err(|e| (id, e))
    }

    async fn profile(
        &self,
        q: Query,
        grader: GraderKind,
        reference: Option<Reference>,
    ) -> anyhow::Result<QueryRecord> {
        let request = chat_request(&q.messages, self.max_tokens, true)?;
        let ticket = self.metering.begin();
        let sent = Instant::now();
        let answer = match self.backend.chat(&request).await {
            Ok(Reply::Stream(opened)) => {
                let ttft = sent.elapsed();
                collect_stream(opened).await.map(|c| (c, ttft))
            }
            Ok(Reply::Complete(c)) => {
                let mut text = String::new();
                generated_text(&c.body, &mut text);
                let collected = Collected {
                    text,
                    usage: c.usage,
                    finish_reason: crate::wire::answer_peek(&c.body).finish_reason,
                    logprobs: c.logprobs,
                };
                Ok((collected, sent.elapsed()))
            }
            Err(e) => Err(e),
        };
        let (output, usage, ttft, error, signals) = match answer {
            Ok((c, ttft)) => {
                let signals = c.logprobs.as_deref().and_then(|l| {
                    crate::guard::Signals::from_logprobs(l, c.finish_reason.as_deref())
                });
                (c.text, c.usage, ttft, None, signals)
            }
            Err(e @ (BackendError::ContextTooLong { .. } | BackendError::Unsupported { .. })) => (
                String::new(),
                None,
                sent.elapsed(),
                Some(e.to_string()),
                None,
            ),
            Err(e) => {
                self.metering.release(ticket);
                return Err(e.into());
            }
        };
        let latency = sent.elapsed();
        let (tokens, tokens_source) = match usage {
            Some(u) => (
                Tokens {
                    input: u.prompt_tokens,
                    output: u.completion_tokens,
                },
                "usage",
            ),
            None => {
                let (input, source) = count_tokens(&self.backends.all, 0, &q.prompt);
                let (output, _) = count_tokens(&self.backends.all, 0, &output);
                (Tokens { input, output }, source)
            }
        };
        let bill = self.metering.end(ticket, self.index, tokens);
        let joules = if self.source == EnergySource::CloudEstimate {
            bill.cloud_joules
        } else {
            bill.local_joules
        };
        let grade = if error.is_some() {
            Grade {
                score: 0.0,
                extracted: None,
            }
        } else {
            self.grade(&q, grader, reference.as_ref(), &output).await?
        };
        let p_local = self
            .router
            .map(|r| r.score(&crate::router::features::Query::from_prompt(&q.prompt)));
        let confidence = signals.map(|s| match self.guard_head {
            Some(h) => h.confidence(&s, p_local),
            None => crate::guard::head::rule_confidence(&s),
        });
        let mut scores = q.scores;
        scores.insert(self.model.to_owned(), grade.score);
        let seconds = latency.as_secs_f64();
        Ok(QueryRecord {
            id: q.id,
            source: q.source,
            category: q.category,
            prompt: q.prompt,
            scores,
            profile: Measurement {
                model: self.model.to_owned(),
                grader,
                score: grade.score,
                correct: grade.score >= 0.5,
                extracted: grade.extracted,
                reference: reference
                    .as_ref()
                    .map(Reference::describe)
                    .or_else(|| (!q.answers.is_empty()).then(|| q.answers.join(" | "))),
                output,
                input_tokens: tokens.input,
                output_tokens: tokens.output,
                tokens_source: tokens_source.to_owned(),
                latency_s: seconds,
                ttft_s: ttft.as_secs_f64(),
                joules,
                watts: if seconds > 0.0 { joules / seconds } else { 0.0 },
                energy_source: self.source.as_str().to_owned(),
                measured: self.source.is_measured(),
                error,
                signals,
                p_local,
                confidence,
            },
        })
    }

    async fn grade(
        &self,
        q: &Query,
        grader: GraderKind,
        reference: Option<&Reference>,
        output: &str,
    ) -> anyhow::Result<Grade> {
        Ok(match (grader, reference) {
            (GraderKind::MultipleChoice, Some(Reference::Letter { letter, letters })) => {
                grade::multiple_choice(output, *letter, letters)
            }
            (GraderKind::FinalNumber, Some(Reference::Number(n))) => grade::final_number(output, n),
            (GraderKind::FinalNumber, Some(Reference::Texts(t))) => {
                grade::final_number(output, t.first().map_or("", String::as_str))
            }
            (GraderKind::ShortAnswer, Some(r)) => {
                let accepted = match r {
                    Reference::Texts(t) => t.clone(),
                    other => vec![other.describe()],
                };
                grade::short_answer(output, &accepted)
            }
            (GraderKind::Judge, _) => self.judge(q, output).await?,
            (g, _) => bail!(
                "row `{}`: no reference answer for the {} grader",
                q.id,
                g.as_str()
            ),
        })
    }

    /// Win-or-tie against the reference answer, asked in both orders.
    async fn judge(&self, q: &Query, output: &str) -> anyhow::Result<Grade> {
        let Some((_, judge)) = &self.backends.judge else {
            bail!("no --judge backend");
        };
        let reference = if q.answers.is_empty() {
            let Some((_, model)) = &self.backends.reference else {
                bail!(
                    "row `{}` has no reference answer for the judge: add `answer` to the row or pass --reference-model",
                    q.id
                );
            };
            complete(model.as_ref(), &q.messages, None).await?
        } else {
            q.answers.join("\n")
        };
        let ask = |first: &str, second: &str| {
            vec![json!({"role": "user", "content": grade::judge_prompt(&q.prompt, first, second)})]
        };
        let local_first = complete(judge.as_ref(), &ask(output, &reference), Some(512)).await?;
        let local_second = complete(judge.as_ref(), &ask(&reference, output), Some(512)).await?;
        Ok(grade::judged(
            grade::parse_verdict(&local_first),
            grade::parse_verdict(&local_second),
        ))
    }
}

/// A non-streamed answer's text.
async fn complete(
    backend: &dyn Backend,
    messages: &[Value],
    max_tokens: Option<u32>,
) -> anyhow::Result<String> {
    let request = chat_request(messages, max_tokens, false)?;
    let mut text = String::new();
    match backend.chat(&request).await? {
        Reply::Complete(c) => generated_text(&c.body, &mut text),
        Reply::Stream(opened) => text = collect_stream(opened).await?.text,
    }
    Ok(text)
}

/// What a stream read to its end carried.
#[derive(Debug, Default)]
pub(crate) struct Collected {
    /// The answer's text.
    pub text: String,
    /// The usage chunk's counts, if sent.
    pub usage: Option<crate::wire::Usage>,
    /// The sampled tokens' ln P, when the backend gave any.
    pub logprobs: Option<Vec<f32>>,
    /// The last `finish_reason` seen.
    pub finish_reason: Option<String>,
}

/// Reads a stream to its end.
pub(crate) async fn collect_stream(
    opened: crate::backends::OpenedStream,
) -> Result<Collected, BackendError> {
    let mut out = Collected::default();
    let mut take = |chunk: &crate::backends::Chunk| -> Result<(), BackendError> {
        if chunk.is_error {
            return Err(BackendError::Protocol {
                detail: format!(
                    "error in the stream: {}",
                    String::from_utf8_lossy(&chunk.data)
                ),
            });
        }
        generated_text(&chunk.data, &mut out.text);
        if chunk.usage.is_some() {
            out.usage = chunk.usage;
        }
        if let Some(lp) = &chunk.logprobs {
            out.logprobs.get_or_insert_with(Vec::new).extend(lp);
        }
        if let Some(f) = crate::wire::answer_peek(&chunk.data).finish_reason {
            out.finish_reason = Some(f);
        }
        Ok(())
    };
    take(&opened.first)?;
    let mut rest = opened.rest;
    while let Some(chunk) = rest.next().await {
        take(&chunk?)?;
    }
    Ok(out)
}

/// A deterministic request (temperature 0) as the gateway would forward it.
fn chat_request(
    messages: &[Value],
    max_tokens: Option<u32>,
    stream: bool,
) -> anyhow::Result<ChatRequest> {
    let mut body = json!({
        "model": "profile",
        "messages": messages,
        "temperature": 0,
        "stream": stream,
    });
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    if let Some(n) = max_tokens {
        body["max_tokens"] = json!(n);
    }
    let mut request =
        ChatRequest::parse(&serde_json::to_vec(&body)?).map_err(|e| anyhow!("{}", e.message))?;
    // Record the signals the quality guard would read of the same answer.
    request.set_wants_signals(true);
    Ok(request)
}

/// `n` items spread evenly over `items` (the first, then every len/n-th), in order.
fn spread<T>(items: Vec<T>, n: usize) -> Vec<T> {
    let len = items.len();
    if n >= len {
        return items;
    }
    let mut picks = (0..n).map(|i| i * len / n).peekable();
    items
        .into_iter()
        .enumerate()
        .filter_map(|(i, item)| {
            if picks.peek() == Some(&i) {
                picks.next();
                Some(item)
            } else {
                None
            }
        })
        .collect()
}

/// Reads the input rows; a malformed line is an error naming its line, a duplicate id too
/// (resuming goes by id).
fn read_queries(path: &Path) -> anyhow::Result<Vec<Query>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let row: InputRow = serde_json::from_str(line).with_context(at)?;
        let id = match row.id {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            other => bail!("{}: `id` must be a string or number, got {other}", at()),
        };
        if !seen.insert(id.clone()) {
            bail!("{}: duplicate id `{id}`", at());
        }
        let (prompt, messages) = match (row.prompt, row.messages) {
            (Some(p), None) => {
                let messages = vec![json!({"role": "user", "content": p})];
                (p, messages)
            }
            (None, Some(m)) if !m.is_empty() => {
                let text: Vec<&str> = m
                    .iter()
                    .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
                    .filter_map(|m| m.get("content"))
                    .flat_map(text_parts)
                    .collect();
                (text.join("\n"), m)
            }
            (Some(_), Some(_)) => bail!("{}: give `prompt` or `messages`, not both", at()),
            _ => bail!(
                "{}: needs `prompt` (string) or `messages` (non-empty array)",
                at()
            ),
        };
        if let Some((m, s)) = row.scores.iter().find(|(_, s)| !(0.0..=1.0).contains(*s)) {
            bail!("{}: score {s} of `{m}` is outside 0..1", at());
        }
        let answers = match row.answer {
            None => Vec::new(),
            Some(AnswerField::One(a)) => vec![a],
            Some(AnswerField::Many(a)) => a,
        };
        out.push(Query {
            id,
            source: row.source.unwrap_or_else(|| "unknown".to_owned()),
            category: row.category,
            prompt,
            messages,
            scores: row.scores,
            answers,
            grader: row.grader,
        });
    }
    Ok(out)
}

/// Reads the finished rows. A last line without its newline was cut by an interrupted write:
/// it is removed (the query runs again). Any other malformed line is an error naming it.
fn read_records(path: &Path, say: &mut dyn FnMut(String)) -> anyhow::Result<Vec<QueryRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let complete = match text.rfind('\n') {
        Some(end) => end + 1,
        None => 0,
    };
    if complete < text.len() {
        say(format!(
            "{}: dropping an unfinished last line ({} bytes) left by an interrupted run",
            path.display(),
            text.len() - complete
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.set_len(complete as u64)
            .with_context(|| format!("truncating {}", path.display()))?;
    }
    let mut out = Vec::new();
    for (i, line) in text[..complete].lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: QueryRecord = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a profile row", path.display(), i + 1))?;
        out.push(record);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn spread_picks_evenly_and_keeps_order() {
        let picked = super::spread((0..10).collect(), 3);
        assert_eq!(picked, vec![0, 3, 6]);
        assert_eq!(super::spread((0..3).collect(), 5), vec![0, 1, 2]);
        assert_eq!(super::spread((0..100).collect(), 100).len(), 100);
        assert!(super::spread((0..10).collect::<Vec<i32>>(), 0).is_empty());
    }
}

#[derive(Serialize, Deserialize)]
struct RunInfo {
    model: String,
    data: String,
}

/// Records what the directory profiles, or checks that a resumed run profiles the same model:
/// mixing two models' rows in one file would corrupt both.
fn claim_directory(dir: &Path, model: &str, data: &Path) -> anyhow::Result<()> {
    let path = dir.join(RUN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let info: RunInfo =
                serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
            if info.model != model {
                bail!(
                    "{} holds a profile of `{}`, not `{model}`: pass another --out",
                    dir.display(),
                    info.model
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let info = RunInfo {
                model: model.to_owned(),
                data: data.display().to_string(),
            };
            std::fs::write(&path, serde_json::to_string_pretty(&info)? + "\n")
                .with_context(|| format!("writing {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}
