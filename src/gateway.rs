//! The request pipeline, top to bottom:
//!
//! 1. parse and validate the OpenAI request ([`ChatRequest::parse`]);
//! 2. route: a backend the client pinned by name, or the router's decision for the alias;
//! 3. serve it on that backend; if a local backend fails before anything reached the client,
//!    serve it on the cloud instead and say so;
//! 4. relay the answer (whole, or as a stream re-framed for the client) and meter it.
//!
//! HTTP concerns (headers, status codes, body limits) live in `server`; this file decides and
//! accounts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::StreamExt;

use crate::backends::{Backend, BackendError, Chunk, ChunkStream, Reply};
use crate::config::{Config, Role};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::router::{Decision, Overrides, Reason, Router};
use crate::wire::{ChatRequest, Usage};

/// The routing gateway: backends, router and metrics.
pub struct Gateway {
    backends: Vec<Arc<dyn Backend>>,
    router: Router,
    alias: String,
    fallback_to_cloud: bool,
    metrics: Arc<Metrics>,
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
    ) -> Result<Self, String> {
        Ok(Self {
            router: Router::new(&config.routing, &config.backends)?,
            alias: config.routing.alias.clone(),
            fallback_to_cloud: config.routing.fallback_to_cloud,
            backends,
            metrics,
        })
    }

    /// Serves one chat-completions request. `started` is when the request arrived, so the
    /// reported overhead includes reading the body.
    pub async fn chat(
        &self,
        body: &[u8],
        overrides: Overrides,
        started: Instant,
    ) -> Result<Answer, ApiError> {
        // 1. Parse and validate.
        let request = ChatRequest::parse(body)?;

        // 2. Route.
        let decision = self.route(&request, overrides)?;

        // 3. Serve, with fallback to the cloud before the first byte.
        let meter = RequestMeter::start(self.metrics.clone());
        let (decision, fallback_from, first_failure, result, upstream_wait) =
            self.serve(&request, decision).await;
        let info = self.backends[decision.backend].info();
        let route = Route {
            role: info.role,
            backend: info.name.clone(),
            reason: decision.reason,
            p_local: decision.p_local,
            fallback_from: fallback_from.map(|i| self.backends[i].info().name.clone()),
        };
        let meter = meter.routed(&route);

        // 4. Relay and meter.
        let body = match result {
            Ok(Reply::Complete(completion)) => {
                meter.finish(Outcome::Ok, completion.usage);
                AnswerBody::Json(completion.body)
            }
            Ok(Reply::Stream(opened)) => AnswerBody::Stream(client_stream(
                opened.first,
                opened.rest,
                request.include_usage,
                meter,
            )),
            Err(e) => {
                meter.finish(Outcome::Error, None);
                let mut error = e.to_api_error(&route.backend);
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
        self.metrics
            .overhead
            .with_label_values(&[route.role.as_str()])
            .observe(overhead.as_secs_f64());
        Ok(Answer {
            route,
            overhead,
            body,
        })
    }

    /// A pinned backend when `model` names one; the router's choice for the alias.
    fn route(&self, request: &ChatRequest, overrides: Overrides) -> Result<Decision, ApiError> {
        if request.model == self.alias {
            let started = Instant::now();
            let decision = self.router.decide(request, overrides);
            self.metrics
                .router_duration
                .with_label_values(&[decision.reason.as_str()])
                .observe(started.elapsed().as_secs_f64());
            self.metrics
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
        self.metrics
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

    async fn attempt(&self, backend: usize, request: &ChatRequest) -> Result<Reply, BackendError> {
        let backend = &self.backends[backend];
        let result = backend.chat(request).await;
        if let Err(e) = &result {
            let name = &backend.info().name;
            tracing::debug!(backend = %name, error = %e, "upstream attempt failed");
            self.metrics
                .upstream_errors
                .with_label_values(&[name.as_str(), e.kind()])
                .inc();
        }
        result
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
/// a stream the client abandons is still counted (as `cancelled`).
struct RequestMeter {
    metrics: Arc<Metrics>,
    started: Instant,
    labels: Option<[String; 3]>,
    outcome: Outcome,
    usage: Option<Usage>,
}

impl RequestMeter {
    fn start(metrics: Arc<Metrics>) -> Self {
        metrics.in_flight.inc();
        Self {
            metrics,
            started: Instant::now(),
            labels: None,
            outcome: Outcome::Cancelled,
            usage: None,
        }
    }

    fn routed(mut self, route: &Route) -> Self {
        self.labels = Some([
            route.role.as_str().to_owned(),
            route.backend.clone(),
            route.reason.as_str().to_owned(),
        ]);
        self
    }

    fn finish(mut self, outcome: Outcome, usage: Option<Usage>) {
        self.outcome = outcome;
        self.usage = usage;
    }
}

impl Drop for RequestMeter {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        let Some([route, backend, reason]) = &self.labels else {
            return;
        };
        self.metrics
            .chat_requests
            .with_label_values(&[route, backend, reason, self.outcome.as_str()])
            .inc();
        self.metrics
            .chat_duration
            .with_label_values(&[route, backend])
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(usage) = self.usage {
            self.metrics
                .tokens
                .with_label_values(&[backend, "input"])
                .inc_by(usage.prompt_tokens);
            self.metrics
                .tokens
                .with_label_values(&[backend, "output"])
                .inc_by(usage.completion_tokens);
        }
    }
}

/// Re-frames an upstream stream for the client: drops the usage chunk the gateway asked for on
/// its own behalf, ends with `[DONE]`, and turns a mid-stream failure into an error frame.
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
        meter: RequestMeter,
        done: bool,
    }
    let state = State {
        first: Some(first),
        rest,
        client_wants_usage,
        meter,
        done: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            let next = match s.first.take() {
                Some(chunk) => Some(Ok(chunk)),
                None => s.rest.next().await,
            };
            match next {
                None => {
                    s.done = true;
                    s.meter.outcome = Outcome::Ok;
                    return Some((Bytes::from_static(b"data: [DONE]\n\n"), s));
                }
                Some(Err(e)) => {
                    s.done = true;
                    s.meter.outcome = Outcome::Error;
                    let backend = s.meter.labels.as_ref().map_or("", |l| l[1].as_str());
                    tracing::warn!(backend, error = %e, "upstream stream failed after the first byte");
                    let error = e.to_api_error(backend);
                    return Some((sse_frame(&error.to_json()), s));
                }
                Some(Ok(chunk)) => {
                    if chunk.usage.is_some() {
                        s.meter.usage = chunk.usage;
                    }
                    if chunk.is_error {
                        s.meter.outcome = Outcome::Error;
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
