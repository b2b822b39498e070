//! Scripted OpenAI-compatible upstreams.
//!
//! A [`ScriptedUpstream`] answers the n-th chat request with the n-th [`Behavior`] of its script
//! (the last one repeats), records every request it received, and answers like a real server:
//! JSON completions with usage, or SSE streams that honour `stream_options.include_usage`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// What the upstream does with one request.
#[derive(Debug, Clone)]
pub enum Behavior {
    /// Answer with this assistant text: a JSON completion, or a word-by-word SSE stream when the
    /// request has `stream: true`.
    Reply(String),
    /// Answer with this status and JSON body (e.g. 429 or 500 with an OpenAI error object).
    Status {
        /// HTTP status.
        status: u16,
        /// Response body.
        body: Value,
        /// `Retry-After` header, if any.
        retry_after: Option<String>,
    },
    /// Wait, then behave as the inner behaviour (a slow or hanging upstream).
    Delay(Duration, Box<Behavior>),
    /// Stream `chunks` content chunks, then stop without `[DONE]` (a truncated stream).
    TruncatedStream {
        /// Content chunks sent before the stream stops.
        chunks: usize,
    },
    /// Stream `chunks` content chunks, then an in-band `{"error": {...}}` chunk with `message`,
    /// then `[DONE]`, all with status 200 (as vLLM reports a failure mid-generation).
    InBandError {
        /// Content chunks sent before the error chunk.
        chunks: usize,
        /// The error's message.
        message: String,
    },
    /// Stream `chunks` content chunks, then keep the connection open without sending anything.
    StalledStream {
        /// Content chunks sent before the stream goes silent.
        chunks: usize,
    },
    /// Answer 200 with a body that is not JSON.
    Garbage,
    /// Answer in whatever API the test scripts, on any path: `whole` as the JSON body, or, for a
    /// request with `stream: true`, `events` as SSE, each named by its own `type` (as both the
    /// Responses and the Messages streams name theirs). Used for answers the gateway must relay
    /// untouched (tool calls, thinking blocks).
    Native {
        /// The whole answer.
        whole: Value,
        /// The stream's events; one without its API's closing event is a truncated stream.
        events: Vec<Value>,
    },
    /// Answer 200 with a completion whose content is `bytes` long, sent chunked (no
    /// `Content-Length`) and made as it is sent, so the upstream itself holds 64 KiB at a time.
    /// A stream request gets one good chunk, then a `data:` line of `bytes` that never ends.
    Oversize {
        /// Bytes of content (or of the endless line).
        bytes: usize,
    },
    /// Like `Reply`, but when the request asks for `logprobs: true` (as llama.cpp's server and
    /// vLLM do, and only then) every word is a token with this ln P; streamed chunks are `gap`
    /// apart.
    Confident {
        /// The assistant text.
        content: String,
        /// ln P of every token.
        logprob: f32,
        /// Time between streamed chunks.
        gap: Duration,
    },
}

impl Behavior {
    /// A reply whose tokens all have ln P = `logprob`, sent at once.
    pub fn confident(content: &str, logprob: f32) -> Self {
        Behavior::Confident {
            content: content.to_owned(),
            logprob,
            gap: Duration::ZERO,
        }
    }

    /// A 500 with an OpenAI-shaped error body.
    pub fn server_error(message: &str) -> Self {
        Behavior::Status {
            status: 500,
            body: json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}}),
            retry_after: None,
        }
    }

    /// A 429 with an OpenAI-shaped error body and `Retry-After`.
    pub fn rate_limited(retry_after_s: u32) -> Self {
        Behavior::Status {
            status: 429,
            body: json!({"error": {"message": "Rate limit reached for requests", "type": "rate_limit_error", "param": null, "code": "rate_limit_exceeded"}}),
            retry_after: Some(retry_after_s.to_string()),
        }
    }

    /// Waits `delay` before replying with `content`.
    pub fn slow(delay: Duration, content: &str) -> Self {
        Behavior::Delay(delay, Box::new(Behavior::Reply(content.to_owned())))
    }
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The request path, e.g. `/v1/chat/completions`.
    pub path: String,
    /// The request headers.
    pub headers: HeaderMap,
    /// The JSON body (`Null` if it was not JSON).
    pub body: Value,
}

struct Shared {
    name: String,
    script: Vec<Behavior>,
    next: AtomicUsize,
    requests: Mutex<Vec<RecordedRequest>>,
    record: bool,
    /// Repeat the whole script (request n gets behaviour n mod len) instead of its last entry.
    cycle: bool,
}

