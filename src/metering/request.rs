//! One request's accounting, from routing to its last byte: what it cost, what it saved, the
//! access-log line, the counters and the ledger row. Recording happens on drop, so a request
//! whose client goes away (before or after its first byte) or that shutdown cuts off is still
//! counted, with the tokens and time it consumed and its share of the energy meter.
//!
//! The pipeline (`crate::gateway`) tells the meter what happened (routed, first byte, usage,
//! the guard's verdict, how it ended); this module decides what that costs and where it goes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Metering, Ticket, Tokens};
use crate::backends::Backend;
use crate::config::Role;
use crate::experiments::shadow::{Shadow, ShadowJob};
use crate::gateway::Route;
use crate::guard::{Decision as GuardDecision, Verdict};
use crate::ledger::{now_us, LedgerRow, LedgerSender};
use crate::limits::Client;
use crate::metrics::Metrics;
use crate::wire::{generated_text, ChatRequest, Usage};

/// Output kept per stream for counting tokens when the upstream reports no usage.
const MAX_COUNTED_OUTPUT_BYTES: usize = 4 * 1024 * 1024;

/// The status recorded for a request whose client never got a status line (abandoned before
/// its first byte, or cut by shutdown before it): no HTTP status was sent.
pub const NO_STATUS: u16 = 0;

/// How a chat request ended, for `wattgate_chat_requests_total{outcome}`, the ledger and the
/// access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered in full.
    Ok,
    /// Failed: an error status, an in-band error chunk, or a stream that broke.
    Error,
    /// The client went away after the first byte of a stream.
    Cancelled,
    /// The client went away before anything was sent (the upstream may still have billed it).
    Abandoned,
    /// Still in flight when the shutdown grace period ran out.
    Shutdown,
}

impl Outcome {
    /// The label used in metrics, the ledger and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
            Outcome::Abandoned => "abandoned",
            Outcome::Shutdown => "shutdown",
        }
    }
}

/// Where finished requests are recorded: Prometheus, the energy meter, the ledger, and the
/// shadow checker's queue. One per gateway.
pub struct Recorder {
    /// The Prometheus series.
    pub metrics: Arc<Metrics>,
    /// The energy meter and prices.
    pub metering: Arc<Metering>,
    /// The ledger writer, when the ledger is on.
    pub ledger: Option<LedgerSender>,
    /// The backends, in config order (names, tokenizers).
    pub backends: Vec<Arc<dyn Backend>>,
    /// The shadow checker, when sampling is on.
    pub shadow: Option<Arc<Shadow>>,
    /// `[ledger] store_prompts`: rows keep the conversation's text.
    store_prompts: bool,
    /// Set when the shutdown grace ran out: requests dropped from then on were cut, not
    /// abandoned by their clients.
    cut: AtomicBool,
}

impl Recorder {
    /// A recorder over these sinks.
    pub fn new(
        metrics: Arc<Metrics>,
        metering: Arc<Metering>,
        ledger: Option<LedgerSender>,
        backends: Vec<Arc<dyn Backend>>,
        shadow: Option<Arc<Shadow>>,
        store_prompts: bool,
    ) -> Self {
        Self {
            metrics,
            metering,
            ledger,
            backends,
            shadow,
            store_prompts,
            cut: AtomicBool::new(false),
        }
    }

