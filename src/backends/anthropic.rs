//! Anthropic's Messages API as a backend protocol (`kind = "anthropic"`): the pipeline's chat
//! request written as a Messages request, and the Messages answer (whole, or its event stream)
//! read back as a chat completion, so every endpoint can use Claude as its cloud. The HTTP
//! exchange itself (timeouts, caps, retries, breakers) is [`super::openai`]'s, shared by both.

use std::collections::VecDeque;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::{BackendError, Chunk};
use crate::wire::native::{usage_in, NativeApi};
use crate::wire::{text_parts, ChatRequest, Usage};

/// The `anthropic-version` header sent when the config names none: the version Anthropic's
/// API reference documents as current (docs.anthropic.com/en/api/versioning).
pub const DEFAULT_VERSION: &str = "2023-06-01";

/// `max_tokens` when a chat request sets none: Anthropic requires one, chat does not. 4,096 is
/// the output ceiling Anthropic documents for Claude 3 Haiku, the smallest current output limit
/// of its models (docs.anthropic.com/en/docs/about-claude/models), so it is valid for all.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

fn unsupported(detail: String) -> BackendError {
    BackendError::Unsupported { detail }
}

/// The Messages request body for a chat request. Chat fields with no Messages equivalent
/// (tools, `response_format`, `n` > 1, log-probabilities, penalties, seeds) are refused by name
/// rather than dropped, so the client never gets an answer to a different question.
pub fn request_body(request: &ChatRequest, model: &str) -> Result<Vec<u8>, BackendError> {
    let body = request.body();
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert(
        "max_tokens".into(),
        json!(request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
    );
    let mut system = String::new();
    let mut messages = Vec::new();
    for (key, value) in body {
        match key.as_str() {
            "model" | "max_tokens" | "max_completion_tokens" | "stream_options" | "messages" => {}
            "temperature" | "top_p" if value.is_number() => {
                out.insert(key.clone(), value.clone());
            }
            "stop" => match value {
                Value::String(s) => {
                    out.insert("stop_sequences".into(), json!([s]));
                }
                Value::Array(_) => {
                    out.insert("stop_sequences".into(), value.clone());
                }
                Value::Null => {}
                _ => return Err(unsupported("`stop` must be a string or an array".into())),
            },
            "stream" => {
                out.insert("stream".into(), json!(request.stream));
            }
            "user" if value.is_string() => {
                out.insert("metadata".into(), json!({"user_id": value}));
            }
            "n" if value == 1 => {}
            "logprobs" if value == false => {}
            _ if value.is_null() => {}
            other => {
                return Err(unsupported(format!(
                    "`{}` has no equivalent in Anthropic's Messages API (this backend's protocol)",
                    other.chars().take(40).collect::<String>()
                )))
            }
        }
    }
    for (i, m) in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        let content = m.get("content").unwrap_or(&Value::Null);
        match role {
            "system" | "developer" => {
                for part in text_parts(content) {
                    if !system.is_empty() {
                        system.push('\n');
                    }
                    system.push_str(part);
                }
            }
            "user" | "assistant" => messages.push(json!({"role": role, "content": blocks(i, content)?})),
            other => {
                return Err(unsupported(format!(
                    "messages[{i}] has role `{other}`: tool results are not translated to Anthropic's Messages API"
                )))
            }
        }
    }
    if !system.is_empty() {
        out.insert("system".into(), json!(system));
    }
    out.insert("messages".into(), Value::Array(messages));
    Ok(serde_json::to_vec(&out).unwrap_or_default())
}

