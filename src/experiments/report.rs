//! The experiment report: per arm, how much traffic stayed local, how good the answers were
//! (feedback and shadow checks, with 95% Wilson intervals), what it saved against cloud-only,
//! and how each arm compares with the control, in numbers and in one plain sentence.
//!
//! Built from ledger rows and outcomes alone, so `wattgate experiments report` (reading the
//! file) and `GET /v1/experiments/NAME` (the running daemon) give the same answer.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::stats::{two_proportion, Comparison, Rate};
use crate::config::ExperimentConfig;
use crate::ledger::{LedgerRow, OutcomeRecord, OutcomeSource};
use crate::savings::Totals;

/// Below this p-value a difference is called significant (two-sided, 95% confidence).
const ALPHA: f64 = 0.05;

/// The whole report for one experiment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExperimentReport {
    /// `wattgate.experiment_report`.
    pub object: String,
    /// The experiment.
    pub experiment: String,
    /// Whether the current config has it (a removed experiment is still reported from rows).
    pub configured: bool,
    /// Whether it enrolls requests now.
    pub enabled: bool,
    /// What is assigned (`user`, `header`, `request`), when configured.
    pub unit: Option<String>,
    /// The arm every other is compared with.
    pub control: String,
    /// Rows from this time on (microseconds since the Unix epoch); 0 means all.
    pub since_us: u64,
    /// The arms: configured ones in config order, then any only the ledger knows.
    pub arms: Vec<ArmReport>,
}

/// One arm's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmReport {
    /// The arm.
    pub arm: String,
    /// Its configured weight (null when no longer configured).
    pub weight: Option<f64>,
    /// Whether this is the control.
    pub control: bool,
    /// Requests routed by this arm.
    pub requests: u64,
    /// Requests served locally, of all.
    pub local_share: Rate,
    /// Feedback (`POST /v1/feedback`): successes are scores >= 0.5 (thumbs up).
    pub feedback: OutcomeStats,
    /// Shadow checks of local answers against the cloud's: successes are agreements.
    pub shadow: OutcomeStats,
    /// What shadow checks of this arm spent (estimated; never part of `savings`).
    pub shadow_spend: ShadowSpendTotals,
    /// Energy, compute and cost against cloud-only (the savings report's figures).
    pub savings: Totals,
    /// Against the control; null for the control itself.
    pub vs_control: Option<VsControl>,
    /// The plain-language reading; null for the control itself.
    pub verdict: Option<String>,
}

/// Graded answers of one source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutcomeStats {
    /// Successes of graded requests, with the 95% Wilson interval.
    pub success: Rate,
    /// Mean score (0..1).
    pub mean_score: Option<f64>,
}

/// Spend of an arm's shadow checks.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ShadowSpendTotals {
    /// Dollars at configured prices.
    pub usd: f64,
    /// Joules (tokens x J/token x PUE: an estimate).
    pub joules_estimated: f64,
    /// Tokens sent.
    pub input_tokens: u64,
    /// Tokens generated.
    pub output_tokens: u64,
}

/// An arm against the control.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VsControl {
    /// Local share, arm minus control, with the two-proportion test.
    pub local_share: Option<Comparison>,
    /// Feedback success rate, arm minus control.
    pub feedback: Option<Comparison>,
    /// Shadow agreement rate, arm minus control.
    pub shadow: Option<Comparison>,
    /// Energy saved (% of cloud-only), arm minus control, in percentage points.
    pub energy_saved_points: Option<f64>,
    /// Compute saved (% of cloud-only), arm minus control, in points.
    pub compute_saved_points: Option<f64>,
    /// Cost saved (% of cloud-only), arm minus control, in points.
    pub cost_saved_points: Option<f64>,
}

#[derive(Default)]
struct Tally {
    rows: Totals,
    feedback: Vec<f64>,
    shadow: Vec<f64>,
    spend: ShadowSpendTotals,
}

impl Tally {
    fn stats(scores: &[f64]) -> OutcomeStats {
        let successes = scores.iter().filter(|s| **s >= 0.5).count() as u64;
        let n = scores.len() as u64;
        OutcomeStats {
            success: Rate::new(successes, n),
            mean_score: (n > 0).then(|| scores.iter().sum::<f64>() / n as f64),
        }
    }
}

/// The names worth reporting: configured experiments, then any other the rows mention.
pub fn experiment_names(configured: &[ExperimentConfig], rows: &[LedgerRow]) -> Vec<String> {
    let mut names: Vec<String> = configured.iter().map(|e| e.name.clone()).collect();
    for row in rows {
        if let Some(e) = &row.experiment {
            if !names.contains(e) {
                names.push(e.clone());
            }
        }
    }
    names
}

