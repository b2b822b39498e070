//! `[[experiments]]` and `[shadow]`: A/B arms on live traffic and the shadow checks that grade them.

use serde::Deserialize;

use super::{
    check_label, check_non_negative, default_true, invalid, BackendConfig, Config, ConfigError,
    GuardMode, Role, RoutingConfig, RoutingPolicy,
};

/// What identifies the unit an experiment assigns to an arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExperimentUnit {
    /// The request body's `user` field: one end user always sees one arm.
    User,
    /// A request header (`header`, default `x-wattgate-session`): one session, one arm.
    Header,
    /// Every request on its own (fastest to converge, but a user may see both arms).
    Request,
}

impl ExperimentUnit {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ExperimentUnit::User => "user",
            ExperimentUnit::Header => "header",
            ExperimentUnit::Request => "request",
        }
    }
}

/// One A/B experiment on alias requests: units (users, sessions or requests) are hashed into
/// arms, each arm routing with its own policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Stable name: part of the assignment hash, the ledger rows and the metric labels.
    pub name: String,
    /// Disabled experiments enroll no one but stay reportable.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// What is assigned.
    pub unit: ExperimentUnit,
    /// `unit = "header"`: the header carrying the unit key.
    pub header: Option<String>,
    /// The arm others are compared with; unset means the first arm.
    pub control: Option<String>,
    /// Two or more arms.
    pub arms: Vec<ArmConfig>,
}

impl ExperimentConfig {
    /// The header carrying the unit key, for `unit = "header"`.
    pub fn unit_header(&self) -> Option<String> {
        (self.unit == ExperimentUnit::Header).then(|| {
            self.header
                .clone()
                .unwrap_or_else(|| DEFAULT_SESSION_HEADER.to_owned())
                .to_ascii_lowercase()
        })
    }

    /// The control arm's name.
    pub fn control_arm(&self) -> &str {
        self.control
            .as_deref()
            .or_else(|| self.arms.first().map(|a| a.name.as_str()))
            .unwrap_or("")
    }
}

/// The header `unit = "header"` reads when `header` is unset.
pub const DEFAULT_SESSION_HEADER: &str = "x-wattgate-session";

/// One arm: a share of the units and the routing they get. Fields left unset inherit
/// `[routing]`; setting `router`, `threshold`, `target_local_share` or `max_quality_loss`
/// implies `policy = "router"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmConfig {
    /// Stable name: part of the assignment hash (renaming an arm reassigns its units).
    pub name: String,
    /// Relative share of units (any non-negative number; 0 drains the arm).
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// The routing rule; `cloud_only` makes a fixed-route control.
    pub policy: Option<RoutingPolicy>,
    /// The router of the first local backend, replacing its configured one.
    pub router: Option<String>,
    /// Serve locally when p_local >= this.
    pub threshold: Option<f64>,
    /// Threshold calibrated to keep this share of traffic local.
    pub target_local_share: Option<f64>,
    /// Threshold from the validation curve: at most this quality loss.
    pub max_quality_loss: Option<f64>,
    /// The quality guard for this arm's requests (`off` makes a "router alone" arm).
    pub guard: Option<GuardMode>,
    /// The guard's threshold for this arm's requests.
    pub guard_threshold: Option<f64>,
}

fn default_weight() -> f64 {
    1.0
}

impl ArmConfig {
    /// The `[routing]` this arm routes with: the global one with the arm's fields applied.
    pub fn routing(&self, base: &RoutingConfig) -> RoutingConfig {
        let mut routing = base.clone();
        let learned = self.router.is_some()
            || self.threshold.is_some()
            || self.target_local_share.is_some()
            || self.max_quality_loss.is_some();
        if let Some(policy) = self.policy {
            routing.policy = policy;
        } else if learned {
            routing.policy = RoutingPolicy::Router;
        }
        if self.threshold.is_some()
            || self.target_local_share.is_some()
            || self.max_quality_loss.is_some()
        {
            routing.threshold = self.threshold;
            routing.target_local_share = self.target_local_share;
            routing.max_quality_loss = self.max_quality_loss;
        }
        routing
    }

    /// The backends this arm routes over: the global ones, with `router` replacing the first
    /// local backend's router.
    pub fn backends(&self, base: &[BackendConfig]) -> Vec<BackendConfig> {
        let mut backends = base.to_vec();
        if let Some(router) = &self.router {
            if let Some(first) = backends.iter_mut().find(|b| b.role == Role::Local) {
                first.router = Some(router.clone());
            }
        }
        backends
    }
}

