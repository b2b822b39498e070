//! A/B experiments on routing: which arm a request belongs to, and the router each arm uses.
//!
//! Assignment is a pure function of (experiment, unit key, arm names and weights), so every
//! replica and every restart agrees without shared state. It is weighted rendezvous hashing:
//! each arm draws a stable hash of (experiment, unit key, arm) in (0, 1), turned into an
//! exponential race `-ln(u) / weight`, and the lowest wins. An arm wins a unit with probability
//! weight / total, and changing one arm's weight only moves units into or out of that arm; units
//! never move between arms whose weights did not change (a cumulative split of one hash would
//! shift every boundary after the changed arm).
//!
//! - [`feedback`]: `POST /v1/feedback` bodies, validated;
//! - [`stats`]: Wilson intervals, the two-proportion test, sample sizes;
//! - [`report`]: per-arm requests, local share, outcomes and savings, compared with the control;
//! - [`shadow`]: sampled local answers checked against the cloud's, within an hourly budget.

pub mod feedback;
pub mod report;
pub mod shadow;
pub mod stats;

use axum::http::HeaderMap;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{Config, ExperimentConfig, ExperimentUnit};
use crate::router::Router;
use crate::wire::ChatRequest;

/// A request's place in an experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enrollment {
    /// Index into the configured experiments.
    pub experiment: usize,
    /// Index into that experiment's arms.
    pub arm: usize,
}

/// One arm at run time.
pub struct Arm {
    /// Its configured name.
    pub name: String,
    /// Relative share of units.
    pub weight: f64,
    /// The routing it applies to alias requests.
    pub router: Router,
    /// The quality guard's mode for its requests, when the arm sets one.
    pub guard: Option<crate::config::GuardMode>,
    /// The quality guard's threshold for its requests, when the arm sets one.
    pub guard_threshold: Option<f64>,
}

/// One experiment at run time.
pub struct Experiment {
    /// Its configured name.
    pub name: String,
    /// Whether it enrolls requests.
    pub enabled: bool,
    /// What is assigned.
    pub unit: ExperimentUnit,
    /// `unit = "header"`: the (lower-case) header carrying the key.
    pub header: Option<String>,
    /// The arms, in config order.
    pub arms: Vec<Arm>,
}

/// Every configured experiment, in order of precedence.
#[derive(Default)]
pub struct Experiments {
    list: Vec<Experiment>,
}

impl Experiments {
    /// Builds each arm's router (loading router files); an arm whose router cannot be loaded is
    /// an error naming it.
    pub fn new(config: &Config) -> Result<Self, String> {
        let mut list = Vec::new();
        for (i, e) in config.experiments.iter().enumerate() {
            let mut arms = Vec::new();
            for (a, arm) in e.arms.iter().enumerate() {
                let router = Router::new(
                    &arm.routing(&config.routing),
                    &arm.backends(&config.backends),
                )
                .map_err(|err| format!("experiments[{i}].arms[{a}] (\"{}\"): {err}", arm.name))?;
                arms.push(Arm {
                    name: arm.name.clone(),
                    weight: arm.weight,
                    router,
                    guard: arm.guard,
                    guard_threshold: arm.guard_threshold,
                });
            }
            list.push(Experiment {
                name: e.name.clone(),
                enabled: e.enabled,
                unit: e.unit,
                header: e.unit_header(),
                arms,
            });
        }
        Ok(Self { list })
    }

    /// The experiments, in config order.
    pub fn list(&self) -> &[Experiment] {
        &self.list
    }

    /// The first enabled experiment whose unit key this request carries, and its arm; `None`
    /// when no experiment applies (the request routes with `[routing]`).
    pub fn enroll(
        &self,
        request: &ChatRequest,
        headers: &HeaderMap,
        request_id: &str,
    ) -> Option<Enrollment> {
        self.list.iter().enumerate().find_map(|(i, e)| {
            if !e.enabled {
                return None;
            }
            let key = match e.unit {
                ExperimentUnit::User => match request.body().get("user") {
                    Some(Value::String(user)) if !user.is_empty() => user.as_str(),
                    _ => return None,
                },
                ExperimentUnit::Header => headers
                    .get(e.header.as_deref()?)?
                    .to_str()
                    .ok()
                    .filter(|v| !v.is_empty())?,
                ExperimentUnit::Request => request_id,
            };
            let arms = e.arms.iter().map(|a| (a.name.as_str(), a.weight));
            Some(Enrollment {
                experiment: i,
                arm: assign(&e.name, key, arms)?,
            })
        })
    }

    /// The experiment and arm names of an enrollment.
    pub fn names(&self, at: Enrollment) -> Option<(&str, &str)> {
        let e = self.list.get(at.experiment)?;
        Some((e.name.as_str(), e.arms.get(at.arm)?.name.as_str()))
    }

    /// The quality-guard settings of an enrollment's arm: (mode, threshold), each when set.
    pub fn guard(&self, at: Enrollment) -> Option<(Option<crate::config::GuardMode>, Option<f64>)> {
        let arm = self.list.get(at.experiment)?.arms.get(at.arm)?;
        Some((arm.guard, arm.guard_threshold))
    }

    /// The router of an enrollment's arm.
    pub fn router(&self, at: Enrollment) -> Option<&Router> {
        Some(&self.list.get(at.experiment)?.arms.get(at.arm)?.router)
    }
}

