//! Route handlers: HTTP in, gateway calls, OpenAI-shaped responses out.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;

use super::edges::{hold_until_end, Api, Edge};
use super::{AppState, RequestContext};
use crate::config::GuardMode;
use crate::config::Role;
use crate::error::ApiError;
use crate::gateway::{Answer, AnswerBody, Inbound};
use crate::limits::Client;
use crate::router::Overrides;

/// How much of an oversized body is read and discarded before answering 413, so that ordinary
/// clients (which write the whole body before reading) see the 413 instead of a reset.
const OVERSIZE_DRAIN_BYTES: usize = 32 * 1024 * 1024;

/// `POST /v1/chat/completions`, `POST /v1/responses` (OpenAI's Responses API) and
/// `POST /v1/messages` (Anthropic's Messages API): one handler, the API read from the path;
/// the latter two are translated to chat at the edge ([`Edge`]).
pub async fn chat_apis(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestContext>,
    Extension(client): Extension<Client>,
    request: Request,
) -> Response {
    let api = match request.uri().path() {
        "/v1/responses" => Api::Responses,
        "/v1/messages" => Api::Messages,
        _ => Api::Chat,
    };
    serve(state, ctx, client, request, api).await
}

static ENERGY: HeaderName = HeaderName::from_static("x-wattgate-energy-joules");
static ENERGY_KIND: HeaderName = HeaderName::from_static("x-wattgate-energy");