/// Shadow checks: locally served alias requests, sampled, are also answered by a cloud backend
/// off the client's path, and the local answer is graded against the cloud's.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShadowConfig {
    /// Share (0..1) of locally served alias requests checked; 0 turns shadow checks off.
    pub sample_rate: f64,
    /// The cloud backend answering shadow requests; unset means the first cloud backend.
    pub backend: Option<String>,
    /// A cloud backend judging local against cloud answers; unset means the similarity rule.
    pub judge: Option<String>,
    /// Dollars shadow checks (cloud answers plus judge) may spend in any rolling hour.
    pub budget_usd_per_hour: f64,
    /// Checks in flight at once; a sampled request beyond this is skipped (and counted).
    pub max_concurrent: usize,
    /// Similarity rule: answers agree when their token F1 is at least this (used when neither
    /// a chosen option letter nor a final number can be compared).
    pub similarity_threshold: f64,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        Self {
            sample_rate: 0.0,
            backend: None,
            judge: None,
            // A cap an operator notices on a bill but that cannot run away: at gpt-4.1's
            // $2/$8 per 1M tokens, about 300 checks of 500 input + 300 output tokens.
            budget_usd_per_hour: 1.0,
            // Shadow work is background work: a few in flight keep it off the serving path.
            max_concurrent: 4,
            // A heuristic with no published source: SQuAD-style token F1 of 0.5, half the
            // words shared. Tune per task, or configure a judge.
            similarity_threshold: 0.5,
        }
    }
}

