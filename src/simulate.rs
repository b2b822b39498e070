//! `wattgate simulate`: the paper's savings accounting replayed on labeled routing data, so an
//! operator can see what a routing policy would save before deploying it.
//!
//! Every query is priced twice with the configured constants, once as if served locally and
//! once on the cloud baseline; a policy picks one per query. Policies: cloud-only (the
//! baseline), the oracle (local exactly when the local model is right), the learned router at
//! its threshold, and a router that agrees with the oracle with probability p (decided by a
//! hash of the query id, so runs are reproducible). Quality is the mean score of the model
//! each policy picked. All figures are estimates from constants, labeled as such.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{Config, Role};
use crate::metering::accounting::{BackendRates, LocalRates};
use crate::metering::Tokens;
use crate::router::data::{self, Example};
use crate::router::features;
use crate::router::model;
use crate::router::train::Labels;

/// Local energy per generated token when none is given: the embedded Gemma 3 270M on this
/// project's reference 2-core CPU decodes 28 tokens/s (shared/design.md) at 2 x 6.25 W under
/// the `estimate` meter's default watts per core: 12.5 W / 28 tok/s = 0.45 J/token. An
/// estimate; pass a measured figure from `wattgate profile` for your machine.
pub const DEFAULT_LOCAL_JOULES_PER_TOKEN: f64 = 0.45;

/// Local energy per prompt token when none is given: the same model prefills 714.8 tokens/s on
/// the same 2 threads (README, "Embedded model against llama.cpp", measured), so 12.5 W /
/// 714.8 tok/s = 0.0175 J/token: prefill is batched over the prompt, decode is one token at a
/// time. An estimate from a measured speed and modeled watts.
pub const DEFAULT_LOCAL_JOULES_PER_INPUT_TOKEN: f64 = 0.0175;

/// Output tokens per answer when none is given: an assumption (labeled data carries no answer
/// lengths); 256 is a short chat answer. Pass your traffic's mean.
pub const DEFAULT_OUTPUT_TOKENS: u64 = 256;

/// What `wattgate simulate` was asked.
pub struct Request<'a> {
    /// Labeled files.
    pub data: &'a [PathBuf],
    /// Local label names (first present wins; `8b-class` allowed).
    pub local: &'a [String],
    /// Cloud label names; empty means each source's strongest model.
    pub cloud: &'a [String],
    /// A router name or directory for the router policy.
    pub router: Option<&'a str>,
    /// Where router names are looked up.
    pub router_dir: &'a Path,
    /// Threshold override; else the config's routing settings, else 0.5.
    pub threshold: Option<f64>,
    /// p of the p-accurate routers.
    pub accuracies: &'a [f64],
    /// Output tokens per answer.
    pub output_tokens: u64,
    /// Local joules per generated token; None: [`DEFAULT_LOCAL_JOULES_PER_TOKEN`] scaled by
    /// the labeled model's parameters.
    pub local_joules_per_token: Option<f64>,
    /// Local joules per prompt token; None: [`DEFAULT_LOCAL_JOULES_PER_INPUT_TOKEN`] scaled
    /// the same way.
    pub local_joules_per_input_token: Option<f64>,
    /// Active parameters of the labeled local model; None: read from its label's name.
    pub local_parameters: Option<f64>,
}

/// Parameters of the model [`DEFAULT_LOCAL_JOULES_PER_TOKEN`] was estimated on (Gemma 3 270M:
/// 268 M, Google's model card).
const DEFAULT_LOCAL_PARAMETERS: f64 = 2.68e8;

