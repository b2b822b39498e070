//! What the Responses and Messages edges share: the gateway's own chat answer read back, whole or
//! as its SSE frames, so that each API can write it in its own shape.
//!
//! The pipeline speaks chat completions from parse to relay; another API is translated into a
//! chat request before it and out of the chat answer after it. That keeps one router, one meter,
//! one guard and one fallback path for every endpoint, at the price of one JSON walk at each end.

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde_json::{Map, Value};

use super::Usage;
use crate::error::ApiError;

/// A whole chat completion as the edges need it: one choice's text, why it ended, and usage.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatAnswer {
    /// The model that answered, as the upstream named it.
    pub model: String,
    /// The first choice's text (string content, or its text parts joined).
    pub text: String,
    /// The first choice's `finish_reason`.
    pub finish_reason: Option<String>,
    /// Token counts, when the upstream reported them.
    pub usage: Option<Usage>,
}

impl ChatAnswer {
    /// Reads a completion body. A body that is not a completion is a 502: it came from an
    /// upstream, through the gateway's own checks, so the fault is not the client's.
    pub fn read(json: &[u8]) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(json).map_err(|e| {
            ApiError::bad_gateway(
                format!("The upstream's completion is not JSON: {e}."),
                "upstream_protocol_error",
            )
        })?;
        let mut answer = Self {
            model: str_at(&value, "model").unwrap_or_default().to_owned(),
            usage: usage_of(&value),
            ..Self::default()
        };
        let choice = value
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
            .ok_or_else(|| {
                ApiError::bad_gateway(
                    "The upstream's completion has no choices.",
                    "upstream_protocol_error",
                )
            })?;
        if let Some(content) = choice.get("message").and_then(|m| m.get("content")) {
            for part in super::text_parts(content) {
                answer.text.push_str(part);
            }
        }
        answer.finish_reason = str_at(choice, "finish_reason").map(str::to_owned);
        Ok(answer)
    }
}

fn str_at<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

fn usage_of(value: &Value) -> Option<Usage> {
    value
        .get("usage")
        .filter(|u| u.is_object())
        .and_then(|u| serde::Deserialize::deserialize(u).ok())
}

/// One frame of the gateway's chat stream, read back.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatFrame {
    /// A `chat.completion.chunk`.
    Chunk(Value),
    /// The in-band `{"error": {...}}` frame a mid-stream failure ends with.
    Error(Value),
    /// `data: [DONE]`.
    Done,
    /// An SSE comment (the guard's verdict, keep-alives): passed through as written.
    Comment(Bytes),
}

/// The delta text, finish reason and usage of one chunk's first choice.
pub struct ChunkParts<'a> {
    /// The chunk's model.
    pub model: Option<&'a str>,
    /// Text added by this chunk.
    pub text: Option<&'a str>,
    /// Why the choice ended, on its last chunk.
    pub finish_reason: Option<&'a str>,
    /// Token counts (the usage chunk).
    pub usage: Option<Usage>,
}

impl<'a> ChunkParts<'a> {
    /// Reads a chunk's parts.
    pub fn of(chunk: &'a Value) -> Self {
        let choice = chunk
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first());
        Self {
            model: str_at(chunk, "model"),
            text: choice
                .and_then(|c| c.get("delta"))
                .and_then(|d| d.get("content"))
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty()),
            finish_reason: choice.and_then(|c| str_at(c, "finish_reason")),
            usage: usage_of(chunk),
        }
    }
}

/// Splits the gateway's SSE bytes into frames. Frames normally arrive whole, one per item, but
/// nothing here relies on it: bytes are buffered up to each blank line.
#[derive(Default)]
struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    fn push(&mut self, bytes: &[u8], out: &mut Vec<ChatFrame>) {
        self.buf.extend_from_slice(bytes);
        while let Some(end) = find_blank_line(&self.buf) {
            let frame: Vec<u8> = self.buf.drain(..end + 2).collect();
            if let Some(f) = parse_frame(&frame[..end]) {
                out.push(f);
            }
        }
    }
}

fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n")
}

