//! The request pipeline, top to bottom:
//!
//! 1. parse and validate the OpenAI request ([`ChatRequest::parse`]) against `[limits]`, and
//!    charge it to its client's rate limits;
//! 2. route: a backend the client pinned by name, or, for the alias, the decision of the
//!    router of the request's experiment arm (when an experiment enrolls it) or of `[routing]`;
//!    then steer around backends whose circuit breaker is open (`local_unhealthy`,
//!    `cloud_unhealthy`);
//! 3. serve it on that backend, retrying transient cloud failures with backoff; if a local
//!    backend fails before anything reached the client, serve it on the cloud instead and say so;
//! 4. guard: a local answer the router chose is held and judged from its tokens'
//!    log-probabilities ([`crate::guard`]); a doubtful one is replaced by the cloud's answer to
//!    the same request, before the client has seen any of it;
//! 5. relay the answer (whole, or as a stream re-framed for the client) and meter it; a sample
//!    of local answers is then shadow-checked against the cloud, off the client's path.
//!
//! HTTP concerns (headers, status codes, body limits) live in `server`; this file decides and
//! accounts.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};

use crate::backends::{Backend, BackendError, Chunk, ChunkStream, Reply};
use crate::config::LimitsConfig;
use crate::config::{Config, GuardStream, Role};
use crate::error::ApiError;
use crate::experiments::shadow::{Shadow, ShadowJob};
use crate::experiments::{Enrollment, Experiments};
use crate::guard::{Decision as GuardDecision, Guard, Verdict};
use crate::ledger::{now_us, LedgerRow, LedgerSender};
use crate::limits::{Client, RateLimits};
use crate::metering::{Metering, Ticket, Tokens};
use crate::metrics::Metrics;
use crate::resilience::{health_signal, Admission, Breaker, RetryPolicy, Transition};
use crate::router::{Decision, Overrides, Reason, Router};
use crate::wire::{generated_text, ChatRequest, Usage};

mod guarded;
use guarded::{held_stream, Held};

/// Output kept per stream for counting tokens when the upstream reports no usage.
const MAX_COUNTED_OUTPUT_BYTES: usize = 4 * 1024 * 1024;

/// The routing gateway: backends, router, and the accounts every request is metered into.
pub struct Gateway {
    backends: Vec<Arc<dyn Backend>>,
    router: Router,
    experiments: Experiments,
    alias: String,
    fallback_to_cloud: bool,
    limits: LimitsConfig,
    rate_limits: RateLimits,
    log_prompts: bool,
    accounts: Arc<Accounts>,
}

/// What the HTTP layer knows about a chat request besides its body.
pub struct Inbound<'a> {
    /// Routing overrides from the request headers.
    pub overrides: Overrides,
    /// The request headers (an experiment's unit key may be one).
    pub headers: &'a HeaderMap,
    /// When the request arrived, so the reported overhead includes reading the body.
    pub started: Instant,
    /// The request id (goes into the ledger and every log line).
    pub id: &'a str,
    /// Who the request is charged to.
    pub client: &'a Client,
}

/// Where a finished request is accounted: Prometheus, the energy meter, the ledger.
pub struct Accounts {
    metrics: Arc<Metrics>,
    metering: Arc<Metering>,
    ledger: Option<LedgerSender>,
    backends: Vec<Arc<dyn Backend>>,
    shadow: Option<Arc<Shadow>>,
    /// One circuit breaker per backend, in config order.
    breakers: Vec<Breaker>,
    /// How cloud attempts are retried.
    retry: RetryPolicy,
    /// The quality guard.
    guard: Guard,
    /// The first cloud backend: where doubtful local answers escalate.
    cloud: Option<usize>,
}

/// Where a request was served and why: becomes the `x-wattgate-*` headers.
#[derive(Debug, Clone)]
pub struct Route {
    /// Local or cloud.
    pub role: Role,
    /// The backend's configured name.
    pub backend: String,
    /// The routing reason.
    pub reason: Reason,
    /// The learned router's estimate, when it ran.
    pub p_local: Option<f64>,
    /// The local backend that failed first, when this request fell back.
    pub fallback_from: Option<String>,
    /// The experiment and arm that routed it, when one enrolled it.
    pub arm: Option<(String, String)>,
    /// What the quality guard did, when it was asked to check this request's local answer.
    pub guard: Option<RouteGuard>,
}

