//! One request's accounting, from routing to its last byte: what it cost, what it saved, and
//! the ledger row. Recording happens on drop, so an abandoned stream is still counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Accounts, Route};
use crate::config::Role;
use crate::experiments::shadow::ShadowJob;
use crate::guard::{Decision as GuardDecision, Verdict};
use crate::ledger::{now_us, LedgerRow, LedgerSender};
use crate::limits::Client;
use crate::metering::{Ticket, Tokens};
use crate::wire::{generated_text, ChatRequest, Usage};

/// Output kept per stream for counting tokens when the upstream reports no usage.
const MAX_COUNTED_OUTPUT_BYTES: usize = 4 * 1024 * 1024;

/// How a chat request ended, for `wattgate_chat_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Ok,
    Error,
    Cancelled,
}

impl Outcome {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// Accounts for one chat request from routing to its last byte. Recording happens on drop, so
/// a stream the client abandons is still counted (as `cancelled`) and still reaches the ledger.
pub(super) struct RequestMeter {
    pub(super) accounts: Arc<Accounts>,
    pub(super) request: Arc<ChatRequest>,
    pub(super) request_id: String,
    pub(super) client: String,
    pub(super) started: Instant,
    pub(super) arrived_us: u64,
    pub(super) ticket: Option<Ticket>,
    pub(super) route: Option<(Route, usize)>,
    pub(super) outcome: Outcome,
    pub(super) status: u16,
    pub(super) usage: Option<Usage>,
    pub(super) ttft: Option<Duration>,
    /// Answer bytes kept while no usage has been seen (bounded), to count tokens from.
    pub(super) output: Vec<Bytes>,
    pub(super) output_bytes: usize,
    /// The answer's text, kept only for requests sampled for a shadow check.
    pub(super) answer: Option<String>,
    /// The quality guard's part, when it was asked to check this request.
    pub(super) guard: Option<GuardLeg>,
}

/// What the quality guard did with one request, for its ledger row and counters.
#[derive(Debug, Clone)]
pub(super) struct GuardLeg {
    pub(super) decision: GuardDecision,
    pub(super) verdict: Option<Verdict>,
    /// The local backend whose answer was checked (None: the route's backend).
    pub(super) local: Option<usize>,
    /// Tokens of the local answer (the leg an escalated request paid for and discarded).
    pub(super) local_tokens: Tokens,
}

impl GuardLeg {
    pub(super) fn unchecked(decision: GuardDecision) -> Self {
        Self {
            decision,
            verdict: None,
            local: None,
            local_tokens: Tokens::default(),
        }
    }
}

impl RequestMeter {
    pub(super) fn start(
        accounts: Arc<Accounts>,
        request: Arc<ChatRequest>,
        request_id: &str,
        client: &Client,
        started: Instant,
    ) -> Self {
        accounts.metrics.in_flight.inc();
        let ticket = accounts.metering.begin();
        Self {
            arrived_us: now_us().saturating_sub(started.elapsed().as_micros() as u64),
            accounts,
            request,
            request_id: request_id.to_owned(),
            client: client.to_string(),
            started,
            ticket: Some(ticket),
            route: None,
            outcome: Outcome::Cancelled,
            // A cancelled request's client saw the 200 headers of a stream.
            status: 200,
            usage: None,
            ttft: None,
            output: Vec::new(),
            output_bytes: 0,
            answer: None,
            guard: None,
        }
    }

    pub(super) fn routed(&mut self, route: &Route, backend: usize) {
        self.route = Some((route.clone(), backend));
    }

    pub(super) fn first_byte(&mut self) {
        self.ttft = Some(self.started.elapsed());
    }

    /// Keeps answer bytes for counting, until usage arrives or the bound is reached.
    pub(super) fn keep_output(&mut self, data: &Bytes) {
        if self.usage.is_none() && self.output_bytes < MAX_COUNTED_OUTPUT_BYTES {
            self.output_bytes += data.len();
            self.output.push(data.clone());
        }
    }

