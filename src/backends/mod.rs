//! Backends: everything that can answer a chat request, behind one trait.
//!
//! The gateway never knows whether a model runs in-process or behind HTTP; it asks a [`Backend`]
//! for a [`Reply`] and gets either a whole completion or an opened stream. An opened stream has
//! already produced its first chunk, so a failure up to that point is still invisible to the
//! client and the gateway can retry elsewhere.

pub mod anthropic;
pub mod candle;
mod native;
pub mod openai;

use std::sync::Arc;

use axum::http::StatusCode;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::config::{BackendConfig, BackendKind, ModelsConfig, Role};
use crate::error::ApiError;
use crate::wire::native::NativeApi;
use crate::wire::{ChatRequest, Usage};

/// What every backend is, independent of how it runs.
#[derive(Debug, Clone)]
pub struct BackendInfo {
    /// Configured name: the pinning id and the metrics label.
    pub name: String,
    /// Local or cloud.
    pub role: Role,
    /// Model name the backend serves.
    pub model: String,
    /// Total parameters (compute metering).
    pub parameters: f64,
    /// Parameters active per token (compute metering of mixture-of-experts models).
    pub active_parameters: f64,
}

impl BackendInfo {
    /// The identity a configured backend presents.
    pub fn from_config(c: &BackendConfig) -> Self {
        Self {
            name: c.name.clone(),
            role: c.role,
            model: c.model.clone(),
            parameters: c.parameters,
            active_parameters: c.active_parameters.unwrap_or(c.parameters),
        }
    }
}

/// A whole (non-streaming) completion, as the upstream sent it.
#[derive(Debug)]
pub struct Completion {
    /// The OpenAI JSON response body, relayed unchanged.
    pub body: Bytes,
    /// Token usage, when the upstream reported it.
    pub usage: Option<Usage>,
    /// ln P of each generated token, when the backend computed them (the embedded model) or the
    /// upstream returned `logprobs`: what the quality guard reads. `None`: no signal.
    pub logprobs: Option<Vec<f32>>,
}

/// One streamed chunk (the JSON after `data: `).
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The chunk's JSON, unchanged.
    pub data: Bytes,
    /// Usage, when this chunk carries it.
    pub usage: Option<Usage>,
    /// True for the usage-only chunk (`choices: []`) that `include_usage` adds at the end.
    pub usage_only: bool,
    /// True when the chunk carries an `error` object instead of a delta.
    pub is_error: bool,
    /// ln P of the tokens this chunk adds, when known (see [`Completion::logprobs`]).
    pub logprobs: Option<Vec<f32>>,
}

impl Chunk {
    /// A content chunk with nothing known beside its JSON.
    pub fn new(data: Bytes) -> Self {
        Self {
            data,
            usage: None,
            usage_only: false,
            is_error: false,
            logprobs: None,
        }
    }
}

/// The remaining chunks of a stream; ends after the upstream's `[DONE]`.
pub type ChunkStream = BoxStream<'static, Result<Chunk, BackendError>>;

/// A stream whose first chunk has arrived.
pub struct OpenedStream {
    /// The first chunk.
    pub first: Chunk,
    /// Everything after it.
    pub rest: ChunkStream,
}

/// A backend's answer.
pub enum Reply {
    /// `stream: false`.
    Complete(Completion),
    /// `stream: true`.
    Stream(OpenedStream),
}

/// Which timeout fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutPhase {
    /// Opening the connection.
    Connect,
    /// Waiting for the response headers or the first stream chunk.
    FirstByte,
    /// The whole exchange.
    Total,
}

