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
//! HTTP concerns (headers, status codes, body limits) live in `server`; this file decides, and
//! its modules carry out: `accounts` (each attempt through its breaker and retries, and where
//! requests are accounted), `stream` (the SSE the client reads) and `guarded` (a local answer
//! held until the guard's verdict). What a request cost, and its ledger row, is
//! [`crate::metering::request`]'s: the pipeline only tells the meter what happened.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::backends::{Backend, BackendError, Reply};
use crate::config::LimitsConfig;
use crate::config::{Config, GuardStream, Role};
use crate::error::ApiError;
use crate::experiments::shadow::Shadow;
use crate::experiments::Enrollment;
use crate::guard::Guard;
use crate::ledger::LedgerSender;
use crate::limits::{Client, RateLimits};
use crate::metering::{GuardLeg, Metering, Outcome, Recorder, RequestMeter};
use crate::metrics::Metrics;
use crate::resilience::{Breaker, RetryPolicy};
use crate::router::{Decision, Overrides, Reason};
use crate::wire::native::Native;
use crate::wire::ChatRequest;

mod accounts;
mod guarded;
mod routing;
mod stream;

pub use accounts::Accounts;
use guarded::{held_stream, Held};
pub use routing::{Loaded, Routes, Routing};
use stream::client_stream;

