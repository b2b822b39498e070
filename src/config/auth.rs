//! `[auth]`: client API keys and the admin key, stored as SHA-256 digests.

use serde::Deserialize;

/// Client authentication. With no keys the gateway is open, which is only safe on loopback.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accepted client keys, as SHA-256 hashes (`wattgate keys new` makes one). Empty: no
    /// client authentication.
    pub keys: Vec<ClientKeyConfig>,
    /// SHA-256 (hex) of the key that admin endpoints (`/metrics`, `/v1/savings`, experiments,
    /// the dashboard) require. Unset: admin endpoints take any client key (or none, without keys).
    pub admin_key_sha256: Option<String>,
}

/// One accepted client key.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientKeyConfig {
    /// Who holds the key: the rate-limit bucket and the `client` in logs (never the key).
    pub name: String,
    /// SHA-256 of the key, 64 hex digits.
    pub sha256: String,
    /// This key's own `limits.requests_per_minute`.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// This key's own `limits.tokens_per_minute`.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
}
