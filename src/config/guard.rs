//! `[guard]`: checking local answers before the client sees them.

use serde::{Deserialize, Serialize};

/// Whether local answers are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardMode {
    /// Local answers are served unchecked (the router alone decides).
    Off,
    /// Every local answer to a routed request is scored; doubtful ones are replaced by the
    /// cloud's answer.
    Check,
}

impl GuardMode {
    /// The config and header spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            GuardMode::Off => "off",
            GuardMode::Check => "check",
        }
    }
}

/// What the guard does with streamed local answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardStream {
    /// Buffer the local stream until it ends (or `hold_max_tokens`), keeping the connection
    /// alive with SSE comments, then release it or replace it with the cloud's stream.
    Hold,
    /// Stream local answers unchecked (no added time to first token), counted as `unchecked`.
    Pass,
}

/// `[guard]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// `off` or `check`. Unset: `check` when a cloud backend is usable (configured, and its
    /// `api_key_env` set when it names one: there is somewhere to escalate to), else `off`.
    pub mode: Option<GuardMode>,
    /// Escalate answers whose confidence (P(acceptable), 0..1) is below this. Unset: derived
    /// from `max_quality_loss` or `max_escalation_share` on the head's validation curve, else
    /// the head's own default operating point, else [`DEFAULT_RULE_THRESHOLD`] for the rule.
    pub threshold: Option<f64>,
    /// The fewest escalations whose validation quality stays within this of cloud-only
    /// (0..1 scale; 0.01 is one point).
    pub max_quality_loss: Option<f64>,
    /// The highest threshold that escalates at most this share of local answers on the
    /// validation curve.
    pub max_escalation_share: Option<f64>,
    /// `hold` or `pass` for streamed answers.
    pub stream: GuardStream,
    /// `hold`: tokens buffered at most; a longer answer is checked on its first
    /// `hold_max_tokens` tokens and then released (or escalated) while the rest streams.
    pub hold_max_tokens: usize,
    /// `hold`: seconds between SSE keep-alive comments while an answer is held, well under the
    /// 60 s idle timeout of common proxies (nginx's `proxy_read_timeout` default).
    pub keepalive_s: f64,
}

/// The rule's threshold when nothing else sets one: a geometric-mean token probability of 0.5
/// (mean ln P of -0.69), i.e. on average the model gave its own tokens even odds or better.
pub const DEFAULT_RULE_THRESHOLD: f64 = 0.5;

/// The quality loss a shipped head's default operating point allows when `[guard]` sets no
/// threshold: one point, the same bar as the router's `share@1pt` measure.
pub const DEFAULT_MAX_QUALITY_LOSS: f64 = 0.01;

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            mode: None,
            threshold: None,
            max_quality_loss: None,
            max_escalation_share: None,
            stream: GuardStream::Hold,
            hold_max_tokens: 1024,
            keepalive_s: 5.0,
        }
    }
}

impl GuardConfig {
    /// Checks ranges and that at most one way of setting the threshold is used; the error
    /// names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let unit = |key: &str, v: Option<f64>| match v {
            Some(x) if !(0.0..=1.0).contains(&x) => Err((
                format!("guard.{key}"),
                format!("must be from 0 to 1, got {x}"),
            )),
            _ => Ok(()),
        };
        unit("threshold", self.threshold)?;
        unit("max_quality_loss", self.max_quality_loss)?;
        unit("max_escalation_share", self.max_escalation_share)?;
        let set = [
            self.threshold.is_some(),
            self.max_quality_loss.is_some(),
            self.max_escalation_share.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        if set > 1 {
            return Err((
                "guard".to_owned(),
                "sets more than one of threshold, max_quality_loss, max_escalation_share; set at most one".to_owned(),
            ));
        }
        if self.hold_max_tokens == 0 {
            return Err((
                "guard.hold_max_tokens".to_owned(),
                "must be at least 1".to_owned(),
            ));
        }
        if !(self.keepalive_s.is_finite() && self.keepalive_s > 0.0) {
            return Err((
                "guard.keepalive_s".to_owned(),
                format!(
                    "must be a positive number of seconds, got {}",
                    self.keepalive_s
                ),
            ));
        }
        Ok(())
    }
}
