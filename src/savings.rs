//! Savings against the cloud-only baseline, summed from ledger rows: what `GET /v1/savings` and
//! `wattgate report` show.
//!
//! Savings = counterfactual - actual, per dimension (energy, compute, cost), shown negative when
//! routing cost more. Energy keeps its parts apart: local joules by meter source (measured or
//! estimated) and cloud joules (always estimated), so a reader can see what was measured.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::ledger::LedgerRow;
use crate::metering::EnergySource;

/// One quantity, actual against the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Dimension {
    /// What was spent (every row).
    pub actual: f64,
    /// What cloud-only would have spent (rows that have a baseline).
    pub counterfactual: f64,
    /// counterfactual - actual; null when some rows have no baseline to compare with.
    pub saved: Option<f64>,
    /// saved / counterfactual x 100; null when the counterfactual is 0 or saved is null.
    pub saved_percent: Option<f64>,
}

impl Dimension {
    /// Adds (sign 1) or takes away (sign -1) one request's figures.
    fn accumulate(&mut self, actual: f64, counterfactual: Option<f64>, sign: f64) {
        self.actual += sign * actual;
        self.counterfactual += sign * counterfactual.unwrap_or(0.0);
    }

    fn merge(&mut self, other: &Dimension) {
        self.actual += other.actual;
        self.counterfactual += other.counterfactual;
    }

    /// Recomputes `saved` from the sums; `comparable` is false when some rows had no baseline.
    fn finish(&mut self, comparable: bool) {
        self.saved = comparable.then_some(self.counterfactual - self.actual);
        self.saved_percent = self
            .saved
            .filter(|_| self.counterfactual > 0.0)
            .map(|saved| saved / self.counterfactual * 100.0);
    }
}

/// Totals over a set of rows.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Totals {
    /// Requests.
    pub requests: u64,
    /// Served by a local backend.
    pub local_requests: u64,
    /// Served by a cloud backend.
    pub cloud_requests: u64,
    /// Went local first, failed, and were served by the cloud (charged for both).
    pub escalated_requests: u64,
    /// local_requests / requests.
    pub local_share: f64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Joules: local (metered) + cloud (estimated) against the baseline's estimate.
    pub energy_joules: Dimension,
    /// FLOPs (2 x active parameters x tokens).
    pub compute_flops: Dimension,
    /// US dollars: local electricity and hardware + cloud API against the baseline's price.
    pub cost_usd: Dimension,
    /// Local joules by meter source (`nvml`, `rapl`: measured; `estimate`: modeled).
    pub local_joules_by_source: BTreeMap<String, f64>,
    /// Cloud joules (tokens x J/token x PUE: always estimated).
    pub cloud_joules_estimated: f64,
    /// Rows without a baseline (no cloud backend was configured): in every actual figure, and
    /// the reason `saved` is null.
    pub rows_without_baseline: u64,
    /// Local answers the quality guard judged, by decision (`pass`, `escalated`, `no_signal`,
    /// `escalation_failed`, `unchecked`): what the savings above cost in cloud re-asks.
    #[serde(default)]
    pub guard_decisions: BTreeMap<String, u64>,
    /// Requests by routing reason.
    #[serde(default)]
    pub by_reason: BTreeMap<String, u64>,
}

impl Totals {
    /// Adds one request's row.
    pub fn add(&mut self, row: &LedgerRow) {
        self.accumulate(row, 1);
    }

    /// Takes one request's row away again (retention removing it from a rollup).
    pub fn subtract(&mut self, row: &LedgerRow) {
        self.accumulate(row, -1);
    }

