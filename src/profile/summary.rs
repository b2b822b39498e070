//! What a profile adds up to: accuracy, energy, power, IPW and IPJ, overall and by source
//! and category, as JSON, a table and an SVG chart.
//!
//! Definitions follow "Intelligence per Watt" (arXiv 2511.07885): IPW = accuracy / mean power
//! per query (W), IPJ = accuracy / mean energy per query (J). Power per query is its joules
//! over its latency. Every figure carries the energy source, so an estimate is never read as
//! a measurement.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::QueryRecord;
use crate::config::Role;

/// Aggregates over a set of queries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Graded queries.
    pub queries: usize,
    /// Mean score (0..1).
    pub accuracy: f64,
    /// Mean joules per query.
    pub joules_per_query: f64,
    /// Mean of each query's joules / latency.
    pub mean_watts: f64,
    /// accuracy / mean_watts.
    pub ipw: f64,
    /// accuracy / joules_per_query.
    pub ipj: f64,
    /// Joules / (input + output tokens).
    pub joules_per_token: f64,
    /// Output tokens / seconds of latency.
    pub output_tokens_per_second: f64,
    /// Mean seconds per query.
    pub mean_latency_s: f64,
    /// Mean seconds to the first token.
    pub mean_ttft_s: f64,
    /// Prompt tokens, summed.
    pub input_tokens: u64,
    /// Generated tokens, summed.
    pub output_tokens: u64,
}

impl Stats {
    /// Aggregates `records`.
    pub fn of<'a>(records: impl IntoIterator<Item = &'a QueryRecord>) -> Self {
        let mut s = Stats::default();
        let (mut score, mut joules, mut watts, mut latency, mut ttft) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for r in records {
            let m = &r.profile;
            s.queries += 1;
            score += m.score;
            joules += m.joules;
            watts += m.watts;
            latency += m.latency_s;
            ttft += m.ttft_s;
            s.input_tokens += m.input_tokens;
            s.output_tokens += m.output_tokens;
        }
        if s.queries == 0 {
            return s;
        }
        let n = s.queries as f64;
        s.accuracy = score / n;
        s.joules_per_query = joules / n;
        s.mean_watts = watts / n;
        s.ipw = ratio(s.accuracy, s.mean_watts);
        s.ipj = ratio(s.accuracy, s.joules_per_query);
        s.joules_per_token = ratio(joules, (s.input_tokens + s.output_tokens) as f64);
        s.output_tokens_per_second = ratio(s.output_tokens as f64, latency);
        s.mean_latency_s = latency / n;
        s.mean_ttft_s = ttft / n;
        s
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// The whole profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The backend profiled.
    pub model: String,
    /// Local or cloud.
    pub role: String,
    /// Where the joules come from (`nvml`, `rapl`, `estimate`, `cloud_estimate`).
    pub energy_source: String,
    /// True when every query's joules were measured by a hardware counter.
    pub measured: bool,
    /// Queries not graded: no reference answer and no judge.
    pub skipped_no_reference: usize,
    /// Queries that failed in the last run (retried on the next).
    pub failed: usize,
    /// All graded queries.
    pub overall: Stats,
    /// By `source`.
    pub by_source: BTreeMap<String, Stats>,
    /// By `category` (rows without one are left out).
    pub by_category: BTreeMap<String, Stats>,
    /// How well the guard's confidence and the router's p_local rank right answers above wrong
    /// ones, on the same rows (those with signals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardRanking>,
}

/// The guard against the router on one profile's rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardRanking {
    /// Rows with a confidence.
    pub n: usize,
    /// ROC AUC of the guard's confidence for "answered right".
    pub confidence_auc: Option<f64>,
    /// ROC AUC of the router's p_local on the same rows (when the rows carry it).
    pub router_auc: Option<f64>,
}

impl GuardRanking {
    fn of(records: &[QueryRecord]) -> Option<Self> {
        let rows: Vec<(&QueryRecord, f64)> = records
            .iter()
            .filter_map(|r| Some((r, r.profile.confidence?)))
            .collect();
        if rows.is_empty() {
            return None;
        }
        let auc = |score: &dyn Fn(&QueryRecord, f64) -> Option<f64>| {
            let outcomes: Option<Vec<crate::router::evaluation::Outcome>> = rows
                .iter()
                .map(|(r, c)| {
                    Some(crate::router::evaluation::Outcome {
                        p_local: score(r, *c)?,
                        local: r.profile.score,
                        cloud: 1.0,
                    })
                })
                .collect();
            outcomes.and_then(|o| crate::router::evaluation::auc(&o))
        };
        Some(Self {
            n: rows.len(),
            confidence_auc: auc(&|_, c| Some(c)),
            router_auc: auc(&|r, _| r.profile.p_local),
        })
    }
}

