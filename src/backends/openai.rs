//! A backend that speaks the OpenAI chat-completions protocol over HTTP: OpenAI itself and the
//! local servers that imitate it (llama.cpp's `llama-server`, Ollama, vLLM, LM Studio...); and,
//! with the same transport, timeouts and caps, Anthropic's Messages API (`kind = "anthropic"`,
//! translated by [`super::anthropic`]). A request with no chat translation is passed to the API
//! it came in when this backend speaks it ([`crate::wire::native`]).

use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::{EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use serde::Deserialize;
use tokio::time::{timeout, timeout_at, Instant};

use super::anthropic;
use super::native::NativeReader;
use super::{
    Backend, BackendError, BackendInfo, Chunk, Completion, OpenedStream, Reply, TimeoutPhase,
};
use crate::config::{secs, BackendApi, BackendConfig, BackendKind};
use crate::wire::native::{self, NativeApi};
use crate::wire::{read_answer, upstream_error_message, AnswerPeek, ChatRequest, ChunkPeek, Usage};

/// How long a readiness probe may take before the backend counts as not ready.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// An OpenAI-compatible HTTP upstream.
pub struct OpenAiBackend {
    info: BackendInfo,
    client: reqwest::Client,
    chat_url: String,
    models_url: String,
    /// `Err` holds the reason the key is missing; requests then fail with `NotConfigured`.
    api_key: Result<Option<String>, String>,
    connect_timeout_s: f64,
    first_byte_timeout_s: f64,
    total_timeout_s: f64,
    max_response_bytes: u64,
    stream_usage: bool,
    /// Ask for `logprobs` when the guard will check the answer (`confidence = "logprobs"`).
    reads_logprobs: bool,
    protocol: Protocol,
    /// `api = "responses"`: where Responses requests are passed through natively.
    responses_url: Option<String>,
}

/// The wire protocol behind the shared HTTP exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Protocol {
    /// OpenAI chat completions: `POST {base}/chat/completions`, `Authorization: Bearer`.
    OpenAi,
    /// Anthropic Messages: `POST {base}/messages`, `x-api-key`, `anthropic-version`.
    Anthropic {
        /// The `anthropic-version` header.
        version: String,
    },
}