/// A scripted upstream listening on `127.0.0.1:<ephemeral>` until dropped.
pub struct ScriptedUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedUpstream {
    /// Starts an upstream named `model_name` (echoed as the response `model`) with a script.
    pub async fn start(model_name: &str, script: Vec<Behavior>) -> std::io::Result<Self> {
        Self::start_on(
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
            model_name,
            script,
            true,
        )
        .await
    }

    /// Starts on a given address; `record = false` keeps memory flat under load.
    pub async fn start_on(
        addr: SocketAddr,
        model_name: &str,
        script: Vec<Behavior>,
        record: bool,
    ) -> std::io::Result<Self> {
        Self::start_with(addr, model_name, script, record, false).await
    }

    /// Like [`Self::start_on`], repeating the whole script for ever (a failure every n-th
    /// request, for load with a steady error rate).
    pub async fn start_cycling(
        addr: SocketAddr,
        model_name: &str,
        script: Vec<Behavior>,
    ) -> std::io::Result<Self> {
        Self::start_with(addr, model_name, script, false, true).await
    }

    async fn start_with(
        addr: SocketAddr,
        model_name: &str,
        script: Vec<Behavior>,
        record: bool,
        cycle: bool,
    ) -> std::io::Result<Self> {
        let script = if script.is_empty() {
            vec![Behavior::Reply("ok".to_owned())]
        } else {
            script
        };
        let shared = Arc::new(Shared {
            name: model_name.to_owned(),
            script,
            next: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            record,
            cycle,
        });
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/messages", post(messages))
            .route("/v1/responses", post(responses))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/models", get(models))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// The OpenAI base URL, e.g. `http://127.0.0.1:41234/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Chat requests received so far.
    pub fn hits(&self) -> usize {
        self.shared.next.load(Ordering::SeqCst)
    }

    /// Every chat request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn models(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(json!({"object": "list", "data": [{"id": shared.name, "object": "model", "created": 0, "owned_by": "testkit"}]}))
        .into_response()
}

async fn chat(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let (behavior, body) = take(&shared, "/v1/chat/completions", headers, &body);
    respond(&shared.name, &body, behavior).await
}

/// `POST /v1/messages`: the same script, answered in Anthropic's Messages protocol.
async fn messages(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let (behavior, body) = take(&shared, "/v1/messages", headers, &body);
    respond_messages(&shared.name, &body, behavior).await
}

/// `POST /v1/responses`: the script's `Native`, `Status`, `Delay` and `Garbage` behaviours
/// (the gateway sends only requests it cannot translate to chat here, and relays the answer).
async fn responses(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let (mut behavior, body) = take(&shared, "/v1/responses", headers, &body);
    while let Behavior::Delay(d, inner) = behavior {
        tokio::time::sleep(d).await;
        behavior = *inner;
    }
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    match behavior {
        Behavior::Native { whole, events } => native_response(stream, whole, events),
        Behavior::Status {
            status,
            body,
            retry_after,
        } => status_response(status, body, retry_after),
        Behavior::Garbage => (StatusCode::OK, "<html>not json</html>").into_response(),
        _ => (
            StatusCode::NOT_IMPLEMENTED,
            "not scripted for the Responses protocol",
        )
            .into_response(),
    }
}

/// A scripted native answer: the JSON, or the events named by their `type`.
fn native_response(stream: bool, whole: Value, events: Vec<Value>) -> Response {
    if !stream {
        return axum::Json(whole).into_response();
    }
    sse(events
        .into_iter()
        .map(|e| {
            let name = e
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("message")
                .to_owned();
            event(&name, e)
        })
        .collect())
}

/// `POST /v1/embeddings`: one 3-dimensional vector per input (`[i, words, 1]`), usage counting
/// words; a `Status` behaviour answers its status instead.
async fn embeddings(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (behavior, body) = take(&shared, "/v1/embeddings", headers, &body);
    if let Behavior::Status {
        status,
        body,
        retry_after,
    } = behavior
    {
        return status_response(status, body, retry_after);
    }
    let inputs: Vec<String> = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().unwrap_or("").to_owned())
            .collect(),
        _ => Vec::new(),
    };
    let words: usize = inputs.iter().map(|t| t.split_whitespace().count()).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"object": "embedding", "index": i,
            "embedding": [i as f64, t.split_whitespace().count() as f64, 1.0]})
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data, "model": shared.name,
        "usage": {"prompt_tokens": words, "total_tokens": words}}))
    .into_response()
}

