//! The three chat-shaped APIs a client can speak, for tests that run one scenario per API:
//! request bodies, and reading answers, errors and event streams back in each API's shape.

use serde_json::{json, Value};

use super::chat_body;

/// The API a client speaks: a scenario run once per API checks that `/v1/responses` and
/// `/v1/messages` keep the promises `/v1/chat/completions` makes, each in its own shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Responses,
    Messages,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Responses => "/v1/responses",
            Api::Messages => "/v1/messages",
        }
    }

    pub fn body(self, text: &str, stream: bool) -> Value {
        match self {
            Api::Chat => {
                let mut body = chat_body("auto", text);
                body["stream"] = json!(stream);
                body
            }
            Api::Responses => json!({"model": "auto", "input": text, "stream": stream}),
            Api::Messages => json!({"model": "auto", "max_tokens": 64, "stream": stream,
                "messages": [{"role": "user", "content": text}]}),
        }
    }

    /// A greedy request (temperature 0) for at most `max_tokens` output tokens, in this API's
    /// words for both.
    pub fn greedy(self, text: &str, stream: bool, max_tokens: u64) -> Value {
        let mut body = self.body(text, stream);
        body["temperature"] = json!(0);
        let key = match self {
            Api::Chat | Api::Messages => "max_tokens",
            Api::Responses => "max_output_tokens",
        };
        body[key] = json!(max_tokens);
        body
    }

    /// The output tokens a whole answer reports in its usage.
    pub fn output_tokens(self, answer: &Value) -> Option<u64> {
        match self {
            Api::Chat => answer["usage"]["completion_tokens"].as_u64(),
            Api::Responses | Api::Messages => answer["usage"]["output_tokens"].as_u64(),
        }
    }

    /// The gateway's error code from an error body, after checking the API's shape: OpenAI's
    /// four fields, or Anthropic's `{"type":"error","error":{"type","message"}}` with the code
    /// at the end of the message.
    pub fn error_code(self, body: &Value) -> String {
        if self != Api::Messages {
            return error_code(body);
        }
        assert_eq!(body["type"], "error", "{body}");
        let e = body["error"]
            .as_object()
            .unwrap_or_else(|| panic!("{body}"));
        let mut keys: Vec<&str> = e.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["message", "type"], "{body}");
        // Anthropic's error types: all end in `_error` but `request_too_large`.
        assert!(
            e["type"]
                .as_str()
                .is_some_and(|t| t.ends_with("_error") || t == "request_too_large"),
            "{body}"
        );
        let message = e["message"].as_str().unwrap_or_default();
        message
            .rsplit_once("(code: ")
            .and_then(|(_, c)| c.strip_suffix(')'))
            .unwrap_or_else(|| panic!("no code in {message:?}"))
            .to_owned()
    }

    /// Reads a Responses or Messages event stream: whether it completed (text deltas, then the
    /// API's closing event), else the failure's code.
    pub fn read_events(self, text: &str) -> (bool, Option<String>) {
        let mut events = Vec::new();
        for frame in text.split("\n\n").map(str::trim).filter(|f| !f.is_empty()) {
            if frame.starts_with(':') {
                continue;
            }
            let (name, data) = frame
                .strip_prefix("event: ")
                .and_then(|f| f.split_once("\ndata: "))
                .unwrap_or_else(|| panic!("not an event: {frame:?}"));
            let data: Value = serde_json::from_str(data).expect("event JSON");
            if self == Api::Responses {
                assert_eq!(data["type"], name, "{frame}");
            }
            events.push((name.to_owned(), data));
        }
        let deltas = events
            .iter()
            .filter(|(n, _)| n == "response.output_text.delta" || n == "content_block_delta")
            .count();
        let Some((last, data)) = events.last() else {
            panic!("empty stream: {text:?}")
        };
        match (self, last.as_str()) {
            // `response.incomplete` is a whole answer cut at max_output_tokens.
            (Api::Responses, "response.completed" | "response.incomplete")
            | (Api::Messages, "message_stop") => (deltas > 0, None),
            (Api::Responses, "response.failed") => {
                let code = data["response"]["error"]["code"].as_str().expect("code");
                (false, Some(code.to_owned()))
            }
            (Api::Messages, "error") => (false, Some(self.error_code(data))),
            _ => panic!("stream ended with {last}: {text}"),
        }
    }
}

