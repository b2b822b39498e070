//! Shadow checks: a sample of locally served requests is asked again of a cloud backend, after
//! the client has its answer, and the local answer is graded against the cloud's.
//!
//! The check never touches the client's path: it starts when the request's accounting is done,
//! runs on its own task, and is skipped (and counted) when the hourly budget or the concurrency
//! cap would be exceeded. What it spends is metered under `wattgate_shadow_*` and stored with
//! the outcome, never in the request rows that savings are summed from.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::backends::{count_tokens, Backend, BackendError, Reply};
use crate::config::{Config, ShadowConfig};
use crate::ledger::{now_us, LedgerSender, OutcomeRecord, OutcomeSource, ShadowSpend};
use crate::metering::{Metering, Tokens};
use crate::metrics::Metrics;
use crate::profile::grade;
use crate::wire::{generated_text, ChatRequest};

/// The budget's window.
const HOUR: Duration = Duration::from_secs(3600);

/// The judge's answer limit: room for a short explanation and the verdict (MT-Bench's judge
/// prompts ask for the same).
const JUDGE_MAX_TOKENS: u64 = 512;

/// Tokens the judge's instructions add to the question and the two answers (the fixed text of
/// [`grade::judge_prompt`] is about 120 words; rounded up).
const JUDGE_PROMPT_TOKENS: u64 = 200;

/// A locally served request picked for a check.
pub struct ShadowJob {
    /// The request as the client sent it.
    pub request: Arc<ChatRequest>,
    /// The answer the client got.
    pub local_answer: String,
    /// The request id its outcome is stored under.
    pub request_id: String,
    /// Its experiment and arm, for the metric labels.
    pub arm: Option<(String, String)>,
    /// What the local answer used, the basis of the cost estimate.
    pub tokens: Tokens,
}

/// The shadow checker: sampling, budget, cloud answer, grading, recording.
pub struct Shadow {
    config: ShadowConfig,
    backends: Vec<Arc<dyn Backend>>,
    cloud: usize,
    judge: Option<usize>,
    metering: Arc<Metering>,
    metrics: Arc<Metrics>,
    ledger: Option<LedgerSender>,
    budget: Mutex<Budget>,
    in_flight: AtomicUsize,
}

impl Shadow {
    /// The checker for a validated config; `None` when shadow checks are off.
    pub fn new(
        config: &Config,
        backends: &[Arc<dyn Backend>],
        metering: Arc<Metering>,
        metrics: Arc<Metrics>,
        ledger: Option<LedgerSender>,
    ) -> Option<Self> {
        if config.shadow.sample_rate <= 0.0 {
            return None;
        }
        let position = |name: &str| backends.iter().position(|b| b.info().name == name);
        let cloud = position(config.shadow_backend()?)?;
        let judge = config.shadow.judge.as_deref().and_then(position);
        if ledger.is_none() {
            tracing::warn!("shadow checks run but the ledger is disabled: verdicts reach only /metrics, not experiment reports");
        }
        tracing::info!(
            rate = config.shadow.sample_rate,
            backend = %backends[cloud].info().name,
            judge = judge.map_or("similarity rule", |j| backends[j].info().name.as_str()),
            budget_usd_per_hour = config.shadow.budget_usd_per_hour,
            "shadow checks on"
        );
        Some(Self {
            config: config.shadow.clone(),
            backends: backends.to_vec(),
            cloud,
            judge,
            metering,
            metrics,
            ledger,
            budget: Mutex::new(Budget::new(config.shadow.budget_usd_per_hour)),
            in_flight: AtomicUsize::new(0),
        })
    }

    /// Whether this request is in the sample: a stable hash of its id against the rate, so a
    /// replayed id is sampled the same way.
    pub fn sampled(&self, request_id: &str) -> bool {
        super::unit_hash(&["shadow", request_id]) < self.config.sample_rate
    }

