//! Routing: which backend serves a request, and why.
//!
//! Every decision carries a [`Reason`] whose code is sent to the client (`x-wattgate-reason`),
//! counted in Prometheus and, later, stored in the ledger, so a surprising route can always be
//! explained. The order of a decision, top to bottom: a route the client forces; the configured
//! policy's fixed answers; hard constraints (what a local backend cannot do); then, under
//! `policy = "router"`, each local backend's learned router in config order (cheapest first).

pub mod commands;
pub mod data;
pub mod evaluation;
pub mod features;
mod fit;
pub mod model;
pub mod own;
mod reason;
pub mod train;

use std::sync::Arc;

use serde_json::Value;

use crate::config::{BackendConfig, Role, RoutingConfig, RoutingPolicy};
use crate::wire::ChatRequest;
use features::Query;
use model::RouterModel;
pub use reason::Reason;

/// Threshold when the config sets none: serve locally when success is more likely than not.
pub const DEFAULT_THRESHOLD: f64 = 0.5;

/// Characters per token for the pre-tokenization context estimate: OpenAI's rule of thumb
/// for English text ("one token is roughly 4 characters", OpenAI tokenizer help page).
const CHARS_PER_TOKEN: usize = 4;

/// A routing decision: the backend (index in config order), the reason, and the learned
/// router's estimate when one was computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Index into the configured backends.
    pub backend: usize,
    /// Why.
    pub reason: Reason,
    /// p_local of the local backend chosen, or the best p_local seen when the cloud was chosen.
    pub p_local: Option<f64>,
}

/// What the client asked of this one request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Overrides {
    /// `x-wattgate-route`: force a side.
    pub force: Option<Role>,
    /// `x-wattgate-threshold`: replaces every local backend's threshold.
    pub threshold: Option<f64>,
    /// `x-wattgate-guard: off|check`: the quality guard for this request.
    pub guard: Option<crate::config::GuardMode>,
}

/// Capabilities a request needs that a local backend may lack.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    native: bool,
    tools: bool,
    response_format: bool,
    images: bool,
    n: bool,
    logprobs: bool,
}