/// `POST /v1/embeddings`: served by the model the client names (never routed: vectors are
/// only comparable within one model), under the same body cap and concurrency slot as chat.
pub async fn embeddings(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestContext>,
    Extension(client): Extension<Client>,
    request: Request,
) -> Response {
    let (_, body) = request.into_parts();
    let body = match read_body(body, state.inner.max_body_bytes, state.inner.body_timeout).await {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    let _slot = match concurrency_slot(&state) {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    let gateway = &state.inner.gateway;
    let admit = |tokens| gateway.charge(&client, tokens);
    let call = crate::embeddings::Call {
        id: &ctx.id,
        started: ctx.started,
        admit: &admit,
    };
    match state.inner.embeddings.embed(&body, call).await {
        Ok(served) => {
            let mut response = (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                served.body,
            )
                .into_response();
            let headers = response.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&served.model) {
                headers.insert(BACKEND.clone(), v);
            }
            if let Some((joules, kind)) = served.joules {
                headers.insert(ROUTE.clone(), HeaderValue::from_static("local"));
                if let Ok(v) = HeaderValue::from_str(&format!("{joules:.6}")) {
                    headers.insert(ENERGY.clone(), v);
                }
                headers.insert(ENERGY_KIND.clone(), HeaderValue::from_static(kind));
            }
            response
        }
        Err(e) => e.into_response(),
    }
}

/// One request of any API through the pipeline: headers, the bounded body, its translation
/// into chat, the concurrency slot, the gateway, and its answer written back in the API's shape.
async fn serve(
    state: AppState,
    ctx: RequestContext,
    client: Client,
    request: Request,
    api: Api,
) -> Response {
    let (parts, body) = request.into_parts();
    let overrides = match overrides(&parts.headers) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let body = match read_body(body, state.inner.max_body_bytes, state.inner.body_timeout).await {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    let gateway = &state.inner.gateway;
    let speaks = |native| gateway.backends().iter().any(|b| b.speaks(native));
    let edge = match Edge::translate(api, body, &state.inner.conversations, speaks) {
        Ok(edge) => edge,
        Err(e) => return e.into_response(),
    };
    // Only now, with the whole body in: a slot taken before would be held by a client that
    // trickles its body, and enough of those lock every other client out.
    let slot = match concurrency_slot(&state) {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    let inbound = Inbound {
        overrides,
        headers: &parts.headers,
        started: ctx.started,
        id: &ctx.id,
        client: &client,
        native: edge.native(),
    };
    match state.inner.gateway.chat(edge.chat(), inbound).await {
        Ok(mut answer) => {
            let body = std::mem::replace(&mut answer.body, AnswerBody::Json(Bytes::new()));
            answer.body = edge.answer(body, &state.inner.conversations);
            // A stream holds its concurrency slot until its last frame.
            if let Some(slot) = slot {
                hold_until_end(&mut answer.body, slot);
            }
            answer_response(answer)
        }
        Err(e) => edge.error(e).into_response(),
    }
}

/// A slot among `limits.max_concurrent_requests`, held until the answer's last byte; a 429
/// (counted) when none is free.
fn concurrency_slot(
    state: &AppState,
) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, ApiError> {
    state.inner.access.slot().inspect_err(|_| {
        state
            .inner
            .metrics
            .rejected
            .with_label_values(&["too_many_concurrent"])
            .inc();
    })
}

/// The per-request routing headers: `x-wattgate-route: local|cloud` forces a side,
/// `x-wattgate-threshold: 0..1` replaces the learned router's threshold.
fn overrides(headers: &HeaderMap) -> Result<Overrides, ApiError> {
    let text = |name: &HeaderName| -> Result<Option<String>, ApiError> {
        match headers.get(name) {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .map(|s| Some(s.trim().to_ascii_lowercase()))
                .map_err(|_| bad_header(name, "is not visible ASCII")),
        }
    };
    let force = match text(&ROUTE)?.as_deref() {
        None => None,
        Some("local") => Some(Role::Local),
        Some("cloud") => Some(Role::Cloud),
        Some(other) => {
            return Err(bad_header(
                &ROUTE,
                &format!("must be `local` or `cloud`, got `{other}`"),
            ))
        }
    };
    let threshold = match text(&THRESHOLD)? {
        None => None,
        Some(t) => match t.parse::<f64>() {
            Ok(v) if (0.0..=1.0).contains(&v) => Some(v),
            _ => {
                return Err(bad_header(
                    &THRESHOLD,
                    &format!("must be a number from 0 to 1, got `{t}`"),
                ))
            }
        },
    };
    let guard = match text(&GUARD)?.as_deref() {
        None => None,
        Some("off") => Some(GuardMode::Off),
        Some("check") => Some(GuardMode::Check),
        Some(other) => {
            return Err(bad_header(
                &GUARD,
                &format!("must be `off` or `check`, got `{other}`"),
            ))
        }
    };
    Ok(Overrides {
        force,
        threshold,
        guard,
    })
}

fn bad_header(name: &HeaderName, what: &str) -> ApiError {
    ApiError::invalid_request(format!("Header `{name}` {what}."))
        .with_param(name.as_str())
        .with_code("invalid_header")
}

/// Reads the body up to `limit` bytes; past it, drains a bounded amount and reports 413. A body
/// past its deadline ([`super::layers::BodyDeadlineLayer`], `timeout`) is a 408 that closes the
/// connection.
pub(super) async fn read_body(
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<u8>, ApiError> {
    let mut body = body.into_data_stream();
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.next().await {
        let frame = frame.map_err(|e| {
            if super::layers::BodyTimedOut::is(&e) {
                ApiError::body_timeout(timeout.as_secs_f64()).closing()
            } else {
                ApiError::invalid_request(format!("Could not read the request body: {e}."))
            }
        })?;
        seen = seen.saturating_add(frame.len());
        if seen > limit {
            if seen > limit.saturating_add(OVERSIZE_DRAIN_BYTES) {
                break;
            }
            buf = Vec::new();
            continue;
        }
        buf.extend_from_slice(&frame);
    }
    if seen > limit {
        return Err(ApiError::body_too_large(limit));
    }
    Ok(buf)
}

static ROUTE: HeaderName = HeaderName::from_static("x-wattgate-route");
static BACKEND: HeaderName = HeaderName::from_static("x-wattgate-backend");
static REASON: HeaderName = HeaderName::from_static("x-wattgate-reason");
static OVERHEAD: HeaderName = HeaderName::from_static("x-wattgate-overhead-ms");
static FALLBACK_FROM: HeaderName = HeaderName::from_static("x-wattgate-fallback-from");
static THRESHOLD: HeaderName = HeaderName::from_static("x-wattgate-threshold");
static P_LOCAL: HeaderName = HeaderName::from_static("x-wattgate-p-local");
static EXPERIMENT: HeaderName = HeaderName::from_static("x-wattgate-experiment");
static ARM: HeaderName = HeaderName::from_static("x-wattgate-arm");
static GUARD: HeaderName = HeaderName::from_static("x-wattgate-guard");
static CONFIDENCE: HeaderName = HeaderName::from_static("x-wattgate-confidence");

fn answer_response(answer: Answer) -> Response {
    let mut response = match answer.body {
        AnswerBody::Json(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        AnswerBody::Stream(frames) => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                // Ask reverse proxies (nginx) not to buffer the stream.
                (
                    HeaderName::from_static("x-accel-buffering"),
                    HeaderValue::from_static("no"),
                ),
            ],
            Body::from_stream(frames.map(Ok::<_, Infallible>)),
        )
            .into_response(),
        AnswerBody::Error(e) => e.into_response(),
    };
    let route = &answer.route;
    let headers = response.headers_mut();
    headers.insert(ROUTE.clone(), HeaderValue::from_static(route.role.as_str()));
    headers.insert(
        REASON.clone(),
        HeaderValue::from_static(route.reason.as_str()),
    );
    if let Ok(v) = HeaderValue::from_str(&route.backend) {
        headers.insert(BACKEND.clone(), v);
    }
    if let Some(p) = route.p_local {
        // Shortest round-trip decimal: the same number `wattgate router score` prints.
        if let Ok(v) = HeaderValue::from_str(&p.to_string()) {
            headers.insert(P_LOCAL.clone(), v);
        }
    }
    if let Some((experiment, arm)) = &route.arm {
        // Names are validated to header-safe characters when the config loads.
        if let (Ok(e), Ok(a)) = (
            HeaderValue::from_str(experiment),
            HeaderValue::from_str(arm),
        ) {
            headers.insert(EXPERIMENT.clone(), e);
            headers.insert(ARM.clone(), a);
        }
    }
    if let Some(Ok(v)) = route.fallback_from.as_deref().map(HeaderValue::from_str) {
        headers.insert(FALLBACK_FROM.clone(), v);
    }
    if let Some(guard) = &route.guard {
        headers.insert(GUARD.clone(), HeaderValue::from_static(guard.decision));
        if let Some(c) = guard.confidence {
            if let Ok(v) = HeaderValue::from_str(&format!("{c:.4}")) {
                headers.insert(CONFIDENCE.clone(), v);
            }
        }
    }
    let overhead_ms = format!("{:.3}", answer.overhead.as_secs_f64() * 1000.0);
    if let Ok(v) = HeaderValue::from_str(&overhead_ms) {
        headers.insert(OVERHEAD.clone(), v);
    }
    response
}

#[derive(Serialize)]
struct ModelEntry<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    /// `chat` (chat completions, Responses, Messages) or `embeddings` (`/v1/embeddings`).
    kind: &'static str,
}

fn model_entries(state: &AppState) -> Vec<ModelEntry<'_>> {
    let gateway = &state.inner.gateway;
    let alias = ModelEntry {
        id: gateway.alias(),
        object: "model",
        created: 0,
        owned_by: "wattgate",
        kind: "chat",
    };
    std::iter::once(alias)
        .chain(gateway.backends().iter().map(|b| ModelEntry {
            id: &b.info().name,
            object: "model",
            created: 0,
            owned_by: match b.info().role {
                crate::config::Role::Local => "wattgate-local",
                crate::config::Role::Cloud => "wattgate-cloud",
            },
            kind: "chat",
        }))
        .chain(state.inner.embeddings.names().map(|id| ModelEntry {
            id,
            object: "model",
            created: 0,
            owned_by: "wattgate-embeddings",
            kind: "embeddings",
        }))
        .collect()
}

/// `GET /v1/models`: the routing alias and every configured backend.
pub async fn list_models(State(state): State<AppState>) -> Response {
    Json(json!({"object": "list", "data": model_entries(&state)})).into_response()
}

/// `GET /v1/models/{id}`.
pub async fn get_model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let entries = model_entries(&state);
    match entries.iter().find(|m| m.id == id) {
        Some(m) => Json(m).into_response(),
        None => {
            let ids: Vec<&str> = entries.iter().map(|m| m.id).collect();
            ApiError::model_not_found(&id, &ids).into_response()
        }
    }
}