    /// Adds another set of totals (rollups of other minutes, backends or arms).
    pub fn merge(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.local_requests += other.local_requests;
        self.cloud_requests += other.cloud_requests;
        self.escalated_requests += other.escalated_requests;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.energy_joules.merge(&other.energy_joules);
        self.compute_flops.merge(&other.compute_flops);
        self.cost_usd.merge(&other.cost_usd);
        for (k, v) in &other.local_joules_by_source {
            *self.local_joules_by_source.entry(k.clone()).or_default() += v;
        }
        self.cloud_joules_estimated += other.cloud_joules_estimated;
        self.rows_without_baseline += other.rows_without_baseline;
        for (k, v) in &other.guard_decisions {
            *self.guard_decisions.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.by_reason {
            *self.by_reason.entry(k.clone()).or_default() += v;
        }
        self.finish();
    }

    fn accumulate(&mut self, row: &LedgerRow, sign: i8) {
        let count = |n: &mut u64, by: u64| {
            *n = if sign > 0 {
                n.saturating_add(by)
            } else {
                n.saturating_sub(by)
            }
        };
        let f = f64::from(sign);
        count(&mut self.requests, 1);
        match row.route.as_str() {
            "local" => count(&mut self.local_requests, 1),
            _ => count(&mut self.cloud_requests, 1),
        }
        if row.fallback_from.is_some() {
            count(&mut self.escalated_requests, 1);
        }
        if let Some(g) = &row.guard {
            count(
                self.guard_decisions.entry(g.decision.clone()).or_default(),
                1,
            );
        }
        count(self.by_reason.entry(row.reason.clone()).or_default(), 1);
        count(&mut self.input_tokens, row.input_tokens);
        count(&mut self.output_tokens, row.output_tokens);
        let bill = &row.bill;
        *self
            .local_joules_by_source
            .entry(row.energy_source.clone())
            .or_default() += f * bill.local_joules;
        self.cloud_joules_estimated += f * bill.cloud_joules;
        let cf = bill.counterfactual;
        if cf.is_none() {
            count(&mut self.rows_without_baseline, 1);
        }
        self.energy_joules
            .accumulate(bill.joules(), cf.map(|c| c.joules), f);
        self.compute_flops
            .accumulate(bill.flops, cf.map(|c| c.flops), f);
        self.cost_usd.accumulate(bill.usd(), cf.map(|c| c.usd), f);
        self.guard_decisions.retain(|_, n| *n > 0);
        self.by_reason.retain(|_, n| *n > 0);
        self.finish();
    }

    /// Recomputes the derived figures (shares, `saved`, percentages) from the sums.
    fn finish(&mut self) {
        self.local_share = if self.requests == 0 {
            0.0
        } else {
            self.local_requests as f64 / self.requests as f64
        };
        let comparable = self.rows_without_baseline == 0;
        self.energy_joules.finish(comparable);
        self.compute_flops.finish(comparable);
        self.cost_usd.finish(comparable);
    }
}

/// What the local machine spent while no request was using it: measured or estimated like
/// the local energy (`energy_meter.source` in `/v1/savings`), priced at the electricity price
/// plus the hardware's $/hour. Never charged to a request, so it is what separates gross from
/// net savings.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Idle {
    /// Joules.
    pub joules: f64,
    /// Seconds with no request active.
    pub seconds: f64,
    /// Electricity for `joules` plus `hardware_usd_per_hour` over `seconds`.
    pub usd: f64,
}

impl Idle {
    fn merge(&mut self, other: &Idle) {
        self.joules += other.joules;
        self.seconds += other.seconds;
        self.usd += other.usd;
    }
}

/// Savings after the local machine's idle energy and idle hardware time are paid for.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Net {
    /// Energy saved minus idle joules; null when gross savings are.
    pub energy_joules: Option<f64>,
    /// Dollars saved minus idle electricity and idle hardware; null when gross savings are.
    pub cost_usd: Option<f64>,
}

/// One minute's (or hour's) totals by backend and experiment arm (`none` outside
/// experiments): what the ledger keeps beside its rows, updated in each flush's durable
/// transaction, so a savings query sums a few thousand buckets instead of millions of rows.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Rollup {
    /// Backend -> arm -> totals.
    pub groups: BTreeMap<String, BTreeMap<String, Totals>>,
    /// The machine's idle spend in this span.
    #[serde(default)]
    pub idle: Idle,
}

impl Rollup {
    /// Adds one row.
    pub fn add(&mut self, row: &LedgerRow) {
        self.group(row).add(row);
    }

    /// Takes one row away (retention); groups left without requests are removed.
    pub fn subtract(&mut self, row: &LedgerRow) {
        self.group(row).subtract(row);
        for arms in self.groups.values_mut() {
            arms.retain(|_, t| t.requests > 0);
        }
        self.groups.retain(|_, arms| !arms.is_empty());
    }

    /// Adds idle spend.
    pub fn add_idle(&mut self, idle: &Idle) {
        self.idle.merge(idle);
    }

    /// Adds another rollup of the same span (the ledger writer sums a flush's rows in memory
    /// and adds them to the stored rollup once).
    pub fn merge(&mut self, other: &Rollup) {
        for (backend, arms) in &other.groups {
            let mine = self.groups.entry(backend.clone()).or_default();
            for (arm, totals) in arms {
                mine.entry(arm.clone()).or_default().merge(totals);
            }
        }
        self.idle.merge(&other.idle);
    }