/// The report of experiment `name`; `None` when it is neither configured nor in the rows.
pub fn build(
    name: &str,
    config: Option<&ExperimentConfig>,
    rows: &[LedgerRow],
    outcomes: &[OutcomeRecord],
    since_us: u64,
) -> Option<ExperimentReport> {
    let mut order: Vec<String> = config
        .map(|c| c.arms.iter().map(|a| a.name.clone()).collect())
        .unwrap_or_default();
    let mut tallies: HashMap<String, Tally> = HashMap::new();
    let mut arm_of: HashMap<&str, String> = HashMap::new();
    for row in rows
        .iter()
        .filter(|r| r.experiment.as_deref() == Some(name))
    {
        let Some(arm) = &row.arm else { continue };
        if !order.contains(arm) {
            order.push(arm.clone());
        }
        tallies.entry(arm.clone()).or_default().rows.add(row);
        arm_of.insert(row.request_id.as_str(), arm.clone());
    }
    if config.is_none() && order.is_empty() {
        return None;
    }
    for outcome in outcomes {
        let Some(arm) = arm_of.get(outcome.request_id.as_str()) else {
            continue;
        };
        let tally = tallies.entry(arm.clone()).or_default();
        match outcome.source {
            OutcomeSource::Feedback => tally.feedback.push(outcome.score),
            OutcomeSource::Shadow => {
                tally.shadow.push(outcome.score);
                if let Some(s) = outcome.spend {
                    tally.spend.usd += s.usd;
                    tally.spend.joules_estimated += s.joules_estimated;
                    tally.spend.input_tokens += s.input_tokens;
                    tally.spend.output_tokens += s.output_tokens;
                }
            }
        }
    }
    let control = config
        .map(|c| c.control_arm().to_owned())
        .or_else(|| order.first().cloned())
        .unwrap_or_default();
    let mut arms: Vec<ArmReport> = order
        .iter()
        .map(|arm| {
            let tally = tallies.remove(arm).unwrap_or_default();
            let weight = config
                .and_then(|c| c.arms.iter().find(|a| &a.name == arm))
                .map(|a| a.weight);
            ArmReport {
                arm: arm.clone(),
                weight,
                control: *arm == control,
                requests: tally.rows.requests,
                local_share: Rate::new(tally.rows.local_requests, tally.rows.requests),
                feedback: Tally::stats(&tally.feedback),
                shadow: Tally::stats(&tally.shadow),
                shadow_spend: tally.spend,
                savings: tally.rows,
                vs_control: None,
                verdict: None,
            }
        })
        .collect();
    if let Some(base) = arms.iter().find(|a| a.control).cloned() {
        for arm in arms.iter_mut().filter(|a| !a.control) {
            let vs = compare(arm, &base);
            arm.verdict = Some(verdict(arm, &base, &vs));
            arm.vs_control = Some(vs);
        }
    }
    Some(ExperimentReport {
        object: "wattgate.experiment_report".to_owned(),
        experiment: name.to_owned(),
        configured: config.is_some(),
        enabled: config.is_some_and(|c| c.enabled),
        unit: config.map(|c| c.unit.as_str().to_owned()),
        control,
        since_us,
        arms,
    })
}

fn compare(arm: &ArmReport, base: &ArmReport) -> VsControl {
    let test = |a: &Rate, b: &Rate| two_proportion(a.successes, a.n, b.successes, b.n);
    let points = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
    VsControl {
        local_share: test(&arm.local_share, &base.local_share),
        feedback: test(&arm.feedback.success, &base.feedback.success),
        shadow: test(&arm.shadow.success, &base.shadow.success),
        energy_saved_points: points(
            arm.savings.energy_joules.saved_percent,
            base.savings.energy_joules.saved_percent,
        ),
        compute_saved_points: points(
            arm.savings.compute_flops.saved_percent,
            base.savings.compute_flops.saved_percent,
        ),
        cost_saved_points: points(
            arm.savings.cost_usd.saved_percent,
            base.savings.cost_usd.saved_percent,
        ),
    }
}

