//! OpenAI's Responses API (`POST /v1/responses`) at the edge: a Responses request becomes the chat
//! request the pipeline serves, and the chat answer becomes a Response object (whole, or as the
//! Responses event stream). Errors keep OpenAI's shape, which both APIs share.
//!
//! Translated: `model`, `input` (a string, or message items with `input_text`, `output_text` and
//! `input_image` parts), `instructions` (a system message, not carried to the next turn, as
//! OpenAI documents), `max_output_tokens`, `temperature`, `top_p`, `user`, `text.format` (as chat
//! `response_format`), `stream`, `store` and `previous_response_id` (the conversation so far, from
//! [`Conversations`]). Refused with a 400 naming the field: tools, reasoning and the other
//! fields that need a backend speaking Responses natively.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

use super::edge::{self, ChatAnswer, ChunkParts, Object, StreamEdge};
use super::Usage;
use crate::error::ApiError;

/// A Responses request, translated.
#[derive(Debug)]
pub struct Translated {
    /// The chat-completions body the pipeline serves.
    pub chat: Vec<u8>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Whether to keep the conversation for a later `previous_response_id` (`store`, default
    /// true as in OpenAI's API).
    pub store: bool,
    /// The conversation up to this turn without `instructions`: what a follow-up continues.
    pub history: Vec<Value>,
    /// Request fields the Response object echoes.
    pub echo: Echo,
}

/// What a Response object repeats from its request.
#[derive(Debug, Clone, Default)]
pub struct Echo {
    instructions: Value,
    max_output_tokens: Value,
    previous_response_id: Value,
    temperature: Value,
    top_p: Value,
    metadata: Value,
    user: Value,
    text: Value,
    store: bool,
}

/// Fields that need a backend speaking Responses natively, and why.
const REFUSED: [(&str, &str); 8] = [
    (
        "tools",
        "tools need a cloud backend that speaks the Responses API",
    ),
    (
        "reasoning",
        "reasoning options need a cloud backend that speaks the Responses API",
    ),
    (
        "background",
        "background responses are not kept by this gateway",
    ),
    (
        "conversation",
        "conversations are not kept by this gateway; use previous_response_id",
    ),
    ("prompt", "stored prompts are OpenAI-hosted"),
    (
        "include",
        "no extra output is produced by the translated backends",
    ),
    (
        "top_logprobs",
        "log-probabilities are not translated to the Responses shape yet",
    ),
    (
        "max_tool_calls",
        "tools need a cloud backend that speaks the Responses API",
    ),
];

/// Accepted and not forwarded: they ask nothing of the model.
const IGNORED: [&str; 5] = [
    "service_tier",
    "prompt_cache_key",
    "parallel_tool_calls",
    "stream_options",
    "safety_identifier",
];

/// Translates a Responses request body into a chat-completions body, continuing the stored
/// conversation `previous_response_id` names (404 when it is unknown or expired).
pub fn to_chat(bytes: &[u8], conversations: &Conversations) -> Result<Translated, ApiError> {
    let body = edge::object(bytes)?;
    let mut chat = Object::new();
    let mut echo = Echo {
        store: true,
        ..Echo::default()
    };
    let mut stream = false;
    for (key, value) in &body {
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            "model" => {
                chat.insert("model".into(), value.clone());
            }
            "input" | "previous_response_id" | "instructions" => {}
            "max_output_tokens" => match value.as_u64() {
                Some(n) if n > 0 => {
                    chat.insert("max_tokens".into(), json!(n));
                    echo.max_output_tokens = json!(n);
                }
                _ => {
                    return Err(ApiError::invalid_request(
                        "`max_output_tokens` must be a positive integer.",
                    )
                    .with_param("max_output_tokens")
                    .with_code("invalid_value"))
                }
            },
            "temperature" | "top_p" => {
                if !value.is_number() {
                    return Err(edge::wrong(key, "a number", value));
                }
                chat.insert(key.clone(), value.clone());
                if key == "temperature" {
                    echo.temperature = value.clone();
                } else {
                    echo.top_p = value.clone();
                }
            }
            "user" => {
                if !value.is_string() {
                    return Err(edge::wrong("user", "a string", value));
                }
                chat.insert("user".into(), value.clone());
                echo.user = value.clone();
            }
            "metadata" => {
                if !value.is_object() {
                    return Err(edge::wrong("metadata", "an object", value));
                }
                echo.metadata = value.clone();
            }
            "stream" => {
                stream = value
                    .as_bool()
                    .ok_or_else(|| edge::wrong("stream", "a boolean", value))?;
            }
            "store" => {
                echo.store = value
                    .as_bool()
                    .ok_or_else(|| edge::wrong("store", "a boolean", value))?;
            }
            "text" => {
                if let Some(format) = text_format(value)? {
                    chat.insert("response_format".into(), format);
                }
                echo.text = value.clone();
            }
            "truncation" if value == "disabled" => {}
            "tool_choice" if value == "none" || value == "auto" => {}
            "tools" if value.as_array().is_some_and(Vec::is_empty) => {}
            "background" if value == false => {}
            "include" if value.as_array().is_some_and(Vec::is_empty) => {}
            k if IGNORED.contains(&k) => {}
            k => {
                return Err(match REFUSED.iter().find(|(name, _)| *name == k) {
                    Some((name, why)) => edge::unsupported(name, why),
                    None if k == "truncation" => {
                        edge::unsupported("truncation", "only \"disabled\" is supported")
                    }
                    None if k == "tool_choice" => edge::unsupported(
                        "tool_choice",
                        "tools need a cloud backend that speaks the Responses API",
                    ),
                    None => edge::unknown(k, "Responses API"),
                })
            }
        }
    }
    edge::require_model(&body)?;
    let mut history = match body.get("previous_response_id") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(id)) => {
            echo.previous_response_id = json!(id);
            conversations
                .get(id)
                .map(|c| c.as_ref().clone())
                .ok_or_else(|| {
                    ApiError::not_found(
                        format!(
                            "Previous response with id '{}' not found (unknown, stored with store: false, or past its retention).",
                            id.chars().take(100).collect::<String>()
                        ),
                        "previous_response_not_found",
                    )
                    .with_param("previous_response_id")
                })?
        }
        Some(other) => return Err(edge::wrong("previous_response_id", "a string", other)),
    };
    match body.get("input") {
        Some(Value::String(s)) => history.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                history.push(input_item(i, item)?);
            }
        }
        Some(Value::Array(_)) => {
            return Err(edge::required("input", "must contain at least one item"))
        }
        Some(other) => return Err(edge::wrong("input", "a string or an array of items", other)),
        None => return Err(edge::required("input", "is required")),
    }
    let mut messages = Vec::with_capacity(history.len() + 1);
    match body.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            echo.instructions = json!(s);
            messages.push(json!({"role": "system", "content": s}));
        }
        Some(other) => return Err(edge::wrong("instructions", "a string", other)),
    }
    messages.extend(history.iter().cloned());
    Ok(Translated {
        chat: edge::chat_body(chat, messages, stream),
        stream,
        store: echo.store,
        history,
        echo,
    })
}