    /// Whether it holds no requests and no idle spend.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.idle == Idle::default()
    }

    /// Everything in it.
    pub fn total(&self) -> Totals {
        let mut t = Totals::default();
        for totals in self.groups.values().flat_map(|arms| arms.values()) {
            t.merge(totals);
        }
        t
    }

    fn group(&mut self, row: &LedgerRow) -> &mut Totals {
        let arm = row.arm.clone().unwrap_or_else(|| "none".to_owned());
        self.groups
            .entry(row.backend.clone())
            .or_default()
            .entry(arm)
            .or_default()
    }
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Savings {
    /// Rows from this time on (microseconds since the Unix epoch); 0 means all.
    pub since_us: u64,
    /// Everything.
    pub total: Totals,
    /// By the backend that answered.
    pub by_backend: BTreeMap<String, Totals>,
    /// By experiment arm (`none` for requests outside experiments).
    pub by_arm: BTreeMap<String, Totals>,
    /// The local machine's idle spend in the window (recorded by the daemon every 10 s).
    #[serde(default)]
    pub idle: Idle,
    /// `total`'s savings net of `idle`: what the local machine saved once its idle draw and
    /// idle hardware hours are paid for.
    #[serde(default)]
    pub net: Net,
}

impl Savings {
    /// Sums `rows`.
    pub fn from_rows<'a>(since_us: u64, rows: impl IntoIterator<Item = &'a LedgerRow>) -> Self {
        let mut rollup = Rollup::default();
        for row in rows {
            rollup.add(row);
        }
        Self::from_rollups(since_us, [rollup])
    }

    /// Sums rollups (the ledger's per-minute and per-hour totals): bounded by the number of
    /// buckets, not of requests.
    pub fn from_rollups(since_us: u64, rollups: impl IntoIterator<Item = Rollup>) -> Self {
        let mut s = Self {
            since_us,
            ..Self::default()
        };
        for rollup in rollups {
            s.add_rollup(&rollup);
        }
        s
    }

    /// Adds one rollup's figures (another minute or hour of the same window).
    pub fn add_rollup(&mut self, rollup: &Rollup) {
        self.idle.merge(&rollup.idle);
        for (backend, arms) in &rollup.groups {
            for (arm, totals) in arms {
                self.total.merge(totals);
                self.by_backend
                    .entry(backend.clone())
                    .or_default()
                    .merge(totals);
                self.by_arm.entry(arm.clone()).or_default().merge(totals);
            }
        }
        self.finish_net();
    }

    fn finish_net(&mut self) {
        self.net = Net {
            energy_joules: self.total.energy_joules.saved.map(|s| s - self.idle.joules),
            cost_usd: self.total.cost_usd.saved.map(|s| s - self.idle.usd),
        };
    }

    /// A plain-text table for terminals.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let t = &self.total;
        let _ = writeln!(
            out,
            "requests {}  local {} ({:.1}%)  cloud {}  escalated {}  tokens in {} out {}",
            t.requests,
            t.local_requests,
            t.local_share * 100.0,
            t.cloud_requests,
            t.escalated_requests,
            t.input_tokens,
            t.output_tokens
        );
        let _ = writeln!(
            out,
            "\n{:<10} {:>16} {:>16} {:>16} {:>9}",
            "", "actual", "cloud-only", "saved", "saved %"
        );
        for (name, d, unit) in [
            ("energy", t.energy_joules, "J"),
            ("compute", t.compute_flops, "FLOP"),
            ("cost", t.cost_usd, "$"),
        ] {
            let _ = writeln!(
                out,
                "{:<10} {:>16} {:>16} {:>16} {:>9}",
                name,
                format_value(d.actual, unit),
                format_value(d.counterfactual, unit),
                d.saved
                    .map_or_else(|| "-".to_owned(), |v| format_value(v, unit)),
                d.saved_percent
                    .map_or_else(|| "-".to_owned(), |p| format!("{p:.1}%"))
            );
        }
        let _ = writeln!(out, "\nenergy sources:");
        for (source, joules) in &t.local_joules_by_source {
            let kind =
                EnergySource::from_label(source).map_or("unknown source", EnergySource::kind);
            let _ = writeln!(
                out,
                "  local {source:<10} {:>14}  ({kind})",
                format_value(*joules, "J")
            );
        }
        let _ = writeln!(
            out,
            "  cloud {:<10} {:>14}  (estimated: tokens x J/token x PUE)",
            "",
            format_value(t.cloud_joules_estimated, "J")
        );
        let _ = writeln!(
            out,
            "\nidle (no request active, never charged to one): {} over {:.1} h, {}",
            format_value(self.idle.joules, "J"),
            self.idle.seconds / 3600.0,
            format_value(self.idle.usd, "$")
        );
        let _ = writeln!(
            out,
            "saved net of idle: energy {}, cost {}",
            self.net
                .energy_joules
                .map_or_else(|| "-".to_owned(), |v| format_value(v, "J")),
            self.net
                .cost_usd
                .map_or_else(|| "-".to_owned(), |v| format_value(v, "$"))
        );
        if t.rows_without_baseline > 0 {
            let _ = writeln!(
                out,
                "  {} requests had no cloud baseline configured: savings are not computed",
                t.rows_without_baseline
            );
        }
        for (title, groups) in [("backend", &self.by_backend), ("arm", &self.by_arm)] {
            let _ = writeln!(
                out,
                "\n{:<20} {:>9} {:>8} {:>10} {:>10} {:>10}",
                format!("by {title}"),
                "requests",
                "local %",
                "energy %",
                "compute %",
                "cost %"
            );
            for (name, g) in groups {
                let pct = |d: Dimension| {
                    d.saved_percent
                        .map_or_else(|| "-".to_owned(), |p| format!("{p:.1}"))
                };
                let _ = writeln!(
                    out,
                    "{:<20} {:>9} {:>8.1} {:>10} {:>10} {:>10}",
                    name,
                    g.requests,
                    g.local_share * 100.0,
                    pct(g.energy_joules),
                    pct(g.compute_flops),
                    pct(g.cost_usd)
                );
            }
        }
        out
    }
}

