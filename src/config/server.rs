//! `[server]`: the listener, the doors' deadlines and caps, shutdown and logging.

use std::net::SocketAddr;

use serde::Deserialize;

use super::{check_seconds, invalid, ConfigError};

/// Listener, limits, shutdown and logging settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on. Loopback by default; a public address without `[auth]` keys
    /// gets a loud warning at start, since anyone who reaches it spends the cloud keys.
    pub listen: SocketAddr,
    /// Largest accepted request body in bytes; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT before exiting.
    pub shutdown_grace_s: f64,
    /// `text` for people, `json` for log shippers.
    pub log_format: LogFormat,
    /// Seconds a `/readyz` probe result is reused, so probes do not hammer upstreams.
    pub readiness_cache_s: f64,
    /// Log prompt and answer text at debug level. Off: logs never contain message text.
    pub log_prompts: bool,
    /// Seconds a connection has for a request's headers, counted from when the server starts
    /// reading them; a partial head then gets 408 and the connection closes. It is also how
    /// long an idle keep-alive connection is kept (closed silently then).
    pub header_timeout_s: f64,
    /// Seconds a request has for its whole body, counted from when its headers arrived; past
    /// it, 408. A total deadline, not a per-read one: a client trickling a byte a second must
    /// not hold a connection for ever.
    pub body_timeout_s: f64,
    /// Open connections one client IP may hold; more are refused with 503 and counted in
    /// `wattgate_connections_refused_total{reason="per_ip"}`. 0: no cap.
    pub max_connections_per_ip: usize,
    /// Responses API conversations kept in memory for `previous_response_id` (oldest dropped
    /// first); 0 keeps none, so every `previous_response_id` is a 404. With
    /// `ledger.store_prompts` they are also kept in the ledger, across restarts.
    pub responses_stored: usize,
    /// Seconds a stored Responses conversation can be continued.
    pub responses_ttl_s: u64,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            // 8 MiB: room for long contexts and a few inline images, small enough to bound memory.
            max_body_bytes: 8 * 1024 * 1024,
            shutdown_grace_s: 30.0,
            log_format: LogFormat::Text,
            readiness_cache_s: 5.0,
            log_prompts: false,
            // nginx's client_header_timeout and client_body_timeout default to 60 s
            // (nginx.org/en/docs/http/ngx_http_core_module.html); an API whose clients write a
            // small JSON body at once can be stricter: 10 s for headers, 30 s for a body.
            header_timeout_s: 10.0,
            body_timeout_s: 30.0,
            // nginx's limit_conn has no default; 256 is four times the connections an HTTP
            // client pool opens by default (httpx: 100 max, reqwest/hyper: unbounded but idle
            // ones are reused), so one client's pool fits and a flood from one address does not.
            max_connections_per_ip: 256,
            // OpenAI keeps stored responses for 30 days (platform.openai.com/docs/api-reference/
            // responses/create, `store`); a gateway in memory keeps a day, and 10,000
            // conversations of a few KB each stay under ~100 MB.
            responses_stored: 10_000,
            responses_ttl_s: 86_400,
        }
    }
}

impl ServerConfig {
    /// Checks the `[server]` values.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        check_seconds("server.shutdown_grace_s", self.shutdown_grace_s, true)?;
        check_seconds("server.readiness_cache_s", self.readiness_cache_s, true)?;
        check_seconds("server.header_timeout_s", self.header_timeout_s, false)?;
        check_seconds("server.body_timeout_s", self.body_timeout_s, false)?;
        if self.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be greater than 0"));
        }
        Ok(())
    }
}
