//! Experiment endpoints: outcomes in (`POST /v1/feedback`), reports out
//! (`GET /v1/experiments`, `GET /v1/experiments/{name}`).

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::handlers::{ledger_rows, read_body};
use super::AppState;
use crate::error::ApiError;
use crate::experiments::{feedback, report};
use crate::ledger::{OutcomeError, OutcomeRecord, Stored};

/// Feedback bodies are small; anything larger is a client bug.
const MAX_FEEDBACK_BYTES: usize = 64 * 1024;

/// `POST /v1/feedback`: grades one answered request. 200 with `status` created, unchanged or
/// replaced (posting again is safe: one outcome per request id); 404 for an id the ledger does
/// not have; 400 naming a bad field; 503 when the ledger is off.
pub async fn post_feedback(State(state): State<AppState>, request: Request) -> Response {
    let body = match read_body(
        request.into_body(),
        MAX_FEEDBACK_BYTES,
        state.inner.body_timeout,
    )
    .await
    {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    let outcome = match feedback::parse(&body) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let gateway = &state.inner.gateway;
    let Some(ledger) = gateway.ledger() else {
        return ApiError::unavailable(
            "Feedback is stored in the ledger, which is disabled (ledger.enabled = false).",
            "ledger_disabled",
        )
        .into_response();
    };
    let score = outcome.score;
    let success = outcome.success();
    let request_id = outcome.request_id.clone();
    match ledger.record_outcome(outcome).await {
        Ok(receipt) => {
            let (experiment, arm) = receipt
                .arm
                .clone()
                .map_or((None, None), |(e, a)| (Some(e), Some(a)));
            // Counted once per request: a replacement changes the report, not the counter.
            if receipt.stored == Stored::Created {
                if let (Some(e), Some(a)) = (&experiment, &arm) {
                    gateway
                        .metrics()
                        .experiment_outcomes
                        .with_label_values(&[
                            e.as_str(),
                            a.as_str(),
                            "feedback",
                            if success { "success" } else { "failure" },
                        ])
                        .inc();
                }
            }
            Json(json!({
                "object": "wattgate.feedback",
                "request_id": request_id,
                "status": receipt.stored,
                "score": score,
                "experiment": experiment,
                "arm": arm,
            }))
            .into_response()
        }
        Err(OutcomeError::UnknownRequest(id)) => ApiError::not_found(
            format!(
                "No request with id `{id}` in the ledger: use the x-request-id header of a chat completion served by this gateway (rows older than ledger.retention_days are gone)."
            ),
            "request_not_found",
        )
        .with_param("request_id")
        .into_response(),
        Err(OutcomeError::Storage(e)) => {
            ApiError::internal(format!("Could not store the feedback: {e}.")).into_response()
        }
    }
}

/// `GET /v1/experiments`: the report of every configured experiment (and of any other the
/// ledger has rows for).
pub async fn list_experiments(State(state): State<AppState>) -> Response {
    match reports(&state, None).await {
        Ok(reports) => Json(json!({"object": "list", "data": reports})).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/experiments/{name}`: one experiment's report; 404 when neither the config nor the
/// ledger knows it.
pub async fn get_experiment(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match reports(&state, Some(&name)).await {
        Ok(mut reports) if !reports.is_empty() => Json(reports.remove(0)).into_response(),
        Ok(_) => {
            let known = report::experiment_names(&state.inner.experiments, &[]);
            ApiError::not_found(
                format!(
                    "No experiment `{name}` in the config or the ledger (configured: {}).",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
                "experiment_not_found",
            )
            .into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn reports(
    state: &AppState,
    only: Option<&str>,
) -> Result<Vec<report::ExperimentReport>, ApiError> {
    let rows = ledger_rows(state, 0).await?;
    let outcomes = ledger_outcomes(state).await?;
    let configured = &state.inner.experiments;
    let names: Vec<String> = match only {
        Some(name) => vec![name.to_owned()],
        None => report::experiment_names(configured, &rows),
    };
    Ok(names
        .iter()
        .filter_map(|name| {
            let config = configured.iter().find(|e| &e.name == name);
            report::build(name, config, &rows, &outcomes, 0)
        })
        .collect())
}

async fn ledger_outcomes(state: &AppState) -> Result<Vec<OutcomeRecord>, ApiError> {
    let Some(ledger) = state.inner.ledger.clone() else {
        return Err(ApiError::unavailable(
            "The ledger is disabled (ledger.enabled = false); experiment reports are built from it.",
            "ledger_disabled",
        ));
    };
    match tokio::task::spawn_blocking(move || ledger.outcomes()).await {
        Ok(Ok(outcomes)) => Ok(outcomes),
        Ok(Err(e)) => Err(ApiError::internal(format!(
            "Could not read the ledger: {e}."
        ))),
        Err(e) => Err(ApiError::internal(format!("Ledger read task failed: {e}."))),
    }
}
