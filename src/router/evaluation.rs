//! How good a router is: the measures `wattgate router eval` prints, training reports per held-out
//! source, and the router cards record.
//!
//! A router orders queries by `p_local`; serving the top fraction `s` locally and the rest in the
//! cloud gives a mean quality `q(s)`. The measures summarise that curve:
//! - `auc`: ROC AUC of `p_local` for "the local model answers" (local score >= 0.5);
//! - `apgr`: the average, over local shares from 0 to 1, of the performance gap recovered
//!   `(q(s) - q_local_only) / (q_cloud_only - q_local_only)` (RouteLLM's APGR, integrated over
//!   the share served locally; the same number as over the share sent to the cloud);
//! - `local_share_at_1pt`: the largest `s` with `q(s) >= q_cloud_only - 0.01`;
//! - `oracle_local_share`: the share of queries the local model answers at least as well as the
//!   cloud, which a perfect router keeps local at no loss.
//!
//! Queries with equal `p_local` cannot be separated by a threshold, so the curve has a point only
//! where `p_local` changes; between points it is linear (what splitting a tied group at random
//! gives on average). Scores are on a 0..1 scale, so "1 point" is 0.01.

use serde::{Deserialize, Serialize};

/// One query: the router's score and how well each side answers it (0..1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// The router's estimate that the local model answers well.
    pub p_local: f64,
    /// The local model's score on the query.
    pub local: f64,
    /// The cloud model's score on the query.
    pub cloud: f64,
}

/// The measures of one router on one data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Queries evaluated.
    pub n: usize,
    /// ROC AUC; `None` when every query has the same label.
    pub auc: Option<f64>,
    /// Average performance gap recovered; `None` when the local model is not worse overall.
    pub apgr: Option<f64>,
    /// Largest local share within 1 point of cloud-only quality.
    pub local_share_at_1pt: f64,
    /// Share a perfect router keeps local at no loss.
    pub oracle_local_share: f64,
    /// Mean quality with every query served locally.
    pub local_only_quality: f64,
    /// Mean quality with every query served by the cloud.
    pub cloud_only_quality: f64,
}

/// Evaluates `rows`; fails on an empty set or a score that is not a finite number.
pub fn evaluate(rows: &[Outcome]) -> Result<Report, String> {
    if rows.is_empty() {
        return Err("no queries to evaluate".to_owned());
    }
    if let Some(i) = rows
        .iter()
        .position(|r| !(r.p_local.is_finite() && r.local.is_finite() && r.cloud.is_finite()))
    {
        return Err(format!("query {i} has a score that is not a finite number"));
    }
    let n = rows.len() as f64;
    let local_only = rows.iter().map(|r| r.local).sum::<f64>() / n;
    let cloud_only = rows.iter().map(|r| r.cloud).sum::<f64>() / n;
    let curve = curve(rows);

    let gap = cloud_only - local_only;
    let apgr = (gap > 0.0).then(|| {
        curve
            .windows(2)
            .map(|w| {
                let ((s0, q0), (s1, q1)) = (w[0], w[1]);
                (s1 - s0) * ((q0 + q1) / 2.0 - local_only) / gap
            })
            .sum::<f64>()
    });

    let target = cloud_only - 0.01;
    let mut best = 0.0f64;
    for w in curve.windows(2) {
        let ((s0, q0), (s1, q1)) = (w[0], w[1]);
        if q1 >= target - 1e-12 {
            best = best.max(s1);
        } else if q0 >= target - 1e-12 {
            // The curve crosses the target inside this segment.
            best = best.max(s0 + (q0 - target) / (q0 - q1) * (s1 - s0));
        }
    }

    Ok(Report {
        n: rows.len(),
        auc: auc(rows),
        apgr,
        local_share_at_1pt: best,
        oracle_local_share: rows.iter().filter(|r| r.local >= r.cloud).count() as f64 / n,
        local_only_quality: local_only,
        cloud_only_quality: cloud_only,
    })
}

/// (local share, mean quality) at each threshold between distinct scores, from all-cloud (0, .)
/// to all-local (1, .).
fn curve(rows: &[Outcome]) -> Vec<(f64, f64)> {
    let n = rows.len() as f64;
    let mut order: Vec<&Outcome> = rows.iter().collect();
    order.sort_by(|a, b| b.p_local.total_cmp(&a.p_local));
    let mut quality_sum: f64 = rows.iter().map(|r| r.cloud).sum();
    let mut points = vec![(0.0, quality_sum / n)];
    for (k, r) in order.iter().enumerate() {
        quality_sum += r.local - r.cloud;
        let last_of_tie = order
            .get(k + 1)
            .is_none_or(|next| next.p_local != r.p_local);
        if last_of_tie {
            points.push(((k + 1) as f64 / n, quality_sum / n));
        }
    }
    points
}

