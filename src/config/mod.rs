//! Typed configuration: one TOML file, every key defaulted, every problem named by its key.
//!
//! The shipped `config/wattgate.toml` documents each key with its default; a test checks that the
//! file and [`Config::default`] agree, so the documentation cannot drift from the code.
//! Secrets never live in the file: a backend names the environment variable that holds its key.
//!
//! Each `[section]` has its own module with its struct, its defaults (each with its source) and
//! its own validation; this file holds the whole, loading, and the rules that span sections.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod auth;
mod backends;
mod embeddings;
mod experiments;
mod guard;
mod ledger;
mod limits;
mod metering;
mod models;
mod resilience;
mod routing;
mod server;

pub use auth::{AuthConfig, ClientKeyConfig};
use backends::default_backends;
pub use backends::{BackendApi, BackendConfig, BackendKind, ConfidenceSource, PromptStyle, Role};
use embeddings::default_embeddings;
pub use embeddings::{EmbeddingsConfig, EmbeddingsKind};
pub use experiments::{ArmConfig, ExperimentConfig, ExperimentUnit, ShadowConfig};
pub use guard::{
    GuardConfig, GuardMode, GuardStream, DEFAULT_MAX_QUALITY_LOSS, DEFAULT_RULE_THRESHOLD,
};
pub use ledger::{LedgerConfig, WriterPriority};
pub use limits::LimitsConfig;
pub use metering::{EnergyMeterKind, MeteringConfig};
pub use models::ModelsConfig;
pub use resilience::ResilienceConfig;
pub use routing::{cloud_usable, RoutingConfig, RoutingPolicy};
pub use server::{LogFormat, ServerConfig};

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
    /// The models `POST /v1/embeddings` serves (`[[embeddings]]`).
    pub embeddings: Vec<EmbeddingsConfig>,
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

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            routing: RoutingConfig::default(),
            backends: default_backends(),
            embeddings: default_embeddings(),
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

    /// Checks every cross-field rule the types cannot express: each section's own rules in its
    /// module, then the rules that span sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.guard
            .validate()
            .map_err(|(key, problem)| invalid(key, problem))?;
        self.server.validate()?;
        self.models.validate()?;
        if self.backends.is_empty() {
            return Err(invalid(
                "backends",
                "must list at least one backend ([[backends]] table)",
            ));
        }
        self.routing.validate(&self.backends)?;
        for (i, b) in self.backends.iter().enumerate() {
            b.validate(i, &self.backends[..i], &self.routing.alias)?;
        }
        for (i, e) in self.embeddings.iter().enumerate() {
            e.validate(i, &self.embeddings[..i])?;
            if self.backends.iter().any(|b| b.name == e.name) || e.name == self.routing.alias {
                return Err(invalid(
                    format!("embeddings[{i}].name"),
                    format!(
                        "\"{}\" is already a chat backend or the routing alias",
                        e.name
                    ),
                ));
            }
        }
        self.validate_metering()?;
        self.ledger.validate()?;
        self.validate_experiments()?;
        self.validate_protection()?;
        self.validate_shadow()
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

/// serde's `default = "..."` for a `bool` that is on unless set.
fn default_true() -> bool {
    true
}

/// Converts validated seconds into a [`Duration`].
pub fn secs(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0))
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
