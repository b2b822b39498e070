//! Requests passed through in the API they came in. A `/v1/responses` or `/v1/messages` request
//! the edge cannot translate into chat (tools, reasoning, extended thinking, tool-call items) is
//! still served when a backend speaks that API natively (`kind = "anthropic"` for Messages,
//! `api = "responses"` on an OpenAI backend for Responses): the client's body goes to it as it
//! came, with only `model` replaced, and its answer comes back as the upstream wrote it.
//!
//! Such a request still goes through the pipeline, as a chat *view* of it: the text of its
//! messages, its model, output cap and stream flag. The router routes by the view (and sends it
//! to the cloud, reason `needs_native_api`, since a local backend would need a translation),
//! limits and the ledger count it, and the meter reads the native answer's own usage. Breakers,
//! retries and deadlines are the chat path's, unchanged.

use serde_json::{json, Value};

use super::edge::{self, Object, StreamEdge};
use super::responses::Conversations;
use super::Usage;
use crate::error::ApiError;

/// An API a backend may speak natively besides chat completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NativeApi {
    /// OpenAI's Responses API (`{base_url}/responses`).
    Responses,
    /// Anthropic's Messages API (`{base_url}/messages`).
    Messages,
}

impl NativeApi {
    /// The API's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            NativeApi::Responses => "Responses",
            NativeApi::Messages => "Messages",
        }
    }
}

/// A request as its client sent it, for a backend that speaks its API.
#[derive(Debug)]
pub struct Native {
    /// The API it came in.
    pub api: NativeApi,
    /// Why it could not be translated (the edge's 400 message), for a backend that cannot serve it.
    pub why: String,
    body: Object,
}

/// Whether a translation error means "this needs the API natively" rather than "this is wrong":
/// a field the edge does not translate, one it does not know (the upstream knows its own API
/// better), or, for Responses, a `previous_response_id` the gateway did not issue (the upstream
/// may have: a conversation that began natively continues there).
pub fn needs_native(e: &ApiError) -> bool {
    matches!(
        e.code.as_deref(),
        Some("unsupported_parameter" | "unknown_parameter" | "previous_response_not_found")
    )
}

impl Native {
    /// A Messages request, passed through.
    pub fn messages(body: &[u8], why: String) -> Result<Self, ApiError> {
        Ok(Self {
            api: NativeApi::Messages,
            why,
            body: edge::object(body)?,
        })
    }

    /// A Responses request, passed through. A `previous_response_id` the gateway issued is
    /// replaced by the conversation it names, as input items, since the upstream never saw it.
    pub fn responses(
        body: &[u8],
        why: String,
        conversations: &Conversations,
    ) -> Result<Self, ApiError> {
        let mut body = edge::object(body)?;
        let stored = body
            .get("previous_response_id")
            .and_then(Value::as_str)
            .and_then(|id| conversations.get(id));
        if let Some(history) = stored {
            let mut input: Vec<Value> = history.iter().map(input_item).collect();
            match body.remove("input") {
                Some(Value::String(s)) => input.push(json!({"role": "user", "content": s})),
                Some(Value::Array(items)) => input.extend(items),
                Some(other) => input.push(other),
                None => {}
            }
            body.insert("input".into(), Value::Array(input));
            body.remove("previous_response_id");
        }
        Ok(Self {
            api: NativeApi::Responses,
            why,
            body,
        })
    }

    /// Whether the client asked for a stream.
    pub fn stream(&self) -> bool {
        self.body.get("stream").and_then(Value::as_bool) == Some(true)
    }