impl Config {
    pub(super) fn validate_experiments(&self) -> Result<(), ConfigError> {
        let mut enrolling: Vec<(usize, ExperimentUnit, Option<String>)> = Vec::new();
        for (i, e) in self.experiments.iter().enumerate() {
            let key = |field: &str| format!("experiments[{i}].{field}");
            check_label(&key("name"), &e.name)?;
            if let Some(j) = self.experiments[..i].iter().position(|o| o.name == e.name) {
                return Err(invalid(
                    key("name"),
                    format!("\"{}\" is already used by experiments[{j}]", e.name),
                ));
            }
            match (&e.header, e.unit) {
                (Some(h), ExperimentUnit::Header) => {
                    if axum::http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                        return Err(invalid(
                            key("header"),
                            format!("\"{h}\" is not a valid header name"),
                        ));
                    }
                }
                (Some(_), unit) => {
                    return Err(invalid(
                        key("header"),
                        format!(
                            "applies only to unit = \"header\", not unit = \"{}\"",
                            unit.as_str()
                        ),
                    ))
                }
                (None, _) => {}
            }
            if e.arms.len() < 2 {
                return Err(invalid(
                    key("arms"),
                    "needs at least two arms ([[experiments.arms]] tables)",
                ));
            }
            let mut total = 0.0;
            for (a, arm) in e.arms.iter().enumerate() {
                let akey = |field: &str| format!("experiments[{i}].arms[{a}].{field}");
                check_label(&akey("name"), &arm.name)?;
                if let Some(b) = e.arms[..a].iter().position(|o| o.name == arm.name) {
                    return Err(invalid(
                        akey("name"),
                        format!("\"{}\" is already used by arms[{b}]", arm.name),
                    ));
                }
                check_non_negative(&akey("weight"), arm.weight)?;
                total += arm.weight;
                if let Some(t) = arm.guard_threshold {
                    if !(0.0..=1.0).contains(&t) {
                        return Err(invalid(
                            akey("guard_threshold"),
                            format!("must be between 0 and 1, got {t}"),
                        ));
                    }
                }
                let targets = [
                    ("threshold", arm.threshold),
                    ("target_local_share", arm.target_local_share),
                    ("max_quality_loss", arm.max_quality_loss),
                ];
                let set: Vec<&str> = targets
                    .iter()
                    .filter(|(_, v)| v.is_some())
                    .map(|(k, _)| *k)
                    .collect();
                if set.len() > 1 {
                    return Err(invalid(
                        akey(set[1]),
                        format!("cannot be set together with {}; choose one", set[0]),
                    ));
                }
                for (field, value) in targets {
                    if let Some(v) = value {
                        if !(0.0..=1.0).contains(&v) {
                            return Err(invalid(
                                akey(field),
                                format!("must be between 0 and 1, got {v}"),
                            ));
                        }
                    }
                }
                let routing = arm.routing(&self.routing);
                let learned = !set.is_empty() || arm.router.is_some();
                if learned && routing.policy != RoutingPolicy::Router {
                    return Err(invalid(
                        akey("policy"),
                        format!("is \"{}\", but router, threshold, target_local_share and max_quality_loss only apply to policy = \"router\"", routing.policy),
                    ));
                }
                if arm.router.is_some() && !self.backends.iter().any(|b| b.role == Role::Local) {
                    return Err(invalid(
                        akey("router"),
                        "needs a backend with role = \"local\"",
                    ));
                }
                let backends = arm.backends(&self.backends);
                if routing.policy == RoutingPolicy::Router {
                    if let Some(b) = backends
                        .iter()
                        .position(|b| b.role == Role::Local && b.router_name().is_none())
                    {
                        return Err(invalid(
                            akey("router"),
                            format!("is needed: the arm routes with policy = \"router\" and backends[{b}] has no router"),
                        ));
                    }
                }
                let has = |role: Role| backends.iter().any(|b| b.role == role);
                match routing.policy {
                    RoutingPolicy::CloudOnly if !has(Role::Cloud) => {
                        return Err(invalid(
                            akey("policy"),
                            "is \"cloud_only\" but no backend has role = \"cloud\"",
                        ))
                    }
                    RoutingPolicy::LocalOnly if !has(Role::Local) => {
                        return Err(invalid(
                            akey("policy"),
                            "is \"local_only\" but no backend has role = \"local\"",
                        ))
                    }
                    _ => {}
                }
            }
            if total <= 0.0 {
                return Err(invalid(key("arms"), "weights must add up to more than 0"));
            }
            if let Some(control) = &e.control {
                if !e.arms.iter().any(|a| &a.name == control) {
                    return Err(invalid(
                        key("control"),
                        format!("\"{control}\" is not one of the experiment's arms"),
                    ));
                }
            }
            if e.enabled {
                let header = e.unit_header();
                if let Some((j, _, _)) = enrolling
                    .iter()
                    .find(|(_, u, h)| *u == e.unit && *h == header)
                {
                    return Err(invalid(
                        key("unit"),
                        format!("is the same as enabled experiments[{j}]'s, which enrolls every such request first; this experiment would get no traffic (disable one, or use another unit)"),
                    ));
                }
                enrolling.push((i, e.unit, header));
            }
        }
        Ok(())
    }

    pub(super) fn validate_shadow(&self) -> Result<(), ConfigError> {
        let s = &self.shadow;
        if !(0.0..=1.0).contains(&s.sample_rate) {
            return Err(invalid(
                "shadow.sample_rate",
                format!("must be between 0 and 1, got {}", s.sample_rate),
            ));
        }
        check_non_negative("shadow.budget_usd_per_hour", s.budget_usd_per_hour)?;
        if !(0.0..=1.0).contains(&s.similarity_threshold) {
            return Err(invalid(
                "shadow.similarity_threshold",
                format!("must be between 0 and 1, got {}", s.similarity_threshold),
            ));
        }
        if s.max_concurrent == 0 {
            return Err(invalid("shadow.max_concurrent", "must be at least 1"));
        }
        for (key, name) in [("shadow.backend", &s.backend), ("shadow.judge", &s.judge)] {
            let Some(name) = name else { continue };
            match self.backends.iter().find(|b| &b.name == name) {
                Some(b) if b.role == Role::Cloud => {}
                Some(_) => {
                    return Err(invalid(
                        key,
                        format!(
                        "\"{name}\" is a local backend; shadow checks compare with a cloud backend"
                    ),
                    ))
                }
                None => {
                    return Err(invalid(
                        key,
                        format!("\"{name}\" is not a configured backend name"),
                    ))
                }
            }
        }
        if s.sample_rate > 0.0 {
            let Some(backend) = self.shadow_backend() else {
                return Err(invalid(
                    "shadow.sample_rate",
                    "is above 0 but no backend has role = \"cloud\" to compare with",
                ));
            };
            // The budget is in dollars: an unpriced backend would make it cap nothing.
            for name in std::iter::once(backend).chain(s.judge.as_deref()) {
                if let Some((i, b)) = self
                    .backends
                    .iter()
                    .enumerate()
                    .find(|(_, b)| b.name == name)
                {
                    if b.usd_per_million_input_tokens.is_none()
                        || b.usd_per_million_output_tokens.is_none()
                    {
                        return Err(invalid(
                            format!("backends[{i}].usd_per_million_input_tokens"),
                            format!("and usd_per_million_output_tokens are needed: \"{name}\" answers shadow checks, whose spend shadow.budget_usd_per_hour caps in dollars"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The cloud backend that answers shadow checks: `shadow.backend`, else the first cloud one.
    pub fn shadow_backend(&self) -> Option<&str> {
        self.shadow.backend.as_deref().or_else(|| {
            self.backends
                .iter()
                .find(|b| b.role == Role::Cloud)
                .map(|b| b.name.as_str())
        })
    }
}