/// The quality guard's part of a route (`x-wattgate-guard`, `x-wattgate-confidence`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteGuard {
    /// The decision's label; `hold` for a stream whose verdict comes after the headers.
    pub decision: &'static str,
    /// The local answer's confidence, when known.
    pub confidence: Option<f64>,
}

/// The gateway's answer to a routed request.
pub struct Answer {
    /// Where it was served.
    pub route: Route,
    /// Gateway time up to the first byte, excluding time spent waiting on upstreams.
    pub overhead: Duration,
    /// What to send.
    pub body: AnswerBody,
}

/// The payload of an [`Answer`].
pub enum AnswerBody {
    /// A whole JSON completion.
    Json(Bytes),
    /// Server-sent event frames, ending with `data: [DONE]` (or an error frame).
    Stream(BoxStream<'static, Bytes>),
    /// Every attempt failed.
    Error(ApiError),
}

impl Gateway {
    /// Assembles a gateway from validated config and built backends (same order as config).
    /// Fails when a configured router cannot be loaded.
    pub fn new(
        config: &Config,
        backends: Vec<Arc<dyn Backend>>,
        metrics: Arc<Metrics>,
        metering: Arc<Metering>,
        ledger: Option<LedgerSender>,
    ) -> Result<Self, String> {
        let shadow = Shadow::new(
            config,
            &backends,
            metering.clone(),
            metrics.clone(),
            ledger.clone(),
        )
        .map(Arc::new);
        let router = Router::new(&config.routing, &config.backends)?;
        Ok(Self {
            experiments: Experiments::new(config)?,
            alias: config.routing.alias.clone(),
            fallback_to_cloud: config.routing.fallback_to_cloud,
            limits: config.limits.clone(),
            rate_limits: RateLimits::new(&config.limits, &config.auth),
            log_prompts: config.server.log_prompts,
            accounts: Arc::new(Accounts {
                breakers: backends
                    .iter()
                    .map(|_| Breaker::new(&config.resilience))
                    .collect(),
                metrics,
                metering,
                ledger,
                backends: backends.clone(),
                shadow,
                retry: RetryPolicy::new(&config.resilience),
                guard: Guard::new(config)?,
                cloud: router.cloud(),
            }),
            router,
            backends,
        })
    }