    /// Starts a check in the background, unless the concurrency cap or the budget forbids it
    /// (then counted as skipped). Must be called within a tokio runtime.
    pub fn submit(self: &Arc<Self>, job: ShadowJob) {
        let estimate = self.estimate(job.tokens);
        if self.in_flight.fetch_add(1, Ordering::SeqCst) >= self.config.max_concurrent {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.count(&job, "skipped_busy");
            return;
        }
        let reserved = self
            .budget
            .lock()
            .map(|mut b| b.try_reserve(Instant::now(), estimate))
            .unwrap_or(false);
        if !reserved {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.count(&job, "skipped_budget");
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.release(estimate, 0.0);
            self.count(&job, "error");
            return;
        };
        let shadow = self.clone();
        runtime.spawn(async move {
            let (result, spend) = shadow.check(&job).await;
            shadow.release(estimate, spend.usd);
            match result {
                Ok((score, detail)) => {
                    let agree = score >= 0.5;
                    shadow.count(&job, if agree { "agree" } else { "disagree" });
                    shadow.store(&job, score, detail, spend).await;
                }
                Err(e) => {
                    tracing::warn!(request_id = %job.request_id, error = %e, "shadow check failed");
                    shadow.count(&job, "error");
                }
            }
        });
    }

    /// Dollars a check of a request with these tokens is expected to cost: the cloud answering
    /// it at the local answer's length, plus the judge's two calls when one is configured.
    fn estimate(&self, tokens: Tokens) -> f64 {
        let (_, answer) = self.metering.cloud_price(self.cloud, tokens);
        let judge = self.judge.map_or(0.0, |j| {
            let input = tokens.input + 2 * tokens.output + JUDGE_PROMPT_TOKENS;
            let call = Tokens {
                input,
                output: JUDGE_MAX_TOKENS,
            };
            2.0 * self.metering.cloud_price(j, call).1
        });
        answer + judge
    }

