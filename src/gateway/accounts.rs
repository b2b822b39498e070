//! Where a request's attempts meet the resilience policy (circuit breakers, retries with backoff)
//! and where finished requests are accounted: Prometheus, the energy meter, the ledger.
//!
//! The attempt policy is written out here rather than composed from `tower`'s `Retry`,
//! `Timeout` and a breaker layer, for three reasons: an attempt is retried only before its first
//! byte reached the client (a stream cannot be replayed once relayed), the upstream's
//! `Retry-After` sets the backoff, and every retry, breaker transition and failure kind is
//! metered per backend. `tower::retry::Policy` sees a request and a result, not a stream's
//! first byte or a metered backend, and its budget is per service, not per deadline.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures::{FutureExt, StreamExt};

use crate::backends::{Backend, BackendError, ChunkStream, Reply};
use crate::config::Role;
use crate::experiments::shadow::Shadow;
use crate::guard::Guard;
use crate::ledger::LedgerSender;
use crate::metering::{Metering, Recorder};
use crate::metrics::Metrics;
use crate::resilience::{health_signal, Admission, Breaker, RetryPolicy, Transition};
use crate::wire::ChatRequest;

/// What every attempt goes through (breakers, retries, the guard), and the recorder finished
/// requests are accounted in.
pub struct Accounts {
    /// Where finished requests are recorded (Prometheus, the meter, the ledger).
    pub(super) recorder: Arc<Recorder>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) metering: Arc<Metering>,
    pub(super) ledger: Option<LedgerSender>,
    pub(super) backends: Vec<Arc<dyn Backend>>,
    pub(super) shadow: Option<Arc<Shadow>>,
    /// One circuit breaker per backend, in config order.
    pub(super) breakers: Vec<Breaker>,
    /// How cloud attempts are retried.
    pub(super) retry: RetryPolicy,
    /// The quality guard.
    pub(super) guard: Guard,
    /// The first cloud backend: where doubtful local answers escalate.
    pub(super) cloud: Option<usize>,
}

impl Accounts {
    /// One backend's answer, through its circuit breaker. Cloud attempts that fail before the
    /// first byte with a transient error are retried with backoff (or the upstream's
    /// `Retry-After`) until `[resilience]`'s retries or deadline run out. A backend that panics
    /// is an internal failure of that backend, not of the gateway.
    pub(super) async fn attempt(
        &self,
        index: usize,
        request: &ChatRequest,
    ) -> Result<Reply, BackendError> {
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

    /// Asks backend `index`'s breaker for an attempt.
    pub(super) fn admit(&self, index: usize) -> Result<Admission, BackendError> {
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
    pub(super) fn record_health(&self, index: usize, admission: Admission, healthy: Option<bool>) {
        let transition = self.breakers[index].record(admission, healthy);
        self.transitioned(index, transition);
    }

    /// A stream of backend `index` broke after its first byte.
    pub(super) fn record_late_failure(&self, index: usize) {
        let transition = self.breakers[index].record_late_failure();
        self.transitioned(index, transition);
    }

    pub(super) fn transitioned(&self, index: usize, transition: Option<Transition>) {
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