    /// Serves one chat-completions request.
    pub async fn chat(&self, body: &[u8], inbound: Inbound<'_>) -> Result<Answer, ApiError> {
        let Inbound {
            overrides,
            headers,
            started,
            id: request_id,
            client,
        } = inbound;
        // 1. Parse, validate, charge the client's rate limits.
        let request = ChatRequest::parse(body)?;
        request.check_limits(&self.limits)?;
        if let Err(refusal) = self.rate_limits.charge(client, request.estimated_tokens()) {
            self.accounts
                .metrics
                .rejected
                .with_label_values(&[refusal.limit.reason()])
                .inc();
            return Err(refusal.to_api_error(client));
        }
        if self.log_prompts {
            tracing::debug!(request_id, prompt = %request.prompt_text(), "prompt");
        }
        let mut request = request;

        // 2. Route: the enrolled arm's router, else the configured one. The guard's plan is
        //    known before serving, so a local backend collects the signals it will read.
        let routed = request.model == self.alias;
        let enrollment = routed
            .then(|| self.experiments.enroll(&request, headers, request_id))
            .flatten();
        let plan = self.accounts.guard.plan(
            overrides.guard,
            enrollment.and_then(|e| self.experiments.guard(e)),
        );
        let decision = self.route(&request, overrides, enrollment)?;
        let decision = self.avoid_unhealthy(&request, decision);
        // Only what the router sent local on its own judgement is checked (not pinned or
        // forced routes, nor `local_only`), and only when there is a cloud to escalate to; only
        // then does the local backend collect log-probabilities.
        request.set_wants_signals(
            routed
                && plan.check
                && self.accounts.cloud.is_some()
                && matches!(decision.reason, Reason::RouterLocal | Reason::PreferLocal),
        );
        let request = Arc::new(request);

        // 3. Serve, with fallback to the cloud before the first byte.
        let mut meter = RequestMeter::start(
            self.accounts.clone(),
            request.clone(),
            request_id,
            client,
            started,
        );
        let (decision, fallback_from, first_failure, result, upstream_wait) =
            self.serve(&request, decision).await;
        let info = self.backends[decision.backend].info();
        let mut route = Route {
            role: info.role,
            backend: info.name.clone(),
            reason: decision.reason,
            p_local: decision.p_local,
            fallback_from: fallback_from.map(|i| self.backends[i].info().name.clone()),
            arm: enrollment
                .and_then(|e| self.experiments.names(e))
                .map(|(e, a)| (e.to_owned(), a.to_owned())),
            guard: None,
        };
        meter.routed(&route, decision.backend);
        let shadowed = route.role == Role::Local
            && route.reason != Reason::Pinned
            && self
                .accounts
                .shadow
                .as_ref()
                .is_some_and(|s| s.sampled(request_id));
        if shadowed {
            meter.answer = Some(String::new());
        }
        // A local answer to a request planned for the guard (not a cloud fallback of it).
        let guarded = request.wants_signals() && route.role == Role::Local;

        // 4. Relay and meter; a checked local answer is held until the guard has judged it.
        let mut upstream_wait = upstream_wait;
        let body = match result {
            Ok(Reply::Complete(completion)) if guarded => {
                let waited = Instant::now();
                let (served, body) = self
                    .accounts
                    .check_complete(
                        &request, &plan, decision, completion, &mut route, &mut meter,
                    )
                    .await;
                upstream_wait += waited.elapsed();
                meter.routed(&route, served);
                AnswerBody::Json(body)
            }
            Ok(Reply::Complete(completion)) => {
                meter.delivered_whole(&completion);
                AnswerBody::Json(completion.body)
            }
            Ok(Reply::Stream(opened)) if guarded && plan.stream == GuardStream::Hold => {
                route.guard = Some(RouteGuard {
                    decision: "hold",
                    confidence: None,
                });
                meter.first_byte();
                AnswerBody::Stream(held_stream(
                    opened,
                    Held {
                        accounts: self.accounts.clone(),
                        request: request.clone(),
                        plan,
                        decision,
                        route: route.clone(),
                        meter,
                    },
                ))
            }
            Ok(Reply::Stream(opened)) => {
                if guarded {
                    let decision = crate::guard::Decision::Unchecked;
                    route.guard = Some(RouteGuard {
                        decision: decision.as_str(),
                        confidence: None,
                    });
                    meter.guard = Some(GuardLeg::unchecked(decision));
                }
                meter.first_byte();
                AnswerBody::Stream(client_stream(
                    opened.first,
                    opened.rest,
                    request.include_usage,
                    meter,
                ))
            }
            Err(e) => {
                let mut error = e.to_api_error(&route.backend);
                meter.finish(Outcome::Error, None, error.status.as_u16());
                if let (Some(from), Some(first)) = (&route.fallback_from, &first_failure) {
                    error.message = format!(
                        "{} (This was a fallback: local backend `{from}` failed first: {first}.)",
                        error.message
                    );
                }
                AnswerBody::Error(error)
            }
        };
        let overhead = started.elapsed().saturating_sub(upstream_wait);
        self.accounts
            .metrics
            .overhead
            .with_label_values(&[route.role.as_str()])
            .observe(overhead.as_secs_f64());
        Ok(Answer {
            route,
            overhead,
            body,
        })
    }

    /// A pinned backend when `model` names one; for the alias, the choice of the enrolled
    /// arm's router, or of the configured one.
    fn route(
        &self,
        request: &ChatRequest,
        overrides: Overrides,
        enrollment: Option<Enrollment>,
    ) -> Result<Decision, ApiError> {
        if request.model == self.alias {
            let started = Instant::now();
            let router = enrollment
                .and_then(|e| self.experiments.router(e))
                .unwrap_or(&self.router);
            let decision = router.decide(request, overrides);
            let metrics = &self.accounts.metrics;
            metrics
                .router_duration
                .with_label_values(&[decision.reason.as_str()])
                .observe(started.elapsed().as_secs_f64());
            metrics
                .router_decisions
                .with_label_values(&[decision.reason.as_str()])
                .inc();
            return Ok(decision);
        }
        match self
            .backends
            .iter()
            .position(|b| b.info().name == request.model)
        {
            Some(backend) => Ok(Decision {
                backend,
                reason: Reason::Pinned,
                p_local: None,
            }),
            None => Err(ApiError::model_not_found(&request.model, &self.model_ids())),
        }
    }

