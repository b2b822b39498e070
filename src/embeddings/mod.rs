//! `POST /v1/embeddings`: vectors from an encoder run in-process (all-MiniLM-L6-v2 by default,
//! fetched and loaded on the first request) or from an OpenAI-compatible upstream, metered like
//! chat: the joules the encoder was charged, and what the same tokens cost at a cloud price.
//!
//! Embeddings are not routed: a vector space is a property of its model, so a client's vectors
//! are only comparable when one model made all of them. The client names the model; the
//! gateway never swaps it.

pub mod encoder;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::{OnceCell, Semaphore};

use crate::backends::{BackendError, TimeoutPhase};
use crate::config::{Config, EmbeddingsConfig, EmbeddingsKind};
use crate::error::ApiError;
use crate::ledger::{now_us, LedgerRow, LedgerSender};
use crate::metering::{Bill, Metering};
use crate::metrics::Metrics;
use crate::models::pull::PipOptions;
use crate::models::{find_encoder, pull_encoder, EncoderSpec};
use encoder::Encoder;

/// OpenAI's limit on inputs per embeddings request (its API reference, `input`).
pub const MAX_INPUTS: usize = 2048;

/// The configured embeddings models.
pub struct Embeddings {
    models: Vec<Model>,
    metering: Arc<Metering>,
    metrics: Arc<Metrics>,
    ledger: Option<LedgerSender>,
}

/// What the HTTP layer knows about an embeddings request besides its body.
pub struct Call<'a> {
    /// The request id (the ledger row's).
    pub id: &'a str,
    /// When it arrived.
    pub started: Instant,
    /// Charges its estimated tokens to the client's rate limits, shared with chat (a 429
    /// refuses it before any work).
    pub admit: &'a (dyn Fn(u64) -> Result<(), ApiError> + Sync),
}

struct Model {
    config: EmbeddingsConfig,
    serve: Serve,
}

enum Serve {
    Embedded {
        spec: Box<EncoderSpec>,
        cache_dir: Option<PathBuf>,
        pip: PipOptions,
        encoder: OnceCell<Arc<Encoder>>,
        /// One encoding at a time: candle already spreads one batch over every core.
        busy: Arc<Semaphore>,
    },
    Upstream {
        client: reqwest::Client,
        url: String,
        key: Result<Option<String>, String>,
    },
}

/// One input, as the client sent it.
enum Input {
    Text(String),
    Ids(Vec<u64>),
}

/// What an embeddings request produced.
pub struct Served {
    /// The OpenAI-shaped body.
    pub body: Bytes,
    /// The model's configured name.
    pub model: String,
    /// Joules charged (in-process only) and what kind of figure it is.
    pub joules: Option<(f64, &'static str)>,
    /// Input tokens, as the encoder or the upstream counted them.
    pub tokens: u64,
    /// What it cost, and what a cloud embeddings API would have.
    pub bill: Bill,
}

impl Embeddings {
    /// The models of `[[embeddings]]`; nothing is fetched or loaded until a request needs it.
    pub fn new(
        config: &Config,
        metering: Arc<Metering>,
        metrics: Arc<Metrics>,
        ledger: Option<LedgerSender>,
    ) -> anyhow::Result<Self> {
        let mut models = Vec::with_capacity(config.embeddings.len());
        for c in &config.embeddings {
            let serve = match c.kind {
                EmbeddingsKind::Embedded => Serve::Embedded {
                    spec: Box::new(find_encoder(&c.model).ok_or_else(|| {
                        anyhow::anyhow!("embeddings `{}`: unknown encoder {}", c.name, c.model)
                    })?),
                    cache_dir: config.models.cache_dir.clone(),
                    pip: PipOptions::from_config(&config.models),
                    encoder: OnceCell::new(),
                    busy: Arc::new(Semaphore::new(1)),
                },
                EmbeddingsKind::Openai => {
                    let base = c
                        .base_url
                        .as_ref()
                        .map(|u| u.as_str().trim_end_matches('/').to_owned())
                        .ok_or_else(|| {
                            anyhow::anyhow!("embeddings `{}` has no base_url", c.name)
                        })?;
                    let key = crate::backends::openai::api_key(&c.name, c.api_key_env.as_deref());
                    Serve::Upstream {
                        client: reqwest::Client::builder()
                            .timeout(Duration::from_secs_f64(c.total_timeout_s))
                            .build()?,
                        url: format!("{base}/embeddings"),
                        key,
                    }
                }
            };
            models.push(Model {
                config: c.clone(),
                serve,
            });
        }
        Ok(Self {
            models,
            metering,
            metrics,
            ledger,
        })
    }