impl OpenAiBackend {
    /// Builds the HTTP client and reads the API key from the environment.
    pub fn new(c: &BackendConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(secs(c.connect_timeout_s))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .user_agent(concat!("wattgate/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let api_key = api_key(&c.name, c.api_key_env.as_deref());
        let base = c
            .base_url
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("backend `{}` has no base_url", c.name))?
            .as_str()
            .trim_end_matches('/');
        let protocol = match c.kind {
            BackendKind::Anthropic => Protocol::Anthropic {
                version: c
                    .anthropic_version
                    .clone()
                    .unwrap_or_else(|| anthropic::DEFAULT_VERSION.to_owned()),
            },
            _ => Protocol::OpenAi,
        };
        let path = match protocol {
            Protocol::OpenAi => "chat/completions",
            Protocol::Anthropic { .. } => "messages",
        };
        Ok(Self {
            info: BackendInfo::from_config(c),
            client,
            chat_url: format!("{base}/{path}"),
            models_url: format!("{base}/models"),
            api_key,
            connect_timeout_s: c.connect_timeout_s,
            first_byte_timeout_s: c.first_byte_timeout_s,
            total_timeout_s: c.total_timeout_s,
            max_response_bytes: c.max_response_bytes,
            stream_usage: c.stream_usage,
            reads_logprobs: c.reads_logprobs() && protocol == Protocol::OpenAi,
            responses_url: (c.api == BackendApi::Responses).then(|| format!("{base}/responses")),
            protocol,
        })
    }

    /// The key and version headers of this backend's protocol.
    fn authorize(
        &self,
        mut builder: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, BackendError> {
        let key = self.key()?;
        match &self.protocol {
            Protocol::OpenAi => {
                if let Some(key) = key {
                    builder = builder.bearer_auth(key);
                }
            }
            Protocol::Anthropic { version } => {
                builder = builder.header("anthropic-version", version.as_str());
                if let Some(key) = key {
                    builder = builder.header("x-api-key", key);
                }
            }
        }
        Ok(builder)
    }

    fn key(&self) -> Result<Option<&str>, BackendError> {
        match &self.api_key {
            Ok(key) => Ok(key.as_deref()),
            Err(detail) => Err(BackendError::NotConfigured {
                detail: detail.clone(),
            }),
        }
    }

    fn timeout(&self, phase: TimeoutPhase) -> BackendError {
        let seconds = match phase {
            TimeoutPhase::Connect => self.connect_timeout_s,
            TimeoutPhase::FirstByte => self.first_byte_timeout_s,
            TimeoutPhase::Total => self.total_timeout_s,
        };
        BackendError::Timeout { phase, seconds }
    }

    fn transport_error(&self, url: &str, e: &reqwest::Error) -> BackendError {
        // No reqwest-level total timeout is set, so a reqwest timeout is the connect timeout.
        if e.is_timeout() {
            return self.timeout(TimeoutPhase::Connect);
        }
        let what = if e.is_connect() {
            "could not connect"
        } else {
            "connection failed"
        };
        BackendError::Unreachable {
            detail: format!("{what} to {url}: {}", error_chain(e)),
        }
    }
}

#[async_trait::async_trait]
impl Backend for OpenAiBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    async fn chat(&self, request: &ChatRequest) -> Result<Reply, BackendError> {
        let started = Instant::now();
        let first_byte_deadline = started + secs(self.first_byte_timeout_s);
        let deadline = started + secs(self.total_timeout_s);
        // Asked for on the guard's behalf: read, then removed before the client sees them.
        let reads = self.reads_logprobs && request.wants_signals();
        let forced_logprobs = reads && !request.client_logprobs();

        // A request with no chat translation goes as it came, to the API it came in.
        let native = request.native().filter(|n| self.speaks(n.api));
        let (url, body) = match (native, &self.protocol) {
            (Some(n), _) => (self.native_url(n.api), n.upstream_body(&self.info.model)),
            (None, Protocol::OpenAi) => (
                self.chat_url.as_str(),
                request.upstream_body(&self.info.model, self.stream_usage, forced_logprobs),
            ),
            (None, Protocol::Anthropic { .. }) => (
                self.chat_url.as_str(),
                anthropic::request_body(request, &self.info.model)?,
            ),
        };
        let builder = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        let builder = self.authorize(builder)?;
        let response = match timeout_at(first_byte_deadline, builder.send()).await {
            Err(_) => return Err(self.timeout(TimeoutPhase::FirstByte)),
            Ok(Err(e)) => return Err(self.transport_error(url, &e)),
            Ok(Ok(r)) => r,
        };

        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            // The error body is best effort (and its first 64 KiB are plenty for a message):
            // the status alone is the failure.
            let body = match timeout_at(deadline, read_capped(response, 64 * 1024)).await {
                Ok(Ok(b)) => b,
                _ => Bytes::new(),
            };
            return Err(status_error(status.as_u16(), &body, retry_after));
        }

        if !request.stream {
            let body =
                match timeout_at(deadline, read_capped(response, self.max_response_bytes)).await {
                    Err(_) => return Err(self.timeout(TimeoutPhase::Total)),
                    Ok(Err(Capped::Transport(e))) => return Err(self.transport_error(url, &e)),
                    Ok(Err(Capped::Over)) => {
                        return Err(BackendError::Protocol {
                            detail: format!(
                        "the answer is larger than this backend's max_response_bytes = {} bytes",
                        self.max_response_bytes
                    ),
                        })
                    }
                    Ok(Ok(b)) => b,
                };
            if let Some(n) = native {
                let usage = native::whole_usage(n.api, &body)
                    .map_err(|detail| BackendError::Protocol { detail })?;
                return Ok(Reply::Complete(Completion {
                    body,
                    usage,
                    logprobs: None,
                }));
            }
            let body = match self.protocol {
                Protocol::OpenAi => body,
                Protocol::Anthropic { .. } => anthropic::completion(&body)?,
            };
            let usage = completion_usage(&body)?;
            let (peek, stripped) = if reads {
                read_answer(&body, forced_logprobs)
            } else {
                (AnswerPeek::default(), None)
            };
            let logprobs = peek.logprobs;
            let body = stripped.map_or(body, Bytes::from);
            return Ok(Reply::Complete(Completion {
                body,
                usage,
                logprobs,
            }));
        }

        let mut events = Box::pin(line_capped(response.bytes_stream()).eventsource());
        let mut reader = match (native, &self.protocol) {
            (Some(n), _) => Reader::Native(NativeReader::new(n.api)),
            (None, Protocol::Anthropic { .. }) => Reader::Messages(Default::default()),
            (None, Protocol::OpenAi) => Reader::Chat,
        };
        let first = match timeout_at(
            first_byte_deadline,
            read_next(&mut events, &mut reader, reads, forced_logprobs),
        )
        .await
        {
            Err(_) => return Err(self.timeout(TimeoutPhase::FirstByte)),
            Ok(Err(e)) => return Err(self.stream_error(e)),
            Ok(Ok(Next::Chunk(c))) => c,
            Ok(Ok(Next::Done | Next::Eof)) => {
                return Err(BackendError::Protocol {
                    detail: "the stream ended before its first chunk".to_owned(),
                })
            }
        };
        if first.is_error {
            let message = upstream_error_message(&first.data)
                .and_then(|e| e.message)
                .unwrap_or_else(|| String::from_utf8_lossy(&first.data).into_owned());
            return Err(BackendError::Protocol {
                detail: format!("the stream opened with an error: {message}"),
            });
        }

        let rest = RestOfStream {
            events,
            deadline,
            total_timeout_s: self.total_timeout_s,
            chat_url: self.chat_url.clone(),
            finished: false,
            read_logprobs: reads,
            strip_logprobs: forced_logprobs,
            reader,
        };
        Ok(Reply::Stream(OpenedStream {
            first,
            rest: Box::pin(futures::stream::unfold(rest, RestOfStream::step)),
        }))
    }