    /// Steers an alias decision away from a backend whose circuit breaker is open: an open local
    /// backend sends the request to the cloud (`local_unhealthy`); an open cloud backend sends it
    /// to the first healthy local backend able to serve it (`cloud_unhealthy`). Pinned and forced
    /// routes, and requests only the cloud can serve, keep their backend and fail fast instead.
    fn avoid_unhealthy(&self, request: &ChatRequest, decision: Decision) -> Decision {
        let breakers = &self.accounts.breakers;
        if !breakers[decision.backend].is_refusing()
            || matches!(
                decision.reason,
                Reason::Pinned | Reason::ForcedLocal | Reason::ForcedCloud
            )
        {
            return decision;
        }
        let healthy = |i: &usize| !breakers[*i].is_refusing();
        let target = match self.backends[decision.backend].info().role {
            Role::Local => self
                .router
                .cloud()
                .filter(healthy)
                .map(|c| (c, Reason::LocalUnhealthy)),
            Role::Cloud => self
                .router
                .capable_locals(request)
                .find(healthy)
                .map(|l| (l, Reason::CloudUnhealthy)),
        };
        match target {
            Some((backend, reason)) => Decision {
                backend,
                reason,
                p_local: decision.p_local,
            },
            None => decision,
        }
    }

    /// Runs the decided backend; on a local failure, the cloud. Returns the decision that
    /// produced the result, the backend that failed first and how (if it fell back), the
    /// result, and the time spent waiting on upstreams.
    async fn serve(
        &self,
        request: &ChatRequest,
        decision: Decision,
    ) -> (
        Decision,
        Option<usize>,
        Option<BackendError>,
        Result<Reply, BackendError>,
        Duration,
    ) {
        let waited = Instant::now();
        let first = self.attempt(decision.backend, request).await;
        let err = match first {
            Ok(reply) => return (decision, None, None, Ok(reply), waited.elapsed()),
            Err(e) => e,
        };
        let Some(cloud) = self.fallback_target(decision) else {
            return (decision, None, None, Err(err), waited.elapsed());
        };
        let from = self.backends[decision.backend].info();
        let to = self.backends[cloud].info();
        tracing::warn!(
            from = %from.name,
            to = %to.name,
            error = %err,
            "local backend failed before the first byte; falling back to the cloud"
        );
        self.accounts
            .metrics
            .fallbacks
            .with_label_values(&[from.name.as_str(), to.name.as_str(), err.kind()])
            .inc();
        let fallback = Decision {
            backend: cloud,
            reason: fallback_reason(&err),
            p_local: decision.p_local,
        };
        let result = self.attempt(cloud, request).await;
        (
            fallback,
            Some(decision.backend),
            Some(err),
            result,
            waited.elapsed(),
        )
    }

    /// One backend's answer, through its circuit breaker and retries ([`Accounts::attempt`]).
    async fn attempt(&self, index: usize, request: &ChatRequest) -> Result<Reply, BackendError> {
        self.accounts.attempt(index, request).await
    }

    /// The cloud backend to retry on, when fallback applies to this decision.
    fn fallback_target(&self, decision: Decision) -> Option<usize> {
        let failed_locally = self.backends[decision.backend].info().role == Role::Local;
        if !self.fallback_to_cloud || !failed_locally || decision.reason == Reason::Pinned {
            return None;
        }
        self.router.cloud()
    }

    /// The ids `/v1/models` lists: the alias, then every backend.
    pub fn model_ids(&self) -> Vec<&str> {
        std::iter::once(self.alias.as_str())
            .chain(self.backends.iter().map(|b| b.info().name.as_str()))
            .collect()
    }

    /// The configured backends, in config order.
    pub fn backends(&self) -> &[Arc<dyn Backend>] {
        &self.backends
    }

    /// The routing alias.
    pub fn alias(&self) -> &str {
        &self.alias
    }

    /// The configured experiments.
    pub fn experiments(&self) -> &Experiments {
        &self.experiments
    }

    /// The ledger writer, when the ledger is on.
    pub fn ledger(&self) -> Option<&LedgerSender> {
        self.accounts.ledger.as_ref()
    }

