//! Prometheus metrics, one registry per gateway instance.
//!
//! Names follow Prometheus conventions (base units, `_total` counters, `wattgate_` prefix) so the
//! recording rules and dashboards in `deploy/` can rely on them. Label values come only from
//! configuration and fixed code lists, never from request text, so cardinality stays bounded.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Request latencies: 1 ms to 10 min.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Router decisions take microseconds (benches/router.rs); buckets from 5 us to 10 ms.
const ROUTER_BUCKETS: &[f64] = &[
    5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 10e-3,
];

/// Gateway overhead: 10 µs to 100 ms, fine enough to see the 1 ms target.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.1,
];

/// Every series the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by endpoint (route template), method and status.
    pub http_requests: IntCounterVec,
    /// Time to response headers by endpoint and method.
    pub http_duration: HistogramVec,
    /// Chat requests by route, backend, reason and outcome (ok, error, cancelled).
    pub chat_requests: IntCounterVec,
    /// Chat request duration, through the last byte, by route and backend.
    pub chat_duration: HistogramVec,
    /// Time spent in the gateway itself: total minus waiting on upstreams, up to the first byte.
    pub overhead: HistogramVec,
    /// Upstream attempts that failed, by backend and failure kind.
    pub upstream_errors: IntCounterVec,
    /// Local failures retried on the cloud, by from/to backend and failure kind.
    pub fallbacks: IntCounterVec,
    /// Tokens by backend and kind (input, output), as the upstream reported them.
    pub tokens: IntCounterVec,
    /// Chat requests being served right now.
    pub in_flight: IntGauge,
    /// Time to decide a route for the alias (features, router heads, constraints), by reason.
    pub router_duration: HistogramVec,
    /// Routing decisions for the alias, by reason (before any fallback).
    pub router_decisions: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every series.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let histogram = |name: &str,
                         help: &str,
                         labels: &[&str],
                         buckets: &[f64]|
         -> Result<HistogramVec, prometheus::Error> {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let in_flight = IntGauge::new(
            "wattgate_chat_in_flight_requests",
            "Chat requests being served right now.",
        )?;
        registry.register(Box::new(in_flight.clone()))?;
        Ok(Self {
            http_requests: counter(
                "wattgate_http_requests_total",
                "HTTP requests by endpoint, method and status.",
                &["endpoint", "method", "status"],
            )?,
            http_duration: histogram(
                "wattgate_http_request_duration_seconds",
                "Time from request arrival to response headers, by endpoint and method.",
                &["endpoint", "method"],
                LATENCY_BUCKETS,
            )?,
            chat_requests: counter(
                "wattgate_chat_requests_total",
                "Chat completions by route (local|cloud), backend, routing reason and outcome (ok|error|cancelled).",
                &["route", "backend", "reason", "outcome"],
            )?,
            chat_duration: histogram(
                "wattgate_chat_request_duration_seconds",
                "Chat completion duration through the last byte, by route and backend.",
                &["route", "backend"],
                LATENCY_BUCKETS,
            )?,
            overhead: histogram(
                "wattgate_gateway_overhead_seconds",
                "Time spent in the gateway itself (total minus upstream wait, up to the first byte), by route.",
                &["route"],
                OVERHEAD_BUCKETS,
            )?,
            upstream_errors: counter(
                "wattgate_upstream_errors_total",
                "Failed upstream attempts by backend and kind (unreachable|timeout|error_status|protocol|not_configured).",
                &["backend", "kind"],
            )?,
            fallbacks: counter(
                "wattgate_fallbacks_total",
                "Local failures retried on the cloud, by from/to backend and failure kind.",
                &["from", "to", "kind"],
            )?,
            tokens: counter(
                "wattgate_tokens_total",
                "Tokens reported by upstreams, by backend and kind (input|output).",
                &["backend", "kind"],
            )?,
            router_duration: histogram(
                "wattgate_router_decision_duration_seconds",
                "Time to decide a route for the routing alias, by decision reason.",
                &["reason"],
                ROUTER_BUCKETS,
            )?,
            router_decisions: counter(
                "wattgate_router_decisions_total",
                "Routing decisions for the routing alias by reason, before any fallback.",
                &["reason"],
            )?,
            in_flight,
            registry,
        })
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}
