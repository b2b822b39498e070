//! `[[backends]]`: the upstream models, local and cloud, and their per-backend limits.

use std::path::PathBuf;

use serde::Deserialize;
use url::Url;

use super::{check_count, check_non_negative, check_seconds, default_true, invalid, ConfigError};

/// Where a backend runs, which decides how the router and the metering treat it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// On this machine or this site: cheap, private, smaller model.
    Local,
    /// A frontier API: capable, metered in dollars.
    Cloud,
}

impl Role {
    /// The label used in headers, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Local => "local",
            Role::Cloud => "cloud",
        }
    }
}

/// The protocol a backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Any OpenAI-compatible `/chat/completions` server: OpenAI, llama.cpp, Ollama, vLLM...
    Openai,
    /// A GGUF model run in-process with candle (no other server).
    Embedded,
    /// Anthropic's Messages API (`{base_url}/messages`, e.g. `https://api.anthropic.com/v1`):
    /// chat requests are translated to it and its answers back.
    Anthropic,
}

/// Which of OpenAI's APIs an `openai` upstream speaks besides chat completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendApi {
    /// Chat completions only.
    #[default]
    Chat,
    /// Chat completions and the Responses API.
    Responses,
}

/// One upstream model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// The id clients use to pin this backend (`model: "<name>"`), and its label in metrics.
    pub name: String,
    /// Protocol spoken by the upstream.
    pub kind: BackendKind,
    /// `local` or `cloud`.
    pub role: Role,
    /// Base URL including the version prefix, e.g. `https://api.openai.com/v1` or
    /// `https://api.anthropic.com/v1` (`openai`, `anthropic`).
    #[serde(default)]
    pub base_url: Option<Url>,
    /// The model name sent upstream (`openai`), or the catalog model to load (`embedded`).
    pub model: String,
    /// `embedded`: a GGUF file to load instead of the catalog model (which is pulled on start).
    #[serde(default)]
    pub gguf: Option<PathBuf>,
    /// `embedded`: generation worker threads, each running a batch of up to `max_batch`
    /// requests. One is right for a CPU: the matrix products already use every core.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// `embedded`: requests a worker runs together, one forward pass per step for all of them
    /// (continuous batching: a request joins at the next step).
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// `embedded`: prompt tokens a worker runs per step, shared by the prompts being prefilled,
    /// so a long prompt delays running streams by one chunk per step, not its whole prefill.
    #[serde(default = "default_prefill_chunk_tokens")]
    pub prefill_chunk_tokens: usize,
    /// `embedded`: megabytes of keys and values the running requests may hold together. A
    /// request reserves its prompt plus `max_tokens` before it starts; one that cannot waits in
    /// the queue and, past `queue_timeout_s`, goes to the cloud (`local_busy`).
    #[serde(default = "default_kv_cache_mb")]
    pub kv_cache_mb: usize,
    /// `embedded`: megabytes of computed prompts kept for reuse by later prompts that share
    /// their beginning (system prompts, conversation history); 0 turns reuse off.
    #[serde(default = "default_prefix_cache_mb")]
    pub prefix_cache_mb: usize,
    /// `embedded`: requests allowed to wait for a worker; beyond it they fall back (`local_busy`).
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
    /// `embedded`: seconds a request may wait for a worker before it falls back (`local_busy`).
    #[serde(default = "default_queue_timeout_s")]
    pub queue_timeout_s: f64,
    /// `embedded`: positions (prompt + output) a request may use; longer prompts go to the cloud
    /// (`context_too_long`). Also sizes the RoPE tables.
    #[serde(default = "default_max_context")]
    pub max_context: usize,
    /// `embedded`: default and ceiling of `max_tokens`.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// Environment variable holding the upstream API key; none means no Authorization header
    /// (`x-api-key` for `anthropic`).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// `anthropic`: the `anthropic-version` header; default `2023-06-01`.
    #[serde(default)]
    pub anthropic_version: Option<String>,
    /// `openai`: `"responses"` when the upstream also serves OpenAI's Responses API at
    /// `{base_url}/responses` (OpenAI itself, vLLM): `/v1/responses` requests the gateway cannot
    /// translate to chat (tools, reasoning, tool-call items) are then passed to it as they came.
    #[serde(default)]
    pub api: BackendApi,
    /// Total parameter count of the model (for compute metering).
    pub parameters: f64,
    /// Parameters active per token (mixture-of-experts); defaults to `parameters`.
    #[serde(default)]
    pub active_parameters: Option<f64>,
    /// Seconds to establish a TCP/TLS connection.
    #[serde(default = "default_connect_timeout_s")]
    pub connect_timeout_s: f64,
    /// Seconds until the response headers (non-streaming) or the first stream chunk arrive.
    #[serde(default = "default_first_byte_timeout_s")]
    pub first_byte_timeout_s: f64,
    /// Seconds for the whole upstream exchange, stream included.
    #[serde(default = "default_total_timeout_s")]
    pub total_timeout_s: f64,
    /// `openai`: the largest non-streaming answer read from the upstream, in bytes; a larger
    /// one is a 502 naming this cap (and a local one falls back), so a broken or hostile
    /// upstream cannot fill the gateway's memory.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
    /// Ask streaming upstreams for a usage chunk (`stream_options.include_usage`) even when the
    /// client did not, so every stream is metered; the extra chunk is removed before the client.
    #[serde(default = "default_true")]
    pub stream_usage: bool,
    /// Local backends under `policy = "router"`: the router predicting this model's success,
    /// a name under `routing.router_dir` or a directory. Unset on an embedded catalog model:
    /// that model's own shipped router (see [`BackendConfig::router_name`]).
    #[serde(default)]
    pub router: Option<String>,
    /// The backend accepts `tools` / `functions`; without it such requests skip this backend
    /// (reason `needs_tools`).
    #[serde(default)]
    pub supports_tools: bool,
    /// The backend honours `response_format` (JSON mode, schemas); without it such requests skip
    /// this backend (reason `needs_response_format`).
    #[serde(default)]
    pub supports_response_format: bool,
    /// The backend accepts image and audio content parts (reason `needs_images` otherwise).
    #[serde(default)]
    pub supports_images: bool,
    /// The backend returns `logprobs` to clients that ask. Unset: yes for `embedded`, no for
    /// `openai` (set it for llama.cpp's server and vLLM, which do); without it such requests
    /// skip this backend (reason `needs_logprobs`).
    #[serde(default)]
    pub supports_logprobs: Option<bool>,
    /// Local backends: where the quality guard reads an answer's confidence. `logprobs` (the
    /// default for local backends): the sampled tokens' log-probabilities, computed in-process
    /// or asked of an `openai` server (and removed from the reply when the client did not ask);
    /// `none`: never asked, so the guard serves this backend's answers as `no_signal`.
    #[serde(default)]
    pub confidence: Option<ConfidenceSource>,
    /// `embedded`: `chat` renders messages with the model's chat template (or Gemma's turn
    /// format); `plain` joins their texts without turn markup, for base models, which continue
    /// text (a prompt ending in `Answer:` is answered with the next words) rather than turns.
    #[serde(default)]
    pub prompt_format: PromptStyle,
    /// Cloud price, $ per million input tokens (the provider's published price).
    #[serde(default)]
    pub usd_per_million_input_tokens: Option<f64>,
    /// Cloud price, $ per million output tokens.
    #[serde(default)]
    pub usd_per_million_output_tokens: Option<f64>,
    /// Cloud energy per input token in J before PUE; unset means
    /// `metering.cloud_joules_per_input_token`.
    #[serde(default)]
    pub joules_per_input_token: Option<f64>,
    /// Cloud energy per output token in J before PUE; unset means
    /// `metering.cloud_joules_per_output_token`.
    #[serde(default)]
    pub joules_per_output_token: Option<f64>,
}

