//! Who may call what: client API keys, the admin key, and the cap on requests served at once.
//!
//! Keys are configured as SHA-256 digests, so the config file (and a leaked copy of it) never
//! holds a usable key. A presented key is hashed and compared with every configured digest in
//! constant time, without stopping at a match, so response timing says nothing about which
//! bytes were right. Keys never appear in logs or errors.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::AppState;
use crate::config::{AuthConfig, LimitsConfig};
use crate::error::ApiError;
use crate::limits::Client;

/// The configured keys and the concurrency cap.
pub struct Access {
    keys: Vec<(String, [u8; 32])>,
    admin: Option<[u8; 32]>,
    concurrency: Option<(Arc<Semaphore>, usize)>,
}

/// Which key an endpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Liveness and readiness probes: orchestrators call them without credentials.
    Open,
    /// The OpenAI API (and unknown paths, so probing them reveals nothing): a client key.
    Client,
    /// Metrics, savings, experiments, dashboard, router reload, the graded-rows export: the
    /// admin key when one is set.
    Admin,
}

fn class_of(path: &str) -> Class {
    match path {
        "/healthz" | "/readyz" => Class::Open,
        "/metrics" | "/dashboard" | "/v1/savings" | "/v1/savings/series" | "/v1/experiments"
        | "/v1/router/reload" | "/v1/ledger/graded" => Class::Admin,
        p if p.starts_with("/v1/experiments/") => Class::Admin,
        _ => Class::Client,
    }
}

/// The SHA-256 of a key, as `[auth]` stores it.
pub fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Access {
    /// From validated config (digests are checked to be 64 hex digits when it loads).
    pub fn new(auth: &AuthConfig, limits: &LimitsConfig) -> Self {
        Self {
            keys: auth
                .keys
                .iter()
                .filter_map(|k| Some((k.name.clone(), parse_hex(&k.sha256)?)))
                .collect(),
            admin: auth.admin_key_sha256.as_deref().and_then(parse_hex),
            concurrency: (limits.max_concurrent_requests > 0).then(|| {
                (
                    Arc::new(Semaphore::new(limits.max_concurrent_requests)),
                    limits.max_concurrent_requests,
                )
            }),
        }
    }

    /// Whether client keys are required.
    pub fn requires_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The name of the client key `presented` hashes to. Compares with every configured key.
    fn client_key(&self, presented: &[u8; 32]) -> Option<&str> {
        let mut found = None;
        for (name, digest) in &self.keys {
            if bool::from(digest.ct_eq(presented)) {
                found = Some(name.as_str());
            }
        }
        found
    }

    /// A slot among `limits.max_concurrent_requests`, held until the response's last byte.
    pub fn slot(&self) -> Result<Option<OwnedSemaphorePermit>, ApiError> {
        match &self.concurrency {
            None => Ok(None),
            Some((semaphore, limit)) => semaphore
                .clone()
                .try_acquire_owned()
                .map(Some)
                .map_err(|_| ApiError::too_many_concurrent(*limit)),
        }
    }
}

/// The presented key: the bearer token of `Authorization: Bearer <key>`, else `x-api-key`
/// (how Anthropic's SDKs send theirs).
fn bearer(request: &Request) -> Option<&str> {
    let Some(value) = request.headers().get(AUTHORIZATION) else {
        return request
            .headers()
            .get("x-api-key")?
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|k| !k.is_empty());
    };
    let value = value.to_str().ok()?.trim();
    let (scheme, key) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|k| !k.is_empty())
}

