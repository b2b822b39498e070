//! The quality guard: every local answer to a routed request is scored before the client sees
//! it, and a doubtful one is replaced by the cloud's answer to the same request.
//!
//! The router decides from the prompt alone, before a token exists; the guard decides from what
//! the local model actually produced. Its confidence is a calibrated P(the answer is
//! acceptable) from the answer's token log-probabilities and the router's p_local ([`head`]),
//! or, without a trained head, the geometric-mean token probability ([`head::rule_confidence`]).
//! The check itself is arithmetic on a few floats per token; the cost of the guard is the cloud
//! answer it buys when it escalates, and, for held streams, the wait for the whole local answer.
//!
//! What the gateway does with a verdict (hold, replace, relay) lives in `gateway.rs`; this module
//! only decides.

pub mod head;
pub mod replay;
pub mod signals;

use std::sync::Arc;

use crate::config::{
    BackendConfig, Config, GuardConfig, GuardMode, GuardStream, Role, DEFAULT_MAX_QUALITY_LOSS,
    DEFAULT_RULE_THRESHOLD,
};
pub use head::GuardHead;
pub use signals::Signals;

/// What the guard did with one request, for `wattgate_guard_decisions_total{decision}`, the
/// ledger and the `x-wattgate-guard` reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Checked and served as the local model answered.
    Pass,
    /// Checked, found doubtful, and replaced by the cloud's answer.
    Escalated,
    /// The local backend returned no log-probabilities: served unchecked.
    NoSignal,
    /// Found doubtful, but the cloud failed too: the local answer was served.
    EscalationFailed,
    /// A stream under `stream = "pass"`: served unchecked.
    Unchecked,
}

impl Decision {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Pass => "pass",
            Decision::Escalated => "escalated",
            Decision::NoSignal => "no_signal",
            Decision::EscalationFailed => "escalation_failed",
            Decision::Unchecked => "unchecked",
        }
    }
}

/// The guard's judgement of one local answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// What to do.
    pub escalate: bool,
    /// P(acceptable), when there were signals.
    pub confidence: Option<f64>,
    /// The threshold it was held to.
    pub threshold: f64,
    /// The signals read.
    pub signals: Option<Signals>,
}

/// How one request is guarded, decided before it is served.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Whether a local answer will be checked.
    pub check: bool,
    /// A threshold replacing the backend's (an experiment arm's `guard_threshold`).
    pub threshold: Option<f64>,
    /// Streams: hold or pass.
    pub stream: GuardStream,
}

/// One local backend's judge.
#[derive(Debug, Clone)]
struct Judge {
    head: Option<Arc<GuardHead>>,
    threshold: f64,
}

/// The configured guard.
#[derive(Debug, Clone)]
pub struct Guard {
    mode: GuardMode,
    stream: GuardStream,
    /// Per backend, in config order; `None` for cloud backends.
    judges: Vec<Option<Judge>>,
    /// `[guard] hold_max_tokens`.
    pub hold_max_tokens: usize,
    /// `[guard] keepalive_s`.
    pub keepalive: std::time::Duration,
}

