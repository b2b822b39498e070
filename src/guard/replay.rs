//! Replaying profiled answers: how much a guard adds to a router, with no new generation.
//!
//! Each profiled query has the local model's graded answer, its signals, the cloud model's
//! label and the router's p_local. Two orderings are compared over the same rows:
//! - **router only**: serve the top share `s` by p_local locally, the rest in the cloud;
//! - **router + guard**: every query is generated locally and judged; serve locally the top
//!   share `s` by the guard's held-out confidence (which reads p_local too), escalate the rest.
//!
//! Quality at share `s` is the mean of the local score where served locally and the cloud score
//! elsewhere. Energy: router only pays local joules on its local share and cloud joules on the
//! rest; router + guard pays local joules on every query (each was generated to be judged) plus
//! cloud joules on the escalated ones. "Saved" is against cloud-only on the same rows. Local
//! joules are the profile's (measured or estimated, as its rows say); cloud joules are always the
//! configured per-token estimate.

use serde::Serialize;

/// One replayed query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Row {
    /// The router's p_local.
    pub p_local: f64,
    /// The guard's held-out confidence.
    pub confidence: f64,
    /// The local model's score (0..1).
    pub local: f64,
    /// The cloud model's score (0..1).
    pub cloud: f64,
    /// Joules the local answer cost.
    pub local_joules: f64,
    /// Joules the cloud answer would cost (estimate).
    pub cloud_joules: f64,
}

/// One local share of a replayed curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Share served locally.
    pub local_share: f64,
    /// Mean quality, router only.
    pub router_quality: f64,
    /// Mean quality, router + guard.
    pub guarded_quality: f64,
    /// Energy saved against cloud-only, router only (0..1).
    pub router_saved: f64,
    /// Energy saved against cloud-only, router + guard (0..1).
    pub guarded_saved: f64,
}

/// Quality of serving the first `k` of `order` locally and the rest in the cloud.
fn quality_at(rows: &[Row], order: &[usize], k: usize) -> f64 {
    let local: f64 = order[..k].iter().map(|&i| rows[i].local).sum();
    let cloud: f64 = order[k..].iter().map(|&i| rows[i].cloud).sum();
    (local + cloud) / rows.len() as f64
}

/// Indices ordered by `key`, highest first (ties by index, so the replay is deterministic).
fn descending(rows: &[Row], key: impl Fn(&Row) -> f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by(|&a, &b| key(&rows[b]).total_cmp(&key(&rows[a])).then(a.cmp(&b)));
    order
}

/// Both curves at each of `shares` (0..1).
pub fn curves(rows: &[Row], shares: &[f64]) -> Vec<Point> {
    if rows.is_empty() {
        return Vec::new();
    }
    let n = rows.len();
    let by_router = descending(rows, |r| r.p_local);
    let by_guard = descending(rows, |r| r.confidence);
    let cloud_only: f64 = rows.iter().map(|r| r.cloud_joules).sum();
    let all_local: f64 = rows.iter().map(|r| r.local_joules).sum();
    let saved = |spent: f64| {
        if cloud_only > 0.0 {
            1.0 - spent / cloud_only
        } else {
            0.0
        }
    };
    shares
        .iter()
        .map(|&s| {
            let k = ((s.clamp(0.0, 1.0) * n as f64).round() as usize).min(n);
            let router_spent: f64 = by_router[..k]
                .iter()
                .map(|&i| rows[i].local_joules)
                .sum::<f64>()
                + by_router[k..]
                    .iter()
                    .map(|&i| rows[i].cloud_joules)
                    .sum::<f64>();
            let guarded_spent = all_local
                + by_guard[k..]
                    .iter()
                    .map(|&i| rows[i].cloud_joules)
                    .sum::<f64>();
            Point {
                local_share: k as f64 / n as f64,
                router_quality: quality_at(rows, &by_router, k),
                guarded_quality: quality_at(rows, &by_guard, k),
                router_saved: saved(router_spent),
                guarded_saved: saved(guarded_spent),
            }
        })
        .collect()
}