/// The routing gateway: backends, router, and the accounts every request is metered into.
pub struct Gateway {
    backends: Vec<Arc<dyn Backend>>,
    routes: Routes,
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
    /// The request as it came, when the edge passes it through natively (the body is then
    /// its chat view: [`crate::wire::native`]).
    pub native: Option<Arc<Native>>,
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
        let routes = Routes::new(config)?;
        let cloud = routes.current().router.cloud();
        Ok(Self {
            alias: config.routing.alias.clone(),
            fallback_to_cloud: config.routing.fallback_to_cloud,
            limits: config.limits.clone(),
            rate_limits: RateLimits::new(&config.limits, &config.auth),
            log_prompts: config.server.log_prompts,
            accounts: Arc::new(Accounts {
                recorder: Arc::new(Recorder::new(
                    metrics.clone(),
                    metering.clone(),
                    ledger.clone(),
                    backends.clone(),
                    shadow.clone(),
                    config.ledger.store_prompts,
                )),
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
                cloud,
            }),
            routes,
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
            native,
        } = inbound;
        // 1. Parse, validate, charge the client's rate limits.
        let mut request = ChatRequest::parse(body)?;
        request.set_native(native);
        request.check_limits(&self.limits)?;
        self.charge(client, request.estimated_tokens())?;
        if self.log_prompts {
            tracing::debug!(request_id, prompt = %request.prompt_text(), "prompt");
        }

        // 2. Route: the enrolled arm's router, else the configured one, from one snapshot of
        //    the routers (a reload swaps them between requests, never inside one). The guard's
        //    plan is known before serving, so a local backend collects the signals it will read.
        let routing = self.routes.current();
        let routed = request.model == self.alias;
        let enrollment = routed
            .then(|| routing.experiments.enroll(&request, headers, request_id))
            .flatten();
        let plan = self.accounts.guard.plan(
            overrides.guard,
            enrollment.and_then(|e| routing.experiments.guard(e)),
        );
        let decision = self.route(&routing, &request, overrides, enrollment)?;
        let decision = self.avoid_unhealthy(&routing, &request, decision);
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

        // 3. Serve, with fallback to the cloud before the first byte. The meter knows the
        //    route from the start, so a request its client abandons is still recorded.
        let arm = enrollment
            .and_then(|e| routing.experiments.names(e))
            .map(|(e, a)| (e.to_owned(), a.to_owned()));
        let mut meter = RequestMeter::start(
            self.accounts.recorder.clone(),
            request.clone(),
            request_id,
            client,
            started,
        );
        meter.routed(&self.route_for(decision, None, &arm), decision.backend);
        let Served {
            decision,
            fallback_from,
            first_failure,
            result,
            upstream_wait,
        } = self.serve(&request, decision, &mut meter, &arm).await;
        let mut route = self.route_for(decision, fallback_from, &arm);
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
                    self.accounts.clone(),
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
        routing: &Routing,
        request: &ChatRequest,
        overrides: Overrides,
        enrollment: Option<Enrollment>,
    ) -> Result<Decision, ApiError> {
        if request.model == self.alias {
            let started = Instant::now();
            let router = enrollment
                .and_then(|e| routing.experiments.router(e))
                .unwrap_or(&routing.router);
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
    fn avoid_unhealthy(
        &self,
        routing: &Routing,
        request: &ChatRequest,
        decision: Decision,
    ) -> Decision {
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
                .accounts
                .cloud
                .filter(healthy)
                .map(|c| (c, Reason::LocalUnhealthy)),
            Role::Cloud => routing
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

    /// Where a decision serves, as the client's headers and the meter see it.
    fn route_for(
        &self,
        decision: Decision,
        fallback_from: Option<usize>,
        arm: &Option<(String, String)>,
    ) -> Route {
        let info = self.backends[decision.backend].info();
        Route {
            role: info.role,
            backend: info.name.clone(),
            reason: decision.reason,
            p_local: decision.p_local,
            fallback_from: fallback_from.map(|i| self.backends[i].info().name.clone()),
            arm: arm.clone(),
            guard: None,
        }
    }

    /// Runs the decided backend; on a local failure, the cloud (and tells the meter it moved).
    async fn serve(
        &self,
        request: &ChatRequest,
        decision: Decision,
        meter: &mut RequestMeter,
        arm: &Option<(String, String)>,
    ) -> Served {
        let waited = Instant::now();
        let first = self.attempt(decision.backend, request).await;
        let err = match first {
            Ok(reply) => return Served::first_try(decision, Ok(reply), waited),
            Err(e) => e,
        };
        let Some(cloud) = self.fallback_target(decision) else {
            return Served::first_try(decision, Err(err), waited);
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
        meter.routed(
            &self.route_for(fallback, Some(decision.backend), arm),
            cloud,
        );
        let result = self.attempt(cloud, request).await;
        Served {
            decision: fallback,
            fallback_from: Some(decision.backend),
            first_failure: Some(err),
            result,
            upstream_wait: waited.elapsed(),
        }
    }

    /// One backend's answer, through its circuit breaker and retries ([`Accounts::attempt`]).
    async fn attempt(&self, index: usize, request: &ChatRequest) -> Result<Reply, BackendError> {
        let backend = &self.backends[index];
        if let Some(native) = request.native().filter(|n| !backend.speaks(n.api)) {
            return Err(BackendError::Unsupported {
                detail: format!(
                    "{} It does not speak the {} API natively (the request has no chat translation).",
                    native.why,
                    native.api.name()
                ),
            });
        }
        self.accounts.attempt(index, request).await
    }

    /// The cloud backend to retry on, when fallback applies to this decision.
    fn fallback_target(&self, decision: Decision) -> Option<usize> {
        let failed_locally = self.backends[decision.backend].info().role == Role::Local;
        if !self.fallback_to_cloud || !failed_locally || decision.reason == Reason::Pinned {
            return None;
        }
        self.accounts.cloud
    }

    /// Charges one request of `tokens` to `client`'s rate limits, or refuses it (429, counted in
    /// `wattgate_rejected_requests_total`). Chat and embeddings requests share the limits.
    pub fn charge(&self, client: &Client, tokens: u64) -> Result<(), ApiError> {
        self.rate_limits.charge(client, tokens).map_err(|refusal| {
            self.accounts
                .metrics
                .rejected
                .with_label_values(&[refusal.limit.reason()])
                .inc();
            refusal.to_api_error(client)
        })
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

    /// Re-reads every router file the config names and swaps them in when all of them load;
    /// otherwise the running routers stay and the error says why ([`Routes::reload`]).
    pub fn reload_routers(&self) -> Result<Vec<Loaded>, String> {
        self.routes.reload()
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

    /// The shutdown grace ran out: requests dropped from now on are recorded as `shutdown`.
    pub fn cut_for_shutdown(&self) {
        self.accounts.recorder.cut_for_shutdown();
    }

    /// Brings the scrape-time gauges (queue depths, idle energy) up to date.
    pub fn refresh_gauges(&self) {
        let metrics = &self.accounts.metrics;
        for backend in &self.backends {
            let name = backend.info().name.as_str();
            if let Some(depth) = backend.queue_depth() {
                metrics
                    .queue_depth
                    .with_label_values(&[name])
                    .set(i64::try_from(depth).unwrap_or(i64::MAX));
            }
            if let Some(stats) = backend.batch_stats() {
                metrics.record_batch(name, &stats);
            }
        }
        // The sampler thread's latest reading: a scrape reads no counter itself.
        let metering = &self.accounts.metering;
        let totals = metering.totals();
        metrics
            .idle_energy
            .with_label_values(&[metering.source().as_str()])
            .set(totals.idle_joules);
        metrics
            .idle_cost
            .set(metering.idle_spend(&Default::default(), &totals).usd);
    }
}

/// What [`Gateway::serve`] did: the decision that produced the result, the local backend that
/// failed first and how (when it fell back), the result, and the time spent on upstreams.
struct Served {
    decision: Decision,
    fallback_from: Option<usize>,
    first_failure: Option<BackendError>,
    result: Result<Reply, BackendError>,
    upstream_wait: Duration,
}

impl Served {
    fn first_try(decision: Decision, result: Result<Reply, BackendError>, waited: Instant) -> Self {
        Self {
            decision,
            fallback_from: None,
            first_failure: None,
            result,
            upstream_wait: waited.elapsed(),
        }
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