/// The arm (index into `arms`, as (name, weight)) a unit key lands in, by weighted rendezvous
/// hashing (see the module docs); `None` when every weight is 0.
pub fn assign<'a>(
    experiment: &str,
    key: &str,
    arms: impl IntoIterator<Item = (&'a str, f64)>,
) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, (name, weight)) in arms.into_iter().enumerate() {
        if weight <= 0.0 || !weight.is_finite() {
            continue;
        }
        let race = -unit_hash(&[experiment, key, name]).ln() / weight;
        if best.is_none_or(|(_, b)| race < b) {
            best = Some((i, race));
        }
    }
    best.map(|(i, _)| i)
}

/// A stable hash of `parts` in the open interval (0, 1): SHA-256 over the length-prefixed parts
/// (so ("ab","c") and ("a","bc") differ), its first 53 bits as a fraction, offset by half a
/// step so it is never 0. SHA-256 rather than std's hasher: its output is fixed by standard,
/// across Rust versions and platforms, which replicas and restarts rely on.
pub fn unit_hash(parts: &[&str]) -> f64 {
    let mut hasher = Sha256::new();
    hasher.update(b"wattgate-v1");
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let bits = u64::from_le_bytes(first) >> 11;
    (bits as f64 + 0.5) / (1u64 << 53) as f64
}

/// The configured experiment of this name.
pub fn find<'a>(config: &'a Config, name: &str) -> Option<&'a ExperimentConfig> {
    config.experiments.iter().find(|e| e.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(experiment: &str, arms: &[(&str, f64)], keys: usize) -> Vec<usize> {
        (0..keys)
            .map(|k| {
                assign(experiment, &format!("user-{k}"), arms.iter().copied()).unwrap_or(usize::MAX)
            })
            .collect()
    }

    #[test]
    fn weights_split_ten_thousand_keys_within_two_points() {
        for arms in [
            vec![("a", 1.0), ("b", 1.0)],
            vec![("a", 0.9), ("b", 0.1)],
            vec![("a", 0.2), ("b", 0.3), ("c", 0.5)],
            vec![("control", 70.0), ("treatment", 30.0)],
        ] {
            let assigned = split("exp", &arms, 10_000);
            let total: f64 = arms.iter().map(|(_, w)| w).sum();
            for (i, (name, w)) in arms.iter().enumerate() {
                let share = assigned.iter().filter(|&&a| a == i).count() as f64 / 10_000.0;
                let want = w / total;
                assert!(
                    (share - want).abs() <= 0.02,
                    "{name}: {share:.4} vs {want:.4} in {arms:?}"
                );
            }
        }
    }

    #[test]
    fn the_same_key_always_lands_in_the_same_arm_and_experiments_are_independent() {
        let arms = [("a", 1.0), ("b", 1.0)];
        let first = split("exp", &arms, 1000);
        assert_eq!(first, split("exp", &arms, 1000));
        // Another experiment's assignment is not the same split of users.
        let other = split("other-exp", &arms, 1000);
        let same = first.iter().zip(&other).filter(|(x, y)| x == y).count();
        assert!((400..600).contains(&same), "{same} of 1000 agree");
        // Pinned: a release that changes these would move every user to another arm.
        assert_eq!(
            unit_hash(&["exp", "user-1", "a"]).to_bits(),
            4_606_846_816_173_173_712
        );
        assert_eq!(
            &first[..16],
            &[1, 0, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1, 1, 0, 0]
        );
        assert_ne!(unit_hash(&["ab", "c"]), unit_hash(&["a", "bc"]));
    }

    #[test]
    fn changing_weights_moves_only_the_units_that_must_move() {
        let keys = 10_000;
        // Two arms, 50/50 -> 60/40: exactly the units b gives up move, about 10%.
        let before = split("exp", &[("a", 0.5), ("b", 0.5)], keys);
        let after = split("exp", &[("a", 0.6), ("b", 0.4)], keys);
        let moved: Vec<(usize, usize)> = before
            .iter()
            .zip(&after)
            .filter(|(x, y)| x != y)
            .map(|(x, y)| (*x, *y))
            .collect();
        assert!(moved.iter().all(|&m| m == (1, 0)), "only b -> a");
        let share = moved.len() as f64 / keys as f64;
        assert!((share - 0.10).abs() < 0.015, "{share}");

        // Three arms, c grows from 1 to 2: units only move into c, never between a and b.
        let before = split("exp", &[("a", 1.0), ("b", 1.0), ("c", 1.0)], keys);
        let after = split("exp", &[("a", 1.0), ("b", 1.0), ("c", 2.0)], keys);
        for (x, y) in before.iter().zip(&after) {
            assert!(x == y || *y == 2, "{x} -> {y}");
        }
        let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
        // c goes from 1/3 to 1/2: the minimum is 1/6 of the units.
        let share = moved as f64 / keys as f64;
        assert!((share - 1.0 / 6.0).abs() < 0.015, "{share}");

        // A new arm takes units only for itself; a zero weight drains an arm.
        let grown = split(
            "exp",
            &[("a", 1.0), ("b", 1.0), ("c", 1.0), ("d", 1.0)],
            keys,
        );
        for (x, y) in before.iter().zip(&grown) {
            assert!(x == y || *y == 3);
        }
        let drained = split("exp", &[("a", 1.0), ("b", 0.0)], keys);
        assert!(drained.iter().all(|&a| a == 0));
        assert_eq!(assign("exp", "k", [("a", 0.0)]), None);
    }
}
