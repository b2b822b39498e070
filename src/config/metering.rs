//! `[metering]`: how energy, compute and money are measured and priced.

use serde::Deserialize;

use super::{check_non_negative, invalid, Config, ConfigError, Role};

/// Which energy counter meters local work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnergyMeterKind {
    /// NVML if a GPU answers, else RAPL if readable, else the CPU-time estimate.
    Auto,
    /// NVIDIA GPUs' total-energy counters (power x time where the counter is missing).
    Nvml,
    /// Linux powercap (Intel/AMD RAPL) package counters.
    Rapl,
    /// The process's CPU time x `cpu_watts_per_core` (+ `idle_watts`): a model, not a measurement.
    Estimate,
}

/// Energy meters, prices and the cloud-only counterfactual's constants.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeteringConfig {
    /// Which counter meters local energy.
    pub energy_meter: EnergyMeterKind,
    /// Milliseconds between background readings of the counter.
    pub sample_interval_ms: u64,
    /// `estimate`: watts drawn per fully busy core.
    pub cpu_watts_per_core: f64,
    /// `estimate`: watts drawn regardless of load, added over wall time.
    pub idle_watts: f64,
    /// Electricity price for local energy, $ per kWh.
    pub electricity_usd_per_kwh: f64,
    /// Amortised local hardware, $ per hour, split among requests like energy.
    pub hardware_usd_per_hour: f64,
    /// Cloud energy per input token (J) before PUE, for cloud backends that do not set their own.
    pub cloud_joules_per_input_token: f64,
    /// Cloud energy per output token (J) before PUE, for cloud backends that do not set their own.
    pub cloud_joules_per_output_token: f64,
    /// Datacenter power usage effectiveness applied to cloud energy.
    pub cloud_pue: f64,
    /// The cloud backend whose cost is the counterfactual; unset means the first cloud backend.
    pub baseline_backend: Option<String>,
}

impl Default for MeteringConfig {
    fn default() -> Self {
        Self {
            energy_meter: EnergyMeterKind::Auto,
            // The IPW harness samples its energy counters every 50 ms (arXiv 2511.07885).
            sample_interval_ms: 50,
            // Intel Xeon Platinum 8480+: 350 W TDP over 56 cores (Intel ARK) = 6.25 W per busy
            // core; TDP-per-core is how CodeCarbon estimates CPU power without a counter.
            cpu_watts_per_core: 6.25,
            // Off by default: the estimate then covers only the work the gateway causes.
            idle_watts: 0.0,
            // US average residential retail price, 2024: 16.5 cents/kWh (EIA Electric Power
            // Monthly, table 5.3).
            electricity_usd_per_kwh: 0.165,
            hardware_usd_per_hour: 0.0,
            // Input tokens are prefilled in parallel and compute-bound, so they cost the FLOPs
            // they need at the hardware's efficiency: 2 x 22e9 active parameters (Qwen3-235B-
            // A22B, the IPW harness's cloud model) = 4.4e10 FLOP per token, on H100 SXM at
            // 1,979 dense FP8 TFLOP/s per 700 W (NVIDIA H100 datasheet) and 46% model FLOPs
            // utilisation (PaLM's measured MFU, Chowdhery et al. 2022, arXiv 2204.02311):
            // 4.4e10 / (1.979e15 x 0.46 / 700) = 0.034 J. An estimate from published
            // constants, not a per-phase measurement; override it with yours.
            cloud_joules_per_input_token: 0.034,
            // IPW harness: Qwen3-235B-A22B FP8 on 8 x H100, batched, about 0.56 J per token
            // (arXiv 2511.07885). Decode is memory-bound and dominates serving energy, so the
            // harness's figure is charged to generated tokens.
            cloud_joules_per_output_token: 0.56,
            // Google's fleet-wide trailing-twelve-month PUE, 2023: 1.10 (Google 2024
            // Environmental Report); hyperscalers host the frontier APIs.
            cloud_pue: 1.1,
            baseline_backend: None,
        }
    }
}

impl Config {
    pub(super) fn validate_metering(&self) -> Result<(), ConfigError> {
        let m = &self.metering;
        if !(1..=60_000).contains(&m.sample_interval_ms) {
            return Err(invalid(
                "metering.sample_interval_ms",
                format!(
                    "must be 1 to 60000 milliseconds, got {}",
                    m.sample_interval_ms
                ),
            ));
        }
        for (key, v) in [
            ("metering.cpu_watts_per_core", m.cpu_watts_per_core),
            ("metering.idle_watts", m.idle_watts),
            (
                "metering.electricity_usd_per_kwh",
                m.electricity_usd_per_kwh,
            ),
            ("metering.hardware_usd_per_hour", m.hardware_usd_per_hour),
            (
                "metering.cloud_joules_per_input_token",
                m.cloud_joules_per_input_token,
            ),
            (
                "metering.cloud_joules_per_output_token",
                m.cloud_joules_per_output_token,
            ),
        ] {
            check_non_negative(key, v)?;
        }
        if !(m.cloud_pue.is_finite() && m.cloud_pue >= 1.0) {
            return Err(invalid(
                "metering.cloud_pue",
                format!(
                    "must be at least 1.0 (a PUE below 1 is impossible), got {}",
                    m.cloud_pue
                ),
            ));
        }
        if let Some(name) = &m.baseline_backend {
            match self.backends.iter().find(|b| &b.name == name) {
                Some(b) if b.role == Role::Cloud => {}
                Some(_) => {
                    return Err(invalid(
                        "metering.baseline_backend",
                        format!(
                            "\"{name}\" is a local backend; the baseline must be a cloud backend"
                        ),
                    ))
                }
                None => {
                    return Err(invalid(
                        "metering.baseline_backend",
                        format!("\"{name}\" is not a configured backend name"),
                    ))
                }
            }
        }
        Ok(())
    }
}