/// Why a backend could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// Connection refused or reset, DNS or TLS failure: the upstream was not reached or hung up.
    #[error("unreachable: {detail}")]
    Unreachable {
        /// What the transport said.
        detail: String,
    },
    /// A configured timeout fired.
    #[error("timed out ({phase:?}) after {seconds}s")]
    Timeout {
        /// Which one.
        phase: TimeoutPhase,
        /// Its configured length.
        seconds: f64,
    },
    /// The upstream answered with an error status.
    #[error("HTTP {status}: {message}")]
    Status {
        /// Upstream status.
        status: u16,
        /// Upstream's error message (or a summary of the body).
        message: String,
        /// Upstream's error type, when given.
        kind: Option<String>,
        /// Upstream's `Retry-After`, relayed on 429.
        retry_after: Option<String>,
    },
    /// The upstream answered something that is not OpenAI's protocol.
    #[error("protocol error: {detail}")]
    Protocol {
        /// What was wrong.
        detail: String,
    },
    /// The backend cannot be used as configured (e.g. its API key variable is unset).
    #[error("not configured: {detail}")]
    NotConfigured {
        /// What is missing.
        detail: String,
    },
    /// A local model's queue is full, or the request waited past the queue deadline.
    #[error("busy: {detail}")]
    Busy {
        /// Queue state.
        detail: String,
    },
    /// The prompt does not fit the local model's usable context.
    #[error("context too long: {detail}")]
    ContextTooLong {
        /// Sizes involved.
        detail: String,
    },
    /// The request asks for something this backend cannot do (images, n > 1, tools...).
    #[error("unsupported: {detail}")]
    Unsupported {
        /// What.
        detail: String,
    },
    /// The backend failed internally.
    #[error("internal error: {detail}")]
    Internal {
        /// What failed.
        detail: String,
    },
    /// The backend's circuit breaker is open: it failed too often recently, so no attempt was
    /// made.
    #[error("circuit open: failing recently; next attempt allowed in {retry_after_s}s")]
    CircuitOpen {
        /// Whole seconds until the breaker lets a probe through.
        retry_after_s: u64,
    },
}

impl BackendError {
    /// Short label for metrics and the fallback reason.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Unreachable { .. } => "unreachable",
            BackendError::Timeout { .. } => "timeout",
            BackendError::Status { .. } => "error_status",
            BackendError::Protocol { .. } => "protocol",
            BackendError::NotConfigured { .. } => "not_configured",
            BackendError::Busy { .. } => "busy",
            BackendError::ContextTooLong { .. } => "context_too_long",
            BackendError::Unsupported { .. } => "unsupported",
            BackendError::Internal { .. } => "internal",
            BackendError::CircuitOpen { .. } => "circuit_open",
        }
    }

    /// The client-facing error when this is the final failure of a request.
    ///
    /// Client mistakes the upstream rejected (400, 404, 409, 413, 422) and rate limits (429) keep
    /// their status so SDKs react as they would against the upstream; everything else is the
    /// gateway's upstream failing: 502, or 504 for timeouts.
    pub fn to_api_error(&self, backend: &str) -> ApiError {
        match self {
            BackendError::Unreachable { detail } => ApiError::bad_gateway(
                format!("Backend `{backend}` is unreachable: {detail}"),
                "upstream_unreachable",
            ),
            BackendError::Timeout { phase, seconds } => {
                let what = match phase {
                    TimeoutPhase::Connect => "connect",
                    TimeoutPhase::FirstByte => "first_byte",
                    TimeoutPhase::Total => "total",
                };
                ApiError::gateway_timeout(format!(
                    "Backend `{backend}` did not answer within its {what} timeout of {seconds}s ({what}_timeout_s)."
                ))
            }
            BackendError::Status {
                status,
                message,
                retry_after,
                ..
            } => {
                let relay = matches!(status, 400 | 404 | 409 | 413 | 422 | 429);
                match StatusCode::from_u16(*status) {
                    Ok(code) if relay => {
                        let kind = if *status == 429 {
                            "rate_limit_error"
                        } else {
                            "invalid_request_error"
                        };
                        let mut e = ApiError::relayed(
                            code,
                            kind,
                            format!(
                                "Backend `{backend}` rejected the request ({status}): {message}"
                            ),
                        )
                        .with_code(&format!("upstream_http_{status}"));
                        e.retry_after = retry_after.clone();
                        e
                    }
                    _ => {
                        let hint = if matches!(status, 401 | 403) {
                            " Check the backend's API key (api_key_env)."
                        } else {
                            ""
                        };
                        ApiError::bad_gateway(
                            format!(
                                "Backend `{backend}` failed with HTTP {status}: {message}{hint}"
                            ),
                            &format!("upstream_http_{status}"),
                        )
                    }
                }
            }
            BackendError::Protocol { detail } => ApiError::bad_gateway(
                format!("Backend `{backend}` sent an invalid response: {detail}"),
                "upstream_protocol_error",
            ),
            BackendError::NotConfigured { detail } => ApiError::unavailable(
                format!("Backend `{backend}` is not usable: {detail}"),
                "backend_not_configured",
            ),
            BackendError::Busy { detail } => {
                let mut e = ApiError::unavailable(
                    format!("Backend `{backend}` is busy: {detail}"),
                    "backend_busy",
                );
                e.retry_after = Some("1".to_owned());
                e
            }
            BackendError::ContextTooLong { detail } => ApiError::invalid_request(format!(
                "The request does not fit backend `{backend}`: {detail}"
            ))
            .with_param("messages")
            .with_code("context_length_exceeded"),
            BackendError::Unsupported { detail } => ApiError::invalid_request(format!(
                "Backend `{backend}` cannot serve this request: {detail}"
            ))
            .with_code("unsupported_by_backend"),
            BackendError::Internal { detail } => {
                ApiError::internal(format!("Backend `{backend}` failed: {detail}"))
            }
            BackendError::CircuitOpen { retry_after_s } => {
                let mut e = ApiError::unavailable(
                    format!("Backend `{backend}` is failing (its circuit breaker is open); no attempt was made. Retry in {retry_after_s}s."),
                    "backend_unhealthy",
                );
                e.retry_after = Some(retry_after_s.to_string());
                e
            }
        }
    }
}