    /// The shutdown grace has run out: the requests still in flight are about to be dropped,
    /// and are recorded as `shutdown`.
    pub fn cut_for_shutdown(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    fn count_tokens(&self, served: usize, text: &str) -> (u64, &'static str) {
        crate::backends::count_tokens(&self.backends, served, text)
    }
}

/// Accounts for one chat request from routing to its last byte; recorded on drop.
pub struct RequestMeter {
    recorder: Arc<Recorder>,
    request: Arc<ChatRequest>,
    request_id: String,
    client: String,
    started: Instant,
    arrived_us: u64,
    ticket: Option<Ticket>,
    /// Where it is being served (the route and the backend's index), once routed.
    pub route: Option<(Route, usize)>,
    /// How it ended; `None` while it is in flight (a drop then decides: cancelled, abandoned
    /// or shutdown).
    pub outcome: Option<Outcome>,
    status: u16,
    /// The upstream's usage, once seen.
    pub usage: Option<Usage>,
    ttft: Option<Duration>,
    /// Answer bytes kept while no usage has been seen (bounded), to count tokens from.
    output: Vec<Bytes>,
    output_bytes: usize,
    /// The answer's text, kept only for requests sampled for a shadow check.
    pub answer: Option<String>,
    /// The quality guard's part, when it was asked to check this request.
    pub guard: Option<GuardLeg>,
}

/// What the quality guard did with one request, for its ledger row and counters.
#[derive(Debug, Clone)]
pub struct GuardLeg {
    /// The guard's decision.
    pub decision: GuardDecision,
    /// Its reading of the local answer, when it had one.
    pub verdict: Option<Verdict>,
    /// The local backend whose answer was checked (None: the route's backend).
    pub local: Option<usize>,
    /// Tokens of the local answer (the leg an escalated request paid for and discarded).
    pub local_tokens: Tokens,
}

impl GuardLeg {
    /// A local answer the guard was asked to check but could not (a stream relayed live).
    pub fn unchecked(decision: GuardDecision) -> Self {
        Self {
            decision,
            verdict: None,
            local: None,
            local_tokens: Tokens::default(),
        }
    }
}

impl RequestMeter {
    /// Starts metering a request that is about to be served: it is in flight from now on and
    /// holds a place in the energy meter.
    pub fn start(
        recorder: Arc<Recorder>,
        request: Arc<ChatRequest>,
        request_id: &str,
        client: &Client,
        started: Instant,
    ) -> Self {
        recorder.metrics.in_flight.inc();
        let ticket = recorder.metering.begin();
        Self {
            arrived_us: now_us().saturating_sub(started.elapsed().as_micros() as u64),
            recorder,
            request,
            request_id: request_id.to_owned(),
            client: client.to_string(),
            started,
            ticket: Some(ticket),
            route: None,
            outcome: None,
            status: NO_STATUS,
            usage: None,
            ttft: None,
            output: Vec::new(),
            output_bytes: 0,
            answer: None,
            guard: None,
        }
    }

    /// Where the request is served (again, when a fallback or the guard moves it).
    pub fn routed(&mut self, route: &Route, backend: usize) {
        self.route = Some((route.clone(), backend));
    }

    /// The client's first byte is on its way (a stream's 200 headers included).
    pub fn first_byte(&mut self) {
        self.ttft = Some(self.started.elapsed());
        self.status = 200;
    }

    /// Keeps answer bytes for counting, until usage arrives or the bound is reached.
    pub fn keep_output(&mut self, data: &Bytes) {
        if self.usage.is_none() && self.output_bytes < MAX_COUNTED_OUTPUT_BYTES {
            self.output_bytes += data.len();
            self.output.push(data.clone());
        }
    }

    /// The upstream reported usage: the kept output is no longer needed to count tokens.
    pub fn usage_seen(&mut self, usage: Option<Usage>) {
        self.usage = usage;
        self.output = Vec::new();
    }

    /// A whole completion is what the client gets: its first byte, its usage (or its text to
    /// count), and its text for a shadow check when sampled.
    pub fn delivered_whole(&mut self, completion: &crate::backends::Completion) {
        self.first_byte();
        if completion.usage.is_none() {
            self.keep_output(&completion.body);
        }
        if let Some(answer) = &mut self.answer {
            generated_text(&completion.body, answer);
        }
        self.finish(Outcome::Ok, completion.usage, 200);
    }

    /// How the request ended, with the upstream's usage (when reported) and the status sent.
    pub fn finish(&mut self, outcome: Outcome, usage: Option<Usage>, status: u16) {
        self.outcome = Some(outcome);
        self.usage = usage;
        self.status = status;
    }

    /// A stream reached its end: `ok`, unless an in-band error chunk already made it an error.
    pub fn stream_ended(&mut self) {
        if self.outcome != Some(Outcome::Error) {
            self.outcome = Some(Outcome::Ok);
        }
    }

