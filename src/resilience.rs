//! Upstream resilience: when to retry a failed cloud attempt and how long to wait, and a
//! circuit breaker per backend that stops sending traffic to an upstream that keeps failing.
//!
//! Retries only ever happen before the first byte reached the client: a backend returns a
//! [`crate::backends::Reply`] only once its first chunk has arrived, so everything here runs
//! before anything was relayed. The breaker is what the routing respects: an open local backend
//! sends alias traffic to the cloud (`local_unhealthy`), an open cloud backend sends it to a
//! healthy local one (`cloud_unhealthy`).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;

use crate::backends::{BackendError, TimeoutPhase};
use crate::config::{secs, ResilienceConfig};

/// Backoff and deadline for retrying cloud attempts.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    initial: Duration,
    max: Duration,
    /// No retry starts once this much time has passed since the first attempt.
    pub deadline: Duration,
}

impl RetryPolicy {
    /// The policy `[resilience]` describes.
    pub fn new(c: &ResilienceConfig) -> Self {
        Self {
            max_retries: c.max_retries,
            initial: secs(c.initial_backoff_s),
            max: secs(c.max_backoff_s),
            deadline: secs(c.retry_deadline_s),
        }
    }

    /// The wait before retry number `retry` (0-based): full jitter over an exponentially
    /// growing cap, so clients that failed together do not retry together.
    pub fn backoff(&self, retry: u32) -> Duration {
        let cap = self
            .initial
            .saturating_mul(1u32 << retry.min(20))
            .min(self.max);
        cap.mul_f64(rand::rng().random::<f64>())
    }

    /// How long to wait before retrying after `error`, or `None` when it must not be retried:
    /// the error is not transient, or waiting would pass the deadline (`elapsed` since the first
    /// attempt). An upstream's `Retry-After` replaces the backoff.
    pub fn wait_before_retry(
        &self,
        error: &BackendError,
        retry: u32,
        elapsed: Duration,
    ) -> Option<Duration> {
        if retry >= self.max_retries || !is_retryable(error) {
            return None;
        }
        let wait = match error {
            BackendError::Status {
                retry_after: Some(value),
                ..
            } => parse_retry_after(value, SystemTime::now()).unwrap_or_else(|| self.backoff(retry)),
            _ => self.backoff(retry),
        };
        (elapsed + wait <= self.deadline).then_some(wait)
    }
}

/// Failures worth another attempt: the ones OpenAI's SDKs retry (408, 409, 429, 5xx and
/// connection errors) plus timeouts before the first byte. A broken answer (protocol error) or
/// a timeout of the whole exchange is not retried: the upstream did work and may do it again.
pub fn is_retryable(error: &BackendError) -> bool {
    match error {
        BackendError::Status { status, .. } => matches!(status, 408 | 409 | 429) || *status >= 500,
        BackendError::Unreachable { .. } => true,
        BackendError::Timeout { phase, .. } => *phase != TimeoutPhase::Total,
        _ => false,
    }
}

/// `Retry-After` as delta-seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (0.0..=86_400.0)
            .contains(&seconds)
            .then(|| Duration::from_secs_f64(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Whether an attempt's result says anything about the backend's health. Client mistakes and
/// requests the backend cannot serve say nothing; only failures of the upstream count.
pub fn health_signal(error: Option<&BackendError>) -> Option<bool> {
    match error {
        None => Some(true),
        Some(BackendError::Status { status, .. }) => {
            (matches!(status, 408 | 429) || *status >= 500).then_some(false)
        }
        Some(
            BackendError::Unreachable { .. }
            | BackendError::Timeout { .. }
            | BackendError::Protocol { .. }
            | BackendError::Internal { .. },
        ) => Some(false),
        Some(
            BackendError::NotConfigured { .. }
            | BackendError::Busy { .. }
            | BackendError::ContextTooLong { .. }
            | BackendError::Unsupported { .. }
            | BackendError::CircuitOpen { .. },
        ) => None,
    }
}

/// A breaker's state, as exported in `wattgate_backend_circuit_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Traffic flows; outcomes are counted.
    Closed,
    /// One probe is allowed through to test the upstream.
    HalfOpen,
    /// Traffic is refused until the open period ends.
    Open,
}

impl CircuitState {
    /// The gauge value: 0, 1, 2.
    pub fn gauge(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::HalfOpen => "half_open",
            CircuitState::Open => "open",
        }
    }
}

