//! Routing: which backend serves a request, and why.
//!
//! Every decision carries a [`Reason`] whose code is sent to the client (`x-wattgate-reason`),
//! counted in Prometheus and, later, stored in the ledger, so a surprising route can always be
//! explained. This release routes by a configured rule; the learned router will produce the
//! same [`Decision`].

pub mod data;
pub mod evaluation;

use crate::config::{Role, RoutingConfig, RoutingPolicy};
use crate::wire::ChatRequest;

/// Why a request went where it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The client named a backend as `model`.
    Pinned,
    /// `prefer_local` and the prompt fits the local limit.
    PreferLocal,
    /// `policy = "cloud_only"`.
    CloudOnly,
    /// `policy = "local_only"`.
    LocalOnly,
    /// The prompt is longer than `routing.max_local_prompt_chars`.
    PromptTooLong,
    /// No local backend is configured.
    NoLocalBackend,
    /// The cloud was wanted but none is configured, so the local backend serves.
    NoCloudBackend,
    /// The local backend answered with an error; the cloud served.
    FallbackLocalError,
    /// The local backend timed out before its first byte; the cloud served.
    FallbackLocalTimeout,
    /// The local backend refused or dropped the connection; the cloud served.
    FallbackLocalUnreachable,
    /// The local backend is not usable as configured; the cloud served.
    FallbackLocalNotConfigured,
    /// The local model's queue was full (or its deadline passed); the cloud served.
    LocalBusy,
    /// The prompt does not fit the local model's context; the cloud served.
    ContextTooLong,
    /// The request needs something the local model cannot do; the cloud served.
    LocalUnsupported,
}

impl Reason {
    /// The stable code used in headers and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Pinned => "pinned",
            Reason::PreferLocal => "prefer_local",
            Reason::CloudOnly => "cloud_only",
            Reason::LocalOnly => "local_only",
            Reason::PromptTooLong => "prompt_too_long",
            Reason::NoLocalBackend => "no_local_backend",
            Reason::NoCloudBackend => "no_cloud_backend",
            Reason::FallbackLocalError => "fallback_local_error",
            Reason::FallbackLocalTimeout => "fallback_local_timeout",
            Reason::FallbackLocalUnreachable => "fallback_local_unreachable",
            Reason::FallbackLocalNotConfigured => "fallback_local_not_configured",
            Reason::LocalBusy => "local_busy",
            Reason::ContextTooLong => "context_too_long",
            Reason::LocalUnsupported => "local_unsupported",
        }
    }
}

/// A routing decision: the index of the backend (in config order) and the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Index into the configured backends.
    pub backend: usize,
    /// Why.
    pub reason: Reason,
}

/// The configured rule.
#[derive(Debug, Clone)]
pub struct RuleRouter {
    policy: RoutingPolicy,
    max_local_prompt_chars: usize,
    first_local: Option<usize>,
    first_cloud: Option<usize>,
}

impl RuleRouter {
    /// `roles` are the configured backends' roles, in config order (at least one).
    pub fn new(config: &RoutingConfig, roles: &[Role]) -> Self {
        Self {
            policy: config.policy,
            max_local_prompt_chars: config.max_local_prompt_chars,
            first_local: roles.iter().position(|r| *r == Role::Local),
            first_cloud: roles.iter().position(|r| *r == Role::Cloud),
        }
    }

    /// The first cloud backend, the fallback target.
    pub fn cloud(&self) -> Option<usize> {
        self.first_cloud
    }

    /// Decides for a request that named the routing alias.
    pub fn decide(&self, request: &ChatRequest) -> Decision {
        let too_long =
            self.max_local_prompt_chars > 0 && request.prompt_chars > self.max_local_prompt_chars;
        let (local, cloud) = (self.first_local, self.first_cloud);
        let pick = |backend: usize, reason: Reason| Decision { backend, reason };
        match (self.policy, local, cloud) {
            (RoutingPolicy::CloudOnly, _, Some(c)) => pick(c, Reason::CloudOnly),
            (RoutingPolicy::LocalOnly, Some(l), _) => pick(l, Reason::LocalOnly),
            (RoutingPolicy::PreferLocal, Some(_), Some(c)) if too_long => {
                pick(c, Reason::PromptTooLong)
            }
            (RoutingPolicy::PreferLocal, Some(l), None) if too_long => {
                pick(l, Reason::NoCloudBackend)
            }
            (RoutingPolicy::PreferLocal, Some(l), _) => pick(l, Reason::PreferLocal),
            (_, None, Some(c)) => pick(c, Reason::NoLocalBackend),
            (_, Some(l), None) => pick(l, Reason::NoCloudBackend),
            // Config validation guarantees at least one backend.
            (_, None, None) => pick(0, Reason::NoLocalBackend),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(chars: usize) -> ChatRequest {
        let body = serde_json::json!({"model": "auto", "messages": [{"role": "user", "content": "x".repeat(chars)}]});
        ChatRequest::parse(body.to_string().as_bytes()).unwrap()
    }

    fn router(policy: RoutingPolicy, roles: &[Role]) -> RuleRouter {
        let config = RoutingConfig {
            policy,
            max_local_prompt_chars: 10,
            ..RoutingConfig::default()
        };
        RuleRouter::new(&config, roles)
    }

    #[test]
    fn decisions_follow_the_policy() {
        use Role::*;
        use RoutingPolicy::*;
        let both = [Cloud, Local];
        let cases = [
            (PreferLocal, &both[..], 5, 1, Reason::PreferLocal),
            (PreferLocal, &both[..], 11, 0, Reason::PromptTooLong),
            (CloudOnly, &both[..], 5, 0, Reason::CloudOnly),
            (LocalOnly, &both[..], 50, 1, Reason::LocalOnly),
            (PreferLocal, &[Cloud][..], 5, 0, Reason::NoLocalBackend),
            (PreferLocal, &[Local][..], 50, 0, Reason::NoCloudBackend),
            (CloudOnly, &[Local][..], 5, 0, Reason::NoCloudBackend),
            (LocalOnly, &[Cloud][..], 5, 0, Reason::NoLocalBackend),
        ];
        for (policy, roles, chars, backend, reason) in cases {
            let d = router(policy, roles).decide(&request(chars));
            assert_eq!(
                d,
                Decision { backend, reason },
                "{policy} {roles:?} {chars}"
            );
        }
    }
}
