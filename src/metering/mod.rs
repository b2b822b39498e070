//! Metering: what every request spent (local joules, FLOPs, dollars; cloud tokens and dollars)
//! and what the configured cloud baseline would have spent for the same request.
//!
//! - [`counters`]: where joules come from (NVML, RAPL, or the CPU-time estimate), each figure
//!   labeled with its source;
//! - [`attribution`]: splitting the shared counter among the requests active at the time;
//! - [`accounting`]: FLOPs, dollars and the counterfactual from configured constants;
//! - [`request`]: one request's bill as it ends (however it ends), and where it is recorded:
//!   the access log, Prometheus, the ledger row and the shadow checker.

pub mod accounting;
pub mod attribution;
pub mod counters;
pub mod idle;
pub mod request;

use std::sync::Arc;
use std::time::Duration;

pub use accounting::{Bill, Counterfactual, Tokens};
pub use attribution::{Charge, EnergyMeter, MeterTotals, Ticket};
pub use counters::{EnergyCounter, EnergySource};
pub use request::{GuardLeg, Outcome, Recorder, RequestMeter};

use crate::config::{Config, Role};
use accounting::{BackendRates, LocalRates};

/// The gateway's meter: one energy counter for the machine, and the prices of every backend.
pub struct Metering {
    meter: Arc<EnergyMeter>,
    rates: Vec<BackendRates>,
    baseline: Option<usize>,
    local: LocalRates,
}

impl Metering {
    /// Opens the configured energy counter and starts sampling it in the background.
    pub fn new(config: &Config) -> Result<Self, String> {
        let counter = counters::open(&config.metering)?;
        let metering = Self::with_counter(config, counter);
        attribution::spawn_sampler(
            &metering.meter,
            Duration::from_millis(config.metering.sample_interval_ms),
        );
        tracing::info!(
            source = metering.source().as_str(),
            baseline = metering.baseline_name(config).unwrap_or("none"),
            "metering energy with `{}` ({})",
            metering.source().as_str(),
            metering.source().kind()
        );
        for b in &config.backends {
            let unpriced = b.usd_per_million_input_tokens.is_none()
                || b.usd_per_million_output_tokens.is_none();
            if b.role == Role::Cloud && unpriced {
                tracing::warn!(
                    backend = %b.name,
                    "cloud backend has no usd_per_million_input_tokens / usd_per_million_output_tokens: its dollar figures count $0"
                );
            }
        }
        Ok(metering)
    }

    /// Metering on a given counter, without a background sampler (tests drive it).
    pub fn with_counter(config: &Config, counter: Box<dyn EnergyCounter>) -> Self {
        let rates = config
            .backends
            .iter()
            .map(|b| BackendRates::from_config(b, &config.metering))
            .collect();
        let baseline = match &config.metering.baseline_backend {
            Some(name) => config.backends.iter().position(|b| &b.name == name),
            None => config.backends.iter().position(|b| b.role == Role::Cloud),
        };
        Self {
            meter: Arc::new(EnergyMeter::new(counter)),
            rates,
            baseline,
            local: LocalRates::from_config(&config.metering),
        }
    }

    /// A request starts using the machine (no counter read: the sampler thread does those).
    pub fn begin(&self) -> Ticket {
        self.meter.begin()
    }

    /// A query starts, with the counter read now (offline profiling, one query at a time).
    pub fn begin_measured(&self) -> Ticket {
        self.meter.begin_measured()
    }

    /// A request that was never served gives its slot back; it is charged nothing, and what the
    /// meter measured meanwhile stays with the other requests.
    pub fn release(&self, ticket: Ticket) {
        let _ = self.meter.end(ticket);
    }

    /// A request is over: its energy charge, priced. `served` is the backend index (config
    /// order) that produced the answer.
    pub fn end(&self, ticket: Ticket, served: usize, tokens: Tokens) -> Bill {
        let charge = self.meter.end(ticket);
        self.price(charge, served, tokens)
    }