    /// A whole completion is what the client gets: its first byte, its usage (or its text to
    /// count), and its text for a shadow check when sampled.
    pub(super) fn delivered_whole(&mut self, completion: &crate::backends::Completion) {
        self.first_byte();
        if completion.usage.is_none() {
            self.keep_output(&completion.body);
        }
        if let Some(answer) = &mut self.answer {
            generated_text(&completion.body, answer);
        }
        self.finish(Outcome::Ok, completion.usage, 200);
    }

    pub(super) fn finish(&mut self, outcome: Outcome, usage: Option<Usage>, status: u16) {
        self.outcome = outcome;
        self.usage = usage;
        self.status = status;
    }

    /// Tokens of this request: the upstream's usage, else counted from the prompt and the
    /// answer that reached the client (never zero for a non-empty exchange).
    pub(super) fn tokens(&self, served: usize) -> (Tokens, &'static str) {
        if let Some(u) = self.usage {
            let tokens = Tokens {
                input: u.prompt_tokens,
                output: u.completion_tokens,
            };
            return (tokens, "upstream");
        }
        // An error before any answer: the upstream produced nothing to pay for.
        if self.outcome == Outcome::Error && self.output.is_empty() {
            return (Tokens::default(), "none");
        }
        let mut answer = String::new();
        for data in &self.output {
            generated_text(data, &mut answer);
        }
        let (input, source) = self
            .accounts
            .count_tokens(served, &self.request.prompt_text());
        let (output, _) = self.accounts.count_tokens(served, &answer);
        (Tokens { input, output }, source)
    }
}

impl Drop for RequestMeter {
    fn drop(&mut self) {
        let accounts = self.accounts.clone();
        let metrics = &accounts.metrics;
        metrics.in_flight.dec();
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        let Some((route, served)) = self.route.take() else {
            accounts.metering.release(ticket);
            return;
        };
        let (tokens, tokens_source) = self.tokens(served);
        let bill = match &self.guard {
            Some(g) if g.decision == GuardDecision::Escalated => {
                let local = g.local.unwrap_or(served);
                accounts
                    .metering
                    .end_escalated(ticket, served, tokens, local, g.local_tokens)
            }
            _ => accounts.metering.end(ticket, served, tokens),
        };
        if let Some(g) = &self.guard {
            let local = g.local.unwrap_or(served);
            let name = accounts.backends[local].info().name.as_str();
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
            outcome = self.outcome.as_str(),
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
            .with_label_values(&[
                role,
                backend,
                reason,
                self.outcome.as_str(),
                experiment,
                arm,
            ])
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
        let source = accounts.metering.source().as_str();
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
        match &accounts.ledger {
            None => metrics.ledger_rows.with_label_values(&["disabled"]).inc(),
            Some(ledger) => {
                self.record(ledger, &route, served, tokens, tokens_source, latency, bill);
                metrics.ledger_rows.with_label_values(&["queued"]).inc();
            }
        }
        // After the row is queued, so the verdict always finds its request.
        if let (Some(shadow), Some(answer)) = (&accounts.shadow, self.answer.take()) {
            if route.role == Role::Local && self.outcome == Outcome::Ok {
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
    pub(super) fn record(
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
            outcome: self.outcome.as_str().to_owned(),
            stream: self.request.stream,
            input_tokens: tokens.input,
            output_tokens: tokens.output,
            tokens_source: tokens_source.to_owned(),
            latency_s: latency.as_secs_f64(),
            ttft_s: self.ttft.map(|t| t.as_secs_f64()),
            energy_source: self.accounts.metering.source().as_str().to_owned(),
            bill,
            guard: self.guard.as_ref().map(|g| {
                let local = g.local.unwrap_or(route_backend);
                crate::ledger::GuardRow {
                    decision: g.decision.as_str().to_owned(),
                    confidence: g.verdict.and_then(|v| v.confidence),
                    threshold: g.verdict.map_or(0.0, |v| v.threshold),
                    signals: g.verdict.and_then(|v| v.signals),
                    local_backend: self.accounts.backends[local].info().name.clone(),
                    local_input_tokens: g.local_tokens.input,
                    local_output_tokens: g.local_tokens.output,
                    local_flops: self.accounts.metering.flops(local, g.local_tokens),
                }
            }),
        });
    }
}