/// The next scripted behaviour, and the request recorded.
fn take(shared: &Shared, path: &str, headers: HeaderMap, body: &[u8]) -> (Behavior, Value) {
    let n = shared.next.fetch_add(1, Ordering::SeqCst);
    let len = shared.script.len();
    let behavior = shared.script[if shared.cycle {
        n % len
    } else {
        n.min(len - 1)
    }]
    .clone();
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if shared.record {
        if let Ok(mut r) = shared.requests.lock() {
            r.push(RecordedRequest {
                path: path.to_owned(),
                headers,
                body: body.clone(),
            });
        }
    }
    (behavior, body)
}

/// A scripted error status with its JSON body and optional `Retry-After`.
fn status_response(status: u16, body: Value, retry_after: Option<String>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (code, axum::Json(body)).into_response();
    if let Some(v) = retry_after.and_then(|v| v.parse().ok()) {
        response.headers_mut().insert("retry-after", v);
    }
    response
}

/// One named SSE event of Anthropic's protocol.
fn event(name: &str, data: Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// A reply in Anthropic's Messages protocol: a message, or its event stream (one text delta
/// per word; input tokens are the prompt's words, system included, output tokens the reply's).
/// A truncated stream stops after `chunks` deltas; an in-band error is an `error` event.
async fn respond_messages(model: &str, request: &Value, behavior: Behavior) -> Response {
    let mut behavior = behavior;
    while let Behavior::Delay(d, inner) = behavior {
        tokio::time::sleep(d).await;
        behavior = *inner;
    }
    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    let system = match request.get("system") {
        Some(Value::String(s)) => s.split_whitespace().count() as u64,
        _ => 0,
    };
    let input = count_prompt_words(request) + system;
    let eight = || "one two three four five six seven eight".to_owned();
    let stall = matches!(behavior, Behavior::StalledStream { .. });
    let (content, cut, error) = match behavior {
        Behavior::Reply(content) => (content, usize::MAX, None),
        Behavior::Confident { content, .. } => (content, usize::MAX, None),
        Behavior::TruncatedStream { chunks } | Behavior::StalledStream { chunks } => {
            (eight(), chunks, None)
        }
        Behavior::InBandError { chunks, message } => (eight(), chunks, Some(message)),
        Behavior::Status {
            status,
            body,
            retry_after,
        } => return status_response(status, body, retry_after),
        Behavior::Garbage => return (StatusCode::OK, "<html>not json</html>").into_response(),
        Behavior::Native { whole, events } => return native_response(stream, whole, events),
        Behavior::Oversize { .. } | Behavior::Delay(..) => {
            return (
                StatusCode::NOT_IMPLEMENTED,
                "not scripted for the Messages protocol",
            )
                .into_response()
        }
    };
    let words: Vec<&str> = content.split_whitespace().collect();
    let output = words.len() as u64;
    if !stream {
        return axum::Json(json!({
            "id": "msg_testkit", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": content}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": output}
        }))
        .into_response();
    }
    let mut frames = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {
            "id": "msg_testkit", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": 1}}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    for (i, w) in words.iter().enumerate().take(cut) {
        let text = if i == 0 {
            (*w).to_owned()
        } else {
            format!(" {w}")
        };
        frames.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta",
            "index": 0, "delta": {"type": "text_delta", "text": text}}),
        ));
    }
    if let Some(message) = error {
        frames.push(event(
            "error",
            json!({"type": "error",
            "error": {"type": "overloaded_error", "message": message}}),
        ));
        return sse(frames);
    }
    if cut < words.len() {
        // Truncated: the frames so far, then the end of the body (or, stalled, silence).
        let body = futures::stream::iter(
            frames
                .into_iter()
                .map(|f| Ok::<_, std::convert::Infallible>(Bytes::from(f))),
        );
        let body = if stall {
            Body::from_stream(body.chain(futures::stream::pending()))
        } else {
            Body::from_stream(body)
        };
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    frames.push(event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    frames.push(event(
        "message_delta",
        json!({"type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null},
        "usage": {"output_tokens": output}}),
    ));
    frames.push(event("message_stop", json!({"type": "message_stop"})));
    sse(frames)
}

async fn respond(model: &str, request: &Value, behavior: Behavior) -> Response {
    let mut behavior = behavior;
    while let Behavior::Delay(d, inner) = behavior {
        tokio::time::sleep(d).await;
        behavior = *inner;
    }
    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let prompt_tokens = count_prompt_words(request);
    match behavior {
        Behavior::Reply(content) if stream => sse(stream_frames(
            model,
            &content,
            prompt_tokens,
            include_usage,
            true,
            usize::MAX,
        )),
        Behavior::Reply(content) => {
            let completion_tokens = content.split_whitespace().count() as u64;
            axum::Json(json!({
                "id": "chatcmpl-testkit",
                "object": "chat.completion",
                "created": 1_700_000_000u64,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop", "logprobs": null}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
            }))
            .into_response()
        }
        Behavior::TruncatedStream { chunks } => sse(stream_frames(
            model,
            "one two three four five six seven eight",
            prompt_tokens,
            include_usage,
            false,
            chunks,
        )),
        Behavior::InBandError { chunks, message } => {
            let mut frames = stream_frames(
                model,
                "one two three four five six seven eight",
                prompt_tokens,
                include_usage,
                false,
                chunks,
            );
            frames.push(format!(
                "data: {}\n\n",
                json!({"error": {"message": message, "type": "server_error", "code": 500}})
            ));
            frames.push("data: [DONE]\n\n".to_owned());
            sse(frames)
        }
        Behavior::StalledStream { chunks } => {
            let frames = stream_frames(
                model,
                "one two three four",
                prompt_tokens,
                include_usage,
                false,
                chunks,
            );
            let stream = futures::stream::iter(
                frames
                    .into_iter()
                    .map(|f| Ok::<_, std::convert::Infallible>(Bytes::from(f))),
            )
            .chain(futures::stream::pending());
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        Behavior::Status {
            status,
            body,
            retry_after,
        } => status_response(status, body, retry_after),
        Behavior::Native { whole, events } => native_response(stream, whole, events),
        Behavior::Garbage => (StatusCode::OK, "<html>not json</html>").into_response(),
        Behavior::Oversize { bytes } => {
            const PIECE: usize = 64 * 1024;
            let (head, tail, content_type) = if stream {
                let first = stream_frames(model, "one", prompt_tokens, false, false, 1).concat();
                (
                    format!("{first}data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\""),
                    String::new(),
                    "text/event-stream",
                )
            } else {
                (
                    format!("{{\"id\":\"chatcmpl-testkit\",\"object\":\"chat.completion\",\"created\":1700000000,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\""),
                    "\"},\"finish_reason\":\"stop\"}]}".to_owned(),
                    "application/json",
                )
            };
            let pieces = bytes.div_ceil(PIECE);
            let body = futures::stream::iter(std::iter::once(Bytes::from(head)))
                .chain(futures::stream::iter(0..pieces).map(move |i| {
                    let n = PIECE.min(bytes - i * PIECE);
                    Bytes::from(vec![b'a'; n])
                }))
                .chain(futures::stream::iter(std::iter::once(Bytes::from(tail))))
                .map(Ok::<_, std::convert::Infallible>);
            Response::builder()
                .header("content-type", content_type)
                .body(Body::from_stream(body))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        Behavior::Confident {
            content,
            logprob,
            gap,
        } => {
            let asked = request.get("logprobs").and_then(Value::as_bool) == Some(true);
            let lp = asked.then_some(logprob);
            if stream {
                let frames = logprob_frames(model, &content, prompt_tokens, include_usage, lp);
                let stream = futures::stream::iter(frames.into_iter().enumerate()).then(
                    move |(i, f)| async move {
                        if i > 0 && !gap.is_zero() {
                            tokio::time::sleep(gap).await;
                        }
                        Ok::<_, std::convert::Infallible>(Bytes::from(f))
                    },
                );
                return Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(stream))
                    .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
            }
            let words = pieces(&content);
            let completion_tokens = words.len() as u64;
            let logprobs = lp.map(|l| json!({"content": words.iter().map(|w| token(w, l)).collect::<Vec<_>>(), "refusal": null}));
            axum::Json(json!({
                "id": "chatcmpl-testkit",
                "object": "chat.completion",
                "created": 1_700_000_000u64,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop", "logprobs": logprobs}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
            }))
            .into_response()
        }
        Behavior::Delay(..) => unreachable!("delays are unwrapped above"),
    }
}

/// Words in every message's text content: the upstream's deterministic "token" count.
fn count_prompt_words(request: &Value) -> u64 {
    let Some(messages) = request.get("messages").and_then(Value::as_array) else {
        return 0;
    };
    messages
        .iter()
        .map(|m| match m.get("content") {
            Some(Value::String(s)) => s.split_whitespace().count() as u64,
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .map(|s| s.split_whitespace().count() as u64)
                .sum(),
            _ => 0,
        })
        .sum()
}

/// The SSE frames of a streamed reply: a role chunk, one chunk per word, a finish chunk, the
/// usage chunk when asked for, and `[DONE]` unless `complete` is false (then it stops after
/// `max_content` content chunks).
pub fn stream_frames(
    model: &str,
    content: &str,
    prompt_tokens: u64,
    include_usage: bool,
    complete: bool,
    max_content: usize,
) -> Vec<String> {
    let usage_field = if include_usage { ",\"usage\":null" } else { "" };
    let chunk = |delta: Value, finish: Value| {
        format!(
            "data: {{\"id\":\"chatcmpl-testkit\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":{},\"choices\":[{{\"index\":0,\"delta\":{},\"finish_reason\":{}}}]{usage_field}}}\n\n",
            json!(model), delta, finish
        )
    };
    let mut frames = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    let words: Vec<&str> = content.split_whitespace().collect();
    for (i, w) in words.iter().enumerate().take(max_content) {
        let piece = if i == 0 {
            (*w).to_owned()
        } else {
            format!(" {w}")
        };
        frames.push(chunk(json!({"content": piece}), Value::Null));
    }
    if !complete {
        return frames;
    }
    frames.push(chunk(json!({}), json!("stop")));
    if include_usage {
        let completion = words.len() as u64;
        frames.push(format!(
            "data: {{\"id\":\"chatcmpl-testkit\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":{},\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt_tokens},\"completion_tokens\":{completion},\"total_tokens\":{}}}}}\n\n",
            json!(model),
            prompt_tokens + completion
        ));
    }
    frames.push("data: [DONE]\n\n".to_owned());
    frames
}

/// The words of `content` as streamed pieces ("a", " b", " c").
fn pieces(content: &str) -> Vec<String> {
    content
        .split_whitespace()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

/// One `logprobs.content[]` entry.
fn token(text: &str, logprob: f32) -> Value {
    json!({"token": text, "logprob": logprob, "bytes": text.as_bytes(), "top_logprobs": []})
}

/// The SSE frames of a reply whose chunks carry `logprobs` when `logprob` is set.
fn logprob_frames(
    model: &str,
    content: &str,
    prompt_tokens: u64,
    include_usage: bool,
    logprob: Option<f32>,
) -> Vec<String> {
    let chunk = |delta: Value, logprobs: Value, finish: Value| {
        let mut c = json!({"id": "chatcmpl-testkit", "object": "chat.completion.chunk", "created": 1_700_000_000u64, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]});
        if include_usage {
            c["usage"] = Value::Null;
        }
        format!("data: {c}\n\n")
    };
    let words = pieces(content);
    let mut frames = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
        Value::Null,
    )];
    for w in &words {
        let lp = logprob.map_or(
            Value::Null,
            |l| json!({"content": [token(w, l)], "refusal": null}),
        );
        frames.push(chunk(json!({"content": w}), lp, Value::Null));
    }
    frames.push(chunk(json!({}), Value::Null, json!("stop")));
    if include_usage {
        let completion = words.len() as u64;
        frames.push(format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-testkit", "object": "chat.completion.chunk", "created": 1_700_000_000u64, "model": model, "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}})
        ));
    }
    frames.push("data: [DONE]\n\n".to_owned());
    frames
}

fn sse(frames: Vec<String>) -> Response {
    let stream = futures::stream::iter(
        frames
            .into_iter()
            .map(|f| Ok::<_, std::convert::Infallible>(Bytes::from(f))),
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// An upstream that accepts connections, reads the request, and resets the connection (TCP RST)
/// without answering.
pub struct ResetUpstream {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    hits: Arc<AtomicUsize>,
}

impl ResetUpstream {
    /// Starts on an ephemeral loopback port.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                // Read (part of) the request so the client is past its write, then reset.
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), socket.read(&mut buf)).await;
                let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
                drop(socket);
            }
        });
        Ok(Self { addr, task, hits })
    }

    /// The OpenAI base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Connections accepted (and reset) so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for ResetUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A base URL on a loopback port with no listener: connections are refused.
pub fn refused_base_url() -> std::io::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    drop(listener);
    Ok(format!("http://{addr}/v1"))
}
