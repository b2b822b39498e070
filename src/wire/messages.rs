//! Anthropic's Messages API (`POST /v1/messages`) at the edge: a Messages request becomes the chat
//! request the pipeline serves, and the chat answer becomes a Messages answer (whole, or as
//! Anthropic's event stream), with errors in Anthropic's shape.
//!
//! Translated: `model`, `max_tokens` (required, as Anthropic requires it), `messages` with text
//! and image blocks, `system` (a string or text blocks), `stop_sequences`, `temperature`,
//! `top_p`, `metadata.user_id` (as the chat `user`), `stream`. Refused with a 400 naming the
//! field: what a chat backend has no equivalent for (`top_k`), and tools and extended thinking,
//! which this edge does not translate.

use bytes::Bytes;
use serde_json::{json, Value};

use super::edge::{self, ChatAnswer, ChunkParts, Object, StreamEdge};
use super::Usage;
use crate::error::ApiError;

/// A Messages request, translated.
#[derive(Debug)]
pub struct Translated {
    /// The chat-completions body the pipeline serves.
    pub chat: Vec<u8>,
    /// Whether the client asked for a stream.
    pub stream: bool,
}

/// Fields Anthropic defines that this edge does not translate, and why.
const REFUSED: [(&str, &str); 7] = [
    (
        "top_k",
        "the chat backends behind the gateway take no top_k; use temperature or top_p",
    ),
    ("tools", "tool use is not translated by this gateway yet"),
    (
        "tool_choice",
        "tool use is not translated by this gateway yet",
    ),
    (
        "thinking",
        "extended thinking is not translated by this gateway yet",
    ),
    ("container", "containers are Anthropic-hosted"),
    ("mcp_servers", "MCP servers are Anthropic-hosted"),
    (
        "context_management",
        "context management is Anthropic-hosted",
    ),
];

/// Accepted and not forwarded: they ask nothing of the model.
const IGNORED: [&str; 1] = ["service_tier"];

/// Translates a Messages request body into a chat-completions body.
pub fn to_chat(bytes: &[u8]) -> Result<Translated, ApiError> {
    let body = edge::object(bytes)?;
    let mut chat = Object::new();
    let mut messages = Vec::new();
    let mut stream = false;
    for (key, value) in &body {
        match key.as_str() {
            "model" => {
                chat.insert("model".into(), value.clone());
            }
            "max_tokens" => match value.as_u64() {
                Some(n) if n > 0 => {
                    chat.insert("max_tokens".into(), json!(n));
                }
                _ => {
                    return Err(ApiError::invalid_request(
                        "`max_tokens` must be a positive integer.",
                    )
                    .with_param("max_tokens")
                    .with_code("invalid_value"))
                }
            },
            "system" => messages.push(json!({"role": "system", "content": system_text(value)?})),
            "messages" => {}
            "stop_sequences" => {
                let Some(list) = value.as_array().filter(|l| l.iter().all(Value::is_string)) else {
                    return Err(edge::wrong(key, "an array of strings", value));
                };
                if !list.is_empty() {
                    chat.insert("stop".into(), value.clone());
                }
            }
            "temperature" | "top_p" => {
                if !value.is_number() {
                    return Err(edge::wrong(key, "a number", value));
                }
                chat.insert(key.clone(), value.clone());
            }
            "stream" => {
                stream = value
                    .as_bool()
                    .ok_or_else(|| edge::wrong("stream", "a boolean", value))?;
            }
            "metadata" => {
                let Some(meta) = value.as_object() else {
                    return Err(edge::wrong("metadata", "an object", value));
                };
                match meta.get("user_id") {
                    None | Some(Value::Null) => {}
                    Some(Value::String(u)) => {
                        chat.insert("user".into(), json!(u));
                    }
                    Some(other) => return Err(edge::wrong("metadata.user_id", "a string", other)),
                }
            }
            k if IGNORED.contains(&k) => {}
            k => {
                return Err(match REFUSED.iter().find(|(name, _)| *name == k) {
                    Some((name, why)) => edge::unsupported(name, why),
                    None => edge::unknown(k, "Messages API"),
                })
            }
        }
    }
    edge::require_model(&body)?;
    if !body.contains_key("max_tokens") {
        return Err(edge::required("max_tokens", "is required"));
    }
    match body.get("messages") {
        Some(Value::Array(list)) if !list.is_empty() => {
            for (i, m) in list.iter().enumerate() {
                messages.push(message(i, m)?);
            }
        }
        Some(Value::Array(_)) => {
            return Err(edge::required(
                "messages",
                "must contain at least one message",
            ))
        }
        Some(other) => return Err(edge::wrong("messages", "an array", other)),
        None => return Err(edge::required("messages", "is required")),
    }
    Ok(Translated {
        chat: edge::chat_body(chat, messages, stream),
        stream,
    })
}

