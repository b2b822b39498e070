//! Property-based fuzzing of everything that reads client bytes before a backend is chosen:
//! the request parser and its limits, and the helpers that read streamed answer chunks. Each
//! property runs a fixed number of generated cases (bounded time in CI) and must never panic;
//! a rejected request must be a 4xx that names its field. (The SSE reader's own property is
//! in `src/backends/openai.rs`, where it can reach the private reader.)

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use wattgate::config::LimitsConfig;
use wattgate::wire::{generated_text, ChatRequest};

/// Arbitrary JSON, biased toward the shapes the parser looks at.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,20}".prop_map(Value::String),
        prop_oneof![
            Just("user"),
            Just("system"),
            Just("assistant"),
            Just("auto"),
            Just("text"),
            Just("image_url")
        ]
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("model"),
                        Just("messages"),
                        Just("role"),
                        Just("content"),
                        Just("stream"),
                        Just("stream_options"),
                        Just("include_usage"),
                        Just("max_tokens"),
                        Just("max_completion_tokens"),
                        Just("tools"),
                        Just("n"),
                        Just("type"),
                        Just("text"),
                        Just("logprobs"),
                    ]
                    .prop_map(str::to_owned),
                    inner
                ),
                0..6
            )
            .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A request object with each top-level field either right or arbitrary.
fn request_like() -> impl Strategy<Value = Value> {
    (
        prop_oneof![Just(json!("auto")), json_value()],
        prop_oneof![
            Just(json!([{"role": "user", "content": "hello"}])),
            prop::collection::vec(
                (prop_oneof![Just(json!("user")), json_value()], json_value())
                    .prop_map(|(role, content)| json!({"role": role, "content": content})),
                0..5
            )
            .prop_map(Value::Array),
            json_value(),
        ],
        json_value(),
        json_value(),
    )
        .prop_map(|(model, messages, stream, max_tokens)| {
            json!({"model": model, "messages": messages, "stream": stream, "max_tokens": max_tokens})
        })
}

fn check(bytes: &[u8]) {
    match ChatRequest::parse(bytes) {
        Ok(request) => {
            // Everything downstream of a parsed request is total too.
            let _ = request.prompt_text();
            let _ = request.estimated_tokens();
            let _ = request.upstream_body("m", true, true);
            let _ = request.unstreamed();
            if let Err(e) = request.check_limits(&LimitsConfig::default()) {
                assert_eq!(e.status.as_u16(), 400);
                assert!(e.param.is_some(), "{e}");
            }
        }
        Err(e) => {
            assert_eq!(e.status.as_u16(), 400, "{e}");
            assert!(!e.message.is_empty());
            assert!(
                e.param.is_some() || e.code.as_deref() == Some("invalid_json"),
                "a rejection names its field or says the JSON is bad: {e}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check(&bytes);
    }

    #[test]
    fn the_parser_never_panics_on_json(value in json_value()) {
        check(value.to_string().as_bytes());
    }

    #[test]
    fn the_parser_names_the_field_of_request_like_objects(value in request_like()) {
        check(value.to_string().as_bytes());
    }

    #[test]
    fn truncated_and_mutated_requests_never_panic(
        cut in 0usize..200,
        flip in 0usize..200,
        byte in any::<u8>(),
    ) {
        let mut body = json!({"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", "text": "héllo ☃"}]}], "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 7})
            .to_string()
            .into_bytes();
        if flip < body.len() {
            body[flip] = byte;
        }
        body.truncate(cut.min(body.len()));
        check(&body);
    }

    #[test]
    fn chunk_readers_never_panic(value in json_value(), bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut out = String::new();
        generated_text(value.to_string().as_bytes(), &mut out);
        generated_text(&bytes, &mut out);
    }
}