/// One time bucket of [`series`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Bucket {
    /// Bucket start, microseconds since the Unix epoch.
    pub start_us: u64,
    /// Requests that arrived in the bucket.
    pub requests: u64,
    /// Of which served locally.
    pub local_requests: u64,
    /// Joules spent (local metered + cloud estimated).
    pub joules: f64,
    /// Joules cloud-only would have spent.
    pub counterfactual_joules: f64,
    /// Dollars spent.
    pub usd: f64,
    /// Dollars cloud-only would have spent.
    pub counterfactual_usd: f64,
    /// Requests by routing reason.
    pub reasons: BTreeMap<String, u64>,
    /// Local answers the quality guard judged, by decision.
    #[serde(default)]
    pub guard: BTreeMap<String, u64>,
}

/// Rows grouped into consecutive `step_us` buckets from `since_us` (empty buckets included),
/// for charts of savings and routing over time.
pub fn series<'a>(
    rows: impl IntoIterator<Item = &'a LedgerRow>,
    since_us: u64,
    until_us: u64,
    step_us: u64,
) -> Vec<Bucket> {
    series_from_rollups(
        rows.into_iter().map(|row| {
            let mut r = Rollup::default();
            r.add(row);
            (row.time_us, r)
        }),
        since_us,
        until_us,
        step_us,
    )
}

/// Rollups (each with the time it starts) grouped into consecutive `step_us` buckets from
/// `since_us`, empty buckets included. A rollup belongs to the bucket its start falls in, so
/// `since_us` and `step_us` should be multiples of the rollups' own span.
pub fn series_from_rollups(
    rollups: impl IntoIterator<Item = (u64, Rollup)>,
    since_us: u64,
    until_us: u64,
    step_us: u64,
) -> Vec<Bucket> {
    let step = step_us.max(1);
    let n = (until_us.saturating_sub(since_us) / step + 1).min(10_000) as usize;
    let mut buckets: Vec<Bucket> = (0..n)
        .map(|i| Bucket {
            start_us: since_us + i as u64 * step,
            ..Bucket::default()
        })
        .collect();
    for (start, rollup) in rollups {
        let Some(i) = start.checked_sub(since_us).map(|d| (d / step) as usize) else {
            continue;
        };
        let Some(b) = buckets.get_mut(i) else {
            continue;
        };
        let t = rollup.total();
        b.requests += t.requests;
        b.local_requests += t.local_requests;
        b.joules += t.energy_joules.actual;
        b.usd += t.cost_usd.actual;
        b.counterfactual_joules += t.energy_joules.counterfactual;
        b.counterfactual_usd += t.cost_usd.counterfactual;
        for (k, v) in t.by_reason {
            *b.reasons.entry(k).or_default() += v;
        }
        for (k, v) in t.guard_decisions {
            *b.guard.entry(k).or_default() += v;
        }
    }
    buckets
}