impl Needs {
    /// Reads the request body.
    pub fn of(request: &ChatRequest) -> Self {
        let body = request.body();
        let non_empty = |k: &str| match body.get(k) {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        let response_format = match body.get("response_format") {
            None | Some(Value::Null) => false,
            Some(v) => v.get("type").and_then(Value::as_str) != Some("text"),
        };
        let images = body
            .get("messages")
            .and_then(Value::as_array)
            .is_some_and(|messages| {
                messages.iter().any(|m| {
                    m.get("content")
                        .and_then(Value::as_array)
                        .is_some_and(|parts| {
                            parts.iter().any(|p| {
                                let t = p.get("type").and_then(Value::as_str).unwrap_or("text");
                                t != "text"
                            })
                        })
                })
            });
        let n = body
            .get("n")
            .and_then(Value::as_f64)
            .is_some_and(|n| n > 1.0);
        // The parser refuses `top_logprobs` without `logprobs: true`.
        let logprobs = request.client_logprobs();
        Self {
            native: request.native().is_some(),
            tools: non_empty("tools") || non_empty("functions"),
            response_format,
            images,
            n,
            logprobs,
        }
    }
}

/// One local backend as the router sees it.
#[derive(Debug, Clone)]
struct Local {
    backend: usize,
    supports_tools: bool,
    supports_response_format: bool,
    supports_images: bool,
    supports_logprobs: bool,
    max_context_tokens: usize,
    /// Under `policy = "router"`: its router and threshold.
    head: Option<(Arc<RouterModel>, f64)>,
}

impl Local {
    /// The first hard constraint this backend fails for the request, if any.
    fn refusal(&self, needs: Needs, prompt_chars: usize) -> Option<Reason> {
        // Local backends are served a translation to chat, and this request has none.
        if needs.native {
            return Some(Reason::NeedsNativeApi);
        }
        if needs.tools && !self.supports_tools {
            return Some(Reason::NeedsTools);
        }
        if needs.response_format && !self.supports_response_format {
            return Some(Reason::NeedsResponseFormat);
        }
        if needs.images && !self.supports_images {
            return Some(Reason::NeedsImages);
        }
        if needs.n {
            return Some(Reason::NeedsN);
        }
        if needs.logprobs && !self.supports_logprobs {
            return Some(Reason::NeedsLogprobs);
        }
        if prompt_chars / CHARS_PER_TOKEN > self.max_context_tokens {
            return Some(Reason::ContextTooLong);
        }
        None
    }
}

/// The configured routing: policy, hard constraints and (for `policy = "router"`) one learned
/// router per local backend.
#[derive(Debug, Clone)]
pub struct Router {
    policy: RoutingPolicy,
    max_local_prompt_chars: usize,
    locals: Vec<Local>,
    first_cloud: Option<usize>,
}

impl Router {
    /// Builds the routing for `backends` (config order). Loads each local backend's router
    /// under `policy = "router"`; a missing or broken router file is an error naming it.
    pub fn new(config: &RoutingConfig, backends: &[BackendConfig]) -> Result<Self, String> {
        let (config, why) = config.resolved(backends);
        let config = &config;
        if let Some(why) = why {
            tracing::info!(policy = %config.policy, why, "routing policy");
        }
        let mut locals = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            if b.role != Role::Local {
                continue;
            }
            let head = match (&config.policy, b.router_name()) {
                (RoutingPolicy::Router, Some(name)) => {
                    let dir = model::resolve(&name, &config.router_dir)
                        .map_err(|e| format!("backends[{i}].router: {e}"))?;
                    let m = RouterModel::load(&dir)
                        .map_err(|e| format!("backends[{i}].router: {e}"))?;
                    let threshold = threshold_for(config, &m);
                    tracing::info!(
                        backend = %b.name,
                        router = %dir.display(),
                        threshold,
                        "router loaded"
                    );
                    Some((Arc::new(m), threshold))
                }
                (RoutingPolicy::Router, None) => {
                    return Err(format!(
                        "backends[{i}].router is required when routing.policy = \"router\""
                    ));
                }
                _ => None,
            };
            locals.push(Local {
                backend: i,
                supports_tools: b.supports_tools,
                supports_response_format: b.supports_response_format,
                supports_images: b.supports_images,
                supports_logprobs: b.logprobs_supported(),
                max_context_tokens: b.max_context,
                head,
            });
        }
        Ok(Self {
            policy: config.policy,
            max_local_prompt_chars: config.max_local_prompt_chars,
            locals,
            first_cloud: backends.iter().position(|b| b.role == Role::Cloud),
        })
    }

    /// The first cloud backend, the fallback target.
    pub fn cloud(&self) -> Option<usize> {
        self.first_cloud
    }