fn system_text(value: &Value) -> Result<String, ApiError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut text = String::new();
            for (j, block) in blocks.iter().enumerate() {
                let param = format!("system[{j}]");
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => match block.get("text") {
                        Some(Value::String(t)) => {
                            if !text.is_empty() {
                                text.push('\n');
                            }
                            text.push_str(t);
                        }
                        other => {
                            return Err(edge::wrong(
                                &format!("{param}.text"),
                                "a string",
                                other.unwrap_or(&Value::Null),
                            ))
                        }
                    },
                    _ => {
                        return Err(ApiError::invalid_request(format!(
                        "`{param}` must be a text block (`{{\"type\": \"text\", \"text\": ...}}`)."
                    ))
                        .with_param(&param)
                        .with_code("invalid_value"))
                    }
                }
            }
            Ok(text)
        }
        other => Err(edge::wrong(
            "system",
            "a string or an array of text blocks",
            other,
        )),
    }
}

fn message(i: usize, m: &Value) -> Result<Value, ApiError> {
    let param = format!("messages[{i}]");
    let Some(m) = m.as_object() else {
        return Err(edge::wrong(&param, "an object", m));
    };
    let role = match m.get("role").and_then(Value::as_str) {
        Some(r @ ("user" | "assistant")) => r,
        _ => {
            return Err(ApiError::invalid_request(format!(
                "`{param}.role` must be \"user\" or \"assistant\" (a system prompt goes in the top-level `system`)."
            ))
            .with_param(&format!("{param}.role"))
            .with_code("invalid_value"))
        }
    };
    let content = edge::content(&param, m.get("content"), "content blocks", content_block)?;
    Ok(json!({"role": role, "content": content}))
}

/// A text block as a chat text part; an image block as a chat `image_url` part (a data URL for
/// base64 sources), which only image-capable backends (the cloud) are routed.
fn content_block(param: &str, block: &Value) -> Result<Value, ApiError> {
    let kind = block.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => edge::text_part(param, block),
        Some("image") => {
            let source = block.get("source");
            let field = |k: &str| source.and_then(|s| s.get(k)).and_then(Value::as_str);
            let url = match field("type") {
                Some("base64") => match (field("media_type"), field("data")) {
                    (Some(media), Some(data)) => format!("data:{media};base64,{data}"),
                    _ => {
                        return Err(edge::required(
                            &format!("{param}.source"),
                            "needs `media_type` and `data` for a base64 image",
                        ))
                    }
                },
                Some("url") => match field("url") {
                    Some(u) => u.to_owned(),
                    None => {
                        return Err(edge::required(
                            &format!("{param}.source.url"),
                            "is required",
                        ))
                    }
                },
                _ => {
                    return Err(ApiError::invalid_request(format!(
                        "`{param}.source.type` must be \"base64\" or \"url\"."
                    ))
                    .with_param(&format!("{param}.source.type"))
                    .with_code("invalid_value"))
                }
            };
            Ok(json!({"type": "image_url", "image_url": {"url": url}}))
        }
        Some(
            other @ ("tool_use" | "tool_result" | "document" | "thinking" | "redacted_thinking"
            | "search_result"),
        ) => Err(edge::unsupported(
            &format!("{param}.type"),
            &format!("`{other}` blocks are not translated by this gateway yet"),
        )),
        _ => Err(ApiError::invalid_request(format!(
            "`{param}.type` must be \"text\" or \"image\"."
        ))
        .with_param(&format!("{param}.type"))
        .with_code("invalid_value")),
    }
}

/// Anthropic's `stop_reason` for a chat `finish_reason`. A chat answer does not say whether it
/// ended on a stop sequence or on its own, so both are `end_turn`.
fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

fn usage_json(usage: Option<Usage>) -> Value {
    let u = usage.unwrap_or_default();
    json!({"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens})
}

/// A whole chat completion as a Messages answer.
pub fn answer(completion: &[u8], id: &str) -> Result<Bytes, ApiError> {
    let a = ChatAnswer::read(completion)?;
    let body = json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": a.model,
        "content": [{"type": "text", "text": a.text}],
        "stop_reason": stop_reason(a.finish_reason.as_deref()),
        "stop_sequence": null,
        "usage": usage_json(a.usage),
    });
    Ok(Bytes::from(serde_json::to_vec(&body).unwrap_or_default()))
}

/// Anthropic's error `type` for an HTTP status (its errors reference).
pub fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// An error in Anthropic's shape: `{"type":"error","error":{"type","message"}}`.
fn error_value(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// [`error_value`] as bytes.
pub fn error_body(kind: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&error_value(kind, message)).unwrap_or_default()
}