    /// The configured model names, for `/v1/models`.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.models.iter().map(|m| m.config.name.as_str())
    }

    /// Serves one embeddings request body: admitted by the client's rate limits, then recorded
    /// in the ledger (route `local` for the embedded encoder, `cloud` for an upstream; reason
    /// `embeddings`), whether it was served or failed.
    pub async fn embed(&self, body: &[u8], call: Call<'_>) -> Result<Served, ApiError> {
        let request = crate::wire::edge::object(body)?;
        let model_name = request
            .get("model")
            .and_then(Value::as_str)
            .ok_or_else(|| crate::wire::edge::required("model", "is required"))?;
        let Some(model) = self.models.iter().find(|m| m.config.name == model_name) else {
            let names: Vec<&str> = self.names().collect();
            let mut e = ApiError::model_not_found(model_name, &names);
            e.message = format!(
                "{} (Embeddings models are configured in [[embeddings]]; chat models cannot embed.)",
                e.message
            );
            return Err(e);
        };
        let name = model.config.name.clone();
        (call.admit)(estimated_tokens(&request))?;
        let result = match &model.serve {
            Serve::Embedded {
                spec,
                cache_dir,
                pip,
                encoder,
                busy,
            } => {
                let encoder = encoder
                    .get_or_try_init(|| load((**spec).clone(), cache_dir.clone(), pip.clone()))
                    .await?
                    .clone();
                self.embedded(model, encoder, busy.clone(), &request).await
            }
            Serve::Upstream { client, url, key } => {
                self.upstream(model, client, url, key, request).await
            }
        };
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .embeddings_requests
            .with_label_values(&[name.as_str(), outcome])
            .inc();
        self.record(model, &call, &result);
        result
    }

    /// The request's ledger row.
    fn record(&self, model: &Model, call: &Call<'_>, result: &Result<Served, ApiError>) {
        let Some(ledger) = &self.ledger else {
            return;
        };
        let embedded = matches!(model.serve, Serve::Embedded { .. });
        let (status, tokens, bill) = match result {
            Ok(s) => (200, s.tokens, s.bill),
            Err(e) => (e.status.as_u16(), 0, Bill::default()),
        };
        let latency = call.started.elapsed();
        ledger.record(LedgerRow {
            time_us: now_us().saturating_sub(latency.as_micros() as u64),
            request_id: call.id.to_owned(),
            route: if embedded { "local" } else { "cloud" }.to_owned(),
            backend: model.config.name.clone(),
            reason: "embeddings".to_owned(),
            experiment: None,
            arm: None,
            p_local: None,
            fallback_from: None,
            status,
            outcome: if result.is_ok() { "ok" } else { "error" }.to_owned(),
            stream: false,
            input_tokens: tokens,
            output_tokens: 0,
            tokens_source: if embedded { "tokenizer" } else { "upstream" }.to_owned(),
            latency_s: latency.as_secs_f64(),
            ttft_s: None,
            energy_source: self.metering.source().as_str().to_owned(),
            bill,
            guard: None,
            prompt: None,
        });
    }

