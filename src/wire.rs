//! OpenAI chat-completions wire format: what the gateway reads from a request, and how it writes the
//! request to an upstream without touching anything it does not own.
//!
//! The gateway keeps the client's JSON object as-is (key order included) and only reads the few
//! fields routing needs. Everything else — `tools`, `response_format`, `logprobs`, `seed`, vendor
//! extensions — reaches the upstream byte-for-byte equivalent, so new OpenAI features work through
//! the gateway without a release.

use std::sync::Arc;

use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// The message roles OpenAI's Chat Completions API accepts (its API reference, `messages`);
/// anything else it answers 400, and so does the gateway, rather than pass it to a model.
pub const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

mod answer;
pub mod edge;
pub mod messages;
pub mod native;
pub mod responses;
pub use answer::{answer_peek, read_answer, without_logprobs, AnswerPeek};

/// A validated chat-completions request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    body: Map<String, Value>,
    /// The `model` the client asked for: the routing alias or a backend name.
    pub model: String,
    /// `stream: true`: the client wants server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage: true`: the client wants the final usage chunk.
    pub include_usage: bool,
    /// Characters of message text, a cheap size signal for routing before tokenization.
    pub prompt_chars: usize,
    /// `max_completion_tokens`, else `max_tokens`, when the client set one.
    pub max_tokens: Option<u64>,
    /// Messages in the request.
    pub message_count: usize,
    /// Set by the gateway, never by the client: the quality guard will check a local answer to
    /// this request, so local backends collect the sampled tokens' log-probabilities (see
    /// [`ChatRequest::set_wants_signals`]).
    wants_signals: bool,
    /// Set by the edge: the request as it came, for a backend that speaks its API natively;
    /// the chat body is then only what the pipeline routes and meters it by.
    native: Option<Arc<native::Native>>,
}

/// OpenAI's ceiling on `top_logprobs`.
pub const MAX_TOP_LOGPROBS: u64 = 20;

/// Token counts as upstreams report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Usage {
    /// Input tokens.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Output tokens.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Their sum, as the upstream reported it.
    #[serde(default)]
    pub total_tokens: u64,
}

impl ChatRequest {
    /// Parses and validates a request body. Errors name the field at fault.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let body = edge::object(bytes)?;