    /// The body for an upstream whose model is `model`.
    pub fn upstream_body(&self, model: &str) -> Vec<u8> {
        let mut body = self.body.clone();
        body.insert("model".into(), json!(model));
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// The chat view the pipeline routes and meters: the text of every turn, the model, the
    /// output cap and the stream flag (with usage asked for, so that nothing in the native
    /// events is taken for a usage chunk to strip).
    pub fn view(&self) -> Vec<u8> {
        let body = &self.body;
        let mut messages = Vec::new();
        let (system, turns, cap) = match self.api {
            NativeApi::Messages => ("system", "messages", "max_tokens"),
            NativeApi::Responses => ("instructions", "input", "max_output_tokens"),
        };
        if let Some(s) = body.get(system) {
            messages.push(json!({"role": "system", "content": text_of(s)}));
        }
        match body.get(turns) {
            Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
            Some(Value::Array(items)) => {
                for item in items {
                    let role = match item.get("role").and_then(Value::as_str) {
                        Some(r @ ("system" | "developer" | "assistant")) => r,
                        _ if item.get("type").and_then(Value::as_str) == Some("function_call") => {
                            "assistant"
                        }
                        _ => "user",
                    };
                    messages.push(json!({"role": role, "content": text_of(item)}));
                }
            }
            _ => {}
        }
        if messages.is_empty() {
            messages.push(json!({"role": "user", "content": ""}));
        }
        let mut chat = Object::new();
        chat.insert(
            "model".into(),
            body.get("model").cloned().unwrap_or(Value::Null),
        );
        if let Some(n) = body.get(cap).and_then(Value::as_u64).filter(|n| *n > 0) {
            chat.insert("max_tokens".into(), json!(n));
        }
        let stream = self.stream();
        if stream {
            chat.insert("stream_options".into(), json!({"include_usage": true}));
        }
        edge::chat_body(chat, messages, stream)
    }
}

/// Every string under `value` that is text a model reads: `text`, `content`, tool inputs and
/// outputs, arguments. Cheap and approximate: it sizes and routes the request, nothing more.
fn text_of(value: &Value) -> String {
    fn walk(value: &Value, key: Option<&str>, out: &mut String) {
        match value {
            Value::String(s) if key.is_none_or(is_text_key) => {
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(s);
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, key, out)),
            Value::Object(map) => {
                for (k, v) in map {
                    if k == "input" && v.is_object() {
                        // A tool call's input: its JSON is what the model wrote.
                        if !out.is_empty() {
                            out.push('\n');
                        }
                        out.push_str(&v.to_string());
                    } else {
                        walk(v, Some(k), out);
                    }
                }
            }
            _ => {}
        }
    }
    fn is_text_key(k: &str) -> bool {
        matches!(
            k,
            "text" | "content" | "output" | "arguments" | "thinking" | "input"
        )
    }
    let mut out = String::new();
    walk(value, None, &mut out);
    out
}

/// A stored chat message as a Responses input item.
fn input_item(message: &Value) -> Value {
    let role = message.get("role").cloned().unwrap_or(json!("user"));
    let content = match message.get("content") {
        Some(Value::Array(parts)) => Value::Array(
            parts
                .iter()
                .map(|p| match p.get("type").and_then(Value::as_str) {
                    Some("image_url") => {
                        let image = p.get("image_url").cloned().unwrap_or(Value::Null);
                        let mut part = json!({"type": "input_image",
                            "image_url": image.get("url").cloned().unwrap_or(Value::Null)});
                        if let Some(d) = image.get("detail") {
                            part["detail"] = d.clone();
                        }
                        part
                    }
                    _ => json!({"type": "input_text",
                        "text": p.get("text").cloned().unwrap_or(json!(""))}),
                })
                .collect(),
        ),
        Some(other) => other.clone(),
        None => json!(""),
    };
    json!({"role": role, "content": content})
}

/// The usage of a whole native answer (the upstream's JSON, checked to be an object).
pub fn whole_usage(api: NativeApi, body: &[u8]) -> Result<Option<Usage>, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the answer is not JSON: {e}"))?;
    if !value.is_object() {
        return Err("the answer is not a JSON object".to_owned());
    }
    Ok(usage_in(api, value.get("usage")))
}

/// Token counts in a native `usage` object: Responses' `input_tokens`/`output_tokens`, or
/// Anthropic's, whose input counts cache reads and writes separately.
pub fn usage_in(api: NativeApi, usage: Option<&Value>) -> Option<Usage> {
    let usage = usage.filter(|u| u.is_object())?;
    let n = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
    let input = match api {
        NativeApi::Responses => n("input_tokens"),
        NativeApi::Messages => {
            n("input_tokens") + n("cache_creation_input_tokens") + n("cache_read_input_tokens")
        }
    };
    let output = n("output_tokens");
    Some(Usage {
        prompt_tokens: input,
        completion_tokens: output,
        total_tokens: input + output,
    })
}