fn parse_frame(frame: &[u8]) -> Option<ChatFrame> {
    if frame.first() == Some(&b':') {
        let mut comment = frame.to_vec();
        comment.extend_from_slice(b"\n\n");
        return Some(ChatFrame::Comment(Bytes::from(comment)));
    }
    let data: Vec<u8> = frame
        .split(|b| *b == b'\n')
        .filter_map(|line| line.strip_prefix(b"data:"))
        .flat_map(|d| d.strip_prefix(b" ").unwrap_or(d).iter().copied())
        .collect();
    if data.is_empty() {
        return None;
    }
    if data == b"[DONE]" {
        return Some(ChatFrame::Done);
    }
    let value: Value = serde_json::from_slice(&data).ok()?;
    if value.get("error").is_some() {
        Some(ChatFrame::Error(value))
    } else {
        Some(ChatFrame::Chunk(value))
    }
}

/// One API's way of writing a chat stream: it is told each frame and appends its own events.
pub trait StreamEdge: Send + 'static {
    /// A chunk of the answer.
    fn chunk(&mut self, chunk: &Value, out: &mut Vec<u8>);
    /// The stream failed after it began; `error` is the gateway's `{"error": {...}}` object.
    fn failed(&mut self, error: &Value, out: &mut Vec<u8>);
    /// The answer is complete.
    fn done(&mut self, out: &mut Vec<u8>);
}

/// Re-writes the gateway's chat SSE frames as `edge`'s events, frame by frame (nothing is held
/// back, so time to first token is unchanged). Comments pass through.
pub fn translate_stream<E: StreamEdge>(
    frames: BoxStream<'static, Bytes>,
    mut edge: E,
) -> BoxStream<'static, Bytes> {
    let mut reader = FrameReader::default();
    let mut parsed = Vec::new();
    let mut ended = false;
    frames
        .filter_map(move |bytes| {
            let mut out = Vec::new();
            reader.push(&bytes, &mut parsed);
            for frame in parsed.drain(..) {
                if ended {
                    break;
                }
                match frame {
                    ChatFrame::Chunk(chunk) => edge.chunk(&chunk, &mut out),
                    ChatFrame::Error(error) => {
                        edge.failed(&error, &mut out);
                        ended = true;
                    }
                    ChatFrame::Done => {
                        edge.done(&mut out);
                        ended = true;
                    }
                    ChatFrame::Comment(c) => out.extend_from_slice(&c),
                }
            }
            futures::future::ready((!out.is_empty()).then(|| Bytes::from(out)))
        })
        .boxed()
}

/// Appends one named SSE event (`event: NAME`, `data: JSON`).
pub fn write_event(out: &mut Vec<u8>, name: &str, data: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // Serializing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, data);
    out.extend_from_slice(b"\n\n");
}

/// The message and code of the gateway's `{"error": {...}}` object.
pub fn error_parts(error: &Value) -> (String, String, String) {
    let inner = error.get("error").unwrap_or(error);
    let field = |k: &str| str_at(inner, k).unwrap_or_default().to_owned();
    // An upstream's in-band error may carry a numeric code (vLLM sends the HTTP status).
    let code = match inner.get("code") {
        Some(Value::Number(n)) => n.to_string(),
        _ => field("code"),
    };
    (field("message"), field("type"), code)
}

/// The request object of a translating edge, built field by field.
pub(super) type Object = Map<String, Value>;

/// 400 for a field the API does not define (`api` names it, e.g. "Messages API").
pub(super) fn unknown(field: &str, api: &str) -> ApiError {
    ApiError::invalid_request(format!(
        "`{}` is not a {api} parameter.",
        field.chars().take(40).collect::<String>()
    ))
    .with_param(field)
    .with_code("unknown_parameter")
}

/// 400 unless the request names a `model`.
pub(super) fn require_model(body: &Object) -> Result<(), ApiError> {
    if body.contains_key("model") {
        return Ok(());
    }
    Err(required(
        "model",
        "is required (use \"auto\" to let the gateway route)",
    ))
}

/// 400 for a field this edge does not translate, naming it and saying why.
pub(super) fn unsupported(param: &str, why: &str) -> ApiError {
    ApiError::invalid_request(format!("`{param}` is not supported here: {why}."))
        .with_param(param)
        .with_code("unsupported_parameter")
}