/// `text.format` as a chat `response_format` (`None` for plain text).
fn text_format(text: &Value) -> Result<Option<Value>, ApiError> {
    let Some(text) = text.as_object() else {
        return Err(edge::wrong("text", "an object", text));
    };
    if let Some(k) = text.keys().find(|k| *k != "format") {
        return Err(edge::unsupported(
            &format!("text.{}", k.chars().take(40).collect::<String>()),
            "only text.format is translated",
        ));
    }
    let Some(format) = text.get("format").filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = format.as_object().cloned().unwrap_or_default();
            schema.remove("type");
            if !schema.contains_key("name") || !schema.contains_key("schema") {
                return Err(edge::required(
                    "text.format",
                    "needs `name` and `schema` for type json_schema",
                ));
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        _ => Err(ApiError::invalid_request(
            "`text.format.type` must be \"text\", \"json_object\" or \"json_schema\".",
        )
        .with_param("text.format.type")
        .with_code("invalid_value")),
    }
}

fn input_item(i: usize, item: &Value) -> Result<Value, ApiError> {
    let param = format!("input[{i}]");
    let Some(item) = item.as_object() else {
        return Err(edge::wrong(&param, "an object", item));
    };
    match item.get("type").and_then(Value::as_str) {
        None | Some("message") => {}
        Some(other) => {
            return Err(edge::unsupported(
                &format!("{param}.type"),
                &format!(
                    "`{}` items need a cloud backend that speaks the Responses API",
                    other.chars().take(40).collect::<String>()
                ),
            ))
        }
    }
    let role = match item.get("role").and_then(Value::as_str) {
        Some(r @ ("user" | "assistant" | "system" | "developer")) => r,
        _ => {
            return Err(ApiError::invalid_request(format!(
                "`{param}.role` must be one of user, assistant, system, developer."
            ))
            .with_param(&format!("{param}.role"))
            .with_code("invalid_value"))
        }
    };
    let mut content = edge::content(&param, item.get("content"), "content parts", content_part)?;
    // An assistant turn is plain text in chat.
    if let (true, Value::Array(parts)) = (role == "assistant", &content) {
        content = json!(parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<String>());
    }
    Ok(json!({"role": role, "content": content}))
}