/// One paragraph: quality first (feedback where both arms have it, else shadow checks), then
/// local share and savings.
fn verdict(arm: &ArmReport, base: &ArmReport, vs: &VsControl) -> String {
    let mut out = String::new();
    let quality = match (&vs.feedback, &vs.shadow) {
        (Some(c), _) => Some((c, "feedback success", &arm.feedback, &base.feedback)),
        (None, Some(c)) => Some((c, "shadow agreement", &arm.shadow, &base.shadow)),
        (None, None) => None,
    };
    match quality {
        None => {
            let _ = write!(
                out,
                "No graded answers in both `{}` and `{}` yet: post outcomes to /v1/feedback or turn on shadow checks.",
                arm.arm, base.arm
            );
        }
        Some((c, what, a, b)) => {
            let (ra, rb) = (a.success.rate.unwrap_or(0.0), b.success.rate.unwrap_or(0.0));
            let figures = format!(
                "{what} {:.1}% vs {:.1}% ({:+.1} points, {}, n = {} vs {})",
                ra * 100.0,
                rb * 100.0,
                c.difference * 100.0,
                p_text(c.p_value),
                a.success.n,
                b.success.n
            );
            if c.p_value < ALPHA && c.difference > 0.0 {
                let _ = write!(out, "Better than `{}`: {figures}.", base.arm);
            } else if c.p_value < ALPHA {
                let _ = write!(out, "Worse than `{}`: {figures}.", base.arm);
            } else {
                match c.samples_needed_per_arm {
                    Some(need) => {
                        let more = need.saturating_sub(a.success.n.min(b.success.n));
                        let _ = write!(
                            out,
                            "Not yet significant: {figures}. About {more} more graded requests per arm would detect a difference this size (95% confidence, 80% power)."
                        );
                    }
                    None => {
                        let _ = write!(out, "No difference so far: {figures}.");
                    }
                }
            }
        }
    }
    if let Some(c) = &vs.local_share {
        let _ = write!(
            out,
            " Local share {:.1}% vs {:.1}% ({:+.1} points, {})",
            arm.local_share.rate.unwrap_or(0.0) * 100.0,
            base.local_share.rate.unwrap_or(0.0) * 100.0,
            c.difference * 100.0,
            p_text(c.p_value)
        );
        match vs.energy_saved_points {
            Some(d) => {
                let _ = write!(
                    out,
                    "; energy saved against cloud-only {d:+.1} points, cost saved {:+.1} points.",
                    vs.cost_saved_points.unwrap_or(0.0)
                );
            }
            None => out.push('.'),
        }
    }
    out
}

/// "p = 0.034", or "p < 0.001" where three decimals would print 0.
fn p_text(p: f64) -> String {
    if p < 0.001 {
        "p < 0.001".to_owned()
    } else {
        format!("p = {p:.3}")
    }
}

impl ExperimentReport {
    /// A plain-text table for terminals.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let state = match (self.configured, self.enabled) {
            (false, _) => "not in the config; from the ledger",
            (true, true) => "enabled",
            (true, false) => "disabled",
        };
        let _ = writeln!(
            out,
            "experiment {} ({state}{}), control `{}`",
            self.experiment,
            self.unit
                .as_ref()
                .map(|u| format!(", unit {u}"))
                .unwrap_or_default(),
            self.control
        );
        let _ = writeln!(
            out,
            "{:<16} {:>8}  {:<22} {:<28} {:<28} {:>9} {:>9}",
            "arm",
            "requests",
            "local share [95% CI]",
            "feedback success [CI] (n)",
            "shadow agree [CI] (n)",
            "energy",
            "cost"
        );
        for arm in &self.arms {
            let pct = |r: &Rate| match (r.rate, r.ci95) {
                (Some(v), Some([lo, hi])) => {
                    format!("{:.1}% [{:.1}, {:.1}]", v * 100.0, lo * 100.0, hi * 100.0)
                }
                _ => "-".to_owned(),
            };
            let graded = |s: &OutcomeStats| format!("{} ({})", pct(&s.success), s.success.n);
            let saved = |p: Option<f64>| p.map_or("-".to_owned(), |v| format!("{v:.1}%"));
            let name = if arm.control {
                format!("{} *", arm.arm)
            } else {
                arm.arm.clone()
            };
            let _ = writeln!(
                out,
                "{:<16} {:>8}  {:<22} {:<28} {:<28} {:>9} {:>9}",
                name,
                arm.requests,
                pct(&arm.local_share),
                graded(&arm.feedback),
                graded(&arm.shadow),
                saved(arm.savings.energy_joules.saved_percent),
                saved(arm.savings.cost_usd.saved_percent),
            );
        }
        let _ = writeln!(
            out,
            "(* control; energy and cost: saved against cloud-only; local energy is {}, cloud energy estimated)",
            energy_basis(&self.arms)
        );
        for arm in &self.arms {
            if arm.shadow_spend.usd > 0.0 {
                let _ = writeln!(
                    out,
                    "shadow checks of `{}` spent ${:.4} and ~{:.0} J (estimated; not in savings)",
                    arm.arm, arm.shadow_spend.usd, arm.shadow_spend.joules_estimated
                );
            }
        }
        for arm in &self.arms {
            if let Some(v) = &arm.verdict {
                let _ = writeln!(out, "{}: {v}", arm.arm);
            }
        }
        out
    }
}