/// 400 for a field of the wrong type.
pub(super) fn wrong(param: &str, expected: &str, got: &Value) -> ApiError {
    super::wrong_type(param, expected, got)
}

/// 400 for a missing or empty field.
pub(crate) fn required(param: &str, problem: &str) -> ApiError {
    super::missing(param, problem)
}

/// A message's `content` in chat's form: a string as it is, an array with each part mapped by
/// `part` (given the part's parameter path); anything else a 400 naming `{param}.content`.
pub(super) fn content(
    param: &str,
    content: Option<&Value>,
    parts_are: &str,
    part: impl Fn(&str, &Value) -> Result<Value, ApiError>,
) -> Result<Value, ApiError> {
    match content {
        Some(Value::String(s)) => Ok(Value::String(s.clone())),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(j, p)| part(&format!("{param}.content[{j}]"), p))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Some(other) => Err(wrong(
            &format!("{param}.content"),
            &format!("a string or an array of {parts_are}"),
            other,
        )),
        None => Err(required(&format!("{param}.content"), "is required")),
    }
}

/// A part's `text` as a chat text part (400 naming `{param}.text` when it is not a string).
pub(super) fn text_part(param: &str, part: &Value) -> Result<Value, ApiError> {
    match part.get("text") {
        Some(Value::String(t)) => Ok(serde_json::json!({"type": "text", "text": t})),
        other => Err(wrong(
            &format!("{param}.text"),
            "a string",
            other.unwrap_or(&Value::Null),
        )),
    }
}

/// The translated chat request's bytes: its fields, its messages, and for a stream the usage
/// chunk asked for (the edges report usage at the end of every stream).
pub(super) fn chat_body(mut chat: Object, messages: Vec<Value>, stream: bool) -> Vec<u8> {
    chat.insert("messages".into(), Value::Array(messages));
    if stream {
        chat.insert("stream".into(), Value::Bool(true));
        chat.insert(
            "stream_options".into(),
            serde_json::json!({"include_usage": true}),
        );
    }
    serde_json::to_vec(&chat).unwrap_or_default()
}

/// Parses a request body as a JSON object, with the chat parser's errors.
pub fn object(bytes: &[u8]) -> Result<Object, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::invalid_request(format!("Could not parse the JSON body: {e}."))
            .with_code("invalid_json")
    })?;
    match value {
        Value::Object(o) => Ok(o),
        other => Err(ApiError::invalid_request(format!(
            "The request body must be a JSON object, got {}.",
            super::type_name(&other)
        ))
        .with_code("invalid_json")),
    }
}

/// A fresh id with an API's prefix (`msg_`, `resp_`), 32 hex digits of randomness.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(bytes: &[&[u8]]) -> Vec<ChatFrame> {
        let mut reader = FrameReader::default();
        let mut out = Vec::new();
        for b in bytes {
            reader.push(b, &mut out);
        }
        out
    }

    #[test]
    fn frames_split_anywhere_read_the_same() {
        let whole: &[u8] = b"data: {\"choices\":[]}\n\n: wattgate-guard decision=pass\n\ndata: {\"error\":{\"message\":\"m\"}}\n\ndata: [DONE]\n\n";
        let expected = frames(&[whole]);
        assert_eq!(expected.len(), 4);
        assert!(matches!(expected[0], ChatFrame::Chunk(_)));
        assert!(matches!(expected[1], ChatFrame::Comment(_)));
        assert!(matches!(expected[2], ChatFrame::Error(_)));
        assert_eq!(expected[3], ChatFrame::Done);
        for cut in 1..whole.len() {
            assert_eq!(
                frames(&[&whole[..cut], &whole[cut..]]),
                expected,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_completion_without_choices_is_an_upstream_fault() {
        let e = ChatAnswer::read(br#"{"model":"m"}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 502);
        let a = ChatAnswer::read(
            br#"{"model":"m","choices":[{"message":{"content":"hi"},"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#,
        )
        .unwrap();
        assert_eq!(a.text, "hi");
        assert_eq!(a.finish_reason.as_deref(), Some("length"));
        assert_eq!(a.usage.map(|u| u.prompt_tokens), Some(3));
    }
}
