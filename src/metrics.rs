//! Prometheus metrics, one registry per gateway instance.
//!
//! Names follow Prometheus conventions (base units, `_total` counters, `wattgate_` prefix) so the
//! recording rules and dashboards in `deploy/` can rely on them. Label values come only from
//! configuration and fixed code lists, never from request text, so cardinality stays bounded.

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
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

/// Confidence is a probability: tenths, finer near the usual thresholds.
const CONFIDENCE_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0,
];

/// Every series the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by endpoint (route template), method and status.
    pub http_requests: IntCounterVec,
    /// Time to response headers by endpoint and method.
    pub http_duration: HistogramVec,
    /// Chat requests by route, backend, reason, outcome (ok, error, cancelled), experiment and
    /// arm (`none` outside experiments).
    pub chat_requests: IntCounterVec,
    /// Time from arrival to the first byte of the answer, by route and backend.
    pub ttft: HistogramVec,
    /// Joules actually spent, by backend and source (`nvml`, `rapl`, `estimate` for local work;
    /// `cloud_estimate` for the cloud's share).
    pub energy: CounterVec,
    /// Joules the baseline cloud backend would have spent on the same requests, by the backend
    /// that actually served.
    pub counterfactual_energy: CounterVec,
    /// Joules while no request was active, by source (not charged to requests).
    pub idle_energy: GaugeVec,
    /// Idle electricity plus idle hardware hours since start, $ (what net savings subtract).
    pub idle_cost: prometheus::Gauge,
    /// FLOPs spent, by backend.
    pub flops: CounterVec,
    /// FLOPs the baseline would have spent, by the backend that served.
    pub counterfactual_flops: CounterVec,
    /// Dollars spent, by backend and kind (`local`: electricity and hardware; `cloud`: API).
    pub cost: CounterVec,
    /// Dollars the baseline would have spent, by the backend that served.
    pub counterfactual_cost: CounterVec,
    /// Requests waiting for a worker of an embedded backend, by backend.
    pub queue_depth: IntGaugeVec,
    /// An embedded backend's batches now, by backend and what (`sequences`,
    /// `kv_reserved_bytes`, `prefix_cache_bytes`).
    pub batch: IntGaugeVec,
    /// Prefix cache lookups of an embedded backend, by backend and result (`hit`, `miss`).
    pub prefix_lookups: IntCounterVec,
    /// Prompt tokens an embedded backend took from its prefix cache instead of computing.
    pub prefix_reused_tokens: IntCounterVec,
    /// An embedded backend's forward steps, by backend and what (`steps`; `sequences`: the
    /// sequences they ran, summed, so sequences / steps is the mean batch size).
    pub batch_steps: IntCounterVec,
    /// Ledger rows queued, by result (`queued`; `disabled` when the ledger is off).
    pub ledger_rows: IntCounterVec,
    /// Chat request duration, through the last byte, by route and backend.
    pub chat_duration: HistogramVec,
    /// Time spent in the gateway itself: total minus waiting on upstreams, up to the first byte.
    pub overhead: HistogramVec,
    /// Upstream attempts that failed, by backend and failure kind.
    pub upstream_errors: IntCounterVec,
    /// Local failures retried on the cloud, by from/to backend and failure kind.
    pub fallbacks: IntCounterVec,
    /// Quality-guard decisions by local backend and decision (pass, escalated, no_signal,
    /// escalation_failed, unchecked).
    pub guard_decisions: IntCounterVec,
    /// The guard's confidence in local answers, by local backend.
    pub guard_confidence: HistogramVec,
    /// Tokens by backend and kind (input, output), as the upstream reported them.
    pub tokens: IntCounterVec,
    /// Chat requests being served right now.
    pub in_flight: IntGauge,
    /// Time to decide a route for the alias (features, router heads, constraints), by reason.
    pub router_duration: HistogramVec,
    /// Routing decisions for the alias, by reason (before any fallback).
    pub router_decisions: IntCounterVec,
    /// Outcomes by experiment, arm, source (feedback, shadow) and result (success, failure).
    pub experiment_outcomes: IntCounterVec,
    /// Joules by experiment, arm and kind (`actual`: spent; `counterfactual`: cloud-only).
    pub experiment_energy: CounterVec,
    /// FLOPs by experiment, arm and kind (`actual`, `counterfactual`).
    pub experiment_flops: CounterVec,
    /// Dollars by experiment, arm and kind (`actual`, `counterfactual`).
    pub experiment_cost: CounterVec,
    /// Shadow checks by experiment, arm and result (agree, disagree, error, skipped_budget,
    /// skipped_busy).
    pub shadow_checks: IntCounterVec,
    /// Dollars shadow checks spent, by the backend called (never counted as savings).
    pub shadow_cost: CounterVec,
    /// Joules shadow checks caused, by backend and source (`cloud_estimate`).
    pub shadow_energy: CounterVec,
    /// Tokens shadow checks used, by backend and kind (input, output).
    pub shadow_tokens: IntCounterVec,
    /// Retries of failed cloud attempts, by backend and the failure retried.
    pub retries: IntCounterVec,
    /// Circuit breaker state by backend: 0 closed, 1 half-open (probing), 2 open.
    pub circuit_state: IntGaugeVec,
    /// Circuit breaker transitions by backend and new state (open, half_open, closed).
    pub circuit_transitions: IntCounterVec,
    /// Requests refused before reaching a backend, by reason (unauthorized, forbidden,
    /// rate_limited_requests, rate_limited_tokens, too_many_concurrent).
    pub rejected: IntCounterVec,
    /// Connections refused or cut at the door, by reason (per_ip: over
    /// `server.max_connections_per_ip`; header_timeout, body_timeout: answered 408).
    pub connections_refused: IntCounterVec,
    /// Connections open now.
    pub connections_open: IntGauge,
    /// Ledger rows dropped because the writer's queue was full.
    pub ledger_rows_dropped: prometheus::IntCounter,
    /// Times the normal-priority catch-up thread took over from the idle-priority writer.
    pub ledger_catchups: prometheus::IntCounter,
    /// Router reloads (`POST /v1/router/reload`, SIGHUP), by result (`ok`, `refused`).
    pub router_reloads: IntCounterVec,
    /// `/v1/embeddings` requests, by model and outcome (`ok`, `error`).
    pub embeddings_requests: IntCounterVec,
    /// Tokens embedded, by model.
    pub embeddings_tokens: IntCounterVec,
    /// Joules charged to embeddings requests, by model and energy source.
    pub embeddings_energy: CounterVec,
    /// What the embedded tokens would have cost at the configured cloud price, by model.
    pub embeddings_counterfactual_cost: CounterVec,
}