    /// The Prometheus series.
    pub fn metrics(&self) -> &Metrics {
        &self.accounts.metrics
    }

    /// The energy meter and prices.
    pub fn metering(&self) -> &Metering {
        &self.accounts.metering
    }

    /// Brings the scrape-time gauges (queue depths, idle energy) up to date.
    pub fn refresh_gauges(&self) {
        let metrics = &self.accounts.metrics;
        for backend in &self.backends {
            if let Some(depth) = backend.queue_depth() {
                metrics
                    .queue_depth
                    .with_label_values(&[backend.info().name.as_str()])
                    .set(i64::try_from(depth).unwrap_or(i64::MAX));
            }
        }
        let metering = &self.accounts.metering;
        metering.sample();
        metrics
            .idle_energy
            .with_label_values(&[metering.source().as_str()])
            .set(metering.totals().idle_joules);
    }
}

fn fallback_reason(e: &BackendError) -> Reason {
    match e {
        BackendError::Timeout { .. } => Reason::FallbackLocalTimeout,
        BackendError::Unreachable { .. } => Reason::FallbackLocalUnreachable,
        BackendError::NotConfigured { .. } => Reason::FallbackLocalNotConfigured,
        BackendError::Busy { .. } => Reason::LocalBusy,
        BackendError::ContextTooLong { .. } => Reason::ContextTooLong,
        BackendError::Unsupported { .. } => Reason::LocalUnsupported,
        BackendError::Status { .. }
        | BackendError::Protocol { .. }
        | BackendError::Internal { .. } => Reason::FallbackLocalError,
        BackendError::CircuitOpen { .. } => Reason::LocalUnhealthy,
    }
}

/// A stream that ends with an internal error instead of unwinding when the backend panics
/// mid-stream, so the client gets an error frame and the request is accounted.
fn panic_safe(rest: ChunkStream, backend: &str) -> ChunkStream {
    let backend = backend.to_owned();
    AssertUnwindSafe(rest)
        .catch_unwind()
        .map(move |item| item.unwrap_or_else(|panic| Err(panicked(&backend, &*panic))))
        .boxed()
}

/// A backend's panic as the failure of that backend, logged once.
fn panicked(backend: &str, payload: &(dyn std::any::Any + Send)) -> BackendError {
    let what = crate::backends::panic_message(payload);
    tracing::error!(backend = %backend, "backend panicked: {what}");
    BackendError::Internal {
        detail: format!("the backend panicked: {what}"),
    }
}

/// How a chat request ended, for `wattgate_chat_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Error,
    Cancelled,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// Accounts for one chat request from routing to its last byte. Recording happens on drop, so
/// a stream the client abandons is still counted (as `cancelled`) and still reaches the ledger.
struct RequestMeter {
    accounts: Arc<Accounts>,
    request: Arc<ChatRequest>,
    request_id: String,
    client: String,
    started: Instant,
    arrived_us: u64,
    ticket: Option<Ticket>,
    route: Option<(Route, usize)>,
    outcome: Outcome,
    status: u16,
    usage: Option<Usage>,
    ttft: Option<Duration>,
    /// Answer bytes kept while no usage has been seen (bounded), to count tokens from.
    output: Vec<Bytes>,
    output_bytes: usize,
    /// The answer's text, kept only for requests sampled for a shadow check.
    answer: Option<String>,
    /// The quality guard's part, when it was asked to check this request.
    guard: Option<GuardLeg>,
}

/// What the quality guard did with one request, for its ledger row and counters.
#[derive(Debug, Clone)]
struct GuardLeg {
    decision: GuardDecision,
    verdict: Option<Verdict>,
    /// The local backend whose answer was checked (None: the route's backend).
    local: Option<usize>,
    /// Tokens of the local answer (the leg an escalated request paid for and discarded).
    local_tokens: Tokens,
}

impl GuardLeg {
    fn unchecked(decision: GuardDecision) -> Self {
        Self {
            decision,
            verdict: None,
            local: None,
            local_tokens: Tokens::default(),
        }
    }
}

impl RequestMeter {
    fn start(
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

    fn routed(&mut self, route: &Route, backend: usize) {
        self.route = Some((route.clone(), backend));
    }

    fn first_byte(&mut self) {
        self.ttft = Some(self.started.elapsed());
    }

    /// Keeps answer bytes for counting, until usage arrives or the bound is reached.
    fn keep_output(&mut self, data: &Bytes) {
        if self.usage.is_none() && self.output_bytes < MAX_COUNTED_OUTPUT_BYTES {
            self.output_bytes += data.len();
            self.output.push(data.clone());
        }
    }

    /// A whole completion is what the client gets: its first byte, its usage (or its text to
    /// count), and its text for a shadow check when sampled.
    fn delivered_whole(&mut self, completion: &crate::backends::Completion) {
        self.first_byte();
        if completion.usage.is_none() {
            self.keep_output(&completion.body);
        }
        if let Some(answer) = &mut self.answer {
            generated_text(&completion.body, answer);
        }
        self.finish(Outcome::Ok, completion.usage, 200);
    }

    fn finish(&mut self, outcome: Outcome, usage: Option<Usage>, status: u16) {
        self.outcome = outcome;
        self.usage = usage;
        self.status = status;
    }

    /// Tokens of this request: the upstream's usage, else counted from the prompt and the
    /// answer that reached the client (never zero for a non-empty exchange).
    fn tokens(&self, served: usize) -> (Tokens, &'static str) {
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

impl Accounts {
    /// One backend's answer, through its circuit breaker. Cloud attempts that fail before the
    /// first byte with a transient error are retried with backoff (or the upstream's
    /// `Retry-After`) until `[resilience]`'s retries or deadline run out. A backend that panics
    /// is an internal failure of that backend, not of the gateway.
    async fn attempt(&self, index: usize, request: &ChatRequest) -> Result<Reply, BackendError> {
        let backend = &self.backends[index];
        let info = backend.info();
        let name = info.name.as_str();
        let metrics = &self.metrics;
        let started = Instant::now();
        let mut retry = 0;
        loop {
            // An open breaker refuses without an attempt (CircuitOpen is never retried).
            let result = match self.admit(index) {
                Err(refused) => Err(refused),
                Ok(admission) => {
                    let result = AssertUnwindSafe(backend.chat(request))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|panic| Err(panicked(name, &*panic)));
                    self.record_health(index, admission, health_signal(result.as_ref().err()));
                    result
                }
            };
            let error = match result {
                Ok(Reply::Stream(mut opened)) => {
                    opened.rest = panic_safe(opened.rest, name);
                    return Ok(Reply::Stream(opened));
                }
                Ok(reply) => return Ok(reply),
                Err(e) => e,
            };
            tracing::debug!(backend = %name, error = %error, "upstream attempt failed");
            metrics
                .upstream_errors
                .with_label_values(&[name, error.kind()])
                .inc();
            // Local attempts are not retried: a failed local attempt falls back to the cloud.
            let wait = (info.role == Role::Cloud)
                .then(|| {
                    self.retry
                        .wait_before_retry(&error, retry, started.elapsed())
                })
                .flatten();
            let Some(wait) = wait else {
                return Err(error);
            };
            retry += 1;
            metrics
                .retries
                .with_label_values(&[name, error.kind()])
                .inc();
            tracing::info!(
                backend = %name,
                error = %error,
                retry,
                wait_ms = wait.as_millis() as u64,
                "retrying upstream attempt"
            );
            tokio::time::sleep(wait).await;
        }
    }

    fn count_tokens(&self, served: usize, text: &str) -> (u64, &'static str) {
        crate::backends::count_tokens(&self.backends, served, text)
    }

    /// Asks backend `index`'s breaker for an attempt.
    fn admit(&self, index: usize) -> Result<Admission, BackendError> {
        match self.breakers[index].admit() {
            Ok((admission, transition)) => {
                self.transitioned(index, transition);
                Ok(admission)
            }
            Err(wait) => Err(BackendError::CircuitOpen {
                retry_after_s: wait.as_secs_f64().ceil().max(1.0) as u64,
            }),
        }
    }

    /// Feeds an attempt's outcome to backend `index`'s breaker.
    fn record_health(&self, index: usize, admission: Admission, healthy: Option<bool>) {
        let transition = self.breakers[index].record(admission, healthy);
        self.transitioned(index, transition);
    }

    /// A stream of backend `index` broke after its first byte.
    fn record_late_failure(&self, index: usize) {
        let transition = self.breakers[index].record_late_failure();
        self.transitioned(index, transition);
    }

    fn transitioned(&self, index: usize, transition: Option<Transition>) {
        let Some(Transition(state)) = transition else {
            return;
        };
        let name = self.backends[index].info().name.as_str();
        match state {
            crate::resilience::CircuitState::Open => tracing::warn!(
                backend = %name,
                "circuit breaker opened: too many failed attempts; routing around this backend"
            ),
            _ => tracing::info!(backend = %name, state = state.as_str(), "circuit breaker"),
        }
        self.metrics
            .circuit_state
            .with_label_values(&[name])
            .set(state.gauge());
        self.metrics
            .circuit_transitions
            .with_label_values(&[name, state.as_str()])
            .inc();
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

/// Re-frames an upstream stream for the client: drops the usage chunk the gateway asked for on
/// its own behalf, ends with `[DONE]`, and turns a mid-stream failure into an error frame.
/// The request is accounted (its ledger row queued) before the last frame goes out, so a client
/// that posts feedback as soon as it has read `[DONE]` always finds its request.
fn client_stream(
    first: Chunk,
    rest: ChunkStream,
    client_wants_usage: bool,
    meter: RequestMeter,
) -> BoxStream<'static, Bytes> {
    struct State {
        first: Option<Chunk>,
        rest: ChunkStream,
        client_wants_usage: bool,
        /// Taken (and so recorded) when the stream ends; dropped unrecorded-yet when the client
        /// goes away first, which records it as cancelled.
        meter: Option<RequestMeter>,
    }
    let state = State {
        first: Some(first),
        rest,
        client_wants_usage,
        meter: Some(meter),
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            let meter = s.meter.as_mut()?;
            let next = match s.first.take() {
                Some(chunk) => Some(Ok(chunk)),
                None => s.rest.next().await,
            };
            match next {
                None => {
                    meter.outcome = Outcome::Ok;
                    drop(s.meter.take());
                    return Some((Bytes::from_static(b"data: [DONE]\n\n"), s));
                }
                Some(Err(e)) => {
                    meter.outcome = Outcome::Error;
                    if let Some((_, served)) = &meter.route {
                        meter.accounts.record_late_failure(*served);
                    }
                    let backend = meter.route.as_ref().map_or("", |(r, _)| r.backend.as_str());
                    tracing::warn!(backend, error = %e, "upstream stream failed after the first byte");
                    let error = e.to_api_error(backend);
                    drop(s.meter.take());
                    return Some((sse_frame(&error.to_json()), s));
                }
                Some(Ok(chunk)) => {
                    if chunk.usage.is_some() {
                        meter.usage = chunk.usage;
                        meter.output = Vec::new();
                    } else {
                        meter.keep_output(&chunk.data);
                    }
                    if let Some(answer) = &mut meter.answer {
                        generated_text(&chunk.data, answer);
                    }
                    if chunk.is_error {
                        meter.outcome = Outcome::Error;
                    }
                    if s.client_wants_usage {
                        return Some((sse_frame(&chunk.data), s));
                    }
                    if chunk.usage_only {
                        continue;
                    }
                    return Some((sse_frame(&without_usage(&chunk.data)), s));
                }
            }
        }
    })
    .boxed()
}

/// Removes a `usage` key the client did not ask for; other chunks pass through unchanged.
fn without_usage(data: &Bytes) -> Bytes {
    if !data.windows(7).any(|w| w == b"\"usage\"") {
        return data.clone();
    }
    match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(data) {
        Ok(mut chunk) => {
            chunk.remove("usage");
            serde_json::to_vec(&chunk).map_or_else(|_| data.clone(), Bytes::from)
        }
        Err(_) => data.clone(),
    }
}

fn sse_frame(data: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(data.len() + 8);
    frame.put_slice(b"data: ");
    frame.put_slice(data);
    frame.put_slice(b"\n\n");
    frame.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_the_usage_key() {
        let data = Bytes::from_static(
            br#"{"id":"c","choices":[{"index":0,"delta":{"content":"a \"usage\" b"}}],"usage":null}"#,
        );
        assert_eq!(
            &without_usage(&data)[..],
            br#"{"id":"c","choices":[{"index":0,"delta":{"content":"a \"usage\" b"}}]}"#
        );
        let plain = Bytes::from_static(br#"{"id":"c","choices":[]}"#);
        assert_eq!(without_usage(&plain), plain);
    }
}