/// A number with an SI prefix and unit ("1.23 kJ", "4.5 TFLOP", "$0.0123").
fn format_value(v: f64, unit: &str) -> String {
    if unit == "$" {
        return if v < 0.0 {
            format!("-${:.4}", -v)
        } else {
            format!("${v:.4}")
        };
    }
    let prefixes = [
        (1e18, "E"),
        (1e15, "P"),
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
    ];
    for (scale, p) in prefixes {
        if v.abs() >= scale {
            return format!("{:.3} {p}{unit}", v / scale);
        }
    }
    format!("{v:.3} {unit}")
}

/// Parses `30s`, `15m`, `24h`, `7d` or `2w` into seconds.
pub fn parse_duration(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 30m, 24h or 7d"))?;
    let scale = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        "w" => 604_800.0,
        _ => return Err(format!("`{text}`: unit must be s, m, h, d or w (e.g. 24h)")),
    };
    if !(n.is_finite() && n >= 0.0) {
        return Err(format!("`{text}` must be a non-negative duration"));
    }
    Ok(n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::{Bill, Counterfactual};

    fn row(route: &str, backend: &str, bill: Bill) -> LedgerRow {
        LedgerRow {
            time_us: 1,
            request_id: "r".to_owned(),
            route: route.to_owned(),
            backend: backend.to_owned(),
            reason: "x".to_owned(),
            experiment: None,
            arm: None,
            p_local: None,
            fallback_from: None,
            status: 200,
            outcome: "ok".to_owned(),
            stream: false,
            input_tokens: 10,
            output_tokens: 5,
            tokens_source: "upstream".to_owned(),
            latency_s: 1.0,
            ttft_s: None,
            energy_source: "estimate".to_owned(),
            bill,
            guard: None,
            prompt: None,
        }
    }

    #[test]
    fn sums_and_percentages() {
        let cf = Some(Counterfactual {
            joules: 10.0,
            flops: 100.0,
            usd: 1.0,
        });
        let local = Bill {
            local_joules: 2.0,
            flops: 10.0,
            local_usd: 0.1,
            counterfactual: cf,
            ..Bill::default()
        };
        let cloud = Bill {
            local_joules: 0.5,
            cloud_joules: 10.0,
            flops: 100.0,
            cloud_usd: 1.0,
            counterfactual: cf,
            ..Bill::default()
        };
        let rows = [row("local", "l", local), row("cloud", "c", cloud)];
        let s = Savings::from_rows(0, &rows);
        assert_eq!(s.total.requests, 2);
        assert_eq!(s.total.local_share, 0.5);
        assert_eq!(s.total.energy_joules.actual, 12.5);
        assert_eq!(s.total.energy_joules.counterfactual, 20.0);
        assert_eq!(s.total.energy_joules.saved, Some(7.5));
        assert_eq!(s.total.energy_joules.saved_percent, Some(37.5));
        assert_eq!(s.total.compute_flops.saved, Some(90.0));
        assert!((s.total.cost_usd.saved.unwrap_or(0.0) - 0.9).abs() < 1e-12);
        // The cloud-served request alone saved a negative amount, and says so.
        assert_eq!(s.by_backend["c"].energy_joules.saved, Some(-0.5));
        assert_eq!(s.total.local_joules_by_source["estimate"], 2.5);
        assert!(s.to_table().contains("37.5%"));
        // A row without a baseline: actuals still add up, savings are not claimed.
        let mut unbased = row("local", "l", local);
        unbased.bill.counterfactual = None;
        let s = Savings::from_rows(0, [&rows[0], &unbased]);
        assert_eq!(s.total.energy_joules.actual, 4.0);
        assert_eq!(s.total.energy_joules.saved, None);
        assert_eq!(s.total.rows_without_baseline, 1);
        assert!(s.to_table().contains("savings are not computed"));
    }

    #[test]
    fn series_buckets_rows_by_time() {
        let mut a = row("local", "l", Bill::default());
        a.time_us = 1_000;
        let mut b = row("cloud", "c", Bill::default());
        b.time_us = 2_500;
        let s = series([&a, &b], 1_000, 3_000, 1_000);
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].requests, s[0].local_requests), (1, 1));
        assert_eq!((s[1].requests, s[1].local_requests), (1, 0));
        assert_eq!(s[2].requests, 0);
        assert_eq!(s[1].reasons["x"], 1);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(90.0));
        assert_eq!(parse_duration("1.5h"), Ok(5400.0));
        assert_eq!(parse_duration("7d"), Ok(604_800.0));
        assert!(parse_duration("7 days").is_err());
        assert!(parse_duration("h").is_err());
    }
}