    async fn embedded(
        &self,
        model: &Model,
        encoder: Arc<Encoder>,
        busy: Arc<Semaphore>,
        request: &serde_json::Map<String, Value>,
    ) -> Result<Served, ApiError> {
        let base64 = encoding_format(request)?;
        if let Some(d) = request.get("dimensions").filter(|d| !d.is_null()) {
            if d.as_u64() != Some(encoder.dimensions() as u64) {
                return Err(ApiError::invalid_request(format!(
                    "`dimensions`: {} makes {}-dimensional vectors and cannot shorten them; omit `dimensions` or send {}.",
                    model.config.name,
                    encoder.dimensions(),
                    encoder.dimensions()
                ))
                .with_param("dimensions")
                .with_code("unsupported_dimensions"));
            }
        }
        let inputs = inputs(request)?;
        let mut tokenized = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            tokenized.push(match input {
                Input::Text(t) => encoder.tokenize(t).map_err(ApiError::internal)?,
                Input::Ids(ids) => encoder.wrap_ids(ids).map_err(|bad| {
                    ApiError::invalid_request(format!(
                        "`input[{i}]` holds token id {bad}, outside {}'s vocabulary of {} word pieces.",
                        model.config.name,
                        encoder.vocab()
                    ))
                    .with_param("input")
                    .with_code("invalid_value")
                })?,
            });
        }
        let tokens: u64 = tokenized.iter().map(|t| t.len() as u64).sum();
        let _permit = busy
            .acquire_owned()
            .await
            .map_err(|_| ApiError::internal("the encoder's queue closed"))?;
        let ticket = self.metering.begin();
        let batch = model.config.max_batch;
        let run =
            tokio::task::spawn_blocking(move || embed_sorted(&encoder, tokenized, batch)).await;
        let bill = self.metering.end_embedding(
            ticket,
            2.0 * model.config.parameters * tokens as f64,
            model.config.cloud_price(tokens),
        );
        let vectors = match run {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(ApiError::internal(format!("Embedding failed: {e}."))),
            Err(e) => return Err(ApiError::internal(format!("The encoder task failed: {e}."))),
        };
        let name = model.config.name.as_str();
        let source = self.metering.source();
        self.metrics
            .embeddings_tokens
            .with_label_values(&[name])
            .inc_by(tokens);
        self.metrics
            .embeddings_energy
            .with_label_values(&[name, source.as_str()])
            .inc_by(bill.local_joules);
        self.metrics
            .embeddings_counterfactual_cost
            .with_label_values(&[name])
            .inc_by(model.config.cloud_price(tokens));
        // Serialized straight from the f32s (each printed as its shortest f32 decimal), not
        // through a JSON tree of f64s.
        let data: Vec<Embedding<'_>> = vectors
            .iter()
            .enumerate()
            .map(|(index, v)| Embedding {
                object: "embedding",
                index,
                embedding: if base64 {
                    Vector::Base64(base64_f32(v))
                } else {
                    Vector::Float(v)
                },
            })
            .collect();
        let body = List {
            object: "list",
            data,
            model: name,
            usage: EmbeddingsUsage {
                prompt_tokens: tokens,
                total_tokens: tokens,
            },
        };
        Ok(Served {
            body: Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
            model: name.to_owned(),
            joules: Some((
                bill.local_joules,
                if source.is_measured() {
                    "measured"
                } else {
                    "estimated"
                },
            )),
            tokens,
            bill,
        })
    }

    async fn upstream(
        &self,
        model: &Model,
        client: &reqwest::Client,
        url: &str,
        key: &Result<Option<String>, String>,
        mut request: serde_json::Map<String, Value>,
    ) -> Result<Served, ApiError> {
        let name = model.config.name.as_str();
        let key = key.as_ref().map_err(|why| {
            ApiError::unavailable(
                format!("Embeddings model `{name}` is not usable: {why}."),
                "backend_not_configured",
            )
        })?;
        request.insert("model".into(), json!(model.config.model));
        let mut builder = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(&request).unwrap_or_default());
        if let Some(key) = key {
            builder = builder.bearer_auth(key);
        }
        // Failures read like a chat backend's: the same statuses relayed, the same codes.
        let failed = |e: BackendError| e.to_api_error(name);
        let response = builder.send().await.map_err(|e| {
            failed(if e.is_timeout() {
                BackendError::Timeout {
                    phase: TimeoutPhase::Total,
                    seconds: model.config.total_timeout_s,
                }
            } else {
                BackendError::Unreachable {
                    detail: format!("{url}: {e}"),
                }
            })
        })?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.bytes().await.map_err(|e| {
            failed(BackendError::Unreachable {
                detail: format!("{url} broke off: {e}"),
            })
        })?;
        if !(200..300).contains(&status) {
            let message = crate::wire::upstream_error_message(&body)
                .and_then(|e| e.message)
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(300).collect());
            return Err(failed(BackendError::Status {
                status,
                message,
                kind: None,
                retry_after,
            }));
        }
        let tokens = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.pointer("/usage/prompt_tokens").and_then(Value::as_u64))
            .unwrap_or(0);
        self.metrics
            .embeddings_tokens
            .with_label_values(&[name])
            .inc_by(tokens);
        // Its price is the upstream's own spend, and the counterfactual's too.
        let usd = model.config.cloud_price(tokens);
        Ok(Served {
            body,
            model: name.to_owned(),
            joules: None,
            tokens,
            bill: Bill {
                cloud_usd: usd,
                counterfactual: Some(crate::metering::Counterfactual {
                    usd,
                    ..Default::default()
                }),
                ..Bill::default()
            },
        })
    }
}