/// The `code` of an OpenAI error body, after checking its shape.
pub fn error_code(body: &Value) -> String {
    let e = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("not an error object: {body}"));
    let mut keys: Vec<&str> = e.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "param", "type"], "{body}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    e["code"].as_str().unwrap_or("").to_owned()
}

/// One test per API for a scenario `async fn NAME(api: Api)`: `NAME::chat`, `NAME::responses`,
/// `NAME::messages`.
/// `for_each_api!(multi_thread: NAME, ...)` runs them on a two-thread runtime.
#[allow(unused_macros)]
macro_rules! for_each_api {
    (multi_thread: $($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn chat() {
                super::$name(super::Api::Chat).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn responses() {
                super::$name(super::Api::Responses).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn messages() {
                super::$name(super::Api::Messages).await
            }
        }
    )*};
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn chat() {
                super::$name(super::Api::Chat).await
            }
            #[tokio::test]
            async fn responses() {
                super::$name(super::Api::Responses).await
            }
            #[tokio::test]
            async fn messages() {
                super::$name(super::Api::Messages).await
            }
        }
    )*};
}

#[allow(unused_imports)]
pub(crate) use for_each_api;

/// A response read whole: status, headers and body text (a stream's every frame).
pub struct Sent {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Sent {
    /// A header as a string ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

impl Api {
    /// Posts `self.body(text, stream)` to this API on `gw` and reads the whole answer.
    pub async fn send(self, gw: &super::Gateway, text: &str, stream: bool) -> Sent {
        self.send_body(gw, &self.body(text, stream)).await
    }

    /// Posts `body` to this API on `gw` and reads the whole answer.
    pub async fn send_body(self, gw: &super::Gateway, body: &Value) -> Sent {
        let r = reqwest::Client::new()
            .post(gw.url(self.path()))
            .json(body)
            .send()
            .await
            .expect("gateway reachable");
        Sent {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            body: r.text().await.expect("body"),
        }
    }

    /// The answer's text in this API's shape, whole or streamed.
    pub fn text_of(self, stream: bool, body: &str) -> String {
        if !stream {
            let v: Value = serde_json::from_str(body).expect("JSON answer");
            let text = match self {
                Api::Chat => &v["choices"][0]["message"]["content"],
                Api::Responses => &v["output"][0]["content"][0]["text"],
                Api::Messages => &v["content"][0]["text"],
            };
            return text.as_str().unwrap_or_else(|| panic!("{v}")).to_owned();
        }
        let mut out = String::new();
        for frame in body.split("\n\n") {
            let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).expect("event JSON");
            let piece = match self {
                Api::Chat => v["choices"][0]["delta"]["content"].as_str(),
                Api::Responses if v["type"] == "response.output_text.delta" => v["delta"].as_str(),
                Api::Messages if v["type"] == "content_block_delta" => v["delta"]["text"].as_str(),
                _ => None,
            };
            out.push_str(piece.unwrap_or_default());
        }
        out
    }

    /// The gateway's code of a failed answer: the error body's, or for a stream that broke
    /// after it began, its closing error event's (`None` for a stream that completed).
    pub fn failure_code(self, sent: &Sent, stream: bool) -> Option<String> {
        if sent.status != 200 {
            let v: Value = serde_json::from_str(&sent.body).expect("error JSON");
            return Some(self.error_code(&v));
        }
        if !stream {
            return None;
        }
        if self == Api::Chat {
            let last = sent
                .body
                .split("\n\n")
                .filter_map(|f| f.trim().strip_prefix("data: "))
                .last()?;
            if last == "[DONE]" {
                return None;
            }
            return Some(error_code(
                &serde_json::from_str(last).expect("error frame"),
            ));
        }
        self.read_events(&sent.body).1
    }
}