/// A chat message `content` as Messages content: a string stays one; text parts become text
/// blocks and `image_url` parts image blocks (base64 for data URLs, else by URL).
fn blocks(i: usize, content: &Value) -> Result<Value, BackendError> {
    let Value::Array(parts) = content else {
        return Ok(json!(content.as_str().unwrap_or_default()));
    };
    let mut out = Vec::with_capacity(parts.len());
    for part in parts {
        match part.get("type").and_then(Value::as_str) {
            Some("text") => out.push(json!({"type": "text", "text": part.get("text").and_then(Value::as_str).unwrap_or_default()})),
            Some("image_url") => {
                let url = part
                    .get("image_url")
                    .and_then(|u| u.get("url"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let source = match url.strip_prefix("data:").and_then(|r| r.split_once(";base64,")) {
                    Some((media, data)) => json!({"type": "base64", "media_type": media, "data": data}),
                    None => json!({"type": "url", "url": url}),
                };
                out.push(json!({"type": "image", "source": source}));
            }
            other => {
                return Err(unsupported(format!(
                    "messages[{i}] has a `{}` part, which Anthropic's Messages API does not take",
                    other.unwrap_or("untyped")
                )))
            }
        }
    }
    Ok(Value::Array(out))
}

/// Chat's `finish_reason` for a Messages `stop_reason`.
fn finish_reason(stop: Option<&str>) -> &'static str {
    match stop {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

/// Seconds since the Unix epoch (the `created` fields).
fn now_s() -> u64 {
    crate::ledger::now_us() / 1_000_000
}

fn protocol(detail: String) -> BackendError {
    BackendError::Protocol { detail }
}

/// Input tokens as Anthropic counts them: uncached plus cache reads and writes, all of which
/// the prompt was.
fn input_tokens(usage: &Value) -> u64 {
    usage_in(NativeApi::Messages, Some(usage)).map_or(0, |u| u.prompt_tokens)
}

/// A whole Messages answer as a chat completion body.
pub fn completion(body: &[u8]) -> Result<Bytes, BackendError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| protocol(format!("the Messages answer is not JSON ({e})")))?;
    let Some(content) = v.get("content").and_then(Value::as_array) else {
        return Err(protocol("the Messages answer has no `content`".into()));
    };
    let text: String = content
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect();
    let usage = v.get("usage").unwrap_or(&Value::Null);
    let (input, output) = (
        input_tokens(usage),
        usage
            .get("output_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    );
    let chat = json!({
        "id": format!("chatcmpl-{}", v.get("id").and_then(Value::as_str).unwrap_or_default()),
        "object": "chat.completion",
        "created": now_s(),
        "model": v.get("model").and_then(Value::as_str).unwrap_or_default(),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason(v.get("stop_reason").and_then(Value::as_str))}],
        "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output},
    });
    Ok(Bytes::from(serde_json::to_vec(&chat).unwrap_or_default()))
}

/// Reads a Messages event stream as chat chunks: `message_start` is the role chunk,
/// `content_block_delta` text chunks, `message_delta` the finish chunk and then the usage-only
/// chunk, `message_stop` the end; an `error` event an in-band error chunk that ends it.
#[derive(Default)]
pub struct StreamReader {
    id: String,
    model: String,
    created: u64,
    input_tokens: u64,
    pending: VecDeque<Chunk>,
    done: bool,
}

impl StreamReader {
    /// The next chunk the events read so far produced.
    pub fn pop(&mut self) -> Option<Chunk> {
        self.pending.pop_front()
    }

    /// True after `message_stop` (or an `error` event), once every chunk was popped.
    pub fn finished(&self) -> bool {
        self.done && self.pending.is_empty()
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        let chunk = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        Bytes::from(serde_json::to_vec(&chunk).unwrap_or_default())
    }

    /// Reads one event (`name` may be empty: the type is also in the data).
    pub fn event(&mut self, name: &str, data: &str) -> Result<(), String> {
        let v: Value = serde_json::from_str(data).map_err(|e| {
            format!(
                "Messages event is not JSON ({e}): {}",
                super::openai::truncate(data, 200)
            )
        })?;
        let kind = v
            .get("type")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .unwrap_or(name);
        match kind {
            "message_start" => {
                let m = v.get("message").unwrap_or(&Value::Null);
                self.id = format!(
                    "chatcmpl-{}",
                    m.get("id").and_then(Value::as_str).unwrap_or_default()
                );
                self.model = m
                    .get("model")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                self.created = now_s();
                self.input_tokens = input_tokens(m.get("usage").unwrap_or(&Value::Null));
                let data = self.chunk(json!({"role": "assistant", "content": ""}), None);
                self.pending.push_back(Chunk::new(data));
            }
            "content_block_delta" => {
                let delta = v.get("delta").unwrap_or(&Value::Null);
                if let Some(text) = delta
                    .get("text")
                    .and_then(Value::as_str)
                    .filter(|_| delta.get("type").and_then(Value::as_str) == Some("text_delta"))
                {
                    let data = self.chunk(json!({"content": text}), None);
                    self.pending.push_back(Chunk::new(data));
                }
            }
            "message_delta" => {
                let stop = v
                    .get("delta")
                    .and_then(|d| d.get("stop_reason"))
                    .and_then(Value::as_str);
                let data = self.chunk(json!({}), Some(finish_reason(stop)));
                self.pending.push_back(Chunk::new(data));
                let usage = v.get("usage").unwrap_or(&Value::Null);
                let input = match input_tokens(usage) {
                    0 => self.input_tokens,
                    n => n,
                };
                let usage = Usage {
                    prompt_tokens: input,
                    completion_tokens: usage
                        .get("output_tokens")
                        .and_then(Value::as_u64)
                        .unwrap_or(0),
                    total_tokens: 0,
                };
                let usage = Usage {
                    total_tokens: usage.prompt_tokens + usage.completion_tokens,
                    ..usage
                };
                let chunk = json!({"id": self.id, "object": "chat.completion.chunk",
                    "created": self.created, "model": self.model, "choices": [], "usage": usage});
                self.pending.push_back(Chunk {
                    data: Bytes::from(serde_json::to_vec(&chunk).unwrap_or_default()),
                    usage: Some(usage),
                    usage_only: true,
                    is_error: false,
                    logprobs: None,
                });
            }
            "message_stop" => self.done = true,
            "error" => {
                let e = v.get("error").unwrap_or(&Value::Null);
                let chunk = json!({"error": {
                    "message": e.get("message").and_then(Value::as_str).unwrap_or("(no message)"),
                    "type": e.get("type").and_then(Value::as_str).unwrap_or("api_error"),
                    "param": null, "code": "upstream_stream_error"}});
                self.pending.push_back(Chunk {
                    is_error: true,
                    ..Chunk::new(Bytes::from(serde_json::to_vec(&chunk).unwrap_or_default()))
                });
                self.done = true;
            }
            // `ping`, `content_block_start`/`stop` (text blocks start empty) and event types
            // added later carry nothing a chat chunk has.
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> ChatRequest {
        ChatRequest::parse(&serde_json::to_vec(&body).unwrap()).unwrap()
    }

    #[test]
    fn a_chat_request_becomes_a_messages_request() {
        let r = request(
            json!({"model": "auto", "stream": true, "stop": "END", "temperature": 0.5,
            "stream_options": {"include_usage": true}, "user": "u",
            "messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]}),
        );
        let body: Value = serde_json::from_slice(&request_body(&r, "claude-x").unwrap()).unwrap();
        assert_eq!(
            body,
            json!({"model": "claude-x", "max_tokens": 4096, "stream": true,
                "stop_sequences": ["END"], "temperature": 0.5, "metadata": {"user_id": "u"},
                "system": "Be brief.",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]})
        );
        let tools = request(
            json!({"model": "auto", "tools": [], "messages": [{"role": "user", "content": "x"}]}),
        );
        let e = request_body(&tools, "m").unwrap_err();
        assert!(e.to_string().contains("`tools`"), "{e}");
    }

    #[test]
    fn an_event_stream_reads_as_chat_chunks_with_usage() {
        let mut s = StreamReader::default();
        for (name, data) in [
            (
                "message_start",
                r#"{"type":"message_start","message":{"id":"msg_1","model":"claude-x","usage":{"input_tokens":7,"output_tokens":1}}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            ),
            ("ping", r#"{"type":"ping"}"#),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            ),
            (
                "content_block_stop",
                r#"{"type":"content_block_stop","index":0}"#,
            ),
            (
                "message_delta",
                r#"{"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":2}}"#,
            ),
            ("message_stop", r#"{"type":"message_stop"}"#),
        ] {
            s.event(name, data).unwrap();
        }
        let chunks: Vec<Chunk> = std::iter::from_fn(|| s.pop()).collect();
        assert!(s.finished());
        assert_eq!(chunks.len(), 4);
        let v: Value = serde_json::from_slice(&chunks[1].data).unwrap();
        assert_eq!(v["choices"][0]["delta"]["content"], "Hi");
        let v: Value = serde_json::from_slice(&chunks[2].data).unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert!(chunks[3].usage_only);
        assert_eq!(
            chunks[3].usage,
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 2,
                total_tokens: 9
            })
        );
    }

    #[test]
    fn a_whole_answer_reads_as_a_completion() {
        let body = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-x","content":[{"type":"text","text":"Hello"}],"stop_reason":"end_turn","usage":{"input_tokens":5,"cache_read_input_tokens":2,"output_tokens":1}}"#;
        let v: Value = serde_json::from_slice(&completion(body).unwrap()).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "Hello");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["prompt_tokens"], 7);
        assert!(completion(br#"{"type":"message"}"#).is_err());
    }
}
