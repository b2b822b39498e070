//! `[[embeddings]]`: the models `POST /v1/embeddings` serves, in-process or passed through.

use serde::Deserialize;
use url::Url;

use super::{check_label, invalid, ConfigError};

/// How an embeddings model is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingsKind {
    /// A catalog encoder run in-process with candle (fetched on first use, or by
    /// `wattgate models pull`).
    Embedded,
    /// Any OpenAI-compatible `/embeddings` endpoint, the request passed through.
    Openai,
}

/// One embeddings model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingsConfig {
    /// The id clients send as `model`.
    pub name: String,
    /// `embedded` or `openai`.
    pub kind: EmbeddingsKind,
    /// The catalog encoder (`embedded`) or the upstream's model name (`openai`).
    pub model: String,
    /// `openai`: base URL including the version prefix, e.g. `https://api.openai.com/v1`.
    #[serde(default)]
    pub base_url: Option<Url>,
    /// `openai`: environment variable holding the upstream key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Total parameters, for compute metering (2 x parameters per token).
    pub parameters: f64,
    /// What the same tokens would cost at a cloud embeddings API, $ per million tokens: the
    /// counterfactual of every request served here.
    #[serde(default = "default_cloud_price")]
    pub cloud_usd_per_million_tokens: f64,
    /// `embedded`: inputs encoded at once (larger requests run in batches of this size).
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    /// `openai`: seconds for the whole exchange.
    #[serde(default = "default_timeout")]
    pub total_timeout_s: f64,
}

/// OpenAI's text-embedding-3-small, $0.02 per million tokens (openai.com/api/pricing, 2024-01):
/// the cheapest embeddings model of the best-known API, so the counterfactual is conservative.
fn default_cloud_price() -> f64 {
    0.02
}

/// 32 inputs at once: sentence-transformers' default `encode` batch size.
fn default_batch() -> usize {
    32
}

fn default_timeout() -> f64 {
    60.0
}

/// The default: all-MiniLM-L6-v2 in-process, loaded on the first request.
pub(super) fn default_embeddings() -> Vec<EmbeddingsConfig> {
    vec![EmbeddingsConfig {
        name: crate::models::DEFAULT_ENCODER.to_owned(),
        kind: EmbeddingsKind::Embedded,
        model: crate::models::DEFAULT_ENCODER.to_owned(),
        base_url: None,
        api_key_env: None,
        // 22.7M: all-MiniLM-L6-v2's parameter count (its model card on huggingface.co).
        parameters: 22.7e6,
        cloud_usd_per_million_tokens: default_cloud_price(),
        max_batch: default_batch(),
        total_timeout_s: default_timeout(),
    }]
}

impl EmbeddingsConfig {
    /// `tokens` at `cloud_usd_per_million_tokens`.
    pub fn cloud_price(&self, tokens: u64) -> f64 {
        tokens as f64 * self.cloud_usd_per_million_tokens / 1e6
    }

    /// Checks one `[[embeddings]]` entry; `before` are the entries above it.
    pub(super) fn validate(
        &self,
        i: usize,
        before: &[EmbeddingsConfig],
    ) -> Result<(), ConfigError> {
        let key = |k: &str| format!("embeddings[{i}].{k}");
        check_label(&key("name"), &self.name)?;
        if before.iter().any(|b| b.name == self.name) {
            return Err(invalid(
                key("name"),
                format!("\"{}\" is used twice", self.name),
            ));
        }
        match (self.kind, &self.base_url) {
            (EmbeddingsKind::Openai, None) => {
                return Err(invalid(
                    key("base_url"),
                    "is required for kind = \"openai\"",
                ))
            }
            (EmbeddingsKind::Embedded, Some(_)) => {
                return Err(invalid(
                    key("base_url"),
                    "does not apply to kind = \"embedded\" (the encoder runs in-process)",
                ))
            }
            (EmbeddingsKind::Embedded, None) => {
                if crate::models::find_encoder(&self.model).is_none() {
                    return Err(invalid(
                        key("model"),
                        format!(
                            "\"{}\" is not a catalog encoder (known: {})",
                            self.model,
                            crate::models::DEFAULT_ENCODER
                        ),
                    ));
                }
            }
            (EmbeddingsKind::Openai, Some(_)) => {}
        }
        if !(self.parameters.is_finite() && self.parameters > 0.0) {
            return Err(invalid(key("parameters"), "must be a positive number"));
        }
        if !(self.cloud_usd_per_million_tokens.is_finite()
            && self.cloud_usd_per_million_tokens >= 0.0)
        {
            return Err(invalid(
                key("cloud_usd_per_million_tokens"),
                "must be 0 or more",
            ));
        }
        if self.max_batch == 0 {
            return Err(invalid(key("max_batch"), "must be at least 1"));
        }
        if !(self.total_timeout_s.is_finite() && self.total_timeout_s > 0.0) {
            return Err(invalid(
                key("total_timeout_s"),
                "must be a positive number of seconds",
            ));
        }
        Ok(())
    }
}