/// Authenticates the request for its endpoint and records who it is charged to ([`Client`]).
pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let access = &state.inner.access;
    let class = class_of(request.uri().path());
    let presented = bearer(&request).map(key_digest);
    let refuse = |reason: &str, error: ApiError| {
        state
            .inner
            .metrics
            .rejected
            .with_label_values(&[reason])
            .inc();
        tracing::info!(
            path = request.uri().path(),
            status = error.status.as_u16(),
            "refused: {}",
            error.code.as_deref().unwrap_or("")
        );
        error.into_response()
    };
    let client_name = presented.as_ref().and_then(|d| access.client_key(d));
    let is_admin = match (&access.admin, &presented) {
        (Some(admin), Some(p)) => bool::from(admin.ct_eq(p)),
        _ => false,
    };
    let missing =
        "No API key provided. Send it as `Authorization: Bearer <key>` (or `x-api-key: <key>`).";
    let wrong = "Incorrect API key provided. Keys are configured in [auth] as SHA-256 digests.";
    match class {
        Class::Open => {}
        Class::Admin if access.admin.is_some() => {
            if !is_admin {
                return match (presented.is_some(), client_name.is_some()) {
                    (false, _) => refuse("unauthorized", ApiError::unauthorized(missing)),
                    (true, true) => refuse(
                        "forbidden",
                        ApiError::forbidden(
                            "This endpoint needs the admin key (auth.admin_key_sha256); a client key is not enough.",
                        ),
                    ),
                    (true, false) => refuse("unauthorized", ApiError::unauthorized(wrong)),
                };
            }
        }
        Class::Client | Class::Admin if access.requires_keys() => {
            if client_name.is_none() && !is_admin {
                let message = if presented.is_some() { wrong } else { missing };
                return refuse("unauthorized", ApiError::unauthorized(message));
            }
        }
        Class::Client | Class::Admin => {}
    }
    let client = match client_name {
        Some(name) => Client::Key(name.to_owned()),
        None if is_admin => Client::Key("admin".to_owned()),
        None => Client::Address(
            request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map_or([0, 0, 0, 0].into(), |c| c.0.ip()),
        ),
    };
    request.extensions_mut().insert(client);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientKeyConfig;

    #[test]
    fn keys_match_by_digest_only() {
        let hex = |k: &str| {
            key_digest(k)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let auth = AuthConfig {
            keys: vec![
                ClientKeyConfig {
                    name: "a".into(),
                    sha256: hex("key-a"),
                    requests_per_minute: None,
                    tokens_per_minute: None,
                },
                ClientKeyConfig {
                    name: "b".into(),
                    sha256: hex("key-b").to_uppercase(),
                    requests_per_minute: None,
                    tokens_per_minute: None,
                },
            ],
            admin_key_sha256: None,
        };
        let access = Access::new(&auth, &LimitsConfig::default());
        assert_eq!(access.client_key(&key_digest("key-a")), Some("a"));
        assert_eq!(access.client_key(&key_digest("key-b")), Some("b"));
        assert_eq!(access.client_key(&key_digest("key-c")), None);
        // The digest itself is not a key.
        assert_eq!(access.client_key(&key_digest(&hex("key-a"))), None);
        // sha256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn endpoints_are_classed() {
        assert_eq!(class_of("/healthz"), Class::Open);
        assert_eq!(class_of("/readyz"), Class::Open);
        assert_eq!(class_of("/metrics"), Class::Admin);
        assert_eq!(class_of("/v1/experiments/x"), Class::Admin);
        assert_eq!(class_of("/v1/savings/series"), Class::Admin);
        assert_eq!(class_of("/v1/chat/completions"), Class::Client);
        assert_eq!(class_of("/v1/feedback"), Class::Client);
        assert_eq!(class_of("/nope"), Class::Client);
    }

    #[test]
    fn the_concurrency_cap_hands_out_its_slots_then_refuses() {
        let limits = LimitsConfig {
            max_concurrent_requests: 2,
            ..LimitsConfig::default()
        };
        let access = Access::new(&AuthConfig::default(), &limits);
        let a = access.slot().expect("1");
        let _b = access.slot().expect("2");
        let refused = access.slot().expect_err("3");
        assert_eq!(refused.status.as_u16(), 429);
        assert_eq!(refused.retry_after.as_deref(), Some("1"));
        drop(a);
        assert!(access.slot().is_ok());
    }
}