impl Guard {
    /// Resolves the mode (unset: `check` when a cloud backend is usable, i.e. has no key
    /// variable or has it set) and each local backend's head and threshold. A head file that exists
    /// but cannot be read is an error naming it (a silently missing head would change every
    /// decision).
    pub fn new(config: &Config) -> Result<Self, String> {
        let g = &config.guard;
        // A cloud backend whose key variable is unset cannot take an escalation: without a
        // usable cloud the guard is off by default (local only, as without a guard).
        let has_cloud = crate::config::cloud_usable(&config.backends);
        let mode = g.mode.unwrap_or(if has_cloud {
            GuardMode::Check
        } else {
            GuardMode::Off
        });
        let judges = config
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                (b.role == Role::Local)
                    .then(|| judge(g, b, &config.routing.router_dir))
                    .transpose()
                    .map_err(|e| format!("backends[{i}]: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (b, j) in config.backends.iter().zip(&judges) {
            if let (Some(j), GuardMode::Check) = (j, mode) {
                tracing::info!(
                    backend = %b.name,
                    head = j.head.is_some(),
                    threshold = j.threshold,
                    "quality guard on"
                );
            }
        }
        Ok(Self {
            mode,
            stream: g.stream,
            judges,
            hold_max_tokens: g.hold_max_tokens,
            keepalive: crate::config::secs(g.keepalive_s),
        })
    }

    /// The plan for one request: the `x-wattgate-guard` header first, then the experiment
    /// arm's `guard` and `guard_threshold`, then `[guard]`.
    pub fn plan(
        &self,
        header: Option<GuardMode>,
        arm: Option<(Option<GuardMode>, Option<f64>)>,
    ) -> Plan {
        let (arm_mode, arm_threshold) = arm.unwrap_or((None, None));
        let mode = header.or(arm_mode).unwrap_or(self.mode);
        Plan {
            check: mode == GuardMode::Check,
            threshold: arm_threshold,
            stream: self.stream,
        }
    }

    /// Judges a local answer of backend `backend` from its tokens' log-probabilities.
    pub fn judge(
        &self,
        backend: usize,
        plan: &Plan,
        logprobs: Option<&[f32]>,
        finish_reason: Option<&str>,
        p_local: Option<f64>,
    ) -> Verdict {
        let judge = self.judges.get(backend).and_then(Option::as_ref);
        let threshold = plan
            .threshold
            .or(judge.map(|j| j.threshold))
            .unwrap_or(DEFAULT_RULE_THRESHOLD);
        let signals = logprobs.and_then(|l| Signals::from_logprobs(l, finish_reason));
        let confidence = signals.map(|s| match judge.and_then(|j| j.head.as_deref()) {
            Some(head) => head.confidence(&s, p_local),
            None => head::rule_confidence(&s),
        });
        Verdict {
            escalate: confidence.is_some_and(|c| c < threshold),
            confidence,
            threshold,
            signals,
        }
    }

    /// The threshold backend `backend` is held to (for reports and the startup log).
    pub fn threshold(&self, backend: usize) -> Option<f64> {
        self.judges.get(backend)?.as_ref().map(|j| j.threshold)
    }
}

/// A local backend's head (next to its router) and threshold.
fn judge(
    g: &GuardConfig,
    b: &BackendConfig,
    router_dir: &std::path::Path,
) -> Result<Judge, String> {
    let head = match b.router_name() {
        Some(name) => match crate::router::model::resolve(&name, router_dir) {
            Ok(dir) => GuardHead::load(&dir)?.map(Arc::new),
            // A router that cannot be found is the router's error to report (under policy =
            // "router"); the guard then runs on the rule.
            Err(crate::router::model::RouterError::NotFound { .. }) => None,
            Err(e) => return Err(e.to_string()),
        },
        None => None,
    };
    let threshold = match (&head, g.threshold, g.max_quality_loss, g.max_escalation_share) {
        (_, Some(t), _, _) => t,
        (Some(h), None, Some(loss), _) => h.threshold_for_quality_loss(loss),
        (Some(h), None, None, Some(share)) => h.threshold_for_escalation_share(share),
        (Some(h), None, None, None) => h.threshold_for_quality_loss(DEFAULT_MAX_QUALITY_LOSS),
        (None, None, Some(_), _) | (None, None, None, Some(_)) => {
            return Err(format!(
                "guard.max_quality_loss / max_escalation_share need a trained guard head ({} next to the backend's router), and `{}` has none; set guard.threshold instead",
                head::GUARD_FILE,
                b.name
            ))
        }
        (None, None, None, None) => DEFAULT_RULE_THRESHOLD,
    };
    Ok(Judge { head, threshold })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_thresholds_and_precedence() {
        let mut config = Config::default();
        config.routing.router_dir = std::path::PathBuf::from("/nonexistent");
        // The default cloud reads OPENAI_API_KEY: unset (as in CI), the guard is off by
        // default; a cloud backend without a key variable makes it check.
        config.backends[1].api_key_env = Some("WATTGATE_TEST_UNSET_KEY".to_owned());
        assert!(!Guard::new(&config).unwrap().plan(None, None).check);
        config.backends[1].api_key_env = None;
        let guard = Guard::new(&config).unwrap();
        assert!(guard.plan(None, None).check);
        assert!(!guard.plan(Some(GuardMode::Off), None).check);
        assert!(!guard.plan(None, Some((Some(GuardMode::Off), None))).check);
        assert!(
            guard
                .plan(Some(GuardMode::Check), Some((Some(GuardMode::Off), None)))
                .check
        );
        let plan = guard.plan(None, Some((None, Some(0.9))));
        // exp(-0.05) = 0.95: sure; exp(-2) = 0.14: doubtful.
        let sure = guard.judge(
            0,
            &guard.plan(None, None),
            Some(&[-0.05; 4]),
            Some("stop"),
            None,
        );
        assert!(!sure.escalate);
        assert!((sure.confidence.unwrap() - (-0.05f64).exp()).abs() < 1e-6);
        let unsure = guard.judge(
            0,
            &guard.plan(None, None),
            Some(&[-2.0; 4]),
            Some("stop"),
            None,
        );
        assert!(unsure.escalate);
        assert_eq!(unsure.threshold, DEFAULT_RULE_THRESHOLD);
        // The arm's threshold replaces the configured one.
        assert!(guard.judge(0, &plan, Some(&[-0.2; 4]), None, None).escalate);
        let none = guard.judge(0, &guard.plan(None, None), None, None, None);
        assert!(!none.escalate && none.confidence.is_none());

        config.backends.retain(|b| b.role == Role::Local);
        assert!(!Guard::new(&config).unwrap().plan(None, None).check);
        config.guard.max_quality_loss = Some(0.02);
        let e = Guard::new(&config).unwrap_err();
        assert!(e.contains("guard head"), "{e}");
    }
}