    fn release(&self, estimate: f64, spent: f64) {
        if let Ok(mut b) = self.budget.lock() {
            b.settle(Instant::now(), estimate, spent);
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Asks the cloud, then grades; returns the grade and what every call cost.
    async fn check(&self, job: &ShadowJob) -> (Result<(f64, String), BackendError>, ShadowSpend) {
        let mut spend = ShadowSpend::default();
        let cloud = &self.backends[self.cloud];
        let cloud_answer = match self
            .ask(self.cloud, &job.request.unstreamed(), &mut spend)
            .await
        {
            Ok(text) => text,
            Err(e) => return (Err(e), spend),
        };
        let Some(judge) = self.judge else {
            let prompt = job.request.prompt_text();
            let (score, detail) = similarity(
                &prompt,
                &job.local_answer,
                &cloud_answer,
                self.config.similarity_threshold,
            );
            return (Ok((score, detail)), spend);
        };
        let question = job.request.prompt_text();
        let ask_judge = |first: &str, second: &str| {
            let body = json!({
                "model": "shadow-judge",
                "messages": [{"role": "user", "content": grade::judge_prompt(&question, first, second)}],
                "temperature": 0,
                "max_tokens": JUDGE_MAX_TOKENS,
            });
            ChatRequest::parse(body.to_string().as_bytes())
        };
        let (Ok(local_first), Ok(local_second)) = (
            ask_judge(&job.local_answer, &cloud_answer),
            ask_judge(&cloud_answer, &job.local_answer),
        ) else {
            return (
                Err(BackendError::Internal {
                    detail: "could not build the judge request".to_owned(),
                }),
                spend,
            );
        };
        let first = match self.ask(judge, &local_first, &mut spend).await {
            Ok(text) => text,
            Err(e) => return (Err(e), spend),
        };
        let second = match self.ask(judge, &local_second, &mut spend).await {
            Ok(text) => text,
            Err(e) => return (Err(e), spend),
        };
        let grade = grade::judged(grade::parse_verdict(&first), grade::parse_verdict(&second));
        let detail = format!(
            "judge {} (local first/second): {}; answered by {}",
            self.backends[judge].info().name,
            grade.extracted.unwrap_or_default(),
            cloud.info().name
        );
        (Ok((grade.score, detail)), spend)
    }

    /// One whole answer from `backend`, its tokens and price added to `spend`.
    async fn ask(
        &self,
        backend: usize,
        request: &ChatRequest,
        spend: &mut ShadowSpend,
    ) -> Result<String, BackendError> {
        let mut text = String::new();
        let usage = match self.backends[backend].chat(request).await? {
            Reply::Complete(c) => {
                generated_text(&c.body, &mut text);
                c.usage
            }
            Reply::Stream(opened) => {
                let collected = crate::profile::collect_stream(opened).await?;
                let (t, usage) = (collected.text, collected.usage);
                text = t;
                usage
            }
        };
        let tokens = match usage {
            Some(u) => Tokens {
                input: u.prompt_tokens,
                output: u.completion_tokens,
            },
            None => Tokens {
                input: count_tokens(&self.backends, backend, &request.prompt_text()).0,
                output: count_tokens(&self.backends, backend, &text).0,
            },
        };
        let (joules, usd) = self.metering.cloud_price(backend, tokens);
        spend.input_tokens += tokens.input;
        spend.output_tokens += tokens.output;
        spend.usd += usd;
        spend.joules_estimated += joules;
        let name = self.backends[backend].info().name.as_str();
        let m = &self.metrics;
        m.shadow_tokens
            .with_label_values(&[name, "input"])
            .inc_by(tokens.input);
        m.shadow_tokens
            .with_label_values(&[name, "output"])
            .inc_by(tokens.output);
        m.shadow_cost.with_label_values(&[name]).inc_by(usd);
        m.shadow_energy
            .with_label_values(&[name, "cloud_estimate"])
            .inc_by(joules);
        Ok(text)
    }

    fn count(&self, job: &ShadowJob, result: &str) {
        let (experiment, arm) = job
            .arm
            .as_ref()
            .map_or(("none", "none"), |(e, a)| (e.as_str(), a.as_str()));
        self.metrics
            .shadow_checks
            .with_label_values(&[experiment, arm, result])
            .inc();
        if matches!(result, "agree" | "disagree") {
            let result = if result == "agree" {
                "success"
            } else {
                "failure"
            };
            self.metrics
                .experiment_outcomes
                .with_label_values(&[experiment, arm, "shadow", result])
                .inc();
        }
    }

    async fn store(&self, job: &ShadowJob, score: f64, detail: String, spend: ShadowSpend) {
        let Some(ledger) = &self.ledger else {
            return;
        };
        let outcome = OutcomeRecord {
            request_id: job.request_id.clone(),
            source: OutcomeSource::Shadow,
            time_us: now_us(),
            score,
            thumbs: None,
            comment: None,
            detail: Some(detail),
            spend: Some(spend),
        };
        if let Err(e) = ledger.record_outcome(outcome).await {
            tracing::warn!(request_id = %job.request_id, error = %e, "shadow verdict not stored");
        }
    }
}

/// Dollars spent in the last hour, plus what checks in flight have reserved.
#[derive(Debug)]
pub struct Budget {
    limit_usd: f64,
    spent: VecDeque<(Instant, f64)>,
    reserved: f64,
}

impl Budget {
    /// A budget of `limit_usd` per rolling hour.
    pub fn new(limit_usd: f64) -> Self {
        Self {
            limit_usd,
            spent: VecDeque::new(),
            reserved: 0.0,
        }
    }

    /// Reserves `estimate` if spend in the hour before `now`, reservations and it fit the limit.
    pub fn try_reserve(&mut self, now: Instant, estimate: f64) -> bool {
        while self
            .spent
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= HOUR)
        {
            self.spent.pop_front();
        }
        let spent: f64 = self.spent.iter().map(|(_, usd)| usd).sum();
        if spent + self.reserved + estimate > self.limit_usd {
            return false;
        }
        self.reserved += estimate;
        true
    }

    /// Replaces a reservation with what was actually spent.
    pub fn settle(&mut self, now: Instant, estimate: f64, spent: f64) {
        self.reserved = (self.reserved - estimate).max(0.0);
        self.spent.push_back((now, spent));
    }
}

/// The rule used without a judge: the same chosen option letter (multiple choice), else the
/// same final number, else token F1 at least `threshold`. Returns 1.0 or 0.0 and the reading.
pub fn similarity(prompt: &str, local: &str, cloud: &str, threshold: f64) -> (f64, String) {
    let letters = grade::option_letters(prompt);
    if !letters.is_empty() {
        let ours = grade::extract_choice(local, &letters);
        let theirs = grade::extract_choice(cloud, &letters);
        if let Some(theirs) = theirs {
            let agree = ours == Some(theirs);
            let ours = ours.map_or("none".to_owned(), |c| c.to_string());
            return (
                f64::from(u8::from(agree)),
                format!("option {ours} vs {theirs}"),
            );
        }
    }
    if let (Some(ours), Some(theirs)) = (
        grade::extract_final_number(local),
        grade::extract_final_number(cloud),
    ) {
        let agree = ours == theirs;
        return (
            f64::from(u8::from(agree)),
            format!("number {ours} vs {theirs}"),
        );
    }
    let f1 = token_f1(local, cloud);
    (
        f64::from(u8::from(f1 >= threshold)),
        format!("token F1 {f1:.3} (agree at {threshold})"),
    )
}

/// SQuAD's token F1 between two texts after its normalisation.
pub fn token_f1(a: &str, b: &str) -> f64 {
    let a = grade::normalise_text(a);
    let b = grade::normalise_text(b);
    let a: Vec<&str> = a.split_whitespace().collect();
    let b: Vec<&str> = b.split_whitespace().collect();
    if a.is_empty() || b.is_empty() {
        return f64::from(u8::from(a.is_empty() && b.is_empty()));
    }
    let mut counts: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for w in &a {
        *counts.entry(w).or_default() += 1;
    }
    let mut common = 0;
    for w in &b {
        if let Some(c) = counts.get_mut(w) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = f64::from(common) / a.len() as f64;
    let recall = f64::from(common) / b.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_caps_spend_per_rolling_hour() {
        let t0 = Instant::now();
        let mut b = Budget::new(1.0);
        assert!(b.try_reserve(t0, 0.4));
        assert!(b.try_reserve(t0, 0.4));
        // 0.8 reserved: a third 0.4 would pass the limit.
        assert!(!b.try_reserve(t0, 0.4));
        // The first check cost less than estimated; the freed room admits a small one.
        b.settle(t0, 0.4, 0.1);
        assert!(b.try_reserve(t0, 0.4));
        b.settle(t0, 0.4, 0.4);
        b.settle(t0, 0.4, 0.4);
        assert!(!b.try_reserve(t0 + Duration::from_secs(3599), 0.2));
        // An hour after the spend it no longer counts.
        assert!(b.try_reserve(t0 + HOUR, 1.0));
    }

    #[test]
    fn similarity_compares_choices_numbers_then_words() {
        let mcq = "Which is a prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer:";
        assert_eq!(similarity(mcq, "C", "The answer is (C).", 0.5).0, 1.0);
        let (score, detail) = similarity(mcq, "B. 6", "C", 0.5);
        assert_eq!((score, detail.as_str()), (0.0, "option B vs C"));
        assert_eq!(
            similarity(
                "Tom has 3 apples...",
                "so 3 + 4 = 7.\n#### 7",
                "The answer is 7",
                0.5
            )
            .0,
            1.0
        );
        assert_eq!(similarity("q", "#### 8", "The answer is 7", 0.5).0, 0.0);
        // No option, no number: words. F1 of "paris is capital" vs "capital is paris" is 1.
        assert_eq!(
            similarity(
                "Capital of France?",
                "Paris is the capital",
                "The capital is Paris",
                0.5
            )
            .0,
            1.0
        );
        assert_eq!(
            similarity(
                "Tell me a joke",
                "Why did the chicken cross",
                "Knock knock",
                0.5
            )
            .0,
            0.0
        );
        // Hand-computed: 2 shared of 4 and 3 tokens -> P 0.5, R 0.667, F1 0.5714.
        assert!((token_f1("a red big dog barks", "red dog sleeps") - 4.0 / 7.0).abs() < 1e-12);
    }
}