/// Permission to send one attempt; hand it back to [`Breaker::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A normal attempt while closed.
    Normal,
    /// The half-open probe: its outcome closes or re-opens the breaker.
    Probe,
}

/// A circuit breaker over a sliding window of attempt outcomes, in one-second buckets.
///
/// Closed: it opens when the window holds at least `min_requests` outcomes and the failed share
/// reaches `error_ratio`. Open: every attempt is refused for `open_for`. Then half-open: one
/// probe goes through; success closes it (with a fresh window), failure opens it again. A probe
/// whose outcome never comes back (its client went away) is presumed lost after `open_for`.
#[derive(Debug)]
pub struct Breaker {
    window_s: u64,
    min_requests: u32,
    error_ratio: f64,
    open_for: Duration,
    born: Instant,
    state: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    /// (second since `born`, successes, failures), oldest first.
    buckets: VecDeque<(u64, u32, u32)>,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probe_sent: Instant },
}

/// A state change the caller should export (metrics, logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition(pub CircuitState);

impl Breaker {
    /// A closed breaker configured by `[resilience]`; `error_ratio = 0` never opens.
    pub fn new(c: &ResilienceConfig) -> Self {
        Self {
            window_s: c.breaker_window_s.ceil().max(1.0) as u64,
            min_requests: c.breaker_min_requests.max(1),
            error_ratio: c.breaker_error_ratio,
            open_for: secs(c.breaker_open_s),
            born: Instant::now(),
            state: Mutex::new(Inner {
                phase: Phase::Closed,
                buckets: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves only counters behind; keep using them.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks to send an attempt. `Err` carries how long until the breaker will let one through.
    pub fn admit(&self) -> Result<(Admission, Option<Transition>), Duration> {
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.phase {
            Phase::Closed => Ok((Admission::Normal, None)),
            Phase::Open { until } if now < until => Err(until - now),
            Phase::HalfOpen { probe_sent } if now < probe_sent + self.open_for => {
                Err(probe_sent + self.open_for - now)
            }
            Phase::Open { .. } | Phase::HalfOpen { .. } => {
                inner.phase = Phase::HalfOpen { probe_sent: now };
                Ok((Admission::Probe, Some(Transition(CircuitState::HalfOpen))))
            }
        }
    }

    /// Whether routing should avoid this backend now: open, or half-open with its probe out.
    /// When the open period has ended this is false, so the next request becomes the probe.
    pub fn is_refusing(&self) -> bool {
        let now = Instant::now();
        match self.lock().phase {
            Phase::Closed => false,
            Phase::Open { until } => now < until,
            Phase::HalfOpen { probe_sent } => now < probe_sent + self.open_for,
        }
    }

    /// The current state.
    pub fn state(&self) -> CircuitState {
        match self.lock().phase {
            Phase::Closed => CircuitState::Closed,
            Phase::Open { .. } => CircuitState::Open,
            Phase::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Records an attempt's outcome (`None`: it says nothing about health).
    pub fn record(&self, admission: Admission, healthy: Option<bool>) -> Option<Transition> {
        let now = Instant::now();
        let mut inner = self.lock();
        match (admission, inner.phase, healthy) {
            (_, _, None) => {
                // A probe that told nothing: let the next request probe instead.
                if admission == Admission::Probe {
                    inner.phase = Phase::Open { until: now };
                }
                None
            }
            (Admission::Probe, _, Some(true)) => {
                inner.phase = Phase::Closed;
                inner.buckets.clear();
                Some(Transition(CircuitState::Closed))
            }
            (Admission::Probe, _, Some(false)) => {
                inner.phase = Phase::Open {
                    until: now + self.open_for,
                };
                Some(Transition(CircuitState::Open))
            }
            (Admission::Normal, Phase::Closed, Some(ok)) => self.count(&mut inner, now, ok),
            // Outcomes of attempts admitted before the breaker opened change nothing.
            (Admission::Normal, _, Some(_)) => None,
        }
    }

    /// Records a failure that came after the first byte (a stream broken mid-way).
    pub fn record_late_failure(&self) -> Option<Transition> {
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.phase {
            Phase::Closed => self.count(&mut inner, now, false),
            _ => None,
        }
    }

    fn count(&self, inner: &mut Inner, now: Instant, ok: bool) -> Option<Transition> {
        if self.error_ratio <= 0.0 {
            return None;
        }
        let second = now.duration_since(self.born).as_secs();
        while inner
            .buckets
            .front()
            .is_some_and(|(s, _, _)| *s + self.window_s <= second)
        {
            inner.buckets.pop_front();
        }
        match inner.buckets.back_mut() {
            Some((s, good, bad)) if *s == second => {
                if ok {
                    *good += 1;
                } else {
                    *bad += 1;
                }
            }
            _ => inner
                .buckets
                .push_back((second, u32::from(ok), u32::from(!ok))),
        }
        if ok {
            return None;
        }
        let (good, bad) = inner
            .buckets
            .iter()
            .fold((0u64, 0u64), |(g, b), (_, sg, sb)| {
                (g + u64::from(*sg), b + u64::from(*sb))
            });
        let total = good + bad;
        if total >= u64::from(self.min_requests) && bad as f64 / total as f64 >= self.error_ratio {
            inner.phase = Phase::Open {
                until: now + self.open_for,
            };
            inner.buckets.clear();
            return Some(Transition(CircuitState::Open));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(min: u32, ratio: f64, open_s: f64) -> ResilienceConfig {
        ResilienceConfig {
            breaker_min_requests: min,
            breaker_error_ratio: ratio,
            breaker_open_s: open_s,
            ..ResilienceConfig::default()
        }
    }

    fn status(code: u16, retry_after: Option<&str>) -> BackendError {
        BackendError::Status {
            status: code,
            message: "m".to_owned(),
            kind: None,
            retry_after: retry_after.map(str::to_owned),
        }
    }

    #[test]
    fn opens_at_the_error_ratio_once_the_window_has_enough_attempts() {
        let b = Breaker::new(&config(10, 0.5, 30.0));
        // 9 failures: below the minimum number of attempts, still closed.
        for _ in 0..9 {
            assert_eq!(b.record(Admission::Normal, Some(false)), None);
        }
        assert_eq!(b.state(), CircuitState::Closed);
        assert_eq!(
            b.record(Admission::Normal, Some(false)),
            Some(Transition(CircuitState::Open))
        );
        assert!(b.is_refusing());
        let wait = b.admit().expect_err("open refuses");
        assert!(wait > Duration::from_secs(29) && wait <= Duration::from_secs(30));
    }

    #[test]
    fn successes_keep_it_closed_below_the_ratio() {
        let b = Breaker::new(&config(10, 0.5, 30.0));
        for i in 0..100 {
            // 40% failures.
            b.record(Admission::Normal, Some(i % 5 < 3));
        }
        assert_eq!(b.state(), CircuitState::Closed);
        // Signals that say nothing about health are not counted at all.
        for _ in 0..100 {
            b.record(Admission::Normal, None);
        }
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[test]
    fn half_open_lets_one_probe_through_and_its_outcome_decides() {
        let b = Breaker::new(&config(1, 0.5, 0.05));
        b.record(Admission::Normal, Some(false));
        assert!(b.admit().is_err());
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            !b.is_refusing(),
            "the open period is over: the next request probes"
        );
        let (admission, transition) = b.admit().expect("probe");
        assert_eq!(admission, Admission::Probe);
        assert_eq!(transition, Some(Transition(CircuitState::HalfOpen)));
        // Only one probe at a time.
        assert!(b.admit().is_err());
        assert!(b.is_refusing());
        // A failed probe re-opens for a full period.
        assert_eq!(
            b.record(Admission::Probe, Some(false)),
            Some(Transition(CircuitState::Open))
        );
        assert!(b.admit().is_err());
        std::thread::sleep(Duration::from_millis(60));
        let (admission, _) = b.admit().expect("second probe");
        assert_eq!(
            b.record(admission, Some(true)),
            Some(Transition(CircuitState::Closed))
        );
        assert_eq!(b.admit(), Ok((Admission::Normal, None)));
    }

    #[test]
    fn a_probe_that_never_reports_is_replaced_after_the_open_period() {
        let b = Breaker::new(&config(1, 0.5, 0.05));
        b.record(Admission::Normal, Some(false));
        std::thread::sleep(Duration::from_millis(60));
        let _lost = b.admit().expect("probe");
        assert!(b.admit().is_err());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.admit().map(|(a, _)| a), Ok(Admission::Probe));
    }

    #[test]
    fn a_zero_ratio_never_opens() {
        let b = Breaker::new(&config(1, 0.0, 30.0));
        for _ in 0..50 {
            b.record(Admission::Normal, Some(false));
        }
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[test]
    fn retries_transient_failures_only_and_within_the_deadline() {
        let p = RetryPolicy::new(&ResilienceConfig::default());
        let zero = Duration::ZERO;
        for e in [
            status(500, None),
            status(503, None),
            status(429, None),
            status(408, None),
            BackendError::Unreachable { detail: "x".into() },
            BackendError::Timeout {
                phase: TimeoutPhase::FirstByte,
                seconds: 1.0,
            },
        ] {
            assert!(p.wait_before_retry(&e, 0, zero).is_some(), "{e}");
            assert!(p.wait_before_retry(&e, 2, zero).is_none(), "only 2 retries");
        }
        for e in [
            status(400, None),
            status(401, None),
            status(404, None),
            BackendError::Protocol { detail: "x".into() },
            BackendError::Timeout {
                phase: TimeoutPhase::Total,
                seconds: 1.0,
            },
        ] {
            assert!(p.wait_before_retry(&e, 0, zero).is_none(), "{e}");
        }
        // Retry-After replaces the backoff, and is refused past the deadline.
        let e = status(429, Some("3"));
        assert_eq!(
            p.wait_before_retry(&e, 0, zero),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            p.wait_before_retry(&e, 0, Duration::from_secs(28)),
            None,
            "28 s + 3 s is past the 30 s deadline"
        );
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_cap() {
        let p = RetryPolicy::new(&ResilienceConfig::default());
        for retry in 0..8 {
            let cap = Duration::from_secs_f64((0.5 * f64::from(1u32 << retry)).min(8.0));
            let waits: Vec<Duration> = (0..200).map(|_| p.backoff(retry)).collect();
            assert!(waits.iter().all(|w| *w <= cap), "retry {retry}");
            // Spread over the range, not a constant.
            let max = waits.iter().max().copied().unwrap_or_default();
            let min = waits.iter().min().copied().unwrap_or_default();
            assert!(max - min > cap / 2, "retry {retry}: {min:?}..{max:?}");
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("0.25", now),
            Some(Duration::from_millis(250))
        );
        // 1_445_412_480 is Wed, 21 Oct 2015 07:28:00 GMT.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        for bad in ["soon", "-1", "1e9", "NaN", ""] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
    }
}