    /// Each local backend's learned router (under `policy = "router"`): backend index, the
    /// model, its threshold.
    pub fn heads(&self) -> impl Iterator<Item = (usize, &RouterModel, f64)> + '_ {
        self.locals
            .iter()
            .filter_map(|l| l.head.as_ref().map(|(m, t)| (l.backend, m.as_ref(), *t)))
    }

    /// The local backends that could serve `request` at all (no hard constraint refuses it),
    /// cheapest first: where traffic goes when the cloud is down, whatever the router says.
    pub fn capable_locals<'a>(
        &'a self,
        request: &'a ChatRequest,
    ) -> impl Iterator<Item = usize> + 'a {
        let needs = Needs::of(request);
        self.locals
            .iter()
            .filter(move |l| l.refusal(needs, request.prompt_chars).is_none())
            .map(|l| l.backend)
    }

    /// The thresholds in use, by backend index (for the startup log and tests).
    pub fn thresholds(&self) -> Vec<(usize, f64)> {
        self.locals
            .iter()
            .filter_map(|l| Some((l.backend, l.head.as_ref()?.1)))
            .collect()
    }

    /// Decides for a request that named the routing alias.
    pub fn decide(&self, request: &ChatRequest, overrides: Overrides) -> Decision {
        let pick = |backend: usize, reason: Reason| Decision {
            backend,
            reason,
            p_local: None,
        };
        let first_local = self.locals.first().map(|l| l.backend);
        let cloud = self.first_cloud;
        match (overrides.force, first_local, cloud) {
            (Some(Role::Local), Some(l), _) => return pick(l, Reason::ForcedLocal),
            (Some(Role::Cloud), _, Some(c)) => return pick(c, Reason::ForcedCloud),
            _ => {}
        }
        let cloud = match (self.policy, first_local, cloud) {
            (RoutingPolicy::CloudOnly, _, Some(c)) => return pick(c, Reason::CloudOnly),
            (RoutingPolicy::LocalOnly, Some(l), _) => return pick(l, Reason::LocalOnly),
            (_, None, Some(c)) => return pick(c, Reason::NoLocalBackend),
            (_, Some(l), None) => return pick(l, Reason::NoCloudBackend),
            // Config validation guarantees at least one backend.
            (_, None, None) => return pick(0, Reason::NoLocalBackend),
            (_, Some(_), Some(c)) => c,
        };
        if self.max_local_prompt_chars > 0 && request.prompt_chars > self.max_local_prompt_chars {
            return pick(cloud, Reason::PromptTooLong);
        }

        // Hard constraints: which local backends can serve this request at all.
        let needs = Needs::of(request);
        let mut first_refusal = None;
        let eligible: Vec<&Local> = self
            .locals
            .iter()
            .filter(|l| match l.refusal(needs, request.prompt_chars) {
                Some(r) => {
                    first_refusal.get_or_insert(r);
                    false
                }
                None => true,
            })
            .collect();
        let Some(first) = eligible.first() else {
            return pick(cloud, first_refusal.unwrap_or(Reason::LocalUnsupported));
        };
        if self.policy == RoutingPolicy::PreferLocal {
            return pick(first.backend, Reason::PreferLocal);
        }

        // The learned router: the first (cheapest) local backend whose p_local clears its
        // threshold; otherwise the cloud, reporting the best p_local seen.
        // Features are extracted once per bucket count, shared by heads of the same size.
        let query = request_query(request);
        let mut extracted: Option<features::Features> = None;
        let mut extracted_buckets = 0u32;
        let mut best: Option<f64> = None;
        for l in eligible {
            let Some((head, threshold)) = &l.head else {
                continue;
            };
            let buckets = head.meta.buckets;
            let f = match extracted.take() {
                Some(f) if extracted_buckets == buckets => f,
                _ => features::extract(&query, buckets),
            };
            let p = head.score_features(&f);
            extracted = Some(f);
            extracted_buckets = buckets;
            if p >= overrides.threshold.unwrap_or(*threshold) {
                return Decision {
                    backend: l.backend,
                    reason: Reason::RouterLocal,
                    p_local: Some(p),
                };
            }
            best = Some(best.map_or(p, |b: f64| b.max(p)));
        }
        Decision {
            backend: cloud,
            reason: Reason::RouterCloud,
            p_local: best,
        }
    }
}

/// The query the router scores for a request: its messages, by role.
pub fn request_query(request: &ChatRequest) -> Query {
    match request.body().get("messages").and_then(Value::as_array) {
        Some(messages) => Query::from_messages(messages),
        None => Query::default(),
    }
}