    /// An embeddings request served in-process is over: its energy charge, the electricity and
    /// hardware it cost, its `flops`, and against it a cloud embeddings API's price for the same
    /// tokens. No published figure gives a cloud embedding's joules or FLOPs, so the
    /// counterfactual takes this request's own: embeddings move the cost saved, never the
    /// energy or compute saved, either way.
    pub fn end_embedding(&self, ticket: Ticket, flops: f64, counterfactual_usd: f64) -> Bill {
        let charge = self.meter.end(ticket);
        Bill {
            local_joules: charge.joules,
            flops,
            local_usd: charge.joules * self.local.usd_per_joule
                + charge.seconds * self.local.hardware_usd_per_second,
            counterfactual: Some(crate::metering::Counterfactual {
                joules: charge.joules,
                flops,
                usd: counterfactual_usd,
            }),
            ..Bill::default()
        }
    }

    /// A query that began with [`Self::begin_measured`] is over, with the counter read now.
    pub fn end_measured(&self, ticket: Ticket, served: usize, tokens: Tokens) -> Bill {
        let charge = self.meter.end_measured(ticket);
        self.price(charge, served, tokens)
    }

    fn price(&self, charge: Charge, served: usize, tokens: Tokens) -> Bill {
        let Some(rates) = self.rates.get(served) else {
            return Bill {
                local_joules: charge.joules,
                ..Bill::default()
            };
        };
        let baseline = self.baseline.and_then(|i| self.rates.get(i));
        Bill::compute(charge, rates, tokens, baseline, self.local)
    }

    /// A request the quality guard escalated is over: it pays for both legs. The meter's charge
    /// covers the whole window (the local generation included); the cloud leg is priced on
    /// `tokens` at `served`'s rates; compute adds the local leg's `2 x params x local_tokens`;
    /// the counterfactual is the cloud-only baseline for the answer the client got.
    pub fn end_escalated(
        &self,
        ticket: Ticket,
        served: usize,
        tokens: Tokens,
        local: usize,
        local_tokens: Tokens,
    ) -> Bill {
        let mut bill = self.end(ticket, served, tokens);
        if let Some(rates) = self.rates.get(local) {
            bill.flops += rates.flops(local_tokens);
        }
        bill
    }

    /// FLOPs of `tokens` on backend `backend` (2 x active parameters per token).
    pub fn flops(&self, backend: usize, tokens: Tokens) -> f64 {
        self.rates.get(backend).map_or(0.0, |r| r.flops(tokens))
    }

    /// What `tokens` on cloud backend `backend` cost: (joules, an estimate; dollars). For
    /// spend that is not a served request (shadow checks), so it never enters the meter.
    pub fn cloud_price(&self, backend: usize, tokens: Tokens) -> (f64, f64) {
        self.rates.get(backend).map_or((0.0, 0.0), |r| {
            (r.cloud_joules(tokens), r.cloud_usd(tokens))
        })
    }

    /// Reads the counter now. The sampler thread calls this; request paths never do.
    pub fn sample(&self) {
        self.meter.sample();
    }

    /// The idle spend between two totals: joules, seconds, and their price (electricity plus
    /// `hardware_usd_per_hour`).
    pub fn idle_spend(&self, from: &MeterTotals, to: &MeterTotals) -> crate::savings::Idle {
        let joules = (to.idle_joules - from.idle_joules).max(0.0);
        let seconds = (to.idle_seconds - from.idle_seconds).max(0.0);
        crate::savings::Idle {
            joules,
            seconds,
            usd: joules * self.local.usd_per_joule + seconds * self.local.hardware_usd_per_second,
        }
    }

    /// The local energy counter's kind.
    pub fn source(&self) -> EnergySource {
        self.meter.source()
    }

    /// Joules charged and idle since start.
    pub fn totals(&self) -> MeterTotals {
        self.meter.totals()
    }

    /// The baseline backend's name in `config`.
    pub fn baseline_name<'a>(&self, config: &'a Config) -> Option<&'a str> {
        self.baseline
            .and_then(|i| config.backends.get(i))
            .map(|b| b.name.as_str())
    }
}