/// How an embedded model's prompt is rendered from messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptStyle {
    /// The chat template (instruction-tuned models).
    #[default]
    Chat,
    /// The texts joined, no turn markup (base models).
    Plain,
}

/// Where the quality guard reads a backend's confidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfidenceSource {
    /// Token log-probabilities.
    Logprobs,
    /// None: answers are unchecked (`no_signal`).
    None,
}

impl BackendConfig {
    /// Whether clients' `logprobs` requests can be served here.
    pub fn logprobs_supported(&self) -> bool {
        self.supports_logprobs
            .unwrap_or(self.kind == BackendKind::Embedded)
    }

    /// Whether the guard collects this backend's token log-probabilities.
    pub fn reads_logprobs(&self) -> bool {
        self.role == Role::Local
            && self.confidence.unwrap_or(ConfidenceSource::Logprobs) == ConfidenceSource::Logprobs
    }
}

fn default_connect_timeout_s() -> f64 {
    2.0
}
fn default_first_byte_timeout_s() -> f64 {
    60.0
}
fn default_total_timeout_s() -> f64 {
    600.0
}
fn default_max_response_bytes() -> u64 {
    // 64 MiB: 16 times a 128k-token answer with per-token logprobs (about 4 MB as JSON),
    // far from any real answer and still small next to the host's memory.
    64 * 1024 * 1024
}
fn default_workers() -> usize {
    1
}
fn default_max_batch() -> usize {
    // llama.cpp's server examples and our comparison run `--parallel 8`; past 8 a 2-core CPU
    // gains little aggregate throughput and each stream slows.
    8
}
fn default_prefill_chunk_tokens() -> usize {
    256
}
fn default_kv_cache_mb() -> usize {
    // Gemma 3 270M holds about 22 MB of f32 keys and values for a 1,024-position request:
    // 1 GiB serves dozens of such requests at once, and a 7-8B model (256 KB a position) four.
    1024
}
fn default_prefix_cache_mb() -> usize {
    256
}
fn default_queue_depth() -> usize {
    4
}
fn default_queue_timeout_s() -> f64 {
    10.0
}
fn default_max_context() -> usize {
    8192
}
fn default_max_tokens() -> usize {
    512
}

