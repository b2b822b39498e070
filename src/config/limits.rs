//! `[limits]`: what one request and one client may ask of the gateway.

use serde::Deserialize;

use super::{check_label, check_seconds, check_sha256, invalid, Config, ConfigError};

/// Per-request and per-client limits. Each one protects the gateway (and the cloud bill) from
/// a client that asks for too much, with an OpenAI-shaped 4xx naming the limit.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most messages one request may carry (400 beyond).
    pub max_messages: usize,
    /// Ceiling on `max_tokens` / `max_completion_tokens` (400 beyond); 0: no ceiling.
    pub max_output_tokens: u64,
    /// Chat requests served at once, streams included, across all clients; beyond it 429 with
    /// `Retry-After`. 0: no cap.
    pub max_concurrent_requests: usize,
    /// Chat requests per minute per client (API key name, else client IP); 0: no limit.
    pub requests_per_minute: u32,
    /// Tokens per minute per client: estimated prompt tokens plus the requested `max_tokens`,
    /// charged on arrival, the way OpenAI counts its limits. 0: no limit.
    pub tokens_per_minute: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            // OpenAI's own ceiling: its API rejects a `messages` array longer than 2048 with
            // "array too long ... maximum length 2048".
            max_messages: 2048,
            // gpt-4.1's largest completion, 32,768 tokens (OpenAI model documentation).
            max_output_tokens: 32_768,
            // scripts/soak.sh (docs/scaling.md): 6,000 req/s of 20-40 ms upstream answers is
            // ~250 in flight at 57 MiB RSS; 1,024 is 4x that, and bounds memory when a replica's
            // CPU saturates (the 10,000 req/s run hit it and refused the excess with 429s).
            max_concurrent_requests: 1024,
            requests_per_minute: 0,
            tokens_per_minute: 0,
        }
    }
}

impl Config {
    /// `[limits]` and `[auth]`: request and client limits, key digests.
    pub(super) fn validate_protection(&self) -> Result<(), ConfigError> {
        if self.limits.max_messages == 0 {
            return Err(invalid("limits.max_messages", "must be at least 1"));
        }
        for (i, k) in self.auth.keys.iter().enumerate() {
            check_label(&format!("auth.keys[{i}].name"), &k.name)?;
            check_sha256(&format!("auth.keys[{i}].sha256"), &k.sha256)?;
            if let Some(j) = self.auth.keys[..i].iter().position(|o| o.name == k.name) {
                return Err(invalid(
                    format!("auth.keys[{i}].name"),
                    format!("\"{}\" is already used by auth.keys[{j}]", k.name),
                ));
            }
            if let Some(j) = self.auth.keys[..i]
                .iter()
                .position(|o| o.sha256.eq_ignore_ascii_case(&k.sha256))
            {
                return Err(invalid(
                    format!("auth.keys[{i}].sha256"),
                    format!("is the same key as auth.keys[{j}]"),
                ));
            }
        }
        if let Some(admin) = &self.auth.admin_key_sha256 {
            check_sha256("auth.admin_key_sha256", admin)?;
        }
        let r = &self.resilience;
        check_seconds("resilience.initial_backoff_s", r.initial_backoff_s, true)?;
        check_seconds("resilience.max_backoff_s", r.max_backoff_s, true)?;
        check_seconds("resilience.retry_deadline_s", r.retry_deadline_s, true)?;
        check_seconds("resilience.breaker_window_s", r.breaker_window_s, false)?;
        check_seconds("resilience.breaker_open_s", r.breaker_open_s, false)?;
        if !(0.0..=1.0).contains(&r.breaker_error_ratio) {
            return Err(invalid(
                "resilience.breaker_error_ratio",
                format!("must be between 0 and 1, got {}", r.breaker_error_ratio),
            ));
        }
        if r.breaker_min_requests == 0 {
            return Err(invalid(
                "resilience.breaker_min_requests",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}
