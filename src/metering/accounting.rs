//! What a request cost, and what the cloud-only baseline would have cost for the same request.
//!
//! Pure arithmetic on configured constants (every default carries its source in
//! `config.rs`) and the measured local charge:
//! - compute: 2 x active parameters x (input + output tokens), the IPW harness's rule;
//! - cloud energy: tokens x J/token x PUE, always an estimate;
//! - cloud dollars: tokens x the published $/1M-token price;
//! - local dollars: metered joules x electricity price, plus amortised hardware $/hour over the
//!   request's share of wall time.
//!
//! The counterfactual prices the same input tokens and the output tokens actually produced on
//! the baseline cloud backend. A request that failed locally and then went to the cloud pays for
//! both: the local energy is in its metered charge, the cloud part is priced in full.

use serde::{Deserialize, Serialize};

use super::attribution::Charge;
use crate::config::{BackendConfig, MeteringConfig, Role};

/// Joules in a kilowatt-hour.
const JOULES_PER_KWH: f64 = 3.6e6;

/// The constants that price one backend's tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendRates {
    /// Local or cloud.
    pub role: Role,
    /// Parameters active per token.
    pub active_parameters: f64,
    /// $ per input token (cloud).
    pub usd_per_input_token: f64,
    /// $ per output token (cloud).
    pub usd_per_output_token: f64,
    /// J per input token including PUE (cloud).
    pub joules_per_input_token: f64,
    /// J per output token including PUE (cloud).
    pub joules_per_output_token: f64,
}

impl BackendRates {
    /// Resolves a backend's rates against the `[metering]` defaults.
    pub fn from_config(b: &BackendConfig, m: &MeteringConfig) -> Self {
        Self {
            role: b.role,
            active_parameters: b.active_parameters.unwrap_or(b.parameters),
            usd_per_input_token: b.usd_per_million_input_tokens.unwrap_or(0.0) / 1e6,
            usd_per_output_token: b.usd_per_million_output_tokens.unwrap_or(0.0) / 1e6,
            joules_per_input_token: b
                .joules_per_input_token
                .unwrap_or(m.cloud_joules_per_input_token)
                * m.cloud_pue,
            joules_per_output_token: b
                .joules_per_output_token
                .unwrap_or(m.cloud_joules_per_output_token)
                * m.cloud_pue,
        }
    }

    /// 2 x active parameters per token.
    pub fn flops(&self, tokens: Tokens) -> f64 {
        2.0 * self.active_parameters * tokens.total() as f64
    }

    /// Cloud energy for these tokens (estimate).
    pub fn cloud_joules(&self, tokens: Tokens) -> f64 {
        tokens.input as f64 * self.joules_per_input_token
            + tokens.output as f64 * self.joules_per_output_token
    }

    /// Cloud price for these tokens.
    pub fn cloud_usd(&self, tokens: Tokens) -> f64 {
        tokens.input as f64 * self.usd_per_input_token
            + tokens.output as f64 * self.usd_per_output_token
    }
}

/// Local prices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalRates {
    /// $ per joule of electricity.
    pub usd_per_joule: f64,
    /// $ per second of amortised hardware.
    pub hardware_usd_per_second: f64,
}

impl LocalRates {
    /// From `[metering]`.
    pub fn from_config(m: &MeteringConfig) -> Self {
        Self {
            usd_per_joule: m.electricity_usd_per_kwh / JOULES_PER_KWH,
            hardware_usd_per_second: m.hardware_usd_per_hour / 3600.0,
        }
    }
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Tokens {
    /// Prompt tokens.
    pub input: u64,
    /// Generated tokens.
    pub output: u64,
}

impl Tokens {
    /// Input + output.
    pub fn total(self) -> u64 {
        self.input.saturating_add(self.output)
    }
}

/// Spend of one request: what it cost, and what cloud-only would have cost.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Bill {
    /// Local joules charged to the request by the energy meter.
    pub local_joules: f64,
    /// Cloud joules (tokens x J/token x PUE): an estimate, 0 when served locally.
    pub cloud_joules: f64,
    /// FLOPs of the model that served.
    pub flops: f64,
    /// Local electricity and hardware $.
    pub local_usd: f64,
    /// Cloud API $.
    pub cloud_usd: f64,
    /// What the baseline cloud backend would have spent, when one is configured.
    pub counterfactual: Option<Counterfactual>,
}

