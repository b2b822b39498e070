//! `[resilience]`: retries with backoff for cloud backends, circuit breakers for all.

use serde::Deserialize;

/// Retries with backoff for cloud backends, and a circuit breaker for every backend.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResilienceConfig {
    /// Retries of a cloud attempt that failed before its first byte (429, 408, 409, 5xx,
    /// connection errors, timeouts). Local backends are not retried: they fall back to the cloud.
    pub max_retries: u32,
    /// First backoff; each retry doubles it, with full jitter.
    pub initial_backoff_s: f64,
    /// Largest backoff between two attempts (an upstream's `Retry-After` may ask for more).
    pub max_backoff_s: f64,
    /// Total seconds from the first attempt after which no retry starts.
    pub retry_deadline_s: f64,
    /// Seconds of outcomes the breaker looks at.
    pub breaker_window_s: f64,
    /// Attempts in the window before the breaker may open.
    pub breaker_min_requests: u32,
    /// Share of failed attempts in the window that opens the breaker; 0 turns breakers off.
    pub breaker_error_ratio: f64,
    /// Seconds an open breaker refuses before it lets one probe through (half-open).
    pub breaker_open_s: f64,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        Self {
            // The official OpenAI SDKs' defaults: 2 retries, backoff from 0.5 s up to 8 s
            // (openai-python `DEFAULT_MAX_RETRIES`, `INITIAL_RETRY_DELAY`, `MAX_RETRY_DELAY`).
            max_retries: 2,
            initial_backoff_s: 0.5,
            max_backoff_s: 8.0,
            // Our own choice (no published source): half of the 60 s first-byte timeout, so a
            // retried request still answers inside the timeouts clients commonly set.
            retry_deadline_s: 30.0,
            // Envoy's outlier detection ejects for 30 s (`base_ejection_time`); resilience4j
            // opens at a 50% failure rate (`failureRateThreshold`). Its minimum of 100 calls is
            // lowered to 20 so a gateway with little traffic still reacts within one window.
            breaker_window_s: 30.0,
            breaker_min_requests: 20,
            breaker_error_ratio: 0.5,
            breaker_open_s: 30.0,
        }
    }
}