    fn speaks(&self, api: NativeApi) -> bool {
        match api {
            NativeApi::Responses => self.responses_url.is_some(),
            NativeApi::Messages => matches!(self.protocol, Protocol::Anthropic { .. }),
        }
    }

    async fn probe(&self) -> Result<(), String> {
        let builder = self
            .authorize(self.client.get(&self.models_url))
            .map_err(|e| e.to_string())?;
        match timeout(PROBE_TIMEOUT, builder.send()).await {
            Err(_) => Err(format!(
                "GET {} did not answer within {}s",
                self.models_url,
                PROBE_TIMEOUT.as_secs()
            )),
            Ok(Err(e)) => Err(self.transport_error(&self.models_url, &e).to_string()),
            Ok(Ok(r)) if r.status().is_success() => Ok(()),
            Ok(Ok(r)) => Err(format!(
                "GET {} answered HTTP {}",
                self.models_url,
                r.status()
            )),
        }
    }
}

impl OpenAiBackend {
    fn stream_error(&self, e: StreamFailure) -> BackendError {
        e.into_backend_error(&self.chat_url)
    }

    /// Where this backend takes requests of `api` natively.
    fn native_url(&self, api: NativeApi) -> &str {
        match api {
            NativeApi::Responses => self.responses_url.as_deref().unwrap_or(&self.chat_url),
            NativeApi::Messages => &self.chat_url,
        }
    }
}

/// The state of a stream after its first chunk.
struct RestOfStream {
    events: std::pin::Pin<Box<dyn EventSource>>,
    deadline: Instant,
    total_timeout_s: f64,
    chat_url: String,
    finished: bool,
    read_logprobs: bool,
    strip_logprobs: bool,
    reader: Reader,
}

impl RestOfStream {
    async fn step(mut self) -> Option<(Result<Chunk, BackendError>, Self)> {
        if self.finished {
            return None;
        }
        let item = match timeout_at(
            self.deadline,
            read_next(
                &mut self.events,
                &mut self.reader,
                self.read_logprobs,
                self.strip_logprobs,
            ),
        )
        .await
        {
            Ok(Ok(Next::Chunk(c))) => return Some((Ok(c), self)),
            Ok(Ok(Next::Done)) => return None,
            Ok(Ok(Next::Eof)) => Err(BackendError::Protocol {
                detail: "the stream ended without `data: [DONE]` (truncated)".to_owned(),
            }),
            Ok(Err(e)) => Err(e.into_backend_error(&self.chat_url)),
            Err(_) => Err(BackendError::Timeout {
                phase: TimeoutPhase::Total,
                seconds: self.total_timeout_s,
            }),
        };
        self.finished = true;
        Some((item, self))
    }
}