/// The threshold a router gets from `[routing]`.
fn threshold_for(config: &RoutingConfig, model: &RouterModel) -> f64 {
    if let Some(t) = config.threshold {
        t
    } else if let Some(share) = config.target_local_share {
        model.threshold_for_share(share)
    } else if let Some(loss) = config.max_quality_loss {
        model.threshold_for_quality_loss(loss)
    } else {
        DEFAULT_THRESHOLD
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use data::Example;

    fn request(body: serde_json::Value) -> ChatRequest {
        ChatRequest::parse(body.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn chars(n: usize) -> ChatRequest {
        request(
            serde_json::json!({"model": "auto", "messages": [{"role": "user", "content": "x".repeat(n)}]}),
        )
    }

    /// Backends with the given roles, from the default config's templates.
    fn backends(roles: &[Role]) -> Vec<BackendConfig> {
        let defaults = Config::default().backends;
        roles
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut b = defaults
                    .iter()
                    .find(|b| b.role == *r)
                    .cloned()
                    .unwrap_or_else(|| unreachable!());
                b.name = format!("b{i}");
                b
            })
            .collect()
    }

    fn rule(policy: RoutingPolicy, roles: &[Role]) -> Router {
        let config = RoutingConfig {
            policy,
            max_local_prompt_chars: 10,
            ..RoutingConfig::default()
        };
        Router::new(&config, &backends(roles)).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn decisions_follow_the_policy() {
        use Role::*;
        use RoutingPolicy::*;
        let both = [Cloud, Local];
        let cases = [
            (PreferLocal, &both[..], 5, 1, Reason::PreferLocal),
            (PreferLocal, &both[..], 11, 0, Reason::PromptTooLong),
            (CloudOnly, &both[..], 5, 0, Reason::CloudOnly),
            (LocalOnly, &both[..], 50, 1, Reason::LocalOnly),
            (PreferLocal, &[Cloud][..], 5, 0, Reason::NoLocalBackend),
            (PreferLocal, &[Local][..], 50, 0, Reason::NoCloudBackend),
            (CloudOnly, &[Local][..], 5, 0, Reason::NoCloudBackend),
            (LocalOnly, &[Cloud][..], 5, 0, Reason::NoLocalBackend),
        ];
        for (policy, roles, n, backend, reason) in cases {
            let d = rule(policy, roles).decide(&chars(n), Overrides::default());
            assert_eq!(
                (d.backend, d.reason, d.p_local),
                (backend, reason, None),
                "{policy} {roles:?} {n}"
            );
        }
    }

    #[test]
    fn hard_constraints_send_what_local_cannot_do_to_the_cloud() {
        let config = RoutingConfig {
            max_local_prompt_chars: 0,
            ..RoutingConfig::default()
        };
        // A local backend that declares no logprobs support (the embedded model has it).
        let mut declared = backends(&[Role::Local, Role::Cloud]);
        declared[0].supports_logprobs = Some(false);
        let router = Router::new(&config, &declared).unwrap_or_else(|e| panic!("{e}"));
        let user = serde_json::json!([{"role": "user", "content": "hi"}]);
        let image = serde_json::json!([{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]);
        let cases = [
            (
                serde_json::json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
                user.clone(),
                Reason::NeedsTools,
            ),
            (
                serde_json::json!({"response_format": {"type": "json_object"}}),
                user.clone(),
                Reason::NeedsResponseFormat,
            ),
            (serde_json::json!({}), image, Reason::NeedsImages),
            (serde_json::json!({"n": 2}), user.clone(), Reason::NeedsN),
            (
                serde_json::json!({"logprobs": true}),
                user.clone(),
                Reason::NeedsLogprobs,
            ),
            (
                serde_json::json!({"logprobs": true, "top_logprobs": 3}),
                user.clone(),
                Reason::NeedsLogprobs,
            ),
            // Neutral values of the same fields stay local.
            (
                serde_json::json!({"tools": [], "n": 1, "logprobs": false, "response_format": {"type": "text"}}),
                user.clone(),
                Reason::PreferLocal,
            ),
        ];
        for (extra, messages, reason) in cases {
            let mut body = serde_json::json!({"model": "auto", "messages": messages});
            if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
                b.extend(e.clone());
            }
            let d = router.decide(&request(body.clone()), Overrides::default());
            assert_eq!(d.reason, reason, "{body}");
            let expected = if reason == Reason::PreferLocal { 0 } else { 1 };
            assert_eq!(d.backend, expected, "{body}");
        }

        // A backend that supports tools keeps them; context is estimated at 4 chars a token.
        let mut b = backends(&[Role::Local, Role::Cloud]);
        b[0].supports_tools = true;
        b[0].max_context = 100;
        let config = RoutingConfig {
            max_local_prompt_chars: 0,
            ..RoutingConfig::default()
        };
        let router = Router::new(&config, &b).unwrap_or_else(|e| panic!("{e}"));
        let tools = request(
            serde_json::json!({"model": "auto", "messages": user, "tools": [{"type": "function"}]}),
        );
        assert_eq!(
            router.decide(&tools, Overrides::default()).reason,
            Reason::PreferLocal
        );
        assert_eq!(
            router.decide(&chars(400), Overrides::default()).reason,
            Reason::PreferLocal
        );
        let long = router.decide(&chars(404), Overrides::default());
        assert_eq!((long.backend, long.reason), (1, Reason::ContextTooLong));
    }

    #[test]
    fn forced_routes_win_over_policy_and_constraints() {
        let router = rule(RoutingPolicy::CloudOnly, &[Role::Local, Role::Cloud]);
        let force = |role| Overrides {
            force: Some(role),
            ..Overrides::default()
        };
        let d = router.decide(&chars(500), force(Role::Local));
        assert_eq!((d.backend, d.reason), (0, Reason::ForcedLocal));
        let router = rule(RoutingPolicy::LocalOnly, &[Role::Local, Role::Cloud]);
        let d = router.decide(&chars(5), force(Role::Cloud));
        assert_eq!((d.backend, d.reason), (1, Reason::ForcedCloud));
    }

    /// Trains a tiny router where prompts about `easy` succeed locally and `hard` ones fail
    /// (or the reverse), over two sources so validation runs.
    fn tiny_router(dir: &std::path::Path, name: &str, easy_is_local: bool) {
        let mut examples = Vec::new();
        for i in 0..80 {
            let easy = i % 2 == 0;
            let label = if easy == easy_is_local { 1.0 } else { 0.0 };
            let topic = if easy {
                "easy arithmetic"
            } else {
                "hard proof"
            };
            examples.push(Example {
                id: i.to_string(),
                source: if i < 40 { "a" } else { "b" }.to_owned(),
                category: None,
                prompt: format!("{topic} question number {i}"),
                scores: [("small".to_owned(), label), ("big".to_owned(), 1.0)].into(),
                messages: None,
                weight: 1.0,
            });
        }
        let mut options = train::TrainOptions::new(name, vec!["small".into()], vec!["big".into()]);
        // Small and one candidate: this test is about routing, not validation, and runs in debug.
        options.buckets = 1 << 12;
        options.choices.truncate(1);
        let trained =
            train::train(&examples, &options, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
        trained
            .model
            .save(&dir.join(name))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn the_learned_router_picks_the_cheapest_local_backend_that_clears_its_threshold() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        tiny_router(dir.path(), "likes-easy", true);
        tiny_router(dir.path(), "likes-hard", false);
        let mut b = backends(&[Role::Local, Role::Local, Role::Cloud]);
        b[0].router = Some("likes-easy".into());
        b[1].router = Some("likes-hard".into());
        let config = RoutingConfig {
            policy: RoutingPolicy::Router,
            router_dir: dir.path().to_path_buf(),
            ..RoutingConfig::default()
        };
        let router = Router::new(&config, &b).unwrap_or_else(|e| panic!("{e}"));
        let ask = |text: &str| {
            request(
                serde_json::json!({"model": "auto", "messages": [{"role": "user", "content": text}]}),
            )
        };
        let easy_model =
            RouterModel::load(&dir.path().join("likes-easy")).unwrap_or_else(|e| panic!("{e}"));
        let hard_model =
            RouterModel::load(&dir.path().join("likes-hard")).unwrap_or_else(|e| panic!("{e}"));

        let easy = router.decide(&ask("an easy arithmetic question"), Overrides::default());
        let p = easy_model.score(&Query::from_prompt("an easy arithmetic question"));
        assert!(p > 0.5, "{p}");
        assert_eq!(
            (easy.backend, easy.reason, easy.p_local),
            (0, Reason::RouterLocal, Some(p))
        );

        let hard = router.decide(&ask("a hard proof question"), Overrides::default());
        assert_eq!((hard.backend, hard.reason), (1, Reason::RouterLocal));
        let p_hard = hard_model.score(&Query::from_prompt("a hard proof question"));
        assert_eq!(hard.p_local, Some(p_hard));

        // A threshold nothing clears sends it to the cloud, reporting the best p seen.
        let none = router.decide(
            &ask("an easy arithmetic question"),
            Overrides {
                threshold: Some(1.0),
                ..Overrides::default()
            },
        );
        assert_eq!((none.backend, none.reason), (2, Reason::RouterCloud));
        assert_eq!(
            none.p_local,
            Some(p.max(hard_model.score(&Query::from_prompt("an easy arithmetic question"))))
        );

        // Constraints come first: tools skip both locals without scoring.
        let tools = request(
            serde_json::json!({"model": "auto", "messages": [{"role": "user", "content": "easy arithmetic"}], "tools": [{"type": "function"}]}),
        );
        let d = router.decide(&tools, Overrides::default());
        assert_eq!(
            (d.backend, d.reason, d.p_local),
            (2, Reason::NeedsTools, None)
        );
    }

    #[test]
    fn a_missing_router_is_an_error_naming_the_backend() {
        let mut b = backends(&[Role::Local, Role::Cloud]);
        b[0].router = Some("no-such-router".into());
        let config = RoutingConfig {
            policy: RoutingPolicy::Router,
            ..RoutingConfig::default()
        };
        let err = Router::new(&config, &b).err().unwrap_or_default();
        assert!(
            err.contains("backends[0].router") && err.contains("no-such-router"),
            "{err}"
        );
    }
}