impl BackendConfig {
    /// The router predicting this backend's success: `router` when set, else, for an embedded
    /// model from the catalog (no `gguf` override), the router trained on that model's own
    /// profiled answers, so `policy = "router"` works on the embedded default out of the box.
    pub fn router_name(&self) -> Option<String> {
        self.router.clone().or_else(|| {
            if self.kind != BackendKind::Embedded || self.gguf.is_some() {
                return None;
            }
            crate::models::find(&self.model).ok().and_then(|m| m.router)
        })
    }
}

/// The shipped defaults: a llama.cpp server on port 8081 and OpenAI's API.
pub(super) fn default_backends() -> Vec<BackendConfig> {
    let parse = |s: &str| Url::parse(s).unwrap_or_else(|_| unreachable!("constant URL {s}"));
    vec![
        BackendConfig {
            name: "gemma-3-270m".to_owned(),
            kind: BackendKind::Embedded,
            role: Role::Local,
            base_url: None,
            model: "gemma-3-270m".to_owned(),
            api_key_env: None,
            anthropic_version: None,
            api: BackendApi::Chat,
            // Gemma 3 270M: 268M parameters (Google's Gemma 3 model card).
            parameters: 268e6,
            active_parameters: None,
            connect_timeout_s: default_connect_timeout_s(),
            first_byte_timeout_s: default_first_byte_timeout_s(),
            total_timeout_s: default_total_timeout_s(),
            max_response_bytes: default_max_response_bytes(),
            stream_usage: true,
            router: None,
            supports_tools: false,
            supports_response_format: false,
            supports_images: false,
            supports_logprobs: None,
            confidence: None,
            prompt_format: PromptStyle::Chat,
            usd_per_million_input_tokens: None,
            usd_per_million_output_tokens: None,
            joules_per_input_token: None,
            joules_per_output_token: None,
            gguf: None,
            workers: default_workers(),
            max_batch: default_max_batch(),
            prefill_chunk_tokens: default_prefill_chunk_tokens(),
            kv_cache_mb: default_kv_cache_mb(),
            prefix_cache_mb: default_prefix_cache_mb(),
            queue_depth: default_queue_depth(),
            queue_timeout_s: default_queue_timeout_s(),
            max_context: default_max_context(),
            max_tokens: default_max_tokens(),
        },
        BackendConfig {
            name: "gpt-4.1".to_owned(),
            kind: BackendKind::Openai,
            role: Role::Cloud,
            base_url: Some(parse("https://api.openai.com/v1")),
            model: "gpt-4.1".to_owned(),
            api_key_env: Some("OPENAI_API_KEY".to_owned()),
            anthropic_version: None,
            // OpenAI serves the Responses API as well as chat completions.
            api: BackendApi::Responses,
            // OpenAI publishes no parameter count. Assumption: the IPW paper's cloud reference,
            // Qwen3-235B-A22B (235B total, 22B active; arXiv 2511.07885). Set your own.
            parameters: 235e9,
            active_parameters: Some(22e9),
            connect_timeout_s: default_connect_timeout_s(),
            first_byte_timeout_s: default_first_byte_timeout_s(),
            total_timeout_s: default_total_timeout_s(),
            max_response_bytes: default_max_response_bytes(),
            stream_usage: true,
            router: None,
            supports_tools: false,
            supports_response_format: false,
            supports_images: false,
            supports_logprobs: None,
            confidence: None,
            prompt_format: PromptStyle::Chat,
            // OpenAI API pricing for gpt-4.1: $2.00 input, $8.00 output per 1M tokens
            // (openai.com/api/pricing, April 2025).
            usd_per_million_input_tokens: Some(2.0),
            usd_per_million_output_tokens: Some(8.0),
            joules_per_input_token: None,
            joules_per_output_token: None,
            gguf: None,
            workers: default_workers(),
            max_batch: default_max_batch(),
            prefill_chunk_tokens: default_prefill_chunk_tokens(),
            kv_cache_mb: default_kv_cache_mb(),
            prefix_cache_mb: default_prefix_cache_mb(),
            queue_depth: default_queue_depth(),
            queue_timeout_s: default_queue_timeout_s(),
            max_context: default_max_context(),
            max_tokens: default_max_tokens(),
        },
    ]
}

