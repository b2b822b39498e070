//! The one error shape every client sees: OpenAI's `{"error":{"message","type","param","code"}}`.
//!
//! SDKs (Python `openai`, `async-openai`, LangChain...) parse exactly this shape and branch on the
//! HTTP status, so every failure the gateway reports goes through [`ApiError`], including 404s for
//! unknown paths and failures relayed from upstreams.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error reply: HTTP status plus the OpenAI error object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status sent to the client.
    pub status: StatusCode,
    /// Human-readable explanation naming what was wrong.
    pub message: String,
    /// OpenAI error type, e.g. `invalid_request_error`.
    pub kind: &'static str,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// Machine-readable code, e.g. `model_not_found`.
    pub code: Option<String>,
    /// Seconds the client should wait before retrying (sent as `Retry-After`).
    pub retry_after: Option<String>,
    /// Ends the connection after this reply (`Connection: close`): the request's body was not
    /// read to its end, so the next bytes on the wire are not a request.
    pub close: bool,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
            close: false,
        }
    }

    /// 400: the request itself is wrong.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 404: the `model` names neither the alias nor a configured backend.
    pub fn model_not_found(model: &str, known: &[&str]) -> Self {
        // Echo at most 100 characters: the name is client input, and may be megabytes.
        let shown: String = model.chars().take(100).collect();
        let model = if shown.len() < model.len() {
            format!("{shown}... ({} bytes)", model.len())
        } else {
            shown
        };
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "The model `{model}` does not exist on this gateway. Available models: {}.",
                known.join(", ")
            ),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    /// 404: no such endpoint.
    pub fn unknown_endpoint(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown endpoint: {method} {path}. This gateway serves POST /v1/chat/completions, POST /v1/responses, POST /v1/messages, GET /v1/models, GET /healthz, GET /readyz and GET /metrics."),
        )
        .with_code("unknown_url")
    }

    /// 405: the path exists but not with this method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("Method {method} is not allowed on {path}."),
        )
        .with_code("method_not_allowed")
    }

    /// 413: the body is over `server.max_body_bytes`.
    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("Request body is larger than the gateway's limit of {limit} bytes (server.max_body_bytes)."),
        )
        .with_code("request_too_large")
    }

    /// 408: the request's body did not arrive within `server.body_timeout_s`.
    pub fn body_timeout(seconds: f64) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!("The request body did not arrive within {seconds} s of its headers (server.body_timeout_s)."),
        )
        .with_code("request_timeout")
    }

    /// 408: the request's headers did not arrive within `server.header_timeout_s`.
    pub fn header_timeout(seconds: f64) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "The request headers did not arrive within {seconds} s (server.header_timeout_s)."
            ),
        )
        .with_code("request_timeout")
    }

    /// 429: a per-client rate limit refused the request (`Retry-After` set by the caller).
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            .with_code("rate_limit_exceeded")
    }

    /// 429: the gateway is serving its configured maximum of requests at once.
    pub fn too_many_concurrent(limit: usize) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("The gateway is serving its maximum of {limit} requests at once (limits.max_concurrent_requests). Please retry shortly."),
        )
        .with_code("too_many_concurrent_requests");
        e.retry_after = Some("1".to_owned());
        e
    }

    /// 401: no API key, or one the gateway does not accept. Never repeats the key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .with_code("invalid_api_key")
    }

    /// 403: a valid client key on an endpoint that needs the admin key.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "invalid_request_error", message)
            .with_code("insufficient_permissions")
    }

    /// 502: an upstream failed or answered something unusable.
    pub fn bad_gateway(message: impl Into<String>, code: &str) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "upstream_error", message).with_code(code)
    }

    /// 504: an upstream did not answer in time.
    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "upstream_error", message)
            .with_code("upstream_timeout")
    }

    /// 500: a bug in the gateway. Never expected; the message says so.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            .with_code("internal_error")
    }

    /// 404: the thing the request names does not exist (an unknown request id, experiment).
    pub fn not_found(message: impl Into<String>, code: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message).with_code(code)
    }

    /// 422: what the request asks for cannot be done with what is on disk (a router reload whose
    /// files do not load).
    pub fn unprocessable(message: impl Into<String>, code: &str) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            message,
        )
        .with_code(code)
    }

    /// 503: the gateway cannot serve this right now (e.g. shutting down, no backend usable).
    pub fn unavailable(message: impl Into<String>, code: &str) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message).with_code(code)
    }

    /// An upstream 4xx relayed to the client with its own status, type and message.
    pub fn relayed(status: StatusCode, kind: &'static str, message: String) -> Self {
        Self::new(status, kind, message)
    }

    /// Closes the connection after this reply.
    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    /// Names the request field at fault.
    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_owned());
        self
    }

    /// Sets the machine-readable code.
    pub fn with_code(mut self, code: &str) -> Self {
        self.code = Some(code.to_owned());
        self
    }

    /// The error object as JSON bytes, also used inside SSE streams for mid-stream failures.
    pub fn to_json(&self) -> Vec<u8> {
        let envelope = Envelope {
            error: Body {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code.as_deref(),
            },
        };
        // Serializing plain strings into a Vec cannot fail.
        serde_json::to_vec(&envelope).unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.to_json()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(v) = self
            .retry_after
            .as_deref()
            .and_then(|s| HeaderValue::from_str(s).ok())
        {
            headers.insert(header::RETRY_AFTER, v);
        }
        if self.close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.kind,
            self.message
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_has_all_four_fields_even_when_null() {
        let e = ApiError::invalid_request("bad").with_param("messages");
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {"message": "bad", "type": "invalid_request_error", "param": "messages", "code": null}})
        );
    }
}