/// Tokens an embeddings request is charged on arrival, before any is encoded: its text at ~4
/// characters a token (as chat's prompts are) plus its token ids.
fn estimated_tokens(request: &serde_json::Map<String, Value>) -> u64 {
    fn of(v: &Value) -> u64 {
        match v {
            Value::String(s) => (s.len() as u64).div_ceil(4),
            Value::Number(_) => 1,
            Value::Array(items) => items.iter().map(of).sum(),
            _ => 0,
        }
    }
    request.get("input").map_or(0, of)
}

/// Word pieces one encoder batch holds, padding included (the longest input times the batch
/// size). Measured on this 2-core VM (`examples/encoder_batch.rs`, equal lengths): batching
/// 32 inputs of 16 pieces runs 3.2x the texts/s of one at a time, of 64 pieces 1.7x, of 256
/// pieces 0.8x; 512 pieces per batch keeps the gains and avoids the loss.
const BATCH_TOKENS: usize = 512;

/// Embeds `inputs` longest first, in batches of similar length (as sentence-transformers sorts
/// them) of at most `batch` inputs and [`BATCH_TOKENS`] padded pieces, so that little is
/// padding; vectors come back in input order.
fn embed_sorted(
    encoder: &Encoder,
    inputs: Vec<Vec<u32>>,
    batch: usize,
) -> Result<Vec<Vec<f32>>, String> {
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(inputs[i].len()));
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); inputs.len()];
    let mut start = 0;
    while start < order.len() {
        // Sorted longest first: the batch's first input sets its padded length.
        let longest = inputs[order[start]].len().max(1);
        let size = (BATCH_TOKENS / longest).clamp(1, batch.max(1));
        let chunk = &order[start..(start + size).min(order.len())];
        let group: Vec<Vec<u32>> = chunk.iter().map(|&i| inputs[i].clone()).collect();
        for (&i, v) in chunk.iter().zip(encoder.embed(&group)?) {
            out[i] = v;
        }
        start += chunk.len();
    }
    Ok(out)
}

/// An embeddings answer in OpenAI's shape.
#[derive(serde::Serialize)]
struct List<'a> {
    object: &'static str,
    data: Vec<Embedding<'a>>,
    model: &'a str,
    usage: EmbeddingsUsage,
}