/// Something that answers chat requests.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Identity and size of the model.
    fn info(&self) -> &BackendInfo;

    /// Answers one request. For `stream: true`, returns once the first chunk has arrived.
    async fn chat(&self, request: &ChatRequest) -> Result<Reply, BackendError>;

    /// Checks that the backend can serve now (for `/readyz`); `Err` says why not.
    async fn probe(&self) -> Result<(), String>;

    /// Whether requests of `api` that have no chat translation can be passed to this backend
    /// as they came ([`crate::wire::native`]).
    fn speaks(&self, _api: NativeApi) -> bool {
        false
    }

    /// Tokens `text` encodes to with this backend's own tokenizer, when the gateway has it (the
    /// embedded models do). Used to meter replies whose upstream reported no usage.
    fn count_tokens(&self, _text: &str) -> Option<u64> {
        None
    }

    /// Requests waiting for a worker, for backends with their own queue.
    fn queue_depth(&self) -> Option<usize> {
        None
    }

    /// The state of an in-process batching backend (the embedded models), for metrics.
    fn batch_stats(&self) -> Option<BatchStats> {
        None
    }
}

/// What an embedded backend's batches hold now, and how its prefix cache has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Sequences generating now, across the workers.
    pub sequences: usize,
    /// Forward steps run since start.
    pub steps: u64,
    /// Sequences those steps ran, summed (divided by `steps`: the mean batch size).
    pub sequence_steps: u64,
    /// Bytes of keys and values reserved by them (out of `kv_cache_mb`).
    pub kv_reserved_bytes: usize,
    /// Prompts that resumed from a cached prefix, since start.
    pub prefix_hits: u64,
    /// Prompts that found no cached prefix, since start.
    pub prefix_misses: u64,
    /// Prompt tokens taken from the prefix cache instead of computed, since start.
    pub prefix_reused_tokens: u64,
    /// Bytes the prefix cache holds now.
    pub prefix_bytes: usize,
}

/// Counts the tokens of `text` for metering when an upstream reported no usage: with the
/// serving backend's tokenizer, else another loaded model's, else OpenAI's rule of thumb of ~4
/// characters per token. Returns how it counted, so every figure says what it rests on.
pub fn count_tokens(
    backends: &[Arc<dyn Backend>],
    served: usize,
    text: &str,
) -> (u64, &'static str) {
    if let Some(n) = backends.get(served).and_then(|b| b.count_tokens(text)) {
        return (n, "tokenizer");
    }
    if let Some(n) = backends.iter().find_map(|b| b.count_tokens(text)) {
        return (n, "proxy_tokenizer");
    }
    let chars = text.chars().count() as u64;
    (chars.div_ceil(4), "chars_estimate")
}

/// The text of a caught panic's payload (a `&str` or `String` message), for the error that
/// replaces it.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Builds the configured backends, in config order. Embedded models are fetched (if missing)
/// and loaded here, so this can take seconds.
pub fn build_all(
    configs: &[BackendConfig],
    models: &ModelsConfig,
) -> anyhow::Result<Vec<Arc<dyn Backend>>> {
    configs
        .iter()
        .map(|c| -> anyhow::Result<Arc<dyn Backend>> {
            match c.kind {
                BackendKind::Openai | BackendKind::Anthropic => {
                    Ok(Arc::new(openai::OpenAiBackend::new(c)?))
                }
                BackendKind::Embedded => {
                    Ok(Arc::new(candle::backend::EmbeddedBackend::new(c, models)?))
                }
            }
        })
        .collect()
}