        let model = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(Value::String(_)) => return Err(missing("model", "must not be empty")),
            Some(other) => {
                return Err(wrong_type("model", "a string", other));
            }
            None => {
                return Err(missing(
                    "model",
                    "is required (use \"auto\" to let the gateway route)",
                ))
            }
        };

        let messages = match body.get("messages") {
            Some(Value::Array(m)) => m,
            Some(other) => return Err(wrong_type("messages", "an array", other)),
            None => return Err(missing("messages", "is required")),
        };
        if messages.is_empty() {
            return Err(missing("messages", "must contain at least one message"));
        }
        let mut prompt_chars = 0usize;
        for (i, message) in messages.iter().enumerate() {
            let Value::Object(message) = message else {
                return Err(wrong_type(&format!("messages[{i}]"), "an object", message));
            };
            match message.get("role") {
                Some(Value::String(role)) if ROLES.contains(&role.as_str()) => {}
                Some(Value::String(role)) => {
                    // Echo at most 40 characters: the value is client input.
                    let shown: String = role.chars().take(40).collect();
                    return Err(ApiError::invalid_request(format!(
                        "Invalid value for 'messages[{i}].role': `{shown}`. Supported values are: {}.",
                        ROLES.join(", ")
                    ))
                    .with_param(&format!("messages[{i}].role"))
                    .with_code("invalid_value"));
                }
                Some(other) => {
                    return Err(wrong_type(
                        &format!("messages[{i}].role"),
                        "a string",
                        other,
                    ))
                }
                None => {
                    return Err(missing(&format!("messages[{i}].role"), "is required"));
                }
            }
            match message.get("content") {
                None | Some(Value::Null | Value::String(_)) => {}
                Some(Value::Array(parts)) => {
                    if let Some((j, part)) = parts.iter().enumerate().find(|(_, p)| !p.is_object())
                    {
                        return Err(wrong_type(
                            &format!("messages[{i}].content[{j}]"),
                            "a content part object",
                            part,
                        ));
                    }
                }
                Some(other) => {
                    return Err(wrong_type(
                        &format!("messages[{i}].content"),
                        "a string or an array of content parts",
                        other,
                    ))
                }
            }
            prompt_chars = prompt_chars.saturating_add(content_chars(message.get("content")));
        }

        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(wrong_type("stream", "a boolean", other)),
        };
        let include_usage = match body.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(o)) => match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(wrong_type(
                        "stream_options.include_usage",
                        "a boolean",
                        other,
                    ))
                }
            },
            Some(other) => return Err(wrong_type("stream_options", "an object", other)),
        };

        // Sampling numbers are checked here, so that a wrong type is the client's 400 and not
        // an upstream's (or, for a local backend, a silent default).
        for field in ["temperature", "top_p"] {
            match body.get(field) {
                None | Some(Value::Null | Value::Number(_)) => {}
                Some(other) => return Err(wrong_type(field, "a number", other)),
            }
        }

        let mut max_tokens = None;
        for field in ["max_completion_tokens", "max_tokens"] {
            match body.get(field) {
                None | Some(Value::Null) => {}
                Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n >= 1) => {
                    max_tokens = max_tokens.or(n.as_u64());
                }
                Some(other) => return Err(wrong_type(field, "an integer of at least 1", other)),
            }
        }

        let logprobs = match body.get("logprobs") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(wrong_type("logprobs", "a boolean", other)),
        };
        match body.get("top_logprobs") {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n <= MAX_TOP_LOGPROBS) => {
                if !logprobs {
                    return Err(ApiError::invalid_request(
                        "`top_logprobs` requires `logprobs: true`.".to_owned(),
                    )
                    .with_param("top_logprobs")
                    .with_code("invalid_value"));
                }
            }
            Some(Value::Number(n)) if n.as_u64().is_some() => {
                return Err(ApiError::invalid_request(format!(
                    "`top_logprobs` must be at most {MAX_TOP_LOGPROBS}, got {n}."
                ))
                .with_param("top_logprobs")
                .with_code("invalid_value"))
            }
            Some(other) => {
                return Err(wrong_type(
                    "top_logprobs",
                    &format!("an integer from 0 to {MAX_TOP_LOGPROBS}"),
                    other,
                ))
            }
        }

        Ok(Self {
            message_count: messages.len(),
            body,
            model,
            stream,
            include_usage,
            prompt_chars,
            max_tokens,
            wants_signals: false,
            native: None,
        })
    }

    /// Whether the client asked for `logprobs`.
    pub fn client_logprobs(&self) -> bool {
        self.body.get("logprobs").and_then(Value::as_bool) == Some(true)
    }

    /// The request as the client sent it, when only a backend speaking its API natively can
    /// serve it.
    pub fn native(&self) -> Option<&native::Native> {
        self.native.as_deref()
    }

    /// Attaches the request as the client sent it (the edge does, for a native request).
    pub fn set_native(&mut self, native: Option<Arc<native::Native>>) {
        self.native = native;
    }

    /// Whether a local answer to this request will be checked by the quality guard.
    pub fn wants_signals(&self) -> bool {
        self.wants_signals
    }

    /// Marks the request for the quality guard (the gateway does, before serving it).
    pub fn set_wants_signals(&mut self, on: bool) {
        self.wants_signals = on;
    }

    /// Checks the request against the gateway's per-request `[limits]`.
    pub fn check_limits(&self, limits: &crate::config::LimitsConfig) -> Result<(), ApiError> {
        if self.message_count > limits.max_messages {
            return Err(ApiError::invalid_request(format!(
                "`messages` has {} messages; this gateway accepts at most {} (limits.max_messages).",
                self.message_count, limits.max_messages
            ))
            .with_param("messages")
            .with_code("too_many_messages"));
        }
        if let Some(asked) = self.max_tokens {
            if limits.max_output_tokens > 0 && asked > limits.max_output_tokens {
                let field = if self.body.contains_key("max_completion_tokens") {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                };
                return Err(ApiError::invalid_request(format!(
                    "`{field}` is {asked}; this gateway allows at most {} (limits.max_output_tokens).",
                    limits.max_output_tokens
                ))
                .with_param(field)
                .with_code("max_tokens_too_large"));
            }
        }
        Ok(())
    }

    /// Tokens charged against a tokens-per-minute limit on arrival: the prompt at ~4 characters
    /// per token plus the output the client reserved, as OpenAI counts its own limits.
    pub fn estimated_tokens(&self) -> u64 {
        (self.prompt_chars as u64).div_ceil(4) + self.max_tokens.unwrap_or(0)
    }

    /// Every message's text, joined by newlines: what the gateway tokenizes when an upstream
    /// reports no usage.
    pub fn prompt_text(&self) -> String {
        let mut text = String::new();
        let messages = self.body.get("messages").and_then(Value::as_array);
        for message in messages.into_iter().flatten() {
            for part in message.get("content").into_iter().flat_map(text_parts) {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(part);
            }
        }
        text
    }

    /// The conversation as text messages (`{"role", "content"}`, text parts joined by newlines,
    /// images and audio left out): what the router reads of it, and what the ledger keeps under
    /// `store_prompts`, so a router trained on kept rows sees what it will see when serving.
    pub fn text_messages(&self) -> Vec<Value> {
        let messages = self.body.get("messages").and_then(Value::as_array);
        messages
            .into_iter()
            .flatten()
            .map(|m| {
                let role = m.get("role").and_then(Value::as_str).unwrap_or("");
                let text: Vec<&str> = m.get("content").into_iter().flat_map(text_parts).collect();
                serde_json::json!({"role": role, "content": text.join("\n")})
            })
            .collect()
    }

    /// The body to send upstream: the client's object with `model` replaced,
    /// `stream_options.include_usage` set when `force_usage` asks for metered streams, and
    /// `logprobs: true` when `force_logprobs` asks for the guard's signals.
    pub fn upstream_body(&self, model: &str, force_usage: bool, force_logprobs: bool) -> Vec<u8> {
        let body = UpstreamBody {
            request: self,
            model,
            add_usage: self.stream && force_usage && !self.include_usage,
            add_logprobs: force_logprobs && !self.client_logprobs(),
        };
        // Serializing an in-memory JSON tree into a Vec cannot fail.
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// The same request answered whole rather than streamed (for background re-asks such as
    /// shadow checks, which need the answer, not the frames).
    pub fn unstreamed(&self) -> ChatRequest {
        let mut body = self.body.clone();
        body.remove("stream_options");
        body.insert("stream".to_owned(), Value::Bool(false));
        ChatRequest {
            body,
            model: self.model.clone(),
            stream: false,
            include_usage: false,
            prompt_chars: self.prompt_chars,
            max_tokens: self.max_tokens,
            message_count: self.message_count,
            wants_signals: self.wants_signals,
            // Re-asks are of local answers, and a native request is never served locally.
            native: None,
        }
    }

    /// The client's JSON object, for inspection (e.g. by routers looking at `tools`).
    pub fn body(&self) -> &Map<String, Value> {
        &self.body
    }
}

