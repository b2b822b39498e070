//! The operator's own traffic as training rows: ledger rows a local backend answered, labeled by
//! their shadow verdicts and feedback.
//!
//! The public data labels other people's queries for models that may not be the one deployed.
//! A shadow check (the local answer graded against the cloud's) or a piece of feedback is a label
//! for *this* local model on *this* traffic, which is exactly what the router predicts. Rows
//! become [`Example`]s of one source, [`OWN_SOURCE`], so validation scores the public data's
//! head on them as one held-out group, and they carry a weight so a few hundred of them count
//! next to tens of thousands of public rows.

use std::collections::BTreeMap;

use serde::Serialize;

use super::data::Example;
use crate::ledger::{Graded, OutcomeSource};

/// How much an own-traffic row counts against one row of the public files, by default
/// (`--own-weight`). A deployment's first few hundred graded rows then weigh as much as a few
/// thousand public ones (the six shared files hold 27,779): enough to move the head on this
/// traffic without letting a small sample overrule the public data. Measured against weight 1
/// under the outer protocol (`router-models/README.md`, "Own-traffic labels"): no worse with 300
/// rows, +0.014 mean AUC with 1,000; heavier weights not measured.
pub const DEFAULT_WEIGHT: f64 = 5.0;

/// The source (validation group) of own-traffic rows.
pub const OWN_SOURCE: &str = "own-traffic";

/// The local label of own-traffic rows: their grade, for the local backend they name.
pub fn local_label(backend: &str) -> String {
    format!("own:{backend}")
}

/// The cloud label of own-traffic rows. A shadow verdict grades the local answer against the
/// cloud's, and feedback on a local answer says nothing of the cloud's, so the cloud is the
/// reference, scored 1.
pub const CLOUD_LABEL: &str = "own:cloud";

/// What the ledger held, and how much of it became training rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OwnCounts {
    /// Rows with at least one outcome.
    pub graded: usize,
    /// Of those, answered locally by the named backend (the others grade another model).
    pub of_backend: usize,
    /// Of those, without their text (recorded while `[ledger] store_prompts` was off).
    pub without_prompt: usize,
    /// Rows that became examples.
    pub used: usize,
    /// Of those, labeled by feedback (which wins where both exist).
    pub by_feedback: usize,
    /// Of those, labeled by a shadow check.
    pub by_shadow: usize,
}

/// Training rows from graded ledger rows of local `backend`, each of weight `weight`.
///
/// Only rows the backend answered and the client received (route `local`) are used: a cloud
/// answer's feedback grades the cloud. Where a request has both, feedback (the application's or
/// user's judgement) is the label rather than the shadow check's automatic one. The label is the
/// outcome's score (0..1), so a thumbs-down is 0 and a shadow pass is 1.
pub fn examples(graded: &[Graded], backend: &str, weight: f64) -> (Vec<Example>, OwnCounts) {
    let mut counts = OwnCounts {
        graded: graded.len(),
        ..OwnCounts::default()
    };
    let label = local_label(backend);
    let mut out = Vec::new();
    for g in graded {
        if g.row.route != "local" || g.row.backend != backend {
            continue;
        }
        counts.of_backend += 1;
        let Some(messages) = g.row.prompt.clone() else {
            counts.without_prompt += 1;
            continue;
        };
        let by = |source| g.outcomes.iter().find(|o| o.source == source);
        let Some(outcome) = by(OutcomeSource::Feedback).or_else(|| by(OutcomeSource::Shadow))
        else {
            continue;
        };
        match outcome.source {
            OutcomeSource::Feedback => counts.by_feedback += 1,
            OutcomeSource::Shadow => counts.by_shadow += 1,
        }
        counts.used += 1;
        out.push(Example {
            id: g.row.request_id.clone(),
            source: OWN_SOURCE.to_owned(),
            category: None,
            prompt: String::new(),
            messages: Some(messages),
            scores: BTreeMap::from([
                (label.clone(), outcome.score.clamp(0.0, 1.0)),
                (CLOUD_LABEL.to_owned(), 1.0),
            ]),
            weight,
        });
    }
    (out, counts)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::ledger::{LedgerRow, OutcomeRecord};

    fn row(id: &str, route: &str, backend: &str, prompt: bool) -> LedgerRow {
        let mut row: LedgerRow = serde_json::from_value(json!({
            "time_us": 1, "request_id": id, "route": route, "backend": backend,
            "reason": "router_local", "arm": null, "p_local": 0.7, "fallback_from": null,
            "status": 200, "outcome": "ok", "stream": false, "input_tokens": 5,
            "output_tokens": 3, "tokens_source": "upstream", "latency_s": 0.1, "ttft_s": null,
            "energy_source": "estimate",
            "bill": serde_json::to_value(crate::metering::Bill::default()).unwrap_or_default(),
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        if prompt {
            row.prompt = Some(vec![
                json!({"role": "user", "content": format!("question {id}")}),
            ]);
        }
        row
    }

    fn outcome(id: &str, source: OutcomeSource, score: f64) -> OutcomeRecord {
        OutcomeRecord {
            request_id: id.to_owned(),
            source,
            time_us: 2,
            score,
            thumbs: None,
            comment: None,
            detail: None,
            spend: None,
        }
    }

    #[test]
    fn only_local_answers_of_the_backend_with_text_become_rows_and_feedback_wins() {
        let graded = vec![
            Graded {
                row: row("a", "local", "small", true),
                outcomes: vec![
                    outcome("a", OutcomeSource::Shadow, 1.0),
                    outcome("a", OutcomeSource::Feedback, 0.0),
                ],
            },
            Graded {
                row: row("b", "local", "small", true),
                outcomes: vec![outcome("b", OutcomeSource::Shadow, 1.0)],
            },
            Graded {
                row: row("c", "local", "small", false),
                outcomes: vec![outcome("c", OutcomeSource::Shadow, 1.0)],
            },
            Graded {
                row: row("d", "cloud", "frontier", true),
                outcomes: vec![outcome("d", OutcomeSource::Feedback, 0.0)],
            },
            Graded {
                row: row("e", "local", "other", true),
                outcomes: vec![outcome("e", OutcomeSource::Feedback, 1.0)],
            },
        ];
        let (rows, counts) = examples(&graded, "small", 4.0);
        assert_eq!(
            counts,
            OwnCounts {
                graded: 5,
                of_backend: 3,
                without_prompt: 1,
                used: 2,
                by_feedback: 1,
                by_shadow: 1,
            }
        );
        let label = |id: &str| {
            rows.iter()
                .find(|e| e.id == id)
                .and_then(|e| e.scores.get("own:small").copied())
        };
        assert_eq!((label("a"), label("b")), (Some(0.0), Some(1.0)));
        assert!(rows
            .iter()
            .all(|e| e.weight == 4.0 && e.source == OWN_SOURCE && e.query().last_user() != ""));
    }
}