fn content_part(param: &str, part: &Value) -> Result<Value, ApiError> {
    match part.get("type").and_then(Value::as_str) {
        Some("input_text" | "output_text") => edge::text_part(param, part),
        Some("input_image") => match part.get("image_url") {
            Some(Value::String(url)) => {
                let mut image = json!({"url": url});
                if let Some(d) = part.get("detail").filter(|d| d.is_string()) {
                    image["detail"] = d.clone();
                }
                Ok(json!({"type": "image_url", "image_url": image}))
            }
            _ => Err(edge::unsupported(
                &format!("{param}.file_id"),
                "only images given by `image_url` are translated",
            )),
        },
        Some(other) => Err(edge::unsupported(
            &format!("{param}.type"),
            &format!(
                "`{}` parts are not translated to chat",
                other.chars().take(40).collect::<String>()
            ),
        )),
        None => Err(edge::required(&format!("{param}.type"), "is required")),
    }
}

/// What names one Response object: its id, its message item's id, when, and the model.
struct Head<'a> {
    id: &'a str,
    item_id: &'a str,
    created_at: u64,
    model: &'a str,
}

/// The Response object for an answer with `output` text, in `status` ("completed",
/// "incomplete", "in_progress", "failed").
fn response_object(
    head: &Head<'_>,
    echo: &Echo,
    status: &str,
    output: Option<&str>,
    usage: Option<Usage>,
) -> Value {
    let Head {
        id,
        item_id,
        created_at,
        model,
    } = *head;
    let incomplete = (status == "incomplete").then(|| json!({"reason": "max_output_tokens"}));
    let output: Vec<Value> = output
        .map(|text| {
            json!({"type": "message", "id": item_id, "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
        })
        .into_iter()
        .collect();
    let usage = usage.map(|u| {
        json!({"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens})
    });
    let or = |v: &Value, d: Value| if v.is_null() { d } else { v.clone() };
    json!({
        "id": id, "object": "response", "created_at": created_at, "status": status,
        "error": null, "incomplete_details": incomplete,
        "instructions": echo.instructions, "max_output_tokens": echo.max_output_tokens,
        "model": model, "output": output, "parallel_tool_calls": true,
        "previous_response_id": echo.previous_response_id, "reasoning": {"effort": null, "summary": null},
        "store": echo.store, "temperature": or(&echo.temperature, json!(1.0)),
        "text": or(&echo.text, json!({"format": {"type": "text"}})),
        "tool_choice": "auto", "tools": [], "top_p": or(&echo.top_p, json!(1.0)),
        "truncation": "disabled", "usage": usage, "user": echo.user,
        "metadata": or(&echo.metadata, json!({})),
    })
}

fn status_of(finish: Option<&str>) -> &'static str {
    if finish == Some("length") {
        "incomplete"
    } else {
        "completed"
    }
}

/// Seconds since the Unix epoch (the `created` fields).
fn now_s() -> u64 {
    crate::ledger::now_us() / 1_000_000
}

/// A whole chat completion as a Response object; the assistant's text, for the stored
/// conversation, with it.
pub fn answer(completion: &[u8], id: &str, echo: &Echo) -> Result<(Bytes, String), ApiError> {
    let a = ChatAnswer::read(completion)?;
    let item_id = edge::new_id("msg_");
    let head = Head {
        id,
        item_id: &item_id,
        created_at: now_s(),
        model: &a.model,
    };
    let body = response_object(
        &head,
        echo,
        status_of(a.finish_reason.as_deref()),
        Some(&a.text),
        a.usage,
    );
    Ok((
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
        a.text,
    ))
}

/// Called with the whole answer's text once a stream completes (to store the conversation).
pub type OnComplete = Box<dyn FnOnce(String) + Send>;

/// The Responses event stream for one answer: `response.created`, `response.in_progress`, one
/// message item with one `output_text` part (`added`, `delta`s, `done`), `response.completed`
/// with usage (or `response.incomplete` when the answer hit `max_output_tokens`), and
/// `response.failed` when the stream fails after it began.
pub struct ResponsesStream {
    id: String,
    item_id: String,
    created_at: u64,
    echo: Echo,
    model: String,
    seq: u64,
    started: bool,
    text: String,
    finish: Option<String>,
    usage: Option<Usage>,
    on_complete: Option<OnComplete>,
}

impl ResponsesStream {
    /// A stream for the response `id`; `on_complete` is told the answer's text when it ends well.
    pub fn new(id: String, echo: Echo, on_complete: Option<OnComplete>) -> Self {
        Self {
            id,
            item_id: edge::new_id("msg_"),
            created_at: now_s(),
            echo,
            model: String::new(),
            seq: 0,
            started: false,
            text: String::new(),
            finish: None,
            usage: None,
            on_complete,
        }
    }

    fn event(&mut self, out: &mut Vec<u8>, name: &str, mut data: Value) {
        data["type"] = json!(name);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        edge::write_event(out, name, &data);
    }

    fn object(&self, status: &str, output: Option<&str>, usage: Option<Usage>) -> Value {
        let head = Head {
            id: &self.id,
            item_id: &self.item_id,
            created_at: self.created_at,
            model: &self.model,
        };
        response_object(&head, &self.echo, status, output, usage)
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        self.started = true;
        let created = self.object("in_progress", None, None);
        self.event(out, "response.created", json!({"response": created}));
        self.event(out, "response.in_progress", json!({"response": created}));
        let item = json!({"type": "message", "id": self.item_id, "status": "in_progress",
            "role": "assistant", "content": []});
        self.event(
            out,
            "response.output_item.added",
            json!({"output_index": 0, "item": item}),
        );
        let item_id = self.item_id.clone();
        self.event(
            out,
            "response.content_part.added",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
        );
    }
}

impl StreamEdge for ResponsesStream {
    fn chunk(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        let parts = ChunkParts::of(chunk);
        if self.model.is_empty() {
            if let Some(m) = parts.model {
                self.model = m.to_owned();
            }
        }
        if !self.started {
            self.start(out);
        }
        if let Some(text) = parts.text {
            self.text.push_str(text);
            let item_id = self.item_id.clone();
            self.event(
                out,
                "response.output_text.delta",
                json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                    "delta": text, "logprobs": []}),
            );
        }
        if let Some(f) = parts.finish_reason {
            self.finish = Some(f.to_owned());
        }
        if parts.usage.is_some() {
            self.usage = parts.usage;
        }
    }

    fn failed(&mut self, error: &Value, out: &mut Vec<u8>) {
        if !self.started {
            self.start(out);
        }
        let (message, _, code) = edge::error_parts(error);
        let mut response = self.object("failed", None, self.usage);
        response["error"] = json!({"code": if code.is_empty() { "server_error".to_owned() } else { code }, "message": message});
        self.event(out, "response.failed", json!({"response": response}));
    }

    fn done(&mut self, out: &mut Vec<u8>) {
        if !self.started {
            self.start(out);
        }
        let item_id = self.item_id.clone();
        let text = std::mem::take(&mut self.text);
        self.event(
            out,
            "response.output_text.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
        );
        let part = json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
        self.event(
            out,
            "response.content_part.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part}),
        );
        let item = json!({"type": "message", "id": item_id, "status": "completed",
            "role": "assistant", "content": [part]});
        self.event(
            out,
            "response.output_item.done",
            json!({"output_index": 0, "item": item}),
        );
        let status = status_of(self.finish.as_deref());
        let response = self.object(status, Some(&text), self.usage);
        let name = if status == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.event(out, name, json!({"response": response}));
        if let Some(store) = self.on_complete.take() {
            store(text);
        }
    }
}

/// Recent conversations by response id, for `previous_response_id`: bounded in count and age,
/// oldest dropped first. Held in memory, and with [`Conversations::persisted`] also written to
/// the ledger, so a follow-up finds its conversation after a restart (or once memory dropped
/// it) while `responses_ttl_s` and the ledger's retention allow. Without the ledger a restart
/// forgets them: the client gets the 404 OpenAI documents for an unknown id.
pub struct Conversations {
    capacity: usize,
    ttl: Duration,
    inner: Mutex<Stored>,
    ledger: Option<(crate::ledger::Ledger, crate::ledger::LedgerSender)>,
}

#[derive(Default)]
struct Stored {
    /// Each conversation with when it was kept and its size in bytes (as JSON).
    by_id: HashMap<String, (Instant, Arc<Vec<Value>>, usize)>,
    order: VecDeque<String>,
    bytes: usize,
}

/// The most bytes of conversation (as JSON) kept in memory, whatever `responses_stored` says:
/// conversations may carry inline images of megabytes each, and 10,000 of those would not fit.
/// Past it the oldest go first (with the ledger on, they can still be read from there).
pub const MAX_STORED_BYTES: usize = 256 << 20;

impl Stored {
    fn pop_oldest(&mut self) {
        if let Some(old) = self.order.pop_front() {
            if let Some((_, _, size)) = self.by_id.remove(&old) {
                self.bytes = self.bytes.saturating_sub(size);
            }
        }
    }
}

impl Conversations {
    /// A store of at most `capacity` conversations, each kept for `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            capacity,
            ttl,
            inner: Mutex::new(Stored::default()),
            ledger: None,
        }
    }

    /// Also keeps every conversation in `ledger` (written through its writer thread) and reads
    /// the ones memory does not hold from it.
    pub fn persisted(
        mut self,
        ledger: crate::ledger::Ledger,
        writer: crate::ledger::LedgerSender,
    ) -> Self {
        self.ledger = Some((ledger, writer));
        self
    }

    /// The conversation the response `id` ended, its answer included.
    pub fn get(&self, id: &str) -> Option<Arc<Vec<Value>>> {
        if let Ok(stored) = self.inner.lock() {
            if let Some((at, messages, _)) = stored.by_id.get(id) {
                return (at.elapsed() < self.ttl).then(|| messages.clone());
            }
        }
        // A point read of one key: microseconds from redb's page cache.
        let (ledger, _) = self.ledger.as_ref()?;
        match ledger.conversation(id) {
            Ok(Some((time_us, messages))) => {
                let age = crate::ledger::now_us().saturating_sub(time_us);
                (age < self.ttl.as_micros() as u64).then(|| Arc::new(messages))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(response_id = id, error = %e, "could not read a stored conversation");
                None
            }
        }
    }

    /// Keeps `history` plus the assistant's `answer` as the conversation of response `id`.
    pub fn put(&self, id: String, mut history: Vec<Value>, answer: String) {
        if self.capacity == 0 {
            return;
        }
        history.push(json!({"role": "assistant", "content": answer}));
        if let Some((_, writer)) = &self.ledger {
            writer.record_conversation(id.clone(), &history);
        }
        let size = serde_json::to_vec(&history).map_or(0, |b| b.len());
        if size > MAX_STORED_BYTES {
            return;
        }
        let Ok(mut stored) = self.inner.lock() else {
            return;
        };
        while stored.order.len() >= self.capacity
            || stored.bytes.saturating_add(size) > MAX_STORED_BYTES
        {
            if stored.order.is_empty() {
                break;
            }
            stored.pop_oldest();
        }
        while let Some(front) = stored.order.front() {
            match stored.by_id.get(front) {
                Some((at, _, _)) if at.elapsed() < self.ttl => break,
                _ => stored.pop_oldest(),
            }
        }
        stored.bytes += size;
        stored.order.push_back(id.clone());
        stored
            .by_id
            .insert(id, (Instant::now(), Arc::new(history), size));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Conversations {
        Conversations::new(2, Duration::from_secs(60))
    }

    fn chat(body: Value, c: &Conversations) -> Result<Value, ApiError> {
        let t = to_chat(&serde_json::to_vec(&body).unwrap(), c)?;
        Ok(serde_json::from_slice(&t.chat).unwrap())
    }

    #[test]
    fn input_items_instructions_and_limits_translate() {
        let c = chat(
            json!({"model": "auto", "instructions": "Be brief.", "max_output_tokens": 32,
                "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                          {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
                          {"role": "user", "content": "Again"}],
                "temperature": 0, "store": false, "stream": true,
                "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}}),
            &store(),
        )
        .unwrap();
        assert_eq!(
            c,
            json!({"model": "auto", "max_tokens": 32, "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
                "messages": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Again"}],
                "stream": true, "stream_options": {"include_usage": true}})
        );
    }

    #[test]
    fn a_follow_up_continues_the_stored_conversation_and_an_unknown_id_is_404() {
        let s = store();
        s.put(
            "resp_1".into(),
            vec![json!({"role": "user", "content": "Name a colour."})],
            "Blue.".into(),
        );
        let c = chat(
            json!({"model": "auto", "previous_response_id": "resp_1", "input": "Another?"}),
            &s,
        )
        .unwrap();
        assert_eq!(c["messages"].as_array().unwrap().len(), 3);
        assert_eq!(
            c["messages"][1],
            json!({"role": "assistant", "content": "Blue."})
        );
        let e = chat(
            json!({"model": "auto", "previous_response_id": "resp_nope", "input": "x"}),
            &s,
        )
        .unwrap_err();
        assert_eq!(e.status.as_u16(), 404);
        assert_eq!(e.param.as_deref(), Some("previous_response_id"));
        // Bounded: a third conversation pushes out the first.
        s.put("resp_2".into(), vec![], "a".into());
        s.put("resp_3".into(), vec![], "b".into());
        assert!(s.get("resp_1").is_none() && s.get("resp_3").is_some());
    }

    #[test]
    fn tools_and_reasoning_are_refused_by_name() {
        for (field, value) in [
            ("tools", json!([{"type": "function", "name": "f"}])),
            ("reasoning", json!({"effort": "low"})),
            ("truncation", json!("auto")),
            ("bogus", json!(1)),
        ] {
            let mut b = json!({"model": "auto", "input": "x"});
            b[field] = value;
            let e = chat(b, &store()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{e}");
        }
        let e = chat(
            json!({"model": "auto", "input": [{"type": "function_call_output", "output": "1"}]}),
            &store(),
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input[0].type"));
    }
}