/// `GET /healthz`: the process is up and serving HTTP.
pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// One backend's readiness.
#[derive(Debug, Clone, Serialize)]
pub struct BackendReadiness {
    name: String,
    role: &'static str,
    ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Probe results, reused for a short while so that frequent probes do not hammer upstreams.
pub struct ReadinessCache {
    ttl: Duration,
    last: tokio::sync::Mutex<Option<(Instant, Arc<Vec<BackendReadiness>>)>>,
}

impl ReadinessCache {
    /// A cache that keeps results for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            last: tokio::sync::Mutex::new(None),
        }
    }
}

/// `GET /readyz`: 200 when at least one backend can serve, 503 otherwise; lists each backend.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let cache = &state.inner.readiness;
    let report = {
        // Holding the lock while probing makes concurrent probes share one round of checks.
        let mut last = cache.last.lock().await;
        match last.as_ref() {
            Some((at, report)) if at.elapsed() < cache.ttl => report.clone(),
            _ => {
                let backends = state.inner.gateway.backends();
                let results = futures::future::join_all(backends.iter().map(|b| b.probe())).await;
                let report: Arc<Vec<BackendReadiness>> = Arc::new(
                    backends
                        .iter()
                        .zip(results)
                        .map(|(b, r)| BackendReadiness {
                            name: b.info().name.clone(),
                            role: b.info().role.as_str(),
                            ready: r.is_ok(),
                            error: r.err(),
                        })
                        .collect(),
                );
                *last = Some((Instant::now(), report.clone()));
                report
            }
        }
    };
    let ready = report.iter().any(|b| b.ready);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "backends": &*report,
    });
    (status, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(State(state): State<AppState>) -> Response {
    state.inner.gateway.refresh_gauges();
    match state.inner.metrics.render() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::internal(format!("Could not render metrics: {e}.")).into_response(),
    }
}