/// "measured (nvml)", "estimated (estimate)" or a mix, from the rows' meter sources.
fn energy_basis(arms: &[ArmReport]) -> String {
    let mut sources: Vec<&str> = arms
        .iter()
        .flat_map(|a| a.savings.local_joules_by_source.keys().map(String::as_str))
        .collect();
    sources.sort_unstable();
    sources.dedup();
    if sources.is_empty() {
        return "not metered yet".to_owned();
    }
    sources
        .iter()
        .map(|s| {
            let kind = crate::metering::EnergySource::from_label(s)
                .map_or("unknown", crate::metering::EnergySource::kind);
            format!("{kind} ({s})")
        })
        .collect::<Vec<_>>()
        .join(" + ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::Bill;

    fn row(id: usize, arm: &str, local: bool) -> LedgerRow {
        LedgerRow {
            time_us: id as u64,
            request_id: format!("{arm}-{id}"),
            route: if local { "local" } else { "cloud" }.to_owned(),
            backend: "b".to_owned(),
            reason: "router_local".to_owned(),
            experiment: Some("e".to_owned()),
            arm: Some(arm.to_owned()),
            p_local: None,
            fallback_from: None,
            status: 200,
            outcome: "ok".to_owned(),
            stream: false,
            input_tokens: 1,
            output_tokens: 1,
            tokens_source: "upstream".to_owned(),
            latency_s: 0.1,
            ttft_s: None,
            energy_source: "estimate".to_owned(),
            bill: Bill::default(),
            guard: None,
            prompt: None,
        }
    }

    fn feedback(id: &str, score: f64) -> OutcomeRecord {
        OutcomeRecord {
            request_id: id.to_owned(),
            source: OutcomeSource::Feedback,
            time_us: 0,
            score,
            thumbs: None,
            comment: None,
            detail: None,
            spend: None,
        }
    }

    /// 100 requests per arm; `successes` of them graded 1, the rest 0; `local` served locally.
    fn arm(name: &str, successes: usize, local: usize) -> (Vec<LedgerRow>, Vec<OutcomeRecord>) {
        let rows: Vec<LedgerRow> = (0..100).map(|i| row(i, name, i < local)).collect();
        let outcomes = rows
            .iter()
            .enumerate()
            .map(|(i, r)| feedback(&r.request_id, if i < successes { 1.0 } else { 0.0 }))
            .collect();
        (rows, outcomes)
    }

    fn report(a: (usize, usize), b: (usize, usize)) -> ExperimentReport {
        let (mut rows, mut outcomes) = arm("control", a.0, a.1);
        let (r, o) = arm("treatment", b.0, b.1);
        rows.extend(r);
        outcomes.extend(o);
        // An outcome for a request outside the experiment is ignored.
        outcomes.push(feedback("elsewhere", 1.0));
        build("e", None, &rows, &outcomes, 0).unwrap_or_else(|| unreachable!())
    }

    #[test]
    fn verdicts_follow_the_two_proportion_test() {
        // 60/100 against 45/100: z = 2.124, p = 0.0337 (hand-computed in stats.rs): better.
        let r = report((45, 50), (60, 80));
        assert_eq!(r.control, "control");
        let t = &r.arms[1];
        assert_eq!((t.requests, t.feedback.success.successes), (100, 60));
        let vs = t
            .vs_control
            .as_ref()
            .and_then(|v| v.feedback)
            .unwrap_or_else(|| unreachable!());
        assert!((vs.p_value - 0.033_672).abs() < 2e-6, "{}", vs.p_value);
        let verdict = t.verdict.as_deref().unwrap_or_default();
        assert!(verdict.starts_with("Better than `control`: feedback success 60.0% vs 45.0% (+15.0 points, p = 0.034, n = 100 vs 100)."), "{verdict}");
        // 80 vs 50 local: z = 4.447, p = 8.7e-6.
        assert!(
            verdict.contains("Local share 80.0% vs 50.0% (+30.0 points, p < 0.001)"),
            "{verdict}"
        );

        let worse = report((60, 50), (45, 50));
        assert!(worse.arms[1]
            .verdict
            .as_deref()
            .unwrap_or_default()
            .starts_with("Worse than `control`"));

        // 50 vs 45 of 100: p = 0.479; 0.50 vs 0.45 needs 1,565 per arm, so 1,465 more.
        let unsure = report((45, 50), (50, 50));
        let verdict = unsure.arms[1].verdict.clone().unwrap_or_default();
        assert!(
            verdict.starts_with(
                "Not yet significant: feedback success 50.0% vs 45.0% (+5.0 points, p = 0.479"
            ),
            "{verdict}"
        );
        assert!(
            verdict.contains("About 1465 more graded requests per arm"),
            "{verdict}"
        );
        let same = report((45, 50), (45, 50));
        assert!(same.arms[1]
            .verdict
            .as_deref()
            .unwrap_or_default()
            .starts_with("No difference so far"));
        assert!(same.arms[0].verdict.is_none() && same.arms[0].control);
    }
}