impl Summary {
    /// Summarises the graded rows.
    pub fn new(
        model: &str,
        role: Role,
        records: &[QueryRecord],
        skipped_no_reference: usize,
        failed: usize,
    ) -> Self {
        let mut by_source: BTreeMap<String, Vec<&QueryRecord>> = BTreeMap::new();
        let mut by_category: BTreeMap<String, Vec<&QueryRecord>> = BTreeMap::new();
        for r in records {
            by_source.entry(r.source.clone()).or_default().push(r);
            if let Some(c) = &r.category {
                by_category.entry(c.clone()).or_default().push(r);
            }
        }
        let mut sources: Vec<&str> = records
            .iter()
            .map(|r| r.profile.energy_source.as_str())
            .collect();
        sources.sort_unstable();
        sources.dedup();
        Self {
            model: model.to_owned(),
            role: role.as_str().to_owned(),
            energy_source: sources.join("+"),
            measured: !records.is_empty() && records.iter().all(|r| r.profile.measured),
            skipped_no_reference,
            failed,
            overall: Stats::of(records),
            by_source: by_source
                .into_iter()
                .map(|(k, v)| (k, Stats::of(v)))
                .collect(),
            by_category: by_category
                .into_iter()
                .map(|(k, v)| (k, Stats::of(v)))
                .collect(),
            guard: GuardRanking::of(records),
        }
    }

    /// A table for people: overall, then each source, then each category.
    pub fn to_table(&self) -> String {
        let kind = if self.measured {
            "measured"
        } else {
            "estimated"
        };
        let mut out = format!(
            "profile of `{}` ({}), energy {} ({kind})\n",
            self.model, self.role, self.energy_source
        );
        let _ = writeln!(
            out,
            "{:<28} {:>7} {:>9} {:>10} {:>8} {:>9} {:>9} {:>9} {:>8}",
            "", "queries", "accuracy", "J/query", "W", "IPW", "IPJ", "J/token", "tok/s"
        );
        let mut row = |name: &str, s: &Stats| {
            let _ = writeln!(
                out,
                "{:<28} {:>7} {:>8.1}% {:>10.2} {:>8.2} {:>9.5} {:>9.5} {:>9.4} {:>8.1}",
                truncate(name, 28),
                s.queries,
                100.0 * s.accuracy,
                s.joules_per_query,
                s.mean_watts,
                s.ipw,
                s.ipj,
                s.joules_per_token,
                s.output_tokens_per_second
            );
        };
        row("all", &self.overall);
        for (name, s) in &self.by_source {
            row(&format!("source {name}"), s);
        }
        for (name, s) in &self.by_category {
            row(&format!("  {name}"), s);
        }
        if let Some(g) = &self.guard {
            let opt = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.3}"));
            let _ = writeln!(
                out,
                "AUC for \"answered right\" on {} answers with signals: guard confidence {}, router p_local {}",
                g.n,
                opt(g.confidence_auc),
                opt(g.router_auc)
            );
        }
        if self.skipped_no_reference > 0 {
            let _ = writeln!(
                out,
                "{} queries skipped: no reference answer and no judge",
                self.skipped_no_reference
            );
        }
        if self.failed > 0 {
            let _ = writeln!(
                out,
                "{} queries failed and are not in these figures: run the same command again to retry them",
                self.failed
            );
        }
        out
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('~');
        t
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Accuracy (y) against mean joules per query (x): one labeled point per source, a small dot
/// per category, a ring for the whole profile. Up and to the left is more intelligence per
/// joule. A standalone SVG with no external resources.
pub fn chart_svg(summary: &Summary) -> String {
    let (w, h) = (720.0, 480.0);
    let (left, right, top, bottom) = (70.0, 190.0, 40.0, 60.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let all = std::iter::once(&summary.overall)
        .chain(summary.by_source.values())
        .chain(summary.by_category.values());
    let max_j = all
        .map(|s| s.joules_per_query)
        .fold(0.0_f64, f64::max)
        .max(1e-9)
        * 1.1;
    let x = |j: f64| left + plot_w * (j / max_j);
    let y = |a: f64| top + plot_h * (1.0 - a.clamp(0.0, 1.0));
    let kind = if summary.measured {
        "measured"
    } else {
        "estimated"
    };
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="#ffffff"/>
<text x="{left}" y="22" font-size="15" font-weight="bold">{} — accuracy vs energy per query</text>
<text x="{left}" y="36" fill="#555">energy: {} ({kind}); {} queries, accuracy {:.1}%, {:.2} J/query, IPJ {:.4}</text>
"##,
        escape(&summary.model),
        escape(&summary.energy_source),
        summary.overall.queries,
        100.0 * summary.overall.accuracy,
        summary.overall.joules_per_query,
        summary.overall.ipj,
    );
    // Axes, grid and ticks.
    for i in 0..=5 {
        let a = f64::from(i) / 5.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{}" y="{:.1}" text-anchor="end">{:.0}%</text>"##,
            left + plot_w,
            left - 6.0,
            y(a) + 4.0,
            100.0 * a,
            y = y(a)
        );
        let j = max_j * a;
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{top}" y2="{}" stroke="#e5e5e5"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            top + plot_h,
            top + plot_h + 16.0,
            tick(j),
            x = x(j)
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>
<text x="{}" y="{}" text-anchor="middle">mean joules per query ({kind})</text>
<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">accuracy</text>"##,
        left + plot_w / 2.0,
        h - 18.0,
        top + plot_h / 2.0
    );
    for s in summary.by_category.values() {
        let _ = writeln!(
            svg,
            r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="#9bb7d4"/>"##,
            x(s.joules_per_query),
            y(s.accuracy)
        );
    }
    let palette = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    for (i, (name, s)) in summary.by_source.iter().enumerate() {
        let color = palette[i % palette.len()];
        let _ = writeln!(
            svg,
            r##"<circle cx="{:.1}" cy="{:.1}" r="6" fill="{color}"/><circle cx="{}" cy="{}" r="6" fill="{color}"/><text x="{}" y="{}">{} ({}, {:.1}%)</text>"##,
            x(s.joules_per_query),
            y(s.accuracy),
            w - right + 16.0,
            top + 10.0 + 20.0 * i as f64,
            w - right + 28.0,
            top + 14.0 + 20.0 * i as f64,
            escape(&truncate(name, 18)),
            s.queries,
            100.0 * s.accuracy
        );
    }
    let legend_y = top + 10.0 + 20.0 * summary.by_source.len() as f64;
    let _ = writeln!(
        svg,
        r##"<circle cx="{:.1}" cy="{:.1}" r="9" fill="none" stroke="#000" stroke-width="2"/><circle cx="{}" cy="{legend_y}" r="6" fill="none" stroke="#000" stroke-width="2"/><text x="{}" y="{}">all</text>
<circle cx="{}" cy="{}" r="2.5" fill="#9bb7d4"/><text x="{}" y="{}">a category</text>
</svg>"##,
        x(summary.overall.joules_per_query),
        y(summary.overall.accuracy),
        w - right + 16.0,
        w - right + 28.0,
        legend_y + 4.0,
        w - right + 16.0,
        legend_y + 20.0,
        w - right + 28.0,
        legend_y + 24.0,
    );
    svg
}