/// Rewrites a body in the gateway's OpenAI error shape into Anthropic's, keeping the message
/// (and the machine-readable code in it, since Anthropic's shape has no field for one).
pub fn rewrite_error(status: u16, openai: &[u8]) -> Vec<u8> {
    let value: Value = serde_json::from_slice(openai).unwrap_or(Value::Null);
    let (message, _, code) = edge::error_parts(&value);
    let message = match (message.is_empty(), code.is_empty()) {
        (true, _) => format!("HTTP {status}"),
        (false, true) => message,
        (false, false) => format!("{message} (code: {code})"),
    };
    error_body(error_type(status), &message)
}

/// The gateway's `{"error": {...}}` frame as Anthropic's `error` event, the code kept in the
/// message.
pub fn write_error_event(error: &Value, out: &mut Vec<u8>) {
    let (message, kind, code) = edge::error_parts(error);
    let kind = match kind.as_str() {
        "rate_limit_error" => "rate_limit_error",
        "invalid_request_error" => "invalid_request_error",
        _ if code == "upstream_timeout" => "timeout_error",
        _ => "api_error",
    };
    let message = if code.is_empty() {
        message
    } else {
        format!("{message} (code: {code})")
    };
    edge::write_event(out, "error", &error_value(kind, &message));
}

/// The Messages event stream for one answer: `message_start`, one text block (`content_block_*`,
/// with a `ping` after its start), `message_delta` with the stop reason and usage, `message_stop`;
/// a failure after the start is an `error` event. Input tokens are known only at the end (the
/// usage chunk), so `message_start` carries 0 and `message_delta` the real count.
pub struct MessagesStream {
    id: String,
    started: bool,
    finish: Option<String>,
    usage: Option<Usage>,
}

impl MessagesStream {
    /// A stream for the message `id`.
    pub fn new(id: String) -> Self {
        Self {
            id,
            started: false,
            finish: None,
            usage: None,
        }
    }

    fn start(&mut self, model: &str, out: &mut Vec<u8>) {
        self.started = true;
        edge::write_event(
            out,
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }}),
        );
        edge::write_event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        );
        edge::write_event(out, "ping", &json!({"type": "ping"}));
    }
}

impl StreamEdge for MessagesStream {
    fn chunk(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        let parts = ChunkParts::of(chunk);
        if !self.started {
            self.start(parts.model.unwrap_or_default(), out);
        }
        if let Some(text) = parts.text {
            edge::write_event(
                out,
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
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
        write_error_event(error, out);
    }

    fn done(&mut self, out: &mut Vec<u8>) {
        if !self.started {
            self.start("", out);
        }
        edge::write_event(
            out,
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        );
        let usage = self.usage.unwrap_or_default();
        edge::write_event(
            out,
            "message_delta",
            &json!({"type": "message_delta",
                "delta": {"stop_reason": stop_reason(self.finish.as_deref()), "stop_sequence": null},
                "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}}),
        );
        edge::write_event(out, "message_stop", &json!({"type": "message_stop"}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Value, ApiError> {
        let t = to_chat(&serde_json::to_vec(&body).unwrap())?;
        Ok(serde_json::from_slice(&t.chat).unwrap())
    }

    #[test]
    fn a_request_translates_field_by_field() {
        let c = chat(json!({
            "model": "auto", "max_tokens": 64, "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hi"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Again"}],
            "stop_sequences": ["END"], "temperature": 0.2, "metadata": {"user_id": "u1"},
            "stream": true}))
        .unwrap();
        assert_eq!(
            c,
            json!({"model": "auto", "max_tokens": 64, "stop": ["END"], "temperature": 0.2,
                "user": "u1",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Again"}],
                "stream": true, "stream_options": {"include_usage": true}})
        );
    }

    #[test]
    fn what_is_not_translated_is_refused_by_name() {
        let base = json!({"model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]});
        for (field, value) in [
            ("tools", json!([])),
            ("top_k", json!(5)),
            ("thinking", json!({})),
            ("bogus", json!(1)),
        ] {
            let mut b = base.clone();
            b[field] = value;
            let e = chat(b).unwrap_err();
            assert_eq!(e.status.as_u16(), 400);
            assert_eq!(e.param.as_deref(), Some(field), "{e}");
        }
        let e = chat(json!({"model": "auto", "messages": [{"role": "user", "content": "x"}]}))
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = chat(json!({"model": "auto", "max_tokens": 8, "messages": [{"role": "system", "content": "x"}]}))
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = chat(json!({"model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}))
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].type"));
    }

    #[test]
    fn errors_take_anthropics_shape_and_type() {
        let openai = br#"{"error":{"message":"No key.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        let v: Value = serde_json::from_slice(&rewrite_error(401, openai)).unwrap();
        assert_eq!(
            v,
            json!({"type": "error", "error": {"type": "authentication_error", "message": "No key. (code: invalid_api_key)"}})
        );
        assert_eq!(error_type(529), "overloaded_error");
        assert_eq!(error_type(422), "invalid_request_error");
        assert_eq!(error_type(502), "api_error");
    }
}