/// The cloud-only baseline's spend for the same request.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Counterfactual {
    /// Joules (estimate, with PUE).
    pub joules: f64,
    /// FLOPs.
    pub flops: f64,
    /// $.
    pub usd: f64,
}

impl Bill {
    /// Prices one request. `served` is the backend that produced the answer (for an escalated
    /// request, the cloud one); `local` is the meter's charge for the request's whole window.
    pub fn compute(
        local: Charge,
        served: &BackendRates,
        tokens: Tokens,
        baseline: Option<&BackendRates>,
        rates: LocalRates,
    ) -> Self {
        let cloud = served.role == Role::Cloud;
        Self {
            local_joules: local.joules,
            cloud_joules: if cloud {
                served.cloud_joules(tokens)
            } else {
                0.0
            },
            flops: served.flops(tokens),
            local_usd: local.joules * rates.usd_per_joule
                + local.seconds * rates.hardware_usd_per_second,
            cloud_usd: if cloud { served.cloud_usd(tokens) } else { 0.0 },
            counterfactual: baseline.map(|b| Counterfactual {
                joules: b.cloud_joules(tokens),
                flops: b.flops(tokens),
                usd: b.cloud_usd(tokens),
            }),
        }
    }

    /// Local + cloud joules.
    pub fn joules(&self) -> f64 {
        self.local_joules + self.cloud_joules
    }

    /// Local + cloud $.
    pub fn usd(&self) -> f64 {
        self.local_usd + self.cloud_usd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cloud() -> BackendRates {
        BackendRates {
            role: Role::Cloud,
            active_parameters: 22e9,
            usd_per_input_token: 2.0 / 1e6,
            usd_per_output_token: 8.0 / 1e6,
            joules_per_input_token: 0.56 * 1.1,
            joules_per_output_token: 0.56 * 1.1,
        }
    }

    fn local() -> BackendRates {
        BackendRates {
            role: Role::Local,
            active_parameters: 268e6,
            usd_per_input_token: 0.0,
            usd_per_output_token: 0.0,
            joules_per_input_token: 0.0,
            joules_per_output_token: 0.0,
        }
    }

    #[test]
    fn local_request_against_the_cloud_baseline() {
        let rates = LocalRates {
            usd_per_joule: 0.165 / 3.6e6,
            hardware_usd_per_second: 0.36 / 3600.0,
        };
        let tokens = Tokens {
            input: 100,
            output: 50,
        };
        let charge = Charge {
            joules: 36.0,
            seconds: 2.0,
        };
        let b = Bill::compute(charge, &local(), tokens, Some(&cloud()), rates);
        assert_eq!(b.local_joules, 36.0);
        assert_eq!(b.cloud_joules, 0.0);
        assert_eq!(b.flops, 2.0 * 268e6 * 150.0);
        let usd = 36.0 * 0.165 / 3.6e6 + 2.0 * 0.0001;
        assert!((b.local_usd - usd).abs() < 1e-15);
        let cf = b.counterfactual.unwrap_or_default();
        assert!((cf.joules - 150.0 * 0.616).abs() < 1e-9);
        assert_eq!(cf.flops, 2.0 * 22e9 * 150.0);
        assert!((cf.usd - (100.0 * 2.0 + 50.0 * 8.0) / 1e6).abs() < 1e-15);
    }

    #[test]
    fn cloud_request_pays_cloud_prices_and_its_local_window() {
        let tokens = Tokens {
            input: 1000,
            output: 10,
        };
        let charge = Charge {
            joules: 0.5,
            seconds: 0.1,
        };
        let rates = LocalRates {
            usd_per_joule: 1e-7,
            hardware_usd_per_second: 0.0,
        };
        let b = Bill::compute(charge, &cloud(), tokens, Some(&cloud()), rates);
        let cf = b.counterfactual.unwrap_or_default();
        assert_eq!(b.cloud_joules, cf.joules);
        assert_eq!(b.cloud_usd, cf.usd);
        // Cloud-served: saving is negative by exactly the local window's cost.
        assert!((cf.joules - b.joules() + 0.5).abs() < 1e-12);
        assert!((cf.usd - b.usd() + 0.5e-7).abs() < 1e-18);
    }
}