/// The curves as a table for people.
pub fn table(points: &[Point]) -> String {
    let mut out = String::from(
        "local share   quality: router   router+guard   energy saved: router   router+guard\n",
    );
    for p in points {
        out.push_str(&format!(
            "{:>10.0}%   {:>15.2}%   {:>11.2}%   {:>19.1}%   {:>11.1}%\n",
            p.local_share * 100.0,
            p.router_quality * 100.0,
            p.guarded_quality * 100.0,
            p.router_saved * 100.0,
            p.guarded_saved * 100.0
        ));
    }
    out
}

/// Quality against local share for both orderings, as a self-contained SVG.
pub fn svg(points: &[Point], title: &str) -> String {
    let (w, h, left, bottom, top, right) = (640.0, 400.0, 60.0, 50.0, 40.0, 20.0);
    let qs: Vec<f64> = points
        .iter()
        .flat_map(|p| [p.router_quality, p.guarded_quality])
        .collect();
    let lo = qs.iter().copied().fold(1.0, f64::min).min(1.0);
    let hi = qs.iter().copied().fold(0.0, f64::max).max(lo + 1e-6);
    let x = |s: f64| left + s * (w - left - right);
    let y = |q: f64| top + (hi - q) / (hi - lo) * (h - top - bottom);
    let line = |get: &dyn Fn(&Point) -> f64| {
        points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.local_share), y(get(p))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let escape = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;");
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="20" font-size="14">{title}</text>
<line x1="{left}" y1="{yb}" x2="{xr}" y2="{yb}" stroke="black"/>
<line x1="{left}" y1="{top}" x2="{left}" y2="{yb}" stroke="black"/>
<text x="{xm}" y="{xl}" text-anchor="middle">share served locally</text>
<text x="14" y="{ym}" transform="rotate(-90 14 {ym})" text-anchor="middle">quality (mean score)</text>
<text x="{left}" y="{xt}" text-anchor="middle">0%</text><text x="{xr}" y="{xt}" text-anchor="middle">100%</text>
<text x="{lq}" y="{yb}" text-anchor="end">{lo:.3}</text><text x="{lq}" y="{top}" text-anchor="end">{hi:.3}</text>
<polyline fill="none" stroke="#888" stroke-width="2" points="{router}"/>
<polyline fill="none" stroke="#c0392b" stroke-width="2" points="{guarded}"/>
<text x="{lx}" y="{ly1}" fill="#888">router only</text>
<text x="{lx}" y="{ly2}" fill="#c0392b">router + guard</text>
</svg>
"##,
        title = escape(title),
        yb = h - bottom,
        xr = w - right,
        xm = (left + w - right) / 2.0,
        xl = h - 12.0,
        xt = h - bottom + 16.0,
        ym = (top + h - bottom) / 2.0,
        lq = left - 6.0,
        router = line(&|p| p.router_quality),
        guarded = line(&|p| p.guarded_quality),
        lx = w - right - 130.0,
        ly1 = top + 14.0,
        ly2 = top + 30.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(p_local: f64, confidence: f64, local: f64) -> Row {
        Row {
            p_local,
            confidence,
            local,
            cloud: 1.0,
            local_joules: 1.0,
            cloud_joules: 10.0,
        }
    }

    #[test]
    fn curves_by_hand() {
        // The router ranks backwards; the guard ranks right.
        let rows = [row(0.9, 0.1, 0.0), row(0.1, 0.9, 1.0)];
        let p = curves(&rows, &[0.0, 0.5, 1.0]);
        assert_eq!(p[0].router_quality, 1.0);
        assert_eq!(p[1].router_quality, 0.5);
        assert_eq!(p[1].guarded_quality, 1.0);
        assert_eq!(p[2].guarded_quality, 0.5);
        // Half local: router 1 + 10 J, guard 2 x 1 + 10 J, cloud-only 20 J.
        assert!((p[1].router_saved - 0.45).abs() < 1e-12);
        assert!((p[1].guarded_saved - 0.4).abs() < 1e-12);
        // Nothing local: the guard still paid for every local answer.
        assert!((p[0].guarded_saved + 0.1).abs() < 1e-12);
        let t = table(&p);
        assert!(t.contains("50%"), "{t}");
        let s = svg(&p, "a < b");
        assert!(s.starts_with("<svg") && s.contains("a &lt; b") && s.contains("polyline"));
    }
}