/// Reads duration parameters (`since`, `step`) of a savings query: microseconds each, `None`
/// when absent; anything else is a 400 naming the parameter.
fn duration_params(
    uri: &Uri,
    endpoint: &str,
    allowed: &[&str],
) -> Result<std::collections::HashMap<String, u64>, ApiError> {
    let mut out = std::collections::HashMap::new();
    for (key, value) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        if !allowed.contains(&key.as_ref()) {
            return Err(ApiError::invalid_request(format!(
                "Unknown query parameter `{key}`; {endpoint} takes {} (durations like 30m, 24h, 7d).",
                allowed.join(", ")
            ))
            .with_param(&key));
        }
        let seconds = crate::savings::parse_duration(&value).map_err(|e| {
            ApiError::invalid_request(format!("Query parameter `{key}`: {e}."))
                .with_param(&key)
                .with_code("invalid_duration")
        })?;
        out.insert(key.into_owned(), (seconds * 1e6) as u64);
    }
    Ok(out)
}

/// `GET /v1/savings/series[?since=1h&step=1m]`: requests, local share, joules, dollars and
/// routing reasons per time bucket, from the ledger's rollups (the dashboard's charts): `since`
/// is rounded down to a whole minute (hour for steps of an hour or more) and `step` up to one.
pub async fn savings_series(State(state): State<AppState>, uri: Uri) -> Response {
    let params = match duration_params(&uri, "/v1/savings/series", &["since", "step"]) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let now = crate::ledger::now_us();
    let since_us = now.saturating_sub(params.get("since").copied().unwrap_or(3_600_000_000));
    let step_us = params
        .get("step")
        .copied()
        .unwrap_or(60_000_000)
        .max(1_000_000);
    let series = with_ledger(&state, move |ledger| ledger.series(since_us, now, step_us)).await;
    let (buckets, since_us, step_us) = match series {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    Json(json!({
        "object": "wattgate.savings_series",
        "since_us": since_us,
        "step_us": step_us,
        "energy_source": state.inner.gateway.metering().source().as_str(),
        "buckets": buckets,
    }))
    .into_response()
}

/// Runs a ledger read off the async runtime; 503 when the ledger is disabled, 500 when it
/// cannot be read.
async fn with_ledger<T: Send + 'static>(
    state: &AppState,
    read: impl FnOnce(&crate::ledger::Ledger) -> Result<T, crate::ledger::LedgerError> + Send + 'static,
) -> Result<T, ApiError> {
    let Some(ledger) = state.inner.ledger.clone() else {
        return Err(ApiError::unavailable(
            "The ledger is disabled (ledger.enabled = false); savings are only in /metrics.",
            "ledger_disabled",
        ));
    };
    match tokio::task::spawn_blocking(move || read(&ledger)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(ApiError::internal(format!(
            "Could not read the ledger: {e}."
        ))),
        Err(e) => Err(ApiError::internal(format!("Ledger read task failed: {e}."))),
    }
}