struct UpstreamBody<'a> {
    request: &'a ChatRequest,
    model: &'a str,
    add_usage: bool,
    add_logprobs: bool,
}

impl Serialize for UpstreamBody<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let body = &self.request.body;
        let mut map = serializer.serialize_map(Some(body.len() + 1))?;
        let mut wrote_options = false;
        let mut wrote_logprobs = false;
        for (key, value) in body {
            match key.as_str() {
                "model" => map.serialize_entry(key, self.model)?,
                "logprobs" if self.add_logprobs => {
                    map.serialize_entry(key, &true)?;
                    wrote_logprobs = true;
                }
                "stream_options" if self.add_usage => {
                    let mut options = match value {
                        Value::Object(o) => o.clone(),
                        _ => Map::new(),
                    };
                    options.insert("include_usage".to_owned(), Value::Bool(true));
                    map.serialize_entry(key, &options)?;
                    wrote_options = true;
                }
                _ => map.serialize_entry(key, value)?,
            }
        }
        if self.add_usage && !wrote_options {
            map.serialize_entry(
                "stream_options",
                &serde_json::json!({"include_usage": true}),
            )?;
        }
        if self.add_logprobs && !wrote_logprobs {
            map.serialize_entry("logprobs", &true)?;
        }
        map.end()
    }
}

/// Characters of text in a message `content`: a string, or an array of parts with `text`.
fn content_chars(content: Option<&Value>) -> usize {
    content
        .into_iter()
        .flat_map(text_parts)
        .map(|s| s.chars().count())
        .fold(0usize, usize::saturating_add)
}

/// The generated text of a completion body or stream chunk: message or delta content, and
/// tool-call names and arguments (which are billed as output tokens too).
pub fn generated_text(json: &[u8], out: &mut String) {
    let Ok(value) = serde_json::from_slice::<Value>(json) else {
        return;
    };
    let choices = value.get("choices").and_then(Value::as_array);
    for choice in choices.into_iter().flatten() {
        let Some(message) = choice.get("message").or_else(|| choice.get("delta")) else {
            continue;
        };
        if let Some(content) = message.get("content") {
            for part in text_parts(content) {
                out.push_str(part);
            }
        }
        let calls = message.get("tool_calls").and_then(Value::as_array);
        for call in calls.into_iter().flatten() {
            let function = call.get("function");
            for key in ["name", "arguments"] {
                if let Some(t) = function.and_then(|f| f.get(key)).and_then(Value::as_str) {
                    out.push_str(t);
                }
            }
        }
    }
}