    /// What a request that was dropped in flight became: cut by shutdown, or left by its
    /// client before (abandoned) or after (cancelled) its first byte.
    fn settle(&mut self) -> Outcome {
        let outcome = match self.outcome {
            Some(o) => o,
            None if self.recorder.cut.load(Ordering::SeqCst) => Outcome::Shutdown,
            None if self.ttft.is_some() => Outcome::Cancelled,
            None => Outcome::Abandoned,
        };
        self.outcome = Some(outcome);
        outcome
    }

    /// Tokens of this request: the upstream's usage, else counted from the prompt and the
    /// answer that reached the client. A request dropped before any answer still counts its
    /// prompt, which the upstream was sent (and a cloud bills).
    fn tokens(&self, served: usize) -> (Tokens, &'static str) {
        if let Some(u) = self.usage {
            let tokens = Tokens {
                input: u.prompt_tokens,
                output: u.completion_tokens,
            };
            return (tokens, "upstream");
        }
        // An error before any answer: the upstream produced nothing to pay for.
        if self.outcome == Some(Outcome::Error) && self.output.is_empty() {
            return (Tokens::default(), "none");
        }
        let mut answer = String::new();
        for data in &self.output {
            generated_text(data, &mut answer);
        }
        let (input, source) = self
            .recorder
            .count_tokens(served, &self.request.prompt_text());
        let (output, _) = self.recorder.count_tokens(served, &answer);
        (Tokens { input, output }, source)
    }
}

impl Drop for RequestMeter {
    fn drop(&mut self) {
        let recorder = self.recorder.clone();
        let outcome = self.settle();
        let metrics = &recorder.metrics;
        metrics.in_flight.dec();
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        let Some((route, served)) = self.route.take() else {
            recorder.metering.release(ticket);
            return;
        };
        let (tokens, tokens_source) = self.tokens(served);
        let bill = match &self.guard {
            Some(g) if g.decision == GuardDecision::Escalated => {
                let local = g.local.unwrap_or(served);
                recorder
                    .metering
                    .end_escalated(ticket, served, tokens, local, g.local_tokens)
            }
            _ => recorder.metering.end(ticket, served, tokens),
        };
        if let Some(g) = &self.guard {
            let local = g.local.unwrap_or(served);
            let name = recorder.backends[local].info().name.as_str();
            metrics
                .guard_decisions
                .with_label_values(&[name, g.decision.as_str()])
                .inc();
            if let Some(c) = g.verdict.and_then(|v| v.confidence) {
                metrics
                    .guard_confidence
                    .with_label_values(&[name])
                    .observe(c);
            }
        }
        let latency = self.started.elapsed();
        // The access log: who, where, why, how it ended. Never message text.
        tracing::info!(
            request_id = %self.request_id,
            client = %self.client,
            route = route.role.as_str(),
            backend = %route.backend,
            reason = route.reason.as_str(),
            fallback_from = route.fallback_from.as_deref().unwrap_or(""),
            status = self.status,
            outcome = outcome.as_str(),
            stream = self.request.stream,
            input_tokens = tokens.input,
            output_tokens = tokens.output,
            latency_ms = (latency.as_secs_f64() * 1000.0).round() as u64,
            "chat"
        );
        let role = route.role.as_str();
        let backend = route.backend.as_str();
        let reason = route.reason.as_str();
        let (experiment, arm) = route
            .arm
            .as_ref()
            .map_or(("none", "none"), |(e, a)| (e.as_str(), a.as_str()));
        metrics
            .chat_requests
            .with_label_values(&[role, backend, reason, outcome.as_str(), experiment, arm])
            .inc();
        if route.arm.is_some() {
            let cf = bill.counterfactual.unwrap_or_default();
            for (series, actual, counterfactual) in [
                (&metrics.experiment_energy, bill.joules(), cf.joules),
                (&metrics.experiment_flops, bill.flops, cf.flops),
                (&metrics.experiment_cost, bill.usd(), cf.usd),
            ] {
                series
                    .with_label_values(&[experiment, arm, "actual"])
                    .inc_by(actual);
                series
                    .with_label_values(&[experiment, arm, "counterfactual"])
                    .inc_by(counterfactual);
            }
        }
        metrics
            .chat_duration
            .with_label_values(&[role, backend])
            .observe(latency.as_secs_f64());
        if let Some(ttft) = self.ttft {
            metrics
                .ttft
                .with_label_values(&[role, backend])
                .observe(ttft.as_secs_f64());
        }
        metrics
            .tokens
            .with_label_values(&[backend, "input"])
            .inc_by(tokens.input);
        metrics
            .tokens
            .with_label_values(&[backend, "output"])
            .inc_by(tokens.output);
        let source = recorder.metering.source().as_str();
        metrics
            .energy
            .with_label_values(&[backend, source])
            .inc_by(bill.local_joules);
        if route.role == Role::Cloud {
            metrics
                .energy
                .with_label_values(&[backend, "cloud_estimate"])
                .inc_by(bill.cloud_joules);
            metrics
                .cost
                .with_label_values(&[backend, "cloud"])
                .inc_by(bill.cloud_usd);
        }
        metrics
            .cost
            .with_label_values(&[backend, "local"])
            .inc_by(bill.local_usd);
        metrics
            .flops
            .with_label_values(&[backend])
            .inc_by(bill.flops);
        if let Some(cf) = bill.counterfactual {
            metrics
                .counterfactual_energy
                .with_label_values(&[backend])
                .inc_by(cf.joules);
            metrics
                .counterfactual_flops
                .with_label_values(&[backend])
                .inc_by(cf.flops);
            metrics
                .counterfactual_cost
                .with_label_values(&[backend])
                .inc_by(cf.usd);
        }
        match &recorder.ledger {
            None => metrics.ledger_rows.with_label_values(&["disabled"]).inc(),
            Some(ledger) => {
                self.record(ledger, &route, served, tokens, tokens_source, latency, bill);
                metrics.ledger_rows.with_label_values(&["queued"]).inc();
            }
        }
        // After the row is queued, so the verdict always finds its request.
        if let (Some(shadow), Some(answer)) = (&recorder.shadow, self.answer.take()) {
            if route.role == Role::Local && outcome == Outcome::Ok {
                shadow.submit(ShadowJob {
                    request: self.request.clone(),
                    local_answer: answer,
                    request_id: self.request_id.clone(),
                    arm: route.arm.clone(),
                    tokens,
                });
            }
        }
    }
}

impl RequestMeter {
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        ledger: &LedgerSender,
        route: &Route,
        route_backend: usize,
        tokens: Tokens,
        tokens_source: &str,
        latency: Duration,
        bill: crate::metering::Bill,
    ) {
        ledger.record(LedgerRow {
            time_us: self.arrived_us,
            request_id: self.request_id.clone(),
            route: route.role.as_str().to_owned(),
            backend: route.backend.clone(),
            reason: route.reason.as_str().to_owned(),
            experiment: route.arm.as_ref().map(|(e, _)| e.clone()),
            arm: route.arm.as_ref().map(|(_, a)| a.clone()),
            p_local: route.p_local,
            fallback_from: route.fallback_from.clone(),
            status: self.status,
            outcome: self
                .outcome
                .unwrap_or(Outcome::Abandoned)
                .as_str()
                .to_owned(),
            stream: self.request.stream,
            input_tokens: tokens.input,
            output_tokens: tokens.output,
            tokens_source: tokens_source.to_owned(),
            latency_s: latency.as_secs_f64(),
            ttft_s: self.ttft.map(|t| t.as_secs_f64()),
            energy_source: self.recorder.metering.source().as_str().to_owned(),
            bill,
            guard: self.guard.as_ref().map(|g| {
                let local = g.local.unwrap_or(route_backend);
                crate::ledger::GuardRow {
                    decision: g.decision.as_str().to_owned(),
                    confidence: g.verdict.and_then(|v| v.confidence),
                    threshold: g.verdict.map_or(0.0, |v| v.threshold),
                    signals: g.verdict.and_then(|v| v.signals),
                    local_backend: self.recorder.backends[local].info().name.clone(),
                    local_input_tokens: g.local_tokens.input,
                    local_output_tokens: g.local_tokens.output,
                    local_flops: self.recorder.metering.flops(local, g.local_tokens),
                }
            }),
            prompt: self
                .recorder
                .store_prompts
                .then(|| self.request.text_messages()),
        });
    }
}
