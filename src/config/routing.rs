//! `[routing]`: how requests naming the alias choose a backend.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use super::{invalid, BackendConfig, ConfigError, Role, DEFAULT_MAX_QUALITY_LOSS};

/// How requests naming the routing alias choose a backend.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// The model name that means "let the gateway route".
    pub alias: String,
    /// The rule applied to alias requests.
    pub policy: RoutingPolicy,
    /// Prompts whose message text is longer than this many characters go to the cloud
    /// (reason `prompt_too_long`). 0 disables the check.
    pub max_local_prompt_chars: usize,
    /// Retry a failed local attempt on the cloud backend when nothing has reached the client yet.
    pub fallback_to_cloud: bool,
    /// `policy = "router"`: where router names (`backends[].router`) are looked up.
    pub router_dir: PathBuf,
    /// `policy = "router"`: serve locally when p_local >= this. At most one of `threshold`,
    /// `target_local_share` and `max_quality_loss`; none means 0.5.
    pub threshold: Option<f64>,
    /// `policy = "router"`: pick each local backend's threshold so this share (0..1) of
    /// traffic like its router's training prompts stays local (RouteLLM-style calibration on
    /// stored score quantiles).
    pub target_local_share: Option<f64>,
    /// `policy = "router"`: pick the lowest threshold whose validated quality loss against
    /// cloud-only stays within this (0..1 scale; 0.01 = one point).
    pub max_quality_loss: Option<f64>,
}

/// The configured routing rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingPolicy {
    /// The default: `router` when a cloud backend is usable (its key variable, if it names one,
    /// is set) and every local backend has a router; otherwise `prefer_local`. A new user
    /// without a cloud key gets local answers, and one with a key gets the product's job:
    /// routed by the router, with the threshold from the router's own validation curve.
    /// Resolved once, at start ([`RoutingConfig::resolved`]), and logged.
    Auto,
    /// Serve locally when a local backend exists and the prompt fits; otherwise the cloud.
    PreferLocal,
    /// Always the cloud backend (the cloud-only baseline).
    CloudOnly,
    /// Always the local backend; fails rather than spend cloud money (fallback still applies
    /// if `fallback_to_cloud` is set).
    LocalOnly,
    /// The learned router: each local backend's router scores the request; the first (cheapest)
    /// local backend whose p_local clears its threshold serves, else the cloud.
    Router,
}

impl RoutingConfig {
    /// This routing with `policy = "auto"` replaced by what it means for `backends` now,
    /// and, when it was `auto`, a sentence saying why (for the startup log and `config check`). `auto` becomes
    /// `router` when a cloud backend is usable and every local backend has a router; a router
    /// chosen this way with no threshold set takes the largest local share its validation curve
    /// keeps within [`crate::config::DEFAULT_MAX_QUALITY_LOSS`] of cloud-only (derived from the
    /// profile the router was trained on) rather than a fixed 0.5.
    pub fn resolved(&self, backends: &[BackendConfig]) -> (RoutingConfig, Option<&'static str>) {
        let mut routing = self.clone();
        if routing.policy != RoutingPolicy::Auto {
            return (routing, None);
        }
        let locals_routed = backends
            .iter()
            .filter(|b| b.role == Role::Local)
            .all(|b| b.router_name().is_some());
        let why = if !cloud_usable(backends) {
            routing.policy = RoutingPolicy::PreferLocal;
            "auto: no usable cloud backend (its api_key_env is unset), so local answers"
        } else if !locals_routed {
            routing.policy = RoutingPolicy::PreferLocal;
            "auto: a local backend has no router, so local first with cloud fallback"
        } else {
            routing.policy = RoutingPolicy::Router;
            if routing.threshold.is_none()
                && routing.target_local_share.is_none()
                && routing.max_quality_loss.is_none()
            {
                routing.max_quality_loss = Some(DEFAULT_MAX_QUALITY_LOSS);
            }
            "auto: a usable cloud backend and a router for every local backend"
        };
        (routing, Some(why))
    }
}

/// Whether some cloud backend can take traffic: configured, and its key variable set when it
/// names one. Without one, escalating or routing to the cloud would only fail.
pub fn cloud_usable(backends: &[BackendConfig]) -> bool {
    backends.iter().any(|b| {
        b.role == Role::Cloud
            && b.api_key_env
                .as_ref()
                .is_none_or(|v| std::env::var(v).is_ok_and(|k| !k.trim().is_empty()))
    })
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            alias: "auto".to_owned(),
            policy: RoutingPolicy::Auto,
            // ~8k tokens at ~4 characters per token: beyond that small local models degrade.
            max_local_prompt_chars: 32_000,
            fallback_to_cloud: true,
            router_dir: PathBuf::from("router-models"),
            threshold: None,
            target_local_share: None,
            max_quality_loss: None,
        }
    }
}

impl RoutingConfig {
    /// Checks `[routing]` against the configured backends.
    pub(super) fn validate(&self, backends: &[BackendConfig]) -> Result<(), ConfigError> {
        let alias = self.alias.trim();
        if alias.is_empty() || alias != self.alias {
            return Err(invalid(
                "routing.alias",
                "must be a non-empty name without surrounding spaces",
            ));
        }
        let has = |role: Role| backends.iter().any(|b| b.role == role);
        match self.policy {
            RoutingPolicy::CloudOnly if !has(Role::Cloud) => {
                return Err(invalid(
                    "routing.policy",
                    "is \"cloud_only\" but no backend has role = \"cloud\"",
                ))
            }
            RoutingPolicy::LocalOnly if !has(Role::Local) => {
                return Err(invalid(
                    "routing.policy",
                    "is \"local_only\" but no backend has role = \"local\"",
                ))
            }
            _ => {}
        }
        let r = self;
        let targets = [
            ("routing.threshold", r.threshold),
            ("routing.target_local_share", r.target_local_share),
            ("routing.max_quality_loss", r.max_quality_loss),
        ];
        let set: Vec<&str> = targets
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| *k)
            .collect();
        if set.len() > 1 {
            return Err(invalid(
                set[1],
                format!("cannot be set together with {}; choose one", set[0]),
            ));
        }
        for (key, value) in targets {
            if let Some(v) = value {
                if !(0.0..=1.0).contains(&v) {
                    return Err(invalid(key, format!("must be between 0 and 1, got {v}")));
                }
            }
        }
        if r.policy == RoutingPolicy::Router {
            if let Some(i) = backends
                .iter()
                .position(|b| b.role == Role::Local && b.router_name().is_none())
            {
                return Err(invalid(
                format!("backends[{i}].router"),
                "is required for local backends when routing.policy = \"router\" (a name under routing.router_dir, e.g. \"8b-class\")",
            ));
            }
        }
        Ok(())
    }
}

impl fmt::Display for RoutingPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RoutingPolicy::Auto => "auto",
            RoutingPolicy::PreferLocal => "prefer_local",
            RoutingPolicy::CloudOnly => "cloud_only",
            RoutingPolicy::LocalOnly => "local_only",
            RoutingPolicy::Router => "router",
        })
    }
}