/// The ledger's rows from `since_us` on, read off the async runtime (see [`with_ledger`]).
pub(super) async fn ledger_rows(
    state: &AppState,
    since_us: u64,
) -> Result<Vec<crate::ledger::LedgerRow>, ApiError> {
    with_ledger(state, move |ledger| ledger.rows_since(since_us)).await
}

/// `GET /dashboard`: the built-in savings page (static HTML and JS, no external resources).
pub async fn dashboard() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
                ),
            ),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}

/// `GET /v1/savings[?since=24h]`: totals and percentages saved against cloud-only, from the
/// ledger's per-minute and per-hour rollups (`since` rounded down to its minute), so the answer
/// costs the same for a day of traffic or 90.
pub async fn savings(State(state): State<AppState>, uri: Uri) -> Response {
    let params = match duration_params(&uri, "/v1/savings", &["since"]) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let since_us = params
        .get("since")
        .map_or(0, |d| crate::ledger::now_us().saturating_sub(*d));
    let savings = match with_ledger(&state, move |ledger| ledger.savings_since(since_us)).await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let metering = state.inner.gateway.metering();
    let totals = metering.totals();
    Json(json!({
        "object": "wattgate.savings",
        "energy_meter": {
            "source": metering.source().as_str(),
            "measured": metering.source().is_measured(),
            "idle_joules_since_start": totals.idle_joules,
            "failed_readings": totals.failed_readings,
        },
        "baseline_backend": state.inner.baseline_backend,
        "savings": savings,
    }))
    .into_response()
}

/// `POST /v1/router/reload`: re-reads the router files and swaps them in (see
/// [`AppState::reload_routers`]); 422 naming the file when one does not load.
pub async fn reload_routers(State(state): State<AppState>) -> Response {
    let reloading = state.clone();
    match tokio::task::spawn_blocking(move || reloading.reload_routers()).await {
        Ok(Ok(loaded)) => Json(json!({
            "object": "wattgate.router_reload",
            "reloaded": true,
            "routers": loaded,
        }))
        .into_response(),
        Ok(Err(why)) => ApiError::unprocessable(
            format!("Router reload refused; the routers loaded before keep serving: {why}"),
            "router_reload_refused",
        )
        .into_response(),
        Err(e) => ApiError::internal(format!("Router reload task failed: {e}.")).into_response(),
    }
}

/// `GET /v1/ledger/graded`: every ledger row with an outcome, and its outcomes; what
/// `wattgate router train --from-ledger` reads while the daemon holds the ledger.
pub async fn graded(State(state): State<AppState>) -> Response {
    match with_ledger(&state, |ledger| ledger.graded()).await {
        Ok(rows) => Json(json!({"object": "list", "data": rows})).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Any path the gateway does not serve.
pub async fn unknown_endpoint(method: Method, uri: Uri) -> Response {
    ApiError::unknown_endpoint(method.as_str(), uri.path()).into_response()
}

/// A served path with the wrong method.
pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::method_not_allowed(method.as_str(), uri.path()).into_response()
}
