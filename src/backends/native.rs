//! A native upstream stream read for the gateway ([`crate::wire::native`]): each event passes
//! through as it came, with the usage the meter needs read from it, an upstream's error event
//! marked as one, and the stream's end recognised (neither API ends with `[DONE]`).

use bytes::Bytes;
use serde_json::Value;

use super::Chunk;
use crate::wire::native::{usage_in, NativeApi};
use crate::wire::Usage;

/// Reads one native event stream.
#[derive(Debug)]
pub struct NativeReader {
    api: NativeApi,
    /// Messages: input tokens from `message_start`, for the usage `message_delta` completes.
    input: u64,
    finished: bool,
}

impl NativeReader {
    /// A reader for `api`'s events.
    pub fn new(api: NativeApi) -> Self {
        Self {
            api,
            input: 0,
            finished: false,
        }
    }

    /// Whether the stream's last event was read.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// One event's data as a chunk to relay (`None` for an event carrying nothing to relay).
    pub fn event(&mut self, data: &str) -> Result<Option<Chunk>, String> {
        if data == "[DONE]" {
            self.finished = true;
            return Ok(None);
        }
        let event: Value = serde_json::from_str(data).map_err(|e| {
            format!(
                "a {} event is not JSON ({e}): {}",
                self.api.name(),
                super::openai::truncate(data, 200)
            )
        })?;
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        let mut chunk = Chunk::new(Bytes::copy_from_slice(data.as_bytes()));
        match (self.api, kind) {
            (NativeApi::Messages, "message_start") => {
                self.input = event
                    .pointer("/message/usage")
                    .and_then(|u| usage_in(self.api, Some(u)))
                    .map_or(0, |u| u.prompt_tokens);
            }
            (NativeApi::Messages, "message_delta") => {
                if let Some(u) = usage_in(self.api, event.get("usage")) {
                    // Later API versions repeat the input count here; else message_start's.
                    let input = if u.prompt_tokens > 0 {
                        u.prompt_tokens
                    } else {
                        self.input
                    };
                    chunk.usage = Some(Usage {
                        prompt_tokens: input,
                        completion_tokens: u.completion_tokens,
                        total_tokens: input + u.completion_tokens,
                    });
                }
            }
            (NativeApi::Messages, "message_stop") => self.finished = true,
            (NativeApi::Responses, "response.completed" | "response.incomplete") => {
                chunk.usage = usage_in(self.api, event.pointer("/response/usage"));
                self.finished = true;
            }
            (NativeApi::Messages, "error")
            | (NativeApi::Responses, "response.failed" | "error") => {
                chunk.is_error = true;
                self.finished = true;
            }
            _ => {}
        }
        Ok(Some(chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_messages_stream_reads_its_usage_and_its_end() {
        let mut r = NativeReader::new(NativeApi::Messages);
        let start = r
            .event(r#"{"type":"message_start","message":{"usage":{"input_tokens":7,"cache_read_input_tokens":3,"output_tokens":1}}}"#)
            .unwrap()
            .unwrap();
        assert!(start.usage.is_none());
        let delta = r
            .event(r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":12}}"#)
            .unwrap()
            .unwrap();
        let u = delta.usage.unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (10, 12));
        assert!(!r.finished());
        r.event(r#"{"type":"message_stop"}"#).unwrap();
        assert!(r.finished());
    }

    #[test]
    fn a_responses_stream_ends_at_completed_or_failed() {
        let mut r = NativeReader::new(NativeApi::Responses);
        let done = r
            .event(r#"{"type":"response.completed","response":{"usage":{"input_tokens":5,"output_tokens":2}}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(done.usage.unwrap().total_tokens, 7);
        assert!(r.finished());
        let mut r = NativeReader::new(NativeApi::Responses);
        let failed = r
            .event(r#"{"type":"response.failed","response":{}}"#)
            .unwrap()
            .unwrap();
        assert!(failed.is_error && r.finished());
        assert!(r.event("not json").is_err());
    }
}
