//! `POST /v1/feedback` bodies: `{request_id, score: 0..1 | thumbs: "up"|"down", comment?}`,
//! validated into an outcome; every problem is a 400 naming the field.

use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::ledger::{now_us, OutcomeRecord, OutcomeSource};
use crate::wire::type_name;

/// Longest comment kept, in characters: room for a paragraph, not for pasting documents.
pub const MAX_COMMENT_CHARS: usize = 4096;

/// Longest request id (the gateway's own ids are 36-character UUIDs; client ids are capped at
/// 128 by the request-id middleware).
const MAX_REQUEST_ID_CHARS: usize = 128;

/// The fields a feedback body may have.
const FIELDS: [&str; 4] = ["request_id", "score", "thumbs", "comment"];

/// Parses and validates a feedback body into an outcome of source `feedback`.
pub fn parse(body: &[u8]) -> Result<OutcomeRecord, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid_request(format!("The body is not valid JSON: {e}."))
            .with_code("invalid_json")
    })?;
    let Value::Object(map) = value else {
        return Err(ApiError::invalid_request(
            "The body must be a JSON object: {\"request_id\": ..., \"score\": 0..1 or \"thumbs\": \"up\"|\"down\", \"comment\": ...}.",
        )
        .with_code("invalid_json"));
    };
    if let Some(unknown) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(bad(
            unknown,
            &format!("is not a feedback field (expected {})", FIELDS.join(", ")),
        ));
    }
    let request_id = match map.get("request_id") {
        Some(Value::String(id)) if !id.is_empty() && id.chars().count() <= MAX_REQUEST_ID_CHARS => {
            id.clone()
        }
        Some(Value::String(_)) => {
            return Err(bad(
                "request_id",
                &format!("must be 1 to {MAX_REQUEST_ID_CHARS} characters"),
            ))
        }
        Some(other) => {
            return Err(bad(
                "request_id",
                &format!(
                    "must be a string (the x-request-id response header), got {}",
                    type_name(other)
                ),
            ))
        }
        None => {
            return Err(bad(
                "request_id",
                "is required: the x-request-id header of the response being graded",
            ))
        }
    };
    let (score, thumbs) = score_or_thumbs(&map)?;
    let comment = match map.get("comment") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) if c.chars().count() <= MAX_COMMENT_CHARS => Some(c.clone()),
        Some(Value::String(_)) => {
            return Err(bad(
                "comment",
                &format!("is longer than {MAX_COMMENT_CHARS} characters"),
            ))
        }
        Some(other) => {
            return Err(bad(
                "comment",
                &format!("must be a string, got {}", type_name(other)),
            ))
        }
    };
    Ok(OutcomeRecord {
        request_id,
        source: OutcomeSource::Feedback,
        time_us: now_us(),
        score,
        thumbs,
        comment,
        detail: None,
        spend: None,
    })
}

fn score_or_thumbs(map: &Map<String, Value>) -> Result<(f64, Option<String>), ApiError> {
    match (map.get("score"), map.get("thumbs")) {
        (Some(_), Some(_)) => Err(bad(
            "thumbs",
            "cannot be given together with `score`; send one",
        )),
        (Some(Value::Number(n)), None) => match n.as_f64() {
            Some(v) if (0.0..=1.0).contains(&v) => Ok((v, None)),
            _ => Err(bad(
                "score",
                &format!("must be a number from 0 to 1, got {n}"),
            )),
        },
        (Some(other), None) => Err(bad(
            "score",
            &format!("must be a number from 0 to 1, got {}", type_name(other)),
        )),
        (None, Some(Value::String(t))) => match t.as_str() {
            "up" => Ok((1.0, Some("up".to_owned()))),
            "down" => Ok((0.0, Some("down".to_owned()))),
            _ => Err(bad(
                "thumbs",
                &format!("must be \"up\" or \"down\", got \"{t}\""),
            )),
        },
        (None, Some(other)) => Err(bad(
            "thumbs",
            &format!("must be \"up\" or \"down\", got {}", type_name(other)),
        )),
        (None, None) => Err(bad(
            "score",
            "is required: send `score` (0..1) or `thumbs` (\"up\"/\"down\")",
        )),
    }
}

fn bad(field: &str, problem: &str) -> ApiError {
    ApiError::invalid_request(format!("`{field}` {problem}."))
        .with_param(field)
        .with_code("invalid_feedback")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(body: &str) -> (u16, String, Option<String>) {
        match parse(body.as_bytes()) {
            Ok(o) => panic!("accepted {body}: {o:?}"),
            Err(e) => (e.status.as_u16(), e.message, e.param),
        }
    }

    #[test]
    fn accepts_scores_and_thumbs() {
        let o = parse(br#"{"request_id": "r1", "score": 0.25, "comment": "meh"}"#)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            (o.score, o.thumbs, o.comment.as_deref()),
            (0.25, None, Some("meh"))
        );
        let up =
            parse(br#"{"request_id": "r1", "thumbs": "up"}"#).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((up.score, up.thumbs.as_deref()), (1.0, Some("up")));
        let down =
            parse(br#"{"request_id": "r1", "thumbs": "down"}"#).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(down.score, 0.0);
        for edge in ["0", "1", "1.0", "0e0"] {
            assert!(
                parse(format!(r#"{{"request_id":"r","score":{edge}}}"#).as_bytes()).is_ok(),
                "{edge}"
            );
        }
    }

    #[test]
    fn rejects_what_is_wrong_and_names_it() {
        for (body, param) in [
            (r#"{"request_id": "r", "score": 1.5}"#, "score"),
            (r#"{"request_id": "r", "score": -0.1}"#, "score"),
            (r#"{"request_id": "r", "score": 1e309}"#, ""),
            (r#"{"request_id": "r", "score": "0.5"}"#, "score"),
            (r#"{"request_id": "r", "thumbs": "sideways"}"#, "thumbs"),
            (r#"{"request_id": "r", "thumbs": true}"#, "thumbs"),
            (
                r#"{"request_id": "r", "score": 1, "thumbs": "up"}"#,
                "thumbs",
            ),
            (r#"{"request_id": "r"}"#, "score"),
            (r#"{"score": 1}"#, "request_id"),
            (r#"{"request_id": 7, "score": 1}"#, "request_id"),
            (r#"{"request_id": "", "score": 1}"#, "request_id"),
            (
                r#"{"request_id": "r", "score": 1, "comment": 5}"#,
                "comment",
            ),
            (r#"{"request_id": "r", "score": 1, "scores": 1}"#, "scores"),
            (r#"[1]"#, ""),
            (r#"{"request_id": "r", "#, ""),
        ] {
            let (status, message, got) = error(body);
            assert_eq!(status, 400, "{body}");
            if param.is_empty() {
                assert!(
                    got.is_none() || got.as_deref() == Some("score"),
                    "{body}: {got:?}"
                );
            } else {
                assert_eq!(got.as_deref(), Some(param), "{body}: {message}");
                assert!(message.contains(param), "{message}");
            }
        }
        let long = format!(
            r#"{{"request_id": "r", "score": 1, "comment": "{}"}}"#,
            "x".repeat(MAX_COMMENT_CHARS + 1)
        );
        assert_eq!(error(&long).2.as_deref(), Some("comment"));
    }
}