/// An SSE event stream over the upstream body.
trait EventSource:
    Stream<Item = Result<eventsource_stream::Event, EventStreamError<BodyError>>> + Send
{
}
impl<T> EventSource for T where
    T: Stream<Item = Result<eventsource_stream::Event, EventStreamError<BodyError>>> + Send
{
}

/// Longest SSE line read from an upstream, in bytes. An OpenAI chunk is one token's delta, a
/// few hundred bytes, or a few KB with `top_logprobs`; 1 MiB is far past any real one. The SSE
/// parser buffers a line until its end, so without a cap one endless line fills memory.
pub const MAX_SSE_LINE_BYTES: usize = 1024 * 1024;

/// Why an upstream body could not be read on.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("{}", error_chain(.0))]
    Transport(reqwest::Error),
    #[error("an SSE line is longer than {MAX_SSE_LINE_BYTES} bytes")]
    LineTooLong,
}

/// The body's bytes, failing once a line runs past [`MAX_SSE_LINE_BYTES`] (then ending).
fn line_capped<S, E>(body: S) -> impl Stream<Item = Result<Bytes, BodyError>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: Into<BodyError>,
{
    // (body, bytes since the last line end, failed)
    futures::stream::unfold(
        (Box::pin(body), 0usize, false),
        |(mut body, mut line, failed)| async move {
            if failed {
                return None;
            }
            match body.next().await? {
                Err(e) => Some((Err(e.into()), (body, line, true))),
                Ok(chunk) => {
                    match chunk.iter().rposition(|&b| b == b'\n' || b == b'\r') {
                        Some(end) => line = chunk.len() - end - 1,
                        None => line = line.saturating_add(chunk.len()),
                    }
                    if line > MAX_SSE_LINE_BYTES {
                        Some((Err(BodyError::LineTooLong), (body, line, true)))
                    } else {
                        Some((Ok(chunk), (body, line, false)))
                    }
                }
            }
        },
    )
}

impl From<reqwest::Error> for BodyError {
    fn from(e: reqwest::Error) -> Self {
        BodyError::Transport(e)
    }
}

/// Why a non-streaming body was not read whole.
enum Capped {
    Transport(reqwest::Error),
    /// Past the cap (by its `Content-Length`, or as it arrived).
    Over,
}