impl BackendConfig {
    /// Checks `backends[i]`, given the backends before it (names are unique) and the alias.
    pub(super) fn validate(
        &self,
        i: usize,
        before: &[BackendConfig],
        alias: &str,
    ) -> Result<(), ConfigError> {
        let b = self;
        let key = |field: &str| format!("backends[{i}].{field}");
        if b.name.trim().is_empty() || b.name.trim() != b.name {
            return Err(invalid(
                key("name"),
                "must be a non-empty name without surrounding spaces",
            ));
        }
        if !b.name.bytes().all(|c| c.is_ascii_graphic()) {
            return Err(invalid(
                key("name"),
                "may contain only visible ASCII characters (it is sent in headers)",
            ));
        }
        if b.name == alias {
            return Err(invalid(
                key("name"),
                format!(
                    "\"{}\" is the routing alias; a backend cannot share it",
                    b.name
                ),
            ));
        }
        if let Some(j) = before.iter().position(|o| o.name == b.name) {
            return Err(invalid(
                key("name"),
                format!("\"{}\" is already used by backends[{j}]", b.name),
            ));
        }
        if b.api == BackendApi::Responses && b.kind != BackendKind::Openai {
            return Err(invalid(
                key("api"),
                "\"responses\" applies to kind = \"openai\" only (an anthropic backend speaks Messages natively)",
            ));
        }
        match (b.kind, &b.base_url) {
            (BackendKind::Openai, None) => {
                return Err(invalid(
                    key("base_url"),
                    "is required for kind = \"openai\"",
                ))
            }
            (BackendKind::Anthropic, None) => {
                return Err(invalid(
                    key("base_url"),
                    "is required for kind = \"anthropic\" (Anthropic's own API: \"https://api.anthropic.com/v1\")",
                ))
            }
            (BackendKind::Openai | BackendKind::Anthropic, Some(url)) => {
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(invalid(
                        key("base_url"),
                        format!("must be http:// or https://, got \"{url}\""),
                    ));
                }
                if url.host().is_none() {
                    return Err(invalid(key("base_url"), "has no host"));
                }
            }
            (BackendKind::Embedded, Some(_)) => {
                return Err(invalid(
                    key("base_url"),
                    "does not apply to kind = \"embedded\" (the model runs in-process)",
                ))
            }
            (BackendKind::Embedded, None) => {
                if b.gguf.is_none() && crate::models::find(&b.model).is_err() {
                    return Err(invalid(
                    key("model"),
                    format!(
                        "\"{}\" is not a catalog model ({}); set `gguf` to a file path for other models",
                        b.model,
                        crate::models::catalog().iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                ));
                }
                for (field, v) in [
                    ("workers", b.workers),
                    ("max_batch", b.max_batch),
                    ("prefill_chunk_tokens", b.prefill_chunk_tokens),
                    ("kv_cache_mb", b.kv_cache_mb),
                    ("queue_depth", b.queue_depth),
                    ("max_context", b.max_context),
                    ("max_tokens", b.max_tokens),
                ] {
                    if v == 0 {
                        return Err(invalid(key(field), "must be at least 1"));
                    }
                }
                check_seconds(&key("queue_timeout_s"), b.queue_timeout_s, false)?;
            }
        }
        if b.model.trim().is_empty() {
            return Err(invalid(key("model"), "must not be empty"));
        }
        if let Some(env) = &b.api_key_env {
            if env.is_empty() || env.contains('=') || env.contains('\0') {
                return Err(invalid(
                    key("api_key_env"),
                    "must be an environment variable name",
                ));
            }
        }
        check_count(&key("parameters"), b.parameters)?;
        if let Some(active) = b.active_parameters {
            check_count(&key("active_parameters"), active)?;
            if active > b.parameters {
                return Err(invalid(
                    key("active_parameters"),
                    "cannot exceed `parameters`",
                ));
            }
        }
        for (field, v) in [
            (
                "usd_per_million_input_tokens",
                b.usd_per_million_input_tokens,
            ),
            (
                "usd_per_million_output_tokens",
                b.usd_per_million_output_tokens,
            ),
            ("joules_per_input_token", b.joules_per_input_token),
            ("joules_per_output_token", b.joules_per_output_token),
        ] {
            if let Some(v) = v {
                check_non_negative(&key(field), v)?;
            }
        }
        check_seconds(&key("connect_timeout_s"), b.connect_timeout_s, false)?;
        check_seconds(&key("first_byte_timeout_s"), b.first_byte_timeout_s, false)?;
        check_seconds(&key("total_timeout_s"), b.total_timeout_s, false)?;
        if b.max_response_bytes == 0 {
            return Err(invalid(key("max_response_bytes"), "must be greater than 0"));
        }
        if b.first_byte_timeout_s > b.total_timeout_s {
            return Err(invalid(
                key("first_byte_timeout_s"),
                "cannot exceed `total_timeout_s`",
            ));
        }
        Ok(())
    }
}