/// Writes a native stream back to its client: each upstream event under its own name (both
/// APIs name an event by its data's `type`), the gateway's `[DONE]` dropped (neither API has
/// one), and a failure of the gateway's own (a deadline, a broken upstream) as the API's error
/// event. An upstream's own `error` event is relayed as it came.
pub struct NativeStream {
    api: NativeApi,
    /// The last Responses `sequence_number` seen, so that an error event continues the count.
    sequence: u64,
}

impl NativeStream {
    /// The stream edge for `api`.
    pub fn new(api: NativeApi) -> Self {
        Self { api, sequence: 0 }
    }
}

impl StreamEdge for NativeStream {
    fn chunk(&mut self, event: &Value, out: &mut Vec<u8>) {
        if let Some(n) = event.get("sequence_number").and_then(Value::as_u64) {
            self.sequence = n;
        }
        let name = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        edge::write_event(out, name, event);
    }

    fn failed(&mut self, error: &Value, out: &mut Vec<u8>) {
        if error.get("type").and_then(Value::as_str) == Some("error") {
            // Anthropic's own error event, relayed.
            edge::write_event(out, "error", error);
            return;
        }
        match self.api {
            NativeApi::Messages => super::messages::write_error_event(error, out),
            NativeApi::Responses => {
                let (message, _, code) = edge::error_parts(error);
                self.sequence += 1;
                edge::write_event(
                    out,
                    "error",
                    &json!({"type": "error", "code": code, "message": message,
                        "param": null, "sequence_number": self.sequence}),
                );
            }
        }
    }

    fn done(&mut self, _out: &mut Vec<u8>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_carries_every_turns_text_and_asks_for_usage() {
        let body = json!({"model": "auto", "max_tokens": 100, "stream": true,
        "system": [{"type": "text", "text": "Be brief."}],
        "tools": [{"name": "weather", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "18C"}]}
        ]});
        let native = Native::messages(body.to_string().as_bytes(), String::new()).unwrap();
        let view: Value = serde_json::from_slice(&native.view()).unwrap();
        assert_eq!(view["max_tokens"], 100);
        assert_eq!(view["stream"], true);
        assert_eq!(view["stream_options"]["include_usage"], true);
        let texts: Vec<&str> = view["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap())
            .collect();
        assert_eq!(
            texts,
            [
                "Be brief.",
                "Weather in Paris?",
                "{\"city\":\"Paris\"}",
                "18C"
            ]
        );
        // The upstream gets the body as it came, its own model named.
        let up: Value = serde_json::from_slice(&native.upstream_body("claude-x")).unwrap();
        assert_eq!(up["model"], "claude-x");
        assert_eq!(up["tools"], body["tools"]);
        assert_eq!(up["messages"], body["messages"]);
    }

    #[test]
    fn a_stored_conversation_becomes_input_items() {
        let conversations = Conversations::new(10, std::time::Duration::from_secs(60));
        conversations.put(
            "resp_1".into(),
            vec![json!({"role": "user", "content": "Hi"})],
            "Hello!".into(),
        );
        let body = json!({"model": "auto", "previous_response_id": "resp_1", "input": "Weather?",
            "tools": [{"type": "function", "name": "weather"}]});
        let native =
            Native::responses(body.to_string().as_bytes(), String::new(), &conversations).unwrap();
        let up: Value = serde_json::from_slice(&native.upstream_body("gpt")).unwrap();
        assert!(up.get("previous_response_id").is_none(), "{up}");
        assert_eq!(
            up["input"],
            json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Weather?"}])
        );
        // An id the gateway did not issue is the upstream's: passed through.
        let body = json!({"model": "auto", "previous_response_id": "resp_theirs", "input": "More"});
        let native =
            Native::responses(body.to_string().as_bytes(), String::new(), &conversations).unwrap();
        let up: Value = serde_json::from_slice(&native.upstream_body("gpt")).unwrap();
        assert_eq!(up["previous_response_id"], "resp_theirs");
    }

    #[test]
    fn usage_counts_anthropic_cache_tokens_as_input() {
        let u = usage_in(
            NativeApi::Messages,
            Some(&json!({"input_tokens": 3, "cache_read_input_tokens": 10, "output_tokens": 4})),
        )
        .unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (13, 4));
        assert!(whole_usage(NativeApi::Responses, b"[1]").is_err());
    }
}