/// Active parameters read from a label's name: `7b`, `1.5b`, `270m`, `8b-class`; a Mixtral-style
/// `8x7b` is its published 12.9 B active parameters (Mistral AI, "Mixtral of experts", 2024),
/// any other `NxMb` two experts' worth. None when the name carries no size (`gpt-4`, `claude`).
pub fn parameters_from_label(label: &str) -> Option<f64> {
    let name = label.to_ascii_lowercase();
    let bytes = name.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        let boundary = start == 0 || !bytes[start - 1].is_ascii_alphanumeric();
        if i > start && boundary {
            let number: Option<f64> = name[start..i].parse().ok();
            let unit = bytes.get(i).copied();
            let after = bytes.get(i + 1).copied();
            let ends = |b: Option<u8>| b.is_none_or(|b| !b.is_ascii_alphanumeric());
            match (number, unit) {
                (Some(n), Some(b'b')) if ends(after) => return Some(n * 1e9),
                (Some(n), Some(b'm')) if ends(after) => return Some(n * 1e6),
                (Some(experts), Some(b'x')) => {
                    let rest = &name[i + 1..];
                    let digits: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_digit() || *c == '.')
                        .collect();
                    let size: Option<f64> = digits.parse().ok();
                    if let (Some(size), Some('b')) = (size, rest[digits.len()..].chars().next()) {
                        return Some(if experts == 8.0 && size == 7.0 {
                            12.9e9
                        } else {
                            2.0 * size * 1e9
                        });
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// Loads data, labels, router and constants from `config`, and runs every policy.
pub fn command(config: &Config, req: &Request) -> Result<(Vec<PolicyResult>, String), String> {
    let mut examples = Vec::new();
    for f in req.data {
        examples.extend(data::read_examples(f)?);
    }
    let router = match req.router {
        Some(r) => Some(model::load_named(r, req.router_dir).map_err(|e| e.to_string())?),
        None => None,
    };
    // A router is scored only on sources it was not trained on; every policy then sees the
    // same held-out rows, so the comparison stays like for like.
    let mut held_out_note = String::new();
    if let Some(m) = &router {
        let trained: std::collections::BTreeSet<&str> = m
            .meta
            .trained_on
            .iter()
            .map(|s| s.source.as_str())
            .collect();
        let before = examples.len();
        examples.retain(|e| !trained.contains(e.source.as_str()));
        if examples.is_empty() {
            return Err(format!(
                "every row comes from a source the router was trained on ({}); simulate it on other sources",
                trained.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        held_out_note = format!(
            "; {} of {before} rows are from sources the router was trained on and were left out",
            before - examples.len()
        );
    }
    let labels = Labels::new(&examples, req.local, req.cloud);
    let threshold = router.as_ref().map(|m| {
        let r = &config.routing;
        req.threshold
            .or(r.threshold)
            .or_else(|| r.target_local_share.map(|s| m.threshold_for_share(s)))
            .or_else(|| r.max_quality_loss.map(|l| m.threshold_for_quality_loss(l)))
            .unwrap_or(0.5)
    });
    let queries: Vec<Query> = examples
        .iter()
        .filter_map(|e| {
            let p = router.as_ref().map(|m| m.score(&e.query()));
            Some(Query::new(e, labels.local(e)?, labels.cloud(e)?, p))
        })
        .collect();
    if queries.is_empty() {
        return Err(format!(
            "no row carries both a `{}` label and a cloud label",
            req.local.join(" | ")
        ));
    }
    let local = config
        .backends
        .iter()
        .find(|b| b.role == Role::Local)
        .ok_or("the config has no local backend to simulate")?;
    let cloud = match &config.metering.baseline_backend {
        Some(name) => config.backends.iter().find(|b| &b.name == name),
        None => config.backends.iter().find(|b| b.role == Role::Cloud),
    }
    .ok_or("the config has no cloud backend to compare with")?;
    // The labels are one model's answers: price them as that model, not as the configured
    // local backend (the embedded 270 M model by default).
    let label = req.local.first().map(String::as_str).unwrap_or_default();
    let parameters = match req.local_parameters.or_else(|| parameters_from_label(label)) {
        Some(p) => p,
        None => {
            return Err(format!(
                "the local label `{label}` names no model size; pass --local-parameters (active parameters, e.g. 8e9)"
            ))
        }
    };
    let local_joules_per_token = req
        .local_joules_per_token
        .unwrap_or(DEFAULT_LOCAL_JOULES_PER_TOKEN * parameters / DEFAULT_LOCAL_PARAMETERS);
    let local_joules_per_input_token = req
        .local_joules_per_input_token
        .unwrap_or(DEFAULT_LOCAL_JOULES_PER_INPUT_TOKEN * parameters / DEFAULT_LOCAL_PARAMETERS);
    let mut local_rates = BackendRates::from_config(local, &config.metering);
    local_rates.active_parameters = parameters;
    let constants = Constants {
        local: local_rates,
        cloud: BackendRates::from_config(cloud, &config.metering),
        local_joules_per_token,
        local_joules_per_input_token,
        local_usd_per_joule: LocalRates::from_config(&config.metering).usd_per_joule,
        output_tokens: req.output_tokens,
    };
    let header = format!(
        "{} labeled queries{held_out_note}; local labels `{label}` priced as {:.3e} active params on `{}`'s electricity ({:.4} J/input token and {:.3} J/output token estimated), cloud baseline `{}` ({:.3e} active params, {:.3} J/input token and {:.3} J/output token with PUE, estimated; ${}/{} per 1M tokens); {} output tokens per answer assumed; cloud labels: {}",
        queries.len(),
        constants.local.active_parameters,
        local.name,
        local_joules_per_input_token,
        local_joules_per_token,
        cloud.name,
        constants.cloud.active_parameters,
        constants.cloud.joules_per_input_token,
        constants.cloud.joules_per_output_token,
        cloud.usd_per_million_input_tokens.unwrap_or(0.0),
        cloud.usd_per_million_output_tokens.unwrap_or(0.0),
        req.output_tokens,
        labels.cloud_description(),
    );
    Ok((run(&queries, &constants, threshold, req.accuracies), header))
}

/// Per-query constants for the simulation.
#[derive(Debug, Clone)]
pub struct Constants {
    /// The local model's rates (active parameters for FLOPs).
    pub local: BackendRates,
    /// The cloud baseline's rates (J/token with PUE, $/token, active parameters).
    pub cloud: BackendRates,
    /// Local joules per generated token.
    pub local_joules_per_token: f64,
    /// Local joules per prompt token.
    pub local_joules_per_input_token: f64,
    /// Local $ per joule (electricity).
    pub local_usd_per_joule: f64,
    /// Output tokens assumed per answer (the labeled data has no answers' lengths).
    pub output_tokens: u64,
}

/// One labeled query, reduced to what the accounting needs.
#[derive(Debug, Clone)]
pub struct Query {
    /// Row id (seeds the p-accurate router's coin).
    pub id: String,
    /// Input tokens (characters / 4).
    pub input_tokens: u64,
    /// Local model's score.
    pub local: f64,
    /// Cloud model's score.
    pub cloud: f64,
    /// Router's p_local, when a router was given.
    pub p_local: Option<f64>,
}

impl Query {
    /// From a labeled example and its two labels.
    pub fn new(e: &Example, local: f64, cloud: f64, p_local: Option<f64>) -> Self {
        Self {
            id: e.id.clone(),
            input_tokens: (e.prompt.chars().count() as u64).div_ceil(4),
            local,
            cloud,
            p_local,
        }
    }
}

/// One policy's results.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyResult {
    /// Policy name.
    pub policy: String,
    /// Share of queries served locally.
    pub local_share: f64,
    /// Mean score of the picked models (0..1).
    pub quality: f64,
    /// Quality minus cloud-only quality, in points (x 100).
    pub quality_change_points: f64,
    /// Energy saved against cloud-only, percent (estimate).
    pub energy_saved_percent: f64,
    /// Compute saved, percent.
    pub compute_saved_percent: f64,
    /// Cost saved, percent (estimate).
    pub cost_saved_percent: f64,
    /// Totals, for checking: joules, FLOPs and $ actually spent and cloud-only.
    pub joules: (f64, f64),
    /// FLOPs (actual, cloud-only).
    pub flops: (f64, f64),
    /// Dollars (actual, cloud-only).
    pub usd: (f64, f64),
}

/// Runs every policy over `queries`. `threshold` applies to the router's p_local; `accuracies`
/// are the p of the p-accurate routers.
pub fn run(
    queries: &[Query],
    constants: &Constants,
    threshold: Option<f64>,
    accuracies: &[f64],
) -> Vec<PolicyResult> {
    let mut out = vec![
        evaluate("cloud-only", queries, constants, |_| false),
        evaluate("oracle", queries, constants, |q| q.local >= 0.5),
    ];
    if let Some(t) = threshold {
        if queries.iter().all(|q| q.p_local.is_some()) {
            out.push(evaluate(
                &format!("router (threshold {t:.3})"),
                queries,
                constants,
                |q| q.p_local.is_some_and(|p| p >= t),
            ));
        }
    }
    for &p in accuracies {
        out.push(evaluate(
            &format!("{:.0}%-accurate router", p * 100.0),
            queries,
            constants,
            |q| {
                let oracle = q.local >= 0.5;
                if coin(&q.id) < p {
                    oracle
                } else {
                    !oracle
                }
            },
        ));
    }
    out
}

fn evaluate(
    name: &str,
    queries: &[Query],
    c: &Constants,
    local: impl Fn(&Query) -> bool,
) -> PolicyResult {
    let mut n_local = 0usize;
    let (mut quality, mut cloud_quality) = (0.0, 0.0);
    let (mut j, mut cj, mut f, mut cf, mut u, mut cu) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for q in queries {
        let tokens = Tokens {
            input: q.input_tokens,
            output: c.output_tokens,
        };
        let cloud_j = c.cloud.cloud_joules(tokens);
        let cloud_f = c.cloud.flops(tokens);
        let cloud_u = c.cloud.cloud_usd(tokens);
        cj += cloud_j;
        cf += cloud_f;
        cu += cloud_u;
        cloud_quality += q.cloud;
        if local(q) {
            n_local += 1;
            let local_j = c.local_joules_per_input_token * tokens.input as f64
                + c.local_joules_per_token * tokens.output as f64;
            j += local_j;
            f += c.local.flops(tokens);
            u += local_j * c.local_usd_per_joule;
            quality += q.local;
        } else {
            j += cloud_j;
            f += cloud_f;
            u += cloud_u;
            quality += q.cloud;
        }
    }
    let n = queries.len().max(1) as f64;
    let pct = |actual: f64, base: f64| {
        if base > 0.0 {
            (base - actual) / base * 100.0
        } else {
            0.0
        }
    };
    PolicyResult {
        policy: name.to_owned(),
        local_share: n_local as f64 / n,
        quality: quality / n,
        quality_change_points: (quality - cloud_quality) / n * 100.0,
        energy_saved_percent: pct(j, cj),
        compute_saved_percent: pct(f, cf),
        cost_saved_percent: pct(u, cu),
        joules: (j, cj),
        flops: (f, cf),
        usd: (u, cu),
    }
}

/// A uniform number in [0, 1) from a query id: the p-accurate router's coin, the same on every
/// run and machine.
fn coin(id: &str) -> f64 {
    (features::stable_hash(id) >> 11) as f64 / (1u64 << 53) as f64
}

/// The results as a terminal table.
pub fn table(results: &[PolicyResult]) -> String {
    let mut out = format!(
        "{:<28} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9}\n",
        "policy", "local %", "quality", "Δ points", "energy %", "compute %", "cost %"
    );
    for r in results {
        out.push_str(&format!(
            "{:<28} {:>8.1} {:>8.3} {:>9.2} {:>9.1} {:>9.1} {:>9.1}\n",
            r.policy,
            r.local_share * 100.0,
            r.quality,
            r.quality_change_points,
            r.energy_saved_percent,
            r.compute_saved_percent,
            r.cost_saved_percent
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;

    fn rates(role: Role, params: f64, j: f64, usd: f64) -> BackendRates {
        BackendRates {
            role,
            active_parameters: params,
            usd_per_input_token: usd,
            usd_per_output_token: usd,
            joules_per_input_token: j,
            joules_per_output_token: j,
        }
    }

    fn constants() -> Constants {
        Constants {
            local: rates(Role::Local, 1e9, 0.0, 0.0),
            cloud: rates(Role::Cloud, 1e11, 1.0, 1e-6),
            local_joules_per_token: 0.2,
            local_joules_per_input_token: 0.2,
            local_usd_per_joule: 0.0,
            output_tokens: 6,
        }
    }

    fn query(id: &str, local: f64) -> Query {
        Query {
            id: id.to_owned(),
            input_tokens: 4,
            local,
            cloud: 1.0,
            p_local: Some(local),
        }
    }

    #[test]
    fn oracle_and_router_against_hand_computed_values() {
        // Four queries of 10 tokens each; local is right on two.
        let qs = [
            query("a", 1.0),
            query("b", 0.0),
            query("c", 1.0),
            query("d", 0.0),
        ];
        let r = run(&qs, &constants(), Some(0.5), &[]);
        assert_eq!(r[0].policy, "cloud-only");
        assert_eq!(r[0].energy_saved_percent, 0.0);
        let oracle = &r[1];
        assert_eq!(oracle.local_share, 0.5);
        // Cloud-only: 4 x 10 J = 40 J; oracle: 2 x 10 J + 2 x (10 x 0.2) J = 24 J -> 40% saved.
        assert!((oracle.energy_saved_percent - 40.0).abs() < 1e-9);
        // FLOPs: cloud 4 x 2e12; oracle 2 x 2e12 + 2 x 2e10 -> 49.5% saved.
        assert!((oracle.compute_saved_percent - 49.5).abs() < 1e-9);
        assert!((oracle.cost_saved_percent - 50.0).abs() < 1e-9);
        assert_eq!(oracle.quality_change_points, 0.0);
        // The router's p equals the label here, so it matches the oracle.
        assert_eq!(r[2].local_share, 0.5);
    }

    #[test]
    fn a_p_accurate_router_agrees_with_the_oracle_about_p_of_the_time() {
        let qs: Vec<Query> = (0..10_000)
            .map(|i| query(&format!("q{i}"), if i % 3 == 0 { 1.0 } else { 0.0 }))
            .collect();
        let r = run(&qs, &constants(), None, &[0.8]);
        let p80 = &r[2];
        // Expected local share: 0.8 x 1/3 + 0.2 x 2/3 = 0.4.
        assert!((p80.local_share - 0.4).abs() < 0.015, "{}", p80.local_share);
        // Same ids, same result.
        let again = run(&qs, &constants(), None, &[0.8]);
        assert_eq!(again[2].local_share, p80.local_share);
    }

    #[test]
    fn a_label_is_priced_by_the_size_its_name_gives() {
        assert_eq!(parameters_from_label("llama-3.1-8b-instruct"), Some(8e9));
        assert_eq!(parameters_from_label("qwen1.5-110b"), Some(110e9));
        assert_eq!(parameters_from_label("8b-class"), Some(8e9));
        assert_eq!(parameters_from_label("gemma-3-270m"), Some(270e6));
        assert_eq!(
            parameters_from_label("mixtral-8x7b-instruct-v0.1"),
            Some(12.9e9)
        );
        assert_eq!(parameters_from_label("phi-3-mini-4k-instruct"), None);
        assert_eq!(parameters_from_label("gpt-4-1106-preview"), None);
        assert_eq!(parameters_from_label("llama3-chatqa-1.5-70b"), Some(70e9));
    }

    #[test]
    fn a_router_is_scored_only_on_sources_it_was_not_trained_on_and_labels_at_their_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("d.jsonl");
        // The shipped gemma-3-270m router was trained on routellm/mmlu (among others).
        let rows = [
            r#"{"id":"a","source":"routellm/mmlu","prompt":"What is 2+2?","scores":{"llama-3.1-8b-instruct":1.0,"gpt-4":1.0}}"#,
            r#"{"id":"b","source":"held-out","prompt":"Name a prime.","scores":{"llama-3.1-8b-instruct":1.0,"gpt-4":1.0}}"#,
        ];
        std::fs::write(&data, rows.join("\n")).expect("write");
        let config = Config::parse(
            r#"
[[backends]]
name = "local"
kind = "openai"
role = "local"
base_url = "http://127.0.0.1:9/v1"
model = "m"
parameters = 2.68e8
[[backends]]
name = "cloud"
kind = "openai"
role = "cloud"
base_url = "http://127.0.0.1:9/v1"
model = "c"
parameters = 1e11
"#,
        )
        .expect("config");
        let files = [data];
        let local = ["llama-3.1-8b-instruct".to_owned()];
        let cloud = ["gpt-4".to_owned()];
        let router_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("router-models");
        let req = Request {
            data: &files,
            local: &local,
            cloud: &cloud,
            router: Some("gemma-3-270m"),
            router_dir: &router_dir,
            threshold: None,
            accuracies: &[],
            output_tokens: 10,
            local_joules_per_token: None,
            local_joules_per_input_token: None,
            local_parameters: None,
        };
        let (results, header) = command(&config, &req).expect("simulate");
        assert!(
            header.starts_with("1 labeled queries; 1 of 2 rows"),
            "{header}"
        );
        assert!(header.contains("8.000e9 active params"), "{header}");
        let oracle = results
            .iter()
            .find(|r| r.policy == "oracle")
            .expect("oracle");
        // One local answer of 13 tokens (3 prompt tokens + 10): FLOPs at 8e9 parameters.
        let input = ("Name a prime.".len() as u64).div_ceil(4) as f64;
        let tokens = input + 10.0;
        assert!(
            (oracle.flops.0 - 2.0 * 8e9 * tokens).abs() < 1.0,
            "{oracle:?}"
        );
        // Prompt and generated tokens at their own rates, both scaled to 8e9 parameters.
        let joules = (0.0175 * input + 0.45 * 10.0) * 8e9 / 2.68e8;
        assert!((oracle.joules.0 - joules).abs() < 1e-6, "{oracle:?}");
    }
}