/// ROC AUC of `p_local` for `local >= 0.5`, with tied scores counted as half (Mann-Whitney U).
/// ROC AUC of `p_local` for "the local model answers" (local score >= 0.5); `None` with one class.
pub fn auc(rows: &[Outcome]) -> Option<f64> {
    let mut order: Vec<&Outcome> = rows.iter().collect();
    order.sort_by(|a, b| a.p_local.total_cmp(&b.p_local));
    // Average ranks (1-based) over groups of equal scores.
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && order[j + 1].p_local == order[i].p_local {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_pos += avg_rank * order[i..=j].iter().filter(|r| r.local >= 0.5).count() as f64;
        i = j + 1;
    }
    let pos = rows.iter().filter(|r| r.local >= 0.5).count() as f64;
    let neg = rows.len() as f64 - pos;
    (pos > 0.0 && neg > 0.0).then(|| (rank_sum_pos - pos * (pos + 1.0) / 2.0) / (pos * neg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(p_local: f64, local: f64, cloud: f64) -> Outcome {
        Outcome {
            p_local,
            local,
            cloud,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn a_perfect_router_on_four_queries() {
        // Local answers the two top-scored queries; the cloud answers all but the last.
        let rows = [
            o(0.9, 1.0, 1.0),
            o(0.8, 1.0, 1.0),
            o(0.2, 0.0, 1.0),
            o(0.1, 0.0, 0.0),
        ];
        let r = evaluate(&rows).unwrap_or_else(|e| panic!("{e}"));
        assert!(close(r.local_only_quality, 0.5));
        assert!(close(r.cloud_only_quality, 0.75));
        assert_eq!(r.auc, Some(1.0));
        // Curve: s=0 .75, .25 .75, .5 .75, .75 .5, 1 .5; PGR 1,1,1,0,0 -> trapezoids .25 each:
        // 1, 1, .5, 0 -> mean .625.
        assert!(r.apgr.is_some_and(|a| close(a, 0.625)), "{r:?}");
        // Quality stays 0.75 up to s = 0.5, then falls 0.25 over the next quarter: the 0.74
        // target is crossed 0.01 / 0.25 of the way, at s = 0.51.
        assert!(close(r.local_share_at_1pt, 0.51), "{r:?}");
        // Local >= cloud on queries 1, 2 and 4.
        assert!(close(r.oracle_local_share, 0.75));
    }

    #[test]
    fn a_reversed_router_recovers_less_and_ranks_below_chance() {
        let rows = [
            o(0.1, 1.0, 1.0),
            o(0.2, 1.0, 1.0),
            o(0.8, 0.0, 1.0),
            o(0.9, 0.0, 0.0),
        ];
        let r = evaluate(&rows).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.auc, Some(0.0));
        // Curve: 0 .75; .25 .75 (last query: both 0); .5 .5; .75 .5; 1 .5 -> PGR 1,1,0,0,0.
        assert!(r.apgr.is_some_and(|a| close(a, 0.375)), "{r:?}");
        assert!(close(r.local_share_at_1pt, 0.26), "{r:?}");
    }

    #[test]
    fn tied_scores_are_one_point_and_count_half_in_the_auc() {
        let rows = [o(0.5, 1.0, 1.0), o(0.5, 0.0, 1.0)];
        let r = evaluate(&rows).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.auc, Some(0.5));
        // Only the all-cloud and all-local points: quality 1 -> .5, linear between.
        assert!(r.apgr.is_some_and(|a| close(a, 0.5)), "{r:?}");
        assert!(close(r.local_share_at_1pt, 0.02), "{r:?}");
    }

    #[test]
    fn undefined_measures_and_bad_input() {
        // Local never worse: no gap to recover; every label equal: no AUC.
        let r = evaluate(&[o(0.3, 1.0, 1.0), o(0.7, 1.0, 0.0)]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.apgr, None);
        assert_eq!(r.auc, None);
        assert!(close(r.local_share_at_1pt, 1.0));
        assert!(evaluate(&[]).is_err());
        let err = evaluate(&[o(0.1, 1.0, 1.0), o(f64::NAN, 0.0, 1.0)])
            .err()
            .unwrap_or_default();
        assert!(err.contains("query 1"), "{err}");
    }
}