/// Reads a whole body of at most `cap` bytes, refusing early when `Content-Length` says it is
/// larger and never holding more than `cap` bytes otherwise.
async fn read_capped(mut response: reqwest::Response, cap: u64) -> Result<Bytes, Capped> {
    if response.content_length().is_some_and(|n| n > cap) {
        return Err(Capped::Over);
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(Capped::Transport)? {
        if (body.len() + chunk.len()) as u64 > cap {
            return Err(Capped::Over);
        }
        if body.is_empty() && response.content_length() == Some(chunk.len() as u64) {
            // The usual case: the whole body in one chunk, kept without a copy.
            return Ok(chunk);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

enum Next {
    Chunk(Chunk),
    /// `data: [DONE]`.
    Done,
    /// The body ended.
    Eof,
}

enum StreamFailure {
    Transport(reqwest::Error),
    Protocol(String),
}

impl From<BodyError> for StreamFailure {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::Transport(e) => StreamFailure::Transport(e),
            BodyError::LineTooLong => StreamFailure::Protocol(BodyError::LineTooLong.to_string()),
        }
    }
}

impl StreamFailure {
    fn into_backend_error(self, url: &str) -> BackendError {
        match self {
            StreamFailure::Transport(e) => BackendError::Unreachable {
                detail: format!("stream from {url} broke: {}", error_chain(&e)),
            },
            StreamFailure::Protocol(detail) => BackendError::Protocol { detail },
        }
    }
}

/// The next SSE event of an upstream body; `None` at its end.
async fn next_event<S>(
    events: &mut std::pin::Pin<Box<S>>,
) -> Result<Option<eventsource_stream::Event>, StreamFailure>
where
    S: EventSource + ?Sized,
{
    match events.next().await {
        None => Ok(None),
        Some(Err(EventStreamError::Transport(e))) => Err(e.into()),
        Some(Err(e)) => Err(StreamFailure::Protocol(format!("invalid SSE: {e}"))),
        Some(Ok(event)) => Ok(Some(event)),
    }
}

/// How an upstream's events become chunks.
enum Reader {
    /// Chat chunks, read by [`next_chunk`].
    Chat,
    /// A Messages stream translated into chat chunks (`kind = "anthropic"`).
    Messages(anthropic::StreamReader),
    /// A native stream, relayed as it came ([`crate::wire::native`]).
    Native(NativeReader),
}

/// The next chunk, read by the stream's [`Reader`].
async fn read_next<S>(
    events: &mut std::pin::Pin<Box<S>>,
    reader: &mut Reader,
    read_logprobs: bool,
    strip_logprobs: bool,
) -> Result<Next, StreamFailure>
where
    S: EventSource + ?Sized,
{
    match reader {
        Reader::Chat => next_chunk(events, read_logprobs, strip_logprobs).await,
        Reader::Messages(reader) => loop {
            if let Some(chunk) = reader.pop() {
                return Ok(Next::Chunk(chunk));
            }
            if reader.finished() {
                return Ok(Next::Done);
            }
            let Some(event) = next_event(events).await? else {
                return Ok(Next::Eof);
            };
            let data = event.data.trim();
            if !data.is_empty() {
                reader
                    .event(&event.event, data)
                    .map_err(StreamFailure::Protocol)?;
            }
        },
        Reader::Native(reader) => loop {
            if reader.finished() {
                return Ok(Next::Done);
            }
            let Some(event) = next_event(events).await? else {
                return Ok(Next::Eof);
            };
            let data = event.data.trim();
            if data.is_empty() {
                continue;
            }
            if let Some(chunk) = reader.event(data).map_err(StreamFailure::Protocol)? {
                return Ok(Next::Chunk(chunk));
            }
        },
    }
}

/// The next chunk. With `read_logprobs` its `logprobs` are read into [`Chunk::logprobs`] (for
/// the guard), and with `strip_logprobs` removed from its JSON (they were asked for on the
/// guard's behalf); without either, the chunk is not looked at twice.
async fn next_chunk<S>(
    events: &mut std::pin::Pin<Box<S>>,
    read_logprobs: bool,
    strip_logprobs: bool,
) -> Result<Next, StreamFailure>
where
    S: EventSource + ?Sized,
{
    loop {
        let Some(event) = next_event(events).await? else {
            return Ok(Next::Eof);
        };
        let data = event.data.trim();
        if data.is_empty() {
            continue;
        }
        if data == "[DONE]" {
            return Ok(Next::Done);
        }
        let peek: ChunkPeek = serde_json::from_str(data).map_err(|e| {
            StreamFailure::Protocol(format!(
                "stream chunk is not JSON ({e}): {}",
                truncate(data, 200)
            ))
        })?;
        let usage_only = peek.usage.is_some() && peek.choices.as_ref().is_some_and(Vec::is_empty);
        let (answer, stripped) = if read_logprobs {
            read_answer(data.as_bytes(), strip_logprobs)
        } else {
            (AnswerPeek::default(), None)
        };
        let logprobs = answer.logprobs;
        let data = stripped.map_or_else(|| Bytes::copy_from_slice(data.as_bytes()), Bytes::from);
        return Ok(Next::Chunk(Chunk {
            data,
            usage: peek.usage,
            usage_only,
            is_error: peek.error.is_some(),
            logprobs,
        }));
    }
}

/// Validates a non-streaming body and reads its usage.
fn completion_usage(body: &[u8]) -> Result<Option<Usage>, BackendError> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(default)]
        choices: Option<serde::de::IgnoredAny>,
        #[serde(default)]
        usage: Option<Usage>,
    }
    // The body as text only for an error message: a good answer is not scanned twice.
    let text = || String::from_utf8_lossy(body);
    let peek: Peek = serde_json::from_slice(body).map_err(|e| BackendError::Protocol {
        detail: format!("response is not JSON ({e}): {}", truncate(&text(), 200)),
    })?;
    if peek.choices.is_none() {
        return Err(BackendError::Protocol {
            detail: format!("response has no `choices`: {}", truncate(&text(), 200)),
        });
    }
    Ok(peek.usage)
}

fn status_error(status: u16, body: &[u8], retry_after: Option<String>) -> BackendError {
    let (message, kind) = match upstream_error_message(body) {
        Some(e) => (
            e.message.unwrap_or_else(|| "(no message)".to_owned()),
            e.kind,
        ),
        None if body.is_empty() => ("(empty body)".to_owned(), None),
        None => (
            truncate(&String::from_utf8_lossy(body), 300).to_owned(),
            None,
        ),
    };
    BackendError::Status {
        status,
        message,
        kind,
        retry_after,
    }
}

