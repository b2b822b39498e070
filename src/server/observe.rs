//! The outermost middleware: request ids, arrival time, and per-endpoint HTTP metrics.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;

/// The request id header, accepted from clients and returned on every response.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Per-request facts set before any handler runs.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The client's `x-request-id` when it is sane, else a fresh UUID.
    pub id: String,
    /// When the request reached the gateway (for the overhead figure).
    pub started: Instant,
}

/// Assigns the request id, times the request, and counts it by endpoint template.
pub async fn observe(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_sane_id(v))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    // Route templates, never raw paths, so random 404 paths cannot explode label cardinality.
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = method_label(request.method());
    request.extensions_mut().insert(RequestContext {
        id: id.clone(),
        started,
    });

    let mut response = next.run(request).await;

    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID.clone(), value);
    }
    let metrics = &state.inner.metrics;
    metrics
        .http_requests
        .with_label_values(&[endpoint.as_str(), method, response.status().as_str()])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[endpoint.as_str(), method])
        .observe(started.elapsed().as_secs_f64());
    response
}

fn is_sane_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}