#[derive(serde::Serialize)]
struct Embedding<'a> {
    object: &'static str,
    index: usize,
    embedding: Vector<'a>,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum Vector<'a> {
    Float(&'a [f32]),
    Base64(String),
}

#[derive(serde::Serialize)]
struct EmbeddingsUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

/// Fetches (when missing) and loads an encoder, off the async runtime.
async fn load(
    spec: EncoderSpec,
    cache_dir: Option<PathBuf>,
    pip: PipOptions,
) -> Result<Arc<Encoder>, ApiError> {
    let name = spec.name;
    let loaded = tokio::task::spawn_blocking(move || {
        let cache = crate::models::ModelCache::new(cache_dir.as_deref())
            .map_err(|e| format!("the model cache: {e}"))?;
        tracing::info!(
            encoder = spec.name,
            "fetching and verifying the encoder in {}",
            cache.dir().display()
        );
        let dir = pull_encoder(&spec, cache.dir(), &pip).map_err(|e| e.to_string())?;
        let started = std::time::Instant::now();
        let encoder = Encoder::load(&dir, &spec)?;
        tracing::info!(
            encoder = spec.name,
            seconds = started.elapsed().as_secs_f64(),
            "encoder loaded"
        );
        Ok::<_, String>(Arc::new(encoder))
    })
    .await;
    match loaded {
        Ok(Ok(e)) => Ok(e),
        Ok(Err(why)) => {
            tracing::error!(encoder = name, "encoder could not be loaded: {why}");
            Err(ApiError::unavailable(
                format!(
                    "The encoder {name} could not be loaded (the next request tries again): {why}"
                ),
                "model_unavailable",
            ))
        }
        Err(e) => Err(ApiError::internal(format!(
            "The encoder load task failed: {e}."
        ))),
    }
}

/// `encoding_format`: true for base64.
fn encoding_format(request: &serde_json::Map<String, Value>) -> Result<bool, ApiError> {
    match request.get("encoding_format") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::String(f)) if f == "float" => Ok(false),
        Some(Value::String(f)) if f == "base64" => Ok(true),
        Some(_) => Err(ApiError::invalid_request(
            "`encoding_format` must be \"float\" or \"base64\".",
        )
        .with_param("encoding_format")
        .with_code("invalid_value")),
    }
}

/// `input`: a string, an array of strings, an array of token ids, or an array of those.
fn inputs(request: &serde_json::Map<String, Value>) -> Result<Vec<Input>, ApiError> {
    let bad = |what: &str| {
        ApiError::invalid_request(format!(
            "`input` {what}; it must be a string, an array of strings, an array of token ids, or an array of token-id arrays."
        ))
        .with_param("input")
        .with_code("invalid_value")
    };
    let ids = |v: &Vec<Value>| -> Option<Vec<u64>> { v.iter().map(Value::as_u64).collect() };
    let list = match request.get("input") {
        None | Some(Value::Null) => {
            return Err(crate::wire::edge::required("input", "is required"))
        }
        Some(Value::String(s)) => return Ok(vec![Input::Text(s.clone())]),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(bad("has the wrong type")),
    };
    if list.is_empty() {
        return Err(bad("is empty"));
    }
    if list.len() > MAX_INPUTS {
        return Err(bad(&format!(
            "has {} items, more than the {MAX_INPUTS} one request may hold",
            list.len()
        )));
    }
    if list.iter().all(Value::is_number) {
        return ids(list)
            .map(|ids| vec![Input::Ids(ids)])
            .ok_or_else(|| bad("holds a number that is not a token id (a non-negative integer)"));
    }
    list.iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(Input::Text(s.clone())),
            Value::Array(a) if !a.is_empty() => ids(a)
                .map(Input::Ids)
                .ok_or_else(|| bad(&format!("item {i} holds something other than token ids"))),
            _ => Err(bad(&format!(
                "item {i} is neither a string nor a token-id array"
            ))),
        })
        .collect()
}

/// Little-endian f32 bytes in standard base64, as OpenAI's `encoding_format: "base64"`.
fn base64_f32(v: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (k, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if k <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        // 1.0f32 = 00 00 80 3f
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, -2.0]), "AACAPwAAAMA=");
    }

    fn input_of(v: Value) -> Result<Vec<Input>, ApiError> {
        inputs(json!({ "input": v }).as_object().unwrap())
    }

    #[test]
    fn every_input_form_reads_and_wrong_ones_name_input() {
        assert_eq!(input_of(json!("a")).unwrap().len(), 1);
        assert_eq!(input_of(json!(["a", "b"])).unwrap().len(), 2);
        assert!(
            matches!(&input_of(json!([1, 2, 3])).unwrap()[..], [Input::Ids(ids)] if ids == &[1, 2, 3])
        );
        assert_eq!(input_of(json!([[1, 2], [3]])).unwrap().len(), 2);
        for bad in [
            json!([]),
            json!([1.5]),
            json!([-1]),
            json!([{}]),
            json!(3),
            json!([[]]),
        ] {
            let e = input_of(bad.clone())
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            assert_eq!(e.param.as_deref(), Some("input"), "{bad}");
        }
    }
}