fn tick(j: f64) -> String {
    if j >= 100.0 {
        format!("{j:.0}")
    } else if j >= 1.0 {
        format!("{j:.1}")
    } else {
        format!("{j:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::grade::GraderKind;
    use crate::profile::Measurement;

    fn record(source: &str, score: f64, joules: f64, latency_s: f64) -> QueryRecord {
        QueryRecord {
            id: format!("{source}-{score}-{joules}"),
            source: source.to_owned(),
            category: Some("c".to_owned()),
            prompt: "p".to_owned(),
            scores: BTreeMap::new(),
            profile: Measurement {
                model: "m".to_owned(),
                grader: GraderKind::MultipleChoice,
                score,
                correct: score >= 0.5,
                extracted: None,
                reference: None,
                output: String::new(),
                input_tokens: 10,
                output_tokens: 30,
                tokens_source: "usage".to_owned(),
                latency_s,
                ttft_s: latency_s / 4.0,
                joules,
                watts: joules / latency_s,
                energy_source: "estimate".to_owned(),
                measured: false,
                error: None,
                signals: None,
                p_local: None,
                confidence: None,
            },
        }
    }

    #[test]
    fn ipw_and_ipj_follow_the_paper_definitions() {
        let records = [
            record("a", 1.0, 20.0, 2.0), // 10 W
            record("a", 0.0, 60.0, 2.0), // 30 W
            record("b", 1.0, 10.0, 1.0), // 10 W
            record("b", 1.0, 30.0, 3.0), // 10 W
        ];
        let s = Summary::new("m", Role::Local, &records, 2, 1);
        let all = &s.overall;
        assert_eq!(all.queries, 4);
        assert!((all.accuracy - 0.75).abs() < 1e-12);
        assert!((all.joules_per_query - 30.0).abs() < 1e-12);
        assert!((all.mean_watts - 15.0).abs() < 1e-12);
        assert!((all.ipw - 0.05).abs() < 1e-12);
        assert!((all.ipj - 0.025).abs() < 1e-12);
        assert!((all.joules_per_token - 120.0 / 160.0).abs() < 1e-12);
        assert!((all.output_tokens_per_second - 120.0 / 8.0).abs() < 1e-12);
        assert!((s.by_source["a"].accuracy - 0.5).abs() < 1e-12);
        assert!((s.by_source["b"].ipj - 0.05).abs() < 1e-12);
        assert_eq!(s.energy_source, "estimate");
        assert!(!s.measured);
        let table = s.to_table();
        assert!(
            table.contains("(estimated)") && table.contains("2 queries skipped"),
            "{table}"
        );
        let svg = chart_svg(&s);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(
            svg.matches("r=\"6\" fill=\"#").count(),
            4,
            "two sources, point and legend each"
        );
    }

    #[test]
    fn an_empty_profile_has_zeroes_not_nan() {
        let s = Summary::new("m", Role::Local, &[], 0, 0);
        assert_eq!(s.overall, Stats::default());
        assert!(!chart_svg(&s).contains("NaN"));
    }
}