impl Metrics {
    /// Sets an embedded backend's batch gauges, and brings its prefix cache counters up to the
    /// backend's totals.
    pub fn record_batch(&self, backend: &str, stats: &crate::backends::BatchStats) {
        let gauge = |what: &str, v: usize| {
            self.batch
                .with_label_values(&[backend, what])
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        gauge("sequences", stats.sequences);
        gauge("kv_reserved_bytes", stats.kv_reserved_bytes);
        gauge("prefix_cache_bytes", stats.prefix_bytes);
        let catch_up =
            |c: prometheus::IntCounter, total: u64| c.inc_by(total.saturating_sub(c.get()));
        catch_up(
            self.prefix_lookups.with_label_values(&[backend, "hit"]),
            stats.prefix_hits,
        );
        catch_up(
            self.prefix_lookups.with_label_values(&[backend, "miss"]),
            stats.prefix_misses,
        );
        catch_up(
            self.prefix_reused_tokens.with_label_values(&[backend]),
            stats.prefix_reused_tokens,
        );
        catch_up(
            self.batch_steps.with_label_values(&[backend, "steps"]),
            stats.steps,
        );
        catch_up(
            self.batch_steps.with_label_values(&[backend, "sequences"]),
            stats.sequence_steps,
        );
    }

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
        let float_counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<CounterVec, prometheus::Error> {
                let c = CounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let idle_energy = GaugeVec::new(
            Opts::new(
                "wattgate_idle_energy_joules",
                "Joules metered while no request was active since start, by source; not charged to requests.",
            ),
            &["source"],
        )?;
        registry.register(Box::new(idle_energy.clone()))?;
        let idle_cost = prometheus::Gauge::new(
            "wattgate_idle_cost_dollars",
            "Idle electricity (idle joules x electricity_usd_per_kwh) plus hardware_usd_per_hour over the seconds no request was active, since start; what net savings subtract.",
        )?;
        registry.register(Box::new(idle_cost.clone()))?;
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "wattgate_local_queue_depth",
                "Requests waiting for a worker of an embedded backend.",
            ),
            &["backend"],
        )?;
        registry.register(Box::new(queue_depth.clone()))?;
        let batch = IntGaugeVec::new(
            Opts::new(
                "wattgate_local_batch",
                "An embedded backend's continuous batches now: running sequences, bytes of keys and values they reserved (of kv_cache_mb), bytes the prefix cache holds.",
            ),
            &["backend", "what"],
        )?;
        registry.register(Box::new(batch.clone()))?;
        let prefix_lookups = IntCounterVec::new(
            Opts::new(
                "wattgate_local_prefix_cache_lookups_total",
                "Prompts an embedded backend looked up in its prefix cache, by result (hit: resumed from a cached prefix; miss).",
            ),
            &["backend", "result"],
        )?;
        registry.register(Box::new(prefix_lookups.clone()))?;
        let prefix_reused_tokens = IntCounterVec::new(
            Opts::new(
                "wattgate_local_prefix_reused_tokens_total",
                "Prompt tokens an embedded backend took from its prefix cache instead of computing them.",
            ),
            &["backend"],
        )?;
        registry.register(Box::new(prefix_reused_tokens.clone()))?;
        let batch_steps = IntCounterVec::new(
            Opts::new(
                "wattgate_local_batch_steps_total",
                "An embedded backend's forward steps (what=steps) and the sequences they ran summed (what=sequences); their ratio is the mean batch size.",
            ),
            &["backend", "what"],
        )?;
        registry.register(Box::new(batch_steps.clone()))?;
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
                "Chat completions by route (local|cloud), backend, routing reason, outcome (ok|error|cancelled|abandoned|shutdown), experiment and arm (none outside experiments).",
                &["route", "backend", "reason", "outcome", "experiment", "arm"],
            )?,
            ttft: histogram(
                "wattgate_time_to_first_token_seconds",
                "Time from arrival to the first byte of the answer (first chunk of a stream), by route and backend.",
                &["route", "backend"],
                LATENCY_BUCKETS,
            )?,
            energy: float_counter(
                "wattgate_energy_joules_total",
                "Joules spent serving requests, by backend and source (nvml|rapl measured; estimate|cloud_estimate modeled).",
                &["backend", "source"],
            )?,
            counterfactual_energy: float_counter(
                "wattgate_counterfactual_energy_joules_total",
                "Joules the baseline cloud backend would have spent on the same requests (estimate), by the backend that served.",
                &["backend"],
            )?,
            idle_energy,
            idle_cost,
            flops: float_counter(
                "wattgate_flops_total",
                "Floating-point operations spent (2 x active parameters x tokens), by backend.",
                &["backend"],
            )?,
            counterfactual_flops: float_counter(
                "wattgate_counterfactual_flops_total",
                "FLOPs the baseline cloud backend would have spent, by the backend that served.",
                &["backend"],
            )?,
            cost: float_counter(
                "wattgate_cost_dollars_total",
                "US dollars spent, by backend and kind (local: electricity and hardware; cloud: API price).",
                &["backend", "kind"],
            )?,
            counterfactual_cost: float_counter(
                "wattgate_counterfactual_cost_dollars_total",
                "US dollars the baseline cloud backend would have charged, by the backend that served.",
                &["backend"],
            )?,
            queue_depth,
            batch,
            prefix_lookups,
            prefix_reused_tokens,
            batch_steps,
            ledger_rows: counter(
                "wattgate_ledger_rows_total",
                "Ledger rows by result (queued|disabled).",
                &["result"],
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
            guard_decisions: counter(
                "wattgate_guard_decisions_total",
                "Quality-guard decisions on local answers, by local backend and decision (pass|escalated|no_signal|escalation_failed|unchecked).",
                &["backend", "decision"],
            )?,
            guard_confidence: histogram(
                "wattgate_guard_confidence",
                "The quality guard's confidence (P(acceptable), 0..1) in local answers it checked, by local backend.",
                &["backend"],
                CONFIDENCE_BUCKETS,
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
            experiment_outcomes: counter(
                "wattgate_experiment_outcomes_total",
                "Graded answers by experiment, arm, source (feedback|shadow) and result (success: score >= 0.5|failure).",
                &["experiment", "arm", "source", "result"],
            )?,
            experiment_energy: float_counter(
                "wattgate_experiment_energy_joules_total",
                "Joules by experiment, arm and kind (actual|counterfactual: what cloud-only would have spent).",
                &["experiment", "arm", "kind"],
            )?,
            experiment_flops: float_counter(
                "wattgate_experiment_flops_total",
                "FLOPs by experiment, arm and kind (actual|counterfactual).",
                &["experiment", "arm", "kind"],
            )?,
            experiment_cost: float_counter(
                "wattgate_experiment_cost_dollars_total",
                "US dollars by experiment, arm and kind (actual|counterfactual).",
                &["experiment", "arm", "kind"],
            )?,
            shadow_checks: counter(
                "wattgate_shadow_checks_total",
                "Shadow checks of local answers against the cloud by experiment, arm and result (agree|disagree|error|skipped_budget|skipped_busy).",
                &["experiment", "arm", "result"],
            )?,
            shadow_cost: float_counter(
                "wattgate_shadow_cost_dollars_total",
                "US dollars spent on shadow checks (cloud answers and judging), by backend; not savings, not in the request counters.",
                &["backend"],
            )?,
            shadow_energy: float_counter(
                "wattgate_shadow_energy_joules_total",
                "Joules caused by shadow checks, by backend and source (cloud_estimate).",
                &["backend", "source"],
            )?,
            shadow_tokens: counter(
                "wattgate_shadow_tokens_total",
                "Tokens used by shadow checks, by backend and kind (input|output).",
                &["backend", "kind"],
            )?,
            retries: counter(
                "wattgate_upstream_retries_total",
                "Retries of failed cloud attempts (before the first byte), by backend and the failure kind retried.",
                &["backend", "kind"],
            )?,
            circuit_state: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "wattgate_backend_circuit_state",
                        "Circuit breaker state by backend: 0 closed, 1 half-open, 2 open.",
                    ),
                    &["backend"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            circuit_transitions: counter(
                "wattgate_circuit_transitions_total",
                "Circuit breaker transitions by backend and new state (open|half_open|closed).",
                &["backend", "state"],
            )?,
            rejected: counter(
                "wattgate_rejected_requests_total",
                "Requests refused before any backend, by reason (unauthorized|forbidden|rate_limited_requests|rate_limited_tokens|too_many_concurrent).",
                &["reason"],
            )?,
            embeddings_requests: counter(
                "wattgate_embeddings_requests_total",
                "POST /v1/embeddings requests, by model and outcome (ok|error).",
                &["model", "outcome"],
            )?,
            embeddings_tokens: counter(
                "wattgate_embeddings_tokens_total",
                "Tokens embedded (word pieces, [CLS] and [SEP] included, for the embedded encoder; the upstream's count for a passed-through model), by model.",
                &["model"],
            )?,
            embeddings_energy: float_counter(
                "wattgate_embeddings_energy_joules_total",
                "Joules charged to embeddings requests served in-process, by model and energy source (measured: nvml|rapl; estimated: estimate).",
                &["model", "source"],
            )?,
            embeddings_counterfactual_cost: float_counter(
                "wattgate_embeddings_counterfactual_cost_dollars_total",
                "What the embedded tokens would have cost at the model's cloud_usd_per_million_tokens (an estimate from a published price), by model.",
                &["model"],
            )?,
            router_reloads: counter(
                "wattgate_router_reloads_total",
                "Router reloads (POST /v1/router/reload or SIGHUP), by result: ok (every router file loaded and swapped in) or refused (one failed to load; the running routers stayed).",
                &["result"],
            )?,
            connections_refused: counter(
                "wattgate_connections_refused_total",
                "Connections refused or closed at the door, by reason (per_ip|header_timeout|body_timeout).",
                &["reason"],
            )?,
            connections_open: {
                let g = IntGauge::new(
                    "wattgate_connections_open",
                    "Client connections open now.",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            ledger_rows_dropped: {
                let c = prometheus::IntCounter::new(
                    "wattgate_ledger_rows_dropped_total",
                    "Ledger rows dropped because the writer's queue (ledger.queue_rows) was full.",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            ledger_catchups: {
                let c = prometheus::IntCounter::new(
                    "wattgate_ledger_catchups_total",
                    "Times the ledger's backlog passed a quarter of ledger.queue_rows and a normal-priority thread took over writing from the idle-priority writer.",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
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