/// The text of a message `content`: the string itself, or the `text` of each array part
/// (image and audio parts have none). Size checks and the router read prompts through this.
pub fn text_parts(content: &Value) -> impl Iterator<Item = &str> {
    let (whole, parts) = match content {
        Value::String(s) => (Some(s.as_str()), None),
        Value::Array(parts) => (None, Some(parts)),
        _ => (None, None),
    };
    whole.into_iter().chain(
        parts
            .into_iter()
            .flatten()
            .filter_map(|p| p.get("text").and_then(Value::as_str)),
    )
}

/// "a string", "an array"...: how error messages name a JSON value's type.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn missing(param: &str, problem: &str) -> ApiError {
    ApiError::invalid_request(format!("`{param}` {problem}."))
        .with_param(param)
        .with_code("invalid_value")
}

fn wrong_type(param: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid_request(format!(
        "`{param}` must be {expected}, got {}.",
        type_name(got)
    ))
    .with_param(param)
    .with_code("invalid_type")
}

/// The parts of a streamed chunk the gateway needs, read without materialising the rest.
#[derive(Deserialize)]
pub(crate) struct ChunkPeek {
    #[serde(default)]
    pub choices: Option<Vec<serde::de::IgnoredAny>>,
    #[serde(default)]
    pub usage: Option<Usage>,
    #[serde(default)]
    pub error: Option<UpstreamError>,
}

/// An upstream's error object, wherever it appears (error body or stream chunk).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct UpstreamError {
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