/// The key in the environment variable `var` (`api_key_env`) of upstream `name`: `Ok(None)`
/// without a variable, `Err` (logged once, here) when the variable is unset or empty, so
/// requests fail with the reason instead of reaching the upstream without a key.
pub fn api_key(name: &str, var: Option<&str>) -> Result<Option<String>, String> {
    let Some(var) = var else {
        return Ok(None);
    };
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_owned())),
        _ => {
            tracing::warn!(
                backend = %name,
                "environment variable {var} is not set: `{name}` will refuse requests until the daemon is restarted with it"
            );
            Err(format!(
                "environment variable {var} (its api_key_env) is not set"
            ))
        }
    }
}

/// At most `max` characters of `s`, for error messages quoting an upstream.
pub(super) fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// "outer: inner: innermost", so a refused connection says "Connection refused".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reads a whole SSE body, delivered in the given pieces, the way a stream is read.
    fn read_all(pieces: Vec<Vec<u8>>) -> Vec<Result<&'static str, String>> {
        let runtime = match tokio::runtime::Builder::new_current_thread().build() {
            Ok(r) => r,
            Err(e) => return vec![Err(e.to_string())],
        };
        runtime.block_on(async move {
            let body = futures::stream::iter(
                pieces
                    .into_iter()
                    .map(|p| Ok::<Bytes, reqwest::Error>(Bytes::from(p))),
            );
            let mut events = Box::pin(line_capped(body).eventsource());
            let mut seen = Vec::new();
            // Bounded: every step consumes input or ends.
            for _ in 0..10_000 {
                match next_chunk(&mut events, false, false).await {
                    Ok(Next::Chunk(_)) => seen.push(Ok("chunk")),
                    Ok(Next::Done) => {
                        seen.push(Ok("done"));
                        break;
                    }
                    Ok(Next::Eof) => {
                        seen.push(Ok("eof"));
                        break;
                    }
                    Err(StreamFailure::Protocol(e)) => {
                        seen.push(Err(e));
                        break;
                    }
                    Err(StreamFailure::Transport(e)) => {
                        seen.push(Err(e.to_string()));
                        break;
                    }
                }
            }
            seen
        })
    }

    /// Splits `bytes` at the given cut points.
    fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut pieces = Vec::new();
        let mut at = 0;
        for c in cuts {
            pieces.push(bytes[at..c].to_vec());
            at = c;
        }
        pieces.push(bytes[at..].to_vec());
        pieces
    }

    #[test]
    fn a_well_formed_stream_reads_the_same_however_it_is_split() {
        let body = b"data: {\"choices\":[{\"delta\":{\"content\":\"h\xc3\xa9\"}}]}\n\n: comment\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\ndata: [DONE]\n\n";
        let whole = read_all(vec![body.to_vec()]);
        assert_eq!(whole, vec![Ok("chunk"), Ok("chunk"), Ok("done")]);
        for at in 0..body.len() {
            assert_eq!(read_all(split(body, &[at])), whole, "split at {at}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn the_sse_reader_never_panics_on_arbitrary_bytes(
            bytes in prop::collection::vec(any::<u8>(), 0..512),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let _ = read_all(split(&bytes, &cuts));
        }

        #[test]
        fn the_sse_reader_never_panics_on_near_miss_frames(
            frames in prop::collection::vec(
                prop_oneof![
                    Just(b"data: [DONE]\n\n".to_vec()),
                    Just(b"data: {\"choices\":[]}\n\n".to_vec()),
                    Just(b"data: {\"error\":{\"message\":\"x\"}}\n\n".to_vec()),
                    Just(b"event: ping\n\n".to_vec()),
                    Just(b"data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"prompt_tokens\":-1}}\n\n".to_vec()),
                    Just(b"data: {\"choices\":\n".to_vec()),
                    Just(b"retry: 10\r\n".to_vec()),
                    Just(b"\xff\xfe\r\n\r\n".to_vec()),
                    prop::collection::vec(any::<u8>(), 0..40),
                ],
                0..12,
            ),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let body: Vec<u8> = frames.concat();
            let _ = read_all(split(&body, &cuts));
        }
    }
}
