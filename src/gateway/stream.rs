//! The stream the client reads: the upstream's chunks re-framed as SSE, the gateway's own usage
//! chunk removed, `[DONE]` at the end, and a mid-stream failure as an error frame.

use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::StreamExt;

use std::sync::Arc;

use super::Accounts;
use crate::backends::{Chunk, ChunkStream};
use crate::metering::{Outcome, RequestMeter};
use crate::wire::generated_text;

/// Re-frames an upstream stream for the client: drops the usage chunk the gateway asked for on
/// its own behalf, ends with `[DONE]`, and turns a mid-stream failure into an error frame.
/// The request is accounted (its ledger row queued) before the last frame goes out, so a client
/// that posts feedback as soon as it has read `[DONE]` always finds its request.
pub(super) fn client_stream(
    first: Chunk,
    rest: ChunkStream,
    client_wants_usage: bool,
    meter: RequestMeter,
    accounts: Arc<Accounts>,
) -> BoxStream<'static, Bytes> {
    struct State {
        accounts: Arc<Accounts>,
        first: Option<Chunk>,
        rest: ChunkStream,
        client_wants_usage: bool,
        /// Taken (and so recorded) when the stream ends; dropped unrecorded-yet when the client
        /// goes away first, which records it as cancelled (or cut, at shutdown).
        meter: Option<RequestMeter>,
    }
    let state = State {
        accounts,
        first: Some(first),
        rest,
        client_wants_usage,
        meter: Some(meter),
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            let meter = s.meter.as_mut()?;
            let next = match s.first.take() {
                Some(chunk) => Some(Ok(chunk)),
                None => s.rest.next().await,
            };
            match next {
                None => {
                    // An in-band error chunk earlier in the stream keeps it an error.
                    meter.stream_ended();
                    drop(s.meter.take());
                    return Some((Bytes::from_static(b"data: [DONE]\n\n"), s));
                }
                Some(Err(e)) => {
                    meter.outcome = Some(Outcome::Error);
                    if let Some((_, served)) = &meter.route {
                        s.accounts.record_late_failure(*served);
                    }
                    let backend = meter.route.as_ref().map_or("", |(r, _)| r.backend.as_str());
                    tracing::warn!(backend, error = %e, "upstream stream failed after the first byte");
                    let error = e.to_api_error(backend);
                    drop(s.meter.take());
                    return Some((sse_frame(&error.to_json()), s));
                }
                Some(Ok(chunk)) => {
                    if chunk.usage.is_some() {
                        meter.usage_seen(chunk.usage);
                    } else {
                        meter.keep_output(&chunk.data);
                    }
                    if let Some(answer) = &mut meter.answer {
                        generated_text(&chunk.data, answer);
                    }
                    if chunk.is_error {
                        meter.outcome = Some(Outcome::Error);
                    }
                    if s.client_wants_usage {
                        return Some((sse_frame(&chunk.data), s));
                    }
                    if chunk.usage_only {
                        continue;
                    }
                    return Some((sse_frame(&without_usage(&chunk.data)), s));
                }
            }
        }
    })
    .boxed()
}

/// Removes a `usage` key the client did not ask for; other chunks pass through unchanged.
fn without_usage(data: &Bytes) -> Bytes {
    if !data.windows(7).any(|w| w == b"\"usage\"") {
        return data.clone();
    }
    match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(data) {
        Ok(mut chunk) => {
            chunk.remove("usage");
            serde_json::to_vec(&chunk).map_or_else(|_| data.clone(), Bytes::from)
        }
        Err(_) => data.clone(),
    }
}

pub(super) fn sse_frame(data: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(data.len() + 8);
    frame.put_slice(b"data: ");
    frame.put_slice(data);
    frame.put_slice(b"\n\n");
    frame.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_the_usage_key() {
        let data = Bytes::from_static(
            br#"{"id":"c","choices":[{"index":0,"delta":{"content":"a \"usage\" b"}}],"usage":null}"#,
        );
        assert_eq!(
            &without_usage(&data)[..],
            br#"{"id":"c","choices":[{"index":0,"delta":{"content":"a \"usage\" b"}}]}"#
        );
        let plain = Bytes::from_static(br#"{"id":"c","choices":[]}"#);
        assert_eq!(without_usage(&plain), plain);
    }
}