/// Reads `{"error": {...}}` (OpenAI, vLLM) or `{"error": "text"}` (some local servers).
pub(crate) fn upstream_error_message(body: &[u8]) -> Option<UpstreamError> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Object(UpstreamError),
        Text(String),
    }
    #[derive(Deserialize)]
    struct Envelope {
        error: Either,
    }
    match serde_json::from_slice::<Envelope>(body).ok()?.error {
        Either::Object(e) => Some(e),
        Either::Text(message) => Some(UpstreamError {
            message: Some(message),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ChatRequest, ApiError> {
        ChatRequest::parse(&serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn keeps_unknown_fields_and_order_and_replaces_model() {
        let text = r#"{"temperature":0.2,"model":"auto","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f","parameters":{}}}],"x_vendor":{"a":[1,2]}}"#;
        let req = ChatRequest::parse(text.as_bytes()).unwrap();
        let out = String::from_utf8(req.upstream_body("llama", true, false)).unwrap();
        assert_eq!(out, text.replace("\"auto\"", "\"llama\""));
    }

    #[test]
    fn stream_usage_is_added_or_merged() {
        let req = parse(serde_json::json!({"model":"m","messages":[{"role":"user","content":"x"}],"stream":true})).unwrap();
        let out: Value = serde_json::from_slice(&req.upstream_body("u", true, false)).unwrap();
        assert_eq!(
            out["stream_options"],
            serde_json::json!({"include_usage": true})
        );
        let out: Value = serde_json::from_slice(&req.upstream_body("u", false, false)).unwrap();
        assert!(out.get("stream_options").is_none());

        let req = parse(serde_json::json!({"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":false,"other":1}})).unwrap();
        assert!(!req.include_usage);
        let out: Value = serde_json::from_slice(&req.upstream_body("u", true, false)).unwrap();
        assert_eq!(
            out["stream_options"],
            serde_json::json!({"include_usage": true, "other": 1})
        );
    }

    #[test]
    fn logprobs_are_validated_forced_and_stripped() {
        let base = || serde_json::json!({"model":"m","messages":[{"role":"user","content":"x"}]});
        let with = |k: &str, v: Value| {
            let mut b = base();
            b[k] = v;
            b
        };
        let e = parse({
            let mut b = with("logprobs", Value::Bool(true));
            b["top_logprobs"] = serde_json::json!(21);
            b
        })
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("top_logprobs"));
        assert!(e.message.contains("at most 20"), "{}", e.message);
        let e = parse(with("top_logprobs", serde_json::json!(2))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("top_logprobs"));
        let e = parse(with("logprobs", serde_json::json!("yes"))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("logprobs"));
        let ok = parse({
            let mut b = with("logprobs", Value::Bool(true));
            b["top_logprobs"] = serde_json::json!(20);
            b
        })
        .unwrap();
        assert!(ok.client_logprobs());

        // Forced for the guard: added when absent, set when false, untouched when asked.
        let req = parse(with("logprobs", Value::Bool(false))).unwrap();
        let out: Value = serde_json::from_slice(&req.upstream_body("u", true, true)).unwrap();
        assert_eq!(out["logprobs"], Value::Bool(true));
        let req = parse(base()).unwrap();
        let out: Value = serde_json::from_slice(&req.upstream_body("u", true, true)).unwrap();
        assert_eq!(out["logprobs"], Value::Bool(true));
        let out: Value = serde_json::from_slice(&req.upstream_body("u", true, false)).unwrap();
        assert!(out.get("logprobs").is_none());

        let body = br#"{"id":"x","choices":[{"index":0,"message":{"content":"hi"},"logprobs":{"content":[{"token":"h","logprob":-0.5,"bytes":[104],"top_logprobs":[]},{"token":"i","logprob":-1.25,"bytes":[105],"top_logprobs":[]}]},"finish_reason":"stop"}],"usage":null}"#;
        let peek = answer_peek(body);
        assert_eq!(peek.logprobs, Some(vec![-0.5, -1.25]));
        assert_eq!(peek.finish_reason.as_deref(), Some("stop"));
        let stripped = without_logprobs(body).unwrap();
        let v: Value = serde_json::from_slice(&stripped).unwrap();
        assert_eq!(v["choices"][0]["logprobs"], Value::Null);
        assert_eq!(v["choices"][0]["message"]["content"], "hi");
        assert_eq!(answer_peek(&stripped).logprobs, None);
        assert_eq!(answer_peek(b"not json").logprobs, None);
    }

    #[test]
    fn counts_text_in_string_and_part_contents() {
        let req = parse(serde_json::json!({"model":"m","messages":[
            {"role":"system","content":"abc"},
            {"role":"user","content":[{"type":"text","text":"de"},{"type":"image_url","image_url":{"url":"x"}}]},
            {"role":"assistant","content":null,"tool_calls":[]}
        ]})).unwrap();
        assert_eq!(req.prompt_chars, 5);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (serde_json::json!([1]), None),
            (
                serde_json::json!({"messages":[{"role":"user","content":"x"}]}),
                Some("model"),
            ),
            (serde_json::json!({"model":3,"messages":[]}), Some("model")),
            (serde_json::json!({"model":"m"}), Some("messages")),
            (
                serde_json::json!({"model":"m","messages":{}}),
                Some("messages"),
            ),
            (
                serde_json::json!({"model":"m","messages":[]}),
                Some("messages"),
            ),
            (
                serde_json::json!({"model":"m","messages":["hi"]}),
                Some("messages[0]"),
            ),
            (
                serde_json::json!({"model":"m","messages":[{"content":"x"}]}),
                Some("messages[0].role"),
            ),
            (
                serde_json::json!({"model":"m","messages":[{"role":"user","content":"x"},{"role":"wizard","content":"x"}]}),
                Some("messages[1].role"),
            ),
            (
                serde_json::json!({"model":"m","messages":[{"role":"User","content":"x"}]}),
                Some("messages[0].role"),
            ),
            (
                serde_json::json!({"model":"m","messages":[{"role":"user"}],"stream":"yes"}),
                Some("stream"),
            ),
            (
                serde_json::json!({"model":"m","messages":[{"role":"user"}],"stream_options":{"include_usage":1}}),
                Some("stream_options.include_usage"),
            ),
        ];
        for (body, param) in cases {
            let e = parse(body.clone()).expect_err(&body.to_string());
            assert_eq!(e.status.as_u16(), 400);
            assert_eq!(e.param.as_deref(), param, "{body}");
            if let Some(p) = param {
                assert!(e.message.contains(p), "{}", e.message);
            }
        }
        let e = ChatRequest::parse(b"{\"model\": \"m\",").unwrap_err();
        assert_eq!(e.code.as_deref(), Some("invalid_json"));
        let e = ChatRequest::parse(b"\xff\xfe").unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":{deep}}}]}}"#);
        assert_eq!(
            ChatRequest::parse(body.as_bytes())
                .unwrap_err()
                .status
                .as_u16(),
            400
        );
    }

    #[test]
    fn reads_both_upstream_error_shapes() {
        let e = upstream_error_message(
            br#"{"error":{"message":"slow down","type":"rate_limit_error","code":"rl"}}"#,
        )
        .unwrap();
        assert_eq!(e.message.as_deref(), Some("slow down"));
        assert_eq!(e.kind.as_deref(), Some("rate_limit_error"));
        let e = upstream_error_message(br#"{"error":"model not loaded"}"#).unwrap();
        assert_eq!(e.message.as_deref(), Some("model not loaded"));
        assert!(upstream_error_message(b"<html>").is_none());
    }
}
